package sidecar

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Circuit breakers of an upstream, after Envoy's: at most MaxRequests
// outstanding requests (roundTrip, serveH2), at most MaxConnections
// connections open to its endpoints (HTTP/1.1 pooled connections, idle or
// in use, and proxied TCP connections), and at most MaxPending requests
// waiting for one of those connections. A request that needs a new
// connection when all are open first closes an idle one of any endpoint;
// with none idle it waits, until a connection comes back or closes, or its
// attempt's deadline; beyond MaxPending waiters it is refused at once
// (503, X-Fedmesh-Error: overflow). A TCP connection over the limit is
// closed at once. HTTP/2 connections carry up to 1,000 requests each and
// are not counted.

var (
	errPendingOverflow = errors.New("too many requests waiting for a connection (max pending)")
	errConnTimeout     = errors.New("no connection to the upstream came free in time (max connections)")
)

// connLimiter counts an upstream's open connections and the requests
// waiting for one. A nil *connLimiter limits nothing.
type connLimiter struct {
	max, maxPending int
	mu              sync.Mutex
	open            int
	waiting         atomic.Int32  // requests in wait; changed under mu, read without it on the hot path
	gen             atomic.Uint64 // counts connections coming back or closing
	wake            chan struct{} // closed (and replaced) when a connection comes back or closes
}

func newConnLimiter(max, maxPending int) *connLimiter {
	return &connLimiter{max: max, maxPending: maxPending, wake: make(chan struct{})}
}

// tryAcquire takes a connection slot if one is free.
func (l *connLimiter) tryAcquire() bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open >= l.max {
		return false
	}
	l.open++
	return true
}

// release gives a slot back (a connection closed).
func (l *connLimiter) release() {
	if l == nil {
		return
	}
	l.gen.Add(1)
	l.mu.Lock()
	l.open--
	l.signalLocked()
	l.mu.Unlock()
}

// signal wakes the waiters: an idle connection came back to a pool. With
// nobody waiting (the usual case, once per request) it takes no lock.
func (l *connLimiter) signal() {
	if l == nil {
		return
	}
	l.gen.Add(1)
	if l.waiting.Load() == 0 {
		return
	}
	l.mu.Lock()
	l.signalLocked()
	l.mu.Unlock()
}

// generation is read before looking for a connection; wait returns at once
// if a connection came back or closed since (no wakeup is lost between
// the look and the wait).
func (l *connLimiter) generation() uint64 {
	if l == nil {
		return 0
	}
	return l.gen.Load()
}

func (l *connLimiter) signalLocked() {
	if l.waiting.Load() > 0 {
		close(l.wake)
		l.wake = make(chan struct{})
	}
}

// wait blocks, as one of at most maxPending waiters, until a connection
// comes back or closes (after generation gen), ctx ends or deadline passes.
func (l *connLimiter) wait(ctx context.Context, deadline time.Time, gen uint64) error {
	l.mu.Lock()
	if int(l.waiting.Load()) >= l.maxPending {
		l.mu.Unlock()
		return errPendingOverflow
	}
	l.waiting.Add(1)
	defer func() {
		l.mu.Lock()
		l.waiting.Add(-1)
		l.mu.Unlock()
	}()
	if l.gen.Load() != gen {
		l.mu.Unlock()
		return nil // something came free since the caller looked
	}
	ch := l.wake
	l.mu.Unlock()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-t.C:
		return errConnTimeout
	case <-ctx.Done():
		return ctx.Err()
	}
}

// closeOneIdle closes one idle HTTP/1.1 connection of any of the
// upstream's pools, freeing its slot; false when none is idle.
func (u *upstream) closeOneIdle() bool {
	if u.own.closeOneIdle() {
		return true
	}
	u.mu.Lock()
	extra := make([]*backendPool, 0, len(u.extra))
	for _, p := range u.extra {
		extra = append(extra, p)
	}
	u.mu.Unlock()
	for _, p := range extra {
		if p.closeOneIdle() {
			return true
		}
	}
	return false
}

func (p *backendPool) closeOneIdle() bool {
	p.mu.Lock()
	pools := make([]*pool, 0, len(p.targets))
	for _, t := range p.targets {
		pools = append(pools, t.Data.(*pool))
	}
	p.mu.Unlock()
	for _, pl := range pools {
		if pl.closeOne() {
			return true
		}
	}
	return false
}

// closeOne closes the pool's oldest idle connection.
func (p *pool) closeOne() bool {
	p.mu.Lock()
	if len(p.idle) == 0 {
		p.mu.Unlock()
		return false
	}
	c := p.idle[0]
	p.idle = p.idle[1:]
	p.mu.Unlock()
	_ = c.Close()
	return true
}
