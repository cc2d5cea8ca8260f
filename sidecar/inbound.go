package sidecar

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

// appDialTimeout bounds the dial to the app on localhost.
const appDialTimeout = time.Second

// maxDrain is how much of a refused request's body is read to keep the
// connection; a longer body closes it.
const maxDrain = 1 << 20

func (s *Sidecar) serveInbound(ctx context.Context) {
	// Offer HTTP/2 to client sidecars (their HTTP/2 and gRPC requests);
	// HTTP/1.1 and opaque TCP callers offer nothing and get what they had.
	// Set before the first handshake, never after.
	s.serverTLS.NextProtos = []string{"h2", "http/1.1"}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := s.inbound.Accept()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				s.log.Error("accept inbound", "err", err)
			}
			return
		}
		wg.Go(func() {
			untrack := s.track(c)
			defer untrack()
			if err := s.handleInbound(c); err != nil {
				s.log.Debug("inbound connection", "remote", c.RemoteAddr().String(), "err", err)
			}
		})
	}
}

// watchOwn applies the own service's policy (authorization, rate limits)
// from its sets until ctx ends. While the source is away the last policy
// stays; before the first set the defaults apply.
func (s *Sidecar) watchOwn(ctx context.Context, ch <-chan endpoints.Set) {
	limiters := map[string]*limiter{}
	for {
		select {
		case <-ctx.Done():
			return
		case set, ok := <-ch:
			if !ok {
				return
			}
			in, errs := compileInbound(set.Policy, s.cfg.ServicePort, limiters)
			for _, err := range errs {
				s.log.Error("inbound policy rule admits nothing", "service", s.cfg.Service.String(), "err", err)
			}
			s.inPolicy.Store(in)
			if n := s.tcpIn.enforce(in); n > 0 {
				s.log.Info("inbound connections reset: the new policy refuses their callers", "service", s.cfg.Service.String(), "connections", n)
			}
			s.log.Info("inbound policy updated", "service", s.cfg.Service.String(),
				"authz", in.authz != nil, "rateLimits", len(in.limits))
		}
	}
}

// reset aborts c with a TCP reset (no close_notify, no FIN): the caller
// sees the refusal at once and no byte of its reached the app.
func reset(c net.Conn) {
	if tc, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// handleInbound owns c. The app is dialed before the handshake: when the
// app is gone, the caller's handshake fails, which its sidecar counts as a
// connect failure and retries elsewhere, before any request byte is sent.
// Bytes reach the app only after the caller was authorized: by the
// handshake (trust domains, or Config.Allow) and, under an
// AuthorizationPolicy, by the policy right after it.
func (s *Sidecar) handleInbound(c net.Conn) error {
	app, err := net.DialTimeout("tcp", s.cfg.AppAddr, appDialTimeout)
	if err != nil {
		s.m.inbound.WithLabelValues("app_unreachable").Inc()
		_ = c.Close()
		return err
	}
	if tc, ok := app.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	c, app = s.socket(c), s.socket(app)
	tc := tls.Server(c, s.serverTLS)
	_ = c.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	if err := tc.Handshake(); err != nil {
		s.m.inbound.WithLabelValues("handshake_failed").Inc()
		_ = c.Close()
		_ = app.Close()
		return err
	}
	_ = c.SetDeadline(time.Time{})
	untrack := s.track(app)
	defer untrack()
	pol := s.inPolicy.Load()
	httpIn := s.cfg.InboundProtocol == ProtocolHTTP
	if (pol == nil || (pol.authz == nil && len(pol.limits) == 0)) && s.cfg.Service.IsZero() {
		// No policy can ever apply (no Service to watch): the fast path,
		// untracked, for HTTP inbounds too.
		s.m.inbound.WithLabelValues("accepted").Inc()
		splice(tc, app)
		return nil
	}
	id, err := mtls.PeerID(tc.ConnectionState())
	if err != nil {
		reset(c)
		_ = app.Close()
		return err
	}
	caller, td := id.String(), id.TrustDomain().Name()
	if httpIn && tc.ConnectionState().NegotiatedProtocol == "h2" {
		s.m.inbound.WithLabelValues("accepted").Inc()
		s.serveInboundH2(tc, app, caller, td)
		return nil
	}
	if httpIn {
		// Every request is checked against the policy in force when it
		// arrives, so a policy change applies to the next request on
		// connections that are already open, and a refused caller gets an
		// HTTP answer (403, 429) rather than a reset its sidecar would
		// retry elsewhere.
		s.m.inbound.WithLabelValues("accepted").Inc()
		s.serveInboundHTTP(tc, app, caller, td)
		return nil
	}
	if pol != nil && pol.authz != nil {
		v, by := pol.authz.connection(caller, td)
		if v != admit { // method and path rules cannot admit opaque bytes
			s.denied(pol, caller)
			s.m.inbound.WithLabelValues("refused").Inc()
			reset(c)
			_ = app.Close()
			return fmt.Errorf("caller %s refused by %s", caller, pol.authz.policies)
		}
		s.m.authz.WithLabelValues(s.cfg.Service.String(), "allow", by).Inc()
	}
	if pol != nil {
		if l, _ := s.limited(pol, caller); l != nil {
			s.m.inbound.WithLabelValues("rate_limited").Inc()
			reset(c)
			_ = app.Close()
			return fmt.Errorf("caller %s rate limited by %s", caller, l.policy)
		}
	}
	s.m.inbound.WithLabelValues("accepted").Inc()
	// Decided for the whole connection; a later policy that refuses the
	// caller resets it (inboundConns.enforce).
	forget := s.tcpIn.add(c, inboundCaller{id: caller, td: td})
	defer forget()
	splice(tc, app)
	return nil
}

// inboundConns is the set of spliced inbound connections and their
// callers: TCP inbounds, and HTTP connections that switched protocols
// (a WebSocket), with the request that was admitted. The zero value is
// ready.
type inboundConns struct {
	mu    sync.Mutex
	conns map[net.Conn]inboundCaller
}

// inboundCaller is who holds a spliced connection; method and path are
// the upgrade request's, empty for a TCP inbound.
type inboundCaller struct{ id, td, method, path string }

func (ic *inboundConns) add(c net.Conn, who inboundCaller) func() {
	ic.mu.Lock()
	if ic.conns == nil {
		ic.conns = map[net.Conn]inboundCaller{}
	}
	ic.conns[c] = who
	ic.mu.Unlock()
	return func() {
		ic.mu.Lock()
		delete(ic.conns, c)
		ic.mu.Unlock()
	}
}

// enforce resets every connection pol no longer admits: a TCP caller
// that is not admitted wholesale, an upgraded HTTP connection whose
// request would now be refused. It returns how many.
func (ic *inboundConns) enforce(pol *inboundPolicy) int {
	if pol == nil || pol.authz == nil {
		return 0
	}
	ic.mu.Lock()
	defer ic.mu.Unlock()
	n := 0
	for c, who := range ic.conns {
		var ok bool
		if who.method != "" {
			ok, _ = pol.authz.request(who.id, who.td, who.method, who.path)
		} else {
			v, _ := pol.authz.connection(who.id, who.td)
			ok = v == admit
		}
		if !ok {
			reset(c)
			delete(ic.conns, c)
			n++
		}
	}
	return n
}

// denied counts a refusal and logs it once per caller per window.
func (s *Sidecar) denied(pol *inboundPolicy, caller string) {
	s.m.authz.WithLabelValues(s.cfg.Service.String(), "deny", pol.authz.policies).Inc()
	if s.denials.should(caller, time.Now()) {
		s.log.Warn("inbound caller refused by policy (logged once per caller per 10s)",
			"service", s.cfg.Service.String(), "caller", caller, "policy", pol.authz.policies)
	}
}

// limited takes a token from every rate limit in force; it returns the
// first that had none, and the wait until it has one.
func (s *Sidecar) limited(pol *inboundPolicy, caller string) (*limiter, time.Duration) {
	if len(pol.limits) == 0 {
		return nil, 0
	}
	now := int64(time.Since(s.epoch))
	for _, l := range pol.limits {
		if ok, wait := l.take(now, caller); !ok {
			s.m.rateLimited.WithLabelValues(s.cfg.Service.String(), l.policy).Inc()
			return l, wait
		}
	}
	return nil, 0
}

// serveInboundHTTP proxies an admitted caller's HTTP/1.1 requests to the
// app one at a time, checking each against the policy in force (methods,
// paths, rate limits): a refused request is answered here and never
// reaches the app. Bodies stream both ways; buffers are pooled.
func (s *Sidecar) serveInboundHTTP(c, app net.Conn, caller, td string) {
	defer c.Close()
	defer app.Close()
	br, bw := readers.Get().(*bufio.Reader), writers.Get().(*bufio.Writer)
	abr, abw := readers.Get().(*bufio.Reader), writers.Get().(*bufio.Writer)
	br.Reset(c)
	bw.Reset(c)
	abr.Reset(app)
	abw.Reset(app)
	defer func() {
		for _, r := range []*bufio.Reader{br, abr} {
			r.Reset(nil)
			readers.Put(r)
		}
		for _, w := range []*bufio.Writer{bw, abw} {
			w.Reset(nil)
			writers.Put(w)
		}
	}()
	for {
		req, ok := nextRequest(br, bw)
		if !ok {
			return
		}
		if !s.admitRequest(req, bw, caller, td) {
			if bw.Flush() != nil || req.Close {
				return
			}
			if req.Body != http.NoBody {
				if n, _ := io.CopyN(io.Discard, req.Body, maxDrain+1); n > maxDrain {
					return
				}
			}
			continue
		}
		expectContinue(req, bw)
		if err := req.Write(abw); err != nil {
			return
		}
		if err := abw.Flush(); err != nil {
			return
		}
		resp, err := readAnswer(abr, req)
		if err != nil {
			writeError(bw, http.StatusBadGateway, "app_failed", err.Error())
			_ = bw.Flush()
			return
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			// The app took the upgrade (a WebSocket): the connection is
			// the new protocol's from here, admitted as the request was.
			if !upgradeRequested(req.Header) {
				writeError(bw, http.StatusBadGateway, "app_failed", errUnaskedSwitch)
				_ = bw.Flush()
				return
			}
			resp.Body = http.NoBody
			if resp.Write(bw) == nil && bw.Flush() == nil {
				// A later policy that would refuse this request resets
				// the connection (inboundConns.enforce).
				raw := c // reset with an RST, under the TLS
				if t, ok := c.(*tls.Conn); ok {
					raw = t.NetConn()
				}
				forget := s.tcpIn.add(raw, inboundCaller{id: caller, td: td, method: req.Method, path: req.URL.Path})
				joinSwitched(c, br, app, abr)
				forget()
			}
			return
		}
		// A body delimited by the app closing can only be passed on by
		// closing the caller's connection too.
		closeAfter := req.Close || resp.Close || (resp.ContentLength < 0 && len(resp.TransferEncoding) == 0)
		resp.Close = closeAfter
		err = resp.Write(bw)
		resp.Body.Close()
		if err != nil || bw.Flush() != nil || closeAfter {
			return
		}
	}
}

// refusal is why the policy in force refuses one request.
type refusal struct {
	forbidden bool   // else rate limited
	by        string // the policy
	wait      time.Duration
}

// checkRequest checks one request against the policy in force; nil admits.
func (s *Sidecar) checkRequest(req *http.Request, caller, td string) *refusal {
	pol := s.inPolicy.Load()
	if pol == nil {
		return nil
	}
	if pol.authz != nil {
		ok, by := pol.authz.request(caller, td, req.Method, req.URL.Path)
		if !ok {
			s.denied(pol, caller)
			return &refusal{forbidden: true, by: by}
		}
		s.m.authz.WithLabelValues(s.cfg.Service.String(), "allow", by).Inc()
	}
	if l, wait := s.limited(pol, caller); l != nil {
		return &refusal{by: l.policy, wait: wait}
	}
	return nil
}

// admitRequest checks one request against the policy in force and answers
// it when refused: 403 naming the caller and the policy, 429 with
// Retry-After, or for gRPC a trailers-only RESOURCE_EXHAUSTED.
func (s *Sidecar) admitRequest(req *http.Request, w *bufio.Writer, caller, td string) bool {
	ref := s.checkRequest(req, caller, td)
	if ref == nil {
		return true
	}
	if ref.forbidden {
		writeError(w, http.StatusForbidden, "forbidden", "caller "+caller+" is not allowed by "+ref.by)
		return false
	}
	l, wait := ref, ref.wait
	if isGRPC(req.Header) {
		// Trailers-only response form: status and message in the headers.
		w.WriteString("HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nGrpc-Status: 8\r\nGrpc-Message: rate%20limited%20by%20" + l.by + "\r\nContent-Length: 0\r\n\r\n")
		return false
	}
	body := "rate_limited: " + l.by + "\n"
	w.WriteString("HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\nX-Fedmesh-Error: rate_limited\r\nRetry-After: " +
		retryAfter(wait) + "\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body)
	return false
}

// serveInboundH2 serves an HTTP/2 connection from a client sidecar under a
// policy that needs per-request checks: each request is checked, then
// passed to the app over one HTTP/2 connection without TLS (the app was
// dialed before the handshake), many requests at once.
func (s *Sidecar) serveInboundH2(tc *tls.Conn, app net.Conn, caller, td string) {
	defer tc.Close()
	defer app.Close()
	var once sync.Once
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	appT := &http.Transport{Protocols: &p, DialContext: func(context.Context, string, string) (net.Conn, error) {
		var c net.Conn
		once.Do(func() { c = app })
		if c == nil {
			return nil, errors.New("the app connection is used up")
		}
		return c, nil
	}}
	cc, err := appT.NewClientConn(context.Background(), "http", s.cfg.AppAddr)
	if err != nil {
		s.log.Debug("inbound HTTP/2 to the app", "err", err)
		reset(tc)
		return
	}
	defer cc.Close()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		grpc := isGRPC(r.Header)
		if ref := s.checkRequest(r, caller, td); ref != nil {
			if ref.forbidden {
				h2Error(w, grpc, http.StatusForbidden, grpcPermissionDenied, "forbidden", "caller "+caller+" is not allowed by "+ref.by)
				return
			}
			w.Header().Set("Retry-After", retryAfter(ref.wait))
			h2Error(w, grpc, http.StatusTooManyRequests, grpcResourceExhausted, "rate_limited", ref.by)
			return
		}
		out := r.Clone(r.Context())
		out.RequestURI = ""
		out.URL.Scheme, out.URL.Host = "http", s.cfg.AppAddr
		for _, k := range hopByHop {
			out.Header.Del(k)
		}
		if out.Body == nil {
			out.Body = http.NoBody
		}
		resp, err := cc.RoundTrip(out)
		if err != nil {
			if r.Context().Err() == nil {
				h2Error(w, grpc, http.StatusBadGateway, grpcUnavailable, "app_failed", err.Error())
			}
			return
		}
		defer resp.Body.Close()
		if copyH2Response(w, resp) == errBodyBroken {
			panic(http.ErrAbortHandler)
		}
	})
	var sp http.Protocols
	sp.SetHTTP2(true)
	cs := newConnServer(h, sp, s.log)
	defer cs.close()
	cs.serve(context.Background(), tc, nil)
}
