package sidecar

// HTTP/2, and so gRPC, through the sidecars. The app speaks HTTP/2 without
// TLS to its sidecar (prior knowledge, as gRPC clients do); the sidecars
// speak HTTP/2 to each other inside the mTLS connection (ALPN "h2"), many
// requests multiplexed on one connection per endpoint; the server sidecar
// passes HTTP/2 to its app without TLS. Requests are routed, balanced,
// retried and failed over one by one, like HTTP/1.1 requests; bodies and
// trailers stream both ways, so gRPC streams of any kind work.

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fedmesh/fedmesh/sidecar/balancer"
	"github.com/fedmesh/fedmesh/sidecar/health"
)

// h2Preface is how every HTTP/2 connection without TLS begins (RFC 9113,
// 3.4); no HTTP/1.1 request begins with "PRI".
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// h2Dummy is the address handed to net/http for a connection to an
// endpoint; the dial ignores it and dials the target in the context.
const h2Dummy = "endpoint.fedmesh.invalid:443"

// gRPC status codes the sidecar reads or writes.
const (
	grpcOK                = 0
	grpcDeadlineExceeded  = 4
	grpcPermissionDenied  = 7
	grpcResourceExhausted = 8
	grpcUnimplemented     = 12
	grpcUnavailable       = 14
)

type ctxKey int

const (
	connValueKey ctxKey = iota // a connServer connection's value
	targetKey                  // the *balancer.Target a dial is for
)

// connServer is an http.Server fed connections one at a time by the code
// that accepted them (and sniffed, or TLS-terminated, them). serve blocks
// until the server is done with the connection, so the caller's tracking
// and cleanup keep working as for every other connection.
type connServer struct {
	srv    *http.Server
	ln     chanListener
	served chan struct{} // closed when Serve has returned

	mu    sync.Mutex
	conns map[net.Conn]*servedConn
}

type servedConn struct {
	done  chan struct{}
	value any
}

func newConnServer(h http.Handler, protos http.Protocols, log *slog.Logger) *connServer {
	cs := &connServer{
		ln:     chanListener{ch: make(chan net.Conn), closed: make(chan struct{})},
		served: make(chan struct{}),
		conns:  map[net.Conn]*servedConn{},
	}
	cs.srv = &http.Server{
		Handler:           h,
		Protocols:         &protos,
		ErrorLog:          stdlog.New(httpErrorLog{log}, "", 0),
		ReadHeaderTimeout: 30 * time.Second, // HTTP/1.1 only; HTTP/2 has its own
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams: 1000,
			// A peer that stops answering pings is gone: its streams end
			// and the connection is closed.
			SendPingTimeout: 15 * time.Second,
			PingTimeout:     5 * time.Second,
		},
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			cs.mu.Lock()
			sc := cs.conns[c]
			cs.mu.Unlock()
			if sc != nil && sc.value != nil {
				ctx = context.WithValue(ctx, connValueKey, sc.value)
			}
			return ctx
		},
		ConnState: func(c net.Conn, st http.ConnState) {
			if st != http.StateClosed && st != http.StateHijacked {
				return
			}
			cs.mu.Lock()
			sc := cs.conns[c]
			delete(cs.conns, c)
			cs.mu.Unlock()
			if sc != nil {
				close(sc.done)
			}
		},
	}
	go func() {
		defer close(cs.served)
		_ = cs.srv.Serve(&cs.ln)
	}()
	return cs
}

// serve hands c to the server with a value the handler finds in the
// request's context under connValueKey, and returns when c is closed.
func (cs *connServer) serve(ctx context.Context, c net.Conn, value any) {
	sc := &servedConn{done: make(chan struct{}), value: value}
	cs.mu.Lock()
	cs.conns[c] = sc
	cs.mu.Unlock()
	select {
	case cs.ln.ch <- c:
	case <-cs.ln.closed:
		_ = c.Close()
		return
	case <-ctx.Done():
		_ = c.Close()
		return
	}
	select {
	case <-sc.done:
	case <-ctx.Done():
		_ = c.Close()
		<-sc.done
	}
}

// close stops the server and its connections and waits for its Serve loop.
// Connections handed over by serve are waited for by serve's callers.
func (cs *connServer) close() {
	cs.ln.close()
	_ = cs.srv.Close()
	<-cs.served
}

// httpErrorLog takes net/http's server log: a handler's panic is a bug
// and logged as an error; the rest is about a client (a bad frame, a
// reset, a failed handshake) and logged at debug level.
type httpErrorLog struct{ log *slog.Logger }

func (l httpErrorLog) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	if strings.Contains(msg, "panic serving") {
		l.log.Error("HTTP handler panicked", "err", msg)
	} else {
		l.log.Debug("HTTP server", "msg", msg)
	}
	return len(p), nil
}

// chanListener is a net.Listener whose connections come from serve.
type chanListener struct {
	ch     chan net.Conn
	once   sync.Once
	closed chan struct{}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) close()         { l.once.Do(func() { close(l.closed) }) }
func (l *chanListener) Close() error   { l.close(); return nil }
func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// prefixConn is a connection whose first bytes were already read into br.
type prefixConn struct {
	net.Conn
	br *bufio.Reader
}

func (c *prefixConn) Read(p []byte) (int, error) { return c.br.Read(p) }

// CloseWrite half-closes the connection underneath (a tunnel after an
// upgrade passes half-closes on), or closes it.
func (c *prefixConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// h2Server is the upstream's HTTP/2 server, made on first use and closed
// by closeH2Server when the sidecar stops; nil after that.
func (u *upstream) h2Server() *connServer {
	u.h2Once.Do(func() {
		var p http.Protocols
		p.SetUnencryptedHTTP2(true)
		p.SetHTTP1(true) // an http2 upstream serves HTTP/1.1 clients too
		u.h2srv = newConnServer(http.HandlerFunc(u.serveH2), p, u.s.log)
	})
	return u.h2srv
}

// h2ClientConfig is the sidecars' mTLS client config offering HTTP/2.
func h2ClientConfig(c *tls.Config) *tls.Config {
	c = c.Clone()
	c.NextProtos = []string{"h2"}
	return c
}

// h2Transport makes the pool's HTTP/2 connections to its endpoints; made
// on first use.
func (p *backendPool) h2Transport() *http.Transport {
	p.h2Once.Do(func() {
		var protos http.Protocols
		protos.SetHTTP2(true)
		cfg := h2ClientConfig(p.s.clientTLS)
		p.h2t = &http.Transport{
			Protocols: &protos,
			HTTP2: &http.HTTP2Config{
				MaxConcurrentStreams: 1000,
				SendPingTimeout:      15 * time.Second,
				PingTimeout:          5 * time.Second,
			},
			DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				t, _ := ctx.Value(targetKey).(*balancer.Target)
				if t == nil {
					return nil, errors.New("no target to dial")
				}
				c, err := p.dialTLS(ctx, t, cfg)
				if err != nil {
					return nil, err
				}
				if tc, ok := c.(*tls.Conn); ok && tc.ConnectionState().NegotiatedProtocol != "h2" {
					_ = c.Close()
					return nil, fmt.Errorf("endpoint %s of %s does not speak HTTP/2 over mTLS (an older sidecar?)", t.Name, p.label)
				}
				return c, nil
			},
		}
	})
	return p.h2t
}

// h2Conn returns an HTTP/2 connection to t with a stream reserved on it,
// opening one when none has room. An error means nothing was sent.
func (p *backendPool) h2Conn(ctx context.Context, t *balancer.Target) (*http.ClientConn, error) {
	pl := t.Data.(*pool)
	pl.mu.Lock()
	for i := 0; i < len(pl.h2); {
		cc := pl.h2[i]
		if cc.Err() != nil {
			pl.h2 = append(pl.h2[:i], pl.h2[i+1:]...)
			_ = cc.Close()
			continue
		}
		if cc.Reserve() == nil {
			pl.mu.Unlock()
			return cc, nil
		}
		i++
	}
	pl.mu.Unlock()
	// The connection outlives the request that opens it: the dial ends at
	// its timeout or when the sidecar stops, not with ctx.
	dctx, cancel := context.WithTimeout(context.WithValue(context.WithoutCancel(ctx), targetKey, t), p.s.cfg.HandshakeTimeout)
	defer cancel()
	defer context.AfterFunc(p.s.own.ctx, cancel)()
	cc, err := p.h2Transport().NewClientConn(dctx, "https", h2Dummy)
	if err != nil {
		return nil, err
	}
	if err := cc.Reserve(); err != nil {
		_ = cc.Close()
		return nil, err
	}
	pl.mu.Lock()
	if pl.shut {
		pl.mu.Unlock()
		cc.Release()
		_ = cc.Close()
		return nil, errors.New("endpoint removed")
	}
	pl.h2 = append(pl.h2, cc)
	pl.mu.Unlock()
	return cc, nil
}

func isH2(protocol string) bool { return protocol == ProtocolHTTP2 || protocol == ProtocolGRPC }

// grpcHealthRequest is grpc.health.v1.Health/Check's empty request (the
// server as a whole) in gRPC's length-prefixed framing.
var grpcHealthRequest = []byte{0, 0, 0, 0, 0}

// grpcHealth is the active check of an http2/grpc pool's endpoint: the
// standard gRPC health check (grpc.health.v1, service ""), sent through
// the endpoint's sidecar like any call. SERVING is healthy; an app without
// the health service (UNIMPLEMENTED) is healthy when it answers at all;
// NOT_SERVING, another status or no answer is not.
func (p *backendPool) grpcHealth(ctx context.Context, t *balancer.Target) error {
	cc, err := p.h2Conn(ctx, t)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+h2Dummy+"/grpc.health.v1.Health/Check", bytes.NewReader(grpcHealthRequest))
	if err != nil {
		cc.Release()
		return err
	}
	req.Host = p.name + "." + p.namespace
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	resp, err := cc.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64))
	if err != nil {
		return err
	}
	code, ok := answerStatus(resp)
	switch {
	case !ok:
		return fmt.Errorf("health check of %s: HTTP %d without a gRPC status", t.Name, resp.StatusCode)
	case code == grpcUnimplemented:
		return nil
	case code != grpcOK:
		return fmt.Errorf("health check of %s: gRPC status %d", t.Name, code)
	}
	// HealthCheckResponse{status = 1 (SERVING)}: field 1, varint 1.
	if len(body) == 7 && body[5] == 0x08 && body[6] == 1 {
		return nil
	}
	return fmt.Errorf("health check of %s: not serving (%x)", t.Name, body)
}

// isGRPC reports whether a request is gRPC (any application/grpc
// content type).
func isGRPC(h http.Header) bool {
	return strings.HasPrefix(h.Get("Content-Type"), "application/grpc")
}

// answerStatus is an answer's gRPC status: from its trailers, or from its
// head for a trailers-only answer; ok is false when there is none.
func answerStatus(resp *http.Response) (int, bool) {
	if code, ok := grpcStatus(resp.Trailer); ok {
		return code, true
	}
	return grpcStatus(resp.Header)
}

// grpcStatus reads a gRPC status from h; ok is false when there is none.
func grpcStatus(h http.Header) (int, bool) {
	v := h.Get("Grpc-Status")
	if v == "" {
		return 0, false
	}
	n, err := strconv.Atoi(v)
	return n, err == nil
}

// hopByHop are headers that belong to one connection (RFC 9110, 7.6.1);
// HTTP/2 forbids them.
var hopByHop = []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"}

// h2Error answers a request the sidecar could not serve: for gRPC in the
// trailers-only form (HTTP 200, the status in the headers), else as
// writeError does for HTTP/1.1.
func h2Error(w http.ResponseWriter, grpc bool, code, grpcCode int, reason, detail string) {
	h := w.Header()
	h.Set("X-Fedmesh-Error", reason)
	if grpc {
		h.Set("Content-Type", "application/grpc")
		h.Set("Grpc-Status", strconv.Itoa(grpcCode))
		h.Set("Grpc-Message", grpcEscape(reason+": "+detail))
		w.WriteHeader(http.StatusOK)
		return
	}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, reason+": "+detail+"\n")
}

// grpcEscape percent-encodes a grpc-message (gRPC over HTTP/2 spec).
func grpcEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c <= 0x7e && c != '%' {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, "%%%02X", c)
	}
	return b.String()
}

// replayBody keeps the first maxBuffered bytes of a request body as the
// attempts read it, so a request whose body was read whole (or not at all)
// can be sent again to another endpoint.
type replayBody struct {
	src     io.ReadCloser
	mu      sync.Mutex
	buf     []byte
	eof     bool // src is done
	over    bool // more than maxBuffered was read: no replay
	started bool // a read of src began
}

// replayable reports whether a new attempt can send the body whole: no
// read of src is in progress or lost.
func (b *replayBody) replayable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.over && (b.eof || !b.started)
}

func (b *replayBody) empty() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.eof && len(b.buf) == 0
}

// attemptBody is one attempt's reader of a replayBody. The transport reads
// it in its own goroutine, possibly after the attempt was given up; end
// cuts it off.
type attemptBody struct {
	b    *replayBody
	off  int
	done atomic.Bool
}

func (a *attemptBody) Read(p []byte) (int, error) {
	if a.done.Load() {
		return 0, io.ErrUnexpectedEOF
	}
	b := a.b
	b.mu.Lock()
	if a.off < len(b.buf) {
		n := copy(p, b.buf[a.off:])
		a.off += n
		b.mu.Unlock()
		return n, nil
	}
	if b.eof {
		b.mu.Unlock()
		return 0, io.EOF
	}
	b.started = true
	b.mu.Unlock()
	n, err := b.src.Read(p) // without the lock: it may wait for the client
	b.mu.Lock()
	if n > 0 && !b.over {
		if len(b.buf)+n <= maxBuffered {
			b.buf = append(b.buf, p[:n]...)
			a.off = len(b.buf)
		} else {
			b.over = true
		}
	}
	if err == io.EOF {
		b.eof = true
	}
	b.mu.Unlock()
	return n, err
}

func (a *attemptBody) Close() error { return nil }
func (a *attemptBody) end()         { a.done.Store(true) }

// serveH2 serves one HTTP/2 request (or HTTP/1.1 on an http2 upstream):
// route, pick, send over HTTP/2 with mTLS, retry and fail over where safe,
// then stream the answer and its trailers back.
func (u *upstream) serveH2(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	svc := u.name
	grpc := isGRPC(r.Header)
	rec := reqRecord{req: r, start: start, traceID: traceContext(r.Header)}
	gs := func(code int) int { // the gRPC status of an error answer, for the log
		if grpc {
			return code
		}
		return -1
	}
	if !u.enter() {
		u.finish(&rec, "", "overflow", http.StatusServiceUnavailable, gs(grpcResourceExhausted))
		h2Error(w, grpc, http.StatusServiceUnavailable, grpcResourceExhausted, "overflow", "too many outstanding requests")
		return
	}
	defer u.leave()
	u.budget.request(start)
	pl, ok := u.planFor(r, start)
	if !ok {
		u.finish(&rec, "", "no_endpoint", http.StatusServiceUnavailable, gs(grpcUnavailable))
		h2Error(w, grpc, http.StatusServiceUnavailable, grpcUnavailable, "no_healthy_endpoint", "no backend of route "+pl.rt.name+" has an endpoint")
		return
	}
	rt, bp, maxAttempts := pl.rt, pl.bp, pl.maxAttempts
	// The request deadline bounds the wait for the answer's head; a
	// stream's life is its client's business (gRPC sends its deadline
	// along), unless a route sets timeouts.request, which bounds it all.
	headDeadline := start.Add(pl.reqTimeout)
	ctx := r.Context()
	if rt != nil && rt.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, headDeadline)
		defer cancel()
	}
	body := &replayBody{src: r.Body}
	if r.Body == nil || r.Body == http.NoBody {
		body.eof = true
	}
	// A request that may have reached the app is sent again only when its
	// method is idempotent; gRPC calls (POST) only after a trailers-only
	// UNAVAILABLE, gRPC's own transparent-retry condition.
	idem := idempotent(r.Method)

	timedOut := false
	var lastErr error
	var exBuf [8]*balancer.Target
	tried := exBuf[:0]
	at := attempts{u: u, picker: pl.picker, max: maxAttempts, deadline: headDeadline}
	if rt != nil {
		at.backoff = rt.backoff
	}
	for {
		if at.n > 0 && !body.replayable() {
			break
		}
		t := at.next(tried)
		if t == nil {
			break
		}
		tried = append(tried, t)
		rec.endpoint = t.Name
		rec.attempts++
		resp, ab, cancel, sent, err := u.h2Attempt(ctx, bp, t, r, body, min(pl.attemptTimeout, time.Until(headDeadline)))
		if err != nil {
			lastErr = err
			u.s.log.Debug("attempt failed", "upstream", svc, "cluster", t.Cluster, "endpoint", t.Name, "err", err)
			timedOut = timedOut || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded)
			if r.Context().Err() != nil {
				u.finish(&rec, t.Cluster, "client_error", 0, -1)
				return // the client went away
			}
			if !sent || (idem && body.replayable()) {
				continue
			}
			u.finish(&rec, t.Cluster, "error", http.StatusBadGateway, gs(grpcUnavailable))
			h2Error(w, grpc, http.StatusBadGateway, grpcUnavailable, "upstream_failed", err.Error())
			return
		}
		code, _ := grpcStatus(resp.Header)
		retry := false
		if grpc {
			// Trailers-only UNAVAILABLE: the server refused before doing
			// anything (gRPC's own transparent-retry condition).
			retry = code == grpcUnavailable && body.replayable()
		} else {
			retry = idem && body.replayable() && rt.retryable(resp.StatusCode)
		}
		if retry && at.n < maxAttempts {
			_ = resp.Body.Close()
			ab.end()
			cancel()
			lastErr = fmt.Errorf("%s answered %s", t.Name, resp.Status)
			continue
		}
		var buffered *[]byte
		if n := resp.ContentLength; !grpc && n > 0 && n <= maxBuffered {
			// A small answer is read whole before its head is passed on:
			// an endpoint dying mid-body then costs a retry, not a failed
			// request (as on HTTP/1.1). gRPC answers stream.
			buffered = getBody(int(n))
			if err := readWhole(resp.Body, *buffered); err != nil {
				putBody(buffered)
				_ = resp.Body.Close()
				ab.end()
				cancel()
				t.Outlier.Report(health.ConnectFailure)
				lastErr = fmt.Errorf("%s: read answer body: %w", t.Name, err)
				if idem && body.replayable() && r.Context().Err() == nil {
					continue
				}
				u.finish(&rec, t.Cluster, "error", http.StatusBadGateway, gs(grpcUnavailable))
				h2Error(w, grpc, http.StatusBadGateway, grpcUnavailable, "upstream_failed", lastErr.Error())
				return
			}
			_ = resp.Body.Close()
			resp.Body = io.NopCloser(bytes.NewReader(*buffered))
		}
		if at.failedOver(t) {
			u.s.m.failovers.WithLabelValues(svc, t.Cluster).Inc()
		}
		aborted := u.h2Respond(w, resp, t, &rec, rt)
		putBody(buffered)
		ab.end()
		cancel()
		if aborted {
			panic(http.ErrAbortHandler) // the client sees a reset stream, not a clean end
		}
		return
	}
	if timedOut || time.Now().After(headDeadline) {
		u.finish(&rec, "", "timeout", http.StatusGatewayTimeout, gs(grpcDeadlineExceeded))
		h2Error(w, grpc, http.StatusGatewayTimeout, grpcDeadlineExceeded, "timeout", "no answer from "+bp.label+" in time")
		return
	}
	detail := "no endpoint of " + bp.label + " answered"
	if lastErr != nil {
		detail += " (last: " + lastErr.Error() + ")"
	}
	u.finish(&rec, "", "no_endpoint", http.StatusServiceUnavailable, gs(grpcUnavailable))
	h2Error(w, grpc, http.StatusServiceUnavailable, grpcUnavailable, "no_healthy_endpoint", detail)
}

// readWhole fills buf from a body of exactly len(buf) bytes and reads on
// to its end, where HTTP/2 trailers arrive.
func readWhole(body io.Reader, buf []byte) error {
	if _, err := io.ReadFull(body, buf); err != nil {
		return err
	}
	var one [1]byte
	if _, err := io.ReadFull(body, one[:]); err != io.EOF {
		return cmp.Or(err, errors.New("body longer than its Content-Length"))
	}
	return nil
}

// h2Attempt sends r to t and waits for the answer's head, at most timeout.
// The caller ends ab and calls cancel once done with the response. sent
// reports whether the request may have reached the endpoint.
func (u *upstream) h2Attempt(ctx context.Context, bp *backendPool, t *balancer.Target, r *http.Request, body *replayBody, timeout time.Duration) (resp *http.Response, ab *attemptBody, cancel context.CancelFunc, sent bool, err error) {
	t.Begin()
	began := time.Now()
	cc, err := bp.h2Conn(ctx, t)
	if err != nil {
		t.Outlier.Report(health.ConnectFailure)
		t.End(0, false)
		return nil, nil, nil, false, err
	}
	actx, cancelAttempt := context.WithCancel(ctx)
	timer := time.AfterFunc(timeout, cancelAttempt)
	defer func() {
		if err != nil {
			cancelAttempt()
		}
	}()
	out := r.Clone(actx)
	out.RequestURI = ""
	out.URL.Scheme, out.URL.Host = "https", h2Dummy
	out.Close = false
	for _, h := range hopByHop {
		out.Header.Del(h)
	}
	ab = &attemptBody{b: body}
	if body.empty() {
		out.Body = http.NoBody
	} else {
		out.Body = ab
		out.ContentLength = r.ContentLength
	}
	resp, err = cc.RoundTrip(out)
	if !timer.Stop() && err == nil {
		err = context.DeadlineExceeded // the head came, but too late
		_ = resp.Body.Close()
	}
	if err != nil {
		ab.end()
		if ctx.Err() == nil {
			t.Outlier.Report(health.ConnectFailure)
		}
		t.End(0, false)
		return nil, nil, nil, true, fmt.Errorf("%s: %w", t.Name, err)
	}
	code, _ := grpcStatus(resp.Header)
	if resp.StatusCode >= 500 || code == grpcUnavailable {
		t.Outlier.Report(health.ServerFailure)
	} else {
		t.Outlier.Report(health.Success)
		returnIfEjected(t)
	}
	lat := time.Since(began)
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable || code == grpcResourceExhausted {
		lat = min(max(lat, 2*t.Latency(), overloadFloor), overloadCap)
	}
	t.End(lat, true)
	return resp, ab, cancelAttempt, true, nil
}

// h2Respond streams resp to the client: head, body (flushed as it comes,
// so streams stay live) and trailers. aborted means the answer broke off
// and the client's stream must be reset.
func (u *upstream) h2Respond(w http.ResponseWriter, resp *http.Response, t *balancer.Target, rec *reqRecord, rt *route) (aborted bool) {
	defer resp.Body.Close()
	if rt != nil && rt.respHeaders != nil {
		rt.respHeaders.apply(resp.Header, nil)
	}
	result := "ok"
	if resp.StatusCode >= 500 {
		result = "5xx"
	}
	err := copyH2Response(w, resp)
	aborted = errors.Is(err, errBodyBroken)
	code, ok := answerStatus(resp)
	if !ok {
		code = -1
	} else if code != grpcOK && result == "ok" {
		result = "grpc_error"
	}
	if aborted {
		result = "error"
	} else if err != nil {
		result = "client_error"
	}
	u.finish(rec, t.Cluster, result, resp.StatusCode, code)
	u.latency.Observe(time.Since(rec.start).Seconds())
	return aborted
}

// errBodyBroken: an answer's body ended with an error, not its end.
var errBodyBroken = errors.New("answer body broke off")

// copyH2Response writes resp's head, body and trailers to w. A body that
// breaks off returns errBodyBroken: the caller must reset the stream
// (panic with http.ErrAbortHandler), never end it cleanly.
func copyH2Response(w http.ResponseWriter, resp *http.Response) error {
	h := w.Header()
	for k, vs := range resp.Header {
		h[k] = vs
	}
	for _, k := range hopByHop {
		h.Del(k)
	}
	h.Del("Trailer") // trailers are sent with TrailerPrefix below
	w.WriteHeader(resp.StatusCode)
	bp := spliceBufs.Get().(*[]byte)
	defer spliceBufs.Put(bp)
	buf := *bp
	flusher, _ := w.(http.Flusher)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return errBodyBroken
		}
	}
	for k, vs := range resp.Trailer {
		h[http.TrailerPrefix+k] = vs
	}
	return nil
}
