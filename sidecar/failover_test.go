package sidecar_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// TestFailoverThroughGateways runs the whole path on loopback with real
// SVIDs: a client sidecar in west, two west backends (app + sidecar), two
// east backends behind a real west/east gateway pair. Under steady load of
// GETs, every west backend is killed; no request may fail and traffic must
// move to east; when the west backends come back, traffic must move home.
// The same over HTTP/2 (an http2 upstream; HTTP/2 between the sidecars,
// through the gateways).
func TestFailoverThroughGateways(t *testing.T) {
	testutil.CheckGoroutines(t)
	for _, proto := range []string{sidecar.ProtocolHTTP, sidecar.ProtocolHTTP2} {
		t.Run(proto, func(t *testing.T) { testFailoverThroughGateways(t, proto) })
	}
}

func testFailoverThroughGateways(t *testing.T, proto string) {
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, east := doms["west"], doms["east"]

	w1 := startBackend(t, west, "west-1", []spiffeid.TrustDomain{east.TD}, nil)
	w2 := startBackend(t, west, "west-2", []spiffeid.TrustDomain{east.TD}, nil)
	e1 := startBackend(t, east, "east-1", []spiffeid.TrustDomain{west.TD}, nil)
	e2 := startBackend(t, east, "east-2", []spiffeid.TrustDomain{west.TD}, nil)

	eastCat := &gateway.StaticCatalog{}
	eastCat.Set("shop", "checkout", 8080, gwEndpoints(e1, e2)...)
	eastGW := startGateway(t, east, eastCat, nil, []spiffeid.TrustDomain{west.TD})
	westGW := startGateway(t, west, &gateway.StaticCatalog{}, []gateway.Peer{{
		Cluster: "east", TrustDomain: east.TD, Addrs: []string{eastGW.TunnelAddr().String()},
	}}, nil)
	waitFor(t, "west gateway connected to east", 10*time.Second, func() bool { return westGW.ClusterUp("east") })

	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{
		{Name: "east", Gateway: true, RTT: endpoints.Duration(2 * time.Millisecond), Endpoints: []endpoints.Endpoint{{Name: "east-1", Ready: true}, {Name: "east-2", Ready: true}}},
		{Name: "west", Endpoints: eps(w1, w2)},
	}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Federated: []spiffeid.TrustDomain{east.TD},
		Source: west.Source(t, "web"), Endpoints: src, GatewayEgress: westGW.EgressAddr().String(),
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0", Protocol: proto}},
	})
	url := "http://" + client.UpstreamAddr(0).String() + "/"
	waitFor(t, "client sidecar ready", 5*time.Second, client.Ready)

	stop := make(chan struct{})
	results := loadProto(url, proto == sidecar.ProtocolHTTP2, 8, 2*time.Millisecond, 40_000, stop)
	phase := func(d time.Duration) time.Time { time.Sleep(d); return time.Now() }

	// Kill once west has served some of the load (a fixed sleep was too
	// short on a loaded machine), and never before 500 ms of it.
	time.Sleep(500 * time.Millisecond)
	waitFor(t, "west serving the load", 10*time.Second, func() bool { return w1.app.hits.Load()+w2.app.hits.Load() >= 20 })
	killedAt := time.Now()
	w1.kill()
	w2.kill()
	restartedAt := phase(1500 * time.Millisecond)
	w1.restart()
	w2.restart()
	endAt := phase(2500 * time.Millisecond)
	close(stop)
	all := <-results

	var failed, beforeWest, beforeOther, duringEast, afterWest int
	var firstEast time.Time
	var lastBy []string
	for _, r := range all {
		if r.err != nil || r.status != 200 {
			failed++
			if failed <= 5 {
				t.Errorf("request at +%s failed: status %d, err %v", r.at.Sub(killedAt), r.status, r.err)
			}
			continue
		}
		isWest := strings.HasPrefix(r.by, "west-")
		switch {
		case r.at.Before(killedAt):
			if isWest {
				beforeWest++
			} else {
				beforeOther++
			}
		case r.at.Before(restartedAt):
			if !isWest {
				duringEast++
				if firstEast.IsZero() || r.at.Before(firstEast) {
					firstEast = r.at
				}
			}
		case r.at.After(endAt.Add(-500 * time.Millisecond)):
			lastBy = append(lastBy, r.by)
			if isWest {
				afterWest++
			}
		}
	}
	t.Logf("%d requests: before kill %d west / %d other; %d east while west was down (first %s after the kill); last 500ms %d of %d west",
		len(all), beforeWest, beforeOther, duringEast, firstEast.Sub(killedAt), afterWest, len(lastBy))
	if failed > 0 {
		t.Fatalf("%d of %d requests failed", failed, len(all))
	}
	if beforeWest == 0 || beforeOther > 0 {
		t.Errorf("before the kill: %d west, %d elsewhere; want all west", beforeWest, beforeOther)
	}
	if duringEast == 0 {
		t.Errorf("no request was served by east while west was down")
	}
	if len(lastBy) == 0 || afterWest != len(lastBy) {
		t.Errorf("after west came back: %d of the last %d requests served by west, want all", afterWest, len(lastBy))
	}
	if n := metricSum(t, client.reg, "fedmesh_sidecar_failovers_total"); n == 0 {
		t.Errorf("fedmesh_sidecar_failovers_total is 0")
	}
}

// TestBadRemotePodThroughGatewayEjectedAlone: east's three pods are reached
// through the gateways, each named in the tunnel header (the endpoint set
// carries their addresses, as the discovery API does). One answers 500:
// no request fails (each is retried on another pod), that pod alone is
// ejected, and east keeps serving from the other two: the cluster is not
// ejected for one bad pod behind its gateway.
func TestBadRemotePodThroughGatewayEjectedAlone(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, east := doms["west"], doms["east"]
	e1 := startBackend(t, east, "east-1", []spiffeid.TrustDomain{west.TD}, nil)
	e2 := startBackend(t, east, "east-2", []spiffeid.TrustDomain{west.TD}, nil)
	e3 := startBackend(t, east, "east-3", []spiffeid.TrustDomain{west.TD}, nil)
	e2.app.fail.Store(500)

	eastCat := &gateway.StaticCatalog{}
	eastCat.Set("shop", "checkout", 8080, gwEndpoints(e1, e2, e3)...)
	eastGW := startGateway(t, east, eastCat, nil, []spiffeid.TrustDomain{west.TD})
	westGW := startGateway(t, west, &gateway.StaticCatalog{}, []gateway.Peer{{
		Cluster: "east", TrustDomain: east.TD, Addrs: []string{eastGW.TunnelAddr().String()},
	}}, nil)
	waitFor(t, "west gateway connected to east", 10*time.Second, func() bool { return westGW.ClusterUp("east") })

	var remote []endpoints.Endpoint
	for _, b := range []*backend{e1, e2, e3} {
		remote = append(remote, endpoints.Endpoint{Name: "east/" + b.inbound, Addr: b.inbound, Ready: true})
	}
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{
		{Name: "west"},
		{Name: "east", Gateway: true, RTT: endpoints.Duration(2 * time.Millisecond), Endpoints: remote},
	}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Federated: []spiffeid.TrustDomain{east.TD},
		Source: west.Source(t, "web"), Endpoints: src, GatewayEgress: westGW.EgressAddr().String(),
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client sidecar ready", 5*time.Second, client.Ready)

	stop := make(chan struct{})
	const workers = 4
	results := load("http://"+client.UpstreamAddr(0).String()+"/", workers, 2*time.Millisecond, 3000, stop)
	time.Sleep(2 * time.Second) // the load's length, not a wait for anything
	close(stop)
	all := <-results
	by := map[string]int{}
	var late []string
	cut := time.Now().Add(-700 * time.Millisecond)
	for _, r := range all {
		if r.err != nil || r.status != 200 {
			t.Fatalf("request failed: status %d, err %v", r.status, r.err)
		}
		by[r.by]++
		if r.at.After(cut) {
			late = append(late, r.by)
		}
	}
	t.Logf("%d requests served by %v; e2 got %d", len(all), by, e2.app.hits.Load())
	if by["east-1"] == 0 || by["east-3"] == 0 || by["east-2"] != 0 {
		t.Errorf("served by %v; want east-1 and east-3, never the failing east-2", by)
	}
	// The bad pod is tried until Consecutive5xx answers in a row eject it,
	// with at most workers-1 other requests already on their way to it; the
	// first ejection lasts 1 s and the second 2 s, so a load of 2 s sees at
	// most two such rounds, whatever the machine's speed.
	most := int64(2 * (health.DefaultConsecutive5xx + workers - 1))
	if n := e2.app.hits.Load(); n < health.DefaultConsecutive5xx || n > most {
		t.Errorf("the failing pod got %d of %d requests; want %d to %d: tried until %d consecutive 500s eject it, at most twice in 2 s",
			n, len(all), health.DefaultConsecutive5xx, most, health.DefaultConsecutive5xx)
	}
	// Ejection counts, not the ejected flag at this instant: on a slow
	// machine the bad pod's 1 s or 2 s ejection may just have ended.
	for _, s := range client.State().Upstreams[0].Targets {
		bad := s.Name == "east/"+e2.inbound
		if got := s.Outlier.Ejections > 0; got != bad {
			t.Errorf("target %s was ejected: %v (%+v), want %v", s.Name, got, s.Outlier, bad)
		}
	}
	if len(late) == 0 {
		t.Error("no request in the last 700 ms: east stopped serving")
	}
}

// TestGatewayRefusalsCounted: the gateway's refusals reach the sidecar
// through the mTLS handshake it sends with the tunnel header (DialEarly):
// a service east does not export is counted as not_exported, and a cluster
// the local gateway has no peer for as unknown_cluster, which ejects every
// target of that cluster at once.
func TestGatewayRefusalsCounted(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, east := doms["west"], doms["east"]
	eastGW := startGateway(t, east, &gateway.StaticCatalog{}, nil, []spiffeid.TrustDomain{west.TD})
	westGW := startGateway(t, west, &gateway.StaticCatalog{}, []gateway.Peer{{
		Cluster: "east", TrustDomain: east.TD, Addrs: []string{eastGW.TunnelAddr().String()},
	}}, nil)
	waitFor(t, "west gateway connected to east", 10*time.Second, func() bool { return westGW.ClusterUp("east") })
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{
		{Name: "east", Gateway: true, Endpoints: []endpoints.Endpoint{{Name: "east/10.0.0.1:8080", Addr: "10.0.0.1:8080", Ready: true}}},
		{Name: "north", Gateway: true, Endpoints: []endpoints.Endpoint{{Name: "north/10.1.0.1:8080", Addr: "10.1.0.1:8080", Ready: true}, {Name: "north/10.1.0.2:8080", Addr: "10.1.0.2:8080", Ready: true}}},
	}})
	client := startSidecar(t, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Federated: []spiffeid.TrustDomain{east.TD},
		Source: west.Source(t, "web"), Endpoints: src, GatewayEgress: westGW.EgressAddr().String(), NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(t, "client sidecar ready", 5*time.Second, client.Ready)
	resp, err := http.Get("http://" + client.UpstreamAddr(0).String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("status %d, want 503 (no cluster can serve)", resp.StatusCode)
	}
	waitFor(t, "refusals counted", 5*time.Second, func() bool {
		return metricSum(t, client.reg, "fedmesh_sidecar_tunnel_refusals_total") >= 2
	})
	got := map[string]float64{}
	for _, k := range [][2]string{{"east", "not_exported"}, {"north", "unknown_cluster"}} {
		got[k[0]+"/"+k[1]] = client.reg.Value("fedmesh_sidecar_tunnel_refusals_total", map[string]string{"cluster": k[0], "code": k[1]})
	}
	if got["east/not_exported"] < 1 || got["north/unknown_cluster"] < 1 {
		t.Errorf("refusals by cluster/code %v; want east/not_exported and north/unknown_cluster", got)
	}
	for _, tg := range client.State().Upstreams[0].Targets {
		if tg.Cluster == "north" && !tg.Outlier.Ejected {
			t.Errorf("north target %s not ejected after unknown_cluster", tg.Name)
		}
	}
}
