package sidecar

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/sidecar/balancer"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// upstream is one outbound listener and everything it needs per request:
// the picker, the endpoints' pools and health, the retry budget. Nothing
// here calls the control plane.
type upstream struct {
	s      *Sidecar
	cfg    Upstream
	ln     net.Listener
	picker *balancer.Picker
	budget *budget
	active atomic.Int64 // outstanding requests (circuit breaker)
	ready  atomic.Bool  // a first endpoint set arrived

	mu      sync.Mutex // guards targets and groups (writers: watch)
	targets map[string]*balancer.Target
	groups  map[string]*health.Group
}

func newUpstream(s *Sidecar, cfg Upstream, ln net.Listener) *upstream {
	return &upstream{
		s: s, cfg: cfg, ln: ln,
		picker:  balancer.New(0),
		budget:  newBudget(s.cfg.Budget),
		targets: map[string]*balancer.Target{},
		groups:  map[string]*health.Group{},
	}
}

func (u *upstream) watch(ctx context.Context, ch <-chan endpoints.Set) {
	for {
		select {
		case <-ctx.Done():
			return
		case set, ok := <-ch:
			if !ok {
				return
			}
			u.apply(set)
		}
	}
}

// apply turns a Set into targets by priority: the own cluster first, then
// remote clusters by RTT. Targets that stay keep their pools, latency and
// ejection state.
func (u *upstream) apply(set endpoints.Set) {
	clusters := slices.Clone(set.Clusters)
	local := u.s.cfg.Cluster
	slices.SortStableFunc(clusters, func(a, b endpoints.Cluster) int {
		if (a.Name == local) != (b.Name == local) {
			if a.Name == local {
				return -1
			}
			return 1
		}
		return cmp.Or(cmp.Compare(a.RTT, b.RTT), cmp.Compare(a.Name, b.Name))
	})
	u.mu.Lock()
	defer u.mu.Unlock()
	seen := map[string]bool{}
	var list []*balancer.Target
	add := func(key string, prio int, c endpoints.Cluster, name, addr string, ready bool) {
		seen[key] = true
		t := u.targets[key]
		if t == nil {
			g := u.groups[c.Name]
			if g == nil {
				g = health.NewGroup(u.outlierConfig(c.Name))
				u.groups[c.Name] = g
			}
			t = &balancer.Target{Name: name, Cluster: c.Name, Addr: addr, Gateway: c.Gateway, Outlier: g.Add(name)}
			t.Data = &pool{max: u.s.cfg.MaxIdlePerTarget}
			u.targets[key] = t
			if c.Gateway && c.Name != local {
				go u.prewarm(t)
			}
		}
		t.Priority = prio
		t.Ready.Store(ready)
		list = append(list, t)
	}
	for i, c := range clusters {
		prio := i
		if c.Name != local && i == 0 {
			prio = 1 // no local endpoints at all: remote clusters still rank after "local"
		}
		if c.Gateway {
			ready := false
			for _, e := range c.Endpoints {
				ready = ready || e.Ready
			}
			add("gw/"+c.Name, prio, c, c.Name+" (gateway)", "", ready)
			continue
		}
		for _, e := range c.Endpoints {
			if e.Addr == "" {
				continue
			}
			add(c.Name+"/"+e.Name+"/"+e.Addr, prio, c, e.Name, e.Addr, e.Ready)
		}
	}
	for key, t := range u.targets {
		if !seen[key] {
			delete(u.targets, key)
			u.groups[t.Cluster].Remove(t.Outlier)
			t.Data.(*pool).closeIdle()
		}
	}
	u.picker.Set(list)
	u.ready.Store(true)
	u.s.log.Info("endpoints updated", "upstream", u.cfg.String(), "targets", len(list))
}

// prewarm opens one connection to a remote cluster through the gateway
// ahead of need: the QUIC connection to the gateway and the end-to-end
// handshake are then already done when the local endpoints fail.
func (u *upstream) prewarm(t *balancer.Target) {
	c, err := u.dial(context.Background(), t)
	if err != nil {
		u.s.log.Debug("prewarm", "upstream", u.cfg.String(), "cluster", t.Cluster, "err", err)
		return
	}
	uc := &upConn{Conn: c, br: bufio.NewReaderSize(c, 4096), bw: bufio.NewWriterSize(c, 4096)}
	if u.s.closed.Load() {
		_ = c.Close()
		return
	}
	t.Data.(*pool).put(uc)
}

func (u *upstream) outlierConfig(cluster string) health.Config {
	c := u.s.cfg.Outlier
	svc := u.cfg.String()
	c.OnEject = func(name string, reason health.Reason, d time.Duration) {
		u.s.m.ejections.WithLabelValues(svc, cluster, string(reason)).Inc()
		u.s.log.Info("endpoint ejected", "upstream", svc, "cluster", cluster, "endpoint", name, "reason", reason, "for", d)
	}
	c.OnReturn = func(name string) {
		u.s.log.Info("endpoint returned", "upstream", svc, "cluster", cluster, "endpoint", name)
	}
	return c
}

func (u *upstream) checkTargets() []health.Target {
	u.mu.Lock()
	defer u.mu.Unlock()
	var ts []health.Target
	for _, t := range u.targets {
		// The probe is a full mTLS handshake: the inbound accepts it only
		// while the app accepts connections. A remote cluster behind the
		// gateway is probed through it, but only while it is ejected: a
		// healthy cluster costs no cross-cluster handshake per second, and
		// an ejected one comes back as soon as it answers again.
		gw := t.Addr == ""
		ts = append(ts, health.Target{Outlier: t.Outlier, Probe: func(ctx context.Context) error {
			if gw && !t.Outlier.Ejected(time.Now()) {
				return nil
			}
			c, err := u.dial(ctx, t)
			if err != nil {
				return err
			}
			return c.Close()
		}})
	}
	return ts
}

func (u *upstream) closeIdle() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, t := range u.targets {
		t.Data.(*pool).closeIdle()
	}
}

// upConn is a pooled mTLS connection to an endpoint with its buffers.
type upConn struct {
	net.Conn
	br     *bufio.Reader
	bw     *bufio.Writer
	reused bool
}

// pool is a target's idle connections, newest first out.
type pool struct {
	max  int
	mu   sync.Mutex
	idle []*upConn
}

func (p *pool) get() *upConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := len(p.idle); n > 0 {
		c := p.idle[n-1]
		p.idle = p.idle[:n-1]
		c.reused = true
		return c
	}
	return nil
}

func (p *pool) put(c *upConn) {
	p.mu.Lock()
	if len(p.idle) < p.max {
		p.idle = append(p.idle, c)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	_ = c.Close()
}

func (p *pool) closeIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, c := range idle {
		_ = c.Close()
	}
}

// dial opens an mTLS connection to t: directly, or inside a stream through
// the local gateway's egress for a gateway target. Any error here means no
// byte of the caller's reached the endpoint.
func (u *upstream) dial(ctx context.Context, t *balancer.Target) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, u.s.cfg.HandshakeTimeout)
	defer cancel()
	var raw net.Conn
	if t.Gateway {
		gw, err := u.s.gateway()
		if err != nil {
			return nil, fmt.Errorf("dial %s in %s: %w", u.cfg, t.Cluster, err)
		}
		c, err := gw.Dial(ctx, tunnel.Request{
			Cluster: t.Cluster, Namespace: u.cfg.Namespace, Service: u.cfg.Service,
			Port: u.cfg.Port, Caller: u.s.callerID(),
		})
		if err != nil {
			var te *tunnel.Error
			if errors.As(err, &te) {
				u.s.m.tunnelRefusals.WithLabelValues(t.Cluster, te.Code.String()).Inc()
				if te.Code == tunnel.CodeUnreachable || te.Code == tunnel.CodeUnknownCluster {
					u.ejectCluster(t)
				}
			}
			return nil, fmt.Errorf("dial %s in %s through gateway: %w", u.cfg, t.Cluster, err)
		}
		raw = c
	} else {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", t.Addr)
		if err != nil {
			return nil, fmt.Errorf("dial %s endpoint %s: %w", u.cfg, t.Addr, err)
		}
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
		raw = c
	}
	tc := tls.Client(raw, u.s.clientTLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("mtls handshake with %s endpoint %s: %w", u.cfg, t.Name, err)
	}
	return tc, nil
}

// ejectCluster treats the gateway's "cluster unreachable" as one signal for
// the whole cluster: every target of that cluster is ejected at once, as the
// one that was dialed will be, so later requests go straight to the next
// priority instead of each spending a retry on a cluster that is gone.
func (u *upstream) ejectCluster(t *balancer.Target) {
	for _, prio := range u.picker.Targets() {
		for _, o := range prio {
			if o != t && o.Gateway && o.Cluster == t.Cluster {
				o.Outlier.Report(health.ConnectFailure)
			}
		}
	}
}

// returnIfEjected ends a connect-failure ejection of a target that just
// answered (it was picked in panic mode, with nothing else available): it
// is reachable, so keeping it out only starves the upstream.
func returnIfEjected(t *balancer.Target) {
	if t.Outlier.Ejected(time.Now()) {
		t.Outlier.Return()
	}
}
