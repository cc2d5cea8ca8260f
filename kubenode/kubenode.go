// Package kubenode brings up a real single-node Kubernetes cluster on this
// machine without Docker, as root: a network namespace that is the node, and
// in it etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
// containerd (CRI, runc, a bridge CNI), the kubelet, kube-proxy (iptables)
// and CoreDNS. It exists because fedmesh must be proven the way users run
// it, on kubelets with kube-proxy and cluster DNS, and this machine has no
// Docker for kind: the federation of real local clusters (issue 17) is built
// from these nodes.
//
// Every binary comes from the Go module proxy at a pinned version (`make
// deps` builds the Kubernetes components and CoreDNS into bin/) or from
// Debian's packages (etcd, containerd, runc, the CNI plugins). Nothing is
// pulled from a registry: images are OCI tarballs made from static binaries
// (package internal/ociimage) and imported into the node's containerd; the
// sandbox image is the project's own fedmesh-pause. Every address is in
// 198.18.0.0/15 (see netns.go), IPv6 is off in the node, and the host's
// kernel settings, iptables and mounts are left alone. Stop leaves no
// process, mount, cgroup, network namespace or containerd state behind, and
// says so if it cannot.
package kubenode

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/internal/ociimage"
)

const (
	// KubeVersion is the version of every Kubernetes component `make deps`
	// builds.
	KubeVersion = controlplane.KubeVersion
	// CoreDNSVersion is the CoreDNS module version `make deps` builds.
	CoreDNSVersion = "v1.15.0"
	// PauseImage is the sandbox image, made from fedmesh-pause.
	PauseImage = "fedmesh.local/pause:1"
	// CoreDNSImage is the cluster DNS image, made from bin/coredns-<version>.
	CoreDNSImage = "fedmesh.local/coredns:" + CoreDNSVersion
)

// Options configures Start. The zero value starts a node named "node" in a
// new temporary directory with the binaries of `make deps` and `make build`.
type Options struct {
	Name string // node (and cluster) name; default "node"
	// Dir is the node's state directory; default a new temporary one.
	// Stop removes it either way.
	Dir string
	// BinDir holds kube-apiserver-<KubeVersion>, kubelet-<KubeVersion>, ...
	// and coredns-<CoreDNSVersion>. Default: the directory of the
	// kube-apiserver controlplane.FindKubeAPIServer finds.
	BinDir string
	// Pause is the fedmesh-pause binary the sandbox image is made from;
	// default BinDir/fedmesh-pause.
	Pause string
	// Images are OCI image tarballs imported before the kubelet starts.
	Images []string
	// Logger receives progress while the node starts; default discards.
	Logger *slog.Logger
	// ReadyTimeout bounds the wait for the node and CoreDNS; default 3m.
	ReadyTimeout time.Duration
}

// Node is a running single-node cluster.
type Node struct {
	Name string
	Dir  string
	// HostIP is the host's end of the link to the node; NodeIP is the node's
	// address (the API server listens on NodeIP:6443).
	HostIP, NodeIP string
	// PodCIDR, ServiceCIDR and DNSIP are the node's networks and the
	// ClusterIP of kube-dns.
	PodCIDR, ServiceCIDR, DNSIP string
	// NetNS is the path of the node's network namespace.
	NetNS string
	// Kubeconfig is an admin kubeconfig (written in Dir); Config the same
	// as a rest.Config.
	Kubeconfig string
	Config     *rest.Config
	// Timings are how long each start step took, in order.
	Timings []Timing

	opts      Options
	log       *slog.Logger
	bins      Binaries
	addrs     addrs
	paths     paths
	pki       *pki
	cgroups   *cgroupTree
	etcdDir   string
	cniBinDir string

	mu           sync.Mutex
	procs        []*process
	madeNetnsDir bool // /run/netns was not a mount point before
	madeLogsDir  bool // /var/log/containers did not exist before
	stopOnce     sync.Once
	stopErr      error
}

// Timing is one start step and how long it took.
type Timing struct {
	Step string
	Took time.Duration
}

type paths struct {
	pkiDir, kubeletRoot, podLogsDir, volumePluginDir, resolvConf string
	containerdRoot, containerdState, containerdSock              string
	cniConfDir, cniIPAMDir                                       string
	logDir                                                       string
	kubeletServing                                               *pair
}

// Start brings the node up and returns when the node is Ready, CoreDNS
// answers and the default service account exists. On failure everything
// already started is stopped and removed. The node's daemons die with the
// OS thread that started them (Pdeathsig), so call Start from an ordinary
// goroutine, never from one locked to a thread that will exit.
func Start(ctx context.Context, opts Options) (*Node, error) {
	if opts.Name == "" {
		opts.Name = "node"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 3 * time.Minute
	}
	if err := validName(opts.Name); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	bins, err := FindBinaries(opts.BinDir, opts.Pause)
	if err != nil {
		return nil, err
	}
	n := &Node{Name: opts.Name, opts: opts, log: opts.Logger.With("node", opts.Name), bins: bins, cniBinDir: bins.CNIDir}
	if err := n.start(ctx); err != nil {
		if serr := n.Stop(); serr != nil {
			err = errors.Join(err, fmt.Errorf("clean up after a failed start: %w", serr))
		}
		return nil, err
	}
	return n, nil
}

// ErrNotRoot is returned by Start when not run as root.
var ErrNotRoot = errors.New("a kubernetes node needs root (network namespaces, cgroups, mounts, containerd)")

func validName(name string) error {
	if len(name) > 20 || strings.Trim(name, "abcdefghijklmnopqrstuvwxyz0123456789-") != "" || strings.HasPrefix(name, "-") {
		return fmt.Errorf("node name %q: want 1-20 lowercase letters, digits or '-'", name)
	}
	return nil
}

func (n *Node) step(start time.Time, name string) {
	took := time.Since(start)
	n.Timings = append(n.Timings, Timing{Step: name, Took: took})
	n.log.Info("node start: "+name, "took", took.Round(time.Millisecond))
}

func (n *Node) start(ctx context.Context) error {
	t0 := time.Now()
	unlock, err := lockSlots()
	if err != nil {
		return err
	}
	if err := cleanStale(n.log); err != nil {
		n.log.Warn("remains of an earlier node could not all be removed", "err", err)
	}
	slot, err := freeSlot()
	if err != nil {
		unlock()
		return err
	}
	n.addrs = slotAddrs(slot)
	if err := n.writeRecord(); err != nil {
		unlock()
		return fmt.Errorf("record the node: %w", err)
	}
	a := n.addrs
	n.HostIP, n.NodeIP, n.PodCIDR, n.ServiceCIDR, n.DNSIP, n.NetNS = a.hostIP, a.nodeIP, a.podCIDR, a.serviceCIDR, a.dnsIP, a.netnsPath
	if st, err := os.Stat("/run/netns"); err != nil || !st.IsDir() || !isMountPoint("/run/netns") {
		n.madeNetnsDir = true
	}
	if err := createNetns(a); err != nil {
		unlock()
		return fmt.Errorf("create the node's network namespace: %w", err)
	}
	unlock()
	n.step(t0, fmt.Sprintf("network namespace %s: node %s, pods %s, services %s", a.netns, a.nodeIP, a.podCIDR, a.serviceCIDR))

	t := time.Now()
	if err := n.layout(); err != nil {
		return err
	}
	if n.cgroups, err = newCgroupTree(n.addrs.slot, n.Name); err != nil {
		return err
	}
	if err := n.cgroups.create(); err != nil {
		return err
	}
	if err := n.writeRecord(); err != nil {
		return fmt.Errorf("record the node: %w", err)
	}
	if err := n.writeConfigs(); err != nil {
		return err
	}
	n.step(t, "certificates, configuration and cgroup "+n.cgroups.root)

	// The control plane and containerd (with its images) come up side by side.
	t = time.Now()
	var wg sync.WaitGroup
	var cpErr, crErr error
	wg.Go(func() { cpErr = n.startControlPlane(ctx) })
	wg.Go(func() { crErr = n.startContainerd(ctx) })
	wg.Wait()
	if err := errors.Join(cpErr, crErr); err != nil {
		return err
	}
	n.step(t, "etcd, kube-apiserver, kube-controller-manager, kube-scheduler; containerd with images imported")

	t = time.Now()
	if err := n.startKubelet(); err != nil {
		return err
	}
	if err := n.startProxy(); err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(n.Config)
	if err != nil {
		return err
	}
	if err := n.installCoreDNS(ctx, cs); err != nil {
		return err
	}
	if err := n.waitNodeReady(ctx, cs); err != nil {
		return err
	}
	n.step(t, "kubelet and kube-proxy started, node Ready")

	t = time.Now()
	if err := n.waitSystemReady(ctx, cs); err != nil {
		return err
	}
	n.step(t, "CoreDNS available, default service account made")
	n.log.Info("node ready", "took", time.Since(t0).Round(time.Millisecond), "apiserver", n.Config.Host, "kubeconfig", n.Kubeconfig)
	return nil
}

// layout makes the node's directories. The kubelet's root directory is a
// shared bind mount of itself, so mounts the kubelet makes in its own mount
// namespace (pod volumes) appear in the host's, where containerd runs.
func (n *Node) layout() error {
	var err error
	if n.opts.Dir != "" {
		n.Dir = n.opts.Dir
		if err := os.MkdirAll(n.Dir, 0o700); err != nil {
			return err
		}
	} else if n.Dir, err = os.MkdirTemp("", "fedmesh-node-"+n.Name+"-"); err != nil {
		return err
	}
	// etcd on tmpfs: its fsyncs cost nothing there.
	if n.etcdDir, err = os.MkdirTemp(shmOrTemp(), "fedmesh-node-etcd-"); err != nil {
		return err
	}
	d := n.Dir
	n.paths = paths{
		pkiDir:          filepath.Join(d, "pki"),
		kubeletRoot:     filepath.Join(d, "kubelet"),
		podLogsDir:      filepath.Join(d, "pod-logs"),
		volumePluginDir: filepath.Join(d, "volume-plugins"),
		resolvConf:      filepath.Join(d, "resolv.conf"),
		containerdRoot:  filepath.Join(d, "containerd", "root"),
		containerdState: filepath.Join(d, "containerd", "state"),
		containerdSock:  filepath.Join(d, "containerd", "containerd.sock"),
		cniConfDir:      filepath.Join(d, "cni", "net.d"),
		cniIPAMDir:      filepath.Join(d, "cni", "ipam"),
		logDir:          filepath.Join(d, "logs"),
	}
	p := n.paths
	for _, dir := range []string{p.pkiDir, p.kubeletRoot, p.podLogsDir, p.volumePluginDir, p.containerdRoot, p.containerdState, p.cniConfDir, p.cniIPAMDir, p.logDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	if err := run("mount", "--bind", p.kubeletRoot, p.kubeletRoot); err != nil {
		return err
	}
	if err := run("mount", "--make-rshared", p.kubeletRoot); err != nil {
		return err
	}
	if _, err := os.Stat("/var/log/containers"); os.IsNotExist(err) {
		n.madeLogsDir = true
	}
	return nil
}

func shmOrTemp() string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		return "/dev/shm"
	}
	return os.TempDir()
}

func (n *Node) writeConfigs() error {
	var err error
	if n.pki, err = newPKI(n.paths.pkiDir); err != nil {
		return err
	}
	a := n.addrs
	server := "https://" + net.JoinHostPort(a.nodeIP, "6443")
	if _, err := n.pki.issue("apiserver", "kube-apiserver", nil,
		[]net.IP{net.ParseIP(a.nodeIP), net.ParseIP(a.apiServiceIP), net.ParseIP("127.0.0.1")},
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}, true); err != nil {
		return err
	}
	if _, err := n.pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil, false); err != nil {
		return err
	}
	if n.paths.kubeletServing, err = n.pki.issue("kubelet-serving", "system:node:"+n.Name, []string{"system:nodes"},
		[]net.IP{net.ParseIP(a.nodeIP)}, []string{n.Name}, true); err != nil {
		return err
	}
	if _, _, err := n.pki.serviceAccountKey(); err != nil {
		return err
	}
	if n.Kubeconfig, n.Config, err = n.pki.kubeconfig("admin", server, "fedmesh-admin", []string{"system:masters"}); err != nil {
		return err
	}
	for _, c := range []struct{ name, cn, group string }{
		{"kubelet", "system:node:" + n.Name, "system:nodes"},
		{"controller-manager", "system:kube-controller-manager", ""},
		{"scheduler", "system:kube-scheduler", ""},
		{"proxy", "system:kube-proxy", ""},
	} {
		var groups []string
		if c.group != "" {
			groups = []string{c.group}
		}
		if _, _, err := n.pki.kubeconfig(c.name, server, c.cn, groups); err != nil {
			return err
		}
	}
	cni, err := n.cniConfig()
	if err != nil {
		return err
	}
	files := map[string]string{
		filepath.Join(n.paths.cniConfDir, "10-fedmesh-node.conflist"): string(cni),
		filepath.Join(n.Dir, "containerd", "config.toml"):             n.containerdConfig(),
		filepath.Join(n.Dir, "kubelet-config.yaml"):                   n.kubeletConfig(),
		// No nameserver: pods with dnsPolicy Default (CoreDNS) get none,
		// so nothing ever asks a resolver outside the node.
		n.paths.resolvConf: "# fedmesh node: no upstream resolver\n",
	}
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// startInNode starts a daemon in the node's network namespace and moves it
// into the node's cgroup before it can fork.
func (n *Node) startInNode(name string, argv ...string) (*process, error) {
	full := append([]string{n.bins.Nsenter, "--net=" + n.NetNS, "--"}, argv...)
	return n.track(name, full)
}

func (n *Node) track(name string, argv []string) (*process, error) {
	p, err := startProcess(name, filepath.Join(n.paths.logDir, name+".log"), argv...)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	n.procs = append(n.procs, p)
	n.mu.Unlock()
	if err := n.cgroups.join(p.pid()); err != nil {
		return nil, err
	}
	return p, nil
}

func (n *Node) startControlPlane(ctx context.Context) error {
	a, pk := n.addrs, n.paths.pkiDir
	etcd, err := n.startInNode("etcd", n.bins.Etcd,
		"--name=node", "--data-dir="+filepath.Join(n.etcdDir, "data"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=node=http://127.0.0.1:2380",
		"--quota-backend-bytes=2147483648", "--snapshot-count=10000", "--log-level=warn")
	if err != nil {
		return err
	}
	if err := waitFor(ctx, 30*time.Second, etcd, func() error {
		return inNetns(n.NetNS, func() error {
			c, err := net.DialTimeout("tcp", "127.0.0.1:2379", time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
	}); err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	apiserver, err := n.startInNode("kube-apiserver", n.bins.APIServer,
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=0.0.0.0", "--secure-port=6443", "--advertise-address="+a.nodeIP,
		"--tls-cert-file="+filepath.Join(pk, "apiserver.crt"), "--tls-private-key-file="+filepath.Join(pk, "apiserver.key"),
		"--client-ca-file="+n.pki.caPath,
		"--kubelet-client-certificate="+filepath.Join(pk, "apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+filepath.Join(pk, "apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+n.pki.caPath,
		"--kubelet-preferred-address-types=InternalIP",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+filepath.Join(pk, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(pk, "sa.key"),
		"--api-audiences=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range="+a.serviceCIDR,
		"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true", "--enable-priority-and-fairness=false", "--profiling=false", "--v=0")
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(n.Config)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, 90*time.Second, apiserver, func() error {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(rctx)
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(body)) != "ok" {
			return fmt.Errorf("readyz: %s", body)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}
	if _, err := n.startInNode("kube-controller-manager", n.bins.ControllerManager,
		"--kubeconfig="+filepath.Join(pk, "controller-manager.kubeconfig"),
		"--authentication-kubeconfig="+filepath.Join(pk, "controller-manager.kubeconfig"),
		"--authorization-kubeconfig="+filepath.Join(pk, "controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1", "--leader-elect=false", "--cluster-name="+n.Name,
		"--service-account-private-key-file="+filepath.Join(pk, "sa.key"),
		"--root-ca-file="+n.pki.caPath, "--use-service-account-credentials=true",
		"--allocate-node-cidrs=false", "--controllers=*,-nodeipam", "--v=0"); err != nil {
		return err
	}
	if _, err := n.startInNode("kube-scheduler", n.bins.Scheduler,
		"--kubeconfig="+filepath.Join(pk, "scheduler.kubeconfig"),
		"--authentication-kubeconfig="+filepath.Join(pk, "scheduler.kubeconfig"),
		"--authorization-kubeconfig="+filepath.Join(pk, "scheduler.kubeconfig"),
		"--bind-address=127.0.0.1", "--leader-elect=false", "--v=0"); err != nil {
		return err
	}
	return nil
}

func (n *Node) startContainerd(ctx context.Context) error {
	p, err := n.startInNode("containerd", n.bins.Containerd, "--config", filepath.Join(n.Dir, "containerd", "config.toml"))
	if err != nil {
		return err
	}
	if err := waitFor(ctx, 30*time.Second, p, func() error {
		return exec.CommandContext(ctx, n.bins.Ctr, "--address", n.paths.containerdSock, "version").Run()
	}); err != nil {
		return fmt.Errorf("containerd: %w", err)
	}
	// The node's own images: the sandbox and the cluster DNS.
	sys := filepath.Join(n.Dir, "system-images.tar")
	if err := ociimage.WriteFile(sys,
		ociimage.Image{Name: PauseImage, Entrypoint: []string{"/pause"}, User: "65535:65535",
			Files: []ociimage.File{{Path: "pause", Source: n.bins.Pause}}},
		ociimage.Image{Name: CoreDNSImage, Entrypoint: []string{"/coredns"},
			Files: []ociimage.File{{Path: "coredns", Source: n.bins.CoreDNS}}},
	); err != nil {
		return fmt.Errorf("write system images: %w", err)
	}
	for _, img := range append([]string{sys}, n.opts.Images...) {
		if err := n.ImportImage(ctx, img); err != nil {
			return err
		}
	}
	return os.Remove(sys)
}

// ImportImage imports an OCI image tarball into the node's containerd, where
// the kubelet finds it (pods use imagePullPolicy Never or IfNotPresent).
func (n *Node) ImportImage(ctx context.Context, tarball string) error {
	out, err := exec.CommandContext(ctx, n.bins.Ctr, "--address", n.paths.containerdSock, "-n", "k8s.io",
		"images", "import", "--no-unpack=false", tarball).CombinedOutput()
	if err != nil {
		return fmt.Errorf("import image %s: %w: %s", tarball, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (n *Node) startKubelet() error {
	script, err := n.kubeletLauncher()
	if err != nil {
		return err
	}
	pk := n.paths.pkiDir
	_, err = n.track("kubelet", []string{n.bins.Unshare, "--mount", "--propagation", "unchanged", "--",
		"sh", "-c", script, "kubelet-launcher", n.NetNS, n.bins.Kubelet,
		"--config=" + filepath.Join(n.Dir, "kubelet-config.yaml"),
		"--kubeconfig=" + filepath.Join(pk, "kubelet.kubeconfig"),
		"--root-dir=" + n.paths.kubeletRoot,
		"--cert-dir=" + filepath.Join(n.paths.kubeletRoot, "pki"),
		"--hostname-override=" + n.Name,
		"--node-ip=" + n.NodeIP,
		"--v=1"})
	return err
}

func (n *Node) startProxy() error {
	_, err := n.startInNode("kube-proxy", n.bins.Proxy,
		"--kubeconfig="+filepath.Join(n.paths.pkiDir, "proxy.kubeconfig"),
		"--proxy-mode=iptables", "--hostname-override="+n.Name,
		"--cluster-cidr="+n.PodCIDR, "--nodeport-addresses="+n.addrs.linkCIDR,
		// Zero leaves the host's conntrack settings alone.
		"--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
		"--conntrack-udp-timeout=0", "--conntrack-udp-timeout-stream=0",
		"--metrics-bind-address=127.0.0.1:10249", "--healthz-bind-address=127.0.0.1:10256", "--v=0")
	return err
}

// waitFor polls check every 100 ms until it succeeds, p exits, ctx ends or
// timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, p *process, check func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if p != nil && p.exited() {
			return fmt.Errorf("exited: %s", p.tail())
		}
		if time.Now().After(deadline) {
			msg := fmt.Sprintf("not ready after %s (last: %v)", timeout, err)
			if p != nil {
				msg += ": " + p.tail()
			}
			return errors.New(msg)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (n *Node) proc(name string) *process {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, p := range n.procs {
		if p.name == name {
			return p
		}
	}
	return nil
}

func (n *Node) waitNodeReady(ctx context.Context, cs kubernetes.Interface) error {
	return waitFor(ctx, n.opts.ReadyTimeout, n.proc("kubelet"), func() error {
		node, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady {
				if c.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("node %s not Ready: %s: %s", n.Name, c.Reason, c.Message)
			}
		}
		return fmt.Errorf("node %s has no Ready condition yet", n.Name)
	})
}

func (n *Node) waitSystemReady(ctx context.Context, cs kubernetes.Interface) error {
	return waitFor(ctx, n.opts.ReadyTimeout, n.proc("kubelet"), func() error {
		if _, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return fmt.Errorf("default service account: %w", err)
		}
		d, err := cs.AppsV1().Deployments("kube-system").Get(ctx, "coredns", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if d.Status.AvailableReplicas < 1 {
			pods, _ := cs.CoreV1().Pods("kube-system").List(ctx, metav1.ListOptions{LabelSelector: "k8s-app=kube-dns"})
			var states []string
			for _, p := range pods.Items {
				states = append(states, p.Name+": "+podState(&p))
			}
			return fmt.Errorf("coredns not available: %s", strings.Join(states, "; "))
		}
		return nil
	})
}

// podState is a short human account of a pod's phase and waiting reasons.
func podState(p *corev1.Pod) string {
	s := string(p.Status.Phase)
	for _, c := range p.Status.ContainerStatuses {
		if w := c.State.Waiting; w != nil {
			s += fmt.Sprintf(" (%s: %s %s)", c.Name, w.Reason, w.Message)
		}
	}
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue && c.Message != "" {
			s += fmt.Sprintf(" [%s: %s]", c.Type, c.Message)
		}
	}
	return s
}

// Client returns a clientset for the node's API server.
func (n *Node) Client() (kubernetes.Interface, error) { return kubernetes.NewForConfig(n.Config) }

// InNode runs fn on an OS thread in the node's network namespace: sockets
// fn opens directly (net.Dial on the calling goroutine) belong to the node.
// Anything fn hands to other goroutines (an http.Client's dials, a
// resolver's parallel queries) does not.
func (n *Node) InNode(fn func() error) error { return inNetns(n.NetNS, fn) }

// Process is one process of the node and its resident memory.
type Process struct {
	PID  int
	Name string // the command's name (comm)
	RSS  int64  // bytes
}

// Processes lists every process of the node (daemons, shims, containers)
// with its resident memory.
func (n *Node) Processes() []Process {
	var out []Process
	for _, pid := range n.cgroups.pids() {
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil {
			continue
		}
		out = append(out, Process{PID: pid, Name: strings.TrimSpace(string(comm)), RSS: rss(pid)})
	}
	return out
}

func rss(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// Stop ends every process of the node and removes everything Start made:
// containers and their shims (by the node's cgroups), mounts under the
// node's directories, the network namespace, the cgroups, containerd's
// shim sockets, the kubelet's log links and the directories. It returns an
// error naming whatever it could not remove. It is safe to call more than
// once.
func (n *Node) Stop() error {
	n.stopOnce.Do(func() {
		n.stopErr = n.stop()
		if n.stopErr == nil {
			// Kept otherwise, so the next Start tries again once this program is gone.
			n.removeRecord()
		}
	})
	return n.stopErr
}

func (n *Node) stop() error {
	var errs []error
	n.mu.Lock()
	procs := slices.Clone(n.procs)
	n.mu.Unlock()
	// The node's daemons, gently and all at once: none of them needs
	// another to shut down, since everything they made is removed below.
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Go(func() { p.stop(3 * time.Second) })
	}
	wg.Wait()
	// Then everything left in its cgroups: containers and their shims.
	if n.cgroups != nil {
		if err := n.cgroups.killAll(15 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	n.removeShimSockets()
	if n.Dir != "" {
		errs = append(errs, unmountUnder(n.Dir))
	}
	if n.etcdDir != "" {
		errs = append(errs, unmountUnder(n.etcdDir))
	}
	if n.addrs.netns != "" {
		deleteNetns(n.addrs)
		if n.madeNetnsDir {
			// ip made /run/netns a mount point; undo it when no namespace is left.
			if ents, err := os.ReadDir("/run/netns"); err == nil && len(ents) == 0 {
				if err := syscallUnmount("/run/netns"); err != nil {
					n.log.Warn("unmount /run/netns", "err", err)
				}
			}
		}
	}
	if n.cgroups != nil {
		errs = append(errs, n.cgroups.remove(10*time.Second))
	}
	if n.Dir != "" {
		n.removeLogLinks()
	}
	if n.etcdDir != "" {
		errs = append(errs, os.RemoveAll(n.etcdDir))
	}
	if n.Dir != "" {
		errs = append(errs, os.RemoveAll(n.Dir))
	}
	if left := n.Leftovers(); len(left) > 0 {
		errs = append(errs, fmt.Errorf("node %s left behind: %s", n.Name, strings.Join(left, "; ")))
	}
	return errors.Join(errs...)
}

// removeShimSockets removes the sockets containerd's runc shims listen on
// (under /run/containerd/s, whatever containerd's state directory is); a
// killed shim leaves its socket. Each task's bundle names its shim's address.
func (n *Node) removeShimSockets() {
	if n.paths.containerdState == "" {
		return
	}
	addrs, _ := filepath.Glob(filepath.Join(n.paths.containerdState, "io.containerd.runtime.v2.task", "*", "*", "address"))
	for _, f := range addrs {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sock := strings.TrimPrefix(strings.TrimSpace(string(b)), "unix://")
		if strings.HasPrefix(sock, "/run/containerd/s/") {
			os.Remove(sock)
		}
	}
}

// removeLogLinks removes the kubelet's links in /var/log/containers (a path
// the kubelet does not let one change) into this node's pod logs, and the
// directory itself if the node made it and it is empty.
func (n *Node) removeLogLinks() {
	ents, _ := os.ReadDir("/var/log/containers")
	for _, e := range ents {
		p := filepath.Join("/var/log/containers", e.Name())
		if target, err := os.Readlink(p); err == nil && strings.HasPrefix(target, n.Dir+"/") {
			os.Remove(p)
		}
	}
	if n.madeLogsDir {
		os.Remove("/var/log/containers") // only succeeds when empty
	}
}

// Leftovers names everything of the node that still exists: processes in
// its cgroups, the cgroups, mounts under its directories, its network
// namespace and host interface, log links and directories. Empty after a
// clean Stop.
func (n *Node) Leftovers() []string {
	var left []string
	if n.cgroups != nil {
		for _, pid := range n.cgroups.pids() {
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			left = append(left, fmt.Sprintf("process %d (%s)", pid, strings.TrimSpace(string(comm))))
		}
		left = append(left, n.cgroups.leftovers()...)
	}
	for _, d := range []string{n.Dir, n.etcdDir} {
		if d == "" {
			continue
		}
		for _, m := range mountsUnder(d) {
			left = append(left, "mount "+m)
		}
		if _, err := os.Stat(d); err == nil {
			left = append(left, "directory "+d)
		}
	}
	if n.addrs.netns != "" {
		if _, err := os.Stat(n.addrs.netnsPath); err == nil {
			left = append(left, "network namespace "+n.addrs.netns)
		}
		if _, err := net.InterfaceByName(n.addrs.hostVeth); err == nil {
			left = append(left, "interface "+n.addrs.hostVeth)
		}
	}
	if n.Dir != "" {
		ents, _ := os.ReadDir("/var/log/containers")
		for _, e := range ents {
			p := filepath.Join("/var/log/containers", e.Name())
			if target, err := os.Readlink(p); err == nil && strings.HasPrefix(target, n.Dir+"/") {
				left = append(left, "log link "+p)
			}
		}
	}
	return left
}
