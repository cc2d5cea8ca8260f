// Command fedmesh-issuer runs fedmesh's built-in SPIFFE issuer for one trust
// domain: the Workload API on a unix socket, the SPIFFE bundle endpoint, and
// federation with other trust domains. It exists so that the local
// federation and tests get real rotating SPIFFE identities without SPIRE;
// workloads cannot tell the difference. See docs/identity.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/fedmesh/fedmesh/identity/issuer"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "fedmesh-issuer: %v\n", err)
		os.Exit(2)
	}
	if err := run(ctx, opts, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "fedmesh-issuer: %v\n", err)
		os.Exit(1)
	}
}

// options is the parsed command line.
type options struct {
	cfg         issuer.Config
	entriesFile string
	metricsAddr string
	logLevel    slog.Level
}

const usage = `fedmesh-issuer: a SPIFFE issuer for one trust domain.

It serves the SPIFFE Workload API on a unix socket (attesting callers by
their uid/gid/pid/executable, or by a per-workload socket), issues X.509- and
JWT-SVIDs named spiffe://<trust domain>/ns/<namespace>/sa/<serviceaccount>,
renews them at half-life, keeps its CA in --data-dir, and federates with other
trust domains through SPIFFE bundle endpoints (https_spiffe profile).

Usage:
  fedmesh-issuer --trust-domain east.fedmesh.test --data-dir DIR --socket PATH \
      --entries FILE [--bundle-endpoint 127.0.0.1:8443] \
      [--federate trust-domain=TD,url=https://HOST:PORT,endpoint-id=SPIFFEID,bundle=FILE ...]

Flags:
`

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	var td, endpointID string
	var peers []issuer.Peer
	fs := flag.NewFlagSet("fedmesh-issuer", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	fs.StringVar(&td, "trust-domain", "", "trust domain this issuer is the authority of, e.g. east.fedmesh.test (required)")
	fs.StringVar(&o.cfg.DataDir, "data-dir", "", "directory for the CA keys (ca.json, 0600), this trust domain's bundle (bundle.spiffe.json) and fetched peer bundles; keep it to keep trust across restarts (required)")
	fs.StringVar(&o.cfg.SocketPath, "socket", "", "absolute path of the Workload API unix socket; workloads set SPIFFE_ENDPOINT_SOCKET=unix://<path> (required)")
	fs.StringVar(&o.entriesFile, "entries", "", "registration entries file (YAML or JSON, see docs/identity.md); without it nobody gets an identity")
	fs.DurationVar(&o.cfg.SVIDTTL, "svid-ttl", issuer.DefaultSVIDTTL, "X.509-SVID lifetime (at least 1m); SVIDs are renewed and pushed at half-life")
	fs.DurationVar(&o.cfg.UnsafeMinSVIDTTL, "unsafe-min-svid-ttl", 0, "UNSAFE, drills only: lower the 1m floor of --svid-ttl/--jwt-svid-ttl (fedctl drill svid-rotation uses it on a local federation)")
	fs.DurationVar(&o.cfg.JWTSVIDTTL, "jwt-svid-ttl", issuer.DefaultJWTSVIDTTL, "JWT-SVID lifetime (at least 1m)")
	fs.DurationVar(&o.cfg.CATTL, "ca-ttl", issuer.DefaultCATTL, "lifetime of each CA; the next CA is published at 1/2 of it, signs from 3/4, and the old root stays in the bundle until it expires")
	fs.StringVar(&o.cfg.BundleEndpointAddr, "bundle-endpoint", "", "TCP address for the SPIFFE bundle endpoint (https_spiffe), e.g. 127.0.0.1:8443; empty: not served")
	fs.StringVar(&endpointID, "bundle-endpoint-id", "", "SPIFFE ID the bundle endpoint presents (default spiffe://<trust domain>/fedmesh/issuer)")
	fs.DurationVar(&o.cfg.RefreshHint, "refresh-hint", issuer.DefaultRefreshHint, "refresh hint published in the bundle, whole seconds")
	fs.Func("federate", "federate with a trust domain (repeatable): trust-domain=TD,url=https://HOST:PORT,endpoint-id=SPIFFE ID of its bundle endpoint,bundle=FILE with its bundle obtained out of band (SPIFFE bundle JSON)", func(s string) error {
		p, err := parsePeer(s)
		if err != nil {
			return err
		}
		peers = append(peers, p)
		return nil
	})
	fs.StringVar(&o.metricsAddr, "metrics-addr", "", "address to serve Prometheus /metrics on, e.g. 127.0.0.1:9402; empty: not served")
	fs.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q (all options are flags; see --help)", fs.Args())
	}
	if td == "" {
		return o, errors.New("--trust-domain is required")
	}
	var err error
	if o.cfg.TrustDomain, err = spiffeid.TrustDomainFromString(td); err != nil {
		return o, fmt.Errorf("--trust-domain %q: %w", td, err)
	}
	if endpointID != "" {
		if o.cfg.BundleEndpointID, err = spiffeid.FromString(endpointID); err != nil {
			return o, fmt.Errorf("--bundle-endpoint-id %q: %w", endpointID, err)
		}
	}
	if o.cfg.DataDir == "" {
		return o, errors.New("--data-dir is required")
	}
	if o.cfg.SocketPath == "" {
		return o, errors.New("--socket is required")
	}
	o.cfg.Peers = peers
	return o, nil
}

// parsePeer parses one --federate value.
func parsePeer(s string) (issuer.Peer, error) {
	var p issuer.Peer
	seen := map[string]bool{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || v == "" {
			return p, fmt.Errorf("%q: want key=value, got %q", s, kv)
		}
		if seen[k] {
			return p, fmt.Errorf("%q: %s given twice", s, k)
		}
		seen[k] = true
		var err error
		switch k {
		case "trust-domain":
			p.TrustDomain, err = spiffeid.TrustDomainFromString(v)
		case "url":
			p.BundleEndpointURL = v
		case "endpoint-id":
			p.EndpointID, err = spiffeid.FromString(v)
		case "bundle":
			p.BundleFile = v
		default:
			return p, fmt.Errorf("%q: unknown key %q (want trust-domain, url, endpoint-id, bundle)", s, k)
		}
		if err != nil {
			return p, fmt.Errorf("%q: %s: %w", s, k, err)
		}
	}
	for _, k := range []string{"trust-domain", "url", "endpoint-id"} {
		if !seen[k] {
			return p, fmt.Errorf("%q: %s is required", s, k)
		}
	}
	return p, nil
}

// run starts the issuer and serves until ctx ends.
func run(ctx context.Context, o options, logOut io.Writer) error {
	log := slog.New(slog.NewTextHandler(logOut, &slog.HandlerOptions{Level: o.logLevel}))
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	o.cfg.Logger, o.cfg.Registry = log, reg
	if o.entriesFile != "" {
		entries, err := issuer.LoadEntries(o.entriesFile)
		if err != nil {
			return err
		}
		o.cfg.Entries = entries
	} else {
		log.Warn("no --entries file: every caller will be denied an identity")
	}
	iss, err := issuer.New(o.cfg)
	if err != nil {
		return err
	}
	if err := iss.Start(); err != nil {
		return err
	}
	defer iss.Stop()

	if o.metricsAddr != "" {
		ln, err := net.Listen("tcp", o.metricsAddr)
		if err != nil {
			return fmt.Errorf("listen for metrics on %s: %w", o.metricsAddr, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
	}
	log.Info("serving", "trust_domain", o.cfg.TrustDomain.Name(), "bundle_file", iss.BundleFile())
	<-ctx.Done()
	log.Info("shutting down")
	return nil
}
