package localfed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	"sigs.k8s.io/yaml"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/gateway/faultnet"
)

// Options configure the supervisor.
type Options struct {
	Dir        string
	Clusters   []string
	ClusterSet string
	Logger     *slog.Logger
	Progress   io.Writer // one line per step, for `fedctl up` to show
}

// TrustDomain is the SPIFFE trust domain of a local cluster.
func TrustDomain(cluster string) string { return cluster + ".fedmesh.test" }

// ContextName is the kubeconfig context of a local cluster.
func ContextName(cluster string) string { return "fedmesh-" + cluster }

type member struct {
	cp         *controlplane.Cluster
	state      Cluster
	dir        string
	issuer     *controlplane.Process
	controller *controlplane.Process
	gateways   []*controlplane.Process
	discovery  string // host:port of the controller's discovery API
	// controllerCmd restarts the controller for the controller-restart drill.
	controllerCmd []string
	gatewayCmds   [][]string
	issuerCmd     []string
	mu            sync.Mutex // guards controller, gateways and issuer, which drills replace
	net           *netns     // the cluster's pod network; nil without root
}

// listenAddr is where components that pods must reach listen: the host end
// of the cluster's veth pair, or loopback when there is no pod network.
func (m *member) listenAddr() string {
	if m.net != nil {
		return m.net.hostAddr()
	}
	return "127.0.0.1"
}

// Supervise starts the local federation, writes its state, serves the
// control socket, and stops everything when ctx ends.
func Supervise(ctx context.Context, opts Options) (err error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Progress == nil {
		opts.Progress = io.Discard
	}
	if opts.ClusterSet == "" {
		opts.ClusterSet = "fedmesh"
	}
	log := opts.Logger
	step := func(format string, a ...any) {
		fmt.Fprintf(opts.Progress, format+"\n", a...)
		log.Info(fmt.Sprintf(format, a...))
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return err
	}
	if pid := RunningPID(opts.Dir); pid != 0 && pid != os.Getpid() {
		return fmt.Errorf("a local federation is already running in %s (supervisor pid %d)", opts.Dir, pid)
	}
	// Every child inherits this, so fedctl down can find any process of this
	// federation, even one in a network namespace.
	os.Setenv(dirEnv, opts.Dir)
	pidPath := filepath.Join(opts.Dir, PIDFile)
	if err := os.WriteFile(pidPath, []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return err
	}
	defer func() {
		os.Remove(filepath.Join(opts.Dir, StateFile))
		os.Remove(filepath.Join(opts.Dir, SocketFile))
		os.Remove(pidPath)
	}()
	controllerBin, err := FindBinary("fedmesh-controller")
	if err != nil {
		return err
	}
	issuerBin, err := FindBinary("fedmesh-issuer")
	if err != nil {
		return err
	}
	bins := map[string]string{}
	for _, b := range []string{"fedmesh-gateway", "fedmesh-sidecar", "fedmesh-echo"} {
		if bins[b], err = FindBinary(b); err != nil {
			return err
		}
	}
	gatewayBin := bins["fedmesh-gateway"]

	start := time.Now()
	step("starting etcd and %d kube-apiservers (%s)", len(opts.Clusters), strings.Join(opts.Clusters, ", "))
	clustersDir := filepath.Join(opts.Dir, "clusters")
	os.RemoveAll(clustersDir) // a previous run's stale state; the supervisor owns this directory
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: opts.Clusters, ClusterSet: opts.ClusterSet, Dir: clustersDir, Logger: log})
	if err != nil {
		return err
	}
	defer cp.Stop()
	step("control planes ready in %s", time.Since(start).Round(10*time.Millisecond))

	kcPath := filepath.Join(opts.Dir, KubeconfigFile)
	cfgs := map[string]*rest.Config{}
	for _, c := range cp.Clusters {
		cfgs[ContextName(c.Name)] = c.Config
	}
	if err := clientcmd.WriteToFile(*controlplane.KubeconfigFor(cfgs, ContextName(cp.Clusters[0].Name)), kcPath); err != nil {
		return err
	}

	members := make([]*member, len(cp.Clusters))
	for i, c := range cp.Clusters {
		m := &member{cp: c, dir: filepath.Join(clustersDir, c.Name)}
		m.state = Cluster{
			Name: c.Name, Context: ContextName(c.Name), APIServer: c.URL, TrustDomain: TrustDomain(c.Name),
			WorkloadAPISocket: filepath.Join(m.dir, "workload.sock"),
			Bundle:            filepath.Join(m.dir, "issuer", "bundle.spiffe.json"),
			Gateways:          []Gateway{}, Workloads: []Workload{},
		}
		members[i] = m
	}
	defer func() {
		for _, m := range members {
			m.mu.Lock()
			procs := append([]*controlplane.Process{m.controller, m.issuer}, m.gateways...)
			m.mu.Unlock()
			for _, p := range procs {
				if p != nil {
					p.Stop()
				}
			}
		}
	}()

	if canNetns() {
		slot, err := freeSlot(len(members))
		if err != nil {
			return err
		}
		for i, m := range members {
			if m.net, err = createNetns(opts.Dir, slot, i, podHosts()); err != nil {
				return fmt.Errorf("cluster %s: pod network: %w", m.state.Name, err)
			}
			defer m.net.delete()
			m.state.PodNetwork = m.net.prefix + "0/24"
			m.state.NetworkNamespace = m.net.name
		}
		step("pod networks: one network namespace per cluster, 198.18.%d.0/24 onwards", 8*slot+1)
	} else {
		step("not root (or no iproute2): no pod networks, so no sample workloads; everything else runs on loopback")
	}
	step("starting SPIFFE issuers (trust domains %s)", strings.Join(trustDomains(members), ", "))
	if err := startIssuers(ctx, issuerBin, members); err != nil {
		return err
	}
	step("starting federation controllers")
	if err := startControllers(ctx, controllerBin, members); err != nil {
		return err
	}
	if err := waitPeers(ctx, members, 30*time.Second); err != nil {
		return err
	}
	step("starting %d gateway replicas per cluster, linked through the WAN fault relays", GatewayReplicas)
	w, err := startGateways(ctx, gatewayBin, members)
	if err != nil {
		return err
	}
	defer w.close()
	if err := waitGateways(ctx, members, 30*time.Second); err != nil {
		return err
	}
	step("every controller reaches every peer and every gateway every peer cluster; exporting the sample service demo/echo from each cluster")
	for _, m := range members {
		if err := exportSample(ctx, m.cp.Config); err != nil {
			return fmt.Errorf("cluster %s: %w", m.state.Name, err)
		}
	}
	var wls []*workloads
	if members[0].net != nil {
		step("starting sample workloads: %d echo pods and a client per cluster, each with a sidecar, in the pod networks", EchoReplicas)
		wls, err = startWorkloads(ctx, members, bins)
		defer func() {
			for _, w := range wls {
				w.stopAll()
			}
		}()
		if err != nil {
			return err
		}
		if err := waitSidecars(ctx, wls, 30*time.Second); err != nil {
			return err
		}
	}

	st := &State{Dir: opts.Dir, ClusterSet: opts.ClusterSet, Kubeconfig: kcPath, Supervisor: os.Getpid(), EtcdDir: cp.EtcdDir()}
	for _, m := range members {
		st.Clusters = append(st.Clusters, m.state)
	}
	srv, err := serveControl(opts.Dir, members, w, wls, log)
	if err != nil {
		return err
	}
	defer srv.Close()
	b, _ := json.MarshalIndent(st, "", "  ")
	if err := os.WriteFile(filepath.Join(opts.Dir, StateFile), append(b, '\n'), 0o644); err != nil {
		return err
	}
	step("ready: %d clusters in %s", len(members), time.Since(start).Round(10*time.Millisecond))

	// Watch the children: a component that dies is reported, not hidden.
	t := time.NewTicker(time.Second)
	defer t.Stop()
	reported := map[string]bool{}
	for {
		select {
		case <-ctx.Done():
			log.Info("stopping the local federation")
			return nil
		case <-t.C:
			for _, m := range members {
				m.mu.Lock()
				procs := map[string]*controlplane.Process{"controller": m.controller, "issuer": m.issuer} // replaced under mu by drills
				for i, g := range m.gateways {
					procs[fmt.Sprintf("gateway-%d", i)] = g
				}
				m.mu.Unlock()
				for what, p := range procs {
					key := fmt.Sprintf("%s/%s/%d", m.state.Name, what, p.PID())
					if p != nil && p.Exited() && !reported[key] {
						reported[key] = true
						log.Error("component exited", "cluster", m.state.Name, "component", what, "log", p.Tail())
					}
				}
			}
		}
	}
}

func trustDomains(ms []*member) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.state.TrustDomain)
	}
	return out
}

// startIssuers runs each issuer once alone to create its CA and bundle, then
// again federated with every other cluster, bootstrapped from those bundle
// files (never trust on first use).
func startIssuers(ctx context.Context, bin string, ms []*member) error {
	for _, m := range ms {
		port, err := controlplane.FreePort("127.0.0.1")
		if err != nil {
			return err
		}
		m.state.BundleEndpoint = "https://127.0.0.1:" + strconv.Itoa(port)
		entries := map[string]any{"entries": []map[string]any{
			{"spiffeID": "spiffe://" + m.state.TrustDomain + "/ns/fedmesh-system/sa/gateway", "socket": filepath.Join(m.dir, "gateway.sock")},
			{"spiffeID": "spiffe://" + m.state.TrustDomain + "/ns/fedmesh-system/sa/fedmesh-controller", "socket": filepath.Join(m.dir, "controller.sock")},
			{"spiffeID": "spiffe://" + m.state.TrustDomain + "/ns/demo/sa/echo", "socket": filepath.Join(m.dir, "echo.sock")},
			{"spiffeID": "spiffe://" + m.state.TrustDomain + "/ns/demo/sa/client", "socket": filepath.Join(m.dir, "client.sock")},
		}}
		b, err := yaml.Marshal(entries)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(m.dir, "entries.yaml"), b, 0o644); err != nil {
			return err
		}
	}
	args := func(m *member, federate bool) []string {
		a := []string{
			"--trust-domain", m.state.TrustDomain,
			"--data-dir", filepath.Join(m.dir, "issuer"),
			"--socket", m.state.WorkloadAPISocket,
			"--entries", filepath.Join(m.dir, "entries.yaml"),
			"--bundle-endpoint", strings.TrimPrefix(m.state.BundleEndpoint, "https://"),
			"--refresh-hint", "30s",
		}
		if federate {
			for _, p := range ms {
				if p != m {
					a = append(a, "--federate", fmt.Sprintf("trust-domain=%s,url=%s,endpoint-id=spiffe://%s/fedmesh/issuer,bundle=%s",
						p.state.TrustDomain, p.state.BundleEndpoint, p.state.TrustDomain, p.state.Bundle))
				}
			}
		}
		return a
	}
	// Phase 1: create each CA and bundle.
	for _, m := range ms {
		p, err := controlplane.StartProcess(bin, filepath.Join(m.dir, "issuer.log"), args(m, false)...)
		if err != nil {
			return fmt.Errorf("start issuer for %s: %w", m.state.Name, err)
		}
		err = waitFile(ctx, m.state.Bundle, 15*time.Second, p)
		p.Stop()
		if err != nil {
			return fmt.Errorf("issuer for %s: %w", m.state.Name, err)
		}
	}
	// Phase 2: federated.
	for _, m := range ms {
		port, err := controlplane.FreePort("127.0.0.1")
		if err != nil {
			return err
		}
		m.state.IssuerMetrics = "http://127.0.0.1:" + strconv.Itoa(port)
		m.issuerCmd = append([]string{bin}, append(args(m, true), "--metrics-addr", "127.0.0.1:"+strconv.Itoa(port))...)
		p, err := controlplane.StartProcess(bin, filepath.Join(m.dir, "issuer.log"), m.issuerCmd[1:]...)
		if err != nil {
			return fmt.Errorf("start issuer for %s: %w", m.state.Name, err)
		}
		m.issuer = p
	}
	for _, m := range ms {
		if err := waitFile(ctx, m.state.WorkloadAPISocket, 15*time.Second, m.issuer); err != nil {
			return fmt.Errorf("issuer for %s: %w", m.state.Name, err)
		}
	}
	return nil
}

func startControllers(ctx context.Context, bin string, ms []*member) error {
	for _, m := range ms {
		port, err := controlplane.FreePort("127.0.0.1")
		if err != nil {
			return err
		}
		m.state.ControllerAdmin = "http://127.0.0.1:" + strconv.Itoa(port)
		dport, err := controlplane.FreePort(m.listenAddr())
		if err != nil {
			return err
		}
		m.discovery = net.JoinHostPort(m.listenAddr(), strconv.Itoa(dport))
		m.state.Discovery = m.discovery
		a := []string{"--kubeconfig", m.cp.Kubeconfig, "--metrics-addr", "127.0.0.1:" + strconv.Itoa(port), "--discovery-addr", m.discovery,
			"--spiffe-socket", "unix://" + filepath.Join(m.dir, "controller.sock"),
			"--peer-probe-interval", "500ms", "--leader-election-identity", m.state.Name + "-0"}
		for _, p := range ms {
			if p != m {
				a = append(a, "--peer-kubeconfig", p.state.Name+"="+p.cp.Kubeconfig)
			}
		}
		m.controllerCmd = append([]string{bin}, a...)
		if m.controller, err = controlplane.StartProcess(bin, filepath.Join(m.dir, "controller.log"), a...); err != nil {
			return fmt.Errorf("start controller for %s: %w", m.state.Name, err)
		}
	}
	for _, m := range ms {
		kube, err := kubernetes.NewForConfig(m.cp.Config)
		if err != nil {
			return err
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			l, err := kube.CoordinationV1().Leases(controlplane.SystemNamespace).Get(ctx, "fedmesh-federation-controller", metav1.GetOptions{})
			if err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == m.state.Name+"-0" {
				break
			}
			if m.controller.Exited() {
				return fmt.Errorf("controller for %s exited: %s", m.state.Name, m.controller.Tail())
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("controller for %s did not lead within 30s: %s", m.state.Name, m.controller.Tail())
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}

func waitFile(ctx context.Context, path string, timeout time.Duration, p *controlplane.Process) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if p.Exited() {
			return fmt.Errorf("exited before creating %s: %s", path, p.Tail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not created within %s: %s", path, timeout, p.Tail())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// serveControl serves the drills' requests on a unix socket in the state
// directory: kill or start a cluster's API server.
func serveControl(dir string, ms []*member, w *wan, wls []*workloads, log *slog.Logger) (*http.Server, error) {
	path := filepath.Join(dir, SocketFile)
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	os.Chmod(path, 0o600)
	var mu sync.Mutex
	mux := http.NewServeMux()
	mux.HandleFunc("POST /clusters/{name}/component/{action}", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		name, action := r.PathValue("name"), r.PathValue("action")
		var m *member
		for _, x := range ms {
			if x.state.Name == name {
				m = x
			}
		}
		if m == nil {
			http.Error(w, fmt.Sprintf("no cluster %q in this federation", name), http.StatusNotFound)
			return
		}
		switch action {
		case "kill-controller":
			m.mu.Lock()
			m.controller.Kill()
			m.mu.Unlock()
		case "start-controller":
			m.mu.Lock()
			if m.controller.Exited() {
				p, err := controlplane.StartProcess(m.controllerCmd[0], filepath.Join(m.dir, "controller.log"), m.controllerCmd[1:]...)
				if err != nil {
					m.mu.Unlock()
					http.Error(w, err.Error(), http.StatusInternalServerError)
					return
				}
				m.controller = p
			}
			m.mu.Unlock()
		case "kill-gateway-0":
			m.mu.Lock()
			m.gateways[0].Kill()
			m.mu.Unlock()
		case "start-gateway-0":
			m.mu.Lock()
			if m.gateways[0].Exited() {
				cmd := m.gatewayCmds[0]
				p, err := controlplane.StartProcess(cmd[0], filepath.Join(m.dir, "gateway-0.log"), cmd[1:]...)
				if err != nil {
					m.mu.Unlock()
					http.Error(w, err.Error(), http.StatusInternalServerError)
					return
				}
				m.gateways[0] = p
			}
			m.mu.Unlock()
		case "issuer-ttl":
			// Restart the issuer with another SVID lifetime ("" = default);
			// its CA is on disk, so trust is unchanged, and workloads'
			// X509Sources reconnect by themselves.
			ttl := r.URL.Query().Get("ttl")
			args := slices.Clone(m.issuerCmd[1:])
			if ttl != "" {
				if _, err := time.ParseDuration(ttl); err != nil {
					http.Error(w, "ttl: "+err.Error(), http.StatusBadRequest)
					return
				}
				args = append(args, "--svid-ttl", ttl, "--unsafe-min-svid-ttl", ttl)
			}
			m.mu.Lock()
			m.issuer.Stop()
			p, err := controlplane.StartProcess(m.issuerCmd[0], filepath.Join(m.dir, "issuer.log"), args...)
			if err == nil {
				m.issuer = p
				err = waitFile(r.Context(), m.state.WorkloadAPISocket, 15*time.Second, p)
			}
			m.mu.Unlock()
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
		case "kill":
			m.cp.KillAPIServer()
		case "start":
			if err := m.cp.StartAPIServer(r.Context()); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
		default:
			http.Error(w, fmt.Sprintf("unknown action %q (kill, start, kill-controller, start-controller, kill-gateway-0, start-gateway-0, issuer-ttl)", action), http.StatusBadRequest)
			return
		}
		log.Info("drill action", "cluster", name, "apiserver", action)
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("POST /wan/{a}/{b}", func(rw http.ResponseWriter, r *http.Request) {
		var f faultnet.Faults
		if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&f); err != nil {
			http.Error(rw, "faults: "+err.Error(), http.StatusBadRequest)
			return
		}
		if err := w.setFaults(r.PathValue("a"), r.PathValue("b"), f); err != nil {
			http.Error(rw, err.Error(), http.StatusNotFound)
			return
		}
		log.Info("wan faults", "a", r.PathValue("a"), "b", r.PathValue("b"), "faults", fmt.Sprintf("%+v", f))
		fmt.Fprintln(rw, "ok")
	})
	mux.HandleFunc("POST /clusters/{name}/echo/{action}", func(rw http.ResponseWriter, r *http.Request) {
		var wl *workloads
		for _, x := range wls {
			if x.m.state.Name == r.PathValue("name") {
				wl = x
			}
		}
		if wl == nil {
			http.Error(rw, fmt.Sprintf("no cluster %q in this federation", r.PathValue("name")), http.StatusNotFound)
			return
		}
		var err error
		switch r.PathValue("action") {
		case "kill":
			err = wl.setEcho(r.Context(), false)
		case "start":
			err = wl.setEcho(r.Context(), true)
		default:
			http.Error(rw, "unknown action (kill, start)", http.StatusBadRequest)
			return
		}
		if err != nil {
			http.Error(rw, err.Error(), http.StatusInternalServerError)
			return
		}
		log.Info("drill action", "cluster", r.PathValue("name"), "echo", r.PathValue("action"))
		fmt.Fprintln(rw, "ok")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("control socket", "err", err)
		}
	}()
	return srv, nil
}

// IssuerTTL restarts a cluster's issuer with another SVID lifetime; "" goes
// back to the default.
func IssuerTTL(ctx context.Context, dir, cluster, ttl string) error {
	return post(ctx, dir, "/clusters/"+cluster+"/component/issuer-ttl?ttl="+url.QueryEscape(ttl), nil)
}

// EchoControl kills or starts every echo pod of a cluster ("kill", "start").
func EchoControl(ctx context.Context, dir, cluster, action string) error {
	return post(ctx, dir, "/clusters/"+cluster+"/echo/"+action, nil)
}

// Control sends a drill action to the supervisor of dir: "kill" or "start"
// a cluster's API server, "kill-controller" or "start-controller" its
// federation controller, "kill-gateway-0" or "start-gateway-0" its first
// gateway replica.
func Control(ctx context.Context, dir, cluster, action string) error {
	return post(ctx, dir, "/clusters/"+cluster+"/component/"+action, nil)
}

// SetWAN sets the faults on the WAN link between two clusters, both ways.
func SetWAN(ctx context.Context, dir, a, b string, f faultnet.Faults) error {
	body, err := json.Marshal(f)
	if err != nil {
		return err
	}
	return post(ctx, dir, "/wan/"+a+"/"+b, body)
}

func post(ctx context.Context, dir, path string, body []byte) error {
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", filepath.Join(dir, SocketFile))
	}}, Timeout: 90 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://supervisor"+path, strings.NewReader(string(body)))
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("reach the local federation's supervisor: %w", err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("supervisor: %s", strings.TrimSpace(string(msg)))
	}
	return nil
}

// waitPeers waits until every controller reports every peer reachable.
func waitPeers(ctx context.Context, ms []*member, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, m := range ms {
		for {
			ok, why := peersReachable(ctx, m.state.ControllerAdmin, len(ms)-1)
			if ok {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("controller of %s: peers not all reachable after %s: %s", m.state.Name, timeout, why)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}

func peersReachable(ctx context.Context, admin string, want int) (bool, string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, admin+"/peers", nil)
	if err != nil {
		return false, err.Error()
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false, err.Error()
	}
	defer resp.Body.Close()
	var peers []struct {
		Name      string `json:"name"`
		Reachable bool   `json:"reachable"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&peers); err != nil {
		return false, err.Error()
	}
	up := 0
	for _, p := range peers {
		if p.Reachable {
			up++
		}
	}
	return up == want, fmt.Sprintf("%d of %d reachable", up, want)
}

// exportSample creates namespace demo, Service echo and its ServiceExport.
// The sample workloads behind it arrive with the sidecar; until then the
// service is exported with no endpoints.
func exportSample(ctx context.Context, cfg *rest.Config) error {
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	mcs, err := mcsclient.NewForConfig(cfg)
	if err != nil {
		return err
	}
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 8080, AppProtocol: new("http")}}}}
	if _, err := kube.CoreV1().Services("demo").Create(ctx, svc, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	se := &mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo"}}
	if _, err := mcs.MulticlusterV1beta1().ServiceExports("demo").Create(ctx, se, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

// waitSidecars waits until every sidecar answers /ready on its admin address.
func waitSidecars(ctx context.Context, wls []*workloads, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, w := range wls {
		for _, p := range append(append([]*pod{}, w.echo...), w.client) {
			url := "http://" + net.JoinHostPort(p.addr, strconv.Itoa(adminPort)) + "/ready"
			for {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				resp, err := http.DefaultClient.Do(req)
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode == http.StatusOK {
						break
					}
				}
				if p.sidecar.Exited() {
					return fmt.Errorf("sidecar of %s/%s exited: %s", w.m.state.Name, p.name, p.sidecar.Tail())
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("sidecar of %s/%s not ready after %s: %s", w.m.state.Name, p.name, timeout, p.sidecar.Tail())
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(50 * time.Millisecond):
				}
			}
		}
	}
	return nil
}
