package balancer

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/sidecar/health"
)

func targets(g *health.Group, prio, n int) []*Target {
	var ts []*Target
	for i := range n {
		name := fmt.Sprintf("p%d-%d", prio, i)
		t := &Target{Name: name, Priority: prio, Outlier: g.Add(name)}
		t.Ready.Store(true)
		ts = append(ts, t)
	}
	return ts
}

func TestLoadsShiftGraduallyWithOverprovisioning(t *testing.T) {
	tests := []struct {
		name    string
		healthy [2]int // of 10 and 10
		want    []float64
	}{
		{"all healthy", [2]int{10, 10}, []float64{1, 0}},
		{"80% local still carries everything", [2]int{8, 10}, []float64{1, 0}},
		{"half local", [2]int{5, 10}, []float64{0.7, 0.3}},
		{"one local", [2]int{1, 10}, []float64{0.14, 0.86}},
		{"no local", [2]int{0, 10}, []float64{0, 1}},
		{"both degraded: normalised", [2]int{2, 3}, []float64{0.4, 0.6}},
		{"nothing healthy: panic", [2]int{0, 0}, []float64{0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := health.NewGroup(health.Config{})
			ts := append(targets(g, 0, 10), targets(g, 1, 10)...)
			for i := tt.healthy[0]; i < 10; i++ {
				ts[i].Ready.Store(false)
			}
			for i := tt.healthy[1]; i < 10; i++ {
				ts[10+i].Ready.Store(false)
			}
			p := New(0)
			p.Set(ts)
			got := p.Loads(time.Now())
			for i := range tt.want {
				if math.Abs(got[i]-tt.want[i]) > 1e-9 {
					t.Fatalf("loads %v, want %v", got, tt.want)
				}
			}
		})
	}
}

func TestPickFollowsLoads(t *testing.T) {
	g := health.NewGroup(health.Config{})
	ts := append(targets(g, 0, 2), targets(g, 1, 2)...)
	p := New(0)
	p.Set(ts)
	count := func() (remote int) {
		for range 10_000 {
			if p.Pick(time.Now(), nil).Priority == 1 {
				remote++
			}
		}
		return remote
	}
	if r := count(); r != 0 {
		t.Fatalf("%d of 10000 picks remote with all local healthy", r)
	}
	ts[0].Ready.Store(false) // half local: 70% local, 30% remote
	if r := count(); r < 2700 || r > 3300 {
		t.Fatalf("%d of 10000 picks remote with half local healthy, want ~3000", r)
	}
	ts[1].Ready.Store(false)
	if r := count(); r != 10_000 {
		t.Fatalf("%d of 10000 picks remote with no local healthy", r)
	}
	ts[0].Ready.Store(true)
	ts[1].Ready.Store(true) // failback
	if r := count(); r != 0 {
		t.Fatalf("%d of 10000 picks remote after failback", r)
	}
}

func TestPickExcludesTriedAndMovesToNextPriority(t *testing.T) {
	g := health.NewGroup(health.Config{})
	ts := append(targets(g, 0, 2), targets(g, 1, 1)...)
	p := New(0)
	p.Set(ts)
	var tried []*Target
	for range 3 {
		tg := p.Pick(time.Now(), tried)
		if tg == nil {
			t.Fatalf("nil pick after %d", len(tried))
		}
		for _, x := range tried {
			if x == tg {
				t.Fatalf("picked %s twice", tg.Name)
			}
		}
		tried = append(tried, tg)
	}
	if tried[2].Priority != 1 {
		t.Errorf("third attempt went to priority %d, want 1", tried[2].Priority)
	}
	if tg := p.Pick(time.Now(), tried); tg != nil {
		t.Errorf("picked %s with everything tried", tg.Name)
	}
}

func TestPanicModePicksUnavailable(t *testing.T) {
	g := health.NewGroup(health.Config{})
	ts := targets(g, 0, 2)
	for _, x := range ts {
		x.Ready.Store(false)
	}
	p := New(0)
	p.Set(ts)
	if tg := p.Pick(time.Now(), nil); tg == nil {
		t.Fatal("no pick in panic mode")
	}
}

func TestP2CPrefersFasterAndLessLoaded(t *testing.T) {
	g := health.NewGroup(health.Config{})
	ts := targets(g, 0, 2)
	ts[0].End(10*time.Millisecond, true) // End without Begin only feeds the EWMA here
	ts[0].inflight.Store(0)
	ts[1].End(time.Millisecond, true)
	ts[1].inflight.Store(0)
	p := New(0)
	p.Set(ts)
	fast := 0
	for range 1000 {
		if p.Pick(time.Now(), nil) == ts[1] {
			fast++
		}
	}
	if fast != 1000 { // with two candidates P2C always compares both
		t.Fatalf("faster endpoint picked %d of 1000 times", fast)
	}
	ts[1].inflight.Store(20) // 1ms*21 > 10ms*1
	if p.Pick(time.Now(), nil) != ts[0] {
		t.Fatal("loaded fast endpoint still preferred")
	}
}

func TestEWMA(t *testing.T) {
	var tg Target
	tg.Begin()
	tg.End(10*time.Millisecond, true)
	if tg.Latency() != 10*time.Millisecond || tg.Inflight() != 0 {
		t.Fatalf("latency %s inflight %d", tg.Latency(), tg.Inflight())
	}
	tg.Begin()
	tg.End(20*time.Millisecond, true)
	if want := 13 * time.Millisecond; tg.Latency() != want {
		t.Fatalf("latency %s, want %s", tg.Latency(), want)
	}
	tg.Begin()
	tg.End(time.Hour, false) // failures do not feed the EWMA
	if want := 13 * time.Millisecond; tg.Latency() != want {
		t.Fatalf("latency %s after a failure, want %s", tg.Latency(), want)
	}
}

// TestSetOverprovisioning: a service's FailoverPolicy replaces the factor
// on a live picker; 0 restores the default.
func TestSetOverprovisioning(t *testing.T) {
	g := health.NewGroup(health.Config{})
	ts := append(targets(g, 0, 10), targets(g, 1, 10)...)
	for _, tg := range ts[:5] {
		tg.Ready.Store(false) // half local
	}
	p := New(0)
	p.Set(ts)
	now := time.Now()
	for _, tt := range []struct {
		f    float64
		want float64 // local share
	}{{0, 0.7}, {2, 1}, {1, 0.5}, {0, 0.7}} {
		p.SetOverprovisioning(tt.f)
		if got := p.Loads(now)[0]; math.Abs(got-tt.want) > 1e-9 {
			t.Errorf("factor %v: local share %v, want %v", tt.f, got, tt.want)
		}
	}
	if !p.HasAvailable(now) || p.Empty() {
		t.Error("HasAvailable false or Empty true with available targets")
	}
	for _, tg := range ts {
		tg.Ready.Store(false)
	}
	if p.HasAvailable(now) {
		t.Error("HasAvailable with nothing ready")
	}
	if !New(0).Empty() {
		t.Error("new picker not empty")
	}
}

// TestAvoidedTargetIsTriedAgain: a target whose last answers were slow is
// avoided while they are fresh, and tried again once its unfed cost has
// decayed below a busy peer's (decayTau).
func TestAvoidedTargetIsTriedAgain(t *testing.T) {
	g := health.NewGroup(health.Config{})
	ts := targets(g, 0, 2)
	slow, fast := ts[0], ts[1]
	for range 10 {
		slow.Begin()
		slow.End(10*time.Millisecond, true)
		fast.Begin()
		fast.End(time.Millisecond, true)
	}
	p := New(0)
	p.Set(ts)
	picks := func(now time.Time) int {
		n := 0
		for range 100 {
			if p.Pick(now, nil) == slow {
				n++
			}
		}
		return n
	}
	now := time.Now()
	if n := picks(now); n != 0 {
		t.Errorf("fresh costs 10ms vs 1ms: the slow target got %d of 100 picks, want 0", n)
	}
	// The fast one keeps being fed; the slow one is not. After 4 time
	// constants its cost is 10ms·e⁻⁴ ≈ 0.18ms, below the fast one's 1ms.
	later := now.Add(4 * decayTau)
	fast.fed.Store(later.UnixNano())
	if n := picks(later); n != 100 {
		t.Errorf("after 4 decay time constants unfed: the slow target got %d of 100 picks, want all", n)
	}
}
