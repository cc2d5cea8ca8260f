// Package health decides which endpoints deserve traffic, so that a dead or
// misbehaving pod stops costing requests long before a control plane
// notices. It combines three inputs: readiness from the EndpointSlice (set
// by the owner), active checks on a jittered ticker, and passive outlier
// detection on the results of real requests: consecutive 5xx answers or
// connect failures eject an endpoint for a time that doubles with each
// ejection, while a cap on the ejected share keeps a bad deploy from
// ejecting every pod of a service.
//
// The hot path only reads atomics (Outlier.Ejected); locks are taken when an
// ejection is decided.
package health

import (
	"sync"
	"sync/atomic"
	"time"
)

// Result is the outcome of one request to an endpoint, as the proxy saw it.
type Result uint8

// Results.
const (
	Success        Result = iota // any answer that is not a server failure
	ServerFailure                // HTTP 5xx, or the tunnel's no-healthy-endpoint
	ConnectFailure               // could not connect or handshake, or the connection died before an answer
)

// Reason labels an ejection.
type Reason string

// Ejection reasons (metric labels).
const (
	ReasonConsecutive5xx     Reason = "consecutive_5xx"
	ReasonConnectFailure     Reason = "connect_failure"
	ReasonActiveCheckFailure Reason = "active_check"
)

// Defaults.
const (
	DefaultConsecutive5xx             = 5
	DefaultConsecutiveConnectFailures = 1
	DefaultBaseEjection               = time.Second
	DefaultMaxEjection                = 30 * time.Second
	DefaultMaxEjectedPercent          = 50
)

// Config tunes passive outlier detection. Zero fields mean the defaults.
type Config struct {
	// Consecutive5xx server failures eject an endpoint (5).
	Consecutive5xx int
	// ConsecutiveConnectFailures eject an endpoint (1): nothing listening is
	// strong evidence, and a dead endpoint costs no capacity when ejected.
	ConsecutiveConnectFailures int
	// BaseEjection is the first ejection's length (1s); each further
	// ejection doubles it up to MaxEjection (30s). The count is forgotten
	// after an endpoint has stayed in for MaxEjection.
	BaseEjection time.Duration
	MaxEjection  time.Duration
	// MaxEjectedPercent caps the share of a group's endpoints ejected for
	// 5xx (50). Connect failures are not capped: if every endpoint is
	// unreachable the picker falls back to the next priority, and to panic
	// mode (ignore ejections) when nothing at all is available.
	MaxEjectedPercent int
	// OnEject and OnReturn, when set, are told about ejections (metrics,
	// logs). They run with the group's lock held and must be quick.
	OnEject  func(name string, reason Reason, d time.Duration)
	OnReturn func(name string)
}

func (c *Config) setDefaults() {
	if c.Consecutive5xx <= 0 {
		c.Consecutive5xx = DefaultConsecutive5xx
	}
	if c.ConsecutiveConnectFailures <= 0 {
		c.ConsecutiveConnectFailures = DefaultConsecutiveConnectFailures
	}
	if c.BaseEjection <= 0 {
		c.BaseEjection = DefaultBaseEjection
	}
	if c.MaxEjection <= 0 {
		c.MaxEjection = DefaultMaxEjection
	}
	if c.MaxEjectedPercent <= 0 {
		c.MaxEjectedPercent = DefaultMaxEjectedPercent
	}
}

// Group is the set of endpoints over which the ejected share is capped:
// one service's endpoints in one cluster.
type Group struct {
	cfg     Config
	mu      sync.Mutex
	members []*Outlier
}

// NewGroup returns an empty group.
func NewGroup(cfg Config) *Group {
	cfg.setDefaults()
	return &Group{cfg: cfg}
}

// Add makes a member endpoint named name.
func (g *Group) Add(name string) *Outlier {
	o := &Outlier{g: g, name: name}
	g.mu.Lock()
	g.members = append(g.members, o)
	g.mu.Unlock()
	return o
}

// Remove forgets a member.
func (g *Group) Remove(o *Outlier) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for i, m := range g.members {
		if m == o {
			g.members = append(g.members[:i], g.members[i+1:]...)
			return
		}
	}
}

// Outlier is one endpoint's passive health.
type Outlier struct {
	g    *Group
	name string

	cons5xx  atomic.Int32
	consConn atomic.Int32
	until    atomic.Int64 // unix nanos; ejected while now < until

	// guarded by g.mu
	ejections  int
	reason     Reason
	returnedAt time.Time
}

// Ejected reports whether the endpoint is ejected at now. Cheap.
func (o *Outlier) Ejected(now time.Time) bool { return now.UnixNano() < o.until.Load() }

// State describes the endpoint for the admin dump.
type State struct {
	Ejected      bool      `json:"ejected"`
	Reason       Reason    `json:"reason,omitempty"`
	EjectedUntil time.Time `json:"ejectedUntil,omitzero"`
	Ejections    int       `json:"ejections"`
}

// State returns a snapshot.
func (o *Outlier) State(now time.Time) State {
	o.g.mu.Lock()
	defer o.g.mu.Unlock()
	s := State{Ejections: o.ejections}
	if o.Ejected(now) {
		s.Ejected, s.Reason, s.EjectedUntil = true, o.reason, time.Unix(0, o.until.Load())
	}
	return s
}

// Report records one request's result and may eject the endpoint.
func (o *Outlier) Report(r Result) {
	switch r {
	case Success:
		if o.cons5xx.Load() != 0 {
			o.cons5xx.Store(0)
		}
		if o.consConn.Load() != 0 {
			o.consConn.Store(0)
		}
	case ServerFailure:
		o.consConn.Store(0)
		if int(o.cons5xx.Add(1)) >= o.g.cfg.Consecutive5xx {
			o.eject(ReasonConsecutive5xx)
		}
	case ConnectFailure:
		if int(o.consConn.Add(1)) >= o.g.cfg.ConsecutiveConnectFailures {
			o.eject(ReasonConnectFailure)
		}
	}
}

// Eject ejects the endpoint for an active-check failure. Active checks are
// first-hand evidence and are not capped.
func (o *Outlier) Eject() { o.eject(ReasonActiveCheckFailure) }

func (o *Outlier) eject(reason Reason) {
	g := o.g
	now := time.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	if o.Ejected(now) {
		return
	}
	if reason == ReasonConsecutive5xx {
		n := 0
		for _, m := range g.members {
			if m.Ejected(now) && m.reason == ReasonConsecutive5xx {
				n++
			}
		}
		if (n+1)*100 > g.cfg.MaxEjectedPercent*len(g.members) {
			return // over the cap; the counters keep counting
		}
	}
	if !o.returnedAt.IsZero() && now.Sub(o.returnedAt) >= g.cfg.MaxEjection {
		o.ejections = 0 // well behaved for long enough
	}
	d := g.cfg.BaseEjection << min(o.ejections, 30)
	if d > g.cfg.MaxEjection || d <= 0 {
		d = g.cfg.MaxEjection
	}
	o.ejections++
	o.reason = reason
	o.returnedAt = now.Add(d)
	o.cons5xx.Store(0)
	o.consConn.Store(0)
	o.until.Store(now.Add(d).UnixNano())
	if g.cfg.OnEject != nil {
		g.cfg.OnEject(o.name, reason, d)
	}
}

// Return ends an ejection early, after an active check succeeded. It does
// not end ejections for 5xx answers: a probe that connects proves the
// endpoint reachable, not that it answers well. The ejection count is kept,
// so a flapping endpoint still backs off.
func (o *Outlier) Return() {
	g := o.g
	now := time.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	if !o.Ejected(now) || o.reason == ReasonConsecutive5xx {
		return
	}
	o.until.Store(0)
	o.returnedAt = now
	if g.cfg.OnReturn != nil {
		g.cfg.OnReturn(o.name)
	}
}
