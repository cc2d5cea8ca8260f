package sidecar

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// TestDirectoryLookup: the directory as the transparent listener reads it:
// both IP families, v4-mapped destinations, protocol from appProtocol or
// port name, non-TCP ports and bad entries skipped, bad entries logged once
// across updates.
func TestDirectoryLookup(t *testing.T) {
	testutil.CheckGoroutines(t)
	var logs bytes.Buffer
	s := &Sidecar{cfg: Config{Registry: imetrics.NewRegistry()}, log: slog.New(slog.NewTextHandler(&logs, nil)), own: newOwner()}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tr, err := newTransparent(s, ln)
	if err != nil {
		t.Fatal(err)
	}
	h2c := "kubernetes.io/h2c"
	dir := []VirtualService{
		{Namespace: "shop", Name: "web", IPs: []string{"198.19.0.10", "fd00:10:96::a"}, Ports: []ServicePort{
			{Name: "http", Port: 80, Protocol: "TCP"},
			{Name: "api", Port: 9090, Protocol: "TCP", AppProtocol: h2c},
			{Name: "dns", Port: 53, Protocol: "UDP"},
		}},
		{Namespace: "shop", Name: "web", Imported: true, IPs: []string{"10.97.0.10"}, Ports: []ServicePort{{Name: "http", Port: 80}}},
		{Namespace: "shop", Name: "db", IPs: []string{"198.19.0.11"}, Ports: []ServicePort{{Name: "tcp-postgres", Port: 5432}}},
		{Namespace: "shop", Name: "bad", IPs: []string{"198.19.0.300", "198.19.0.12"}, Ports: []ServicePort{{Name: "http", Port: 70000}, {Name: "grpc", Port: 50051}}},
		{Namespace: "", Name: "nameless", IPs: []string{"198.19.0.13"}, Ports: []ServicePort{{Port: 80}}},
		{Namespace: "shop", Name: "thief", IPs: []string{"198.19.0.11"}, Ports: []ServicePort{{Name: "tcp", Port: 5432}}},
	}
	tr.apply(dir)
	tr.apply(dir) // a second update with the same garbage logs nothing new
	for _, tc := range []struct {
		name, dst string
		want      *vipTarget
	}{
		{"cluster IP", "198.19.0.10:80", &vipTarget{upstreamKey{"shop", "web", 80}, ProtocolHTTP}},
		{"IPv6 cluster IP", "[fd00:10:96::a]:80", &vipTarget{upstreamKey{"shop", "web", 80}, ProtocolHTTP}},
		{"v4-mapped", "[::ffff:198.19.0.10]:80", &vipTarget{upstreamKey{"shop", "web", 80}, ProtocolHTTP}},
		{"appProtocol h2c", "198.19.0.10:9090", &vipTarget{upstreamKey{"shop", "web", 9090}, ProtocolHTTP2}},
		{"clusterset IP", "10.97.0.10:80", &vipTarget{upstreamKey{"shop", "web", 80}, ProtocolHTTP}},
		{"tcp port name", "198.19.0.11:5432", &vipTarget{upstreamKey{"shop", "db", 5432}, ProtocolTCP}},
		{"good port of a bad entry", "198.19.0.12:50051", &vipTarget{upstreamKey{"shop", "bad", 50051}, ProtocolGRPC}},
		{"UDP port", "198.19.0.10:53", nil},
		{"unknown port", "198.19.0.10:81", nil},
		{"unknown IP", "198.19.0.99:80", nil},
		{"nameless entry", "198.19.0.13:80", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := tr.lookup(netip.MustParseAddrPort(tc.dst))
			switch {
			case tc.want == nil && ok:
				t.Errorf("found %+v, want nothing", got)
			case tc.want != nil && (!ok || got != *tc.want):
				t.Errorf("got %+v (%v), want %+v", got, ok, *tc.want)
			}
		})
	}
	for _, want := range []string{`198.19.0.300`, `port 70000`, `no namespace or name`, `is also shop/db`} {
		if n := strings.Count(logs.String(), want); n != 1 {
			t.Errorf("%q logged %d times, want once:\n%s", want, n, logs.String())
		}
	}
}

// watchRecorder is an endpoints.Source that hands out channels and
// records which watches have ended.
type watchRecorder struct {
	mu    sync.Mutex
	ended map[string]bool
}

func (w *watchRecorder) Watch(ctx context.Context, ns, name string) (<-chan endpoints.Set, error) {
	w.mu.Lock()
	w.ended[ns+"/"+name] = false
	w.mu.Unlock()
	go func() {
		<-ctx.Done()
		w.mu.Lock()
		w.ended[ns+"/"+name] = true
		w.mu.Unlock()
	}()
	return make(chan endpoints.Set), nil
}

func (w *watchRecorder) isEnded(key string) (ended, seen bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	ended, seen = w.ended[key]
	return ended, seen
}

// TestTransparentUpstreamPruned: a transparent upstream whose service port
// leaves the directory is removed: its endpoint watch ends, its idle
// connections close, and a connection a request returns later closes too;
// the other upstream stays; the port coming back makes a new one.
func TestTransparentUpstreamPruned(t *testing.T) {
	testutil.CheckGoroutines(t)
	rec := &watchRecorder{ended: map[string]bool{}}
	reg := imetrics.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	s := &Sidecar{cfg: Config{Registry: reg, Endpoints: rec, NoActiveChecks: true, MaxIdlePerTarget: 4}, m: m, log: slog.New(slog.DiscardHandler), own: newOwner()}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tr, err := newTransparent(s, ln)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	tr.ctx, tr.wg = ctx, &wg
	web := VirtualService{Namespace: "shop", Name: "web", IPs: []string{"198.19.0.10"}, Ports: []ServicePort{{Name: "http", Port: 80}}}
	db := VirtualService{Namespace: "shop", Name: "db", IPs: []string{"198.19.0.11"}, Ports: []ServicePort{{Name: "tcp", Port: 5432}}}
	tr.apply([]VirtualService{web, db})
	for _, dst := range []string{"198.19.0.10:80", "198.19.0.11:5432"} {
		tg, ok := tr.lookup(netip.MustParseAddrPort(dst))
		if !ok || tr.upstream(tg) == nil {
			t.Fatalf("no upstream for %s", dst)
		}
	}
	first := tr.upstreamList()
	if len(first) != 2 {
		t.Fatalf("%d upstreams, want 2", len(first))
	}

	// web's pool holds an idle connection, and a request holds another
	// (net.Pipe ends stand for mTLS connections to an endpoint).
	var web0 *upstream
	for _, u := range first {
		if u.cfg.Service == "web" {
			web0 = u
		}
	}
	web0.own.apply(endpoints.Set{Namespace: "shop", Service: "web", Clusters: []endpoints.Cluster{
		{Endpoints: []endpoints.Endpoint{{Name: "web-1", Addr: "127.0.0.1:1", Ready: true}}}}})
	target := web0.own.all.Targets()[0][0]
	idle, idlePeer := net.Pipe()
	busy, busyPeer := net.Pipe()
	target.Data.(*pool).put(&upConn{Conn: idle})
	if target.Data.(*pool).get() == nil {
		t.Fatal("the pool did not keep the idle connection")
	}
	target.Data.(*pool).put(&upConn{Conn: idle})
	closedSoon := func(peer net.Conn, what string) {
		t.Helper()
		_ = peer.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := peer.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Errorf("%s connection of web after web left the directory: read %v, want it closed (EOF)", what, err)
		}
	}

	tr.apply([]VirtualService{db}) // web is deleted
	closedSoon(idlePeer, "the idle")
	target.Data.(*pool).put(&upConn{Conn: busy}) // the request ends and returns its connection
	closedSoon(busyPeer, "a returned")
	if ups := tr.upstreamList(); len(ups) != 1 || ups[0].cfg.Service != "db" {
		t.Fatalf("upstreams after web left: %d, want only db", len(ups))
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if ended, _ := rec.isEnded("shop/web"); ended {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("web's endpoint watch still running after web left the directory")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if ended, _ := rec.isEnded("shop/db"); ended {
		t.Fatal("db's endpoint watch ended, but db is still in the directory")
	}

	tr.apply([]VirtualService{web, db}) // web comes back
	tg, _ := tr.lookup(netip.MustParseAddrPort("198.19.0.10:80"))
	if u := tr.upstream(tg); u == nil || slices.Contains(first, u) {
		t.Fatalf("web's upstream after it came back: %v, want a new one", u)
	}
}
