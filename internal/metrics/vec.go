package metrics

import (
	"fmt"
	"hash/maphash"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// vec is the labelled series of one family. Lookups are lock-free: the
// series map is immutable and replaced (copied) under mu when a series is
// added, which happens once per label combination.
type vec[T any] struct {
	name   string
	labels []string
	seed   maphash.Seed
	newT   func() *T

	series atomic.Pointer[map[uint64][]entry[T]] // by hash of the values
	mu     sync.Mutex                            // serializes additions
}

type entry[T any] struct {
	values []string
	m      *T
}

func newVec[T any](name string, labels []string, newT func() *T) *vec[T] {
	v := &vec[T]{name: name, labels: slices.Clone(labels), seed: maphash.MakeSeed(), newT: newT}
	v.series.Store(&map[uint64][]entry[T]{})
	return v
}

// with returns the series of these label values, made on first use. It
// does not allocate once the series exists.
func (v *vec[T]) with(vals []string) *T {
	if len(vals) != len(v.labels) {
		// vals is not formatted: passing it to fmt would make every
		// caller's variadic slice escape to the heap.
		panic(fmt.Sprintf("metrics: %s: %d label values for %d labels (%s)",
			v.name, len(vals), len(v.labels), strings.Join(v.labels, ", ")))
	}
	h := v.hash(vals)
	for _, e := range (*v.series.Load())[h] {
		if slices.Equal(e.values, vals) {
			return e.m
		}
	}
	return v.add(h, vals)
}

func (v *vec[T]) add(h uint64, vals []string) *T {
	v.mu.Lock()
	defer v.mu.Unlock()
	old := *v.series.Load()
	for _, e := range old[h] { // added while we waited for mu
		if slices.Equal(e.values, vals) {
			return e.m
		}
	}
	m := make(map[uint64][]entry[T], len(old)+1)
	for k, es := range old {
		m[k] = es
	}
	e := entry[T]{values: slices.Clone(vals), m: v.newT()}
	m[h] = append(slices.Clip(old[h]), e)
	v.series.Store(&m)
	return e.m
}

func (v *vec[T]) hash(vals []string) uint64 {
	var h maphash.Hash
	h.SetSeed(v.seed)
	for _, s := range vals {
		h.WriteString(s)
		h.WriteByte(0)
	}
	return h.Sum64()
}

// each calls f for every series.
func (v *vec[T]) each(f func(values []string, m *T)) {
	for _, es := range *v.series.Load() {
		for _, e := range es {
			f(e.values, e.m)
		}
	}
}

// Counter is a total that only goes up. Its methods are safe for
// concurrent use and do not allocate.
type Counter struct {
	n    atomic.Uint64 // whole increments: Inc and integral Adds
	frac atomic.Uint64 // float64 bits of the other Adds
}

// Inc adds 1: one atomic add.
func (c *Counter) Inc() { c.n.Add(1) }

// Add adds v, which must not be negative (it panics otherwise, like
// client_golang: a counter that goes down reads as a reset).
func (c *Counter) Add(v float64) {
	if v < 0 {
		panic(fmt.Sprintf("metrics: counter cannot decrease: Add(%v)", v))
	}
	if v < 1<<63 && v == math.Trunc(v) {
		c.n.Add(uint64(v))
		return
	}
	addFloat(&c.frac, v)
}

// Value returns the counter's total.
func (c *Counter) Value() float64 {
	return float64(c.n.Load()) + math.Float64frombits(c.frac.Load())
}

func addFloat(bits *atomic.Uint64, v float64) {
	for {
		old := bits.Load()
		if bits.CompareAndSwap(old, math.Float64bits(math.Float64frombits(old)+v)) {
			return
		}
	}
}

// CounterVec is a counter family with labels.
type CounterVec struct{ v *vec[Counter] }

// NewCounterVec registers a counter family with these label names (none
// for a single counter: WithLabelValues()).
func (r *Registry) NewCounterVec(name, help string, labels ...string) (*CounterVec, error) {
	c := &CounterVec{v: newVec(name, labels, func() *Counter { return new(Counter) })}
	f := &family{name: name, help: help, typ: "counter", labels: c.v.labels, collect: func() []series {
		var ss []series
		c.v.each(func(values []string, m *Counter) { ss = append(ss, series{values: values, value: m.Value()}) })
		return ss
	}}
	if err := r.register(f); err != nil {
		return nil, err
	}
	return c, nil
}

// WithLabelValues returns the counter of these label values, in the order
// the labels were registered, made (at 0) on first use. Callers on a hot
// path may keep the result. It panics when the number of values is wrong.
func (c *CounterVec) WithLabelValues(vals ...string) *Counter { return c.v.with(vals) }

// Histogram counts observations into buckets. Observe is safe for
// concurrent use, lock-free and does not allocate.
type Histogram struct {
	upper  []float64       // bucket bounds, +Inf excluded; shared by the family
	counts []atomic.Uint64 // per bucket (not cumulative), +Inf last
	sum    atomic.Uint64   // float64 bits
}

// Observe counts v in the first bucket whose bound is >= v (NaN in +Inf)
// and adds it to the sum.
func (h *Histogram) Observe(v float64) {
	lo, hi := 0, len(h.upper)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if h.upper[m] >= v {
			hi = m
		} else {
			lo = m + 1
		}
	}
	h.counts[lo].Add(1)
	addFloat(&h.sum, v)
}

// read returns the cumulative bucket counts and the sum. Observations
// made meanwhile may be in the counts and not yet in the sum; the +Inf
// bucket is the count.
func (h *Histogram) read() ([]uint64, float64) {
	counts := make([]uint64, len(h.counts))
	var total uint64
	for i := range h.counts {
		total += h.counts[i].Load()
		counts[i] = total
	}
	return counts, math.Float64frombits(h.sum.Load())
}

// HistogramVec is a histogram family with labels.
type HistogramVec struct{ v *vec[Histogram] }

// NewHistogramVec registers a histogram family with these bucket upper
// bounds (strictly increasing; a last +Inf may be given or not: it is
// always there) and label names.
func (r *Registry) NewHistogramVec(name, help string, buckets []float64, labels ...string) (*HistogramVec, error) {
	upper := slices.Clone(buckets)
	if n := len(upper); n > 0 && math.IsInf(upper[n-1], 1) {
		upper = upper[:n-1]
	}
	if len(upper) == 0 {
		return nil, fmt.Errorf("metrics: register %s: no buckets", name)
	}
	for i, u := range upper {
		if math.IsNaN(u) || math.IsInf(u, 0) || (i > 0 && u <= upper[i-1]) {
			return nil, fmt.Errorf("metrics: register %s: buckets %v are not strictly increasing finite bounds", name, buckets)
		}
	}
	les := make([]string, 0, len(upper)+1)
	for _, u := range upper {
		les = append(les, string(appendFloat(nil, u)))
	}
	les = append(les, "+Inf")
	h := &HistogramVec{v: newVec(name, labels, func() *Histogram {
		return &Histogram{upper: upper, counts: make([]atomic.Uint64, len(upper)+1)}
	})}
	f := &family{name: name, help: help, typ: "histogram", labels: h.v.labels, les: les, collect: func() []series {
		var ss []series
		h.v.each(func(values []string, m *Histogram) {
			counts, sum := m.read()
			ss = append(ss, series{values: values, counts: counts, sum: sum})
		})
		return ss
	}}
	if err := r.register(f); err != nil {
		return nil, err
	}
	return h, nil
}

// WithLabelValues returns the histogram of these label values, made on
// first use. Callers on a hot path may keep the result. It panics when the
// number of values is wrong.
func (h *HistogramVec) WithLabelValues(vals ...string) *Histogram { return h.v.with(vals) }
