package issuer

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/fedmesh/fedmesh/internal/testutil"
)

// fakeClock is a Clock whose time moves only when the test says so.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c     *fakeClock
	when  time.Time
	ch    chan time.Time
	fired bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Now()} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, when: c.now.Add(d), ch: make(chan time.Time, 1)}
	if d <= 0 {
		t.fired = true
		t.ch <- c.now
		return t
	}
	c.timers = append(c.timers, t)
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.ch }

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	for i, o := range t.c.timers {
		if o == t {
			t.c.timers = append(t.c.timers[:i], t.c.timers[i+1:]...)
			return true
		}
	}
	return false
}

// Advance moves time forward and fires every timer that is due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, t := range c.timers {
		if !t.when.After(c.now) {
			t.fired = true
			t.ch <- c.now
			continue
		}
		kept = append(kept, t)
	}
	c.timers = kept
}

// waitForTimerBefore waits (bounded) until some goroutine sleeps on a timer
// due at or before deadline: the rotator has seen the state the test made.
func (c *fakeClock) waitForTimerBefore(t *testing.T, deadline time.Time) {
	t.Helper()
	waitFor(t, "a timer due before "+deadline.Format(time.RFC3339), func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, tm := range c.timers {
			if !tm.when.After(deadline) {
				return true
			}
		}
		return false
	})
}

// earliest is the due time of the earliest pending timer.
func (c *fakeClock) earliest() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	var e time.Time
	for _, tm := range c.timers {
		if e.IsZero() || tm.when.Before(e) {
			e = tm.when
		}
	}
	return e
}

// waitFor polls cond every 5ms for at most 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// shortDir returns a short temporary directory: unix socket paths must stay
// under 108 bytes, which t.TempDir() does not promise.
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "fm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// self returns selectors that describe the test process itself.
func self(t testing.TB) []string {
	t.Helper()
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	return []string{
		"unix:uid:" + strconv.Itoa(os.Getuid()),
		"unix:gid:" + strconv.Itoa(os.Getgid()),
		"unix:pid:" + strconv.Itoa(os.Getpid()),
		"unix:path:" + exe,
	}
}

type testIssuer struct {
	*Issuer
	dir  string
	reg  *prometheus.Registry
	logs *testutil.SyncBuffer
}

func (ti *testIssuer) addr() string { return "unix://" + ti.cfg.SocketPath }

// newTestConfig is a config for trust domain td with one entry for the test
// process, rooted in a fresh short directory.
func newTestConfig(t testing.TB, td string) Config {
	t.Helper()
	dir := shortDir(t)
	trustDomain := spiffeid.RequireTrustDomainFromString(td)
	return Config{
		TrustDomain: trustDomain,
		DataDir:     filepath.Join(dir, "data"),
		SocketPath:  filepath.Join(dir, "api.sock"),
		Entries: []Entry{{
			SPIFFEID:  "spiffe://" + td + "/ns/shop/sa/checkout",
			Selectors: self(t),
		}},
	}
}

// startIssuer creates and starts an issuer and stops it at cleanup.
func startIssuer(t testing.TB, cfg Config) *testIssuer {
	t.Helper()
	ti := newTestIssuer(t, cfg)
	if err := ti.Start(); err != nil {
		t.Fatalf("start issuer: %v", err)
	}
	return ti
}

// newTestIssuer creates an issuer (not started) and stops it at cleanup.
func newTestIssuer(t testing.TB, cfg Config) *testIssuer {
	t.Helper()
	logs := &testutil.SyncBuffer{}
	reg := prometheus.NewRegistry()
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.Registry = reg
	iss, err := New(cfg)
	if err != nil {
		t.Fatalf("new issuer: %v", err)
	}
	t.Cleanup(func() {
		iss.Stop()
		if t.Failed() {
			t.Logf("issuer %s logs:\n%s", cfg.TrustDomain.Name(), logs.String())
		}
	})
	return &testIssuer{Issuer: iss, dir: filepath.Dir(cfg.DataDir), reg: reg, logs: logs}
}

// newSource opens a go-spiffe X509Source on the issuer's socket.
func newSource(t testing.TB, addr string) *workloadapi.X509Source {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	if err != nil {
		t.Fatalf("new x509 source at %s: %v", addr, err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}
