package redirect

import (
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// The rules run for real in sidecar/'s transparent-mode and DNS tests, which
// install them with the fedmesh-init binary in a network namespace and send
// traffic through the sidecar. These check the table's shape and Validate.

// TestChains: the inbound chain exempts the probe port and each excluded
// port once, then redirects TCP; the outbound chain exempts the sidecar's
// UID and loopback first, then DNS (UDP, TCP), then all TCP; without DNS
// capture there is no port-53 rule.
func TestChains(t *testing.T) {
	r := Rules{InboundPort: 15006, OutboundPort: 15001, DNSPort: 15053, ProbePort: 15021, ExcludeInboundPorts: []uint16{15000, 15021}, ProxyUID: 1337}
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: Table}
	chains := r.chains(tbl)
	if len(chains) != 2 || chains[0].chain.Hooknum != nftables.ChainHookPrerouting || chains[1].chain.Hooknum != nftables.ChainHookOutput {
		t.Fatalf("chains %+v, want prerouting then output", chains)
	}
	in, out := describe(chains[0].rules), describe(chains[1].rules)
	wantIn := []string{"tcp dport 15021 return", "tcp dport 15000 return", "tcp redirect 15006"}
	wantOut := []string{"skuid 1337 return", "oif lo return", "udp dport 53 redirect 15053", "tcp dport 53 redirect 15053", "tcp redirect 15001"}
	if strings.Join(in, "; ") != strings.Join(wantIn, "; ") {
		t.Errorf("inbound %q, want %q", in, wantIn)
	}
	if strings.Join(out, "; ") != strings.Join(wantOut, "; ") {
		t.Errorf("outbound %q, want %q", out, wantOut)
	}
	r.NoDNSCapture = true
	if out := strings.Join(describe(r.chains(tbl)[1].rules), "; "); strings.Contains(out, "53") {
		t.Errorf("no DNS capture, but outbound is %q", out)
	}
}

// describe renders rules made by this package as short text.
func describe(rules [][]expr.Any) []string {
	var out []string
	for _, exprs := range rules {
		var parts []string
		var key expr.MetaKey
		for _, e := range exprs {
			switch e := e.(type) {
			case *expr.Meta:
				key = e.Key
			case *expr.Payload:
				key = 0
				parts = append(parts, "dport")
			case *expr.Cmp:
				switch {
				case key == expr.MetaKeyL4PROTO && e.Data[0] == 6:
					parts = append(parts, "tcp")
				case key == expr.MetaKeyL4PROTO && e.Data[0] == 17:
					parts = append(parts, "udp")
				case key == expr.MetaKeySKUID:
					parts = append(parts, "skuid", itoa(uint32(e.Data[0])|uint32(e.Data[1])<<8|uint32(e.Data[2])<<16|uint32(e.Data[3])<<24))
				case key == expr.MetaKeyOIFNAME:
					parts = append(parts, "oif", strings.TrimRight(string(e.Data), "\x00"))
				default:
					parts = append(parts, itoa(uint32(e.Data[0])<<8|uint32(e.Data[1])))
				}
			case *expr.Verdict:
				parts = append(parts, "return")
			case *expr.Immediate:
				parts = append(parts, "redirect", itoa(uint32(e.Data[0])<<8|uint32(e.Data[1])))
			}
		}
		out = append(out, strings.Join(parts, " "))
	}
	return out
}

func itoa(v uint32) string {
	if v == 0 {
		return "0"
	}
	var b []byte
	for ; v > 0; v /= 10 {
		b = append([]byte{byte('0' + v%10)}, b...)
	}
	return string(b)
}

// TestValidate: every missing port and the root UID are named.
func TestValidate(t *testing.T) {
	err := Rules{}.Validate()
	if err == nil {
		t.Fatal("empty rules validated")
	}
	for _, want := range []string{"inbound port is not set", "outbound port is not set", "probe port is not set", "dns port is not set", "proxy uid 0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if err := (Rules{InboundPort: 1, OutboundPort: 1, ProbePort: 2, ProxyUID: 5, NoDNSCapture: true}).Validate(); err == nil || !strings.Contains(err.Error(), "both 1") {
		t.Errorf("same inbound and outbound port: %v", err)
	}
}
