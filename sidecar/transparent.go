package sidecar

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// VirtualService is one entry of the service directory: a Service by its
// cluster IPs (<name>.<ns>.svc.cluster.local) or a ServiceImport by its
// clusterset IPs (<name>.<ns>.svc.clusterset.local), with its ports.
type VirtualService struct {
	Namespace string
	Name      string
	Imported  bool     // a ServiceImport
	IPs       []string // IPv4 and IPv6 addresses as text
	Ports     []ServicePort
}

// ServicePort is one port of a VirtualService.
type ServicePort struct {
	Name        string
	Port        int32
	Protocol    string // TCP (or ""), UDP, SCTP: only TCP ports are proxied
	AppProtocol string
}

// DirectorySource yields the complete service directory at once and again
// after every change; a reader that falls behind gets the newest only.
// The channel is closed when ctx ends.
type DirectorySource interface {
	WatchDirectory(ctx context.Context) (<-chan []VirtualService, error)
}

// StaticDirectory is a DirectorySource that never changes.
type StaticDirectory []VirtualService

// WatchDirectory implements DirectorySource.
func (d StaticDirectory) WatchDirectory(ctx context.Context) (<-chan []VirtualService, error) {
	ch := make(chan []VirtualService, 1)
	ch <- d
	return ch, nil
}

// PortWatcher is an endpoints.Source that can watch one port of a service:
// local endpoints are then dialed at the target port of that service port,
// not of the service's first port. The transparent listener uses it when
// the source has it.
type PortWatcher interface {
	WatchPort(ctx context.Context, namespace, service string, port uint16) (<-chan endpoints.Set, error)
}

// upstreamKey names a transparent upstream: one per service and port.
type upstreamKey struct {
	namespace, name string
	port            uint16
}

// vipTarget is what a virtual IP and port stand for.
type vipTarget struct {
	key      upstreamKey
	protocol string
}

// vipDirectory is the directory as the hot path reads it: one map read
// under an atomic pointer.
type vipDirectory struct {
	byAddr map[netip.AddrPort]vipTarget
	// imports are the ServiceImports' clusterset IPs by "<name>.<ns>" in
	// lower case, for the DNS server (dns.go).
	imports map[string][]netip.Addr
}

// Results of transparent connections (fedmesh_sidecar_transparent_connections_total).
const (
	resultService           = "service"            // a known virtual IP: proxied like an explicit upstream
	resultPassthrough       = "passthrough"        // unknown destination: spliced to it unchanged
	resultPassthroughFailed = "passthrough_failed" // unknown destination that could not be dialed
	resultLoop              = "loop"               // the destination is the sidecar itself
	resultNoOriginalDst     = "no_original_dst"    // not redirected by iptables (no conntrack entry)
	resultUnavailable       = "unavailable"        // the service's upstream could not start
)

// transparent is the listener iptables redirects the workload's outbound
// TCP to. Each connection's original destination is looked up in the
// service directory: a service's virtual IP and port goes to that
// service's upstream (made on first use and kept), anything else is passed
// through to where it was going.
type transparent struct {
	s    *Sidecar
	ln   net.Listener
	port uint16 // the listener's port, to recognize connections to itself
	self map[netip.Addr]bool

	dir       atomic.Pointer[vipDirectory]
	dirReady  chan struct{}
	readyOnce sync.Once
	logged    map[string]bool // bad directory entries already logged (watcher goroutine only)

	// set by run before the first accept
	ctx context.Context
	wg  *sync.WaitGroup

	mu      sync.RWMutex
	ups     map[upstreamKey]*upstream
	cancels map[upstreamKey]context.CancelFunc // ends an upstream's endpoint watch

	ownMu    sync.Mutex
	ownPorts map[uint16]int // local ports of passthrough dials in flight or open

	results *imetrics.CounterVec
	loopLog atomic.Bool
}

func newTransparent(s *Sidecar, ln net.Listener) (*transparent, error) {
	t := &transparent{
		s: s, ln: ln,
		self:     map[netip.Addr]bool{},
		dirReady: make(chan struct{}),
		logged:   map[string]bool{},
		ups:      map[upstreamKey]*upstream{},
		cancels:  map[upstreamKey]context.CancelFunc{},
		ownPorts: map[uint16]int{},
	}
	var err error
	t.results, err = s.cfg.Registry.NewCounterVec("fedmesh_sidecar_transparent_connections_total",
		"Connections redirected to the transparent outbound listener, by result (service, passthrough, passthrough_failed, loop, no_original_dst, unavailable).",
		"result")
	if err != nil {
		return nil, fmt.Errorf("register transparent metrics: %w", err)
	}
	for _, r := range []string{resultService, resultPassthrough, resultPassthroughFailed, resultLoop, resultNoOriginalDst, resultUnavailable} {
		t.results.WithLabelValues(r)
	}
	if a, ok := ln.Addr().(*net.TCPAddr); ok {
		t.port = uint16(a.Port)
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil {
				t.self[p.Addr().Unmap()] = true
			}
		}
	}
	return t, nil
}

// run serves the listener until it is closed; the directory is applied by
// a goroutine of its own. wg is the sidecar's: upstreams made on first use
// run their watches in it.
func (t *transparent) run(ctx context.Context, wg *sync.WaitGroup) error {
	ch, err := t.s.cfg.Directory.WatchDirectory(ctx)
	if err != nil {
		return fmt.Errorf("watch service directory: %w", err)
	}
	t.mu.Lock()
	t.ctx, t.wg = ctx, wg
	t.mu.Unlock()
	wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case d, ok := <-ch:
				if !ok {
					return
				}
				t.apply(d)
			}
		}
	})
	wg.Go(func() { t.serve(ctx) })
	return nil
}

// apply replaces the directory. Entries that do not make sense (no
// namespace or name, an IP that does not parse, a port out of range) are
// skipped and logged once.
func (t *transparent) apply(services []VirtualService) {
	d := &vipDirectory{byAddr: make(map[netip.AddrPort]vipTarget, len(services)*2), imports: map[string][]netip.Addr{}}
	bad := func(vs VirtualService, what string) {
		key := vs.Namespace + "/" + vs.Name + ": " + what
		if t.logged[key] {
			return
		}
		if len(t.logged) < 4096 {
			t.logged[key] = true
		}
		t.s.log.Error("service directory entry skipped", "service", vs.Namespace+"/"+vs.Name, "imported", vs.Imported, "problem", what)
	}
	for _, vs := range services {
		if vs.Namespace == "" || vs.Name == "" {
			bad(vs, "no namespace or name")
			continue
		}
		var ips []netip.Addr
		for _, s := range vs.IPs {
			ip, err := netip.ParseAddr(s)
			if err != nil || ip.Zone() != "" {
				bad(vs, fmt.Sprintf("ip %q is not an IP address", s))
				continue
			}
			ips = append(ips, ip.Unmap())
		}
		if vs.Imported {
			k := strings.ToLower(vs.Name + "." + vs.Namespace)
			d.imports[k] = append(d.imports[k], ips...)
		}
		for _, p := range vs.Ports {
			if p.Protocol != "" && p.Protocol != "TCP" {
				continue // iptables redirects TCP only
			}
			if p.Port < 1 || p.Port > 65535 {
				bad(vs, fmt.Sprintf("port %d out of range", p.Port))
				continue
			}
			tg := vipTarget{
				key:      upstreamKey{vs.Namespace, vs.Name, uint16(p.Port)},
				protocol: ProtocolFor(p.AppProtocol, p.Name),
			}
			for _, ip := range ips {
				ap := netip.AddrPortFrom(ip, uint16(p.Port))
				if prev, ok := d.byAddr[ap]; ok && prev.key != tg.key {
					bad(vs, fmt.Sprintf("%s is also %s/%s", ap, prev.key.namespace, prev.key.name))
					continue
				}
				d.byAddr[ap] = tg
			}
		}
	}
	t.dir.Store(d)
	t.readyOnce.Do(func() { close(t.dirReady) })
	t.s.log.Debug("service directory updated", "services", len(services), "addresses", len(d.byAddr))
	t.prune(d)
}

// prune removes the upstreams of service ports the directory no longer
// has: their endpoint watches end and their idle connections close.
// Connections already proxied through one finish undisturbed; a service
// port that comes back gets a new upstream on its next connection.
func (t *transparent) prune(d *vipDirectory) {
	present := make(map[upstreamKey]bool, len(d.byAddr))
	for _, tg := range d.byAddr {
		present[tg.key] = true
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, u := range t.ups {
		if present[k] {
			continue
		}
		t.cancels[k]()
		delete(t.cancels, k)
		delete(t.ups, k)
		u.retire()
		t.s.log.Info("transparent upstream removed: its service port left the directory", "upstream", u.cfg.String())
	}
}

// lookup returns what a destination stands for.
func (t *transparent) lookup(dst netip.AddrPort) (vipTarget, bool) {
	d := t.dir.Load()
	if d == nil {
		return vipTarget{}, false
	}
	tg, ok := d.byAddr[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]
	return tg, ok
}

func (t *transparent) serve(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				t.s.log.Error("accept transparent outbound", "err", err)
			}
			return
		}
		wg.Go(func() { t.handle(ctx, c) })
	}
}

// handle proxies one redirected connection and closes it.
func (t *transparent) handle(ctx context.Context, c net.Conn) {
	dst, err := originalDst(c)
	if err != nil {
		t.results.WithLabelValues(resultNoOriginalDst).Inc()
		t.s.log.Debug("transparent connection without an original destination: refused", "from", c.RemoteAddr().String(), "err", err)
		_ = c.Close()
		return
	}
	if t.isSelf(c, dst) {
		t.results.WithLabelValues(resultLoop).Inc()
		t.s.log.Debug("transparent connection to the sidecar itself: refused", "from", c.RemoteAddr().String(), "to", dst.String())
		_ = c.Close()
		return
	}
	if !t.waitDirectory(ctx) {
		_ = c.Close()
		return
	}
	tg, ok := t.lookup(dst)
	if !ok {
		t.passthrough(ctx, c, dst)
		return
	}
	u := t.upstream(tg)
	if u == nil {
		t.results.WithLabelValues(resultUnavailable).Inc()
		_ = c.Close()
		return
	}
	t.waitFirstSet(ctx, u)
	t.results.WithLabelValues(resultService).Inc()
	u.serveConn(ctx, c)
}

// waitDirectory holds the connections that arrive before the first
// directory (at most HandshakeTimeout): without it, calls to services
// would all be passed through, outside the mesh.
func (t *transparent) waitDirectory(ctx context.Context) bool {
	select {
	case <-t.dirReady:
		return true
	default:
	}
	tm := time.NewTimer(t.s.cfg.HandshakeTimeout)
	defer tm.Stop()
	select {
	case <-t.dirReady:
	case <-tm.C:
		t.s.log.Warn("no service directory yet: connection looked up in none (passed through)")
	case <-ctx.Done():
		return false
	}
	return true
}

// waitFirstSet holds the first connections of a new upstream until its
// first endpoint set has arrived (at most HandshakeTimeout).
func (t *transparent) waitFirstSet(ctx context.Context, u *upstream) {
	if u.own.ready.Load() {
		return
	}
	tm := time.NewTimer(t.s.cfg.HandshakeTimeout)
	defer tm.Stop()
	select {
	case <-u.own.readyCh:
	case <-tm.C:
	case <-ctx.Done():
	}
}

// isSelf reports whether a connection was going to the sidecar itself: it
// was not redirected (its original destination is the listener), it was
// going to the listener's port on a local address, or it is one of the
// sidecar's own passthrough dials come back (the sidecar's traffic is not
// exempt from the redirect: wrong UID).
func (t *transparent) isSelf(c net.Conn, dst netip.AddrPort) bool {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if la, ok := c.LocalAddr().(*net.TCPAddr); ok && la.AddrPort().Port() == dst.Port() && la.AddrPort().Addr().Unmap() == dst.Addr() {
		return true
	}
	if dst.Port() == t.port && (dst.Addr().IsLoopback() || dst.Addr().IsUnspecified() || t.self[dst.Addr()]) {
		return true
	}
	ra, ok := c.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return false
	}
	from := ra.AddrPort()
	if !from.Addr().Unmap().IsLoopback() && !t.self[from.Addr().Unmap()] {
		return false
	}
	t.ownMu.Lock()
	own := t.ownPorts[from.Port()] > 0
	t.ownMu.Unlock()
	if own && !t.loopLog.Swap(true) {
		t.s.log.Error("the sidecar's own outbound connections are redirected back to it: run it as the UID the iptables rules exempt (the injector's ProxyUID, 1337 by default)")
	}
	return own
}

// upstream returns the upstream of a service port, making it (and starting
// its endpoint watch) on first use.
func (t *transparent) upstream(tg vipTarget) *upstream {
	t.mu.RLock()
	u := t.ups[tg.key]
	t.mu.RUnlock()
	if u != nil {
		return u
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if u := t.ups[tg.key]; u != nil {
		return u
	}
	if t.ctx == nil || t.ctx.Err() != nil || t.s.closed.Load() {
		return nil
	}
	cfg := Upstream{Namespace: tg.key.namespace, Service: tg.key.name, Port: tg.key.port, Protocol: tg.protocol}
	ctx, cancel := context.WithCancel(t.ctx)
	var ch <-chan endpoints.Set
	var err error
	if pw, ok := t.s.cfg.Endpoints.(PortWatcher); ok {
		ch, err = pw.WatchPort(ctx, cfg.Namespace, cfg.Service, cfg.Port)
	} else {
		ch, err = t.s.cfg.Endpoints.Watch(ctx, cfg.Namespace, cfg.Service)
	}
	if err != nil {
		cancel()
		t.s.log.Error("watch endpoints of a transparent upstream", "upstream", cfg.String(), "err", err)
		return nil
	}
	u = newUpstream(t.s, cfg, nil)
	wg := t.wg
	wg.Go(func() { u.watch(ctx, ch, wg) })
	t.ups[tg.key] = u
	t.cancels[tg.key] = cancel
	t.s.log.Info("transparent upstream started", "upstream", cfg.String(), "protocol", cfg.Protocol)
	return u
}

// passthrough splices a connection to its original destination unchanged,
// as Istio's PassthroughCluster does: the sidecar knows nothing about it.
func (t *transparent) passthrough(ctx context.Context, c net.Conn, dst netip.AddrPort) {
	var port uint16
	d := net.Dialer{Timeout: t.s.cfg.HandshakeTimeout, Control: func(network, _ string, rc syscall.RawConn) error {
		p, err := bindEphemeral(network, rc)
		if err != nil {
			return err
		}
		port = p
		t.ownMu.Lock()
		t.ownPorts[p]++
		t.ownMu.Unlock()
		return nil
	}}
	up, err := d.DialContext(ctx, "tcp", dst.String())
	defer func() {
		if port != 0 {
			t.ownMu.Lock()
			if t.ownPorts[port]--; t.ownPorts[port] <= 0 {
				delete(t.ownPorts, port)
			}
			t.ownMu.Unlock()
		}
	}()
	if err != nil {
		t.results.WithLabelValues(resultPassthroughFailed).Inc()
		t.s.log.Debug("passthrough dial failed", "to", dst.String(), "err", err)
		_ = c.Close()
		return
	}
	t.results.WithLabelValues(resultPassthrough).Inc()
	t.s.log.Debug("passthrough", "from", c.RemoteAddr().String(), "to", dst.String())
	untrackC := t.s.track(c)
	untrackUp := t.s.track(up)
	splice(c, up)
	untrackUp()
	untrackC()
}

// close closes the listener and the idle connections of every transparent
// upstream.
func (t *transparent) close() {
	_ = t.ln.Close()
	t.mu.RLock()
	defer t.mu.RUnlock()
	for _, u := range t.ups {
		u.closeIdle()
	}
}

// upstreamList is every transparent upstream made so far, by name.
func (t *transparent) upstreamList() []*upstream {
	t.mu.RLock()
	out := make([]*upstream, 0, len(t.ups))
	for _, u := range t.ups {
		out = append(out, u)
	}
	t.mu.RUnlock()
	slices.SortFunc(out, func(a, b *upstream) int { return strings.Compare(a.name, b.name) })
	return out
}

// directoryReady reports whether the first service directory arrived.
func (t *transparent) directoryReady() bool {
	select {
	case <-t.dirReady:
		return true
	default:
		return false
	}
}
