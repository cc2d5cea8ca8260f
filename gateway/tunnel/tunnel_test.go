package tunnel

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func validRequest() Request {
	return Request{
		Cluster: "east", Namespace: "shop", Service: "checkout", Port: 8080,
		SourceCluster: "west", Caller: "spiffe://west.fedmesh.test/ns/shop/sa/web",
	}
}

func TestRequestRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		req  Request
	}{
		{"full", validRequest()},
		{"minimal", Request{Cluster: "e", Namespace: "n", Service: "s", Port: 1}},
		{"max labels", Request{Cluster: strings.Repeat("c", 63), Namespace: strings.Repeat("n", 63), Service: strings.Repeat("s", 63), Port: 65535,
			SourceCluster: strings.Repeat("w", 63), Caller: "spiffe://" + strings.Repeat("x", 246), Flags: 0xff,
			Endpoint: "[fd00:1111:2222:3333:4444:5555:6666:7777]:65535"}},
		{"endpoint", Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 8080, Endpoint: "10.244.1.7:8080", Flags: FlagEndpoint}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := WriteRequest(&buf, &tc.req); err != nil {
				t.Fatal(err)
			}
			buf.WriteString("app bytes")
			got, err := ReadRequest(&buf)
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tc.req, got); d != "" {
				t.Errorf("round trip (-want +got):\n%s", d)
			}
			if rest := buf.String(); rest != "app bytes" {
				t.Errorf("ReadRequest consumed application bytes: left %q", rest)
			}
		})
	}
}

func TestReadRequestRefuses(t *testing.T) {
	good, err := AppendRequest(nil, &Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	for _, tc := range []struct {
		name   string
		in     []byte
		reason string // substring of the reason; "" means a short read, not a refusal
	}{
		{"http request", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "bad magic"},
		{"tls client hello", []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00}, "bad magic"},
		{"version 2", mut(func(b []byte) []byte { b[2] = 2; return b }), "unsupported version 2"},
		{"oversized body", mut(func(b []byte) []byte { b[4], b[5] = 0xff, 0xff; return b }), "exceeds"},
		{"port 0", mut(func(b []byte) []byte { b[6], b[7] = 0, 0; return b }), "port 0"},
		{"field overruns", mut(func(b []byte) []byte { b[8] = 200; return b }), "overruns"},
		{"trailing bytes", mut(func(b []byte) []byte { b[5]++; return append(b, 'x') }), "trailing"},
		{"upper case service", bytes.Replace(good, []byte("checkout"), []byte("Checkout"), 1), "not a DNS label"},
		{"endpoint flag, no field", mut(func(b []byte) []byte { b[3] = FlagEndpoint; return b }), "truncated"},
		{"endpoint flag, empty field", mut(func(b []byte) []byte { b[3] = FlagEndpoint; b[5]++; return append(b, 0) }), "endpoint flag without an endpoint"},
		{"endpoint not ip:port", mut(func(b []byte) []byte {
			b[3] = FlagEndpoint
			b[5] += 1 + 9
			return append(append(b, 9), "pod-1:80x"...)
		}), "not ip:port"},
		{"endpoint not canonical", mut(func(b []byte) []byte {
			b[3] = FlagEndpoint
			b[5] += 1 + 12
			return append(append(b, 12), "010.0.0.1:80"...)
		}), "not ip:port"},
		{"empty", nil, ""},
		{"cut in prefix", good[:3], ""},
		{"cut in body", good[:10], ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadRequest(bytes.NewReader(tc.in))
			if err == nil {
				t.Fatal("accepted")
			}
			var te *Error
			if tc.reason == "" {
				if errors.As(err, &te) || !(errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
					t.Fatalf("error %v, want a short read", err)
				}
				return
			}
			if !errors.As(err, &te) || te.Code != CodeBadRequest || !strings.Contains(te.Reason, tc.reason) {
				t.Fatalf("error %v, want bad_request with %q", err, tc.reason)
			}
		})
	}
}

func TestAppendRequestValidates(t *testing.T) {
	r := validRequest()
	r.Caller = "not a spiffe id"
	if _, err := AppendRequest(nil, &r); err == nil {
		t.Fatal("encoded an invalid caller")
	}
	r = validRequest()
	r.Namespace = strings.Repeat("n", 64)
	if _, err := AppendRequest(nil, &r); err == nil {
		t.Fatal("encoded a 64-byte namespace")
	}
}

func TestResponse(t *testing.T) {
	for _, tc := range []struct {
		code   Code
		reason string
		want   string
	}{
		{CodeOK, "", ""},
		{CodeNotExported, "shop/checkout is not exported by east", "tunnel: not_exported: shop/checkout is not exported by east"},
		{CodeBadRequest, strings.Repeat("é", 200), "tunnel: bad_request: " + strings.Repeat("é", 127)},
		{Code(42), "", "tunnel: code_42"},
	} {
		t.Run(tc.code.String(), func(t *testing.T) {
			var buf bytes.Buffer
			if err := WriteResponse(&buf, tc.code, tc.reason); err != nil {
				t.Fatal(err)
			}
			buf.WriteString("rest")
			err := ReadResponse(&buf)
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Errorf("got %q\nwant %q", got, tc.want)
			}
			if buf.String() != "rest" {
				t.Errorf("ReadResponse consumed %q", buf.String())
			}
		})
	}
	if err := ReadResponse(strings.NewReader("FM\x01\x02\x09abc")); err == nil || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("cut reason: %v", err)
	}
	if err := ReadResponse(strings.NewReader("XX\x01\x00\x00")); err == nil {
		t.Error("bad magic accepted")
	}
}

// FuzzReadRequest: any input either parses into a request that re-encodes to
// exactly the bytes consumed, or is refused; the parser never reads past the
// header and never panics.
func FuzzReadRequest(f *testing.F) {
	r := validRequest()
	good, _ := AppendRequest(nil, &r)
	f.Add(good)
	f.Add(append(append([]byte(nil), good...), "hello"...))
	r.Endpoint = "10.244.1.7:8080"
	withEndpoint, _ := AppendRequest(nil, &r)
	f.Add(withEndpoint)
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte("FM\x01\x00\xff\xff"))
	f.Fuzz(func(t *testing.T, in []byte) {
		rd := bytes.NewReader(in)
		req, err := ReadRequest(rd)
		if err != nil {
			var te *Error
			if !errors.As(err, &te) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		consumed := len(in) - rd.Len()
		if consumed > HeaderPrefixLen+MaxBodyLen {
			t.Fatalf("consumed %d bytes", consumed)
		}
		enc, err := AppendRequest(nil, &req)
		if err != nil {
			t.Fatalf("parsed request does not encode: %v", err)
		}
		if !bytes.Equal(enc, in[:consumed]) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", in[:consumed], enc)
		}
	})
}

// FuzzReadResponse: never panics, never reads past the response.
func FuzzReadResponse(f *testing.F) {
	f.Add(AppendResponse(nil, CodeNotExported, "no"))
	f.Add([]byte("FM\x01\x00\x00tail"))
	f.Fuzz(func(t *testing.T, in []byte) {
		rd := bytes.NewReader(in)
		err := ReadResponse(rd)
		consumed := len(in) - rd.Len()
		if consumed > 5+MaxReasonLen {
			t.Fatalf("consumed %d bytes", consumed)
		}
		var te *Error
		if errors.As(err, &te) && (te.Code == CodeOK || len(te.Reason) > 3*MaxReasonLen) {
			t.Fatalf("bad refusal %v", te)
		}
	})
}
