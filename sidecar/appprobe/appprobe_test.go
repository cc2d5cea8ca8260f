package appprobe_test

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar/appprobe"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    map[string]appprobe.Probe
		wantErr string
	}{
		{name: "empty", in: "", want: map[string]appprobe.Probe{}},
		{name: "null", in: "null", want: map[string]appprobe.Probe{}},
		{name: "every type", in: `{
			"/app-health/web/readyz": {"type":"http","port":8080,"path":"/healthz?full=1","scheme":"https","httpHeaders":[{"name":"X-Probe","value":"1"}],"timeoutSeconds":3},
			"/app-health/web/livez": {"type":"tcp","port":8080},
			"/app-health/api/startupz": {"type":"grpc","port":9090,"service":"api"}}`,
			want: map[string]appprobe.Probe{
				"/app-health/web/readyz":   {Type: appprobe.HTTP, Port: 8080, Path: "/healthz?full=1", Scheme: "HTTPS", HTTPHeaders: []appprobe.Header{{Name: "X-Probe", Value: "1"}}, TimeoutSeconds: 3},
				"/app-health/web/livez":    {Type: appprobe.TCP, Port: 8080},
				"/app-health/api/startupz": {Type: appprobe.GRPC, Port: 9090, Service: "api"},
			}},
		{name: "http scheme defaults", in: `{"/app-health/a/livez":{"type":"http","port":1}}`,
			want: map[string]appprobe.Probe{"/app-health/a/livez": {Type: appprobe.HTTP, Port: 1, Scheme: "HTTP"}}},
		{name: "not JSON", in: `{"/app-health/a/livez":`, wantErr: "decode app probes"},
		{name: "trailing data", in: `{} {}`, wantErr: "data after the JSON object"},
		{name: "unknown field", in: `{"/app-health/a/livez":{"type":"tcp","port":1,"host":"10.0.0.1"}}`, wantErr: `unknown field "host"`},
		{name: "unknown type", in: `{"/app-health/a/livez":{"type":"exec","port":1}}`, wantErr: `type "exec": want http, tcp or grpc`},
		{name: "port 0", in: `{"/app-health/a/livez":{"type":"tcp","port":0}}`, wantErr: "port 0 out of range"},
		{name: "port too big", in: `{"/app-health/a/livez":{"type":"tcp","port":65536}}`, wantErr: "port 65536 out of range"},
		{name: "path outside the prefix", in: `{"/healthz":{"type":"tcp","port":1}}`, wantErr: "clean path under /app-health/"},
		{name: "unclean path", in: `{"/app-health/a/../../ready":{"type":"tcp","port":1}}`, wantErr: "clean path"},
		{name: "bare prefix", in: `{"/app-health/":{"type":"tcp","port":1}}`, wantErr: "clean path"},
		{name: "scheme", in: `{"/app-health/a/livez":{"type":"http","port":1,"scheme":"ftp"}}`, wantErr: `scheme "ftp"`},
		{name: "url as path", in: `{"/app-health/a/livez":{"type":"http","port":1,"path":"http://elsewhere/"}}`, wantErr: "not a URL"},
		{name: "header name", in: `{"/app-health/a/livez":{"type":"http","port":1,"httpHeaders":[{"name":"X Y","value":"1"}]}}`, wantErr: "not a token"},
		{name: "header value", in: `{"/app-health/a/livez":{"type":"http","port":1,"httpHeaders":[{"name":"X","value":"a\r\nB: c"}]}}`, wantErr: "control character"},
		{name: "tcp with a path", in: `{"/app-health/a/livez":{"type":"tcp","port":1,"path":"/"}}`, wantErr: "for http probes, not tcp"},
		{name: "http with a service", in: `{"/app-health/a/livez":{"type":"http","port":1,"service":"x"}}`, wantErr: "for grpc probes"},
		{name: "negative timeout", in: `{"/app-health/a/livez":{"type":"tcp","port":1,"timeoutSeconds":-1}}`, wantErr: "negative"},
		{name: "every error named", in: `{"/app-health/a/livez":{"type":"tcp","port":0},"/app-health/b/livez":{"type":"x","port":1}}`, wantErr: "app probe /app-health/a/livez: port 0 out of range\napp probe /app-health/b/livez"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := appprobe.Parse(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Parse: %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if g, w := mustJSON(t, got), mustJSON(t, tc.want); g != w {
				t.Fatalf("Parse:\n got %s\nwant %s", g, w)
			}
		})
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// FuzzParse: Parse never panics, and what it accepts survives a round
// trip through its own JSON unchanged.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		``, `{}`, `null`,
		`{"/app-health/web/readyz":{"type":"http","port":8080,"path":"healthz?x=1","scheme":"HTTPS","httpHeaders":[{"name":"Host","value":"a"}],"timeoutSeconds":2}}`,
		`{"/app-health/web/livez":{"type":"tcp","port":1},"/app-health/web/startupz":{"type":"grpc","port":65535,"service":"s"}}`,
		`{"/app-health/x/y":{"type":"http","port":1,"path":"%zz"}}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		probes, err := appprobe.Parse(s)
		if err != nil {
			return
		}
		b, err := json.Marshal(probes)
		if err != nil {
			t.Fatal(err)
		}
		again, err := appprobe.Parse(string(b))
		if err != nil {
			t.Fatalf("accepted %q but not its own encoding %s: %v", s, b, err)
		}
		if b2, _ := json.Marshal(again); string(b2) != string(b) {
			t.Fatalf("round trip changed %s to %s", b, b2)
		}
	})
}

// serve runs a probe server on a loopback port until the test ends and
// returns its base URL.
func serve(t *testing.T, o appprobe.Options) string {
	t.Helper()
	s, err := appprobe.New(o)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return "http://" + ln.Addr().String()
}

// kubelet GETs url as the kubelet's rewritten probe would, and returns the
// status and the body's first line.
func kubelet(t *testing.T, url string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("User-Agent", "kube-probe/1.36")
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	line, _, _ := strings.Cut(string(b), "\n")
	return resp.StatusCode, line
}

func portOf(t *testing.T, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(strings.TrimPrefix(strings.TrimPrefix(addr, "http://"), "https://"))
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(p)
	return int32(n)
}

// closedPort is a loopback port nothing listens on.
func closedPort(t *testing.T) int32 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := portOf(t, ln.Addr().String())
	ln.Close()
	return p
}

// silent accepts connections and never answers, until the test ends.
func silent(t *testing.T) int32 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- c
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		for {
			select {
			case c := <-conns:
				c.Close()
			default:
				return
			}
		}
	})
	return portOf(t, ln.Addr().String())
}

// TestServer performs every kind of probe against real servers on
// loopback through a real probe server, as the kubelet would reach it.
func TestServer(t *testing.T) {
	testutil.CheckGoroutines(t)
	release := make(chan struct{}) // unblocks /slow at the end
	var seen atomic.Value          // the last request to /headers
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "fine") })
	mux.HandleFunc("/fail", func(w http.ResponseWriter, _ *http.Request) { http.Error(w, "broken", http.StatusInternalServerError) })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	mux.HandleFunc("/moved", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/ok", http.StatusFound) })
	mux.HandleFunc("/moved-to-fail", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/fail", http.StatusFound) })
	mux.HandleFunc("/moved-away", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://app.invalid/ok", http.StatusMovedPermanently)
	})
	mux.HandleFunc("/loop", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/loop", http.StatusFound) })
	mux.HandleFunc("/teapot", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusTeapot) })
	mux.HandleFunc("/headers", func(w http.ResponseWriter, r *http.Request) {
		seen.Store(r.Clone(context.Background()))
		if r.Header.Get("X-Token") != "secret" || r.Host != "app.example" || r.URL.RawQuery != "deep=1" {
			http.Error(w, "missing", http.StatusBadRequest)
		}
	})
	app := httptest.NewServer(mux)
	defer app.Close()
	defer close(release)
	tlsApp := httptest.NewTLSServer(mux)
	defer tlsApp.Close()
	httpPort, httpsPort := portOf(t, app.URL), portOf(t, tlsApp.URL)

	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	go func() {
		for {
			c, err := tcp.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()

	// A real grpc-go health server, as an app would run it.
	gln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gsrv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("billing", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(gsrv, hs)
	go gsrv.Serve(gln)
	defer gsrv.Stop()
	grpcPort := portOf(t, gln.Addr().String())
	noHealth := grpc.NewServer() // a gRPC server without the health service
	nln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go noHealth.Serve(nln)
	defer noHealth.Stop()

	closed, quiet := closedPort(t), silent(t)
	probes := map[string]appprobe.Probe{
		"/app-health/web/readyz":        {Type: appprobe.HTTP, Port: httpPort, Path: "/ok"},
		"/app-health/web/livez":         {Type: appprobe.HTTP, Port: httpPort, Path: "/fail"},
		"/app-health/web/startupz":      {Type: appprobe.HTTP, Port: httpPort, Path: "/slow"},
		"/app-health/relpath/readyz":    {Type: appprobe.HTTP, Port: httpPort, Path: "ok"},
		"/app-health/https/readyz":      {Type: appprobe.HTTP, Port: httpsPort, Path: "/ok", Scheme: "HTTPS"},
		"/app-health/moved/readyz":      {Type: appprobe.HTTP, Port: httpPort, Path: "/moved"},
		"/app-health/movedfail/readyz":  {Type: appprobe.HTTP, Port: httpPort, Path: "/moved-to-fail"},
		"/app-health/movedaway/readyz":  {Type: appprobe.HTTP, Port: httpPort, Path: "/moved-away"},
		"/app-health/loop/readyz":       {Type: appprobe.HTTP, Port: httpPort, Path: "/loop"},
		"/app-health/teapot/readyz":     {Type: appprobe.HTTP, Port: httpPort, Path: "/teapot"},
		"/app-health/headers/readyz":    {Type: appprobe.HTTP, Port: httpPort, Path: "/headers?deep=1", HTTPHeaders: []appprobe.Header{{Name: "X-Token", Value: "secret"}, {Name: "Host", Value: "app.example"}}},
		"/app-health/httpdown/readyz":   {Type: appprobe.HTTP, Port: closed, Path: "/"},
		"/app-health/tcp/livez":         {Type: appprobe.TCP, Port: portOf(t, tcp.Addr().String())},
		"/app-health/tcpdown/livez":     {Type: appprobe.TCP, Port: closed},
		"/app-health/grpc/readyz":       {Type: appprobe.GRPC, Port: grpcPort},
		"/app-health/orders/readyz":     {Type: appprobe.GRPC, Port: grpcPort, Service: "orders"},
		"/app-health/billing/readyz":    {Type: appprobe.GRPC, Port: grpcPort, Service: "billing"},
		"/app-health/unknown/readyz":    {Type: appprobe.GRPC, Port: grpcPort, Service: "nope"},
		"/app-health/nohealth/readyz":   {Type: appprobe.GRPC, Port: portOf(t, nln.Addr().String())},
		"/app-health/grpcdown/readyz":   {Type: appprobe.GRPC, Port: closed},
		"/app-health/grpcsilent/readyz": {Type: appprobe.GRPC, Port: quiet, TimeoutSeconds: 1},
	}
	var ready atomic.Bool
	base := serve(t, appprobe.Options{Probes: probes, Ready: ready.Load})

	for _, tc := range []struct {
		path       string
		wantStatus int
		wantBody   string
		slow       bool // takes the probe's timeout
	}{
		{path: "/app-health/web/readyz", wantStatus: 200, wantBody: "ok"},
		{path: "/app-health/web/livez", wantStatus: 503, wantBody: "http probe failed with status code 500"},
		{path: "/app-health/web/startupz", wantStatus: 503, wantBody: "http probe: timed out after 1s", slow: true},
		{path: "/app-health/relpath/readyz", wantStatus: 200},
		{path: "/app-health/https/readyz", wantStatus: 200},
		{path: "/app-health/moved/readyz", wantStatus: 200},
		{path: "/app-health/movedfail/readyz", wantStatus: 503, wantBody: "status code 500"},
		{path: "/app-health/movedaway/readyz", wantStatus: 200},
		{path: "/app-health/loop/readyz", wantStatus: 503, wantBody: "stopped after 10 redirects"},
		{path: "/app-health/teapot/readyz", wantStatus: 503, wantBody: "status code 418"},
		{path: "/app-health/headers/readyz", wantStatus: 200},
		{path: "/app-health/httpdown/readyz", wantStatus: 503, wantBody: "connection refused"},
		{path: "/app-health/tcp/livez", wantStatus: 200},
		{path: "/app-health/tcpdown/livez", wantStatus: 503, wantBody: "tcp probe: dial tcp"},
		{path: "/app-health/grpc/readyz", wantStatus: 200},
		{path: "/app-health/orders/readyz", wantStatus: 200},
		{path: "/app-health/billing/readyz", wantStatus: 503, wantBody: `service "billing" is NOT_SERVING`},
		{path: "/app-health/unknown/readyz", wantStatus: 503, wantBody: "NotFound"},
		{path: "/app-health/nohealth/readyz", wantStatus: 503, wantBody: "Unimplemented"},
		{path: "/app-health/grpcdown/readyz", wantStatus: 503, wantBody: "grpc probe"},
		{path: "/app-health/grpcsilent/readyz", wantStatus: 503, wantBody: "grpc probe: timed out after 1s", slow: true},
		{path: "/app-health/web/other", wantStatus: 404, wantBody: "no app probe at /app-health/web/other"},
		{path: "/app-health/", wantStatus: 404},
		{path: "/metrics", wantStatus: 404},
	} {
		t.Run(strings.TrimPrefix(tc.path, "/"), func(t *testing.T) {
			start := time.Now()
			status, body := kubelet(t, base+tc.path)
			took := time.Since(start)
			t.Logf("%d %s", status, body)
			if status != tc.wantStatus || !strings.Contains(body, tc.wantBody) {
				t.Fatalf("GET %s: %d %q, want %d with %q", tc.path, status, body, tc.wantStatus, tc.wantBody)
			}
			if tc.slow && (took < 900*time.Millisecond || took > 3*time.Second) {
				t.Errorf("answered after %v, want about the probe's 1s timeout", took)
			}
			if !tc.slow && took > 2*time.Second {
				t.Errorf("answered after %v", took)
			}
		})
	}
	if r, _ := seen.Load().(*http.Request); r == nil || r.Header.Get("User-Agent") != "kube-probe/1.36" || r.Header.Get("Accept") != "*/*" {
		t.Errorf("the app did not see the kubelet's User-Agent and Accept: %v", r)
	}

	t.Run("sidecar readiness", func(t *testing.T) {
		if status, body := kubelet(t, base+"/ready"); status != 503 || body != "sidecar not ready" {
			t.Errorf("/ready before: %d %q", status, body)
		}
		ready.Store(true)
		if status, _ := kubelet(t, base+"/ready"); status != 200 {
			t.Errorf("/ready after: %d", status)
		}
		if status, _ := kubelet(t, base+"/ready/x"); status != 404 {
			t.Errorf("/ready/x: %d", status)
		}
	})
}

// TestInflightBound: probes beyond MaxInflight are answered 503 at once
// instead of queueing behind a slow app.
func TestInflightBound(t *testing.T) {
	testutil.CheckGoroutines(t)
	arrived, release := make(chan struct{}, 1), make(chan struct{})
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer app.Close()
	defer close(release)
	base := serve(t, appprobe.Options{MaxInflight: 1, Probes: map[string]appprobe.Probe{
		"/app-health/a/readyz": {Type: appprobe.HTTP, Port: portOf(t, app.URL), TimeoutSeconds: 10},
	}})
	first := make(chan int, 1)
	go func() {
		resp, err := http.Get(base + "/app-health/a/readyz")
		if err != nil {
			first <- 0
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	<-arrived
	start := time.Now()
	if status, body := kubelet(t, base+"/app-health/a/readyz"); status != 503 || body != "too many probes in flight" || time.Since(start) > time.Second {
		t.Fatalf("second probe: %d %q after %v", status, body, time.Since(start))
	}
	release <- struct{}{}
	if s := <-first; s != 200 {
		t.Fatalf("first probe: %d", s)
	}
}

func TestNewRejectsBadProbes(t *testing.T) {
	_, err := appprobe.New(appprobe.Options{Probes: map[string]appprobe.Probe{
		"/app-health/a/readyz": {Type: appprobe.TCP, Port: 70000},
		"/elsewhere":           {Type: appprobe.TCP, Port: 80},
	}})
	if err == nil || !strings.Contains(err.Error(), "port 70000 out of range") || !strings.Contains(err.Error(), "/elsewhere") {
		t.Fatalf("New: %v", err)
	}
	if _, err := appprobe.New(appprobe.Options{}); err != nil {
		t.Fatalf("New without probes: %v", err)
	}
}
