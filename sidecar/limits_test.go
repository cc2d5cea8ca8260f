package sidecar_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// TestConnectionCircuitBreakers: with at most 2 connections and 1 pending
// request, 5 concurrent slow requests through an HTTP upstream give 3
// answers (2 at once, the third on a connection that came back) and 2
// refusals (503 overflow) at once; the app never sees more than 2 at a
// time. A TCP upstream with 1 connection closes a second client
// connection at once and serves a third once the first is done.
func TestConnectionCircuitBreakers(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	var now, peak atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	appSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := now.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		time.Sleep(300 * time.Millisecond)
		now.Add(-1)
		_, _ = io.WriteString(w, "ok")
	})}
	go func() { _ = appSrv.Serve(ln) }()
	t.Cleanup(func() { _ = appSrv.Close() })
	server := startSidecar(t, "server", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"),
		InboundAddr: "127.0.0.1:0", AppAddr: ln.Addr().String(),
	})
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "slow", Port: 80, Clusters: []endpoints.Cluster{{Name: "west",
		Endpoints: []endpoints.Endpoint{{Name: "slow-0", Addr: server.InboundAddr().String(), Ready: true}}}}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: west.Cluster, TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: src, NoActiveChecks: true,
		MaxConnections: 2, MaxPending: 1,
		Upstreams: []sidecar.Upstream{
			{Namespace: "shop", Service: "slow", Port: 80, Listen: "127.0.0.1:0"},
			{Namespace: "shop", Service: "slow", Port: 80, Listen: "127.0.0.1:0", Protocol: sidecar.ProtocolTCP},
		},
	})
	waitFor(t, "client ready", 5*time.Second, client.Ready)

	type res struct {
		status int
		why    string
		took   time.Duration
	}
	out := make(chan res, 5)
	var wg sync.WaitGroup
	start := time.Now()
	for range 5 {
		wg.Go(func() {
			c := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
			resp, err := c.Get("http://" + client.UpstreamAddr(0).String() + "/")
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			out <- res{resp.StatusCode, resp.Header.Get("X-Fedmesh-Error"), time.Since(start)}
		})
	}
	wg.Wait()
	close(out)
	var ok, refused int
	for r := range out {
		switch {
		case r.status == 200:
			ok++
		case r.status == 503 && r.why == "overflow":
			refused++
			if r.took > 250*time.Millisecond {
				t.Errorf("a refusal took %s; want it at once", r.took)
			}
		default:
			t.Errorf("answer %d %q", r.status, r.why)
		}
	}
	if ok != 3 || refused != 2 {
		t.Errorf("%d served, %d refused; want 3 and 2 (2 connections, 1 pending)", ok, refused)
	}
	if p := peak.Load(); p > 2 {
		t.Errorf("the app saw %d requests at once; want at most 2", p)
	}
	if n := metricSum(t, client.reg, "fedmesh_sidecar_circuit_breaker_trips_total"); n != 2 {
		t.Errorf("circuit_breaker_trips_total = %v, want 2", n)
	}

	// TCP: the HTTP upstream's 2 pooled connections stay idle in their
	// pool; the TCP upstream has its own limit of 2. Hold 2, the third is
	// closed at once.
	tcpAddr := client.UpstreamAddr(1).String()
	hold := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", tcpAddr)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: slow\r\n\r\n")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("TCP connection through the sidecar: %v", err)
		}
		resp.Body.Close()
		return c, br
	}
	c1, _ := hold()
	c2, _ := hold()
	c3, err := net.Dial("tcp", tcpAddr)
	if err != nil {
		t.Fatal(err)
	}
	// Closed means EOF or a reset; a read that times out means the sidecar
	// kept the connection open (the deadline is only there to end the test).
	_ = c3.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c3.Read(make([]byte, 1)); n != 0 || !(errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
		t.Errorf("third TCP connection over max connections 2: read %d, %v; want it closed by the sidecar (EOF or reset)", n, err)
	}
	c3.Close()
	c1.Close()
	waitFor(t, "a TCP slot to come free", 5*time.Second, func() bool {
		c, err := net.Dial("tcp", tcpAddr)
		if err != nil {
			return false
		}
		defer c.Close()
		_, _ = fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: slow\r\n\r\n")
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	c2.Close()
}
