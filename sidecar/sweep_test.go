package sidecar_test

import (
	"cmp"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// reads is the read system calls of the path's processes so far.
func (p *path) reads() (n int64) {
	for _, pr := range p.procs {
		n += pr.reads()
	}
	return n
}

// reads is the read system calls of the process and its children so far
// (/proc/<pid>/io syscr).
func (p *proc) reads() (n int64) {
	for _, pid := range p.pids() {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "syscr:"); ok {
				x, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
				n += x
			}
		}
	}
	return n
}

// BenchmarkSocketIOSweep measures the sidecar pair's added latency and CPU
// at fixed rates from 500 to 12,000 req/s, for each --socket-io mode and
// the HAProxy pair, interleaved in one run: the measurements behind
// internal/rawio's Auto thresholds (docs/sidecar.md, "Raw socket I/O").
// It runs only with BENCH_SWEEP=1 (make bench skips it: two minutes, and
// no figure with a goal); BENCH_SWEEP_PROTO=tcp sweeps the opaque TCP path
// instead of HTTP, and BENCH_SWEEP_RATES=1000,2000 other rates.
func BenchmarkSocketIOSweep(b *testing.B) {
	if testing.Short() || os.Getenv("BENCH_SWEEP") != "1" {
		b.Skip("set BENCH_SWEEP=1 to sweep (about two minutes)")
	}
	proto := cmp.Or(os.Getenv("BENCH_SWEEP_PROTO"), "http")
	rig := newBenchRig(b)
	paths := []*path{{name: "direct", addr: rig.app.addr()}}
	for _, mode := range []string{"raw", "std", "auto"} {
		paths = append(paths, rig.pair(mode, proto, "--socket-io", mode))
	}
	if hap, why := rig.haproxy(proto); hap != nil {
		paths = append(paths, hap)
	} else {
		b.Logf("HAProxy skipped: %s", why)
	}
	for _, p := range paths { // warm connections and pools
		if _, failed := fixedRate(p.addr, 500, benchConns, 200*time.Millisecond, nil); failed > 0 {
			b.Fatalf("warm-up on %s: %d failed", p.name, failed)
		}
	}
	const (
		rounds = 2
		slice  = 1500 * time.Millisecond
	)
	var table strings.Builder
	fmt.Fprintf(&table, "%s: added p50 / p99 ms, CPU %% of a core per proxy, reads/s per proxy\n%7s", proto, "req/s")
	for _, p := range paths[1:] {
		fmt.Fprintf(&table, " | %-30s", p.name)
	}
	table.WriteString("\n")
	rates := []int{500, 1000, 2000, 4000, 6000, 8000, 12000}
	if env := os.Getenv("BENCH_SWEEP_RATES"); env != "" {
		rates = nil
		for f := range strings.SplitSeq(env, ",") {
			r, err := strconv.Atoi(f)
			if err != nil || r <= 0 {
				b.Fatalf("BENCH_SWEEP_RATES=%q: want req/s, comma-separated", env)
			}
			rates = append(rates, r)
		}
	}
	for _, rate := range rates {
		type fig struct {
			lat   []time.Duration
			cpu   time.Duration
			reads int64
		}
		figs := map[*path]*fig{}
		for _, p := range paths {
			figs[p] = &fig{}
		}
		interleave(rounds, paths, func(p *path) {
			f, c0, r0 := figs[p], p.cpu(), p.reads()
			lat, failed := fixedRate(p.addr, rate, benchConns, slice, nil)
			if failed > 0 {
				b.Errorf("%s at %d req/s: %d failed", p.name, rate, failed)
			}
			f.cpu += p.cpu() - c0
			f.reads += p.reads() - r0
			f.lat = append(f.lat, lat...)
		})
		for _, f := range figs {
			slices.Sort(f.lat)
		}
		d50, d99 := pct(figs[paths[0]].lat, 0.5), pct(figs[paths[0]].lat, 0.99)
		fmt.Fprintf(&table, "%7d", rate)
		secs := (slice * rounds).Seconds()
		for _, p := range paths[1:] {
			f := figs[p]
			n := float64(max(len(p.procs), 1))
			cell := fmt.Sprintf("%.3f / %.3f, %4.1f%%, %6.0f", pct(f.lat, 0.5)-d50, pct(f.lat, 0.99)-d99,
				100*f.cpu.Seconds()/secs/n, float64(f.reads)/secs/n)
			fmt.Fprintf(&table, " | %-30s", cell)
			if rate == benchRate {
				b.ReportMetric(pct(f.lat, 0.5)-d50, p.name+"-added-p50-ms")
			}
		}
		table.WriteString("\n")
	}
	// On stdout: a benchmark's log is cut after ten lines.
	fmt.Print(table.String())
}
