package sidecar

import (
	"encoding/json"
	"net/http"
	"slices"
	"time"

	"github.com/fedmesh/fedmesh/internal/rawio"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// State is what /state serves: every upstream's endpoints by priority with
// their health. `fedctl status` reads it.
type State struct {
	Cluster string `json:"cluster"`
	// SVID is the workload's current identity and when it expires (the
	// issuer renews it at half its lifetime).
	SVID SVIDState `json:"svid"`
	// SocketIO is --socket-io (auto, raw or std) and, for auto, the path
	// it takes now: "auto (raw)" or "auto (std)".
	SocketIO  string          `json:"socketIO"`
	Upstreams []UpstreamState `json:"upstreams"`
}

// SVIDState is the workload's X.509 SVID as the sidecar holds it.
type SVIDState struct {
	ID      string    `json:"id,omitempty"`
	Expires time.Time `json:"expires,omitzero"`
	Error   string    `json:"error,omitempty"`
}

// UpstreamState is one upstream.
type UpstreamState struct {
	Upstream string `json:"upstream"`
	Protocol string `json:"protocol"`
	// Transparent: made on first use by the transparent listener (a
	// service port the app called by its virtual IP), not an explicit
	// --upstream.
	Transparent bool      `json:"transparent,omitempty"`
	Ready       bool      `json:"ready"`
	Loads       []float64 `json:"loads"` // traffic share per priority
	// Clusters are the clusters of the last endpoint set in priority
	// order: the own cluster, then FailoverPolicy order, then gateway RTT.
	Clusters []ClusterState  `json:"clusters"`
	Targets  []EndpointState `json:"endpoints"`
	// Routes are the route rules in force for this upstream's port, in the
	// order they are tried (first match wins).
	Routes []RouteState `json:"routes,omitempty"`
}

// ClusterState is one cluster of an upstream's endpoint set.
type ClusterState struct {
	Name     string `json:"name"`
	Priority int    `json:"priority"`
	// RTTMS is the local gateway's RTT to the cluster's gateway as the
	// endpoint set gives it; 0 when not measured (and for the own cluster).
	RTTMS float64 `json:"rttMs,omitempty"`
}

// RouteState is one route rule as the sidecar applies it.
type RouteState struct {
	Route    string   `json:"route"`
	Match    string   `json:"match"`
	Backends []string `json:"backends"`
}

// EndpointState is one endpoint.
type EndpointState struct {
	Cluster   string       `json:"cluster"`
	Name      string       `json:"name"`
	Addr      string       `json:"addr,omitempty"`
	Gateway   bool         `json:"gateway,omitempty"`
	Priority  int          `json:"priority"`
	Ready     bool         `json:"ready"`
	Available bool         `json:"available"`
	LatencyMS float64      `json:"latencyMs"`
	Inflight  int          `json:"inflight"`
	Outlier   health.State `json:"outlier"`
}

// socketIOState is State.SocketIO: the mode, and for auto the path now.
func (s *Sidecar) socketIOState() string {
	switch {
	case s.cfg.SocketIO != rawio.Auto:
		return s.cfg.SocketIO.String()
	case rawio.Busy():
		return "auto (raw)"
	default:
		return "auto (std)"
	}
}

// State returns a snapshot.
func (s *Sidecar) State() State {
	now := time.Now()
	st := State{Cluster: s.cfg.Cluster, SocketIO: s.socketIOState()}
	if svid, err := s.cfg.Source.GetX509SVID(); err != nil {
		st.SVID.Error = err.Error()
	} else if len(svid.Certificates) > 0 {
		st.SVID.ID, st.SVID.Expires = svid.ID.String(), svid.Certificates[0].NotAfter
	}
	ups := s.upstreams
	var tr []*upstream
	if s.transparent != nil {
		tr = s.transparent.upstreamList()
		ups = append(slices.Clip(ups), tr...)
	}
	for i, u := range ups {
		us := UpstreamState{Upstream: u.cfg.String(), Protocol: u.cfg.Protocol, Transparent: i >= len(s.upstreams),
			Ready: u.own.ready.Load(), Loads: u.own.all.Loads(now), Clusters: u.own.clusterOrder()}
		if r := u.router.Load(); r != nil {
			for _, rt := range r.rules {
				rs := RouteState{Route: rt.name, Match: rt.match}
				for _, b := range rt.backends {
					rs.Backends = append(rs.Backends, b.desc)
				}
				us.Routes = append(us.Routes, rs)
			}
		}
		for prio, ts := range u.own.all.Targets() {
			for _, t := range ts {
				us.Targets = append(us.Targets, EndpointState{
					Cluster: t.Cluster, Name: t.Name, Addr: t.Addr, Gateway: t.Gateway, Priority: prio,
					Ready: t.Ready.Load(), Available: t.Available(now),
					LatencyMS: float64(t.Latency()) / 1e6, Inflight: t.Inflight(),
					Outlier: t.Outlier.State(now),
				})
			}
		}
		st.Upstreams = append(st.Upstreams, us)
	}
	return st
}

// Ready reports whether the SVID is available, every explicit upstream has
// received its first endpoint set and, in transparent mode, the service
// directory has arrived. (A transparent upstream is made on first use; its
// first connection waits for its first set.)
func (s *Sidecar) Ready() bool {
	if _, err := s.cfg.Source.GetX509SVID(); err != nil {
		return false
	}
	if s.transparent != nil && !s.transparent.directoryReady() {
		return false
	}
	for _, u := range s.upstreams {
		if !u.own.ready.Load() {
			return false
		}
	}
	return true
}

// AdminHandler serves /live, /ready, /state (JSON) and /metrics (the
// registry's text exposition).
func (s *Sidecar) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /live", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		if !s.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /state", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(s.State())
	})
	mux.Handle("GET /metrics", s.cfg.Registry)
	return mux
}
