package issuer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/fedmesh/fedmesh/internal/testutil"
)

// TestConfigErrors: bad configuration is refused with an error that names
// what is wrong.
func TestConfigErrors(t *testing.T) {
	base := func(t *testing.T) Config { return newTestConfig(t, "east.fedmesh.test") }
	westPeer := Peer{
		TrustDomain:       westTD,
		BundleEndpointURL: "https://127.0.0.1:8443",
		EndpointID:        spiffeid.RequireFromPath(westTD, "/fedmesh/issuer"),
		BundleFile:        "/dev/null",
	}
	tests := []struct {
		name    string
		mutate  func(c *Config)
		wantErr string
	}{
		{"ok", func(*Config) {}, ""},
		{"no trust domain", func(c *Config) { c.TrustDomain = spiffeid.TrustDomain{} }, "trust domain is required"},
		{"no data dir", func(c *Config) { c.DataDir = "" }, "data dir is required"},
		{"relative socket", func(c *Config) { c.SocketPath = "api.sock" }, "must be absolute"},
		{"ttl under 1m", func(c *Config) { c.SVIDTTL = 59 * time.Second }, "svid ttl 59s is under the minimum 1m0s"},
		{"ttl of 1m", func(c *Config) { c.SVIDTTL = time.Minute }, ""},
		{"ca ttl too short for svid ttl", func(c *Config) { c.SVIDTTL = 2 * time.Hour; c.CATTL = 4 * time.Hour }, "need ca ttl >= 8h0m0s"},
		{"ca ttl too short for refresh hint", func(c *Config) { c.SVIDTTL = time.Minute; c.CATTL = time.Hour; c.RefreshHint = 10 * time.Minute }, "need ca ttl >= 1h20m0s"},
		{"fractional refresh hint", func(c *Config) { c.RefreshHint = 1500 * time.Millisecond }, "whole number of seconds"},
		{"endpoint id of another trust domain", func(c *Config) { c.BundleEndpointID = spiffeid.RequireFromPath(westTD, "/x") }, "not in trust domain"},
		{"peer is self", func(c *Config) {
			p := westPeer
			p.TrustDomain = eastTD
			p.EndpointID = spiffeid.RequireFromPath(eastTD, "/x")
			c.Peers = []Peer{p}
		}, "own trust domain"},
		{"peer twice", func(c *Config) { c.Peers = []Peer{westPeer, westPeer} }, "listed twice"},
		{"peer http url", func(c *Config) { p := westPeer; p.BundleEndpointURL = "http://127.0.0.1:8443"; c.Peers = []Peer{p} }, "want an https://host:port URL"},
		{"peer endpoint id elsewhere", func(c *Config) {
			p := westPeer
			p.EndpointID = spiffeid.RequireFromPath(northTD, "/x")
			c.Peers = []Peer{p}
		}, "must be in the peer's trust domain"},
		{"entry of another trust domain", func(c *Config) { c.Entries[0].SPIFFEID = "spiffe://west.fedmesh.test/ns/a/sa/b" }, "is not the issuer's"},
		{"entry not ns/sa", func(c *Config) { c.Entries[0].SPIFFEID = "spiffe://east.fedmesh.test/web" }, "want /ns/<namespace>/sa/<serviceaccount>"},
		{"entry without selectors or socket", func(c *Config) { c.Entries[0].Selectors = nil }, "needs selectors or a socket"},
		{"bad selector type", func(c *Config) { c.Entries[0].Selectors = []string{"k8s:ns:default"} }, "want unix:"},
		{"bad selector kind", func(c *Config) { c.Entries[0].Selectors = []string{"unix:user:root"} }, "unknown unix selector"},
		{"non-numeric uid", func(c *Config) { c.Entries[0].Selectors = []string{"unix:uid:root"} }, "non-negative integer"},
		{"relative path selector", func(c *Config) { c.Entries[0].Selectors = []string{"unix:path:bin/x"} }, "must be absolute"},
		{"entry ttl under 1m", func(c *Config) { c.Entries[0].TTL = "30s" }, "under the minimum"},
		{"entry ttl garbage", func(c *Config) { c.Entries[0].TTL = "soon" }, "ttl"},
		{"entry federates with unknown", func(c *Config) { c.Entries[0].FederatesWith = []string{"west.fedmesh.test"} }, "not a configured federated trust domain"},
		{"entry socket is main socket", func(c *Config) { c.Entries[0].Socket = c.SocketPath }, "is the main socket"},
		{"two entries one socket", func(c *Config) {
			c.Entries[0].Socket = "/tmp/x.sock"
			c.Entries = append(c.Entries, Entry{SPIFFEID: "spiffe://east.fedmesh.test/ns/a/sa/b", Socket: "/tmp/x.sock"})
		}, "already used by entry 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base(t)
			tt.mutate(&c)
			_, err := New(c)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tt.wantErr != "" && err == nil:
				t.Fatalf("no error, want one containing %q", tt.wantErr)
			case tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr):
				t.Fatalf("error %q does not contain %q", err, tt.wantErr)
			}
		})
	}
}

// TestLoadEntries: the entries file is strict YAML (typos are errors).
func TestLoadEntries(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		body    string
		want    int
		wantErr string
	}{
		{"yaml", "entries:\n- spiffeID: spiffe://east.fedmesh.test/ns/a/sa/b\n  selectors: [\"unix:uid:1\"]\n  ttl: 5m\n", 1, ""},
		{"json", `{"entries":[{"spiffeID":"spiffe://east.fedmesh.test/ns/a/sa/b","socket":"/run/b.sock"}]}`, 1, ""},
		{"unknown field", "entries:\n- spiffeID: spiffe://east.fedmesh.test/ns/a/sa/b\n  selector: [\"unix:uid:1\"]\n", 0, "unknown field"},
		{"not yaml", "entries: [", 0, "parse entries file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "_")+".yaml")
			if err := os.WriteFile(p, []byte(tt.body), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := LoadEntries(p)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || len(got) != tt.want {
				t.Fatalf("got %d entries, %v; want %d", len(got), err, tt.want)
			}
		})
	}
}

// TestCARotationSchedule: driven by the clock alone, the CA prepares a new
// root at half its life, activates it at three quarters (re-issuing SVIDs)
// and drops the old root when it expires.
func TestCARotationSchedule(t *testing.T) {
	testutil.CheckGoroutines(t)
	clock := newFakeClock()
	cfg := newTestConfig(t, "east.fedmesh.test")
	cfg.Clock = clock
	cfg.CATTL = 24 * time.Hour
	cfg.SVIDTTL = time.Hour
	iss := startIssuer(t, cfg)
	src := newSource(t, iss.addr())
	first := iss.ca.signer().cert
	start := first.NotBefore.Add(backdate)

	roots := func() int { return len(iss.Bundle().X509Authorities()) }
	advanceTo := func(at time.Time) {
		t.Helper()
		clock.waitForTimerBefore(t, at)
		clock.Advance(at.Sub(clock.Now()))
	}
	steps := func(name string) float64 { return metricValue(t, iss.metrics.caSteps.WithLabelValues(name)) }

	// Before half-life: one root. (SVID renewals happen on the way.)
	for h := 1; h < 12; h++ {
		advanceTo(start.Add(time.Duration(h) * time.Hour))
	}
	if n := roots(); n != 1 {
		t.Fatalf("%d roots before half-life, want 1", n)
	}
	advanceTo(start.Add(12*time.Hour + time.Second))
	waitFor(t, "prepare at half-life", func() bool { return steps("prepare") == 1 })
	if n := roots(); n != 2 {
		t.Fatalf("%d roots after prepare, want 2", n)
	}
	if !iss.ca.signer().cert.Equal(first) {
		t.Fatal("prepared root signs before activation")
	}
	for h := 13; h <= 18; h++ {
		advanceTo(start.Add(time.Duration(h)*time.Hour + time.Second))
	}
	waitFor(t, "activate at three quarters", func() bool { return steps("activate") == 1 })
	second := iss.ca.signer().cert
	if second.Equal(first) {
		t.Fatal("signer unchanged after activation")
	}
	waitFor(t, "the workload to get an svid from the new ca", func() bool {
		s, err := src.GetX509SVID()
		return err == nil && s.Certificates[0].CheckSignatureFrom(second) == nil
	})
	for h := 19; h <= 24; h++ {
		advanceTo(start.Add(time.Duration(h)*time.Hour + time.Second))
	}
	waitFor(t, "prune at expiry", func() bool { return steps("prune") == 1 })
	if iss.Bundle().HasX509Authority(first) {
		t.Fatal("expired root still in the bundle")
	}
	if !iss.Bundle().HasX509Authority(second) {
		t.Fatal("active root missing from the bundle")
	}
}

// TestNextRefresh: peers' refresh hints are honoured, bounded below, and
// capped after an error.
func TestNextRefresh(t *testing.T) {
	iss, err := New(newTestConfig(t, "east.fedmesh.test"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		result string
		hint   time.Duration
		want   time.Duration
	}{
		{"hint honoured", "updated", 3 * time.Minute, 3 * time.Minute},
		{"unchanged", "", 30 * time.Second, 30 * time.Second},
		{"no hint, nothing held", "", 0, DefaultRefreshHint},
		{"floor", "", 10 * time.Millisecond, time.Second},
		{"after error", "error", time.Hour, errorRetry},
		{"after error, short hint", "error", 2 * time.Second, 2 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := &peerWatcher{i: iss, peer: Peer{TrustDomain: westTD}, result: tt.result}
			if got := w.NextRefresh(tt.hint); got != tt.want {
				t.Fatalf("NextRefresh(%s) = %s, want %s", tt.hint, got, tt.want)
			}
		})
	}
}
