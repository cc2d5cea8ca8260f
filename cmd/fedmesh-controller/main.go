// Command fedmesh-controller is the per-cluster federation controller: it
// implements the Multi-Cluster Services API for its cluster, reading every
// peer listed by flag or by labelled Secret, and compiles its cluster's
// traffic policy (Gateway API routes, fedmesh policies) for the sidecars.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/fedmesh/fedmesh/federation"
)

type peerFlags []federation.Peer

func (p *peerFlags) String() string { return fmt.Sprint(len(*p), " peers") }

func (p *peerFlags) Set(v string) error {
	name, path, ok := strings.Cut(v, "=")
	if !ok || name == "" || path == "" {
		return fmt.Errorf("want NAME=KUBECONFIG, got %q", v)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return fmt.Errorf("peer %s: load kubeconfig %s: %w", name, path, err)
	}
	*p = append(*p, federation.Peer{Name: name, Config: cfg})
	return nil
}

type config struct {
	kubeconfig, context, metricsAddr, logLevel string
	discoveryAddr, spiffeSocket                string
	qps                                        float64
	burst                                      int
	opts                                       federation.Options
	peers                                      peerFlags
}

func main() {
	var c config
	fs := flag.NewFlagSet("fedmesh-controller", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `fedmesh-controller implements the Multi-Cluster Services API for one cluster.

It reads ServiceExports, Services and EndpointSlices in its cluster and in every
peer, and writes in its own cluster: export conditions, ServiceImports, derived
Services and mirrored EndpointSlices. Peers come from --peer-kubeconfig flags
and from Secrets in --namespace labelled %s=true (key "kubeconfig").
It also validates its own cluster's HTTPRoutes and GRPCRoutes attached to
Services (GAMMA) and fedmesh's AuthorizationPolicy, RateLimitPolicy and
FailoverPolicy, writes their status, and serves the compiled policy with each
service's endpoints on the discovery API (--discovery-addr).

Example:
  fedmesh-controller --kubeconfig east.kubeconfig \
    --peer-kubeconfig west=west.kubeconfig --peer-kubeconfig north=north.kubeconfig

Flags:
`, federation.LabelPeerSecret)
		fs.PrintDefaults()
	}
	fs.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig of the local cluster (default: in-cluster config or $KUBECONFIG)")
	fs.StringVar(&c.context, "context", "", "kubeconfig context")
	fs.StringVar(&c.opts.ClusterID, "cluster-id", "", "this cluster's ID; must match ClusterProperty cluster.clusterset.k8s.io if that exists, and is written there if not")
	fs.Var(&c.peers, "peer-kubeconfig", "peer cluster as NAME=KUBECONFIG (repeatable)")
	fs.StringVar(&c.opts.Namespace, "namespace", "fedmesh-system", "namespace of peer Secrets and the leader lease")
	fs.BoolVar(&c.opts.IgnorePeerSecrets, "ignore-peer-secrets", false, "do not read peers from Secrets")
	fs.IntVar(&c.opts.Workers, "workers", 8, "concurrent reconciles")
	fs.DurationVar(&c.opts.ProbeInterval, "peer-probe-interval", time.Second, "how often each peer API server is probed")
	fs.DurationVar(&c.opts.ProbeTimeout, "peer-probe-timeout", time.Second, "timeout of one probe")
	fs.IntVar(&c.opts.ProbeFailures, "peer-probe-failures", 2, "consecutive failed probes before a peer is marked stale")
	fs.DurationVar(&c.opts.StaleBound, "stale-bound", 5*time.Minute, "how long an unreachable peer's last known endpoints are kept (negative: forever)")
	leaderElect := fs.Bool("leader-elect", true, "elect a leader so that several replicas are safe")
	fs.StringVar(&c.opts.LeaderElection.Identity, "leader-election-identity", "", "this replica's identity (default hostname_pid)")
	fs.DurationVar(&c.opts.LeaderElection.LeaseDuration, "lease-duration", 15*time.Second, "leader lease duration")
	fs.DurationVar(&c.opts.LeaderElection.RenewDeadline, "renew-deadline", 10*time.Second, "leader renew deadline")
	fs.DurationVar(&c.opts.LeaderElection.RetryPeriod, "retry-period", 2*time.Second, "leader election retry period")
	fs.Float64Var(&c.qps, "kube-api-qps", 200, "client-side rate limit of requests to each API server (queries per second)")
	fs.IntVar(&c.burst, "kube-api-burst", 400, "client-side burst of requests to each API server")
	fs.StringVar(&c.discoveryAddr, "discovery-addr", "", "address of the gRPC discovery API for sidecars (empty: off); without --spiffe-socket only a loopback address is allowed")
	fs.StringVar(&c.spiffeSocket, "spiffe-socket", "", "Workload API socket (unix:///path) for the discovery API's SPIFFE mTLS; callers of the own trust domain are admitted (default: $SPIFFE_ENDPOINT_SOCKET when --discovery-addr is not loopback)")
	fs.StringVar(&c.metricsAddr, "metrics-addr", "127.0.0.1:9402", "address of /metrics, /healthz, /readyz (ready while leading), /peers and /version (empty: off)")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.Parse(os.Args[1:])
	c.opts.LeaderElection.Disabled = !*leaderElect

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, c); err != nil {
		fmt.Fprintln(os.Stderr, "fedmesh-controller:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, c config) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	klog.SetSlogLogger(log.With("source", "client-go"))

	cfg, err := loadConfig(c.kubeconfig, c.context)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = float32(c.qps), c.burst
	for _, p := range c.peers {
		p.Config.QPS, p.Config.Burst = float32(c.qps), c.burst
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	c.opts.Config, c.opts.Peers, c.opts.Logger, c.opts.Registry = cfg, c.peers, log, reg
	ctrl, err := federation.New(c.opts)
	if err != nil {
		return err
	}
	if c.metricsAddr != "" {
		ln, err := net.Listen("tcp", c.metricsAddr)
		if err != nil {
			return fmt.Errorf("metrics listener: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		// /readyz: ready while leading, so a Service in front of the
		// discovery API sends sidecars to the replica that serves it.
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
			select {
			case <-ctrl.Leading():
				fmt.Fprintln(w, "leading")
			default:
				http.Error(w, "standby: not leading", http.StatusServiceUnavailable)
			}
		})
		mux.HandleFunc("/peers", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, ctrl.Peers()) })
		mux.HandleFunc("/version", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, federation.Version()) })
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(ln)
		defer srv.Close()
		log.Info("serving metrics", "addr", ln.Addr().String(), "version", federation.Version().String())
	}
	if c.discoveryAddr != "" {
		stop, err := serveDiscovery(ctx, c.discoveryAddr, c.spiffeSocket, ctrl, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	err = ctrl.Run(ctx)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func loadConfig(path, context string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if path != "" {
		rules.ExplicitPath = path
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: context}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	return cfg, nil
}
