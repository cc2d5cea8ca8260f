package sidecar_test

import (
	"bufio"
	"bytes"
	"cmp"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// Benchmark shape, from issue 5.
const (
	benchRate  = 2000 // req/s, fixed-rate runs
	benchConns = 16
	fixedFor   = 3 * time.Second
	maxFor     = 2 * time.Second
)

var benchReq = []byte("GET / HTTP/1.1\r\nHost: checkout\r\nUser-Agent: fedmesh-bench\r\n\r\n")

// loadConn is one persistent HTTP/1.1 client connection of the generator.
type loadConn struct {
	addr string
	c    net.Conn
	br   *bufio.Reader
}

func (lc *loadConn) do() (by string, err error) {
	if lc.c == nil {
		if lc.c, err = net.DialTimeout("tcp", lc.addr, 2*time.Second); err != nil {
			return "", err
		}
		lc.br = bufio.NewReaderSize(lc.c, 8192)
	}
	_ = lc.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err = lc.c.Write(benchReq); err == nil {
		var resp *http.Response
		if resp, err = http.ReadResponse(lc.br, nil); err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			by = resp.Header.Get("X-Served-By")
			if err == nil && resp.StatusCode != 200 {
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
		}
	}
	if err != nil {
		lc.c.Close()
		lc.c = nil
	}
	return by, err
}

// fixedRate is an open-loop generator: each of conns connections sends on
// its own fixed schedule; latency counts from the scheduled time, so a
// stall is not hidden (no coordinated omission). Bounded by d.
func fixedRate(addr string, rate, conns int, d time.Duration, each func(at time.Time, by string, err error)) (lat []time.Duration, failed int) {
	interval := time.Duration(int64(time.Second) * int64(conns) / int64(rate))
	start := time.Now().Add(20 * time.Millisecond)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range conns {
		wg.Go(func() {
			lc := &loadConn{addr: addr}
			defer func() {
				if lc.c != nil {
					lc.c.Close()
				}
			}()
			local := make([]time.Duration, 0, int(d/interval)+1)
			bad := 0
			for k := 0; ; k++ {
				at := start.Add(time.Duration(k)*interval + time.Duration(w)*interval/time.Duration(conns))
				if at.Sub(start) >= d {
					break
				}
				if wait := time.Until(at); wait > 0 {
					time.Sleep(wait)
				}
				by, err := lc.do()
				done := time.Now()
				if each != nil {
					each(done, by, err)
				}
				if err != nil {
					bad++
					continue
				}
				local = append(local, done.Sub(at))
			}
			mu.Lock()
			lat = append(lat, local...)
			failed += bad
			mu.Unlock()
		})
	}
	wg.Wait()
	slices.Sort(lat)
	return lat, failed
}

// maxRate is a closed loop: conns connections as fast as they go for d.
func maxRate(addr string, conns int, d time.Duration) (rps float64, failed int) {
	var ok, bad atomic.Int64
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	for range conns {
		wg.Go(func() {
			lc := &loadConn{addr: addr}
			for time.Now().Before(stop) {
				if _, err := lc.do(); err != nil {
					bad.Add(1)
				} else {
					ok.Add(1)
				}
			}
			if lc.c != nil {
				lc.c.Close()
			}
		})
	}
	wg.Wait()
	return float64(ok.Load()) / d.Seconds(), int(bad.Load())
}

func pct(lat []time.Duration, p float64) float64 {
	if len(lat) == 0 {
		return 0
	}
	return float64(lat[min(len(lat)-1, int(float64(len(lat))*p))]) / 1e6
}

func freePort(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func waitListening(t testing.TB, addr string, p *proc) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not listening after 10s; %s says:\n%s", addr, p.cmd.Path, p.log)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// proc is a child process whose memory and CPU we read from /proc.
type proc struct {
	cmd *exec.Cmd
	log *bytes.Buffer
}

func startProc(t testing.TB, name string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(name, args...), log: &bytes.Buffer{}}
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	p.cmd.Env = append(os.Environ(), "GOMAXPROCS="+cmp.Or(os.Getenv("BENCH_SIDECAR_GOMAXPROCS"), "2"))
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	})
	return p
}

// pids is the process and, for a master/worker program, its children.
func (p *proc) pids() []int {
	out := []int{p.cmd.Process.Pid}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", p.cmd.Process.Pid, p.cmd.Process.Pid))
	if err == nil {
		for f := range strings.FieldsSeq(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				out = append(out, n)
			}
		}
	}
	return out
}

func statusKB(pid int, field string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return n
		}
	}
	return 0
}

// kb sums a /proc/<pid>/status field (kB) over the process and its children.
func (p *proc) kb(field string) float64 {
	sum := 0.0
	for _, pid := range p.pids() {
		sum += statusKB(pid, field)
	}
	return sum
}

// rssMB is the resident set in MB; peak uses VmHWM.
func (p *proc) rssMB(peak bool) float64 {
	field := "VmRSS"
	if peak {
		field = "VmHWM"
	}
	sum := 0.0
	for _, pid := range p.pids() {
		sum += statusKB(pid, field)
	}
	return sum / 1024
}

// switches counts the context switches of every thread.
func (p *proc) switches() (n int64) {
	for _, pid := range p.pids() {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
		for _, f := range tasks {
			b, _ := os.ReadFile(f)
			for line := range strings.SplitSeq(string(b), "\n") {
				if k, v, ok := strings.Cut(line, ":"); ok && strings.HasSuffix(k, "voluntary_ctxt_switches") {
					x, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
					n += x
				}
			}
		}
	}
	return n
}

// cpu is the CPU time of every thread, from schedstat (ns, not 10ms ticks).
func (p *proc) cpu() time.Duration {
	var sum int64
	for _, pid := range p.pids() {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
		for _, f := range tasks {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			n, _ := strconv.ParseInt(strings.Fields(string(b))[0], 10, 64)
			sum += n
		}
	}
	return time.Duration(sum)
}

func buildSidecar(b *testing.B) string {
	if bin := os.Getenv("BENCH_SIDECAR_BIN"); bin != "" { // A/B runs against another build
		return bin
	}
	bin, err := testutil.BuildCommand(b.TempDir(), "fedmesh-sidecar")
	if err != nil {
		b.Fatal(err)
	}
	return bin
}

// haproxyBin returns haproxy's path, installing Debian's package when it is
// missing and we are root, or "" with the reason.
func haproxyBin() (string, string) {
	if p, err := exec.LookPath("haproxy"); err == nil {
		return p, ""
	}
	if os.Getuid() != 0 {
		return "", "haproxy is not installed and we are not root to apt-get install it"
	}
	if out, err := exec.Command("apt-get", "install", "-y", "haproxy").CombinedOutput(); err != nil {
		return "", fmt.Sprintf("apt-get install -y haproxy: %v: %s", err, out)
	}
	p, err := exec.LookPath("haproxy")
	if err != nil {
		return "", "haproxy not found after install"
	}
	return p, ""
}

// pemFiles writes the workload's SVID (chain then key) and its trust bundle.
func pemFiles(b *testing.B, dom *gatewaytest.Domain, dir string) (crt, ca string) {
	src := dom.Source(b, "web")
	svid, err := src.GetX509SVID()
	if err != nil {
		b.Fatal(err)
	}
	certs, key, err := svid.Marshal()
	if err != nil {
		b.Fatal(err)
	}
	crt = filepath.Join(dir, "svid.pem")
	if err := os.WriteFile(crt, append(certs, key...), 0o600); err != nil {
		b.Fatal(err)
	}
	bundle, err := src.GetX509BundleForTrustDomain(dom.TD)
	if err != nil {
		b.Fatal(err)
	}
	var buf bytes.Buffer
	for _, c := range bundle.X509Authorities() {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	ca = filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, buf.Bytes(), 0o600); err != nil {
		b.Fatal(err)
	}
	return crt, ca
}

// startHAProxyPair runs client-side A (plain in, TLS 1.3 with a client
// certificate out) and server-side B (TLS in, verifying the client
// certificate, plain to the app), in mode http or tcp.
func startHAProxyPair(b *testing.B, bin, mode, dir, crt, ca, app string) (front string, a, bb *proc) {
	front, mid := freePort(b), freePort(b)
	reuse := ""
	if mode == "http" {
		reuse = "  http-reuse always\n"
	}
	common := "global\n  maxconn 4000\n  nbthread 2\ndefaults\n  mode " + mode + "\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n" + reuse
	cfgA := common + fmt.Sprintf("frontend fa\n  bind %s\n  default_backend ba\nbackend ba\n%s  server b %s ssl crt %s ca-file %s verify required ssl-min-ver TLSv1.3 alpn http/1.1\n",
		front, reuse, mid, crt, ca)
	cfgB := common + fmt.Sprintf("frontend fb\n  bind %s ssl crt %s ca-file %s verify required ssl-min-ver TLSv1.3 alpn http/1.1\n  default_backend bb\nbackend bb\n%s  server app %s\n",
		mid, crt, ca, reuse, app)
	for name, cfg := range map[string]string{"a-" + mode: cfgA, "b-" + mode: cfgB} {
		if err := os.WriteFile(filepath.Join(dir, name+".cfg"), []byte(cfg), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	bb = startProc(b, bin, "-db", "-f", filepath.Join(dir, "b-"+mode+".cfg"))
	a = startProc(b, bin, "-db", "-f", filepath.Join(dir, "a-"+mode+".cfg"))
	waitListening(b, mid, bb)
	waitListening(b, front, a)
	return front, a, bb
}

type pathFigures struct {
	lat    []time.Duration
	p50    float64
	p99    float64
	rps    float64
	cpu    time.Duration // of the path's proxies over its fixed-rate slices
	maxCPU time.Duration // of the path's proxies over its max-rate slices
	maxN   float64       // requests answered in the max-rate slices
	// Context switches of the path's proxies, and the machine's idle and
	// total CPU ticks, over the max-rate slices: a path whose proxies
	// sleep and wake more leaves the CPUs idle while requests wait.
	maxSwitches int64
	idle, ticks int64
	failed      int
}

// path is one way from the load generator to the app.
type path struct {
	name  string
	addr  string
	procs []*proc
	fig   pathFigures
}

func (p *path) switches() (n int64) {
	for _, pr := range p.procs {
		n += pr.switches()
	}
	return n
}

func (p *path) cpu() (d time.Duration) {
	for _, pr := range p.procs {
		d += pr.cpu()
	}
	return d
}

// interleave calls f for every path in every round, every other round in
// reverse, so that no path always follows the same one.
func interleave(rounds int, paths []*path, f func(p *path)) {
	for r := range rounds {
		for i := range paths {
			if r%2 == 1 {
				i = len(paths) - 1 - i
			}
			f(paths[i])
		}
	}
}

// measureInterleaved runs the paths in turn, in short slices, so that the
// noise of a shared machine falls on all of them alike.
func measureInterleaved(b *testing.B, paths []*path) {
	for _, p := range paths {
		for range 50 { // warm connections and pools
			lc := &loadConn{addr: p.addr}
			if _, err := lc.do(); err != nil {
				b.Fatalf("warm-up request on %s path: %v", p.name, err)
			}
			lc.c.Close()
		}
	}
	const rounds = 3
	interleave(rounds, paths, func(p *path) {
		c0 := p.cpu()
		lat, failed := fixedRate(p.addr, benchRate, benchConns, fixedFor/rounds, nil)
		p.fig.cpu += p.cpu() - c0
		p.fig.lat = append(p.fig.lat, lat...)
		p.fig.failed += failed
	})
	interleave(rounds, paths, func(p *path) {
		c0, s0 := p.cpu(), p.switches()
		i0, t0 := idleTicks()
		rps, failed := maxRate(p.addr, benchConns, maxFor/rounds)
		i1, t1 := idleTicks()
		p.fig.maxSwitches += p.switches() - s0
		p.fig.idle += i1 - i0
		p.fig.ticks += t1 - t0
		p.fig.maxCPU += p.cpu() - c0
		p.fig.maxN += rps * (maxFor / rounds).Seconds()
		p.fig.rps += rps / rounds
		p.fig.failed += failed
	})
	for _, p := range paths {
		slices.Sort(p.fig.lat)
		p.fig.p50, p.fig.p99 = pct(p.fig.lat, 0.5), pct(p.fig.lat, 0.99)
	}
}

// benchRig is what the sidecar benchmarks start: the sidecar binary, an
// identity domain, a directory for files and the app.
type benchRig struct {
	b    *testing.B
	bin  string
	west *gatewaytest.Domain
	dir  string
	app  *app
}

func newBenchRig(b *testing.B) *benchRig {
	bin := buildSidecar(b)
	doms := gatewaytest.Start(b, []string{"west"}, nil)
	return &benchRig{b: b, bin: bin, west: doms["west"], dir: b.TempDir(), app: startApp(b, "app", "")}
}

// pair starts a server and a client sidecar for proto (http or tcp), with
// extra flags for both: the path named name, whose procs are the client
// and the server and whose address is the client's upstream listener.
func (r *benchRig) pair(name, proto string, extra ...string) *path {
	b := r.b
	serverIn, clientOut, serverAdmin, clientAdmin := freePort(b), freePort(b), freePort(b), freePort(b)
	epFile := filepath.Join(r.dir, "endpoints-"+serverIn[strings.LastIndex(serverIn, ":")+1:]+".json")
	set := fmt.Sprintf(`[{"namespace":"shop","service":"checkout","port":8080,"clusters":[{"name":"west","endpoints":[{"name":"s","addr":%q,"ready":true}]}]}]`, serverIn)
	if err := os.WriteFile(epFile, []byte(set), 0o600); err != nil {
		b.Fatal(err)
	}
	common := []string{"--cluster", "west", "--workload-api", r.west.Addr("web"), "--log-level", "warn"}
	server := startProc(b, r.bin, slices.Concat(common, extra, []string{"--inbound", serverIn, "--app", r.app.addr(), "--admin", serverAdmin})...)
	client := startProc(b, r.bin, slices.Concat(common, extra, []string{"--endpoints", epFile, "--upstream", "shop/checkout:8080=" + clientOut + "," + proto, "--admin", clientAdmin})...)
	waitListening(b, serverIn, server)
	waitListening(b, clientOut, client)
	return &path{name: name, addr: clientOut, procs: []*proc{client, server}}
}

// haproxy starts the HAProxy pair for proto in front of the app, installing
// HAProxy first when it is missing; nil and why when it cannot.
func (r *benchRig) haproxy(proto string) (*path, string) {
	hp, why := haproxyBin()
	if hp == "" {
		return nil, why
	}
	crt, ca := pemFiles(r.b, r.west, r.dir)
	front, a, b := startHAProxyPair(r.b, hp, proto, r.dir, crt, ca, r.app.addr())
	return &path{name: "haproxy", addr: front, procs: []*proc{a, b}}, ""
}

// benchPaths measures one protocol's paths side by side in one run:
// direct, through two fedmesh sidecars (child processes, mTLS between
// them), and through two HAProxy instances.
func benchPaths(b *testing.B, proto string) {
	if testing.Short() {
		b.Skip("short")
	}
	rig := newBenchRig(b)
	side := rig.pair("sidecar", proto)
	client, server := side.procs[0], side.procs[1]
	time.Sleep(time.Second) // settle before reading idle memory
	idleRSS := max(client.rssMB(false), server.rssMB(false))
	// Most of that RSS is the binary's own pages (file-backed, shared by
	// every sidecar on a node running the same binary); the anonymous part
	// (heap, stacks) is what each further sidecar costs.
	idleAnon := max(client.kb("RssAnon"), server.kb("RssAnon")) / 1024

	direct := &path{name: "direct", addr: rig.app.addr()}
	paths := []*path{direct, side}
	// The same pair with each fixed --socket-io mode (the default is
	// auto): the trade-off of raw socket I/O, measured in the same run.
	var modes []*path
	for _, m := range []string{"std", "raw"} {
		modes = append(modes, rig.pair(m, proto, "--socket-io", m))
	}
	hap, why := rig.haproxy(proto)
	if hap != nil {
		paths = append(paths, hap)
	} else {
		b.Logf("HAProxy comparison skipped: %s", why)
	}
	paths = append(paths, modes...)
	measureInterleaved(b, paths)

	d, s := direct.fig, side.fig
	if s.failed > 0 {
		b.Errorf("%d requests failed through the sidecars\nclient: %s\nserver: %s", s.failed, client.log, server.log)
	}
	perK := func(cpu time.Duration) float64 { // % of a core per proxy per 1,000 req/s
		return cpu.Seconds() / fixedFor.Seconds() / 2 / (benchRate / 1000.0) * 100
	}
	b.ReportMetric(d.p50, "direct-p50-ms")
	b.ReportMetric(d.p99, "direct-p99-ms")
	b.ReportMetric(d.rps, "direct-max-rps")
	b.ReportMetric(s.p50-d.p50, "added-p50-ms")
	b.ReportMetric(s.p99-d.p99, "added-p99-ms")
	b.ReportMetric(s.rps, "max-rps")
	b.ReportMetric(idleRSS, "rss-idle-mb")
	b.ReportMetric(idleAnon, "rss-anon-idle-mb")
	b.ReportMetric(max(client.kb("RssAnon"), server.kb("RssAnon"))/1024, "rss-anon-2000rps-mb")
	b.ReportMetric(max(client.rssMB(true), server.rssMB(true)), "rss-2000rps-mb")
	b.ReportMetric(perK(s.cpu), "cpu-pct-per-1k-rps")
	perReq := func(f pathFigures) float64 { // µs of CPU per request per proxy, at saturation
		return f.maxCPU.Seconds() * 1e6 / 2 / max(f.maxN, 1)
	}
	b.ReportMetric(perReq(s), "cpu-us-per-req-at-max")
	switchesPerReq := func(f pathFigures) float64 { // per proxy
		return float64(f.maxSwitches) / 2 / max(f.maxN, 1)
	}
	idlePct := func(f pathFigures) float64 { return 100 * float64(f.idle) / float64(max(f.ticks, 1)) }
	b.ReportMetric(switchesPerReq(s), "switches-per-req-at-max")
	b.ReportMetric(idlePct(s), "idle-pct-at-max")
	if hap == nil {
		return
	}
	h := hap.fig
	ha, hb := hap.procs[0], hap.procs[1]
	for _, m := range modes {
		f := m.fig
		if f.failed > 0 {
			b.Errorf("%d requests failed through the sidecars with --socket-io %s\nclient: %s\nserver: %s", f.failed, m.name, m.procs[0].log, m.procs[1].log)
		}
		b.ReportMetric(f.p50-d.p50, m.name+"-added-p50-ms")
		b.ReportMetric((f.p50-d.p50)/(h.p50-d.p50), m.name+"-added-p50-vs-haproxy")
		b.ReportMetric((f.p99-d.p99)/(h.p99-d.p99), m.name+"-added-p99-vs-haproxy")
		b.ReportMetric(f.rps/h.rps, m.name+"-max-rps-vs-haproxy")
		b.ReportMetric(perK(f.cpu), m.name+"-cpu-pct-per-1k-rps")
		b.ReportMetric(perReq(f), m.name+"-cpu-us-per-req-at-max")
	}
	if h.failed > 0 {
		b.Logf("%d requests failed through HAProxy\nA: %s\nB: %s", h.failed, ha.log, hb.log)
	}
	hAdd50, hAdd99 := h.p50-d.p50, h.p99-d.p99
	b.ReportMetric(hAdd50, "haproxy-added-p50-ms")
	b.ReportMetric(hAdd99, "haproxy-added-p99-ms")
	b.ReportMetric(h.rps, "haproxy-max-rps")
	b.ReportMetric(max(ha.rssMB(true), hb.rssMB(true)), "haproxy-rss-mb")
	b.ReportMetric(perK(h.cpu), "haproxy-cpu-pct-per-1k-rps")
	b.ReportMetric(perReq(h), "haproxy-cpu-us-per-req-at-max")
	b.ReportMetric(switchesPerReq(h), "haproxy-switches-per-req-at-max")
	b.ReportMetric(idlePct(h), "haproxy-idle-pct-at-max")
	b.ReportMetric((s.p50-d.p50)/hAdd50, "added-p50-vs-haproxy")
	b.ReportMetric((s.p99-d.p99)/hAdd99, "added-p99-vs-haproxy")
	b.ReportMetric(s.rps/h.rps, "max-rps-vs-haproxy")
}

// BenchmarkSidecarHTTP: client -> sidecar -> sidecar (mTLS) -> server,
// HTTP/1.1, against direct and an HAProxy pair.
func BenchmarkSidecarHTTP(b *testing.B) {
	for b.Loop() {
		benchPaths(b, "http")
	}
}

// BenchmarkSidecarTCP: the same path with the upstream in opaque TCP mode.
func BenchmarkSidecarTCP(b *testing.B) {
	for b.Loop() {
		benchPaths(b, "tcp")
	}
}

// BenchmarkSidecarFailover: at a fixed 2,000 req/s through a client sidecar
// (in process) with two west backends and two east backends behind a real
// gateway pair, kill both west backends; time from the kill to the first
// answer from east, and failed requests. Three rounds, with failback
// between them.
func BenchmarkSidecarFailover(b *testing.B) {
	for b.Loop() {
		benchFailover(b)
	}
}

func benchFailover(b *testing.B) {
	doms := gatewaytest.Start(b, []string{"west", "east"}, [][2]string{{"west", "east"}})
	west, east := doms["west"], doms["east"]
	w1 := startBackend(b, west, "west-1", []spiffeid.TrustDomain{east.TD}, nil)
	w2 := startBackend(b, west, "west-2", []spiffeid.TrustDomain{east.TD}, nil)
	e1 := startBackend(b, east, "east-1", []spiffeid.TrustDomain{west.TD}, nil)
	e2 := startBackend(b, east, "east-2", []spiffeid.TrustDomain{west.TD}, nil)
	eastCat := &gateway.StaticCatalog{}
	eastCat.Set("shop", "checkout", 8080, gwEndpoints(e1, e2)...)
	eastGW := startGateway(b, east, eastCat, nil, []spiffeid.TrustDomain{west.TD})
	westGW := startGateway(b, west, &gateway.StaticCatalog{}, []gateway.Peer{{
		Cluster: "east", TrustDomain: east.TD, Addrs: []string{eastGW.TunnelAddr().String()},
	}}, nil)
	waitFor(b, "west gateway connected to east", 10*time.Second, func() bool { return westGW.ClusterUp("east") })
	src := &endpoints.Static{}
	src.Update(endpoints.Set{Namespace: "shop", Service: "checkout", Port: 8080, Clusters: []endpoints.Cluster{
		{Name: "east", Gateway: true, RTT: endpoints.Duration(time.Millisecond), Endpoints: []endpoints.Endpoint{{Name: "east-1", Ready: true}, {Name: "east-2", Ready: true}}},
		{Name: "west", Endpoints: eps(w1, w2)},
	}})
	client := startSidecar(b, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Federated: []spiffeid.TrustDomain{east.TD},
		Source: west.Source(b, "web"), Endpoints: src, GatewayEgress: westGW.EgressAddr().String(),
		Upstreams: []sidecar.Upstream{{Namespace: "shop", Service: "checkout", Port: 8080, Listen: "127.0.0.1:0"}},
	})
	waitFor(b, "client ready", 5*time.Second, client.Ready)
	addr := client.UpstreamAddr(0).String()

	var worst time.Duration
	var failedTotal int
	for round := range 3 {
		var mu sync.Mutex
		var killedAt, firstEast time.Time
		var fromWestAfterKill int
		each := func(at time.Time, by string, err error) {
			mu.Lock()
			defer mu.Unlock()
			if killedAt.IsZero() || err != nil {
				return
			}
			if strings.HasPrefix(by, "east-") && firstEast.IsZero() {
				firstEast = at
			}
			if strings.HasPrefix(by, "west-") && at.After(killedAt.Add(50*time.Millisecond)) {
				fromWestAfterKill++
			}
		}
		done := make(chan int, 1)
		go func() {
			_, failed := fixedRate(addr, benchRate, benchConns, 2*time.Second, each)
			done <- failed
		}()
		time.Sleep(700 * time.Millisecond)
		mu.Lock()
		killedAt = time.Now()
		mu.Unlock()
		w1.kill()
		w2.kill()
		failed := <-done
		failedTotal += failed
		mu.Lock()
		if firstEast.IsZero() {
			b.Fatalf("round %d: no answer from east after the kill", round)
		}
		if fromWestAfterKill > 0 {
			// Both west pods are dead: an answer from west more than 50 ms
			// after the kill means the kill did not take, and the figure
			// would time nothing.
			b.Fatalf("round %d: %d answers from west more than 50 ms after both west pods were killed", round, fromWestAfterKill)
		}
		worst = max(worst, firstEast.Sub(killedAt))
		mu.Unlock()
		w1 = w1.restart()
		w2 = w2.restart()
		waitFor(b, "failback", 10*time.Second, func() bool {
			lc := &loadConn{addr: addr}
			by, err := lc.do()
			if lc.c != nil {
				lc.c.Close()
			}
			return err == nil && strings.HasPrefix(by, "west-") && client.State().Upstreams[0].Loads[0] == 1
		})
	}
	b.ReportMetric(float64(worst)/1e6, "first-remote-ms")
	b.ReportMetric(float64(failedTotal), "failed-requests")
}

// rawBackend is a minimal mTLS HTTP/1.1 server standing for a backend's
// sidecar: it reads request heads without a body and answers 1 KiB from a
// canned response, so that a benchmark's allocations are the client
// sidecar's.
func rawBackend(b *testing.B, dom *gatewaytest.Domain, name string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	cfg := mtls.ServerConfig(dom.Source(b, "web"), mtls.MemberOf(dom.TD))
	resp := []byte("HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nX-Served-By: " + name + "\r\n\r\n" + strings.Repeat("x", 1024))
	testutil.Serve(ln, func(c net.Conn) {
		tc := tls.Server(c, cfg)
		br := bufio.NewReaderSize(tc, 4096)
		for {
			for { // request head, no body
				line, err := br.ReadSlice('\n')
				if err != nil {
					return
				}
				if len(line) <= 2 {
					break
				}
			}
			if _, err := tc.Write(resp); err != nil {
				return
			}
		}
	})
	return ln.Addr().String()
}

// rawClient sends benchReq on one connection and reads each answer by its
// Content-Length, allocating nothing per request.
type rawClient struct {
	c  net.Conn
	br *bufio.Reader
}

func (rc *rawClient) do() error {
	if _, err := rc.c.Write(benchReq); err != nil {
		return err
	}
	n := -1
	status := ""
	for {
		line, err := rc.br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if status == "" {
			status = "x"
			if !bytes.HasPrefix(line, []byte("HTTP/1.1 200")) {
				return fmt.Errorf("answer %q", line)
			}
			continue
		}
		if len(line) <= 2 {
			break
		}
		if v, ok := bytes.CutPrefix(line, []byte("Content-Length: ")); ok {
			n = 0
			for _, ch := range bytes.TrimSpace(v) {
				n = n*10 + int(ch-'0')
			}
		}
	}
	if n < 0 {
		return errors.New("no content length")
	}
	_, err := rc.br.Discard(n)
	return err
}

// BenchmarkRoutedRequest: HTTP requests through one in-process client
// sidecar to minimal mTLS backends, on an upstream without policy ("none")
// and on one whose policy is a 2-backend weighted rule ("routed"), in
// interleaved slices on one connection each. Reports time and allocations
// per request (allocations of the whole process, which are the client
// sidecar's but for the benchmark's own few).
func BenchmarkRoutedRequest(b *testing.B) {
	for b.Loop() {
		benchRouted(b)
	}
}

func benchRouted(b *testing.B) {
	doms := gatewaytest.Start(b, []string{"west"}, nil)
	west := doms["west"]
	be1, be2 := rawBackend(b, west, "v1"), rawBackend(b, west, "v2")
	set := func(svc string, addr string, p *policy.Service) endpoints.Set {
		return endpoints.Set{Namespace: "shop", Service: svc, Port: 8080, Policy: p, Clusters: []endpoints.Cluster{
			{Name: "west", Endpoints: []endpoints.Endpoint{{Name: svc, Addr: addr, Ready: true}}}}}
	}
	src := &endpoints.Static{}
	src.Update(set("plain", be1, nil))
	src.Update(set("v1", be1, nil))
	src.Update(set("v2", be2, nil))
	src.Update(set("routed", be1, &policy.Service{Namespace: "shop", Name: "routed", Rules: []policy.Rule{{
		Route: "HTTPRoute shop/split", Match: policy.Match{Path: &policy.PathMatch{Type: policy.PathPrefix, Value: "/"}},
		Backends: []policy.Backend{
			{Kind: policy.KindService, Namespace: "shop", Name: "v1", Port: 8080, Weight: 50},
			{Kind: policy.KindServiceImport, Namespace: "shop", Name: "v2", Port: 8080, Weight: 50},
		},
	}}}))
	client := startSidecar(b, "client", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(b, "web"), Endpoints: src, NoActiveChecks: true,
		Upstreams: []sidecar.Upstream{
			{Namespace: "shop", Service: "plain", Port: 8080, Listen: "127.0.0.1:0"},
			{Namespace: "shop", Service: "routed", Port: 8080, Listen: "127.0.0.1:0"},
		},
	})
	waitFor(b, "client ready", 5*time.Second, client.Ready)
	clients := make([]*rawClient, 2)
	for i := range clients {
		c, err := net.Dial("tcp", client.UpstreamAddr(i).String())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Minute))
		clients[i] = &rawClient{c: c, br: bufio.NewReaderSize(c, 8192)}
		for range 200 { // warm pools and the second backend's set
			if err := clients[i].do(); err != nil {
				b.Fatalf("warm-up: %v", err)
			}
		}
	}
	const rounds, perSlice = 10, 500
	var dur [2]time.Duration
	var allocs [2]uint64
	var ms runtime.MemStats
	for range rounds {
		for i, rc := range clients {
			runtime.ReadMemStats(&ms)
			m0, t0 := ms.Mallocs, time.Now()
			for range perSlice {
				if err := rc.do(); err != nil {
					b.Fatalf("request: %v", err)
				}
			}
			dur[i] += time.Since(t0)
			runtime.ReadMemStats(&ms)
			allocs[i] += ms.Mallocs - m0
		}
	}
	n := float64(rounds * perSlice)
	b.ReportMetric(float64(dur[0].Microseconds())/n, "none-us-per-req")
	b.ReportMetric(float64(allocs[0])/n, "none-allocs-per-req")
	b.ReportMetric(float64(dur[1].Microseconds())/n, "routed-us-per-req")
	b.ReportMetric(float64(allocs[1])/n, "routed-allocs-per-req")
}

// idleTicks reads the machine's idle (idle + iowait) and total CPU ticks:
// user, nice, system, idle, iowait, irq, softirq, steal (guest time is
// already counted in user).
func idleTicks() (idle, total int64) {
	b, _ := os.ReadFile("/proc/stat")
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 {
		return 0, 0
	}
	for i, f := range f[1:9] {
		n, _ := strconv.ParseInt(f, 10, 64)
		total += n
		if i == 3 || i == 4 {
			idle += n
		}
	}
	return
}
