package sidecar

import (
	"context"
	"encoding/hex"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"time"
)

// W3C trace context (https://www.w3.org/TR/trace-context/). The outbound
// sidecar is one hop of the trace: a request that carries a valid
// traceparent keeps its trace ID and flags and gets the sidecar's own span
// ID as the parent ID; one without (or with an invalid one) starts a new
// trace, not sampled. tracestate passes unchanged, except that it is
// dropped with an invalid traceparent, as the specification requires.

const traceparentLen = 55 // "00-" + 32 + "-" + 16 + "-" + 2

// traceContext rewrites h's traceparent as above and returns the trace ID.
func traceContext(h http.Header) string {
	var buf [traceparentLen]byte
	old := h["Traceparent"]
	if len(old) == 1 && validTraceparent(old[0]) {
		copy(buf[:], old[0][:traceparentLen])
		buf[0], buf[1] = '0', '0' // the version this hop speaks
	} else {
		if len(old) > 0 {
			delete(h, "Tracestate")
		}
		copy(buf[:3], "00-")
		putID(buf[3:35], rand.Uint64(), rand.Uint64())
		buf[35] = '-'
		copy(buf[52:], "-00")
	}
	putID(buf[36:52], rand.Uint64())
	v := string(buf[:])
	if len(old) == 1 {
		old[0] = v // the request's own slice: no allocation
	} else {
		h["Traceparent"] = []string{v}
	}
	return v[3:35]
}

// putID writes the words as lowercase hex into dst (16 hex digits each),
// never all zeros (an invalid ID).
func putID(dst []byte, words ...uint64) {
	var raw [16]byte
	zero := true
	for i, w := range words {
		if w != 0 {
			zero = false
		}
		for j := range 8 {
			raw[i*8+j] = byte(w >> (56 - 8*j))
		}
	}
	if zero {
		raw[len(words)*8-1] = 1
	}
	hex.Encode(dst, raw[:len(words)*8])
}

// validTraceparent checks the fields this hop relies on: a known-shape
// version (not ff; version 00 exactly 55 characters, later ones at least
// that, with a dash after), lowercase hex everywhere, non-zero IDs.
func validTraceparent(s string) bool {
	if len(s) < traceparentLen || s[2] != '-' || s[35] != '-' || s[52] != '-' {
		return false
	}
	if s[:2] == "ff" || (s[:2] == "00" && len(s) != traceparentLen) || (len(s) > traceparentLen && s[traceparentLen] != '-') {
		return false
	}
	for _, f := range [][2]int{{0, 2}, {3, 35}, {36, 52}, {53, 55}} {
		allZero := true
		for i := f[0]; i < f[1]; i++ {
			c := s[i]
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
			if c != '0' {
				allZero = false
			}
		}
		if allZero && (f[0] == 3 || f[0] == 36) {
			return false
		}
	}
	return true
}

// reqRecord is what the access log and the request counters learn about
// one HTTP request while the sidecar serves it.
type reqRecord struct {
	req      *http.Request
	start    time.Time
	traceID  string
	endpoint string // the last endpoint tried
	attempts int
}

// finish counts the request in fedmesh_sidecar_requests_total and writes
// its access log line when the access log is on. status is the HTTP status
// the client got; grpcStatus is -1 when there was none.
func (u *upstream) finish(rec *reqRecord, cluster, result string, status, grpcStatus int) {
	u.countRequest(cluster, result)
	al := u.s.cfg.AccessLog
	if al == nil {
		return
	}
	r := rec.req
	attrs := []slog.Attr{
		slog.String("upstream", u.name),
		slog.String("protocol", r.Proto),
		slog.String("method", r.Method),
		slog.String("authority", r.Host),
		slog.String("path", r.URL.Path),
		slog.Int("status", status),
		slog.String("result", result),
		slog.String("cluster", cluster),
		slog.String("endpoint", rec.endpoint),
		slog.Int("attempts", rec.attempts),
		slog.Float64("duration_ms", float64(time.Since(rec.start).Microseconds())/1000),
		slog.String("trace_id", rec.traceID),
	}
	if grpcStatus >= 0 {
		attrs = append(attrs, slog.Int("grpc_status", grpcStatus))
	}
	al.LogAttrs(context.Background(), slog.LevelInfo, "request", attrs...)
}
