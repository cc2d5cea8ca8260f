package metrics

import (
	"fmt"
	rtmetrics "runtime/metrics"
)

// RegisterRuntime registers the process and Go runtime series a user of
// client_golang's default collectors expects, under the same names, all
// read at scrape time: go_goroutines, go_threads,
// go_memstats_heap_alloc_bytes, go_memstats_heap_inuse_bytes,
// go_memstats_sys_bytes (from runtime/metrics: no stop-the-world, unlike
// runtime.ReadMemStats) and, on Linux, process_cpu_seconds_total,
// process_resident_memory_bytes, process_virtual_memory_bytes,
// process_open_fds, process_max_fds and process_start_time_seconds (from
// /proc and getrusage). Elsewhere the process series are left out.
func (r *Registry) RegisterRuntime() error {
	for _, g := range []struct {
		name, help string
		samples    []string // summed
	}{
		{"go_goroutines", "Number of goroutines that currently exist.", []string{"/sched/goroutines:goroutines"}},
		{"go_threads", "Number of OS threads the Go runtime has.", []string{"/sched/threads/total:threads"}},
		{"go_memstats_heap_alloc_bytes", "Number of heap bytes allocated and still in use.", []string{"/memory/classes/heap/objects:bytes"}},
		{"go_memstats_heap_inuse_bytes", "Number of heap bytes that are in use.", []string{"/memory/classes/heap/objects:bytes", "/memory/classes/heap/unused:bytes"}},
		{"go_memstats_sys_bytes", "Number of bytes obtained from system.", []string{"/memory/classes/total:bytes"}},
	} {
		if !runtimeSupported(g.samples) {
			continue
		}
		if err := r.NewGaugeFunc(g.name, g.help, func() float64 { return readRuntime(g.samples) }); err != nil {
			return err
		}
	}
	if err := registerProcess(r); err != nil {
		return fmt.Errorf("metrics: register process metrics: %w", err)
	}
	return nil
}

func runtimeSupported(names []string) bool {
	s := make([]rtmetrics.Sample, len(names))
	for i, n := range names {
		s[i].Name = n
	}
	rtmetrics.Read(s)
	for _, x := range s {
		if k := x.Value.Kind(); k != rtmetrics.KindUint64 && k != rtmetrics.KindFloat64 {
			return false
		}
	}
	return true
}

// readRuntime returns the sum of these runtime/metrics samples.
func readRuntime(names []string) float64 {
	s := make([]rtmetrics.Sample, len(names))
	for i, n := range names {
		s[i].Name = n
	}
	rtmetrics.Read(s)
	total := 0.0
	for _, x := range s {
		switch x.Value.Kind() {
		case rtmetrics.KindUint64:
			total += float64(x.Value.Uint64())
		case rtmetrics.KindFloat64:
			total += x.Value.Float64()
		}
	}
	return total
}
