// Package redirect sends a pod's traffic to its sidecar: it installs the
// redirect as one nftables table (family inet, so IPv4 and IPv6 at once) over
// netlink, from inside the pod's network namespace. The injector's init
// container runs it as `fedmesh-init`, a static binary in the fedmesh image:
// no shell, no iptables binary and no distribution base image, which this
// project cannot pull or build, and the same binary works on kind and on any
// kernel with nf_tables (Linux 5.2 or later for NAT in the inet family).
//
// The rules are the ones the sidecar's transparent mode expects: every
// inbound TCP connection to InboundPort except to the probe port and the
// excluded ports; every outbound TCP connection, except the sidecar's own
// (by UID) and loopback, to OutboundPort, where the sidecar reads the
// original destination (SO_ORIGINAL_DST, which nftables' redirect sets as
// iptables' REDIRECT does); outbound DNS over UDP and TCP to DNSPort unless
// DNS capture is off.
package redirect

import (
	"errors"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Table is the name of the nftables table the redirect lives in.
const Table = "fedmesh"

// Rules says where traffic goes. Ports are the sidecar's.
type Rules struct {
	InboundPort  uint16
	OutboundPort uint16
	DNSPort      uint16
	ProbePort    uint16
	// ExcludeInboundPorts reach the app directly (the probe port always
	// reaches the sidecar's probe server).
	ExcludeInboundPorts []uint16
	// ProxyUID is the sidecar's UID: its own connections leave unchanged.
	ProxyUID     uint32
	NoDNSCapture bool
}

// Validate reports what is missing or contradicts itself.
func (r Rules) Validate() error {
	var errs []error
	for _, p := range []struct {
		name string
		v    uint16
	}{{"inbound port", r.InboundPort}, {"outbound port", r.OutboundPort}, {"probe port", r.ProbePort}} {
		if p.v == 0 {
			errs = append(errs, fmt.Errorf("%s is not set", p.name))
		}
	}
	if !r.NoDNSCapture && r.DNSPort == 0 {
		errs = append(errs, errors.New("dns port is not set (or turn DNS capture off)"))
	}
	if r.InboundPort != 0 && r.InboundPort == r.OutboundPort {
		errs = append(errs, fmt.Errorf("inbound and outbound port are both %d", r.InboundPort))
	}
	if r.ProxyUID == 0 {
		errs = append(errs, errors.New("proxy uid 0 (root) would exempt the app's own root processes from the redirect"))
	}
	return errors.Join(errs...)
}

// Apply installs the redirect in the network namespace of the calling
// thread (the pod's, in the init container), replacing an earlier fedmesh
// table so that a restarted init container converges. Nothing else in the
// namespace's ruleset is touched.
func (r Rules) Apply() error {
	if err := r.Validate(); err != nil {
		return fmt.Errorf("redirect rules: %w", err)
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open netlink to nf_tables: %w", err)
	}
	defer c.CloseLasting()
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: Table}
	if tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet); err == nil {
		for _, old := range tables {
			if old.Name == Table {
				c.DelTable(old)
			}
		}
	}
	c.AddTable(t)
	for _, ch := range r.chains(t) {
		c.AddChain(ch.chain)
		for _, exprs := range ch.rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch.chain, Exprs: exprs})
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables table %s (needs CAP_NET_ADMIN and nf_tables with NAT in the inet family): %w", Table, err)
	}
	return nil
}

// Remove deletes the fedmesh table, if there is one.
func Remove() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open netlink to nf_tables: %w", err)
	}
	defer c.CloseLasting()
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == Table {
			c.DelTable(t)
		}
	}
	return c.Flush()
}

type chainRules struct {
	chain *nftables.Chain
	rules [][]expr.Any
}

// chains is the table's content: a prerouting chain for inbound and an
// output chain for outbound, both NAT at the destination-NAT priority.
func (r Rules) chains(t *nftables.Table) []chainRules {
	accept := nftables.ChainPolicyAccept
	in := chainRules{chain: &nftables.Chain{Name: "inbound", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest, Policy: &accept}}
	seen := map[uint16]bool{}
	for _, p := range append([]uint16{r.ProbePort}, r.ExcludeInboundPorts...) {
		if seen[p] {
			continue
		}
		seen[p] = true
		in.rules = append(in.rules, concat(l4proto(unix.IPPROTO_TCP), dport(p), ret()))
	}
	in.rules = append(in.rules, concat(l4proto(unix.IPPROTO_TCP), redirectTo(r.InboundPort)))

	out := chainRules{chain: &nftables.Chain{Name: "outbound", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest, Policy: &accept}}
	out.rules = append(out.rules,
		concat(skuid(r.ProxyUID), ret()),
		concat(oifname("lo"), ret()))
	if !r.NoDNSCapture {
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			out.rules = append(out.rules, concat(l4proto(proto), dport(53), redirectTo(r.DNSPort)))
		}
	}
	out.rules = append(out.rules, concat(l4proto(unix.IPPROTO_TCP), redirectTo(r.OutboundPort)))
	return []chainRules{in, out}
}

func concat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func l4proto(proto byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
}

// dport matches the destination port of a TCP or UDP header (the same
// offset in both); l4proto must come first.
func dport(p uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(p)},
	}
}

func skuid(uid uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(uid)},
	}
}

func oifname(name string) []expr.Any {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b},
	}
}

func ret() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}} }

// redirectTo redirects to port on the local host (127.0.0.1 or ::1 for
// locally sent packets, the incoming interface's address for others).
func redirectTo(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
		&expr.Redir{RegisterProtoMin: 1},
	}
}
