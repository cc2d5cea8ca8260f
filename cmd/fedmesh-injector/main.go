// Command fedmesh-injector is the sidecar-injection admission webhook: the
// API server calls it for every pod created in a namespace labelled
// fedmesh.dev/inject=enabled (or a pod labelled fedmesh.dev/inject=true).
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
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fedmesh/fedmesh/injector"
)

type config struct {
	addr, certFile, keyFile, metricsAddr, logLevel, kubeconfig             string
	sidecarCommand, sidecarArgs, excludePorts, socketSource, failurePolicy string
	events                                                                 bool
	inj                                                                    injector.Config
}

func main() {
	var c config
	fs := flag.NewFlagSet("fedmesh-injector", flag.ExitOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `fedmesh-injector is the mutating admission webhook that adds the fedmesh
sidecar, its init container (fedmesh-init: the traffic redirect, nftables) and the SPIFFE Workload API socket to pods.

It serves /mutate over TLS with the key pair in --tls-cert/--tls-key and
reloads the pair when the files change. Register it with
clusters/base/injector/webhook.yaml.

Flags:
`)
		fs.PrintDefaults()
	}
	fs.StringVar(&c.addr, "addr", ":8443", "webhook listen address")
	fs.StringVar(&c.certFile, "tls-cert", "/etc/fedmesh/tls/tls.crt", "serving certificate (PEM), reloaded on change")
	fs.StringVar(&c.keyFile, "tls-key", "/etc/fedmesh/tls/tls.key", "serving key (PEM), reloaded on change")
	fs.StringVar(&c.metricsAddr, "metrics-addr", ":9403", "address of /metrics and /healthz (empty: off)")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig for writing Events (default: in-cluster config or $KUBECONFIG)")
	fs.BoolVar(&c.events, "events", true, "write an Event when a pod cannot be injected")
	fs.StringVar(&c.inj.SidecarImage, "sidecar-image", "", "sidecar image (default ghcr.io/fedmesh/fedmesh:dev)")
	fs.StringVar(&c.sidecarCommand, "sidecar-command", "", "sidecar command, comma-separated (default /usr/local/bin/fedmesh-sidecar)")
	fs.StringVar(&c.sidecarArgs, "sidecar-args", "", "sidecar arguments, comma-separated (default: --inbound-port=.. --outbound-port=..); the probe server is set up through the sidecar's environment either way")
	fs.StringVar(&c.inj.Cluster, "cluster", "", "this cluster's name, given to every sidecar as $FEDMESH_CLUSTER (its --cluster); empty: the sidecar needs its own --cluster")
	fs.StringVar(&c.inj.Discovery, "discovery", "fedmesh-discovery.fedmesh-system.svc:15012", "the federation controller's discovery API, given to every sidecar as $FEDMESH_DISCOVERY (its --discovery); empty: none")
	fs.StringVar(&c.inj.InitImage, "init-image", "", "image of the init container, which runs "+injector.InitCommand+" (default: the sidecar image, which holds it)")
	inbound := fs.Int("inbound-port", 15006, "sidecar port for redirected inbound traffic")
	outbound := fs.Int("outbound-port", 15001, "sidecar port for redirected outbound traffic")
	probe := fs.Int("probe-port", 15021, "sidecar probe server port, never redirected: the kubelet's httpGet, tcpSocket and grpc probes of redirected ports are rewritten to GETs of it")
	dnsPort := fs.Int("dns-port", 15053, "sidecar DNS server port on localhost, where the app's DNS queries are redirected (with --capture-dns)")
	captureDNS := fs.Bool("capture-dns", true, "redirect the app's DNS (port 53, UDP and TCP) to the sidecar, which answers <svc>.<ns>.svc.clusterset.local from the service directory and forwards other queries to the pod's nameservers; false: clusterset.local needs the cluster's DNS to serve it")
	fs.Int64Var(&c.inj.ProxyUID, "proxy-uid", 1337, "UID the sidecar runs as; its traffic is not redirected")
	fs.StringVar(&c.excludePorts, "exclude-inbound-ports", "", "inbound ports not redirected, comma-separated")
	fs.StringVar(&c.socketSource, "socket-source", "hostPath", "Workload API socket source: hostPath or csi")
	fs.StringVar(&c.inj.SocketDir, "socket-dir", "/run/spire/agent-sockets", "directory of the Workload API socket (node path for hostPath, mount path in the sidecar)")
	fs.StringVar(&c.inj.SocketName, "socket-name", "spire-agent.sock", "Workload API socket file name")
	fs.StringVar(&c.inj.CSIDriver, "csi-driver", "csi.spiffe.io", "CSI driver for --socket-source=csi")
	fs.StringVar(&c.failurePolicy, "failure-policy", "Ignore", "when a pod cannot be injected: Ignore (admit without sidecar, warn) or Fail (reject); match the webhook's failurePolicy")
	fs.Parse(os.Args[1:])
	c.inj.InboundPort, c.inj.OutboundPort, c.inj.ProbePort = int32(*inbound), int32(*outbound), int32(*probe)
	c.inj.DNSPort, c.inj.NoDNSCapture = int32(*dnsPort), !*captureDNS

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, c); err != nil {
		fmt.Fprintln(os.Stderr, "fedmesh-injector:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, c config) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if c.sidecarCommand != "" {
		c.inj.SidecarCommand = strings.Split(c.sidecarCommand, ",")
	}
	if c.sidecarArgs != "" {
		c.inj.SidecarArgs = strings.Split(c.sidecarArgs, ",")
	}
	if c.excludePorts != "" {
		for _, s := range strings.Split(c.excludePorts, ",") {
			p, err := strconv.ParseInt(strings.TrimSpace(s), 10, 32)
			if err != nil {
				return fmt.Errorf("--exclude-inbound-ports %q: %w", s, err)
			}
			c.inj.ExcludeInboundPorts = append(c.inj.ExcludeInboundPorts, int32(p))
		}
	}
	c.inj.SocketSource = injector.SocketSource(c.socketSource)
	c.inj.FailurePolicy = injector.FailurePolicy(c.failurePolicy)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	opts := injector.Options{Config: c.inj, Logger: log, Registry: reg}
	if c.events {
		rules := clientcmd.NewDefaultClientConfigLoadingRules()
		rules.ExplicitPath = c.kubeconfig
		cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
		if err != nil {
			return fmt.Errorf("load kubeconfig for events (or pass --events=false): %w", err)
		}
		kube, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			return fmt.Errorf("kubernetes client: %w", err)
		}
		opts.Recorder = injector.NewEventRecorder(kube, log)
	}
	h, err := injector.New(opts)
	if err != nil {
		return err
	}
	certs, err := injector.NewCertReloader(c.certFile, c.keyFile, log, reg)
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
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go srv.Serve(ln)
		defer srv.Close()
	}
	ln, err := net.Listen("tcp", c.addr)
	if err != nil {
		return fmt.Errorf("webhook listener: %w", err)
	}
	log.Info("serving webhook", "addr", ln.Addr().String(), "failure_policy", c.failurePolicy)
	err = h.Serve(ctx, ln, certs)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
