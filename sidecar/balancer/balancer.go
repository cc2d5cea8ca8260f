// Package balancer chooses the endpoint for each connection or request. It
// is where "keep serving when the own cluster's copies fail" happens on the
// request path: endpoints sit in priorities by locality (own cluster 0,
// remote clusters 1..n by gateway RTT); a priority gets the share of traffic
// its healthy fraction times the overprovisioning factor (1.4, as Envoy)
// covers, and the rest spills to the next priority. So traffic moves to a
// remote cluster gradually as local endpoints are ejected or unready, all
// at once when they are all gone, and back home as they return, with no
// control-plane call.
//
// Within a priority it is power-of-two-choices over an EWMA of latency
// weighted by outstanding requests.
package balancer

import (
	"math"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/fedmesh/fedmesh/sidecar/health"
)

// DefaultOverprovisioning is Envoy's factor.
const DefaultOverprovisioning = 1.4

// ewmaDecay weighs the newest latency sample.
const ewmaDecay = 0.3

// Target is one endpoint as the picker sees it. The owner fills the exported
// fields before handing it to New and may flip Ready at any time.
type Target struct {
	Name     string
	Cluster  string
	Priority int
	// Addr is dialed directly; empty when Gateway is set.
	Addr string
	// Gateway targets stand for a whole remote cluster reached through the
	// local gateway, whose peer picks the pod.
	Gateway bool
	Outlier *health.Outlier
	// Data is the owner's (its connection pool).
	Data any

	Ready    atomic.Bool
	ewma     atomic.Uint64 // float64 bits, nanoseconds
	fed      atomic.Int64  // when ewma was last fed (Unix nanoseconds)
	inflight atomic.Int32
}

// Available is Ready and not ejected.
func (t *Target) Available(now time.Time) bool {
	return t.Ready.Load() && (t.Outlier == nil || !t.Outlier.Ejected(now))
}

// Begin counts an outstanding request; End records its latency.
func (t *Target) Begin() { t.inflight.Add(1) }

// End ends what Begin began, feeding the latency to the EWMA when ok.
func (t *Target) End(latency time.Duration, ok bool) {
	t.inflight.Add(-1)
	if !ok {
		return
	}
	t.fed.Store(time.Now().UnixNano())
	for {
		old := t.ewma.Load()
		o := math.Float64frombits(old)
		n := float64(latency)
		if o != 0 {
			n = o + ewmaDecay*(n-o)
		}
		if t.ewma.CompareAndSwap(old, math.Float64bits(n)) {
			return
		}
	}
}

// Latency is the EWMA of successful requests' latency.
func (t *Target) Latency() time.Duration { return time.Duration(math.Float64frombits(t.ewma.Load())) }

// Inflight is the number of outstanding requests.
func (t *Target) Inflight() int { return int(t.inflight.Load()) }

// score is the P2C cost: the latency EWMA, decayed toward zero while
// nothing feeds it (time constant decayTau), times outstanding requests
// plus one. The decay makes the picker try an endpoint it has avoided
// again after a while: without it an endpoint whose last answers were slow
// (or refusals for overload) would keep that cost, and get no traffic,
// for as long as its peers looked better; with it, it is probed with one
// request and judged afresh (linkerd2-proxy's peak-EWMA decays the same
// way).
func (t *Target) score(now int64) float64 {
	e := math.Float64frombits(t.ewma.Load())
	if age := now - t.fed.Load(); e > 0 && age > 0 {
		e *= math.Exp(-float64(age) / float64(decayTau))
	}
	return (e + 1) * float64(t.inflight.Load()+1)
}

// decayTau is the time constant of an unfed EWMA's decay.
const decayTau = 250 * time.Millisecond

// Picker picks targets. Safe for concurrent use; Set swaps the targets
// without disturbing picks in flight.
type Picker struct {
	overprovision atomic.Uint64 // float64 bits
	prios         atomic.Pointer[[][]*Target]
}

// New returns a picker with the given overprovisioning factor (0 means
// DefaultOverprovisioning).
func New(overprovision float64) *Picker {
	p := &Picker{}
	p.SetOverprovisioning(overprovision)
	p.Set(nil)
	return p
}

// SetOverprovisioning replaces the overprovisioning factor (0 or less means
// DefaultOverprovisioning); picks in flight see the old or the new one.
func (p *Picker) SetOverprovisioning(f float64) {
	if f <= 0 {
		f = DefaultOverprovisioning
	}
	p.overprovision.Store(math.Float64bits(f))
}

// Overprovisioning is the factor in force.
func (p *Picker) Overprovisioning() float64 { return math.Float64frombits(p.overprovision.Load()) }

// HasAvailable reports whether any target is available at now.
func (p *Picker) HasAvailable(now time.Time) bool {
	for _, ts := range *p.prios.Load() {
		for _, t := range ts {
			if t.Available(now) {
				return true
			}
		}
	}
	return false
}

// Empty reports whether the picker has no target at all.
func (p *Picker) Empty() bool { return len(*p.prios.Load()) == 0 }

// Set replaces the targets. Priorities need not be dense: they are ordered.
func (p *Picker) Set(targets []*Target) {
	maxP := -1
	for _, t := range targets {
		maxP = max(maxP, t.Priority)
	}
	byP := make([][]*Target, maxP+1)
	for _, t := range targets {
		byP[t.Priority] = append(byP[t.Priority], t)
	}
	prios := byP[:0]
	for _, ts := range byP {
		if len(ts) > 0 {
			prios = append(prios, ts)
		}
	}
	p.prios.Store(&prios)
}

// Targets returns the current targets by priority (do not modify).
func (p *Picker) Targets() [][]*Target { return *p.prios.Load() }

const maxPrios = 16

// Loads returns the share of traffic each priority gets at now.
func (p *Picker) Loads(now time.Time) []float64 {
	prios := *p.prios.Load()
	var buf [maxPrios]float64
	l := p.loads(prios, now, buf[:0])
	return append([]float64(nil), l...)
}

func (p *Picker) loads(prios [][]*Target, now time.Time, out []float64) []float64 {
	over := p.Overprovisioning()
	total := 0.0
	for i, ts := range prios {
		if i == maxPrios {
			break
		}
		avail := 0
		for _, t := range ts {
			if t.Available(now) {
				avail++
			}
		}
		h := min(1, over*float64(avail)/float64(len(ts)))
		out = append(out, h)
		total += h
	}
	if total == 0 {
		return out // all zero: panic mode
	}
	if total < 1 { // normalise: every healthy target shares all traffic
		for i := range out {
			out[i] /= total
		}
		return out
	}
	remaining := 1.0
	for i, h := range out {
		l := min(remaining, h)
		out[i] = l
		remaining -= l
	}
	return out
}

func tried(t *Target, exclude []*Target) bool {
	for _, e := range exclude {
		if e == t {
			return true
		}
	}
	return false
}

// Pick returns the target for one attempt, never one in exclude (the
// targets already tried for this request). It returns nil when every
// target was tried. A retry thereby moves on within the priority and then
// to the next one. When no target at all is available it picks among the
// unavailable ones (panic mode): a guess beats a certain failure.
func (p *Picker) Pick(now time.Time, exclude []*Target) *Target {
	prios := *p.prios.Load()
	if len(prios) == 0 {
		return nil
	}
	var lbuf [maxPrios]float64
	loads := p.loads(prios, now, lbuf[:0])
	r := rand.Float64()
	start := -1
	for i, l := range loads {
		if r < l {
			start = i
			break
		}
		r -= l
	}
	if start >= 0 {
		// The chosen priority first, then the others best first.
		if t := p2c(prios[start], now, exclude, true); t != nil {
			return t
		}
		for i, ts := range prios {
			if i == start {
				continue
			}
			if t := p2c(ts, now, exclude, true); t != nil {
				return t
			}
		}
	}
	for _, ts := range prios { // panic mode
		if t := p2c(ts, now, exclude, false); t != nil {
			return t
		}
	}
	return nil
}

func p2c(ts []*Target, now time.Time, exclude []*Target, needAvailable bool) *Target {
	var buf [64]*Target
	c := buf[:0]
	for _, t := range ts {
		if (!needAvailable || t.Available(now)) && !tried(t, exclude) {
			c = append(c, t)
		}
	}
	switch len(c) {
	case 0:
		return nil
	case 1:
		return c[0]
	}
	a := rand.IntN(len(c))
	b := rand.IntN(len(c) - 1)
	if b >= a {
		b++
	}
	ns := now.UnixNano()
	if c[b].score(ns) < c[a].score(ns) {
		return c[b]
	}
	return c[a]
}
