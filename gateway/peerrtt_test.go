package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/gateway/faultnet"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/internal/testutil"
)

func TestRTTMoved(t *testing.T) {
	for _, tc := range []struct {
		name      string
		last, cur map[string]int64
		want      bool
	}{
		{"nothing either time", map[string]int64{}, map[string]int64{}, false},
		{"unchanged", map[string]int64{"west": 1000}, map[string]int64{"west": 1000}, false},
		{"cluster appears", map[string]int64{}, map[string]int64{"west": 1000}, true},
		{"cluster disappears", map[string]int64{"west": 1000}, map[string]int64{}, true},
		{"cluster replaced", map[string]int64{"west": 1000}, map[string]int64{"north": 1000}, true},
		{"30% and 300us up", map[string]int64{"west": 1000}, map[string]int64{"west": 1300}, true},
		{"30% and 300us down", map[string]int64{"west": 1000}, map[string]int64{"west": 700}, true},
		{"15% and 150us", map[string]int64{"west": 1000}, map[string]int64{"west": 1150}, false},
		{"exactly 20% and 200us", map[string]int64{"west": 1000}, map[string]int64{"west": 1200}, false},
		{"40% but only 200us", map[string]int64{"west": 500}, map[string]int64{"west": 700}, false},
		{"60% but only 150us", map[string]int64{"west": 250}, map[string]int64{"west": 400}, false},
		{"5 ms but only 10%", map[string]int64{"west": 50000}, map[string]int64{"west": 55000}, false},
		{"one of two moved", map[string]int64{"west": 1000, "north": 30000}, map[string]int64{"west": 1000, "north": 40000}, true},
		{"from zero", map[string]int64{"west": 0}, map[string]int64{"west": 201}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := rttMoved(tc.last, tc.cur); got != tc.want {
				t.Fatalf("rttMoved(%v, %v) = %v, want %v", tc.last, tc.cur, got, tc.want)
			}
		})
	}
}

// fakeRTTSink is what a publisher under test measures and writes to.
type fakeRTTSink struct {
	mu      sync.Mutex
	rtts    map[string]time.Duration
	fail    error
	writes  []map[string]int64
	at      []time.Time
	results map[string]int
}

func (f *fakeRTTSink) set(rtts map[string]time.Duration, fail error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rtts, f.fail = rtts, fail
}

func (f *fakeRTTSink) measure() map[string]time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.rtts)
}

func (f *fakeRTTSink) write(_ context.Context, rtts map[string]int64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return f.fail
	}
	f.writes = append(f.writes, maps.Clone(rtts))
	f.at = append(f.at, time.Now())
	return nil
}

func (f *fakeRTTSink) times() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.at...)
}

func (f *fakeRTTSink) count(result string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.results[result]++
}

func (f *fakeRTTSink) written() []map[string]int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]map[string]int64(nil), f.writes...)
}

// TestRTTPublisher drives the publisher on synctest's fake clock: what it
// writes and when, what it leaves alone, how it reports failures, and that
// it stops with its context.
func TestRTTPublisher(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const iv = 5 * time.Second
		sink := &fakeRTTSink{results: map[string]int{}}
		logs := &testutil.SyncBuffer{}
		p := &rttPublisher{
			interval: iv, measure: sink.measure, write: sink.write, count: sink.count, last: map[string]int64{},
			log: slog.New(slog.NewTextHandler(logs, nil)),
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() { p.run(ctx); close(done) }()
		// Checks happen half an interval after each tick.
		time.Sleep(iv / 2)
		step := func(n int) { time.Sleep(time.Duration(n) * iv) }
		var want []map[string]int64
		check := func(what string) {
			t.Helper()
			if diff := cmp.Diff(want, sink.written()); diff != "" {
				t.Fatalf("%s: writes (-want +got):\n%s", what, diff)
			}
		}
		ms := func(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }

		step(3)
		check("nothing measured: nothing written, not even {}")

		sink.set(map[string]time.Duration{"west": ms(1)}, nil)
		step(1)
		want = append(want, map[string]int64{"west": 1000})
		check("west appears")

		sink.set(map[string]time.Duration{"west": ms(1.15)}, nil)
		step(3)
		check("15% is jitter")

		sink.set(map[string]time.Duration{"west": ms(1.3)}, nil)
		step(1)
		want = append(want, map[string]int64{"west": 1300})
		check("30% and 300us")

		sink.set(map[string]time.Duration{"west": ms(1.3), "north": ms(35.0124)}, nil)
		step(1)
		want = append(want, map[string]int64{"west": 1300, "north": 35012})
		check("north appears, rounded to microseconds")

		sink.set(map[string]time.Duration{"west": ms(1.45), "north": ms(38)}, nil) // 11%, 8.5%
		step(2)
		check("small moves on both")

		// Moving every half interval: at most one write per interval.
		start := len(sink.written())
		for i := range 6 {
			sink.set(map[string]time.Duration{"west": ms(float64(10 * (i + 1))), "north": ms(38)}, nil)
			time.Sleep(iv / 2)
		}
		at := sink.times()[start:]
		if len(at) == 0 || len(at) > 3 {
			t.Fatalf("%d writes in 3 intervals of changes, want 1..3", len(at))
		}
		for i := 1; i < len(at); i++ {
			if d := at[i].Sub(at[i-1]); d < iv {
				t.Fatalf("writes %s apart, want at least %s", d, iv)
			}
		}
		want = sink.written()

		sink.set(map[string]time.Duration{"north": ms(38)}, nil)
		step(1)
		want = append(want, map[string]int64{"north": 38000})
		check("west disappears")

		// Failures: retried every interval, logged once a minute, counted.
		sink.set(map[string]time.Duration{"north": ms(80)}, errors.New("services \"fedmesh-gateway\" not found"))
		step(36) // three minutes
		check("nothing written while failing")
		if n := strings.Count(logs.String(), "cannot publish peer RTTs"); n != 3 {
			t.Fatalf("%d failure logs in 3 minutes of failures every 5s, want 3:\n%s", n, logs.String())
		}
		if !strings.Contains(logs.String(), "failures=12") || !strings.Contains(logs.String(), `not found`) {
			t.Errorf("failure logs lack the count and the error:\n%s", logs.String())
		}
		sink.set(map[string]time.Duration{"north": ms(80)}, nil)
		step(1)
		want = append(want, map[string]int64{"north": 80000})
		check("recovered")
		if !strings.Contains(logs.String(), "works again") {
			t.Errorf("no recovery log:\n%s", logs.String())
		}
		sink.mu.Lock()
		results := maps.Clone(sink.results)
		sink.mu.Unlock()
		if results["error"] != 36 || results["ok"] != len(want) {
			t.Errorf("counted %v, want 36 errors and %d ok", results, len(want))
		}

		cancel()
		synctest.Wait()
		select {
		case <-done:
		default:
			t.Fatal("publisher still running after its context ended")
		}
	})
}

// TestPeerRTTOnService runs two real gateways, west publishing on a real
// kube-apiserver, with 100 ms of delay each way between them: the RTT
// annotation appears on the Service with a plausible value next to the
// other annotations, is not rewritten while the RTT holds, loses east when
// the link is cut and gets it back after the heal; writes that fail (no
// Service yet) are logged once.
func TestPeerRTTOnService(t *testing.T) {
	checkLeaks(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"west"}})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	kube := kubernetes.NewForConfigOrDie(cp.Cluster("west").Config)
	const ns = controlplane.SystemNamespace

	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	const iv = 200 * time.Millisecond
	// 100 ms each way: far above loopback jitter, so a steady RTT does not
	// move by 20%.
	west, _, relay := relayedPair(t, doms, &StaticCatalog{}, faultnet.Faults{Delay: 100 * time.Millisecond},
		func(c *Config) { c.PublishRTT = &RTTPublication{Client: kube, Namespace: ns, Interval: iv} })
	waitFor(t, "west connected to east", 20*time.Second, func() bool { return west.ClusterUp("east") })

	failures := func() float64 {
		return metric(t, west.reg, "fedmesh_gateway_rtt_publications_total", map[string]string{"result": "error"})
	}
	published := func() float64 {
		return metric(t, west.reg, "fedmesh_gateway_rtt_publications_total", map[string]string{"result": "ok"})
	}
	waitFor(t, "failed writes without the Service", 20*time.Second, func() bool { return failures() >= 3 })
	if n := strings.Count(west.logs.String(), "cannot publish peer RTTs"); n != 1 {
		t.Fatalf("%d failure logs, want 1 (once a minute):\n%s", n, west.logs.String())
	}

	const egress = "fedmesh-gateway.fedmesh-system.svc:15444"
	if _, err := kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: ServiceName, Annotations: map[string]string{"multicluster.fedmesh.dev/egress-addresses": egress}},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "egress", Protocol: corev1.ProtocolTCP, Port: 15444}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	annotation := func() (map[string]int64, *corev1.Service) {
		t.Helper()
		svc, err := kube.CoreV1().Services(ns).Get(ctx, ServiceName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		v, ok := svc.Annotations[AnnotationPeerRTT]
		if !ok {
			return nil, svc
		}
		var m map[string]int64
		if err := json.Unmarshal([]byte(v), &m); err != nil {
			t.Fatalf("annotation %s=%q: %v", AnnotationPeerRTT, v, err)
		}
		return m, svc
	}
	var rtts map[string]int64
	var svc *corev1.Service
	waitFor(t, "the RTT annotation", 20*time.Second, func() bool { rtts, svc = annotation(); return rtts != nil })
	if us, ok := rtts["east"]; !ok || len(rtts) != 1 || us < 200_000 || us > 400_000 {
		t.Fatalf("annotation %v, want east between 200 and 400 ms (100 ms each way)", rtts)
	}
	if svc.Annotations["multicluster.fedmesh.dev/egress-addresses"] != egress {
		t.Errorf("the patch lost the egress annotation: %v", svc.Annotations)
	}
	// The publisher logs and counts a write after the API server took it:
	// wait for both before taking the baseline below.
	waitFor(t, "the recovery log and the write counted", 5*time.Second, func() bool {
		return strings.Contains(west.logs.String(), "works again") && published() >= 1
	})

	// Steady RTT: ten intervals without a write.
	rv, writes := svc.ResourceVersion, published()
	time.Sleep(10 * iv)
	if _, now := annotation(); now.ResourceVersion != rv || published() != writes {
		t.Fatalf("rewritten while the RTT held: resourceVersion %s -> %s, writes %v -> %v; annotation %s (measuring %v)",
			rv, now.ResourceVersion, writes, published(), now.Annotations[AnnotationPeerRTT], west.PeerRTTs())
	}

	// Cut: east has no live link, so it leaves the annotation; healed, it
	// comes back.
	if err := relay.SetFaults(faultnet.Faults{Delay: 100 * time.Millisecond, Partition: true}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "east gone from the annotation", 20*time.Second, func() bool { rtts, _ = annotation(); return rtts != nil && len(rtts) == 0 })
	if err := relay.SetFaults(faultnet.Faults{Delay: 100 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "east back in the annotation", 20*time.Second, func() bool { rtts, _ = annotation(); return rtts["east"] >= 200_000 })
}
