// Package controlplane starts real Kubernetes control planes on one machine:
// one etcd and, per cluster, a kube-apiserver with its own etcd prefix, its
// own service CIDR and fedmesh's CRDs installed. Tests, benchmarks and the
// local federation all run on it, so the behaviour they prove is the behaviour
// of a real API server, not of a fake client.
//
// Nothing is downloaded at run time: kube-apiserver is built from the Go
// module proxy by `make deps` into bin/, and etcd comes from Debian's
// etcd-server package (see docs/architecture.md).
package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/fedmesh/fedmesh/federation/about"
	"github.com/fedmesh/fedmesh/federation/crds"
)

// KubeVersion is the kube-apiserver version `make deps` builds.
const KubeVersion = "v1.36.3"

// SystemNamespace is where fedmesh's own objects (peer secrets, leases) live.
const SystemNamespace = "fedmesh-system"

// Options configures Start. The zero value starts the three clusters east,
// west and north in a temporary directory.
type Options struct {
	Clusters   []string // cluster names; default east, west, north
	ClusterSet string   // clusterset name; default "fedmesh"
	Dir        string   // state directory; default a new temporary one, removed by Stop
	// EtcdDir holds etcd's data. Default: under Dir when Start made Dir,
	// else a new directory on tmpfs (/dev/shm), removed by Stop.
	EtcdDir string
	Host    string // address the API servers and etcd bind; default 127.0.0.1
	// IPv4Only names clusters whose service CIDR is IPv4 only; the others
	// are dual-stack.
	IPv4Only []string
	Logger   *slog.Logger // default discards
	// KubeAPIServer and Etcd are binary paths. Defaults: $FEDMESH_KUBE_APISERVER
	// or bin/kube-apiserver-<KubeVersion> above the working directory; etcd on PATH.
	KubeAPIServer string
	Etcd          string
}

// Federation is a set of running control planes sharing one etcd.
type Federation struct {
	Clusters []*Cluster
	Dir      string

	opts     Options
	ownDir   bool
	etcdDir  string
	ownEtcd  bool
	etcd     *Process
	etcdURL  string
	ca       *CA
	stopOnce sync.Once
}

// Cluster is one member's control plane.
type Cluster struct {
	Name        string
	Index       int
	URL         string // https://host:port
	ServiceCIDR string
	Kubeconfig  string // admin kubeconfig path
	Config      *rest.Config

	fed  *Federation
	dir  string
	port int
	mu   sync.Mutex
	proc *Process
}

// Start brings up etcd and every cluster's API server in parallel, installs
// the CRDs, writes each cluster's ClusterProperties and the fedmesh-system
// namespace, and returns once every API server is ready.
func Start(ctx context.Context, opts Options) (*Federation, error) {
	if len(opts.Clusters) == 0 {
		opts.Clusters = []string{"east", "west", "north"}
	}
	if opts.ClusterSet == "" {
		opts.ClusterSet = "fedmesh"
	}
	if opts.Host == "" {
		opts.Host = "127.0.0.1"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := validateNames(opts.Clusters); err != nil {
		return nil, err
	}
	kas, err := FindKubeAPIServer(opts.KubeAPIServer)
	if err != nil {
		return nil, err
	}
	opts.KubeAPIServer = kas
	if opts.Etcd == "" {
		if opts.Etcd, err = exec.LookPath("etcd"); err != nil {
			return nil, errors.New("etcd not found on PATH: run `make deps` (installs Debian's etcd-server) or set Options.Etcd")
		}
	}
	f := &Federation{opts: opts, Dir: opts.Dir}
	if f.Dir == "" {
		if f.Dir, err = os.MkdirTemp(tmpRoot(), "fedmesh-cp-"); err != nil {
			return nil, err
		}
		f.ownDir = true
	}
	if f.ca, err = NewCA("fedmesh local control plane CA"); err != nil {
		return nil, err
	}
	if err := f.startEtcd(ctx); err != nil {
		f.Stop()
		return nil, err
	}
	for i, name := range opts.Clusters {
		c, err := f.newCluster(i, name)
		if err != nil {
			f.Stop()
			return nil, err
		}
		f.Clusters = append(f.Clusters, c)
	}
	errs := make([]error, len(f.Clusters))
	var wg sync.WaitGroup
	for i, c := range f.Clusters {
		wg.Go(func() {
			if err := c.StartAPIServer(ctx); err != nil {
				errs[i] = err
				return
			}
			errs[i] = c.bootstrap(ctx)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		f.Stop()
		return nil, err
	}
	return f, nil
}

// EtcdDir is where etcd keeps its data.
func (f *Federation) EtcdDir() string { return f.etcdDir }

// Cluster returns the named cluster or nil.
func (f *Federation) Cluster(name string) *Cluster {
	for _, c := range f.Clusters {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// Stop terminates every process and removes the state directory if Start
// created it. It is safe to call more than once.
func (f *Federation) Stop() {
	f.stopOnce.Do(func() {
		for _, c := range f.Clusters {
			c.StopAPIServer()
		}
		if f.etcd != nil {
			f.etcd.Stop()
		}
		if f.ownEtcd {
			os.RemoveAll(f.etcdDir)
		}
		if f.ownDir {
			os.RemoveAll(f.Dir)
		}
	})
}

func validateNames(names []string) error {
	seen := map[string]bool{}
	for _, n := range names {
		if n == "" || len(n) > 40 || strings.Trim(n, "abcdefghijklmnopqrstuvwxyz0123456789-") != "" || strings.HasPrefix(n, "-") {
			return fmt.Errorf("cluster name %q: must be 1-40 lowercase letters, digits or '-'", n)
		}
		if seen[n] {
			return fmt.Errorf("cluster name %q given twice", n)
		}
		seen[n] = true
	}
	if len(names) > 64 {
		return fmt.Errorf("%d clusters: at most 64 are supported", len(names))
	}
	return nil
}

// tmpRoot prefers tmpfs so etcd's fsyncs cost nothing.
func tmpRoot() string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if f, err := os.CreateTemp("/dev/shm", "fedmesh-probe-"); err == nil {
			f.Close()
			os.Remove(f.Name())
			return "/dev/shm"
		}
	}
	return os.TempDir()
}

// FindKubeAPIServer returns the kube-apiserver binary to run: explicit if
// given, else $FEDMESH_KUBE_APISERVER, else bin/kube-apiserver-<KubeVersion>
// next to the running program or in a bin/ directory above the working
// directory.
func FindKubeAPIServer(explicit string) (string, error) {
	candidates := []string{explicit, os.Getenv("FEDMESH_KUBE_APISERVER")}
	if exe, err := os.Executable(); err == nil {
		candidates = append(candidates, filepath.Join(filepath.Dir(exe), "kube-apiserver-"+KubeVersion))
	}
	if wd, err := os.Getwd(); err == nil {
		for dir := wd; ; dir = filepath.Dir(dir) {
			candidates = append(candidates, filepath.Join(dir, "bin", "kube-apiserver-"+KubeVersion))
			if filepath.Dir(dir) == dir {
				break
			}
		}
	}
	for _, c := range candidates {
		if c == "" {
			continue
		}
		if st, err := os.Stat(c); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return c, nil
		}
	}
	return "", fmt.Errorf("kube-apiserver %s not found: run `make deps` (builds it into bin/) or set FEDMESH_KUBE_APISERVER", KubeVersion)
}

func (f *Federation) startEtcd(ctx context.Context) error {
	clientPort, err := FreePort(f.opts.Host)
	if err != nil {
		return err
	}
	peerPort, err := FreePort(f.opts.Host)
	if err != nil {
		return err
	}
	dir := f.opts.EtcdDir
	switch {
	case dir != "":
	case f.ownDir:
		dir = filepath.Join(f.Dir, "etcd")
	default:
		var err error
		if dir, err = os.MkdirTemp(tmpRoot(), "fedmesh-etcd-"); err != nil {
			return err
		}
		f.ownEtcd = true
	}
	f.etcdDir = dir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f.etcdURL = fmt.Sprintf("http://%s", net.JoinHostPort(f.opts.Host, strconv.Itoa(clientPort)))
	peerURL := fmt.Sprintf("http://%s", net.JoinHostPort(f.opts.Host, strconv.Itoa(peerPort)))
	f.etcd, err = StartProcess(f.opts.Etcd, filepath.Join(dir, "etcd.log"),
		"--name=fedmesh",
		"--data-dir="+filepath.Join(dir, "data"),
		"--listen-client-urls="+f.etcdURL,
		"--advertise-client-urls="+f.etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=fedmesh="+peerURL,
		"--quota-backend-bytes=4294967296",
		"--snapshot-count=10000",
		"--log-level=warn",
	)
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	hc := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := hc.Get(f.etcdURL + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if f.etcd.Exited() {
			return fmt.Errorf("etcd exited at start: %s", f.etcd.Tail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("etcd not healthy after 30s: %s", f.etcd.Tail())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (f *Federation) newCluster(i int, name string) (*Cluster, error) {
	dir := filepath.Join(f.Dir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	port, err := FreePort(f.opts.Host)
	if err != nil {
		return nil, err
	}
	c := &Cluster{
		Name:        name,
		Index:       i,
		fed:         f,
		dir:         dir,
		port:        port,
		URL:         "https://" + net.JoinHostPort(f.opts.Host, strconv.Itoa(port)),
		ServiceCIDR: fmt.Sprintf("10.%d.0.0/16,fd00:10:%x::/108", 96+i, 96+i),
		Kubeconfig:  filepath.Join(dir, "kubeconfig"),
	}
	if slices.Contains(f.opts.IPv4Only, name) {
		c.ServiceCIDR = fmt.Sprintf("10.%d.0.0/16", 96+i)
	}
	serving, servingKey, err := f.ca.Issue("kube-apiserver-"+name, nil,
		[]net.IP{net.ParseIP(f.opts.Host), net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")},
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}, true)
	if err != nil {
		return nil, err
	}
	admin, adminKey, err := f.ca.Issue("fedmesh-admin", []string{"system:masters"}, nil, nil, false)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{"ca.crt": f.ca.PEM, "serving.crt": serving, "serving.key": servingKey, "admin.crt": admin, "admin.key": adminKey}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			return nil, err
		}
	}
	if _, _, err := WriteServiceAccountKey(dir); err != nil {
		return nil, err
	}
	c.Config = &rest.Config{
		Host:            c.URL,
		TLSClientConfig: rest.TLSClientConfig{CAData: f.ca.PEM, CertData: admin, KeyData: adminKey},
		QPS:             -1, // local control planes: no client-side throttling
		Timeout:         30 * time.Second,
	}
	kc := KubeconfigFor(map[string]*rest.Config{name: c.Config}, name)
	if err := clientcmd.WriteToFile(*kc, c.Kubeconfig); err != nil {
		return nil, fmt.Errorf("write kubeconfig for %s: %w", name, err)
	}
	return c, nil
}

// KubeconfigFor builds a kubeconfig with one context per cluster, named
// after the cluster, and the given current context.
func KubeconfigFor(cfgs map[string]*rest.Config, current string) *clientcmdapi.Config {
	kc := clientcmdapi.NewConfig()
	names := make([]string, 0, len(cfgs))
	for n := range cfgs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		cfg := cfgs[n]
		kc.Clusters[n] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
		kc.AuthInfos[n] = &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData}
		kc.Contexts[n] = &clientcmdapi.Context{Cluster: n, AuthInfo: n}
	}
	kc.CurrentContext = current
	return kc
}

// StartAPIServer starts (or restarts) the cluster's kube-apiserver on its
// fixed port and waits until /readyz answers.
func (c *Cluster) StartAPIServer(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc != nil && !c.proc.Exited() {
		return nil
	}
	f := c.fed
	args := []string{
		"--etcd-servers=" + f.etcdURL,
		"--etcd-prefix=/fedmesh/" + c.Name,
		"--bind-address=" + f.opts.Host,
		"--advertise-address=" + f.opts.Host,
		"--secure-port=" + strconv.Itoa(c.port),
		"--tls-cert-file=" + filepath.Join(c.dir, "serving.crt"),
		"--tls-private-key-file=" + filepath.Join(c.dir, "serving.key"),
		"--client-ca-file=" + filepath.Join(c.dir, "ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc." + c.Name,
		"--service-account-key-file=" + filepath.Join(c.dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(c.dir, "sa.key"),
		"--service-cluster-ip-range=" + c.ServiceCIDR,
		"--authorization-mode=RBAC",
		"--allow-privileged=true",
		"--disable-admission-plugins=ServiceAccount",
		"--enable-priority-and-fairness=false",
		"--endpoint-reconciler-type=none",
		"--profiling=" + strconv.FormatBool(os.Getenv("FEDMESH_APISERVER_PROFILING") != ""),
		"--v=0",
	}
	p, err := StartProcess(f.opts.KubeAPIServer, filepath.Join(c.dir, "kube-apiserver.log"), args...)
	if err != nil {
		return fmt.Errorf("start kube-apiserver for %s: %w", c.Name, err)
	}
	c.proc = p
	return c.waitReady(ctx, 60*time.Second)
}

// StopAPIServer stops the cluster's kube-apiserver; its data stays in etcd.
func (c *Cluster) StopAPIServer() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc != nil {
		c.proc.Stop()
		c.proc = nil
	}
}

// KillAPIServer kills the cluster's kube-apiserver at once, as a crash or a
// network cut would; its data stays in etcd.
func (c *Cluster) KillAPIServer() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc != nil {
		c.proc.Kill()
		c.proc = nil
	}
}

// PID returns the kube-apiserver's process id, or 0 when it is stopped.
func (c *Cluster) PID() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.proc == nil {
		return 0
	}
	return c.proc.cmd.Process.Pid
}

func (c *Cluster) waitReady(ctx context.Context, timeout time.Duration) error {
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(rctx)
		cancel()
		if err == nil && strings.TrimSpace(string(body)) == "ok" {
			return nil
		}
		if c.proc.Exited() {
			return fmt.Errorf("kube-apiserver for %s exited: %s", c.Name, c.proc.Tail())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver for %s not ready after %s (last error: %v): %s", c.Name, timeout, err, c.proc.Tail())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *Cluster) bootstrap(ctx context.Context) error {
	if err := crds.Install(ctx, c.Config); err != nil {
		return fmt.Errorf("cluster %s: %w", c.Name, err)
	}
	cs, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return err
	}
	_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: SystemNamespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("cluster %s: create namespace %s: %w", c.Name, SystemNamespace, err)
	}
	dyn, err := dynamic.NewForConfig(c.Config)
	if err != nil {
		return err
	}
	if err := about.Set(ctx, dyn, about.ClusterIDProperty, c.Name); err != nil {
		return fmt.Errorf("cluster %s: %w", c.Name, err)
	}
	if err := about.Set(ctx, dyn, about.ClusterSetProperty, c.fed.opts.ClusterSet); err != nil {
		return fmt.Errorf("cluster %s: %w", c.Name, err)
	}
	return nil
}

// FreePort returns a TCP port that was free on host a moment ago.
func FreePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("find a free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Process is a child that dies with its parent (Pdeathsig) and logs to a
// file. The local federation runs its components as Processes too.
type Process struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

// StartProcess starts bin with args, appending its output to logPath.
func StartProcess(bin, logPath string, args ...string) (*Process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	// Memory is plentiful and CPU is not: collect garbage less often.
	cmd.Env = append(os.Environ(), "GOGC=400")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	p := &Process{cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p, nil
}

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM and kills the process if it is still there after 5 s.
func (p *Process) Stop() {
	if p.Exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// Kill ends the process at once.
func (p *Process) Kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// PID is the process id.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Tail returns the last lines of the process's log for error messages.
func (p *Process) Tail() string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	return fmt.Sprintf("log %s:\n%s", p.log, strings.Join(lines, "\n"))
}
