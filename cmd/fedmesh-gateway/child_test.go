package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/internal/testutil"
)

// TestMain lets tests and benchmarks run the real gateway main in a child
// process: the test binary re-executes itself with FEDMESH_GATEWAY_CHILD=1,
// so RSS and CPU measured on the child are the gateway's own.
func TestMain(m *testing.M) {
	switch os.Getenv("FEDMESH_GATEWAY_CHILD") {
	case "gateway":
		runChildGateway()
		os.Exit(0)
	case "quicsink":
		if err := quicSink(); err != nil {
			fmt.Fprintln(os.Stderr, "quicsink:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runChildGateway runs the gateway main. FEDMESH_GATEWAY_CPUPROFILE=PREFIX
// writes PREFIX.PID.pprof when it stops (SIGTERM, see startChild's
// cleanup): profiles of the gateway processes of a benchmark.
func runChildGateway() {
	if prefix := os.Getenv("FEDMESH_GATEWAY_CPUPROFILE"); prefix != "" {
		f, err := os.Create(fmt.Sprintf("%s.%d.pprof", prefix, os.Getpid()))
		if err == nil && pprof.StartCPUProfile(f) == nil {
			defer f.Close()
			defer pprof.StopCPUProfile()
		}
	}
	main()
}

// child is a gateway (or quic sink) process.
type child struct {
	cmd    *exec.Cmd
	addrs  map[string]string // from the "serving k=v ..." line
	stderr *testutil.SyncBuffer
	done   chan error
}

// startChild runs this test binary as mode ("gateway" or "quicsink") with
// args, and waits for its "serving" line.
func startChild(t testing.TB, mode string, args ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	procs := os.Getenv("FEDMESH_BENCH_CHILD_PROCS") // to measure the scheduler's share
	if procs == "" {
		procs = "2"
	}
	cmd.Env = append(os.Environ(), "FEDMESH_GATEWAY_CHILD="+mode, "GOMAXPROCS="+procs)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, stderr: &testutil.SyncBuffer{}, addrs: map[string]string{}, done: make(chan error, 1)}
	cmd.Stderr = c.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	go func() { c.done <- cmd.Wait() }()
	t.Cleanup(func() {
		// SIGTERM first, so a gateway shuts down (and writes its profile).
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-c.done:
			c.done <- err
		case <-time.After(3 * time.Second):
			_ = cmd.Process.Kill()
		}
		<-c.done
		if t.Failed() {
			t.Logf("%s %v stderr:\n%s", mode, args, c.stderr.String())
		}
	})
	select {
	case line := <-lines:
		rest, ok := strings.CutPrefix(line, "serving ")
		if !ok {
			t.Fatalf("child said %q", line)
		}
		for _, kv := range strings.Fields(rest) {
			k, v, _ := strings.Cut(kv, "=")
			c.addrs[k] = v
		}
	case err := <-c.done:
		t.Fatalf("%s exited before serving: %v\n%s", mode, err, c.stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("%s not serving within 30s\n%s", mode, c.stderr.String())
	}
	return c
}

// terminate sends SIGTERM and returns the exit error (nil for status 0).
func (c *child) terminate(t testing.TB) error {
	t.Helper()
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-c.done:
		c.done <- err // for the cleanup
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("child did not exit within 10s of SIGTERM")
		return nil
	}
}

// writeCatalog writes a static catalog; services are "ns/name:port=endpoint".
func writeCatalog(t testing.TB, services ...string) string {
	t.Helper()
	var list []any
	for _, s := range services {
		key, ep, _ := strings.Cut(s, "=")
		nsName, port, _ := strings.Cut(key, ":")
		ns, name, _ := strings.Cut(nsName, "/")
		var p int
		fmt.Sscan(port, &p)
		eps := []string{}
		if ep != "" {
			eps = append(eps, ep)
		}
		list = append(list, map[string]any{"namespace": ns, "name": name, "port": p, "endpoints": eps})
	}
	data, _ := json.Marshal(map[string]any{"services": list})
	f := filepath.Join(t.TempDir(), "catalog.json")
	if err := os.WriteFile(f, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// startPair runs an east and a west gateway process with SVIDs from the
// domains' issuers; east exports the services (see writeCatalog).
func startPair(t testing.TB, doms map[string]*domain, services ...string) (west, east *child) {
	t.Helper()
	cat := writeCatalog(t, services...)
	east = startChild(t, "gateway", "--cluster", "east", "--spiffe-socket", doms["east"].Addr("gateway"),
		"--tunnel-addr", "127.0.0.1:0", "--egress-addr", "", "--admin-addr", "127.0.0.1:0",
		"--catalog", cat, "--federate", "west.fedmesh.test", "--log-level", "warn")
	west = startChild(t, "gateway", "--cluster", "west", "--spiffe-socket", doms["west"].Addr("gateway"),
		"--tunnel-addr", "127.0.0.1:0", "--egress-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
		"--catalog", writeCatalog(t, "none/none:1="), "--peer", "east="+east.addrs["tunnel"], "--log-level", "warn")
	return west, east
}
