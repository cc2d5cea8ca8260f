package fedctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	"sigs.k8s.io/yaml"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
)

// TestStatusFromKubeconfig is `fedctl status` as a user of a federation not
// started by fedctl up sees it: two real kube-apiservers, linked with
// `fedctl link`, a real federation controller per cluster (in-process, its
// admin endpoint served as cmd/fedmesh-controller serves it, on a pod
// address in a network namespace the test made, so that the API server's
// pod proxy reaches it), demo/echo exported from both, and only a
// kubeconfig: $KUBECONFIG with one file per cluster (merged as kubectl
// merges them), then --kubeconfig once west's API server is down.
func TestStatusFromKubeconfig(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the controllers' admin endpoints listen on pod addresses in a network namespace, because the API server's pod proxy refuses loopback addresses")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("needs iproute2 (make deps installs it): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"east", "west"}})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	ns := newAdminNetns(t)
	dir := t.TempDir()
	t.Setenv("FEDMESH_DIR", filepath.Join(dir, "no-local-federation"))

	files := map[string]string{}
	for _, c := range cp.Clusters {
		files[c.Name] = filepath.Join(dir, c.Name+".kubeconfig")
		if err := clientcmd.WriteToFile(*controlplane.KubeconfigFor(map[string]*rest.Config{c.Name: c.Config}, c.Name), files[c.Name]); err != nil {
			t.Fatal(err)
		}
	}
	// Link the clusters both ways, as a user does: fedctl link against one,
	// its Secret applied in the other.
	for _, pair := range [][2]string{{"east", "west"}, {"west", "east"}} {
		out := runFedctl(t, ctx, nil, "link", "--kubeconfig", files[pair[0]], "--token-ttl", "1h")
		var sec corev1.Secret
		if err := yaml.Unmarshal([]byte(strings.Split(out, "---\n")[1]), &sec); err != nil {
			t.Fatal(err)
		}
		if _, err := kubernetes.NewForConfigOrDie(cp.Cluster(pair[1]).Config).CoreV1().Secrets(controlplane.SystemNamespace).Create(ctx, &sec, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	ctrls := map[string]*federation.Controller{}
	done := make(chan error, 2)
	for i, c := range cp.Clusters {
		kube := kubernetes.NewForConfigOrDie(c.Config)
		leader := "fedmesh-federation-controller-" + c.Name + "-0"
		ctrl, err := federation.New(federation.Options{Config: c.Config, ProbeInterval: 250 * time.Millisecond,
			LeaderElection: federation.LeaderElection{Identity: leader, LeaseDuration: 4 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: 500 * time.Millisecond}})
		if err != nil {
			t.Fatal(err)
		}
		ctrls[c.Name] = ctrl
		go func() { done <- ctrl.Run(ctx) }()
		// The admin endpoint, as cmd/fedmesh-controller serves it on
		// --metrics-addr: /peers and /version.
		ip := ns.addr(10 + i)
		mux := http.NewServeMux()
		mux.HandleFunc("/peers", func(w http.ResponseWriter, _ *http.Request) { json.NewEncoder(w).Encode(ctrl.Peers()) })
		mux.HandleFunc("/version", func(w http.ResponseWriter, _ *http.Request) { json.NewEncoder(w).Encode(federation.Version()) })
		srv := &http.Server{Handler: mux}
		ln := ns.listen(t, net.JoinHostPort(ip, "9402"))
		go srv.Serve(ln)
		defer srv.Close()
		// The controller's pods as the Deployment would make them: the
		// leader at the admin address, a second replica not ready.
		createPod(t, ctx, kube, leader, "fedmesh-federation-controller", "metrics", 9402, ip, true)
		createPod(t, ctx, kube, "fedmesh-federation-controller-"+c.Name+"-1", "fedmesh-federation-controller", "metrics", 9402, "", false)
	}
	defer func() {
		cancel()
		for range ctrls {
			<-done
		}
	}()
	// east has a gateway pod whose admin endpoint nothing serves; west has
	// none.
	createPod(t, ctx, kubernetes.NewForConfigOrDie(cp.Cluster("east").Config), "fedmesh-gateway-east-0", "fedmesh-gateway", "admin", 15000, ns.addr(20), true)

	for i, c := range cp.Clusters {
		exportEcho(t, ctx, c.Config, i)
	}
	for _, c := range cp.Clusters {
		waitFor(t, 30*time.Second, c.Name+" imports demo/echo from both clusters", func() bool {
			si, err := mcsclient.NewForConfigOrDie(c.Config).MulticlusterV1beta1().ServiceImports("demo").Get(ctx, "echo", metav1.GetOptions{})
			return err == nil && len(si.Status.Clusters) == 2
		})
		waitFor(t, 30*time.Second, c.Name+"'s controller leads and reaches its peer", func() bool {
			ps := ctrls[c.Name].Peers()
			return len(ps) == 1 && ps[0].Reachable && ps[0].ClusterID != ""
		})
	}

	// 1. $KUBECONFIG with two files, no --kubeconfig, no --dir, no local
	// federation.
	env := map[string]string{"KUBECONFIG": files["east"] + string(os.PathListSeparator) + files["west"]}
	st := statusJSON(t, ctx, env)
	if len(st.Clusters) != 2 {
		t.Fatalf("want both contexts of $KUBECONFIG, got %+v", st.Clusters)
	}
	for _, cl := range st.Clusters {
		other := map[string]string{"east": "west", "west": "east"}[cl.Context]
		if !cl.Reachable || cl.ClusterID != cl.Context || cl.Controller.Leader != "fedmesh-federation-controller-"+cl.Context+"-0" ||
			cl.Controller.Replicas != 2 || cl.Controller.Ready != 1 || cl.Controller.Version == "" {
			t.Errorf("%s: cluster and controller %+v", cl.Context, cl)
		}
		if len(cl.Peers) != 1 || cl.Peers[0].ClusterID != other || !cl.Peers[0].Reachable {
			t.Errorf("%s: peers %+v (unknown: %+v)", cl.Context, cl.Peers, cl.Unknown)
		}
		if cl.Trust == nil || cl.Trust.TrustDomain != cl.Context+".fedmesh.test" {
			t.Errorf("%s: trust %+v, want the trust domain of the peer Secret in %s", cl.Context, cl.Trust, other)
		}
		if len(cl.ServiceExports) != 1 || len(cl.ServiceImports) != 1 || !hasCondition(cl.ServiceExports[0].Conditions, "Valid", "True") ||
			!hasCondition(cl.ServiceImports[0].Conditions, "Ready", "True") || len(cl.ServiceImports[0].Clusters) != 2 {
			t.Errorf("%s: exports %+v imports %+v", cl.Context, cl.ServiceExports, cl.ServiceImports)
		}
		for _, what := range []string{"trust roots", "gateways"} {
			if unknownWhy(cl, what) == "" && !(what == "gateways" && cl.Context == "east") {
				t.Errorf("%s: %s neither shown nor named as unknown: %+v", cl.Context, what, cl.Unknown)
			}
		}
	}
	east := st.Clusters[0]
	if len(east.Gateways) != 1 || !strings.Contains(east.Gateways[0].Error, "connection refused") {
		t.Errorf("east's gateway pod: %+v, want the proxy's connection refused", east.Gateways)
	}
	if len(st.Services) != 1 || strings.Join(st.Services[0].ExportedBy, ",") != "east,west" || len(st.Services[0].Imports) != 2 {
		t.Errorf("services %+v", st.Services)
	}
	statusGolden(t, st, "status_kubeconfig")
	// check through the same kubeconfig passes the peers and warns about
	// what it could not find out, rather than passing over it.
	var checkOut bytes.Buffer
	checkCmd := newCommand(&checkOut, &bytes.Buffer{}, func(k string) string { return env[k] })
	checkCmd.SetArgs([]string{"check", "-o", "json"})
	checkErr := checkCmd.ExecuteContext(ctx) // this machine may lack the binaries: judge the cluster checks only
	var checks []Check
	if err := json.Unmarshal(checkOut.Bytes(), &checks); err != nil {
		t.Fatalf("check -o json: %v (%v)\n%s", err, checkErr, checkOut.String())
	}
	got := map[string]Check{}
	for _, c := range checks {
		got[c.Scope+" "+c.Name] = c
	}
	if c := got["east peer west"]; !c.OK {
		t.Errorf("check: east's peer west %+v", c)
	}
	if c := got["west trust roots"]; c.OK || !c.Warn || !strings.HasPrefix(c.Detail, "unknown: ") {
		t.Errorf("check: west's unknown trust roots %+v, want a warning saying why", c)
	}
	if c, ok := got["west trust bundle"]; ok {
		t.Errorf("check: west's trust bundle judged with its roots unknown: %+v", c)
	}

	// 2. west's API server down: east's controller marks it stale; status
	// through --kubeconfig (one merged file) says west is unreachable and
	// east's peer west stale.
	merged := filepath.Join(dir, "both.kubeconfig")
	if err := clientcmd.WriteToFile(*controlplane.KubeconfigFor(map[string]*rest.Config{"east": cp.Cluster("east").Config, "west": cp.Cluster("west").Config}, "east"), merged); err != nil {
		t.Fatal(err)
	}
	cp.Cluster("west").StopAPIServer()
	waitFor(t, 10*time.Second, "east's controller marks west stale", func() bool {
		ps := ctrls["east"].Peers()
		return len(ps) == 1 && ps[0].Stale
	})
	st = statusJSON(t, ctx, map[string]string{"KUBECONFIG": files["east"]}, "--kubeconfig", merged)
	if len(st.Clusters) != 2 || st.Clusters[1].Reachable || !st.Clusters[0].Reachable {
		t.Fatalf("--kubeconfig must win over $KUBECONFIG and show both clusters, west unreachable: %+v", st.Clusters)
	}
	if p := st.Clusters[0].Peers; len(p) != 1 || !p[0].Stale || p[0].StaleSince.IsZero() {
		t.Errorf("east's peer west: %+v, want stale with a time", p)
	}
	statusGolden(t, st, "status_kubeconfig_stale")
}

// runFedctl runs fedctl in-process with env as its environment.
func runFedctl(t *testing.T, ctx context.Context, env map[string]string, args ...string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := newCommand(&out, &errOut, func(k string) string { return env[k] })
	cmd.SetArgs(args)
	if err := cmd.ExecuteContext(ctx); err != nil {
		t.Fatalf("fedctl %s: %v\n%s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String()
}

func statusJSON(t *testing.T, ctx context.Context, env map[string]string, args ...string) *Status {
	t.Helper()
	out := runFedctl(t, ctx, env, append([]string{"status", "-o", "json"}, args...)...)
	var st Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	return &st
}

// statusGolden compares the table and the JSON with golden files, after
// replacing what changes from run to run (ports, addresses, times, the
// build) with fixed values.
func statusGolden(t *testing.T, st *Status, name string) {
	t.Helper()
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	addr := regexp.MustCompile(`127\.0\.0\.1:\d+|198\.19\.\d+\.(\d+)`)
	stamp := regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z`)
	norm := func(s string) string {
		s = stamp.ReplaceAllString(s, "TIME")
		return addr.ReplaceAllStringFunc(s, func(m string) string {
			if strings.HasPrefix(m, "127.") {
				return "127.0.0.1:PORT"
			}
			return "POD-IP." + m[strings.LastIndexByte(m, '.')+1:]
		})
	}
	for i := range st.Clusters {
		cl := &st.Clusters[i]
		cl.APIServer, cl.Error = norm(cl.APIServer), norm(cl.Error)
		if !cl.Controller.Renewed.IsZero() {
			cl.Controller.Renewed = now.Add(-time.Second)
		}
		if cl.Controller.Version != "" {
			cl.Controller.Version = "(devel) REVISION"
		}
		for j := range cl.Peers {
			p := &cl.Peers[j]
			p.Error = norm(p.Error)
			if !p.LastSync.IsZero() {
				p.LastSync = now.Add(-2 * time.Second)
			}
			if !p.StaleSince.IsZero() {
				p.StaleSince = now.Add(-3 * time.Second)
			}
		}
		for j := range cl.Gateways {
			cl.Gateways[j].Admin, cl.Gateways[j].Error = norm(cl.Gateways[j].Admin), norm(cl.Gateways[j].Error)
		}
		for j := range cl.Unknown {
			cl.Unknown[j].Why = norm(cl.Unknown[j].Why)
		}
		for _, os := range [][]ObjectStatus{cl.ServiceExports, cl.ServiceImports} {
			for j := range os {
				for k := range os[j].Conditions {
					os[j].Conditions[k].Message = norm(os[j].Conditions[k].Message)
				}
			}
		}
	}
	var buf bytes.Buffer
	renderStatus(&buf, st, colors{}, now)
	golden(t, name+".golden", buf.Bytes())
	buf.Reset()
	if err := printObject(&buf, st, "json"); err != nil {
		t.Fatal(err)
	}
	golden(t, name+".json.golden", buf.Bytes())
}

func hasCondition(cs []Condition, typ, status string) bool {
	for _, c := range cs {
		if c.Type == typ && c.Status == status {
			return true
		}
	}
	return false
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// exportEcho creates demo/echo with two ready endpoints and exports it.
func exportEcho(t *testing.T, ctx context.Context, cfg *rest.Config, i int) {
	t.Helper()
	kube := kubernetes.NewForConfigOrDie(cfg)
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Services("demo").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 8080}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "echo", Labels: map[string]string{discoveryv1.LabelServiceName: "echo"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Port: new(int32(8080))}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{fmt.Sprintf("198.18.%d.10", 200+i)}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}},
			{Addresses: []string{fmt.Sprintf("198.18.%d.11", 200+i)}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}},
		},
	}
	if _, err := kube.DiscoveryV1().EndpointSlices("demo").Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := mcsclient.NewForConfigOrDie(cfg).MulticlusterV1beta1().ServiceExports("demo").Create(ctx,
		&mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "echo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// createPod writes a pod of app as a Deployment and the kubelet would: its
// admin container port, and (when ip is set) its address and readiness.
func createPod(t *testing.T, ctx context.Context, kube kubernetes.Interface, name, app, portName string, port int32, ip string, ready bool) {
	t.Helper()
	pods := kube.CoreV1().Pods(controlplane.SystemNamespace)
	p, err := pods.Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{appLabel: app}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "main", Image: "fedmesh/" + app + ":test",
			Ports: []corev1.ContainerPort{{Name: portName, ContainerPort: port}}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ip == "" {
		return
	}
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: status}}}
	if _, err := pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// adminNetns is a network namespace the test made, joined to this host by
// a veth pair: the host end is 198.19.N.1/24, the pod addresses are in the
// namespace, and the API servers (on this host) reach them through the veth.
type adminNetns struct {
	name, prefix string
}

func (n *adminNetns) addr(i int) string { return fmt.Sprintf("%s%d", n.prefix, i) }

func newAdminNetns(t *testing.T) *adminNetns {
	t.Helper()
	routes, err := exec.Command("ip", "-4", "route", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	third := -1
	for i := 150; i < 200; i++ {
		if !strings.Contains(string(routes), fmt.Sprintf("198.19.%d.0/24", i)) {
			third = i
			break
		}
	}
	if third < 0 {
		t.Fatal("no free 198.19.150-199.0/24")
	}
	n := &adminNetns{name: fmt.Sprintf("fmst-%d-%d", os.Getpid(), third), prefix: fmt.Sprintf("198.19.%d.", third)}
	host, peer := fmt.Sprintf("fmst%dh", third), fmt.Sprintf("fmst%dn", third)
	t.Cleanup(func() {
		exec.Command("ip", "netns", "delete", n.name).Run()
		exec.Command("ip", "link", "delete", host).Run()
	})
	for _, args := range [][]string{
		{"netns", "add", n.name},
		{"link", "add", host, "type", "veth", "peer", "name", peer},
		{"link", "set", peer, "netns", n.name},
		{"addr", "add", n.prefix + "1/24", "dev", host},
		{"link", "set", host, "up"},
		{"-n", n.name, "link", "set", "lo", "up"},
		{"-n", n.name, "addr", "add", n.addr(10) + "/24", "dev", peer},
		{"-n", n.name, "addr", "add", n.addr(11) + "/24", "dev", peer},
		{"-n", n.name, "addr", "add", n.addr(20) + "/24", "dev", peer},
		{"-n", n.name, "link", "set", peer, "up"},
		{"-n", n.name, "route", "add", "default", "via", n.prefix + "1"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return n
}

// listen opens a TCP listener inside the namespace: the socket is made on
// a thread moved into it and back. The thread must not be thrown away:
// controlplane starts the API servers with Pdeathsig, which fires when the
// thread that forked them ends, and this may be that thread.
func (n *adminNetns) listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	type res struct {
		ln  net.Listener
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- res{nil, err}
			return
		}
		defer home.Close()
		f, err := os.Open("/run/netns/" + n.name)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- res{nil, err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- res{nil, fmt.Errorf("setns: %w", err)}
			return
		}
		ln, lerr := net.Listen("tcp", addr)
		if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
			// Stuck in the namespace: stay locked, so that the thread ends
			// with this goroutine rather than serve others.
			if ln != nil {
				ln.Close()
			}
			ch <- res{nil, fmt.Errorf("setns back: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		ch <- res{ln, lerr}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() {
		if err := r.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			t.Error(err)
		}
	})
	return r.ln
}
