// Package tunnel is the wire format spoken on every fedmesh tunnel stream: a
// sidecar opening a stream to its local gateway's egress, and a gateway
// opening a stream to a peer gateway's ingress, both start with the same
// small request header and get the same one-byte answer back before any
// application byte flows. On the TCP egress, the bytes after the answer
// travel in frames (FrameReader, FrameWriter).
//
// It exists on its own, with no dependency beyond the standard library, so
// that sidecars can import it without pulling in the gateway, and so that the
// parser that faces the network is small enough to fuzz exhaustively.
//
// Request (client to gateway), all integers big-endian:
//
//	offset size
//	0      2    magic "FM"
//	2      1    version (1)
//	3      1    flags (FlagEndpoint; unknown bits are ignored)
//	4      2    body length N, at most MaxBodyLen
//	6      2    target port (1..65535)
//	8      ...  five strings, each a 1-byte length then bytes:
//	            target cluster, namespace, service, source cluster, caller;
//	            with FlagEndpoint a sixth: the endpoint ("ip:port", as in
//	            the target cluster's EndpointSlices) the caller asks for
//
// Response (gateway to client):
//
//	0      2    magic "FM"
//	2      1    version (1)
//	3      1    code (Code)
//	4      1    reason length R
//	5      R    reason, human-readable, for logs only
//
// After a response with CodeOK, the stream carries the application's bytes
// in both directions, opaque to the gateways. After any other code, the
// gateway closes the stream.
package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"unicode/utf8"
)

// ALPN protocols. The tunnel between gateways and the egress hop from
// sidecars to their gateway are distinct so that a certificate valid for one
// cannot be used on the other by mistake.
const (
	ALPNTunnel = "fedmesh-tunnel/1"
	ALPNEgress = "fedmesh-egress/1"
)

// Version is the header version this package speaks.
const Version = 1

// FlagEndpoint marks a request for one endpoint of the target service
// (Request.Endpoint) rather than any: the caller's sidecar balances and
// ejects the remote cluster's pods one by one. The ingress still forwards
// only to a ready endpoint of an exported service; a gateway that predates
// the flag refuses the request as malformed (trailing bytes).
const FlagEndpoint uint8 = 1 << 0

// Size limits. A header is never larger than HeaderPrefixLen+MaxBodyLen
// bytes, so a reader never buffers more than that before deciding.
const (
	HeaderPrefixLen = 6
	MaxBodyLen      = 2 + 5*(1+255) + 1 + maxEndpointLen
	maxEndpointLen  = 64 // "[ipv6%zone]:port" fits
	MaxReasonLen    = 255
	maxLabelLen     = 63
)

var magic = [2]byte{'F', 'M'}

// Code is the gateway's answer to a request, sent before any application
// byte. It doubles as the QUIC application error code when a stream is
// reset because of it.
type Code uint8

// Response codes.
const (
	CodeOK                Code = 0 // the target is connected; bytes follow
	CodeNotExported       Code = 1 // the service is not exported by the target cluster
	CodeNoHealthyEndpoint Code = 2 // exported, but no ready endpoint accepted a connection
	CodeForbidden         Code = 3 // the caller or peer may not use this route
	CodeOverloaded        Code = 4 // the gateway is shedding load
	CodeBadRequest        Code = 5 // the header was malformed, oversized or of another version
	CodeUnreachable       Code = 6 // egress: no live connection to the target cluster
	CodeUnknownCluster    Code = 7 // egress: the target cluster is not a configured peer
	CodeInternal          Code = 8 // the gateway failed in a way that is not the caller's fault
)

var codeNames = [...]string{
	CodeOK:                "ok",
	CodeNotExported:       "not_exported",
	CodeNoHealthyEndpoint: "no_healthy_endpoint",
	CodeForbidden:         "forbidden",
	CodeOverloaded:        "overloaded",
	CodeBadRequest:        "bad_request",
	CodeUnreachable:       "unreachable",
	CodeUnknownCluster:    "unknown_cluster",
	CodeInternal:          "internal",
}

// String is the code's metric label, e.g. "not_exported".
func (c Code) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("code_%d", uint8(c))
}

// Request is the header that opens a stream.
type Request struct {
	Cluster       string // target cluster
	Namespace     string // target namespace (DNS label)
	Service       string // target service (DNS label)
	Port          uint16 // target service port
	SourceCluster string // cluster the stream comes from; set by the egress gateway
	Caller        string // SPIFFE ID of the caller, information only (never used to authorize)
	// Endpoint, when set, asks for that endpoint ("ip:port") of the target
	// service only (FlagEndpoint); empty lets the ingress pick.
	Endpoint string
	Flags    uint8
}

// Target is "namespace/service:port".
func (r *Request) Target() string {
	return fmt.Sprintf("%s/%s:%d", r.Namespace, r.Service, r.Port)
}

// Error is a refusal: a response code other than CodeOK with its reason. The
// parser returns it for bad headers (CodeBadRequest), and a client receives
// it when the gateway refuses a stream.
type Error struct {
	Code   Code
	Reason string
}

func (e *Error) Error() string {
	if e.Reason == "" {
		return "tunnel: " + e.Code.String()
	}
	return "tunnel: " + e.Code.String() + ": " + e.Reason
}

func badRequest(format string, args ...any) error {
	return &Error{Code: CodeBadRequest, Reason: fmt.Sprintf(format, args...)}
}

// AppendRequest appends the encoded header to b. It fails, with an *Error
// of CodeBadRequest, for a request the parser would refuse.
func AppendRequest(b []byte, r *Request) ([]byte, error) {
	if err := r.validate(); err != nil {
		return b, err
	}
	flags := r.Flags
	if r.Endpoint != "" {
		flags |= FlagEndpoint
	}
	body := 2 + 5 + len(r.Cluster) + len(r.Namespace) + len(r.Service) + len(r.SourceCluster) + len(r.Caller)
	if flags&FlagEndpoint != 0 {
		body += 1 + len(r.Endpoint)
	}
	b = append(b, magic[0], magic[1], Version, flags)
	b = binary.BigEndian.AppendUint16(b, uint16(body))
	b = binary.BigEndian.AppendUint16(b, r.Port)
	for _, s := range [...]string{r.Cluster, r.Namespace, r.Service, r.SourceCluster, r.Caller} {
		b = append(b, byte(len(s)))
		b = append(b, s...)
	}
	if flags&FlagEndpoint != 0 {
		b = append(b, byte(len(r.Endpoint)))
		b = append(b, r.Endpoint...)
	}
	return b, nil
}

// WriteRequest writes the header in one Write.
func WriteRequest(w io.Writer, r *Request) error {
	var buf [HeaderPrefixLen + MaxBodyLen]byte
	b, err := AppendRequest(buf[:0], r)
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write tunnel request: %w", err)
	}
	return nil
}

// ReadRequest reads exactly one header from r and nothing more, so the
// application bytes that follow stay in r. A malformed, oversized or
// unsupported header yields an *Error with CodeBadRequest; a short read
// yields an error wrapping io.ErrUnexpectedEOF (or io.EOF if r was empty).
// Callers facing the network must set a read deadline first.
func ReadRequest(r io.Reader) (Request, error) {
	var buf [HeaderPrefixLen + MaxBodyLen]byte
	if _, err := io.ReadFull(r, buf[:HeaderPrefixLen]); err != nil {
		return Request{}, fmt.Errorf("read tunnel request: %w", err)
	}
	if buf[0] != magic[0] || buf[1] != magic[1] {
		return Request{}, badRequest("bad magic %q", buf[:2])
	}
	if buf[2] != Version {
		return Request{}, badRequest("unsupported version %d, this gateway speaks %d", buf[2], Version)
	}
	n := int(binary.BigEndian.Uint16(buf[4:6]))
	if n > MaxBodyLen {
		return Request{}, badRequest("header body of %d bytes exceeds %d", n, MaxBodyLen)
	}
	body := buf[HeaderPrefixLen : HeaderPrefixLen+n]
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Request{}, fmt.Errorf("read tunnel request body: %w", err)
	}
	return ParseRequestBody(buf[3], body)
}

// ParseRequestBody decodes a header body (everything after the prefix).
func ParseRequestBody(flags uint8, body []byte) (Request, error) {
	req := Request{Flags: flags}
	if len(body) < 2 {
		return Request{}, badRequest("header body of %d bytes is too short", len(body))
	}
	req.Port = binary.BigEndian.Uint16(body)
	rest := body[2:]
	fields := []*string{&req.Cluster, &req.Namespace, &req.Service, &req.SourceCluster, &req.Caller}
	if flags&FlagEndpoint != 0 {
		fields = append(fields, &req.Endpoint)
	}
	for i, f := range fields {
		if len(rest) < 1 {
			return Request{}, badRequest("header body truncated before field %d", i)
		}
		l := int(rest[0])
		if len(rest) < 1+l {
			return Request{}, badRequest("header field %d of %d bytes overruns the body", i, l)
		}
		*f = string(rest[1 : 1+l])
		rest = rest[1+l:]
	}
	if len(rest) != 0 {
		return Request{}, badRequest("%d trailing bytes after the header fields", len(rest))
	}
	if err := req.validate(); err != nil {
		return Request{}, err
	}
	return req, nil
}

func (r *Request) validate() error {
	if r.Port == 0 {
		return badRequest("port 0")
	}
	for _, f := range [...]struct{ name, v string }{
		{"cluster", r.Cluster}, {"namespace", r.Namespace}, {"service", r.Service},
	} {
		if err := checkLabel(f.v); err != nil {
			return badRequest("%s %q: %v", f.name, f.v, err)
		}
	}
	if r.SourceCluster != "" {
		if err := checkLabel(r.SourceCluster); err != nil {
			return badRequest("source cluster %q: %v", r.SourceCluster, err)
		}
	}
	if r.Flags&FlagEndpoint != 0 && r.Endpoint == "" {
		return badRequest("endpoint flag without an endpoint")
	}
	if r.Endpoint != "" {
		if len(r.Endpoint) > maxEndpointLen {
			return badRequest("endpoint of %d bytes exceeds %d", len(r.Endpoint), maxEndpointLen)
		}
		if ap, err := netip.ParseAddrPort(r.Endpoint); err != nil || ap.Port() == 0 || ap.String() != r.Endpoint {
			return badRequest("endpoint %q is not ip:port in canonical form", r.Endpoint)
		}
	}
	if len(r.Caller) > 255 {
		return badRequest("caller of %d bytes exceeds 255", len(r.Caller))
	}
	if r.Caller != "" && (!strings.HasPrefix(r.Caller, "spiffe://") || !printable(r.Caller)) {
		return badRequest("caller %q is not a spiffe id", r.Caller)
	}
	return nil
}

// checkLabel accepts an RFC 1123 DNS label: what Kubernetes allows for
// namespace, service and (in fedmesh) cluster names.
func checkLabel(s string) error {
	if s == "" {
		return errors.New("empty")
	}
	if len(s) > maxLabelLen {
		return fmt.Errorf("longer than %d bytes", maxLabelLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case c == '-' && i != 0 && i != len(s)-1:
		default:
			return errors.New("not a DNS label")
		}
	}
	return nil
}

func printable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// WriteResponse writes a response header in one Write. The reason is cut to
// MaxReasonLen bytes (at a rune boundary).
func WriteResponse(w io.Writer, code Code, reason string) error {
	var buf [5 + MaxReasonLen]byte
	b := AppendResponse(buf[:0], code, reason)
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write tunnel response: %w", err)
	}
	return nil
}

// AppendResponse appends an encoded response to b.
func AppendResponse(b []byte, code Code, reason string) []byte {
	if len(reason) > MaxReasonLen {
		cut := MaxReasonLen
		for cut > 0 && !utf8.RuneStart(reason[cut]) {
			cut--
		}
		reason = reason[:cut]
	}
	b = append(b, magic[0], magic[1], Version, byte(code), byte(len(reason)))
	return append(b, reason...)
}

// ReadResponse reads exactly one response header. It returns nil for
// CodeOK, an *Error for a refusal, and another error when the response is
// malformed or cut short.
func ReadResponse(r io.Reader) error {
	code, reason, err := ReadAnswer(r)
	if err != nil || code == CodeOK {
		return err
	}
	return &Error{Code: code, Reason: reason}
}

// ReadAnswer is ReadResponse returning the code and reason as they are,
// also for CodeOK (the welcome a gateway sends to a peer carries its cluster
// name as the reason of an ok).
func ReadAnswer(r io.Reader) (Code, string, error) {
	var buf [5 + MaxReasonLen]byte
	if _, err := io.ReadFull(r, buf[:5]); err != nil {
		return 0, "", fmt.Errorf("read tunnel response: %w", err)
	}
	if buf[0] != magic[0] || buf[1] != magic[1] {
		return 0, "", fmt.Errorf("read tunnel response: bad magic %q", buf[:2])
	}
	if buf[2] != Version {
		return 0, "", fmt.Errorf("read tunnel response: unsupported version %d", buf[2])
	}
	code, n := Code(buf[3]), int(buf[4])
	if _, err := io.ReadFull(r, buf[5:5+n]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, "", fmt.Errorf("read tunnel response reason: %w", err)
	}
	return code, strings.ToValidUTF8(string(buf[5:5+n]), "?"), nil
}
