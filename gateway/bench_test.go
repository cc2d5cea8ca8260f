package gateway

import (
	"slices"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/gateway/faultnet"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/gateway/peer"
)

// BenchmarkDeadPeerDetection measures the dead-peer bound at the default
// --dead-after (1 s): two real gateways on loopback with a fault relay
// between them, which partitions the link; the figure is the time from the
// partition to west's link reported down (polled every millisecond), over
// 10 partitions per iteration, each healed and the link back up before the
// next. TestFaultRelay checks the same with a tolerance; this is where the
// figure itself comes from (make bench).
func BenchmarkDeadPeerDetection(b *testing.B) {
	doms := gatewaytest.Start(b, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, _, relay := relayedPair(b, doms, &StaticCatalog{}, faultnet.Faults{}, nil)
	up := func() bool { return west.ClusterUp("east") }
	poll := func(what string, want bool) time.Duration {
		start := time.Now()
		for up() != want {
			if time.Since(start) > 10*time.Second {
				b.Fatalf("%s: not within 10s", what)
			}
			time.Sleep(time.Millisecond)
		}
		return time.Since(start)
	}
	poll("link up", true)
	var samples []time.Duration
	for b.Loop() {
		for range 10 {
			// A few RTT samples on the fresh link first, as in steady state.
			time.Sleep(200 * time.Millisecond)
			if err := relay.SetFaults(faultnet.Faults{Partition: true}); err != nil {
				b.Fatal(err)
			}
			samples = append(samples, poll("dead peer detected", false))
			if err := relay.SetFaults(faultnet.Faults{}); err != nil {
				b.Fatal(err)
			}
			poll("link back after the heal", true)
		}
	}
	slices.Sort(samples)
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	b.ReportMetric(ms(samples[(len(samples)-1)/2]), "detect-p50-ms")
	b.ReportMetric(ms(samples[len(samples)-1]), "detect-max-ms")
	b.ReportMetric(ms(peer.DefaultDeadAfter), "dead-after-ms")
}
