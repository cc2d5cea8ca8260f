package sidecar

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"strings"
)

// HTTP/1.1 beyond one request and one answer: protocol upgrades (a
// WebSocket handshake answered 101 Switching Protocols, after which the
// connection carries the new protocol both ways) and Expect: 100-continue.

// upgradeRequested reports whether h asks to switch protocols: an Upgrade
// header named by Connection (RFC 9110 7.8).
func upgradeRequested(h http.Header) bool {
	if len(h["Upgrade"]) == 0 {
		return false
	}
	for _, v := range h["Connection"] {
		for tok := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(tok), "upgrade") {
				return true
			}
		}
	}
	return false
}

// errUnaskedSwitch is the 502's message when an upstream or app answers
// 101 Switching Protocols to a request that asked for no upgrade.
const errUnaskedSwitch = "101 Switching Protocols to a request that asked for no upgrade"

// maxInterim bounds the 1xx answers skipped before the final one.
const maxInterim = 16

// readAnswer reads the answer to req, skipping interim answers (100
// Continue, 103 Early Hints) but not 101, after which the connection
// carries another protocol.
func readAnswer(br *bufio.Reader, req *http.Request) (*http.Response, error) {
	for range maxInterim {
		resp, err := http.ReadResponse(br, req)
		if err != nil || resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			return resp, err
		}
	}
	return nil, errors.New("more than 16 interim (1xx) answers")
}

// expectContinue answers a request's Expect: 100-continue itself, so the
// client sends its body at once instead of after its own timeout (curl
// waits a second), and forwards the request without the expectation, so
// the upstream does not answer 100 too.
func expectContinue(req *http.Request, w *bufio.Writer) {
	v := req.Header["Expect"]
	if len(v) != 1 || !strings.EqualFold(v[0], "100-continue") {
		return
	}
	delete(req.Header, "Expect")
	if req.Body == http.NoBody {
		return
	}
	_, _ = w.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
	_ = w.Flush()
}

// joinSwitched joins two connections after 101 Switching Protocols: what each
// side's reader already buffered goes first, then bytes flow both ways
// until both directions end (half-closes pass through). It closes both.
func joinSwitched(a net.Conn, abr *bufio.Reader, b net.Conn, bbr *bufio.Reader) {
	splice(&prefixConn{Conn: a, br: abr}, &prefixConn{Conn: b, br: bbr})
}
