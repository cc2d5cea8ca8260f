// Command fedmesh-gateway is the east-west gateway of one cluster: it carries
// proxied TCP connections to and from peer clusters over long-lived QUIC
// connections authenticated with SPIFFE mTLS. See docs/gateway.md.
package main

import (
	"github.com/quic-go/quic-go"

	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/kubecatalog"
	"github.com/fedmesh/fedmesh/identity/mtls"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "fedmesh-gateway:", err)
		os.Exit(1)
	}
}

const usage = `Usage: fedmesh-gateway --cluster NAME (--kubeconfig FILE | --in-cluster | --catalog FILE) [flags]

fedmesh-gateway carries TCP connections between clusters. Local sidecars
connect to its egress (TCP with TLS 1.3, or QUIC streams, on the same port
number; mTLS, ALPN fedmesh-egress/1); it carries
each one as a stream of its long-lived QUIC connection to the target
cluster's gateway (ALPN fedmesh-tunnel/1), whose ingress forwards it to a
ready endpoint of an exported service. Identity comes from the SPIFFE
Workload API only.

What this cluster exports comes from its API server, reached with
--kubeconfig, or with --in-cluster from a pod (its service account's token,
KUBERNETES_SERVICE_HOST/PORT), or from a static --catalog file. With an API
server, each replica also writes its RTT to every peer cluster on the
Service fedmesh-gateway in --namespace (annotation
multicluster.fedmesh.dev/peer-rtt) for the federation controller.

Peers come from --peer flags and from --peers-file, one peer a line in the
--peer syntax ("#" starts a comment); it is read at start only.

Example:
  fedmesh-gateway --cluster east --kubeconfig /etc/fedmesh/kubeconfig \
    --peer west=192.0.2.10:15443,192.0.2.11:15443 --peer north=198.51.100.7:15443

Flags:
`

type peerFlags []gateway.Peer

func (p *peerFlags) String() string { return "" }

// Set parses CLUSTER[@TRUST_DOMAIN]=ADDR[,ADDR...].
func (p *peerFlags) Set(v string) error {
	name, addrs, ok := strings.Cut(v, "=")
	if !ok || name == "" || addrs == "" {
		return fmt.Errorf("want CLUSTER[@TRUST_DOMAIN]=HOST:PORT[,HOST:PORT...], got %q", v)
	}
	cluster, tdName, hasTD := strings.Cut(name, "@")
	if !hasTD {
		tdName = cluster + ".fedmesh.test"
	}
	td, err := spiffeid.TrustDomainFromString(tdName)
	if err != nil {
		return fmt.Errorf("peer %s trust domain: %w", cluster, err)
	}
	peer := gateway.Peer{Cluster: cluster, TrustDomain: td}
	for _, a := range strings.Split(addrs, ",") {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("peer %s address %q: want HOST:PORT", cluster, a)
		}
		peer.Addrs = append(peer.Addrs, a)
	}
	*p = append(*p, peer)
	return nil
}

type options struct {
	cluster, trustDomain, spiffeSocket           string
	tunnelAddr, egressAddr, adminAddr            string
	federate, gatewayPath, kubeconfig, catalog   string
	inCluster                                    bool
	namespace, peersFile                         string
	rttInterval                                  time.Duration
	logLevel, logFormat                          string
	deadAfter, dialTimeout, headerTimeout, eject time.Duration
	resetKeyFile                                 string
	maxStreams                                   int
	peers                                        peerFlags
}

// serviceAccountNamespace is where a pod finds its own namespace.
const serviceAccountNamespace = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

func parse(args []string, out io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("fedmesh-gateway", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() { fmt.Fprint(out, usage); fs.PrintDefaults() }
	fs.StringVar(&o.cluster, "cluster", "", "this cluster's name (required)")
	fs.StringVar(&o.trustDomain, "trust-domain", "", "this cluster's SPIFFE trust domain (default CLUSTER.fedmesh.test)")
	fs.StringVar(&o.spiffeSocket, "spiffe-socket", "", "Workload API address, e.g. unix:///run/spire/agent.sock (default $"+mtls.EndpointSocketEnv+")")
	fs.StringVar(&o.tunnelAddr, "tunnel-addr", ":15443", "UDP address for QUIC tunnels from peer gateways")
	fs.StringVar(&o.egressAddr, "egress-addr", ":15444", "address for local sidecars, served on TCP (TLS 1.3) and UDP (QUIC) with the same port number (\"\" disables egress)")
	fs.StringVar(&o.adminAddr, "admin-addr", "127.0.0.1:15000", "TCP address of the admin endpoint: /state (JSON), /metrics, /healthz (\"\" disables it)")
	fs.Var(&o.peers, "peer", "peer cluster and its gateway replicas: CLUSTER[@TRUST_DOMAIN]=HOST:PORT[,HOST:PORT...] (repeatable)")
	fs.StringVar(&o.federate, "federate", "", "comma-separated trust domains whose gateways may open tunnels here (default: the peers' trust domains)")
	fs.StringVar(&o.gatewayPath, "gateway-path", gateway.DefaultGatewayPath, "SPIFFE ID path of gateways in every trust domain")
	fs.Var(&peersFile{&o.peers, &o.peersFile}, "peers-file", "`FILE` with one peer a line, in the --peer syntax; blank lines and \"#\" comments are ignored (read at start only)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of this cluster: exports and endpoints come from its ServiceExports and EndpointSlices")
	fs.BoolVar(&o.inCluster, "in-cluster", false, "like --kubeconfig, with the pod's service account (in a Kubernetes pod)")
	fs.StringVar(&o.catalog, "catalog", "", "static catalog JSON file instead of --kubeconfig/--in-cluster: {\"services\":[{\"namespace\":\"shop\",\"name\":\"checkout\",\"port\":8080,\"endpoints\":[\"10.0.0.1:9090\"]}]}")
	fs.StringVar(&o.namespace, "namespace", "", "namespace of the Service "+gateway.ServiceName+" that gets this replica's RTTs (default: the pod's namespace, else fedmesh-system)")
	fs.DurationVar(&o.rttInterval, "rtt-publish-interval", gateway.DefaultRTTPublishInterval, "with --kubeconfig or --in-cluster: compare the RTT to each peer cluster this often and write it to annotation "+gateway.AnnotationPeerRTT+" of Service "+gateway.ServiceName+" when it moved by over 20% and 200us, or a cluster came or went (0 disables)")
	fs.DurationVar(&o.deadAfter, "dead-after", time.Second, "declare a silent peer gateway dead after this long")
	fs.StringVar(&o.resetKeyFile, "stateless-reset-key-file", "", "file with this replica's 32-byte QUIC stateless reset key, created if missing; keep it across restarts so a restarted replica resets stale sidecar and peer connections at once (empty: no stateless resets)")
	fs.DurationVar(&o.dialTimeout, "dial-timeout", gateway.DefaultDialTimeout, "timeout of a dial to a local endpoint")
	fs.DurationVar(&o.headerTimeout, "header-timeout", gateway.DefaultHeaderTimeout, "time a new stream has to send its header")
	fs.DurationVar(&o.eject, "eject-for", gateway.DefaultEjectFor, "skip an endpoint whose dial failed for this long")
	fs.IntVar(&o.maxStreams, "max-streams", gateway.DefaultMaxStreams, "open streams per direction before refusing as overloaded")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "text", "text or json")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q (see --help)", fs.Args())
	}
	if o.cluster == "" {
		return nil, errors.New("--cluster is required (see --help)")
	}
	if n := countTrue(o.kubeconfig != "", o.inCluster, o.catalog != ""); n != 1 {
		msg := "give exactly one of --kubeconfig, --in-cluster and --catalog (see --help)"
		if n == 0 && os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
			msg += "; in a pod, --in-cluster uses its service account"
		}
		return nil, errors.New(msg)
	}
	if o.rttInterval < 0 {
		return nil, fmt.Errorf("--rtt-publish-interval %s is negative", o.rttInterval)
	}
	if o.namespace == "" {
		o.namespace = podNamespace(serviceAccountNamespace)
	}
	if o.trustDomain == "" {
		o.trustDomain = o.cluster + ".fedmesh.test"
	}
	return o, nil
}

func countTrue(bs ...bool) int {
	n := 0
	for _, b := range bs {
		if b {
			n++
		}
	}
	return n
}

// peersFile is --peers-file: it reads the file when the flag is parsed and
// adds its peers as if each line had been given as --peer.
type peersFile struct {
	peers *peerFlags
	path  *string
}

func (f *peersFile) String() string {
	if f.path == nil {
		return ""
	}
	return *f.path
}

func (f *peersFile) Set(path string) error {
	if *f.path != "" {
		return errors.New("given twice")
	}
	*f.path = path
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	for i, line := range strings.Split(string(data), "\n") {
		line, _, _ = strings.Cut(line, "#")
		if line = strings.TrimSpace(line); line == "" {
			continue
		}
		if err := f.peers.Set(line); err != nil {
			return fmt.Errorf("%s line %d: %w", path, i+1, err)
		}
	}
	return nil
}

// podNamespace is the namespace in file (a pod's service account
// namespace), or fedmesh-system outside a pod.
func podNamespace(file string) string {
	if data, err := os.ReadFile(file); err == nil {
		if ns := strings.TrimSpace(string(data)); ns != "" {
			return ns
		}
	}
	return "fedmesh-system"
}

// restConfig is the API server configuration of --kubeconfig or
// --in-cluster.
func restConfig(o *options) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if o.inCluster {
		if cfg, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("--in-cluster: %w", err)
		}
	} else if cfg, err = clientcmd.BuildConfigFromFlags("", o.kubeconfig); err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", o.kubeconfig, err)
	}
	return rest.AddUserAgent(cfg, "fedmesh-gateway"), nil
}

func newLogger(level, format string, w io.Writer) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

// run parses args, starts the gateway and serves until ctx ends. It prints
// one line "serving tunnel=ADDR egress=ADDR admin=ADDR" on stdout once the
// sockets are bound.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parse(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	log, err := newLogger(o.logLevel, o.logFormat, stderr)
	if err != nil {
		return err
	}
	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		return fmt.Errorf("--trust-domain: %w", err)
	}
	var federated []spiffeid.TrustDomain
	if o.federate != "" {
		for _, s := range strings.Split(o.federate, ",") {
			f, err := spiffeid.TrustDomainFromString(strings.TrimSpace(s))
			if err != nil {
				return fmt.Errorf("--federate %q: %w", s, err)
			}
			federated = append(federated, f)
		}
	}

	var catalog gateway.Catalog
	var publishRTT *gateway.RTTPublication
	if o.catalog != "" {
		catalog, err = loadCatalog(o.catalog)
		if err != nil {
			return err
		}
	} else {
		cfg, err := restConfig(o)
		if err != nil {
			return err
		}
		kube, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		mcs, err := mcsclient.NewForConfig(cfg)
		if err != nil {
			return fmt.Errorf("multicluster services client: %w", err)
		}
		kc := kubecatalog.New(kube, mcs, 0, log)
		if err := kc.Start(ctx, time.Minute); err != nil {
			return err
		}
		catalog = kc
		if o.rttInterval > 0 {
			publishRTT = &gateway.RTTPublication{Client: kube, Namespace: o.namespace, Interval: o.rttInterval}
		}
	}

	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	src, err := mtls.NewSource(sctx, o.spiffeSocket)
	cancel()
	if err != nil {
		return err
	}
	defer src.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	var resetKey *quic.StatelessResetKey
	if o.resetKeyFile != "" {
		if resetKey, err = gateway.LoadStatelessResetKey(o.resetKeyFile); err != nil {
			return err
		}
	}
	g, err := gateway.New(gateway.Config{
		StatelessResetKey: resetKey,
		Cluster:           o.cluster, TrustDomain: td, Source: src, Federated: federated, GatewayPath: o.gatewayPath,
		Peers: o.peers, Catalog: catalog,
		TunnelAddr: o.tunnelAddr, EgressAddr: o.egressAddr, AdminAddr: o.adminAddr,
		DeadAfter: o.deadAfter, DialTimeout: o.dialTimeout, HeaderTimeout: o.headerTimeout, EjectFor: o.eject,
		MaxStreams: o.maxStreams, PublishRTT: publishRTT, Logger: log, Registry: reg,
	})
	if err != nil {
		return err
	}
	egress, admin := "", ""
	if a := g.EgressAddr(); a != nil {
		egress = a.String()
	}
	if a := g.AdminAddr(); a != nil {
		admin = a.String()
	}
	fmt.Fprintf(stdout, "serving tunnel=%s egress=%s admin=%s\n", g.TunnelAddr(), egress, admin)
	return g.Run(ctx)
}

type catalogFile struct {
	Services []struct {
		Namespace string   `json:"namespace"`
		Name      string   `json:"name"`
		Port      int32    `json:"port"`
		Endpoints []string `json:"endpoints"`
	} `json:"services"`
}

func loadCatalog(path string) (*gateway.StaticCatalog, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read catalog: %w", err)
	}
	var f catalogFile
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("parse catalog %s: %w", path, err)
	}
	cat := &gateway.StaticCatalog{}
	for i, s := range f.Services {
		if s.Namespace == "" || s.Name == "" || s.Port <= 0 || s.Port > 65535 {
			return nil, fmt.Errorf("catalog %s: service %d needs namespace, name and a port in 1..65535", path, i)
		}
		var eps []gateway.Endpoint
		for _, e := range s.Endpoints {
			ap, err := netip.ParseAddrPort(e)
			if err != nil {
				return nil, fmt.Errorf("catalog %s: service %s/%s endpoint: %w", path, s.Namespace, s.Name, err)
			}
			eps = append(eps, gateway.Endpoint{Addr: ap})
		}
		cat.Set(s.Namespace, s.Name, s.Port, eps...)
	}
	return cat, nil
}
