package sidecar

import (
	"context"
	"net"
	"sync"
	"sync/atomic"

	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// poolKey names a destination service.
type poolKey struct{ namespace, name string }

// upstream is one outbound listener and everything it needs per request:
// its own service's backend pool, the pools of the services its routes
// send to, the compiled routes, the retry budget. Nothing here calls the
// control plane.
type upstream struct {
	s    *Sidecar
	cfg  Upstream
	name string // cfg.String(), the metrics label, made once
	// latency is the request latency histogram of this upstream.
	latency *imetrics.Histogram
	ln      net.Listener
	own     *backendPool
	budget  *budget
	active  atomic.Int64 // outstanding requests (circuit breaker)
	lim     *connLimiter // open connections and requests waiting for one
	router  atomic.Pointer[router]

	reqMu sync.RWMutex
	reqs  map[reqKey]*imetrics.Counter // requests_total by cluster and result

	h2Once sync.Once
	h2srv  *connServer // HTTP/2 (and HTTP/1.1 on an http2 upstream), h2.go

	mu    sync.Mutex // guards extra (writer: watch)
	extra map[poolKey]*backendPool
}

func newUpstream(s *Sidecar, cfg Upstream, ln net.Listener) *upstream {
	u := &upstream{
		s: s, cfg: cfg, ln: ln, name: cfg.String(),
		latency: s.m.latency.WithLabelValues(cfg.String()),
		own:     newBackendPool(s, cfg.Namespace, cfg.Service, cfg.Port),
		budget:  newBudget(s.cfg.Budget),
		extra:   map[poolKey]*backendPool{},
		reqs:    map[reqKey]*imetrics.Counter{},
	}
	s.own.addUpstream(u)
	u.own.h2, u.own.grpc = isH2(cfg.Protocol), cfg.Protocol == ProtocolGRPC
	u.lim = newConnLimiter(s.cfg.MaxConnections, s.cfg.MaxPending)
	u.own.lim = u.lim
	return u
}

// enter counts a request as outstanding, unless MaxRequests already are
// (the requests circuit breaker, counted as a trip); leave when done.
func (u *upstream) enter() bool {
	if u.active.Add(1) > int64(u.s.cfg.MaxRequests) {
		u.active.Add(-1)
		u.s.m.overflows.WithLabelValues(u.name, "requests").Inc()
		return false
	}
	return true
}

func (u *upstream) leave() { u.active.Add(-1) }

type reqKey struct{ cluster, result string }

// countRequest counts a request in fedmesh_sidecar_requests_total. The
// counters are looked up once per cluster and result, not per request
// (WithLabelValues hashes the three label values).
func (u *upstream) countRequest(cluster, result string) {
	k := reqKey{cluster, result}
	u.reqMu.RLock()
	c := u.reqs[k]
	u.reqMu.RUnlock()
	if c == nil {
		c = u.s.m.requests.WithLabelValues(u.name, cluster, result)
		u.reqMu.Lock()
		u.reqs[k] = c
		u.reqMu.Unlock()
	}
	c.Inc()
}

// watch applies the own service's sets until ctx ends: endpoints and
// failover policy to the own pool, route rules to the router. It is the
// only goroutine that starts and stops the watches of route backends.
func (u *upstream) watch(ctx context.Context, ch <-chan endpoints.Set, wg *sync.WaitGroup) {
	if !u.s.cfg.NoActiveChecks {
		wg.Go(func() { health.RunChecks(ctx, u.s.cfg.Checks, u.own.checkTargets) })
	}
	for {
		select {
		case <-ctx.Done():
			return
		case set, ok := <-ch:
			if !ok {
				return
			}
			u.own.apply(set)
			u.applyRoutes(ctx, set, wg)
		}
	}
}

// applyRoutes compiles the set's route rules and makes sure every backend
// service they name has a pool with a running watch; pools no longer named
// are stopped.
func (u *upstream) applyRoutes(ctx context.Context, set endpoints.Set, wg *sync.WaitGroup) {
	u.mu.Lock()
	pools := func(ns, name string, port uint16) *backendPool {
		if ns == u.cfg.Namespace && name == u.cfg.Service {
			return u.own
		}
		k := poolKey{ns, name}
		if p := u.extra[k]; p != nil {
			return p
		}
		p := newBackendPool(u.s, ns, name, port)
		p.h2, p.grpc = isH2(u.cfg.Protocol), u.cfg.Protocol == ProtocolGRPC
		p.lim = u.lim
		ch, err := u.s.cfg.Endpoints.Watch(ctx, ns, name)
		if err != nil {
			u.s.log.Error("watch route backend", "upstream", u.cfg.String(), "backend", ns+"/"+name, "err", err)
			return p // stays empty: gets no share
		}
		pctx, cancel := context.WithCancel(ctx)
		p.cancel = cancel
		wg.Go(func() { p.run(pctx, ch, wg) })
		u.extra[k] = p
		return p
	}
	r, used := compileRouter(u, set.Policy, pools)
	for k, p := range u.extra {
		if !used[p] {
			delete(u.extra, k)
			if p.cancel != nil {
				p.cancel()
			}
			p.retire(false)
		}
	}
	u.mu.Unlock()
	u.router.Store(r)
}

// closeIdle closes the idle HTTP/1.1 connections of every pool the
// upstream uses (the sidecar is shutting down; its requests are ending).
func (u *upstream) closeIdle() {
	u.own.closeIdle()
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range u.extra {
		p.closeIdle()
	}
}

// retire stops the upstream's use (transparent mode: its service port left
// the directory): every pool it holds is retired. Connections proxied
// through it finish undisturbed.
func (u *upstream) retire() {
	u.own.retire(false)
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range u.extra {
		p.retire(false)
	}
}

// closeH2Server closes the upstream's HTTP/2 server, if one was made, and
// waits for its Serve loop; none is made afterwards. The sidecar's owner
// calls it once every connection served through it has ended.
func (u *upstream) closeH2Server() {
	u.h2Once.Do(func() {})
	if u.h2srv != nil {
		u.h2srv.close()
	}
}
