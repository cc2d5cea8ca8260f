// Package metrics exists so that the sidecar, which runs beside every pod,
// can serve Prometheus metrics without linking client_golang: that library
// and what it pulls in (client_model, expfmt, protobuf, procfs) are pages
// of the binary every pod maps, several times the size of the few counters
// and histograms the sidecar keeps. This package writes the text exposition
// format (version 0.0.4) itself; a counter costs one atomic add, a
// histogram observation a bucket search, one atomic add and a CAS, and
// neither allocates. The gateway and the controller keep client_golang.
package metrics

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"
)

// ContentType is the Content-Type of the text exposition format the
// registry writes.
const ContentType = "text/plain; version=0.0.4; charset=utf-8"

// Registry holds metric families by name and writes them as Prometheus
// text. The zero value is not usable: call NewRegistry.
type Registry struct {
	mu   sync.Mutex
	fams map[string]*family
	// names maps every sample name a family writes (a histogram's
	// name_bucket, name_sum, name_count) to the family, so that two
	// families can never write the same sample name.
	names map[string]string
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{fams: map[string]*family{}, names: map[string]string{}}
}

// family is one registered metric: its metadata and how to read its
// series at scrape time.
type family struct {
	name, help string
	typ        string // "counter", "gauge" or "histogram"
	labels     []string
	les        []string // histogram: the le label of each bucket, "+Inf" last
	collect    func() []series
}

// series is one labelled series as read at scrape time.
type series struct {
	values []string
	value  float64  // counter, gauge
	counts []uint64 // histogram: cumulative bucket counts, +Inf last
	sum    float64  // histogram
}

func (f *family) sampleNames() []string {
	if f.typ == "histogram" {
		return []string{f.name + "_bucket", f.name + "_sum", f.name + "_count"}
	}
	return []string{f.name}
}

func (r *Registry) register(f *family) error {
	if !validName(f.name, true) {
		return fmt.Errorf("metrics: register %q: invalid metric name", f.name)
	}
	for i, l := range f.labels {
		if !validName(l, false) || strings.HasPrefix(l, "__") {
			return fmt.Errorf("metrics: register %s: invalid label name %q", f.name, l)
		}
		if f.typ == "histogram" && l == "le" {
			return fmt.Errorf("metrics: register %s: label name \"le\" is reserved for histogram buckets", f.name)
		}
		if slices.Contains(f.labels[:i], l) {
			return fmt.Errorf("metrics: register %s: label %q given twice", f.name, l)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.fams[f.name]; dup {
		return fmt.Errorf("metrics: register %s: a metric of that name is already registered", f.name)
	}
	for _, n := range f.sampleNames() {
		if other, dup := r.names[n]; dup {
			return fmt.Errorf("metrics: register %s: its series %s collides with metric %s", f.name, n, other)
		}
	}
	r.fams[f.name] = f
	for _, n := range f.sampleNames() {
		r.names[n] = f.name
	}
	return nil
}

// validName reports whether s is a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)
// or, without colons, a label name.
func validName(s string, colon bool) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			(colon && c == ':') || (i > 0 && c >= '0' && c <= '9')
		if !ok {
			return false
		}
	}
	return true
}

// NewGaugeFunc registers a gauge without labels whose value f returns at
// scrape time. f must be safe to call from any goroutine.
func (r *Registry) NewGaugeFunc(name, help string, f func() float64) error {
	return r.register(&family{name: name, help: help, typ: "gauge", collect: func() []series {
		return []series{{value: f()}}
	}})
}

// NewCounterFunc registers a counter without labels whose value f returns
// at scrape time (a total kept elsewhere, e.g. by the kernel). f must be
// safe to call from any goroutine and never go down.
func (r *Registry) NewCounterFunc(name, help string, f func() float64) error {
	return r.register(&family{name: name, help: help, typ: "counter", collect: func() []series {
		return []series{{value: f()}}
	}})
}

// snapshot returns the registered families sorted by name.
func (r *Registry) snapshot() []*family {
	r.mu.Lock()
	fams := make([]*family, 0, len(r.fams))
	for _, f := range r.fams {
		fams = append(fams, f)
	}
	r.mu.Unlock()
	slices.SortFunc(fams, func(a, b *family) int { return strings.Compare(a.name, b.name) })
	return fams
}

func (r *Registry) family(name string) *family {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fams[name]
}

// ServeHTTP writes every family in the text exposition format.
func (r *Registry) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", ContentType)
	_, _ = w.Write(r.AppendText(nil))
}

// WriteTo writes every family in the text exposition format to w.
func (r *Registry) WriteTo(w io.Writer) (int64, error) {
	n, err := w.Write(r.AppendText(nil))
	return int64(n), err
}

// AppendText appends every family in the text exposition format to b:
// families sorted by name, each with its # HELP and # TYPE lines, its
// series sorted by label values. A family with no series yet (a vector
// nothing has been counted in) is left out, as client_golang does.
func (r *Registry) AppendText(b []byte) []byte {
	for _, f := range r.snapshot() {
		ss := f.collect()
		if len(ss) == 0 {
			continue
		}
		slices.SortFunc(ss, func(a, b series) int { return slices.Compare(a.values, b.values) })
		b = append(b, "# HELP "...)
		b = append(b, f.name...)
		b = append(b, ' ')
		b = appendEscaped(b, f.help, false)
		b = append(b, "\n# TYPE "...)
		b = append(b, f.name...)
		b = append(b, ' ')
		b = append(b, f.typ...)
		b = append(b, '\n')
		for _, s := range ss {
			if f.typ != "histogram" {
				b = appendSample(b, f.name, "", f.labels, s.values, "", s.value)
				continue
			}
			for i, c := range s.counts {
				b = appendSample(b, f.name, "_bucket", f.labels, s.values, f.les[i], float64(c))
			}
			b = appendSample(b, f.name, "_sum", f.labels, s.values, "", s.sum)
			b = appendSample(b, f.name, "_count", f.labels, s.values, "", float64(s.counts[len(s.counts)-1]))
		}
	}
	return b
}

// appendSample appends one sample line; le, when not empty, is a last
// label (a histogram bucket's bound).
func appendSample(b []byte, name, suffix string, labels, values []string, le string, v float64) []byte {
	b = append(b, name...)
	b = append(b, suffix...)
	if len(labels) > 0 || le != "" {
		b = append(b, '{')
		for i, l := range labels {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, l...)
			b = append(b, `="`...)
			b = appendEscaped(b, values[i], true)
			b = append(b, '"')
		}
		if le != "" {
			if len(labels) > 0 {
				b = append(b, ',')
			}
			b = append(b, `le="`...)
			b = append(b, le...)
			b = append(b, '"')
		}
		b = append(b, '}')
	}
	b = append(b, ' ')
	b = appendFloat(b, v)
	return append(b, '\n')
}

// appendEscaped appends s escaped as the text format wants: backslash and
// newline always, the double quote in label values. Bytes that are not
// UTF-8 become U+FFFD (the parser rejects them).
func appendEscaped(b []byte, s string, quote bool) []byte {
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '\\':
			b = append(b, `\\`...)
		case c == '\n':
			b = append(b, `\n`...)
		case c == '"' && quote:
			b = append(b, `\"`...)
		case c < utf8.RuneSelf:
			b = append(b, c)
		default:
			r, n := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && n == 1 {
				b = utf8.AppendRune(b, utf8.RuneError)
			} else {
				b = append(b, s[i:i+n]...)
			}
			i += n
			continue
		}
		i++
	}
	return b
}

// appendFloat appends v as Prometheus writes sample values: +Inf, -Inf,
// NaN; integers (exact in a float64) in full, without an exponent; other
// values in the shortest form that reads back the same.
func appendFloat(b []byte, v float64) []byte {
	switch {
	case math.IsInf(v, 1):
		return append(b, "+Inf"...)
	case math.IsInf(v, -1):
		return append(b, "-Inf"...)
	case math.IsNaN(v):
		return append(b, "NaN"...)
	case v == math.Trunc(v) && math.Abs(v) <= 1<<53:
		return strconv.AppendInt(b, int64(v), 10)
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}

// Sum returns the sum of every series of the named family: the values of
// a counter or gauge, the observation counts of a histogram; 0 when no
// such family is registered. It is meant for tests.
func (r *Registry) Sum(name string) float64 {
	f := r.family(name)
	if f == nil {
		return 0
	}
	total := 0.0
	for _, s := range f.collect() {
		total += s.total()
	}
	return total
}

// Value returns the value of the named family's series with exactly these
// labels (a histogram's observation count); 0 when there is no such
// series. It is meant for tests.
func (r *Registry) Value(name string, labels map[string]string) float64 {
	f := r.family(name)
	if f == nil || len(labels) != len(f.labels) {
		return 0
	}
	total := 0.0
next:
	for _, s := range f.collect() {
		for i, l := range f.labels {
			if v, ok := labels[l]; !ok || v != s.values[i] {
				continue next
			}
		}
		total += s.total()
	}
	return total
}

func (s series) total() float64 {
	if s.counts != nil {
		return float64(s.counts[len(s.counts)-1])
	}
	return s.value
}
