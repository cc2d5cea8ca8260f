package sidecar

import (
	"net/http"
	"testing"

	"github.com/fedmesh/fedmesh/internal/testutil"
)

func TestTraceContext(t *testing.T) {
	testutil.CheckGoroutines(t)
	const in = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	h := http.Header{"Traceparent": {in}, "Tracestate": {"congo=t61rcWkgMzE"}}
	id := traceContext(h)
	out := h.Get("Traceparent")
	if id != "4bf92f3577b34da6a3ce929d0e0e4736" || !validTraceparent(out) || out[:36] != in[:36] || out[52:] != "-01" || out[36:52] == in[36:52] {
		t.Errorf("valid traceparent %q became %q (trace %q); want the same trace ID and flags, a new parent ID", in, out, id)
	}
	if h.Get("Tracestate") != "congo=t61rcWkgMzE" {
		t.Errorf("tracestate of a valid traceparent was changed: %q", h.Get("Tracestate"))
	}

	for _, bad := range []string{
		"", "garbage", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
		"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
		"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
		"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
	} {
		h := http.Header{"Traceparent": {bad}, "Tracestate": {"a=b"}}
		id := traceContext(h)
		out := h.Get("Traceparent")
		if !validTraceparent(out) || out[3:35] != id || out[52:] != "-00" || (len(bad) > 35 && id == bad[3:35]) {
			t.Errorf("invalid %q became %q (trace %q); want a new unsampled trace", bad, out, id)
		}
		if h.Get("Tracestate") != "" {
			t.Errorf("tracestate kept beside the invalid traceparent %q", bad)
		}
	}
	// A later version's longer header is understood, and sent on as 00.
	h = http.Header{"Traceparent": {"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"}}
	if id := traceContext(h); id != "4bf92f3577b34da6a3ce929d0e0e4736" || h.Get("Traceparent")[:3] != "00-" {
		t.Errorf("version 01 traceparent: trace %q, sent as %q", id, h.Get("Traceparent"))
	}
	// No header at all: a new trace, and two requests get different ones.
	a, b := http.Header{}, http.Header{}
	if traceContext(a) == traceContext(b) || !validTraceparent(a.Get("Traceparent")) {
		t.Errorf("new traces %q and %q", a.Get("Traceparent"), b.Get("Traceparent"))
	}
}
