// Command fedmesh-sidecar is the proxy that runs beside every workload: it
// carries the workload's outbound calls to healthy endpoints of the own or
// a remote cluster and admits inbound calls by SPIFFE ID. See
// docs/sidecar.md.
package main

import (
	"cmp"
	"crypto/tls"
	"net"

	"github.com/fedmesh/fedmesh/internal/grpclite"
	"github.com/fedmesh/fedmesh/sidecar/discoverysource"

	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/internal/rawio"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/appprobe"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "fedmesh-sidecar:", err)
		os.Exit(1)
	}
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

// parseUpstream reads "ns/service:port=listen[,tcp]".
func parseUpstream(v string) (sidecar.Upstream, error) {
	target, rest, ok := strings.Cut(v, "=")
	if !ok {
		return sidecar.Upstream{}, fmt.Errorf("upstream %q: want ns/service:port=listen[,tcp|http]", v)
	}
	listen, proto, _ := strings.Cut(rest, ",")
	nsSvc, port, ok := strings.Cut(target, ":")
	ns, svc, ok2 := strings.Cut(nsSvc, "/")
	p, err := strconv.ParseUint(port, 10, 16)
	if !ok || !ok2 || err != nil || p == 0 {
		return sidecar.Upstream{}, fmt.Errorf("upstream %q: want ns/service:port=listen[,tcp|http]", v)
	}
	return sidecar.Upstream{Namespace: ns, Service: svc, Port: uint16(p), Listen: listen, Protocol: proto}, nil
}

func run(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("fedmesh-sidecar", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		cluster    = fs.String("cluster", os.Getenv("FEDMESH_CLUSTER"), "own cluster name (required; default $FEDMESH_CLUSTER)")
		td         = fs.String("trust-domain", "", "own trust domain (default <cluster>.fedmesh.test)")
		federated  = fs.String("federated", "", "comma-separated federated trust domains")
		wapi       = fs.String("workload-api", "", "Workload API address (default $"+mtls.EndpointSocketEnv+")")
		epFile     = fs.String("endpoints", "", "JSON file of endpoint sets (static source)")
		disco      = fs.String("discovery", os.Getenv("FEDMESH_DISCOVERY"), "federation controller's discovery API (host:port; default $FEDMESH_DISCOVERY); SPIFFE mTLS unless the address is loopback")
		inbound    = fs.String("inbound", "", "mTLS inbound listen address; empty disables inbound")
		inPort     = fs.Uint("inbound-port", 0, "mTLS inbound on every address at this port (the port iptables redirects inbound TCP to, 15006 when injected): --inbound=:PORT")
		outPort    = fs.Uint("outbound-port", 0, "transparent outbound listener on every address at this port (the port iptables redirects outbound TCP to, 15001 when injected); needs --discovery for the service directory")
		dnsAddr    = fs.String("dns-addr", os.Getenv("FEDMESH_DNS_ADDR"), "DNS server listen address, UDP and TCP (localhost:15053 when injected: 127.0.0.1 and ::1; default $FEDMESH_DNS_ADDR): answers <svc>.<ns>.svc.clusterset.local from the service directory, forwards other queries to the nameservers of /etc/resolv.conf; needs --outbound-port; empty: off")
		app        = fs.String("app", "", "app address on localhost, e.g. 127.0.0.1:8080")
		egress     = fs.String("gateway-egress", "", "local gateway egress address (UDP)")
		admin      = fs.String("admin", "", "admin listen address (/live, /ready, /state, /metrics)")
		logLevel   = fs.String("log-level", "info", "debug, info, warn or error")
		socketIO   = fs.String("socket-io", cmp.Or(os.Getenv("FEDMESH_SOCKET_IO"), "auto"), "how proxied connections read and write their sockets (default $FEDMESH_SOCKET_IO, else auto): raw (system calls off the Go scheduler's syscall path: about 25% less CPU per request, a higher throughput ceiling), std (net.TCPConn: at moderate load on a VM a median some 0.02-0.09 ms lower, for more CPU) or auto (std's path while the sidecar's sockets read under 7,000 times a second, about 3,500 req/s, and raw above)")
		accessLog  = fs.String("access-log", "", "one JSON line per outbound HTTP request: stdout, stderr or a file path (appended); empty: off")
		attempt    = fs.Duration("attempt-timeout", sidecar.DefaultAttemptTimeout, "per-attempt timeout until the response head")
		maxReqs    = fs.Int("max-requests", sidecar.DefaultMaxRequests, "circuit breaker: outstanding requests per upstream before 503 overflow")
		maxConns   = fs.Int("max-connections", sidecar.DefaultMaxConnections, "circuit breaker: open HTTP/1.1 and TCP connections per upstream to its endpoints")
		maxPending = fs.Int("max-pending", sidecar.DefaultMaxPending, "circuit breaker: requests per upstream waiting for a connection before 503 overflow")
		service    = fs.String("service", "", "ns/name of the service this workload serves: its authorization and rate limit policy is enforced at the inbound (needs --endpoints or --discovery)")
		svcPort    = fs.Uint("service-port", 0, "the service port the inbound serves (policy rules limited to other ports do not apply)")
		inProto    = fs.String("inbound-protocol", sidecar.ProtocolTCP, "inbound protocol: tcp (splice bytes) or http (parse requests when the policy needs per-request checks)")
		probeAddr  = fs.String("probe-addr", os.Getenv(appprobe.EnvAddr), "probe server listen address (:15021 when injected; default $"+appprobe.EnvAddr+"): GET /ready is the sidecar's readiness, GET /app-health/... performs the app's original probes; empty: off")
		appProbes  = fs.String("app-probes", os.Getenv(appprobe.EnvProbes), "the app's original probes by path, JSON, as the injector writes them (default $"+appprobe.EnvProbes+"); needs --probe-addr")
		ups, allow listFlag
	)
	fs.Var(&ups, "upstream", "ns/service:port=listen[,tcp|http], repeatable")
	fs.Var(&allow, "allow", "SPIFFE ID admitted at the inbound, repeatable (default: own and federated trust domains)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	if *cluster == "" {
		return errors.New("--cluster is required")
	}
	if *td == "" {
		*td = *cluster + ".fedmesh.test"
	}
	cfg := sidecar.Config{
		Cluster: *cluster, InboundAddr: *inbound, AppAddr: *app, GatewayEgress: *egress,
		AdminAddr: *admin, AttemptTimeout: *attempt, Logger: log,
		MaxRequests: *maxReqs, MaxConnections: *maxConns, MaxPending: *maxPending,
		InboundProtocol: *inProto,
	}
	sockIO, err := rawio.ParseMode(*socketIO)
	if err != nil {
		return fmt.Errorf("--socket-io: %w", err)
	}
	cfg.SocketIO = sockIO
	switch *accessLog {
	case "":
	case "stdout":
		cfg.AccessLog = slog.New(slog.NewJSONHandler(os.Stdout, nil))
	case "stderr":
		cfg.AccessLog = slog.New(slog.NewJSONHandler(stderr, nil))
	default:
		f, err := os.OpenFile(*accessLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return fmt.Errorf("--access-log: %w", err)
		}
		defer f.Close()
		cfg.AccessLog = slog.New(slog.NewJSONHandler(f, nil))
	}
	if *service != "" {
		ns, name, ok := strings.Cut(*service, "/")
		if !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return fmt.Errorf("--service %q: want ns/name", *service)
		}
		cfg.Service = sidecar.ServiceName{Namespace: ns, Name: name}
	}
	if *svcPort > 65535 {
		return fmt.Errorf("--service-port %d: not a port", *svcPort)
	}
	cfg.ServicePort = uint16(*svcPort)
	if *inPort != 0 {
		if *inbound != "" {
			return errors.New("--inbound and --inbound-port are exclusive: give one")
		}
		if *inPort > 65535 {
			return fmt.Errorf("--inbound-port %d: not a port", *inPort)
		}
		cfg.InboundAddr = ":" + strconv.FormatUint(uint64(*inPort), 10)
	}
	if *outPort != 0 {
		if *outPort > 65535 {
			return fmt.Errorf("--outbound-port %d: not a port", *outPort)
		}
		if *disco == "" {
			return errors.New("--outbound-port needs --discovery: the service directory transparent connections are looked up in comes from the federation controller")
		}
		cfg.OutboundAddr = ":" + strconv.FormatUint(uint64(*outPort), 10)
	}
	if *dnsAddr != "" {
		if cfg.OutboundAddr == "" {
			return errors.New("--dns-addr needs --outbound-port (and --discovery): clusterset.local names are answered from the transparent outbound's service directory")
		}
		cfg.DNSAddr = *dnsAddr
	}
	if *inProto != sidecar.ProtocolTCP && *inProto != sidecar.ProtocolHTTP {
		return fmt.Errorf("--inbound-protocol %q: want tcp or http", *inProto)
	}
	probes, err := appprobe.Parse(*appProbes)
	if err != nil {
		return fmt.Errorf("--app-probes: %w", err)
	}
	if len(probes) > 0 && *probeAddr == "" {
		return errors.New("--app-probes needs --probe-addr: the kubelet reaches the app's probes through the probe server")
	}
	if cfg.TrustDomain, err = spiffeid.TrustDomainFromString(*td); err != nil {
		return fmt.Errorf("--trust-domain: %w", err)
	}
	for f := range strings.SplitSeq(*federated, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		d, err := spiffeid.TrustDomainFromString(f)
		if err != nil {
			return fmt.Errorf("--federated: %w", err)
		}
		cfg.Federated = append(cfg.Federated, d)
	}
	for _, a := range allow {
		id, err := spiffeid.FromString(a)
		if err != nil {
			return fmt.Errorf("--allow: %w", err)
		}
		cfg.Allow = append(cfg.Allow, id)
	}
	for _, v := range ups {
		u, err := parseUpstream(v)
		if err != nil {
			return err
		}
		cfg.Upstreams = append(cfg.Upstreams, u)
	}
	if *epFile != "" && *disco != "" {
		return errors.New("--endpoints and --discovery are exclusive: give one source of endpoints")
	}
	if *epFile != "" {
		if cfg.Endpoints, err = endpoints.FromFile(*epFile); err != nil {
			return err
		}
	}
	// The probe server starts before the identity arrives (which may take
	// a while): the app's probes work from the start, and /ready says
	// "not ready" until the sidecar is.
	var running atomic.Pointer[sidecar.Sidecar]
	if *probeAddr != "" {
		ps, err := appprobe.New(appprobe.Options{Probes: probes, Logger: log, Ready: func() bool {
			sc := running.Load()
			return sc != nil && sc.Ready()
		}})
		if err != nil {
			return fmt.Errorf("--app-probes: %w", err)
		}
		ln, err := net.Listen("tcp", *probeAddr)
		if err != nil {
			return fmt.Errorf("--probe-addr: %w", err)
		}
		pctx, stop := context.WithCancel(ctx)
		served := make(chan error, 1)
		go func() { served <- ps.Serve(pctx, ln) }()
		defer func() {
			stop()
			if err := <-served; err != nil {
				log.Warn("probe server", "err", err)
			}
		}()
		log.Info("serving probes", "addr", ln.Addr().String(), "app_probes", len(probes))
	}
	reg := metrics.NewRegistry()
	if err := reg.RegisterRuntime(); err != nil {
		return err
	}
	cfg.Registry = reg

	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	src, err := mtls.NewSource(sctx, *wapi)
	cancel()
	if err != nil {
		return err
	}
	defer src.Close()
	cfg.Source = src
	if *disco != "" {
		// grpc-go's dns:///host:port is host:port; cleartext only on loopback.
		target := strings.TrimPrefix(*disco, "dns:///")
		var tlsConf *tls.Config
		if !isLoopback(target) {
			tlsConf = mtls.ClientConfig(src, mtls.MemberOf(cfg.TrustDomain))
		}
		client, err := grpclite.New(target, tlsConf)
		if err != nil {
			return fmt.Errorf("--discovery: %w", err)
		}
		defer client.Close()
		ds := discoverysource.New(client, log)
		defer ds.Close() // its watches end before the client closes
		cfg.Endpoints = ds
		if cfg.OutboundAddr != "" {
			cfg.Directory = ds
		}
	}
	sc, err := sidecar.New(cfg)
	if err != nil {
		return err
	}
	running.Store(sc)
	return sc.Run(ctx)
}

// isLoopback reports whether a host:port names a loopback address, the only
// place the discovery API may be reached without SPIFFE mTLS.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return host == "localhost" || (ip != nil && ip.IsLoopback())
}
