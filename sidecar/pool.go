package sidecar

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/sidecar/balancer"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// backendPool is everything the sidecar keeps for one destination service:
// its targets by priority with their health and connection pools, and two
// views of them for route backends: every cluster (a ServiceImport, with
// locality and failover) and the own cluster only (a Service). An upstream
// has one for its own service and one per other service its routes send
// to. Nothing here calls the control plane on the request path.
type backendPool struct {
	s         *Sidecar
	namespace string
	name      string
	port      uint16 // for the tunnel header
	label     string // "ns/name:port", the metrics' and logs' upstream
	all       *balancer.Picker
	local     *balancer.Picker
	ready     atomic.Bool   // a first endpoint set arrived
	readyCh   chan struct{} // closed then
	readyOnce sync.Once
	cancel    context.CancelFunc

	// h2: the pool serves an http2/grpc upstream, so prewarmed connections
	// are HTTP/2; grpc: a grpc upstream, whose active checks are gRPC
	// health checks (h2.go).
	h2, grpc bool
	lim      *connLimiter // the upstream's (nil: no limit)
	h2Once   sync.Once
	h2t      *http.Transport // HTTP/2 connections to endpoints

	mu       sync.Mutex // guards targets, groups, failover and order (writer: apply)
	targets  map[string]*balancer.Target
	groups   map[string]*health.Group
	failover *policy.Failover
	order    []ClusterState // the clusters in priority order, for /state
}

func newBackendPool(s *Sidecar, ns, name string, port uint16) *backendPool {
	p := &backendPool{
		s: s, namespace: ns, name: name, port: port,
		label:   fmt.Sprintf("%s/%s:%d", ns, name, port),
		readyCh: make(chan struct{}),
		all:     balancer.New(0),
		local:   balancer.New(0),
		targets: map[string]*balancer.Target{},
		groups:  map[string]*health.Group{},
	}
	s.own.addPool(p) // its connections are closed when the sidecar stops
	return p
}

// run applies the pool's endpoint sets and runs its active checks until
// ctx ends.
func (p *backendPool) run(ctx context.Context, ch <-chan endpoints.Set, wg *sync.WaitGroup) {
	if !p.s.cfg.NoActiveChecks {
		wg.Go(func() { health.RunChecks(ctx, p.s.cfg.Checks, p.checkTargets) })
	}
	for {
		select {
		case <-ctx.Done():
			return
		case set, ok := <-ch:
			if !ok {
				return
			}
			p.apply(set)
		}
	}
}

// orderClusters sorts clusters into priority order: the own cluster, then
// the clusters a FailoverPolicy lists in its order, then the rest by RTT
// (a cluster whose RTT is not known yet, 0, after those measured), then by
// name.
func orderClusters(clusters []endpoints.Cluster, local string, order []string) {
	rtt := func(c endpoints.Cluster) endpoints.Duration {
		if c.RTT <= 0 {
			return math.MaxInt64
		}
		return c.RTT
	}
	rank := func(name string) int {
		if name == local {
			return -1
		}
		if i := slices.Index(order, name); i >= 0 {
			return i
		}
		return len(order)
	}
	slices.SortStableFunc(clusters, func(a, b endpoints.Cluster) int {
		return cmp.Or(cmp.Compare(rank(a.Name), rank(b.Name)), cmp.Compare(rtt(a), rtt(b)), cmp.Compare(a.Name, b.Name))
	})
}

// clusterOrder is the clusters of the last set in priority order.
func (p *backendPool) clusterOrder() []ClusterState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.order)
}

// apply turns a Set into targets by priority: the own cluster first, then
// remote clusters (FailoverPolicy order, then RTT). Targets that stay keep
// their pools, latency and ejection state. The set's FailoverPolicy takes
// effect here: cluster order and overprovisioning at once, outlier
// settings for health groups created from now on.
func (p *backendPool) apply(set endpoints.Set) {
	var fo *policy.Failover
	if set.Policy != nil {
		fo = set.Policy.Failover
	}
	clusters := slices.Clone(set.Clusters)
	local := p.s.cfg.Cluster
	var order []string
	var over float64
	if fo != nil {
		order, over = fo.ClusterOrder, fo.Overprovisioning
	}
	orderClusters(clusters, local, order)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failover = fo
	p.order = p.order[:0]
	seen := map[string]bool{}
	prewarmed := map[string]bool{}
	for _, t := range p.targets {
		if t.Gateway {
			prewarmed[t.Cluster] = true
		}
	}
	var list, locals []*balancer.Target
	add := func(key string, prio int, c endpoints.Cluster, name, addr string, ready bool) {
		seen[key] = true
		t := p.targets[key]
		if t == nil {
			g := p.groups[c.Name]
			if g == nil {
				g = health.NewGroup(p.outlierConfig(c.Name))
				p.groups[c.Name] = g
			}
			t = &balancer.Target{Name: name, Cluster: c.Name, Addr: addr, Gateway: c.Gateway, Outlier: g.Add(name)}
			t.Data = &pool{max: p.s.cfg.MaxIdlePerTarget, lim: p.lim}
			p.targets[key] = t
			if c.Gateway && c.Name != local && !prewarmed[c.Name] {
				prewarmed[c.Name] = true // one per cluster: the gateway connection and a handshake
				p.s.own.spawn(func(ctx context.Context) { p.prewarm(ctx, t) })
			}
		}
		t.Priority = prio
		t.Ready.Store(ready)
		list = append(list, t)
		if c.Name == local {
			locals = append(locals, t)
		}
	}
	for i, c := range clusters {
		prio := i
		if c.Name != local && i == 0 {
			prio = 1 // no local endpoints at all: remote clusters still rank after "local"
		}
		p.order = append(p.order, ClusterState{Name: c.Name, Priority: prio, RTTMS: float64(c.RTT) / 1e6})
		if c.Gateway && !allAddressed(c.Endpoints) {
			// Pods without an address to name: one target for the
			// cluster, whose gateway picks the pod.
			ready := false
			for _, e := range c.Endpoints {
				ready = ready || e.Ready
			}
			add("gw/"+c.Name, prio, c, c.Name+" (gateway)", "", ready)
			continue
		}
		// Own pods are dialed directly; a remote cluster's pods each
		// through the gateway, naming the pod in the tunnel header, so each
		// is balanced and ejected on its own and one bad pod does not take
		// its cluster out.
		for _, e := range c.Endpoints {
			if e.Addr == "" {
				continue
			}
			add(c.Name+"/"+e.Name+"/"+e.Addr, prio, c, e.Name, e.Addr, e.Ready)
		}
	}
	for key, t := range p.targets {
		if !seen[key] {
			delete(p.targets, key)
			p.groups[t.Cluster].Remove(t.Outlier)
			t.Data.(*pool).retire(true) // with the requests on its HTTP/2 connections: the target is gone
		}
	}
	p.all.SetOverprovisioning(over)
	p.local.SetOverprovisioning(over)
	p.all.Set(list)
	p.local.Set(locals)
	p.ready.Store(true)
	p.readyOnce.Do(func() { close(p.readyCh) })
	p.s.log.Info("endpoints updated", "upstream", p.label, "targets", len(list))
}

// allAddressed reports whether every endpoint (at least one) has an
// address.
func allAddressed(eps []endpoints.Endpoint) bool {
	for _, e := range eps {
		if e.Addr == "" {
			return false
		}
	}
	return len(eps) > 0
}

// prewarm opens one connection to a remote cluster through the gateway
// ahead of need: the QUIC connection to the gateway and the end-to-end
// handshake are then already done when the local endpoints fail. It runs
// in a goroutine of the sidecar's owner; ctx ends when the sidecar stops,
// which waits for it before closing the pool and the gateway client.
func (p *backendPool) prewarm(ctx context.Context, t *balancer.Target) {
	if p.h2 {
		cc, err := p.h2Conn(ctx, t)
		if err != nil {
			p.s.log.Debug("prewarm", "upstream", p.label, "cluster", t.Cluster, "err", err)
			return
		}
		cc.Release()
		return
	}
	if !p.lim.tryAcquire() {
		return // every connection is in use: nothing to prewarm with
	}
	c, err := p.dial(ctx, t)
	if err != nil {
		p.lim.release()
		p.s.log.Debug("prewarm", "upstream", p.label, "cluster", t.Cluster, "err", err)
		return
	}
	uc := &upConn{Conn: c, br: bufio.NewReaderSize(c, 4096), bw: bufio.NewWriterSize(c, 4096), lim: p.lim}
	t.Data.(*pool).put(uc) // closed instead when the pool is retired meanwhile
}

// outlierConfig is Config.Outlier with the service's FailoverPolicy
// fields that are set (p.mu held).
func (p *backendPool) outlierConfig(cluster string) health.Config {
	c := p.s.cfg.Outlier
	if fo := p.failover; fo != nil {
		c.Consecutive5xx = cmp.Or(fo.Consecutive5xx, c.Consecutive5xx)
		c.ConsecutiveConnectFailures = cmp.Or(fo.ConsecutiveConnectFailures, c.ConsecutiveConnectFailures)
		c.BaseEjection = cmp.Or(time.Duration(fo.BaseEjection), c.BaseEjection)
		c.MaxEjection = cmp.Or(time.Duration(fo.MaxEjection), c.MaxEjection)
		c.MaxEjectedPercent = cmp.Or(fo.MaxEjectedPercent, c.MaxEjectedPercent)
	}
	svc := p.label
	c.OnEject = func(name string, reason health.Reason, d time.Duration) {
		p.s.m.ejections.WithLabelValues(svc, cluster, string(reason)).Inc()
		p.s.log.Info("endpoint ejected", "upstream", svc, "cluster", cluster, "endpoint", name, "reason", reason, "for", d)
	}
	c.OnReturn = func(name string) {
		p.s.log.Info("endpoint returned", "upstream", svc, "cluster", cluster, "endpoint", name)
	}
	return c
}

func (p *backendPool) checkTargets() []health.Target {
	p.mu.Lock()
	defer p.mu.Unlock()
	var ts []health.Target
	for _, t := range p.targets {
		// The probe is a full mTLS handshake: the inbound accepts it only
		// while the app accepts connections. A remote cluster behind the
		// gateway is probed through it, but only while it is ejected: a
		// healthy cluster costs no cross-cluster handshake per second, and
		// an ejected one comes back as soon as it answers again.
		gw := t.Gateway
		ts = append(ts, health.Target{Outlier: t.Outlier, Probe: func(ctx context.Context) error {
			if gw && !t.Outlier.Ejected(time.Now()) {
				return nil
			}
			if p.grpc {
				return p.grpcHealth(ctx, t)
			}
			c, err := p.dial(ctx, t)
			if err != nil {
				return err
			}
			return c.Close()
		}})
	}
	return ts
}

// closeIdle closes every target's idle HTTP/1.1 connections.
func (p *backendPool) closeIdle() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, t := range p.targets {
		t.Data.(*pool).closeIdle()
	}
}

// retire stops the pool's use: idle connections close now and connections
// returned later close instead of waiting, so a pool no route or directory
// entry names any more holds nothing once its requests end. HTTP/2
// connections close now when no request runs on them; with all (the
// sidecar stops, after every request ended), every one closes. A retired
// pool that still holds a busy HTTP/2 connection stays with the sidecar's
// owner, which closes it at shutdown.
func (p *backendPool) retire(all bool) {
	p.mu.Lock()
	busy := false
	for _, t := range p.targets {
		busy = t.Data.(*pool).retire(all) || busy
	}
	p.mu.Unlock()
	if !busy && !all {
		p.s.own.forgetPool(p)
	}
}

// upConn is a pooled mTLS connection to an endpoint with its buffers.
type upConn struct {
	net.Conn
	br     *bufio.Reader
	bw     *bufio.Writer
	reused bool
	lim    *connLimiter // its slot is released on Close
	closed atomic.Bool
}

// Close closes the connection and gives its slot back, once.
func (c *upConn) Close() error {
	if !c.closed.Swap(true) {
		c.lim.release()
	}
	return c.Conn.Close()
}

// pool is a target's idle HTTP/1.1 connections, newest first out, and its
// HTTP/2 connections (each carries many requests at once).
type pool struct {
	max  int
	lim  *connLimiter
	mu   sync.Mutex
	idle []*upConn
	h2   []*http.ClientConn
	shut bool
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
	if len(p.idle) < p.max && !p.shut {
		p.idle = append(p.idle, c)
		p.mu.Unlock()
		p.lim.signal() // a request waiting for a connection may take it
		return
	}
	p.mu.Unlock()
	_ = c.Close()
}

// retire marks the pool shut (connections returned later are closed),
// closes its idle HTTP/1.1 connections and its HTTP/2 connections (with
// all, every one; without, those no request runs on). It reports whether
// a busy HTTP/2 connection stays open.
func (p *pool) retire(all bool) (busy bool) {
	p.mu.Lock()
	p.shut = true
	idle := p.idle
	p.idle = nil
	var closing, keep []*http.ClientConn
	for _, cc := range p.h2 {
		if all || cc.InFlight() == 0 {
			closing = append(closing, cc)
		} else {
			keep = append(keep, cc)
		}
	}
	p.h2 = keep
	p.mu.Unlock()
	for _, c := range idle {
		_ = c.Close()
	}
	for _, cc := range closing {
		_ = cc.Close()
	}
	return len(keep) > 0
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
// the local gateway's egress for a gateway target, with this service's
// namespace, name and port in the tunnel header (the remote gateway
// forwards only to exported services). Any error here means no byte of the
// caller's reached the endpoint.
func (p *backendPool) dial(ctx context.Context, t *balancer.Target) (net.Conn, error) {
	return p.dialTLS(ctx, t, p.s.clientTLS)
}

// dialTLS is dial with the given mTLS client config (HTTP/2 offers ALPN h2).
func (p *backendPool) dialTLS(ctx context.Context, t *balancer.Target, cfg *tls.Config) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, p.s.cfg.HandshakeTimeout)
	defer cancel()
	var raw net.Conn
	if t.Gateway {
		gw, err := p.s.gateway()
		if err != nil {
			return nil, fmt.Errorf("dial %s in %s: %w", p.label, t.Cluster, err)
		}
		// DialEarly: the mTLS ClientHello rides with the tunnel header, so
		// a new connection through the gateways costs one round trip less;
		// a refusal arrives as the handshake's read error.
		c, err := gw.DialEarly(ctx, tunnel.Request{
			Cluster: t.Cluster, Namespace: p.namespace, Service: p.name,
			Port: p.port, Caller: p.s.callerID(), Endpoint: t.Addr, // "" for a cluster target
		})
		if err != nil {
			p.tunnelRefused(t, err)
			return nil, fmt.Errorf("dial %s in %s through gateway: %w", p.label, t.Cluster, err)
		}
		raw = c
	} else {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", t.Addr)
		if err != nil {
			return nil, fmt.Errorf("dial %s endpoint %s: %w", p.label, t.Addr, err)
		}
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
		raw = p.s.socket(c)
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		_ = raw.Close()
		if t.Gateway && p.tunnelRefused(t, err) {
			return nil, fmt.Errorf("dial %s in %s through gateway: %w", p.label, t.Cluster, err)
		}
		return nil, fmt.Errorf("mtls handshake with %s endpoint %s: %w", p.label, t.Name, err)
	}
	return tc, nil
}

// tunnelRefused counts a gateway's refusal and, when it says the cluster
// cannot be reached, ejects the cluster; false when err is no refusal.
func (p *backendPool) tunnelRefused(t *balancer.Target, err error) bool {
	var te *tunnel.Error
	if !errors.As(err, &te) {
		return false
	}
	p.s.m.tunnelRefusals.WithLabelValues(t.Cluster, te.Code.String()).Inc()
	if te.Code == tunnel.CodeUnreachable || te.Code == tunnel.CodeUnknownCluster {
		p.ejectCluster(t)
	}
	return true
}

// ejectCluster treats the gateway's "cluster unreachable" as one signal for
// the whole cluster: every target of that cluster is ejected at once, as the
// one that was dialed will be, so later requests go straight to the next
// priority instead of each spending a retry on a cluster that is gone.
func (p *backendPool) ejectCluster(t *balancer.Target) {
	for _, prio := range p.all.Targets() {
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
