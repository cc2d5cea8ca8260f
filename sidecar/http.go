package sidecar

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/fedmesh/fedmesh/sidecar/balancer"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// An answer that refuses for overload (429, 503) is recorded in the
// balancer's latency as twice the endpoint's current EWMA (at least
// overloadFloor, at most overloadCap), whatever its real latency: each
// refusal makes the endpoint look slower than it did, so traffic moves to
// its peers until they refuse too, and back. A fixed large penalty instead
// starved a refusing endpoint for longer than its rate limit's burst lasts,
// and its tokens went unused.
const (
	overloadFloor = time.Millisecond
	overloadCap   = time.Second
)

// maxBuffered is the largest response body read whole before it is
// forwarded: up to this size, an upstream that dies mid-body costs a retry,
// not a failed request.
const maxBuffered = 64 << 10

var (
	readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}
	writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4096) }}
	bodies  = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}
)

func getBody(n int) *[]byte {
	b := bodies.Get().(*[]byte)
	if cap(*b) < n {
		*b = make([]byte, n)
	}
	*b = (*b)[:n]
	return b
}

func putBody(b *[]byte) {
	if b != nil && cap(*b) <= maxBuffered {
		bodies.Put(b)
	}
}

func (u *upstream) serve(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := u.ln.Accept()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				u.s.log.Error("accept outbound", "upstream", u.cfg.String(), "err", err)
			}
			return
		}
		wg.Go(func() { u.serveConn(ctx, c) })
	}
}

// serveConn proxies one accepted client connection by the upstream's
// protocol and closes it. Explicit listeners and the transparent listener
// both hand their connections here.
func (u *upstream) serveConn(ctx context.Context, c net.Conn) {
	c = u.s.socket(c)
	untrack := u.s.track(c)
	defer untrack()
	defer c.Close()
	switch u.cfg.Protocol {
	case ProtocolTCP:
		u.serveTCP(ctx, c)
	case ProtocolHTTP2, ProtocolGRPC:
		if srv := u.h2Server(); srv != nil {
			srv.serve(ctx, c, nil)
		}
	default:
		u.serveHTTP(ctx, c)
	}
}

// serveHTTP proxies one client connection's requests in turn: no goroutine
// per request, buffers pooled, upstream connections reused.
func (u *upstream) serveHTTP(ctx context.Context, c net.Conn) {
	br := readers.Get().(*bufio.Reader)
	bw := writers.Get().(*bufio.Writer)
	br.Reset(c)
	bw.Reset(c)
	defer func() {
		br.Reset(nil)
		bw.Reset(nil)
		readers.Put(br)
		writers.Put(bw)
	}()
	if b, err := br.Peek(3); err == nil && string(b) == h2Preface[:3] {
		// HTTP/2 with prior knowledge (a gRPC client, say) on an http
		// upstream: served by the HTTP/2 server, which reads the preface
		// again from br.
		if srv := u.h2Server(); srv != nil {
			srv.serve(ctx, &prefixConn{Conn: c, br: br}, nil)
		}
		return
	}
	for {
		req, ok := nextRequest(br, bw)
		if !ok {
			return
		}
		expectContinue(req, bw)
		keep, up := u.roundTrip(ctx, req, bw)
		if up != nil { // 101 Switching Protocols: no more HTTP on either side
			if bw.Flush() == nil {
				joinSwitched(c, br, up.Conn, up.br)
			}
			_ = up.Close()
			return
		}
		if err := bw.Flush(); err != nil || !keep || req.Close {
			return
		}
		if req.Body != http.NoBody { // the body must be consumed before the next request
			// Forwarding it closed it, and closing a request body reads it
			// to its end: only a body nothing forwarded is left to drain.
			if _, err := io.Copy(io.Discard, req.Body); err != nil && !errors.Is(err, http.ErrBodyReadAfterClose) {
				return
			}
		}
	}
}

// nextRequest reads a client connection's next request, answering 400 to
// one that does not parse; false means the connection is done.
func nextRequest(br *bufio.Reader, bw *bufio.Writer) (*http.Request, bool) {
	req, err := http.ReadRequest(br)
	if err != nil {
		if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isReset(err) {
			writeError(bw, http.StatusBadRequest, "bad_request", err.Error())
			_ = bw.Flush()
		}
		return nil, false
	}
	return req, true
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne)
}

func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// answer is an upstream response head with its body, buffered when small.
type answer struct {
	resp *http.Response
	uc   *upConn
	t    *balancer.Target
	body *[]byte // nil when the body streams from uc
	rd   bufferedBody
}

// bufferedBody serves a buffered response body as the Body of the response
// written to the client, without allocating a reader per request.
type bufferedBody struct{ bytes.Reader }

func (*bufferedBody) Close() error { return nil }

func (a *answer) release(reuse bool) {
	putBody(a.body)
	a.body = nil
	if a.uc == nil {
		return
	}
	if reuse && !a.resp.Close {
		a.t.Data.(*pool).put(a.uc)
	} else {
		_ = a.uc.Close()
	}
	a.uc = nil
}

// roundTrip serves one request and reports whether the client connection
// may carry another; switched is the upstream connection when the answer
// was 101 Switching Protocols (written to w, not yet flushed), which the
// caller joins to the client's. The first route rule that matches picks the backend
// service and may override timeouts, retries and headers; with none, the
// upstream's own service serves as ever.
func (u *upstream) roundTrip(ctx context.Context, req *http.Request, w *bufio.Writer) (keep bool, switched *upConn) {
	start := time.Now()
	svc := u.name
	rec := reqRecord{req: req, start: start, traceID: traceContext(req.Header)}
	replayable := req.Body == http.NoBody
	if !u.enter() {
		u.finish(&rec, "", "overflow", http.StatusServiceUnavailable, -1)
		writeError(w, http.StatusServiceUnavailable, "overflow", "too many outstanding requests")
		return replayable, nil
	}
	defer u.leave()
	u.budget.request(start)
	pl, ok := u.planFor(req, start)
	if !ok {
		u.finish(&rec, "", "no_endpoint", http.StatusServiceUnavailable, -1)
		writeError(w, http.StatusServiceUnavailable, "no_healthy_endpoint", "no backend of route "+pl.rt.name+" has an endpoint")
		return replayable, nil
	}
	rt, bp := pl.rt, pl.bp
	deadline := start.Add(pl.reqTimeout)
	safe := replayable && idempotent(req.Method)

	var last *answer // the last retryable answer, passed through if nothing better comes
	timedOut := false
	var exBuf [8]*balancer.Target
	tried := exBuf[:0]
	at := attempts{u: u, picker: pl.picker, max: pl.maxAttempts, deadline: deadline}
	if rt != nil {
		at.backoff = rt.backoff
	}
	for t := at.next(tried); t != nil; t = at.next(tried) {
		tried = append(tried, t)
		rec.endpoint = t.Name
		rec.attempts++
		a, sent, err := u.attempt(ctx, bp, t, req, safe, deadline, pl.attemptTimeout)
		if errors.Is(err, errPendingOverflow) || errors.Is(err, errConnTimeout) {
			if last != nil {
				last.release(true)
			}
			u.s.m.overflows.WithLabelValues(svc, "pending").Inc()
			u.finish(&rec, "", "overflow", http.StatusServiceUnavailable, -1)
			writeError(w, http.StatusServiceUnavailable, "overflow", err.Error())
			return replayable, nil
		}
		if err != nil {
			u.s.log.Debug("attempt failed", "upstream", svc, "cluster", t.Cluster, "endpoint", t.Name, "err", err)
			timedOut = timedOut || errors.Is(err, os.ErrDeadlineExceeded)
			if !sent || safe {
				continue // nothing reached the app, or it is safe to send again
			}
			u.finish(&rec, t.Cluster, "error", http.StatusBadGateway, -1)
			writeError(w, http.StatusBadGateway, "upstream_failed", err.Error())
			return false, nil
		}
		if safe && a.body != nil && rt.retryable(a.resp.StatusCode) {
			if last != nil {
				last.release(true)
			}
			last = a
			continue
		}
		if last != nil {
			last.release(true)
		}
		if at.failedOver(t) {
			u.s.m.failovers.WithLabelValues(svc, t.Cluster).Inc()
		}
		return u.respond(&rec, a, w, rt)
	}
	if last != nil {
		return u.respond(&rec, last, w, rt)
	}
	if timedOut || time.Now().After(deadline) {
		u.finish(&rec, "", "timeout", http.StatusGatewayTimeout, -1)
		writeError(w, http.StatusGatewayTimeout, "timeout", "no answer from "+bp.label+" in time")
		return replayable, nil
	}
	u.finish(&rec, "", "no_endpoint", http.StatusServiceUnavailable, -1)
	writeError(w, http.StatusServiceUnavailable, "no_healthy_endpoint", "no endpoint of "+bp.label+" answered")
	return replayable, nil
}

// respond forwards a to the client and returns the upstream connection to
// its pool when the body was read to the end.
func (u *upstream) respond(rec *reqRecord, a *answer, w *bufio.Writer, rt *route) (bool, *upConn) {
	req := rec.req
	if a.resp.StatusCode == http.StatusSwitchingProtocols {
		return u.switchProtocols(rec, a, w)
	}
	result := "ok"
	if a.resp.StatusCode >= 500 {
		result = "5xx"
	}
	if rt != nil && rt.respHeaders != nil {
		rt.respHeaders.apply(a.resp.Header, nil)
	}
	upstreamClose := a.resp.Close
	// The client connection lives on its own terms unless the body's end is
	// marked by the upstream closing.
	a.resp.Close = req.Close || (a.resp.ContentLength < 0 && len(a.resp.TransferEncoding) == 0 && a.body == nil)
	if a.body != nil {
		a.rd.Reset(*a.body)
		a.resp.Body = &a.rd
	}
	err := a.resp.Write(w)
	a.resp.Close = upstreamClose
	if err != nil {
		u.finish(rec, a.t.Cluster, "client_error", a.resp.StatusCode, -1)
		a.release(false)
		return false, nil
	}
	u.finish(rec, a.t.Cluster, result, a.resp.StatusCode, -1)
	u.latency.Observe(time.Since(rec.start).Seconds())
	a.release(true)
	return true, nil
}

// switchProtocols passes on the upstream's 101 Switching Protocols (a
// WebSocket handshake, say) and hands its connection over for the tunnel;
// it never returns to the pool. A 101 the client did not ask for is a 502.
func (u *upstream) switchProtocols(rec *reqRecord, a *answer, w *bufio.Writer) (bool, *upConn) {
	if !upgradeRequested(rec.req.Header) {
		u.finish(rec, a.t.Cluster, "error", http.StatusBadGateway, -1)
		a.release(false)
		writeError(w, http.StatusBadGateway, "upstream_failed", errUnaskedSwitch)
		return false, nil
	}
	a.resp.Body = http.NoBody
	err := a.resp.Write(w)
	putBody(a.body)
	a.body = nil
	uc := a.uc
	a.uc = nil
	if err != nil {
		u.finish(rec, a.t.Cluster, "client_error", a.resp.StatusCode, -1)
		_ = uc.Close()
		return false, nil
	}
	u.finish(rec, a.t.Cluster, "ok", a.resp.StatusCode, -1)
	_ = uc.SetDeadline(time.Time{}) // the request's deadline does not bound the tunnel
	return false, uc
}

// attempt sends req to t and reads the response head, and the body when
// small. sent reports whether any byte of the request may have reached the
// endpoint. A stale pooled connection is replaced once, without counting
// against the endpoint or the budget.
func (u *upstream) attempt(ctx context.Context, bp *backendPool, t *balancer.Target, req *http.Request, safe bool, deadline time.Time, timeout time.Duration) (*answer, bool, error) {
	p := t.Data.(*pool)
	t.Begin()
	began := time.Now()
	for {
		gen := u.lim.generation()
		uc := p.get()
		if uc == nil {
			if !u.lim.tryAcquire() {
				// Every connection is open: close an idle one, or wait
				// for one to come back (circuit breakers, limits.go).
				if u.closeOneIdle() {
					continue
				}
				if err := u.lim.wait(ctx, deadline, gen); err != nil {
					t.End(0, false)
					return nil, false, err
				}
				continue
			}
			c, err := bp.dial(ctx, t)
			if err != nil {
				u.lim.release()
				t.Outlier.Report(health.ConnectFailure)
				t.End(0, false)
				return nil, false, err
			}
			uc = &upConn{Conn: c, br: bufio.NewReaderSize(c, 4096), bw: bufio.NewWriterSize(c, 4096), lim: u.lim}
		}
		dl := time.Now().Add(timeout)
		if deadline.Before(dl) {
			dl = deadline
		}
		_ = uc.SetDeadline(dl)
		a, err := u.exchange(uc, t, req)
		if err == nil {
			_ = uc.SetDeadline(deadline)
			if a.resp.StatusCode >= 500 {
				t.Outlier.Report(health.ServerFailure)
			} else {
				t.Outlier.Report(health.Success)
				returnIfEjected(t)
			}
			lat := time.Since(began)
			if a.resp.StatusCode == http.StatusTooManyRequests || a.resp.StatusCode == http.StatusServiceUnavailable {
				// An endpoint shedding load answers fast; counted as fast it
				// would draw ever more of the traffic it refuses (with two
				// endpoints P2C would send it everything). It counts as
				// slower than before.
				lat = min(max(lat, 2*t.Latency(), overloadFloor), overloadCap)
			}
			t.End(lat, true)
			return a, true, nil
		}
		_ = uc.Close()
		if uc.reused && safe {
			// The endpoint closed an idle connection, or died: the other idle
			// ones are likely gone too. Try once more on a fresh one.
			p.closeIdle()
			continue
		}
		t.Outlier.Report(health.ConnectFailure)
		t.End(0, false)
		return nil, true, err
	}
}

func (u *upstream) exchange(uc *upConn, t *balancer.Target, req *http.Request) (*answer, error) {
	if err := req.Write(uc.bw); err != nil {
		return nil, fmt.Errorf("write request to %s: %w", t.Name, err)
	}
	if err := uc.bw.Flush(); err != nil {
		return nil, fmt.Errorf("write request to %s: %w", t.Name, err)
	}
	resp, err := readAnswer(uc.br, req)
	if err != nil {
		return nil, fmt.Errorf("read response from %s: %w", t.Name, err)
	}
	a := &answer{resp: resp, uc: uc, t: t}
	if n := resp.ContentLength; n >= 0 && n <= maxBuffered {
		a.body = getBody(int(n))
		if _, err := io.ReadFull(resp.Body, *a.body); err != nil {
			putBody(a.body)
			return nil, fmt.Errorf("read response body from %s: %w", t.Name, err)
		}
	}
	return a, nil
}

func writeError(w *bufio.Writer, code int, reason, detail string) {
	body := reason + ": " + detail + "\n"
	w.WriteString("HTTP/1.1 " + strconv.Itoa(code) + " " + http.StatusText(code) + "\r\n")
	w.WriteString("Content-Type: text/plain; charset=utf-8\r\nX-Fedmesh-Error: " + reason + "\r\n")
	w.WriteString("Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n")
	w.WriteString(body)
}
