package federation_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
)

// env is the shared fixture: three real control planes and one federation
// controller per cluster, started once for the package.
var env *fixture

type fixture struct {
	cp       *controlplane.Federation
	clusters []string
	kube     map[string]kubernetes.Interface
	mcs      map[string]mcsclient.Interface

	mu    sync.Mutex
	ctrls map[string]*running // current controller per cluster
	seq   atomic.Int64
}

type running struct {
	ctrl   *federation.Controller
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
}

const staleBound = 4 * time.Second

var (
	envOnce sync.Once
	envErr  error
)

func TestMain(m *testing.M) {
	klog.SetSlogLogger(slog.New(slog.DiscardHandler)) // reflectors are noisy while a peer is down
	code := m.Run()
	if env != nil {
		env.mu.Lock()
		for _, r := range env.ctrls {
			r.cancel()
			<-r.done
		}
		env.mu.Unlock()
		env.cp.Stop()
	}
	if bench != nil {
		bench.stop()
	}
	// Every controller has returned and every control plane stopped:
	// nothing the tests started may still run.
	if code == 0 {
		if err := goleak.Find(leakOptions...); err != nil {
			fmt.Fprintln(os.Stderr, "goroutines outlived the tests:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// leakOptions are the goroutines that belong to the process, not to a
// test: each is started once, by a library's init or first use, and lives
// as long as the process.
var leakOptions = []goleak.Option{
	// klog's flush daemon, started by klog's init.
	goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"),
}

// need starts the shared fixture on first use: three control planes and an
// in-process controller for each.
func need(t *testing.T) {
	t.Helper()
	envOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cp, err := controlplane.Start(ctx, controlplane.Options{})
		if err != nil {
			envErr = fmt.Errorf("start control planes: %w", err)
			return
		}
		env = &fixture{cp: cp, kube: map[string]kubernetes.Interface{}, mcs: map[string]mcsclient.Interface{}, ctrls: map[string]*running{}}
		for _, c := range cp.Clusters {
			env.clusters = append(env.clusters, c.Name)
			env.kube[c.Name] = kubernetes.NewForConfigOrDie(c.Config)
			env.mcs[c.Name] = mcsclient.NewForConfigOrDie(c.Config)
		}
		for _, c := range cp.Clusters {
			if _, err := env.startController(c.Name, "replica-a", 30*time.Second); err != nil {
				envErr = err
				return
			}
		}
	})
	if envErr != nil {
		t.Fatal(envErr)
	}
	env.restartLost(t)
}

// restartLost starts a new replica for every cluster whose controller
// returned because it lost its lease (a test kept its API server down for
// longer than the 2 s lease), as its Deployment would restart the process:
// otherwise every later test (say, with -count=2) would wait in vain for
// that cluster's writes. Any other end of a controller fails the test.
func (f *fixture) restartLost(t *testing.T) {
	t.Helper()
	var lost []string
	f.mu.Lock()
	for _, cl := range f.clusters {
		select {
		case err := <-f.ctrls[cl].done:
			if err == nil || err.Error() != "lost leader lease" {
				f.ctrls[cl].done <- err // for TestMain
				f.mu.Unlock()
				t.Fatalf("the controller of %s stopped: %v", cl, err)
			}
			f.ctrls[cl].done <- err
			lost = append(lost, cl)
		default:
		}
	}
	f.mu.Unlock()
	for _, cl := range lost {
		t.Logf("the controller of %s lost its lease; starting a new replica", cl)
		r, err := f.startController(cl, fmt.Sprintf("replica-%d", f.seq.Add(1)), 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-r.ctrl.Leading():
		default:
			t.Fatalf("the new controller of %s did not lead within 30s", cl)
		}
	}
}

func controllerOptions(cluster, identity string) federation.Options {
	cl := env.cp.Cluster(cluster)
	var peers []federation.Peer
	for _, p := range env.cp.Clusters {
		if p.Name != cluster {
			peers = append(peers, federation.Peer{Name: p.Name, Config: p.Config})
		}
	}
	return federation.Options{
		Config:        cl.Config,
		Peers:         peers,
		ProbeInterval: 250 * time.Millisecond,
		ProbeTimeout:  500 * time.Millisecond,
		StaleBound:    staleBound,
		LeaderElection: federation.LeaderElection{
			Identity: cluster + "-" + identity,
			// Renewals get 7 s: on a loaded 2-core machine (a stress run
			// of -count=5 beside a CPU hog) east's leader, with a 1.5 s
			// renew deadline, lost its lease though no test stopped its
			// API server. A follower still takes over a released lease at
			// its next retry, 250 ms.
			LeaseDuration: 10 * time.Second,
			RenewDeadline: 7 * time.Second,
			RetryPeriod:   250 * time.Millisecond,
		},
		Logger: testLogger(),
	}
}

// testLogger discards controller logs unless FEDMESH_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("FEDMESH_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startController starts a replica; it becomes the cluster's current
// controller once it leads. It waits at most wait for that: a second
// replica stays a follower.
func (f *fixture) startController(cluster, identity string, wait time.Duration) (*running, error) {
	opts := controllerOptions(cluster, identity)
	reg := prometheus.NewRegistry()
	opts.Registry = reg
	ctrl, err := federation.New(opts)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{ctrl: ctrl, reg: reg, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- ctrl.Run(ctx) }()
	select {
	case <-ctrl.Leading():
		f.mu.Lock()
		f.ctrls[cluster] = r
		f.mu.Unlock()
	case err := <-r.done:
		cancel()
		return nil, fmt.Errorf("controller %s/%s: %v", cluster, identity, err)
	case <-time.After(wait):
		// A second replica stays a follower; the caller decides.
	}
	return r, nil
}

// ns creates a fresh namespace in the given clusters (default: all).
func (f *fixture) ns(t *testing.T, clusters ...string) string {
	t.Helper()
	if len(clusters) == 0 {
		clusters = f.clusters
	}
	name := fmt.Sprintf("t%d-%s", f.seq.Add(1), strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())))
	if len(name) > 60 {
		name = name[:60]
	}
	name = strings.TrimRight(name, "-")
	for _, c := range clusters {
		f.createNS(t, c, name)
	}
	return name
}

func (f *fixture) createNS(t *testing.T, cluster, name string) {
	t.Helper()
	_, err := f.kube[cluster].CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace %s in %s: %v", name, cluster, err)
	}
}

func (f *fixture) service(t *testing.T, cluster, ns, name string, mut func(*corev1.Service)) *corev1.Service {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{
			Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80}},
		},
	}
	if mut != nil {
		mut(svc)
	}
	out, err := f.kube[cluster].CoreV1().Services(ns).Create(context.Background(), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service %s/%s in %s: %v", ns, name, cluster, err)
	}
	return out
}

func (f *fixture) export(t *testing.T, cluster, ns, name string, mut func(*mcsv1beta1.ServiceExport)) {
	t.Helper()
	se := &mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
	if mut != nil {
		mut(se)
	}
	if _, err := f.mcs[cluster].MulticlusterV1beta1().ServiceExports(ns).Create(context.Background(), se, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create serviceexport %s/%s in %s: %v", ns, name, cluster, err)
	}
}

func (f *fixture) unexport(t *testing.T, cluster, ns, name string) {
	t.Helper()
	if err := f.mcs[cluster].MulticlusterV1beta1().ServiceExports(ns).Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete serviceexport %s/%s in %s: %v", ns, name, cluster, err)
	}
}

// endpoints writes the EndpointSlice a cluster's endpoint controller would
// keep for a Service (the local control planes run no controller manager).
func (f *fixture) endpoints(t *testing.T, cluster, ns, svc, slice string, ready []bool, addrBase string) {
	t.Helper()
	es := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: slice, Namespace: ns, Labels: map[string]string{
			discoveryv1.LabelServiceName: svc, discoveryv1.LabelManagedBy: "endpointslice-controller.k8s.io"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Port: new(int32(8080)), Protocol: new(corev1.ProtocolTCP)}},
	}
	for i, r := range ready {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{fmt.Sprintf("%s.%d", addrBase, i+1)},
			Conditions: discoveryv1.EndpointConditions{Ready: new(r), Serving: new(r), Terminating: new(false)},
			NodeName:   new("node-" + cluster),
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: fmt.Sprintf("%s-%d", svc, i)},
		})
	}
	api := f.kube[cluster].DiscoveryV1().EndpointSlices(ns)
	cur, err := api.Get(context.Background(), slice, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = api.Create(context.Background(), es, metav1.CreateOptions{})
	case err == nil:
		es.ResourceVersion = cur.ResourceVersion
		_, err = api.Update(context.Background(), es, metav1.UpdateOptions{})
	}
	if err != nil {
		t.Fatalf("write endpointslice %s/%s in %s: %v", ns, slice, cluster, err)
	}
}

// eventually polls cond until it returns nil or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %s: %v", what, timeout, err)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func (f *fixture) getImport(cluster, ns, name string) (*mcsv1beta1.ServiceImport, error) {
	return f.mcs[cluster].MulticlusterV1beta1().ServiceImports(ns).Get(context.Background(), name, metav1.GetOptions{})
}

func (f *fixture) getExport(cluster, ns, name string) (*mcsv1beta1.ServiceExport, error) {
	return f.mcs[cluster].MulticlusterV1beta1().ServiceExports(ns).Get(context.Background(), name, metav1.GetOptions{})
}

// mirrored lists the EndpointSlices fedmesh keeps for an import.
func (f *fixture) mirrored(cluster, ns, name string) ([]discoveryv1.EndpointSlice, error) {
	l, err := f.kube[cluster].DiscoveryV1().EndpointSlices(ns).List(context.Background(), metav1.ListOptions{
		LabelSelector: mcsv1beta1.LabelServiceName + "=" + name})
	if err != nil {
		return nil, err
	}
	return l.Items, nil
}

// condition returns the condition of the given type or an error naming what is there.
func condition(conds []metav1.Condition, typ string) (*metav1.Condition, error) {
	c := meta.FindStatusCondition(conds, typ)
	if c == nil {
		return nil, fmt.Errorf("no %s condition in %v", typ, conds)
	}
	return c, nil
}

func wantCondition(conds []metav1.Condition, typ string, status metav1.ConditionStatus, reason string) error {
	c, err := condition(conds, typ)
	if err != nil {
		return err
	}
	if c.Status != status || c.Reason != reason {
		return fmt.Errorf("%s = %s/%s (%s), want %s/%s", typ, c.Status, c.Reason, c.Message, status, reason)
	}
	return nil
}
