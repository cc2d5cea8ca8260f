package sidecar

import (
	"context"
	"io"
	"net"
	"sync"
	"time"

	"github.com/fedmesh/fedmesh/sidecar/balancer"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

var spliceBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// serveTCP proxies an opaque connection. It may try several endpoints, but
// only until one accepts the mTLS handshake: after that, bytes flow and a
// failure is the caller's to see. A match-all route rule splits
// connections between its backends by weight; other rules need HTTP.
func (u *upstream) serveTCP(ctx context.Context, c net.Conn) {
	svc := u.name
	start := time.Now()
	u.budget.request(start)
	bp, picker := u.own, u.own.all
	if r := u.router.Load(); r != nil && r.tcp != nil {
		b := r.tcp.pick(start)
		if b == nil {
			u.countRequest("", "no_endpoint")
			return
		}
		b.count.Inc()
		bp, picker = b.pool, b.picker
	}
	var exBuf [8]*balancer.Target
	tried := exBuf[:0]
	at := attempts{u: u, picker: picker, max: u.s.cfg.MaxAttempts}
	for t := at.next(tried); t != nil; t = at.next(tried) {
		tried = append(tried, t)
		now := time.Now()
		if !u.lim.tryAcquire() && !(u.closeOneIdle() && u.lim.tryAcquire()) {
			u.s.m.overflows.WithLabelValues(svc, "connections").Inc()
			u.countRequest("", "overflow")
			u.s.log.Debug("connection refused: the upstream's connections are all open", "upstream", svc, "max", u.s.cfg.MaxConnections)
			return
		}
		t.Begin()
		up, err := bp.dial(ctx, t)
		if err != nil {
			u.lim.release()
			t.Outlier.Report(health.ConnectFailure)
			t.End(0, false)
			u.s.log.Debug("dial failed", "upstream", svc, "endpoint", t.Name, "err", err)
			continue
		}
		t.Outlier.Report(health.Success)
		returnIfEjected(t)
		t.End(time.Since(now), true)
		if at.failedOver(t) {
			u.s.m.failovers.WithLabelValues(svc, t.Cluster).Inc()
		}
		u.countRequest(t.Cluster, "ok")
		untrack := u.s.track(up)
		splice(c, up)
		untrack()
		u.lim.release()
		return
	}
	u.countRequest("", "no_endpoint")
}

type closeWriter interface{ CloseWrite() error }

// splice copies both ways until both directions end, propagating
// half-closes, and closes both connections. One goroutine is added.
func splice(a, b net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		copyHalf(b, a)
	}()
	copyHalf(a, b)
	<-done
	_ = a.Close()
	_ = b.Close()
}

func copyHalf(dst, src net.Conn) {
	bp := spliceBufs.Get().(*[]byte)
	_, err := io.CopyBuffer(dst, src, *bp)
	spliceBufs.Put(bp)
	if err != nil {
		// Abort both: the peer must not mistake a failure for an end.
		_ = dst.Close()
		_ = src.Close()
		return
	}
	if cw, ok := dst.(closeWriter); ok {
		_ = cw.CloseWrite()
	} else {
		_ = dst.Close()
	}
}
