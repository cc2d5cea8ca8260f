package issuer

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// benchChildEnv, when set, turns the test binary into a bare issuer process
// for BenchmarkRotation1000Workloads, so that the issuer's CPU and memory can
// be read from /proc without the load generator's.
const benchChildEnv = "FEDMESH_ISSUER_BENCH_CHILD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(benchChildEnv); spec != "" {
		if err := benchChild(spec); err != nil {
			fmt.Fprintln(os.Stderr, "bench child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	// Every goroutine the tests started (issuers, their streams and
	// watchers, Workload API clients) has ended when they are done.
	goleak.VerifyTestMain(m)
}

type childSpec struct {
	Workloads int           `json:"workloads"`
	Dir       string        `json:"dir"`
	TTL       time.Duration `json:"ttl"`
}

func (s childSpec) socket(i int) string { return filepath.Join(s.Dir, fmt.Sprintf("w%04d.sock", i)) }

// benchChild runs an issuer with one entry and one socket per workload until
// its stdin closes.
func benchChild(raw string) error {
	var spec childSpec
	if err := json.Unmarshal([]byte(raw), &spec); err != nil {
		return err
	}
	cfg := Config{
		TrustDomain: spiffeid.RequireTrustDomainFromString("bench.fedmesh.test"),
		DataDir:     filepath.Join(spec.Dir, "data"),
		SocketPath:  filepath.Join(spec.Dir, "api.sock"),
		SVIDTTL:     spec.TTL,
		minSVIDTTL:  time.Second, // compressed schedule: see docs/identity.md
		Logger:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	for i := range spec.Workloads {
		cfg.Entries = append(cfg.Entries, Entry{
			SPIFFEID: fmt.Sprintf("spiffe://bench.fedmesh.test/ns/bench/sa/w%04d", i),
			Socket:   spec.socket(i),
		})
	}
	iss, err := New(cfg)
	if err != nil {
		return err
	}
	if err := iss.Start(); err != nil {
		return err
	}
	defer iss.Stop()
	fmt.Println("READY")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// procCPU is the CPU time the process's threads have run, in nanoseconds:
// the sum of the first field of /proc/<pid>/task/*/schedstat. (utime+stime
// in /proc/<pid>/stat count 10 ms ticks, too coarse for a few seconds of an
// issuer that is mostly idle.) Go's runtime threads do not exit, so no
// thread's time is lost between two readings.
func procCPU(pid int) (time.Duration, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, task := range tasks {
		data, err := os.ReadFile(filepath.Join(dir, task.Name(), "schedstat"))
		if err != nil {
			continue // the thread is gone
		}
		f := strings.Fields(string(data))
		if len(f) == 0 {
			return 0, fmt.Errorf("parse %s/%s/schedstat", dir, task.Name())
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse %s/%s/schedstat: %w", dir, task.Name(), err)
		}
		total += ns
	}
	return time.Duration(total), nil
}

// procMemMB reads a kB field (VmRSS, VmHWM) of /proc/<pid>/status in MB.
func procMemMB(pid int, field string) (float64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// BenchmarkRotation1000Workloads measures what 1,000 workloads whose SVIDs
// rotate every minute cost the issuer, in its own process.
//
// The issuer runs as a child process with 1,000 registration entries, each
// on its own socket, and this process holds one Workload API stream per
// workload. Waiting minutes per run is not practical, so the schedule is
// compressed: SVIDs live 2*period (default period 5s, i.e. 12x faster than
// every minute) and are renewed every period. The child's CPU time (summed
// from /proc/<pid>/task/*/schedstat) is measured over an idle window before
// the first renewal and over a window of two periods; every renewal the workloads
// actually receive in that window is counted. The cost of one rotation is
// (window CPU - idle rate * window) / renewals received, and the figure is
// idle rate + 1,000 rotations per 60s at that cost. RSS is the child's peak
// (VmHWM). FEDMESH_BENCH_ROTATION_PERIOD=60s runs the real schedule.
func BenchmarkRotation1000Workloads(b *testing.B) {
	const workloads = 1000
	period := 5 * time.Second
	if p := os.Getenv("FEDMESH_BENCH_ROTATION_PERIOD"); p != "" {
		var err error
		if period, err = time.ParseDuration(p); err != nil {
			b.Fatal(err)
		}
	}
	for range b.N {
		cpuPct, msPerRot, rss, renewals := runRotationBench(b, workloads, period)
		b.ReportMetric(cpuPct, "cpu-pct")
		b.ReportMetric(msPerRot, "cpu-ms-per-rotation")
		b.ReportMetric(rss, "rss-mb")
		b.ReportMetric(float64(renewals), "renewals")
	}
}

func runRotationBench(b *testing.B, workloads int, period time.Duration) (cpuPct, msPerRot, rssMB float64, renewals int64) {
	spec := childSpec{Workloads: workloads, Dir: shortDir(b), TTL: 2 * period}
	raw, _ := json.Marshal(spec)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), benchChildEnv+"="+string(raw))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		stdin.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "READY\n" {
		b.Fatalf("child did not start: %q %v", line, err)
	}
	pid := cmd.Process.Pid

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
	var received atomic.Int64 // messages after each stream's first
	var first sync.WaitGroup
	var wg sync.WaitGroup
	errs := make(chan error, workloads)
	first.Add(workloads)
	for i := range workloads {
		cc, err := grpc.NewClient("unix://"+spec.socket(i), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		defer cc.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
			for n := 0; err == nil; n++ {
				var msg *workload.X509SVIDResponse
				if msg, err = s.Recv(); err != nil {
					break
				}
				// Treat each message as a workload would: parse the SVID.
				if _, err = x509.ParseCertificate(msg.Svids[0].X509Svid); err != nil {
					break
				}
				if n == 0 {
					first.Done()
				} else {
					received.Add(1)
				}
			}
			if ctx.Err() == nil {
				errs <- err
			}
		}()
	}
	defer wg.Wait()
	defer cancel()
	waitCh := make(chan struct{})
	go func() { first.Wait(); close(waitCh) }()
	select {
	case <-waitCh:
	case err := <-errs:
		b.Fatalf("workload stream: %v", err)
	case <-time.After(60 * time.Second):
		b.Fatal("workloads did not all get a first SVID within 60s")
	}

	measure := func(d time.Duration) (time.Duration, int64) {
		c0, err := procCPU(pid)
		if err != nil {
			b.Fatal(err)
		}
		r0 := received.Load()
		select {
		case <-time.After(d):
		case err := <-errs:
			b.Fatalf("workload stream: %v", err)
		}
		c1, err := procCPU(pid)
		if err != nil {
			b.Fatal(err)
		}
		return c1 - c0, received.Load() - r0
	}
	idleWindow := period / 2
	idleCPU, idleRenewals := measure(idleWindow)
	if idleRenewals != 0 {
		b.Fatalf("%d renewals before half-life", idleRenewals)
	}
	window := 2 * period
	cpu, renewals := measure(window)
	if renewals < int64(workloads) {
		b.Fatalf("only %d renewals in %s for %d workloads", renewals, window, workloads)
	}
	idleRate := idleCPU.Seconds() / idleWindow.Seconds()
	perRotation := max(cpu.Seconds()-idleRate*window.Seconds(), 0) / float64(renewals)
	cpuPct = 100 * (idleRate + perRotation*float64(workloads)/60)
	if rssMB, err = procMemMB(pid, "VmHWM"); err != nil {
		b.Fatal(err)
	}
	return cpuPct, perRotation * 1000, rssMB, renewals
}

// BenchmarkSVIDIssuance measures, as a workload sees it, the latency of
// getting a freshly minted X.509-SVID: go-spiffe's client dials a
// per-workload socket, the issuer attests it, generates a key, signs and
// answers. Every sample is a distinct workload, so none is served from cache.
func BenchmarkSVIDIssuance(b *testing.B) {
	const samples = 400
	dir := shortDir(b)
	cfg := Config{
		TrustDomain: spiffeid.RequireTrustDomainFromString("bench.fedmesh.test"),
		DataDir:     filepath.Join(dir, "data"),
		SocketPath:  filepath.Join(dir, "api.sock"),
	}
	sock := func(i int) string { return filepath.Join(dir, fmt.Sprintf("w%04d.sock", i)) }
	for i := range samples {
		cfg.Entries = append(cfg.Entries, Entry{SPIFFEID: fmt.Sprintf("spiffe://bench.fedmesh.test/ns/bench/sa/w%04d", i), Socket: sock(i)})
	}
	for range b.N {
		iss, err := New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		if err := iss.Start(); err != nil {
			b.Fatal(err)
		}
		lat := make([]time.Duration, 0, samples)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		for i := range samples {
			start := time.Now()
			svid, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+sock(i)))
			if err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
			if svid.ID.String() != cfg.Entries[i].SPIFFEID {
				b.Fatalf("got %s, want %s", svid.ID, cfg.Entries[i].SPIFFEID)
			}
		}
		cancel()
		iss.Stop()
		if got := metricValue(b, iss.metrics.x509Issued); got != samples {
			b.Fatalf("issued %v svids, want %d (one per sample)", got, samples)
		}
		slices.Sort(lat)
		b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
		b.ReportMetric(ms(lat[len(lat)*99/100]), "p99-ms")
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
