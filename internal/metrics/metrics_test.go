package metrics

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// parse reads text with client_golang's own parser, the reference for
// what Prometheus accepts.
func parse(t *testing.T, text []byte) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.LegacyValidation)
	mfs, err := p.TextToMetricFamilies(bytes.NewReader(text))
	if err != nil {
		t.Fatalf("parse exposition: %v\n%s", err, text)
	}
	return mfs
}

func labelsOf(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// must is for registrations that cannot fail in a test.
func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestText: the exact bytes of a small registry: families sorted by name,
// series by label values, HELP and TYPE, histogram buckets cumulative with
// +Inf, _sum and _count, integers without exponent, empty vectors left out.
func TestText(t *testing.T) {
	r := NewRegistry()
	req := must(r.NewCounterVec("b_requests_total", "Requests by code.", "code", "method"))
	req.WithLabelValues("500", "GET").Add(2)
	req.WithLabelValues("200", "POST").Inc()
	req.WithLabelValues("200", "GET").Add(1e6)
	lat := must(r.NewHistogramVec("a_duration_seconds", "Latency.", []float64{.005, .1, 1, 2.5}, "upstream"))
	lat.WithLabelValues("x").Observe(.005) // on a bound: counted in it
	lat.WithLabelValues("x").Observe(.05)
	lat.WithLabelValues("x").Observe(3)
	must(r.NewCounterVec("c_unused_total", "Never counted.", "l"))
	if err := r.NewGaugeFunc("d_temperature", "A gauge.", func() float64 { return -1.5 }); err != nil {
		t.Fatal(err)
	}
	single := must(r.NewCounterVec("e_total", "No labels."))
	single.WithLabelValues().Add(0.25)

	want := `# HELP a_duration_seconds Latency.
# TYPE a_duration_seconds histogram
a_duration_seconds_bucket{upstream="x",le="0.005"} 1
a_duration_seconds_bucket{upstream="x",le="0.1"} 2
a_duration_seconds_bucket{upstream="x",le="1"} 2
a_duration_seconds_bucket{upstream="x",le="2.5"} 2
a_duration_seconds_bucket{upstream="x",le="+Inf"} 3
a_duration_seconds_sum{upstream="x"} 3.055
a_duration_seconds_count{upstream="x"} 3
# HELP b_requests_total Requests by code.
# TYPE b_requests_total counter
b_requests_total{code="200",method="GET"} 1000000
b_requests_total{code="200",method="POST"} 1
b_requests_total{code="500",method="GET"} 2
# HELP d_temperature A gauge.
# TYPE d_temperature gauge
d_temperature -1.5
# HELP e_total No labels.
# TYPE e_total counter
e_total 0.25
`
	if got := string(r.AppendText(nil)); got != want {
		t.Errorf("exposition:\n%s\nwant:\n%s", got, want)
	}
	parse(t, r.AppendText(nil))
}

// TestParsesWithSameValues: what the registry writes reads back through
// expfmt with the same values, including label values and help texts that
// need escaping.
func TestParsesWithSameValues(t *testing.T) {
	r := NewRegistry()
	c := must(r.NewCounterVec("fedmesh_test_total", "Help with a \\ backslash,\na newline and \"quotes\".", "route", "backend"))
	odd := []string{`back\slash`, `"quoted"`, "new\nline", "all \\ \" \n three", "utf-8 ✓", ""}
	for i, v := range odd {
		c.WithLabelValues(v, "b").Add(float64(i + 1))
	}
	c.WithLabelValues("bad\xffutf8", "b").Inc()
	h := must(r.NewHistogramVec("fedmesh_test_seconds", "Latency.", []float64{.0005, .001, .0025, 1, 10}, "upstream"))
	for _, v := range []float64{.0001, .0005, .002, 0.7, 5, 11, 100} {
		h.WithLabelValues("up").Observe(v)
	}
	if err := r.NewCounterFunc("fedmesh_test_func_total", "A counter func.", func() float64 { return 42 }); err != nil {
		t.Fatal(err)
	}

	mfs := parse(t, r.AppendText(nil))
	mf := mfs["fedmesh_test_total"]
	if mf.GetHelp() != "Help with a \\ backslash,\na newline and \"quotes\"." || mf.GetType() != dto.MetricType_COUNTER {
		t.Errorf("help %q type %v", mf.GetHelp(), mf.GetType())
	}
	got := map[string]float64{}
	for _, m := range mf.GetMetric() {
		l := labelsOf(m)
		if l["backend"] != "b" {
			t.Errorf("labels %v", l)
		}
		got[l["route"]] = m.GetCounter().GetValue()
	}
	for i, v := range odd {
		if got[v] != float64(i+1) {
			t.Errorf("route %q: %v, want %d (all: %v)", v, got[v], i+1, got)
		}
	}
	if got["bad\uFFFDutf8"] != 1 {
		t.Errorf("invalid UTF-8 not written as U+FFFD: %v", got)
	}

	hm := mfs["fedmesh_test_seconds"].GetMetric()[0].GetHistogram()
	if hm.GetSampleCount() != 7 || math.Abs(hm.GetSampleSum()-116.7026) > 1e-9 {
		t.Errorf("count %d sum %v, want 7 and 116.7026", hm.GetSampleCount(), hm.GetSampleSum())
	}
	wantBuckets := map[float64]uint64{.0005: 2, .001: 2, .0025: 3, 1: 4, 10: 5, math.Inf(1): 7}
	for _, b := range hm.GetBucket() {
		if b.GetCumulativeCount() != wantBuckets[b.GetUpperBound()] {
			t.Errorf("bucket le=%v: %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), wantBuckets[b.GetUpperBound()])
		}
	}
	if v := mfs["fedmesh_test_func_total"].GetMetric()[0].GetCounter().GetValue(); v != 42 {
		t.Errorf("counter func %v", v)
	}

	if s := r.Sum("fedmesh_test_total"); s != 1+2+3+4+5+6+1 {
		t.Errorf("Sum %v", s)
	}
	if s := r.Sum("fedmesh_test_seconds"); s != 7 {
		t.Errorf("Sum of a histogram %v, want its count 7", s)
	}
	if v := r.Value("fedmesh_test_total", map[string]string{"route": "utf-8 ✓", "backend": "b"}); v != 5 {
		t.Errorf("Value %v, want 5", v)
	}
	if v := r.Value("fedmesh_test_total", map[string]string{"route": "utf-8 ✓"}); v != 0 {
		t.Errorf("Value with a label missing %v, want 0", v)
	}
	if s := r.Sum("nope"); s != 0 {
		t.Errorf("Sum of an unknown family %v", s)
	}
}

func TestFloatFormat(t *testing.T) {
	for _, tt := range []struct {
		v    float64
		want string
	}{
		{0, "0"}, {1, "1"}, {-1, "-1"}, {1e6, "1000000"}, {1 << 53, "9007199254740992"},
		{1 << 60, "1.152921504606847e+18"}, {0.1, "0.1"}, {2.5, "2.5"}, {.0005, "0.0005"},
		{1e-7, "1e-07"}, {math.Inf(1), "+Inf"}, {math.Inf(-1), "-Inf"}, {math.NaN(), "NaN"},
	} {
		if got := string(appendFloat(nil, tt.v)); got != tt.want {
			t.Errorf("appendFloat(%v) = %s, want %s", tt.v, got, tt.want)
		}
	}
}

// TestConcurrent: counters and histograms updated from many goroutines,
// while series are made and the registry is scraped, end with exact
// totals (run with -race).
func TestConcurrent(t *testing.T) {
	r := NewRegistry()
	c := must(r.NewCounterVec("c_total", "c", "worker"))
	shared := must(r.NewCounterVec("shared_total", "s"))
	h := must(r.NewHistogramVec("h_seconds", "h", []float64{1, 2, 4}, "k"))
	const workers, n = 8, 5000
	var wg sync.WaitGroup
	stop := make(chan struct{})
	scraped := make(chan int)
	go func() {
		scrapes := 0
		for {
			select {
			case <-stop:
				scraped <- scrapes
				return
			default:
				parse(t, r.AppendText(nil))
				scrapes++
			}
		}
	}()
	for w := range workers {
		wg.Go(func() {
			name := fmt.Sprint("w", w%3)
			for i := range n {
				c.WithLabelValues(name).Inc()
				shared.WithLabelValues().Add(0.5)
				h.WithLabelValues("k").Observe(float64(i % 5)) // 0,1,2,3,4
			}
		})
	}
	wg.Wait()
	close(stop)
	t.Logf("%d scrapes during the run", <-scraped)

	if got := r.Sum("c_total"); got != workers*n {
		t.Errorf("c_total %v, want %d", got, workers*n)
	}
	if got := r.Sum("shared_total"); got != workers*n/2 {
		t.Errorf("shared_total %v, want %d", got, workers*n/2)
	}
	hm := parse(t, r.AppendText(nil))["h_seconds"].GetMetric()[0].GetHistogram()
	total := uint64(workers * n)
	if hm.GetSampleCount() != total || hm.GetSampleSum() != float64(workers*n/5*(0+1+2+3+4)) {
		t.Errorf("histogram count %d sum %v", hm.GetSampleCount(), hm.GetSampleSum())
	}
	want := []uint64{total * 2 / 5, total * 3 / 5, total, total} // le 1, 2, 4, +Inf
	for i, b := range hm.GetBucket() {
		if b.GetCumulativeCount() != want[i] {
			t.Errorf("bucket le=%v: %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), want[i])
		}
	}
}

func TestRegistrationErrors(t *testing.T) {
	r := NewRegistry()
	must(r.NewCounterVec("x_total", "x", "a"))
	must(r.NewHistogramVec("lat", "h", []float64{1}))
	for _, tt := range []struct {
		name string
		reg  func() error
		want string
	}{
		{"same name", func() error { _, err := r.NewCounterVec("x_total", "again", "a"); return err }, "x_total: a metric of that name is already registered"},
		{"same name other type", func() error { return r.NewGaugeFunc("x_total", "g", func() float64 { return 0 }) }, "already registered"},
		{"histogram series", func() error { _, err := r.NewCounterVec("lat_count", "c"); return err }, "its series lat_count collides with metric lat"},
		{"bad name", func() error { _, err := r.NewCounterVec("1x", "c"); return err }, "invalid metric name"},
		{"bad label", func() error { _, err := r.NewCounterVec("y_total", "c", "a-b"); return err }, `invalid label name "a-b"`},
		{"reserved label", func() error { _, err := r.NewCounterVec("y_total", "c", "__name"); return err }, "invalid label name"},
		{"label twice", func() error { _, err := r.NewCounterVec("y_total", "c", "a", "a"); return err }, `label "a" given twice`},
		{"le", func() error { _, err := r.NewHistogramVec("z", "h", []float64{1}, "le"); return err }, "reserved"},
		{"no buckets", func() error { _, err := r.NewHistogramVec("z", "h", nil); return err }, "no buckets"},
		{"unsorted buckets", func() error { _, err := r.NewHistogramVec("z", "h", []float64{1, 1}); return err }, "not strictly increasing"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.reg()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
	// A trailing +Inf bucket is accepted and not doubled.
	h := must(r.NewHistogramVec("inf", "h", []float64{1, math.Inf(1)}))
	h.WithLabelValues().Observe(2)
	if n := strings.Count(string(r.AppendText(nil)), `inf_bucket{le="+Inf"}`); n != 1 {
		t.Errorf("%d +Inf buckets", n)
	}
}

func TestPanics(t *testing.T) {
	r := NewRegistry()
	c := must(r.NewCounterVec("p_total", "p", "a", "b"))
	h := must(r.NewHistogramVec("p_seconds", "p", []float64{1}, "a"))
	for _, tt := range []struct {
		name string
		f    func()
		want string
	}{
		{"too few", func() { c.WithLabelValues("x") }, "metrics: p_total: 1 label values for 2 labels (a, b)"},
		{"too many", func() { h.WithLabelValues("x", "y") }, "metrics: p_seconds: 2 label values for 1 labels (a)"},
		{"negative add", func() { c.WithLabelValues("x", "y").Add(-1) }, "counter cannot decrease"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			defer func() {
				if p := recover(); p == nil || !strings.Contains(fmt.Sprint(p), tt.want) {
					t.Errorf("panic %v, want one containing %q", p, tt.want)
				}
			}()
			tt.f()
		})
	}
}

// TestRuntime: the runtime and process series are there under
// client_golang's names, with plausible values.
func TestRuntime(t *testing.T) {
	r := NewRegistry()
	if err := r.RegisterRuntime(); err != nil {
		t.Fatal(err)
	}
	mfs := parse(t, r.AppendText(nil))
	value := func(name string) float64 {
		mf := mfs[name]
		if mf == nil {
			t.Errorf("no %s", name)
			return 0
		}
		m := mf.GetMetric()[0]
		return m.GetGauge().GetValue() + m.GetCounter().GetValue()
	}
	if v := value("go_goroutines"); v < 1 {
		t.Errorf("go_goroutines %v", v)
	}
	if v := value("go_threads"); v < 1 {
		t.Errorf("go_threads %v", v)
	}
	alloc, inuse, sys := value("go_memstats_heap_alloc_bytes"), value("go_memstats_heap_inuse_bytes"), value("go_memstats_sys_bytes")
	if alloc <= 0 || inuse < alloc || sys < inuse {
		t.Errorf("heap alloc %v, inuse %v, sys %v: want 0 < alloc <= inuse <= sys", alloc, inuse, sys)
	}
	if runtime.GOOS != "linux" {
		return
	}
	if mfs["process_cpu_seconds_total"].GetType() != dto.MetricType_COUNTER {
		t.Errorf("process_cpu_seconds_total is a %v", mfs["process_cpu_seconds_total"].GetType())
	}
	if v := value("process_cpu_seconds_total"); v <= 0 {
		t.Errorf("process_cpu_seconds_total %v", v)
	}
	rss, vsz := value("process_resident_memory_bytes"), value("process_virtual_memory_bytes")
	if rss < 1<<20 || vsz < rss {
		t.Errorf("resident %v, virtual %v", rss, vsz)
	}
	if v := value("process_open_fds"); v < 3 || v > value("process_max_fds") {
		t.Errorf("open fds %v, max %v", v, value("process_max_fds"))
	}
	start := time.Unix(0, int64(value("process_start_time_seconds")*1e9))
	if age := time.Since(start); age < 0 || age > time.Hour {
		t.Errorf("process_start_time_seconds %v: started %v ago", start, age)
	}
}

func TestServeHTTP(t *testing.T) {
	r := NewRegistry()
	must(r.NewCounterVec("s_total", "s", "a")).WithLabelValues("v").Inc()
	if err := r.RegisterRuntime(); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(r)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8" {
		t.Errorf("Content-Type %q", ct)
	}
	if got := expfmt.ResponseFormat(resp.Header); got.FormatType() != expfmt.TypeTextPlain {
		t.Errorf("format %v", got)
	}
	mfs := parse(t, body)
	if mfs["s_total"] == nil || mfs["go_goroutines"] == nil {
		t.Errorf("families %v", mfs)
	}
}

// TestNoAllocs: the hot path allocates nothing.
func TestNoAllocs(t *testing.T) {
	r := NewRegistry()
	c := must(r.NewCounterVec("a_total", "a", "upstream", "cluster", "result"))
	h := must(r.NewHistogramVec("a_seconds", "a", []float64{.001, .01, .1, 1}, "upstream"))
	hist := h.WithLabelValues("u")
	up, cl := "shop/checkout:8080", "east"
	c.WithLabelValues(up, cl, "ok")
	for name, f := range map[string]func(){
		"Inc":                   c.WithLabelValues(up, cl, "ok").Inc,
		"Add":                   func() { c.WithLabelValues(up, cl, "ok").Add(1.5) },
		"WithLabelValues().Inc": func() { c.WithLabelValues(up, cl, "ok").Inc() },
		"Observe":               func() { hist.Observe(.05) },
		"WithLabelValues().Observe": func() {
			h.WithLabelValues(up).Observe(.05)
		},
	} {
		if n := testing.AllocsPerRun(1000, f); n != 0 {
			t.Errorf("%s: %v allocations", name, n)
		}
	}
}

func BenchmarkCounterInc(b *testing.B) {
	c := must(NewRegistry().NewCounterVec("a_total", "a", "upstream")).WithLabelValues("u")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c.Inc()
		}
	})
}

func BenchmarkCounterWithLabelValuesInc(b *testing.B) {
	c := must(NewRegistry().NewCounterVec("a_total", "a", "upstream", "cluster", "result"))
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c.WithLabelValues("shop/checkout:8080", "east", "ok").Inc()
		}
	})
}

func BenchmarkHistogramObserve(b *testing.B) {
	h := must(NewRegistry().NewHistogramVec("a_seconds", "a",
		[]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}, "upstream")).WithLabelValues("u")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		v := 0.0
		for pb.Next() {
			h.Observe(v)
			v += .001
			if v > 12 {
				v = 0
			}
		}
	})
}
