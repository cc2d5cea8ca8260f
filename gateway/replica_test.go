package gateway

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway/faultnet"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
)

// TestReplicaKilledMidLoad: east runs two active-active replicas and west
// spreads streams over both. One replica crashes (its sockets vanish with no
// CONNECTION_CLOSE, as when the process is killed) while clients open new
// connections in a loop and long-lived ones keep talking: every connection
// opened after the crash succeeds, on the surviving replica, without any
// control-plane change.
//
// Two ways to die: "killed" closes the replica's sockets (the kernel then
// answers with ICMP port unreachable, which quic-go notices at once);
// "silent" partitions it behind a fault relay, as when its node vanishes,
// so only the dead-peer bound can tell.
func TestReplicaKilledMidLoad(t *testing.T) {
	for _, mode := range []string{"killed", "silent"} {
		t.Run(mode, func(t *testing.T) { replicaKilled(t, mode) })
	}
}

func replicaKilled(t *testing.T, mode string) {
	checkLeaks(t)
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	echo := newLineEcho(t)
	cat := &StaticCatalog{}
	cat.Set("shop", "checkout", 80, echo.endpoint())
	fed := func(c *Config) { c.Federated = []spiffeid.TrustDomain{doms["west"].TD} }
	e0 := startGateway(t, doms["east"], cat, nil, fed)
	e1 := startGateway(t, doms["east"], cat, nil, fed)
	relay, err := faultnet.New("127.0.0.1:0", e0.TunnelAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	west := startGateway(t, doms["west"], &StaticCatalog{}, []Peer{{
		Cluster: "east", TrustDomain: doms["east"].TD, Addrs: []string{relay.Addr().String(), e1.TunnelAddr().String()},
	}}, nil)
	client := newClient(t, doms["west"], "web", west)
	waitFor(t, "both replicas connected", 10*time.Second, func() bool {
		n := 0
		for _, r := range west.State().Clusters[0].Replicas {
			if r.Up {
				n++
			}
		}
		return n == 2
	})

	type result struct {
		start, end time.Time
		err        error
	}
	var (
		mu      sync.Mutex
		results []result
		stop    atomic.Bool
		wg      sync.WaitGroup
	)
	for w := range 4 { // new connections in a loop
		// Half of them write before the answer: their first bytes go
		// with the header, and are sent again when the gateway retries
		// on the other replica.
		dial := client.Dial
		if w%2 == 1 {
			dial = client.DialEarly
		}
		wg.Go(func() {
			for i := 0; i < 10_000 && !stop.Load(); i++ {
				r := result{start: time.Now()}
				c, err := dial(ctxT(t, 10*time.Second), req(80))
				if err == nil {
					err = roundTrip(c, "new")
					c.Close()
				}
				r.end, r.err = time.Now(), err
				mu.Lock()
				results = append(results, r)
				mu.Unlock()
			}
		})
	}
	var longOK, longFailed atomic.Int64
	for range 8 { // long-lived connections
		wg.Go(func() {
			c, err := client.Dial(ctxT(t, 10*time.Second), req(80))
			if err != nil {
				longFailed.Add(1)
				return
			}
			defer c.Close()
			for i := 0; i < 100_000 && !stop.Load(); i++ {
				if err := roundTrip(c, "long"); err != nil {
					longFailed.Add(1)
					return
				}
				time.Sleep(time.Millisecond)
			}
			longOK.Add(1)
		})
	}

	// The long-lived connections alone are 8 streams over 2 replicas.
	waitFor(t, "streams open on both replicas", 10*time.Second, func() bool {
		return e0.State().Streams["ingress"] > 0 && e1.State().Streams["ingress"] > 0
	})
	killed := time.Now()
	if mode == "killed" {
		e0.crash()
	} else if err := relay.SetFaults(faultnet.Faults{Partition: true}); err != nil {
		t.Fatal(err)
	}
	// New connections keep coming while west has not noticed, and after:
	// wait for the detection, then for 20 connections opened after it.
	waitFor(t, "the crashed replica reported down", 10*time.Second, func() bool { return !west.State().Clusters[0].Replicas[0].Up })
	detected := time.Now()
	waitFor(t, "20 connections opened after the detection", 10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, r := range results {
			if r.start.After(detected) {
				n++
			}
		}
		return n >= 20
	})
	stop.Store(true)
	wg.Wait()

	var before, after, afterFailed int
	var slowest time.Duration
	for _, r := range results {
		if r.start.Before(killed) {
			before++
			continue
		}
		after++
		if r.err != nil {
			afterFailed++
			t.Errorf("connection opened %s after the crash failed: %v", r.start.Sub(killed).Round(time.Millisecond), r.err)
		}
		slowest = max(slowest, r.end.Sub(r.start))
	}
	t.Logf("%d connections before the crash, %d after (%d failed, slowest %s), crash detected after %s; long-lived: %d survived, %d cut",
		before, after, afterFailed, slowest.Round(time.Millisecond), detected.Sub(killed).Round(time.Millisecond), longOK.Load(), longFailed.Load())
	if slowest > 2*time.Second { // the 1s dead-peer bound, then a retry
		t.Errorf("a connection after the crash took %s", slowest)
	}
	if !west.ClusterUp("east") {
		t.Error("east reported down with one replica alive")
	}
	if r := west.State().Clusters[0].Replicas[0]; r.Up {
		t.Error("the crashed replica is still reported up")
	}
	// Streams of the crashed replica may be cut; those on the other survive.
	if longOK.Load() == 0 {
		t.Error("every long-lived connection was cut")
	}
}
