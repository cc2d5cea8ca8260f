package sidecar

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// TestDirectoryLookup: the directory as the transparent listener reads it:
// both IP families, v4-mapped destinations, protocol from appProtocol or
// port name, non-TCP ports and bad entries skipped, bad entries logged once
// across updates.
func TestDirectoryLookup(t *testing.T) {
	var logs bytes.Buffer
	s := &Sidecar{cfg: Config{Registry: imetrics.NewRegistry()}, log: slog.New(slog.NewTextHandler(&logs, nil))}
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
		{Namespace: "shop", Name: "web", IPs: []string{"10.96.0.10", "fd00:10:96::a"}, Ports: []ServicePort{
			{Name: "http", Port: 80, Protocol: "TCP"},
			{Name: "api", Port: 9090, Protocol: "TCP", AppProtocol: h2c},
			{Name: "dns", Port: 53, Protocol: "UDP"},
		}},
		{Namespace: "shop", Name: "web", Imported: true, IPs: []string{"10.97.0.10"}, Ports: []ServicePort{{Name: "http", Port: 80}}},
		{Namespace: "shop", Name: "db", IPs: []string{"10.96.0.11"}, Ports: []ServicePort{{Name: "tcp-postgres", Port: 5432}}},
		{Namespace: "shop", Name: "bad", IPs: []string{"10.96.0.300", "10.96.0.12"}, Ports: []ServicePort{{Name: "http", Port: 70000}, {Name: "grpc", Port: 50051}}},
		{Namespace: "", Name: "nameless", IPs: []string{"10.96.0.13"}, Ports: []ServicePort{{Port: 80}}},
		{Namespace: "shop", Name: "thief", IPs: []string{"10.96.0.11"}, Ports: []ServicePort{{Name: "tcp", Port: 5432}}},
	}
	tr.apply(dir)
	tr.apply(dir) // a second update with the same garbage logs nothing new
	for _, tc := range []struct {
		name, dst string
		want      *vipTarget
	}{
		{"cluster IP", "10.96.0.10:80", &vipTarget{upstreamKey{"shop", "web", 80}, ProtocolHTTP}},
		{"IPv6 cluster IP", "[fd00:10:96::a]:80", &vipTarget{upstreamKey{"shop", "web", 80}, ProtocolHTTP}},
		{"v4-mapped", "[::ffff:10.96.0.10]:80", &vipTarget{upstreamKey{"shop", "web", 80}, ProtocolHTTP}},
		{"appProtocol h2c", "10.96.0.10:9090", &vipTarget{upstreamKey{"shop", "web", 9090}, ProtocolHTTP2}},
		{"clusterset IP", "10.97.0.10:80", &vipTarget{upstreamKey{"shop", "web", 80}, ProtocolHTTP}},
		{"tcp port name", "10.96.0.11:5432", &vipTarget{upstreamKey{"shop", "db", 5432}, ProtocolTCP}},
		{"good port of a bad entry", "10.96.0.12:50051", &vipTarget{upstreamKey{"shop", "bad", 50051}, ProtocolGRPC}},
		{"UDP port", "10.96.0.10:53", nil},
		{"unknown port", "10.96.0.10:81", nil},
		{"unknown IP", "10.96.0.99:80", nil},
		{"nameless entry", "10.96.0.13:80", nil},
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
	for _, want := range []string{`10.96.0.300`, `port 70000`, `no namespace or name`, `is also shop/db`} {
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
// leaves the directory is removed and its endpoint watch ends; the other
// stays; the port coming back makes a new one.
func TestTransparentUpstreamPruned(t *testing.T) {
	rec := &watchRecorder{ended: map[string]bool{}}
	reg := imetrics.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	s := &Sidecar{cfg: Config{Registry: reg, Endpoints: rec, NoActiveChecks: true}, m: m, log: slog.New(slog.DiscardHandler)}
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
	web := VirtualService{Namespace: "shop", Name: "web", IPs: []string{"10.96.0.10"}, Ports: []ServicePort{{Name: "http", Port: 80}}}
	db := VirtualService{Namespace: "shop", Name: "db", IPs: []string{"10.96.0.11"}, Ports: []ServicePort{{Name: "tcp", Port: 5432}}}
	tr.apply([]VirtualService{web, db})
	for _, dst := range []string{"10.96.0.10:80", "10.96.0.11:5432"} {
		tg, ok := tr.lookup(netip.MustParseAddrPort(dst))
		if !ok || tr.upstream(tg) == nil {
			t.Fatalf("no upstream for %s", dst)
		}
	}
	first := tr.upstreamList()
	if len(first) != 2 {
		t.Fatalf("%d upstreams, want 2", len(first))
	}

	tr.apply([]VirtualService{db}) // web is deleted
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
	tg, _ := tr.lookup(netip.MustParseAddrPort("10.96.0.10:80"))
	if u := tr.upstream(tg); u == nil || slices.Contains(first, u) {
		t.Fatalf("web's upstream after it came back: %v, want a new one", u)
	}
}
