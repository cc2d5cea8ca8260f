package health

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func TestEjectionBacksOffExponentially(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var ejected []time.Duration
		g := NewGroup(Config{BaseEjection: time.Second, MaxEjection: 4 * time.Second,
			OnEject: func(_ string, _ Reason, d time.Duration) { ejected = append(ejected, d) }})
		o := g.Add("a")
		g.Add("b") // a second member so that the cap allows one ejection
		for _, want := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second} {
			for range DefaultConsecutive5xx - 1 {
				o.Report(ServerFailure)
			}
			if o.Ejected(time.Now()) {
				t.Fatal("ejected before the threshold")
			}
			o.Report(ServerFailure)
			if !o.Ejected(time.Now()) {
				t.Fatal("not ejected at the threshold")
			}
			time.Sleep(want - time.Millisecond)
			if !o.Ejected(time.Now()) {
				t.Fatalf("returned before %s", want)
			}
			time.Sleep(time.Millisecond)
			if o.Ejected(time.Now()) {
				t.Fatalf("still ejected after %s", want)
			}
		}
		if len(ejected) != 4 {
			t.Fatalf("OnEject called %d times", len(ejected))
		}
		// In for MaxEjection: the count is forgotten.
		time.Sleep(4 * time.Second)
		o.Report(ConnectFailure)
		if d := ejected[len(ejected)-1]; d != time.Second {
			t.Fatalf("ejection after a quiet period lasts %s, want the base 1s", d)
		}
	})
}

func TestSuccessResetsConsecutiveCount(t *testing.T) {
	g := NewGroup(Config{})
	o := g.Add("a")
	g.Add("b")
	for range 10 {
		for range DefaultConsecutive5xx - 1 {
			o.Report(ServerFailure)
		}
		o.Report(Success)
	}
	if o.Ejected(time.Now()) {
		t.Fatal("ejected without consecutive failures")
	}
}

func TestMaxEjectedPercentCapsOnly5xx(t *testing.T) {
	g := NewGroup(Config{MaxEjectedPercent: 50})
	var os []*Outlier
	for _, n := range []string{"a", "b", "c", "d"} {
		os = append(os, g.Add(n))
	}
	fail := func(o *Outlier, r Result, n int) {
		for range n {
			o.Report(r)
		}
	}
	for _, o := range os {
		fail(o, ServerFailure, DefaultConsecutive5xx)
	}
	n := 0
	for _, o := range os {
		if o.Ejected(time.Now()) {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d of 4 ejected for 5xx, want the 50%% cap: 2", n)
	}
	fail(os[3], ConnectFailure, 1)
	if !os[3].Ejected(time.Now()) {
		t.Fatal("connect failure over the cap was not ejected")
	}
}

func TestReturnEndsOnlyReachabilityEjections(t *testing.T) {
	g := NewGroup(Config{})
	a, b := g.Add("a"), g.Add("b")
	a.Report(ConnectFailure)
	for range DefaultConsecutive5xx {
		b.Report(ServerFailure)
	}
	a.Return()
	b.Return()
	if a.Ejected(time.Now()) {
		t.Error("connect-failure ejection not ended by a good probe")
	}
	if !b.Ejected(time.Now()) {
		t.Error("5xx ejection ended by a probe that only connects")
	}
	if s := b.State(time.Now()); !s.Ejected || s.Reason != ReasonConsecutive5xx || s.Ejections != 1 {
		t.Errorf("state %+v", s)
	}
}

func TestRunChecksJitteredEjectAndReturn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := NewGroup(Config{BaseEjection: time.Hour, MaxEjection: time.Hour})
		o := g.Add("a")
		var healthy atomic.Bool
		var probes []time.Time
		probe := func(ctx context.Context) error {
			probes = append(probes, time.Now())
			if healthy.Load() {
				return nil
			}
			return errors.New("down")
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			RunChecks(ctx, CheckConfig{Interval: time.Second, Jitter: 0.2}, func() []Target {
				return []Target{{Outlier: o, Probe: probe}}
			})
			close(done)
		}()
		time.Sleep(1300 * time.Millisecond)
		synctest.Wait()
		if o.Ejected(time.Now()) {
			t.Fatal("ejected after one failed probe, want two")
		}
		time.Sleep(1200 * time.Millisecond)
		synctest.Wait()
		if len(probes) != 2 || !o.Ejected(time.Now()) {
			t.Fatalf("%d probes, ejected=%v; want 2 and ejected", len(probes), o.Ejected(time.Now()))
		}
		healthy.Store(true)
		time.Sleep(1200 * time.Millisecond)
		synctest.Wait()
		if o.Ejected(time.Now()) {
			t.Fatal("a good probe did not return the endpoint")
		}
		for i := 1; i < len(probes); i++ {
			if d := probes[i].Sub(probes[i-1]); d < 800*time.Millisecond || d > 1200*time.Millisecond {
				t.Errorf("probe interval %s outside 1s±20%%", d)
			}
		}
		cancel()
		<-done
	})
}

func TestProbes(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/bad" {
			w.WriteHeader(503)
		}
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tests := []struct {
		name  string
		probe Probe
		ok    bool
	}{
		{"tcp up", TCPProbe(addr), true},
		{"tcp down", TCPProbe(closed), false},
		{"http ok", HTTPProbe(dial, "x", "/ok"), true},
		{"http 503", HTTPProbe(dial, "x", "/bad"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.probe(ctx); (err == nil) != tt.ok {
				t.Fatalf("probe: %v, want ok=%v", err, tt.ok)
			}
		})
	}
}
