package sidecar_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	testpb "google.golang.org/grpc/interop/grpc_testing"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// TestAccessLogAndTraceContext: with an access log, each request through
// the outbound (HTTP/1.1 and gRPC over HTTP/2) is one JSON line naming
// method, path, status, endpoint, attempts and trace ID; the app receives
// a traceparent of that trace whose parent ID is the sidecar's span; a
// request without one starts a new trace.
func TestAccessLogAndTraceContext(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	got := make(chan string, 10)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	appSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.Header.Get("Traceparent")
		_, _ = io.WriteString(w, "ok")
	})}
	go func() { _ = appSrv.Serve(ln) }()
	t.Cleanup(func() { _ = appSrv.Close() })
	server := startSidecar(t, "server", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: ln.Addr().String(),
	})
	_, gAddr := startGRPCApp(t, "g")
	gserver := startSidecar(t, "gserver", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: gAddr,
	})
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "web", Port: 80, Clusters: []endpoints.Cluster{{Name: "west",
		Endpoints: []endpoints.Endpoint{{Name: "web-0", Addr: server.InboundAddr().String(), Ready: true}}}}})
	src.Update(endpoints.Set{Namespace: "shop", Service: "grpc", Port: 9090, Clusters: []endpoints.Cluster{{Name: "west",
		Endpoints: []endpoints.Endpoint{{Name: "grpc-0", Addr: gserver.InboundAddr().String(), Ready: true}}}}})
	logs := &testutil.SyncBuffer{}
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		AccessLog: slog.New(slog.NewJSONHandler(logs, nil)),
		Upstreams: []sidecar.Upstream{
			{Namespace: "shop", Service: "web", Port: 80, Listen: "127.0.0.1:0"},
			{Namespace: "shop", Service: "grpc", Port: 9090, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolGRPC},
		},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)

	const parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	req, _ := http.NewRequest("GET", "http://"+client.UpstreamAddr(0).String()+"/cart?x=1", nil)
	req.Header.Set("Traceparent", parent)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	tp := <-got
	if len(tp) != 55 || tp[:36] != parent[:36] || tp[36:52] == parent[36:52] || tp[52:] != "-01" {
		t.Errorf("app got traceparent %q; want trace 4bf92f35..., a new parent ID, flags 01", tp)
	}
	resp, err = http.Get("http://" + client.UpstreamAddr(0).String() + "/new")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	fresh := <-got
	if len(fresh) != 55 || fresh[3:35] == parent[3:35] {
		t.Errorf("a request without traceparent reached the app with %q, want a new trace", fresh)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := testClient(t, client.UpstreamAddr(1).String()).UnaryCall(ctx, &testpb.SimpleRequest{}); err != nil {
		t.Fatal(err)
	}

	var lines []map[string]any
	waitFor(t, "3 access log lines", 5*time.Second, func() bool { return strings.Count(logs.String(), "\n") >= 3 })
	for _, l := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("access log line %q: %v", l, err)
		}
		lines = append(lines, m)
	}
	want := []map[string]any{
		{"method": "GET", "path": "/cart", "status": 200.0, "result": "ok", "endpoint": "web-0", "cluster": "west", "attempts": 1.0, "trace_id": parent[3:35], "protocol": "HTTP/1.1", "upstream": "shop/web:80"},
		{"method": "GET", "path": "/new", "status": 200.0, "trace_id": fresh[3:35]},
		{"method": "POST", "path": "/grpc.testing.TestService/UnaryCall", "status": 200.0, "grpc_status": 0.0, "protocol": "HTTP/2.0", "endpoint": "grpc-0"},
	}
	if len(lines) != len(want) {
		t.Fatalf("%d access log lines, want %d:\n%s", len(lines), len(want), logs.String())
	}
	for i, w := range want {
		for k, v := range w {
			if lines[i][k] != v {
				t.Errorf("access log line %d: %s = %v, want %v\n%v", i, k, lines[i][k], v, lines[i])
			}
		}
		if d, _ := lines[i]["duration_ms"].(float64); d <= 0 {
			t.Errorf("access log line %d: duration_ms %v", i, lines[i]["duration_ms"])
		}
	}
}
