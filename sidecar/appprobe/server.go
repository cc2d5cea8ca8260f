package appprobe

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/fedmesh/fedmesh/internal/grpclite"
)

// Options configures a Server.
type Options struct {
	// Probes are the app's original probes by path (Parse's result); they
	// are checked again by New.
	Probes map[string]Probe
	// Ready is the sidecar's own readiness, answered on ReadyPath; nil
	// means not ready. The sidecar passes (*sidecar.Sidecar).Ready once it
	// has one.
	Ready  func() bool
	Logger *slog.Logger // default discards
	// MaxInflight bounds the probes performed at once (default 64); more
	// are answered 503 at once. The kubelet sends a few per period.
	MaxInflight int
}

// Server answers the sidecar's readiness and the app's probes.
type Server struct {
	probes   map[string]Probe
	ready    func() bool
	log      *slog.Logger
	inflight chan struct{}
	mux      *http.ServeMux
}

// New checks the probes and returns a Server.
func New(o Options) (*Server, error) {
	probes := make(map[string]Probe, len(o.Probes))
	var errs []error
	for k, p := range o.Probes {
		if err := p.check(k); err != nil {
			errs = append(errs, fmt.Errorf("app probe %s: %w", k, err))
		}
		probes[k] = p
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MaxInflight <= 0 {
		o.MaxInflight = 64
	}
	s := &Server{probes: probes, ready: o.Ready, log: o.Logger, inflight: make(chan struct{}, o.MaxInflight)}
	s.mux = http.NewServeMux()
	s.mux.HandleFunc("GET "+ReadyPath, s.serveReady)
	s.mux.HandleFunc("GET "+PathPrefix, s.serveProbe)
	return s, nil
}

// ServeHTTP answers GET /ready and GET /app-health/...; any other path is
// 404.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

func (s *Server) serveReady(w http.ResponseWriter, _ *http.Request) {
	if s.ready == nil || !s.ready() {
		http.Error(w, "sidecar not ready", http.StatusServiceUnavailable)
		return
	}
	_, _ = io.WriteString(w, "ok\n")
}

func (s *Server) serveProbe(w http.ResponseWriter, r *http.Request) {
	p, ok := s.probes[r.URL.Path]
	if !ok {
		http.Error(w, "no app probe at "+r.URL.Path, http.StatusNotFound)
		return
	}
	select {
	case s.inflight <- struct{}{}:
		defer func() { <-s.inflight }()
	default:
		http.Error(w, "too many probes in flight", http.StatusServiceUnavailable)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), p.Timeout())
	defer cancel()
	if err := perform(ctx, p, r.Header.Get("User-Agent")); err != nil {
		s.log.Debug("app probe failed", "path", r.URL.Path, "err", err)
		http.Error(w, oneLine(err.Error()), http.StatusServiceUnavailable)
		return
	}
	_, _ = io.WriteString(w, "ok\n")
}

// Serve serves on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       30 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			_ = srv.Close()
		}
	}()
	err := srv.Serve(ln)
	<-done
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serve probes: %w", err)
}

// perform checks the app on 127.0.0.1 as p says, within ctx. userAgent
// goes with an HTTP probe unless the probe sets its own: the kubelet's
// kube-probe/<version>, so the app sees what it saw before injection.
func perform(ctx context.Context, p Probe, userAgent string) error {
	switch p.Type {
	case HTTP:
		return checkHTTP(ctx, p, userAgent)
	case TCP:
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", p.addr())
		if err != nil {
			return fmt.Errorf("tcp probe: %w", err)
		}
		_ = c.Close()
		return nil
	case GRPC:
		return checkGRPC(ctx, p)
	}
	return fmt.Errorf("unknown probe type %q", p.Type)
}

// maxBody is what the kubelet reads of a probe's answer.
const maxBody = 10 << 10

func checkHTTP(ctx context.Context, p Probe, userAgent string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url(), nil)
	if err != nil {
		return fmt.Errorf("http probe: %w", err)
	}
	if userAgent == "" {
		userAgent = "fedmesh-appprobe"
	}
	req.Header.Set("User-Agent", userAgent)
	req.Header.Set("Accept", "*/*")
	for _, h := range p.HTTPHeaders {
		if strings.EqualFold(h.Name, "Host") {
			req.Host = h.Value
			continue
		}
		req.Header.Del(h.Name) // the probe's own replace the defaults
	}
	for _, h := range p.HTTPHeaders {
		if !strings.EqualFold(h.Name, "Host") {
			req.Header.Add(h.Name, h.Value)
		}
	}
	client := &http.Client{
		// A fresh connection per probe, no proxy from the environment, no
		// verification of the app's certificate: as the kubelet.
		Transport: &http.Transport{
			DisableKeepAlives:  true,
			DisableCompression: true,
			TLSClientConfig:    &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // the kubelet does not verify the app either
		},
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			// Redirects within the app are followed; one to another host
			// is not, and its 3xx counts as success.
			if req.URL.Hostname() != via[0].URL.Hostname() {
				return http.ErrUseLastResponse
			}
			if len(via) >= 10 {
				return errors.New("stopped after 10 redirects")
			}
			return nil
		},
	}
	resp, err := client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("http probe: timed out after %v", p.Timeout())
		}
		return fmt.Errorf("http probe: %w", err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
	_ = resp.Body.Close()
	if resp.StatusCode < http.StatusOK || resp.StatusCode >= http.StatusBadRequest {
		return fmt.Errorf("http probe failed with status code %d", resp.StatusCode)
	}
	return nil
}

// The gRPC health protocol (grpc.health.v1), encoded by hand so the
// sidecar links no protobuf runtime.
const (
	healthCheck = "/grpc.health.v1.Health/Check"
	serving     = 1
)

var servingStatus = map[uint64]string{0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

func checkGRPC(ctx context.Context, p Probe) error {
	client, err := grpclite.New(p.addr(), nil)
	if err != nil {
		return fmt.Errorf("grpc probe: %w", err)
	}
	defer client.Close()
	var req []byte
	if p.Service != "" {
		req = protowire.AppendTag(req, 1, protowire.BytesType)
		req = protowire.AppendString(req, p.Service)
	}
	resp, err := client.Unary(ctx, healthCheck, nil, req, 1<<10)
	if err != nil {
		if grpclite.CodeOf(err) == grpclite.DeadlineExceeded {
			return fmt.Errorf("grpc probe: timed out after %v", p.Timeout())
		}
		return fmt.Errorf("grpc probe: %w", err)
	}
	st, err := decodeHealthStatus(resp)
	if err != nil {
		return fmt.Errorf("grpc probe: %w", err)
	}
	if st != serving {
		name, ok := servingStatus[st]
		if !ok {
			name = fmt.Sprintf("status %d", st)
		}
		return fmt.Errorf("grpc probe: service %q is %s", p.Service, name)
	}
	return nil
}

// decodeHealthStatus reads field 1 (status, an enum) of a
// HealthCheckResponse; absent means 0, UNKNOWN.
func decodeHealthStatus(b []byte) (uint64, error) {
	var st uint64
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, fmt.Errorf("decode health response: %w", protowire.ParseError(n))
		}
		b = b[n:]
		if num == 1 && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return 0, fmt.Errorf("decode health response: %w", protowire.ParseError(n))
			}
			st, b = v, b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return 0, fmt.Errorf("decode health response: %w", protowire.ParseError(n))
		}
		b = b[n:]
	}
	return st, nil
}

// oneLine keeps an error's message to one line of a response body.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
