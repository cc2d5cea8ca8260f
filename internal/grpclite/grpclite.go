// Package grpclite calls gRPC methods with nothing but net/http's own
// HTTP/2 client. It exists for the sidecar, which runs beside every pod: it
// needs two server-streaming calls (the Workload API and the discovery API)
// and grpc-go plus the protobuf runtime would put about 4 MB of code into
// every sidecar's resident set for them. Messages are bytes here; callers
// encode and decode them with protowire.
//
// What it speaks: the gRPC-over-HTTP/2 wire protocol (length-prefixed
// messages, grpc-status and grpc-message in trailers or in a trailers-only
// response), without compression. Targets are a unix socket
// ("unix:///path" or "unix:path"), or host:port over TLS (ALPN h2) or, when
// no TLS config is given, over cleartext HTTP/2 with prior knowledge.
package grpclite

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Code is a gRPC status code.
type Code uint32

// The codes callers act on; any other arrives as its number.
const (
	OK                Code = 0
	Canceled          Code = 1
	Unknown           Code = 2
	InvalidArgument   Code = 3
	DeadlineExceeded  Code = 4
	NotFound          Code = 5
	PermissionDenied  Code = 7
	ResourceExhausted Code = 8
	Unimplemented     Code = 12
	Internal          Code = 13
	Unavailable       Code = 14
	Unauthenticated   Code = 16
)

var codeNames = map[Code]string{
	OK: "OK", Canceled: "Canceled", Unknown: "Unknown", InvalidArgument: "InvalidArgument",
	DeadlineExceeded: "DeadlineExceeded", NotFound: "NotFound", PermissionDenied: "PermissionDenied",
	ResourceExhausted: "ResourceExhausted", Unimplemented: "Unimplemented", Internal: "Internal",
	Unavailable: "Unavailable", Unauthenticated: "Unauthenticated",
}

func (c Code) String() string {
	if n, ok := codeNames[c]; ok {
		return n
	}
	return "Code(" + strconv.FormatUint(uint64(c), 10) + ")"
}

// Error is a call that ended with a status other than OK.
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("rpc error: code = %s desc = %s", e.Code, e.Message)
}

// CodeOf is err's gRPC code: OK for nil, Unknown for an error that is not
// an *Error.
func CodeOf(err error) Code {
	if err == nil {
		return OK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return Unknown
}

// Client calls methods on one target. It is safe for concurrent use; calls
// share one HTTP/2 connection, redialed when it breaks.
type Client struct {
	tr   *http.Transport
	base string // scheme://authority
}

// Keepalive over TCP: a connection that has been silent for pingAfter is
// pinged, and closed when the ping is not answered within pingTimeout, so a
// peer that vanished without a FIN ends the streams instead of leaving them
// hanging. grpc-go servers by default send GOAWAY "too_many_pings" to a
// client that pings more often than every 5 minutes while they send nothing,
// so the one TCP server fedmesh calls, the federation controller, both
// permits these pings and pings first, every 30 s: a live controller keeps
// the client from ever pinging. Unix sockets (the Workload API, perhaps a
// SPIRE agent with its default policy) are not pinged: a local server that
// goes away closes the socket.
var pingAfter = 45 * time.Second // a variable for the keepalive test

const (
	pingTimeout = 10 * time.Second
	dialTimeout = 10 * time.Second
)

// New prepares calls to target; it does not dial. tlsConf nil means
// cleartext HTTP/2 (a unix socket, or loopback); otherwise TLS with ALPN h2.
func New(target string, tlsConf *tls.Config) (*Client, error) {
	tr := &http.Transport{
		HTTP2:              &http.HTTP2Config{},
		DisableCompression: true,
	}
	d := net.Dialer{Timeout: dialTimeout}
	authority := target
	switch {
	case strings.HasPrefix(target, "unix:"):
		path := strings.TrimPrefix(target, "unix:")
		if strings.HasPrefix(path, "//") {
			u, err := url.Parse(target)
			if err != nil || u.Host != "" {
				return nil, fmt.Errorf("grpc target %q: want unix:///absolute/path or unix:relative/path", target)
			}
			path = u.Path
		}
		if path == "" {
			return nil, fmt.Errorf("grpc target %q: no socket path", target)
		}
		authority = "localhost"
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		}
	default:
		if _, _, err := net.SplitHostPort(target); err != nil {
			return nil, fmt.Errorf("grpc target %q: want host:port or unix:///path: %w", target, err)
		}
		tr.DialContext = d.DialContext
		tr.HTTP2.SendPingTimeout, tr.HTTP2.PingTimeout = pingAfter, pingTimeout
	}
	p := new(http.Protocols)
	scheme := "http"
	if tlsConf != nil {
		if tlsConf.NextProtos == nil {
			tlsConf = tlsConf.Clone()
			tlsConf.NextProtos = []string{"h2"}
		}
		tr.TLSClientConfig = tlsConf
		p.SetHTTP2(true)
		scheme = "https"
	} else {
		p.SetUnencryptedHTTP2(true)
	}
	tr.Protocols = p
	return &Client{tr: tr, base: scheme + "://" + authority}, nil
}

// Close closes the client's idle connections; calls in flight end with
// their contexts.
func (c *Client) Close() { c.tr.CloseIdleConnections() }

// Stream is a server-streaming call in progress.
type Stream struct {
	resp   *http.Response
	cancel context.CancelFunc
	hdr    [5]byte
	done   error // set once the stream has ended
}

// ServerStream sends one request message to method ("/pkg.Service/Method")
// with the given metadata and returns the stream of answers.
func (c *Client) ServerStream(ctx context.Context, method string, md map[string]string, req []byte) (*Stream, error) {
	ctx, cancel := context.WithCancel(ctx)
	body := make([]byte, 5+len(req))
	binary.BigEndian.PutUint32(body[1:5], uint32(len(req)))
	copy(body[5:], req)
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+method, bytes.NewReader(body))
	if err != nil {
		cancel()
		return nil, &Error{Code: Internal, Message: err.Error()}
	}
	hr.Header.Set("Content-Type", "application/grpc")
	hr.Header.Set("Te", "trailers")
	hr.Header.Set("User-Agent", "fedmesh-grpclite")
	if dl, ok := ctx.Deadline(); ok {
		hr.Header.Set("Grpc-Timeout", timeoutHeader(time.Until(dl)))
	}
	for k, v := range md {
		hr.Header.Set(k, v)
	}
	resp, err := c.tr.RoundTrip(hr)
	if err != nil {
		defer cancel()
		if ctx.Err() != nil {
			return nil, ctxError(ctx)
		}
		return nil, &Error{Code: Unavailable, Message: err.Error()}
	}
	s := &Stream{resp: resp, cancel: cancel}
	if err := s.checkHead(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// checkHead turns a non-gRPC answer or a trailers-only status into an error.
func (s *Stream) checkHead() error {
	h := s.resp.Header
	if s.resp.StatusCode != http.StatusOK {
		return &Error{Code: httpCode(s.resp.StatusCode), Message: "unexpected HTTP status " + s.resp.Status}
	}
	if ct := h.Get("Content-Type"); !strings.HasPrefix(ct, "application/grpc") {
		return &Error{Code: Unknown, Message: fmt.Sprintf("unexpected content-type %q", ct)}
	}
	if st := h.Get("Grpc-Status"); st != "" { // trailers-only
		return statusError(st, h.Get("Grpc-Message"))
	}
	return nil
}

// Recv returns the next message. It returns io.EOF when the server ended
// the stream with OK, an *Error for any other status, and a message longer
// than limit bytes is an error (ResourceExhausted) that ends the stream.
func (s *Stream) Recv(limit int) ([]byte, error) {
	if s.done != nil {
		return nil, s.done
	}
	msg, err := s.recv(limit)
	if err != nil {
		s.done = err
		s.Close()
	}
	return msg, err
}

func (s *Stream) recv(limit int) ([]byte, error) {
	if _, err := io.ReadFull(s.resp.Body, s.hdr[:]); err != nil {
		if err == io.EOF {
			return nil, s.trailerStatus()
		}
		return nil, s.readError(err)
	}
	if s.hdr[0] != 0 {
		return nil, &Error{Code: Internal, Message: "compressed message, but no compression was offered"}
	}
	n := binary.BigEndian.Uint32(s.hdr[1:])
	if int64(n) > int64(limit) {
		return nil, &Error{Code: ResourceExhausted, Message: fmt.Sprintf("received message of %d bytes, over the limit of %d", n, limit)}
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(s.resp.Body, msg); err != nil {
		return nil, s.readError(err)
	}
	return msg, nil
}

func (s *Stream) trailerStatus() error {
	st := s.resp.Trailer.Get("Grpc-Status")
	if st == "" {
		return &Error{Code: Internal, Message: "stream ended without a grpc-status"}
	}
	if err := statusError(st, s.resp.Trailer.Get("Grpc-Message")); err != nil {
		return err
	}
	return io.EOF
}

func (s *Stream) readError(err error) error {
	if ctx := s.resp.Request.Context(); ctx.Err() != nil {
		return ctxError(ctx)
	}
	if err == io.ErrUnexpectedEOF {
		return &Error{Code: Internal, Message: "stream ended inside a message"}
	}
	return &Error{Code: Unavailable, Message: err.Error()}
}

// Close ends the call (resetting the stream if the server has not ended it).
func (s *Stream) Close() {
	s.cancel()
	s.resp.Body.Close()
}

// Unary calls a method with one request and one answer of at most limit
// bytes.
func (c *Client) Unary(ctx context.Context, method string, md map[string]string, req []byte, limit int) ([]byte, error) {
	s, err := c.ServerStream(ctx, method, md, req)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	msg, err := s.Recv(limit)
	if err == io.EOF {
		return nil, &Error{Code: Internal, Message: "no answer message"}
	}
	if err != nil {
		return nil, err
	}
	if _, err := s.Recv(0); err != io.EOF {
		if err == nil || CodeOf(err) == ResourceExhausted {
			return nil, &Error{Code: Internal, Message: "more than one answer to a unary call"}
		}
		return nil, err
	}
	return msg, nil
}

func statusError(code, msg string) error {
	n, err := strconv.ParseUint(code, 10, 32)
	if err != nil {
		return &Error{Code: Unknown, Message: fmt.Sprintf("malformed grpc-status %q", code)}
	}
	if n == 0 {
		return nil
	}
	if m, err := url.PathUnescape(msg); err == nil {
		msg = m
	}
	return &Error{Code: Code(n), Message: msg}
}

func ctxError(ctx context.Context) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return &Error{Code: DeadlineExceeded, Message: ctx.Err().Error()}
	}
	return &Error{Code: Canceled, Message: ctx.Err().Error()}
}

// httpCode maps an HTTP status to a gRPC code as the gRPC spec's
// http-grpc-status-mapping does.
func httpCode(status int) Code {
	switch status {
	case http.StatusBadRequest:
		return Internal
	case http.StatusUnauthorized:
		return Unauthenticated
	case http.StatusForbidden:
		return PermissionDenied
	case http.StatusNotFound:
		return Unimplemented
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return Unavailable
	}
	return Unknown
}

// timeoutHeader is a grpc-timeout value: at most 8 digits and a unit.
func timeoutHeader(d time.Duration) string {
	if d <= 0 {
		return "1n"
	}
	for _, u := range []struct {
		unit string
		d    time.Duration
	}{{"n", time.Nanosecond}, {"u", time.Microsecond}, {"m", time.Millisecond}, {"S", time.Second}, {"M", time.Minute}} {
		if v := (d + u.d - 1) / u.d; v < 1e8 {
			return strconv.FormatInt(int64(v), 10) + u.unit
		}
	}
	return strconv.FormatInt(int64(min(d/time.Hour, 1e8-1)), 10) + "H"
}
