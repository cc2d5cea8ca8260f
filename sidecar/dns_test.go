package sidecar_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"

	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/injector"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
	"github.com/fedmesh/fedmesh/sidecar/endpoints"
)

const dnsMetric = "fedmesh_sidecar_dns_queries_total"

// dirFeed is a service directory the test changes by sending to it.
type dirFeed chan []sidecar.VirtualService

func (f dirFeed) WatchDirectory(context.Context) (<-chan []sidecar.VirtualService, error) {
	return f, nil
}

func newDirFeed(d []sidecar.VirtualService) dirFeed {
	f := make(dirFeed, 1)
	f <- d
	return f
}

// shopDirectory: checkout has a Service and a ServiceImport (dual-stack),
// db a Service only.
var shopDirectory = []sidecar.VirtualService{
	{Namespace: "shop", Name: "checkout", IPs: []string{"10.96.0.10", "fd00:96::a"}, Ports: []sidecar.ServicePort{{Name: "http", Port: 80}}},
	{Namespace: "shop", Name: "checkout", Imported: true, IPs: []string{"10.97.0.10", "fd00:97::a"}, Ports: []sidecar.ServicePort{{Name: "http", Port: 80}}},
	{Namespace: "shop", Name: "db", IPs: []string{"10.96.0.11"}, Ports: []sidecar.ServicePort{{Name: "tcp", Port: 5432}}},
}

// startDNSSidecar runs a transparent sidecar with its DNS server on
// loopback, forwarding to servers.
func startDNSSidecar(t *testing.T, dir sidecar.DirectorySource, timeout time.Duration, servers ...string) *runningSidecar {
	t.Helper()
	west := gatewaytest.Start(t, []string{"west"}, nil)["west"]
	return startSidecar(t, "dns", sidecar.Config{
		Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: &endpoints.Static{},
		OutboundAddr: "127.0.0.1:0", Directory: dir,
		DNSAddr: "127.0.0.1:0", DNSServers: servers, DNSTimeout: timeout,
	})
}

// upstreamDNS is a nameserver for the tests on loopback, UDP and TCP on
// one port: it answers every question with one A record, or never
// answers when silent. sent is every answer it wrote, as written.
type upstreamDNS struct {
	addr   string
	mu     sync.Mutex
	sent   [][]byte
	silent bool
}

var upstreamAnswer = netip.MustParseAddr("192.0.2.53")

func startUpstreamDNS(t *testing.T, silent bool) *upstreamDNS {
	t.Helper()
	return startUpstreamDNSAt(t, "127.0.0.1:0", silent)
}

func startUpstreamDNSAt(t *testing.T, addr string, silent bool) *upstreamDNS {
	t.Helper()
	u := &upstreamDNS{silent: silent}
	var pc net.PacketConn
	var ln net.Listener
	for range 10 {
		var err error
		if pc, err = net.ListenPacket("udp", addr); err != nil {
			t.Fatal(err)
		}
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		pc = nil
	}
	if pc == nil {
		t.Fatal("no port free for UDP and TCP")
	}
	t.Cleanup(func() { pc.Close(); ln.Close() })
	u.addr = pc.LocalAddr().String()
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp := u.answer(buf[:n]); resp != nil {
				pc.WriteTo(resp, from)
			}
		}
	}()
	testutil.Serve(ln, func(c net.Conn) {
		for {
			msg, err := readFramed(c)
			if err != nil {
				return
			}
			if resp := u.answer(msg); resp != nil {
				writeFramed(c, resp)
			} else {
				io.Copy(io.Discard, c) // silent: hold the connection
				return
			}
		}
	})
	return u
}

func (u *upstreamDNS) answer(q []byte) []byte {
	if u.silent {
		return nil
	}
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil
	}
	question, err := p.Question()
	if err != nil {
		return nil
	}
	// Flags no local answer of the sidecar has (not authoritative, an
	// unusual TTL), so a relayed answer is recognizable.
	msg := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: h.ID, Response: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true},
		Questions: []dnsmessage.Question{question},
		Answers: []dnsmessage.Resource{{
			Header: dnsmessage.ResourceHeader{Name: question.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: 4242},
			Body:   &dnsmessage.AResource{A: upstreamAnswer.As4()},
		}},
	}
	resp, err := msg.Pack()
	if err != nil {
		return nil
	}
	u.mu.Lock()
	u.sent = append(u.sent, resp)
	u.mu.Unlock()
	return resp
}

func (u *upstreamDNS) answers() [][]byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.sent)
}

func readFramed(r io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	msg := make([]byte, binary.BigEndian.Uint16(l[:]))
	_, err := io.ReadFull(r, msg)
	return msg, err
}

func writeFramed(w io.Writer, msg []byte) error {
	_, err := w.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(msg))), msg...))
	return err
}

func dnsQuery(t *testing.T, id uint16, name string, qtype dnsmessage.Type) []byte {
	t.Helper()
	msg := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: qtype, Class: dnsmessage.ClassINET}},
	}
	b, err := msg.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// dnsExchange sends one query over a new UDP or TCP connection and returns
// the answer as received.
func dnsExchange(network, addr string, q []byte) ([]byte, error) {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if network == "tcp" {
		if err := writeFramed(c, q); err != nil {
			return nil, err
		}
		return readFramed(c)
	}
	if _, err := c.Write(q); err != nil {
		return nil, err
	}
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	return buf[:n], err
}

// dnsAnswer is what a test checks of an answer.
type dnsAnswer struct {
	id            uint16
	rcode         dnsmessage.RCode
	authoritative bool
	ips           []netip.Addr
	ttls          []uint32
}

func parseAnswer(t *testing.T, b []byte) dnsAnswer {
	t.Helper()
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		t.Fatalf("unpack answer: %v", err)
	}
	a := dnsAnswer{id: m.ID, rcode: m.RCode, authoritative: m.Authoritative}
	for _, r := range m.Answers {
		switch body := r.Body.(type) {
		case *dnsmessage.AResource:
			a.ips = append(a.ips, netip.AddrFrom4(body.A))
		case *dnsmessage.AAAAResource:
			a.ips = append(a.ips, netip.AddrFrom16(body.AAAA))
		}
		a.ttls = append(a.ttls, r.Header.TTL)
	}
	return a
}

func ips(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, v := range s {
		out = append(out, netip.MustParseAddr(v))
	}
	return out
}

// resolverTo is a Go resolver whose every query goes to addr over network.
func resolverTo(network, addr string) *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
}

// TestDNSClustersetNames: a ServiceImport's name answers with its
// clusterset IPs (not the Service's cluster IPs) by family, case
// insensitively, authoritatively, TTL 5 s, over UDP and TCP; a name with
// only a Service and an unknown one are NXDOMAIN; other types and the
// namespace (an empty non-terminal) have no records.
func TestDNSClustersetNames(t *testing.T) {
	testutil.CheckGoroutines(t)
	upstream := startUpstreamDNS(t, false)
	rs := startDNSSidecar(t, newDirFeed(shopDirectory), 0, upstream.addr)
	addr := rs.DNSAddr().String()
	for _, network := range []string{"udp", "tcp"} {
		for i, tc := range []struct {
			name  string
			qtype dnsmessage.Type
			rcode dnsmessage.RCode
			ips   []netip.Addr
		}{
			{"checkout.shop.svc.clusterset.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, ips("10.97.0.10")},
			{"CheckOut.Shop.SVC.ClusterSet.Local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, ips("10.97.0.10")},
			{"checkout.shop.svc.clusterset.local.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, ips("fd00:97::a")},
			{"checkout.shop.svc.clusterset.local.", dnsmessage.TypeTXT, dnsmessage.RCodeSuccess, nil},
			{"shop.svc.clusterset.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, nil},
			{"db.shop.svc.clusterset.local.", dnsmessage.TypeA, dnsmessage.RCodeNameError, nil},
			{"nope.shop.svc.clusterset.local.", dnsmessage.TypeAAAA, dnsmessage.RCodeNameError, nil},
			{"checkout.other.svc.clusterset.local.", dnsmessage.TypeA, dnsmessage.RCodeNameError, nil},
			{"x.checkout.shop.svc.clusterset.local.", dnsmessage.TypeA, dnsmessage.RCodeNameError, nil},
		} {
			t.Run(network+" "+tc.name+" "+tc.qtype.String(), func(t *testing.T) {
				id := uint16(1000 + i)
				b, err := dnsExchange(network, addr, dnsQuery(t, id, tc.name, tc.qtype))
				if err != nil {
					t.Fatal(err)
				}
				a := parseAnswer(t, b)
				if a.id != id || a.rcode != tc.rcode || !a.authoritative || !slices.Equal(a.ips, tc.ips) {
					t.Fatalf("answer %+v, want id %d rcode %v authoritative ips %v", a, id, tc.rcode, tc.ips)
				}
				for _, ttl := range a.ttls {
					if ttl != 5 {
						t.Fatalf("ttl %d, want 5", ttl)
					}
				}
			})
		}
	}
	for _, network := range []string{"udp", "tcp"} {
		r := resolverTo(network, addr)
		got, err := r.LookupNetIP(context.Background(), "ip", "checkout.shop.svc.clusterset.local")
		slices.SortFunc(got, netip.Addr.Compare)
		if err != nil || !slices.Equal(got, ips("10.97.0.10", "fd00:97::a")) {
			t.Errorf("%s: go resolver: %v %v, want the import's IPs of both families", network, got, err)
		}
		_, err = r.LookupNetIP(context.Background(), "ip", "db.shop.svc.clusterset.local")
		var dnsErr *net.DNSError
		if !errors.As(err, &dnsErr) || !dnsErr.IsNotFound {
			t.Errorf("%s: go resolver, a Service-only name: %v, want not found", network, err)
		}
	}
	if len(upstream.answers()) != 0 {
		t.Errorf("clusterset.local queries reached the nameserver")
	}
	if n := rs.reg.Value(dnsMetric, map[string]string{"result": "answered"}); n < 10 {
		t.Errorf("answered: %v", n)
	}
	if n := rs.reg.Value(dnsMetric, map[string]string{"result": "nxdomain"}); n < 8 {
		t.Errorf("nxdomain: %v", n)
	}
}

// TestDNSForwarded: a name outside the zone goes to the nameserver over
// the client's transport and its answer comes back byte for byte; the
// first nameserver's silence costs one timeout, then the next answers.
func TestDNSForwarded(t *testing.T) {
	testutil.CheckGoroutines(t)
	silent := startUpstreamDNS(t, true)
	upstream := startUpstreamDNS(t, false)
	rs := startDNSSidecar(t, newDirFeed(shopDirectory), 300*time.Millisecond, silent.addr, upstream.addr)
	addr := rs.DNSAddr().String()
	for i, network := range []string{"udp", "tcp"} {
		for j, name := range []string{"example.com.", "clusterset.local.", "checkout.shop.svc.cluster.local."} {
			q := dnsQuery(t, uint16(7000+10*i+j), name, dnsmessage.TypeA)
			start := time.Now()
			got, err := dnsExchange(network, addr, q)
			if err != nil {
				t.Fatalf("%s %s: %v", network, name, err)
			}
			if d := time.Since(start); d < 300*time.Millisecond {
				t.Errorf("%s %s: answered in %v: the silent first nameserver was not tried", network, name, d)
			}
			sent := upstream.answers()
			if len(sent) == 0 || !bytes.Equal(got, sent[len(sent)-1]) {
				t.Fatalf("%s %s: got %x, want the nameserver's answer %x", network, name, got, sent)
			}
			if a := parseAnswer(t, got); !slices.Equal(a.ips, []netip.Addr{upstreamAnswer}) {
				t.Fatalf("%s %s: %+v", network, name, a)
			}
		}
	}
	got, err := resolverTo("udp", addr).LookupNetIP(context.Background(), "ip4", "outside.example")
	if err != nil || !slices.Equal(got, []netip.Addr{upstreamAnswer}) {
		t.Errorf("go resolver: %v %v", got, err)
	}
	if n := rs.reg.Value(dnsMetric, map[string]string{"result": "forwarded"}); n < 7 {
		t.Errorf("forwarded: %v", n)
	}
}

// TestDNSServfail: when no nameserver answers, the client gets SERVFAIL
// once the timeout has passed, over UDP and TCP.
func TestDNSServfail(t *testing.T) {
	testutil.CheckGoroutines(t)
	silent := startUpstreamDNS(t, true)
	const timeout = 500 * time.Millisecond
	rs := startDNSSidecar(t, newDirFeed(shopDirectory), timeout, silent.addr)
	for _, network := range []string{"udp", "tcp"} {
		start := time.Now()
		b, err := dnsExchange(network, rs.DNSAddr().String(), dnsQuery(t, 42, "example.com.", dnsmessage.TypeA))
		d := time.Since(start)
		if err != nil {
			t.Fatalf("%s: %v", network, err)
		}
		if a := parseAnswer(t, b); a.id != 42 || a.rcode != dnsmessage.RCodeServerFailure {
			t.Fatalf("%s: %+v, want SERVFAIL", network, a)
		}
		if d < timeout || d > timeout+2*time.Second {
			t.Errorf("%s: SERVFAIL after %v, want about %v", network, d, timeout)
		}
	}
	if n := rs.reg.Value(dnsMetric, map[string]string{"result": "servfail"}); n != 2 {
		t.Errorf("servfail: %v, want 2", n)
	}
}

// TestDNSMalformed: garbage is dropped (UDP) or ends its connection (TCP),
// is counted and logged once, and the server goes on answering.
func TestDNSMalformed(t *testing.T) {
	testutil.CheckGoroutines(t)
	rs := startDNSSidecar(t, newDirFeed(shopDirectory), 0, startUpstreamDNS(t, false).addr)
	addr := rs.DNSAddr().String()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	response := dnsQuery(t, 9, "checkout.shop.svc.clusterset.local.", dnsmessage.TypeA)
	response[2] |= 0x80 // QR: a response, not a query
	for _, garbage := range [][]byte{[]byte("hello"), {0, 1, 2}, response} {
		if _, err := c.Write(garbage); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Write(dnsQuery(t, 10, "checkout.shop.svc.clusterset.local.", dnsmessage.TypeA)); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if a := parseAnswer(t, buf[:n]); a.id != 10 || !slices.Equal(a.ips, ips("10.97.0.10")) {
		t.Fatalf("the first answer after garbage: %+v, want the answer to query 10", a)
	}

	tc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	if err := writeFramed(tc, []byte("not dns at all")); err != nil {
		t.Fatal(err)
	}
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := tc.Read(buf); err != io.EOF {
		t.Fatalf("tcp connection after garbage: read %d bytes, %v; want it closed", n, err)
	}
	if _, err := dnsExchange("tcp", addr, dnsQuery(t, 11, "checkout.shop.svc.clusterset.local.", dnsmessage.TypeA)); err != nil {
		t.Fatalf("tcp after garbage: %v", err)
	}
	if n := rs.reg.Value(dnsMetric, map[string]string{"result": "malformed"}); n != 4 {
		t.Errorf("malformed: %v, want 4", n)
	}
	if n := strings.Count(rs.logs.String(), "malformed query"); n != 1 {
		t.Errorf("malformed queries logged %d times, want once:\n%s", n, rs.logs.String())
	}
}

// TestDNSDirectoryUpdate: a new directory changes the answers.
func TestDNSDirectoryUpdate(t *testing.T) {
	testutil.CheckGoroutines(t)
	feed := newDirFeed(shopDirectory)
	rs := startDNSSidecar(t, feed, 0, startUpstreamDNS(t, false).addr)
	lookup := func(name string) dnsAnswer {
		b, err := dnsExchange("udp", rs.DNSAddr().String(), dnsQuery(t, 1, name, dnsmessage.TypeA))
		if err != nil {
			t.Fatal(err)
		}
		return parseAnswer(t, b)
	}
	if a := lookup("checkout.shop.svc.clusterset.local."); !slices.Equal(a.ips, ips("10.97.0.10")) {
		t.Fatalf("before: %+v", a)
	}
	feed <- []sidecar.VirtualService{
		{Namespace: "shop", Name: "checkout", Imported: true, IPs: []string{"10.97.0.20"}},
		{Namespace: "shop", Name: "db", Imported: true, IPs: []string{"10.97.0.11", "10.97.0.12"}},
	}
	waitFor(t, "the new directory's answer", 5*time.Second, func() bool {
		return slices.Equal(lookup("checkout.shop.svc.clusterset.local.").ips, ips("10.97.0.20"))
	})
	if a := lookup("db.shop.svc.clusterset.local."); a.rcode != dnsmessage.RCodeSuccess || !slices.Equal(a.ips, ips("10.97.0.11", "10.97.0.12")) {
		t.Fatalf("db, imported now: %+v", a)
	}
	feed <- nil
	waitFor(t, "NXDOMAIN once the import is gone", 5*time.Second, func() bool {
		return lookup("checkout.shop.svc.clusterset.local.").rcode == dnsmessage.RCodeNameError
	})
}

// TestDNSConfig: the DNS server needs the transparent outbound, and
// nameservers from somewhere.
func TestDNSConfig(t *testing.T) {
	testutil.CheckGoroutines(t)
	west := gatewaytest.Start(t, []string{"west"}, nil)["west"]
	base := sidecar.Config{Cluster: "west", TrustDomain: west.TD, Source: west.Source(t, "web"), Endpoints: &endpoints.Static{}}
	empty := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(empty, []byte("search shop.svc.cluster.local\noptions ndots:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*sidecar.Config)
		want string
	}{
		{"no transparent outbound", func(c *sidecar.Config) { c.DNSAddr = "127.0.0.1:0" }, "dns server without the transparent outbound"},
		{"no resolv.conf", func(c *sidecar.Config) {
			c.OutboundAddr, c.Directory, c.DNSAddr, c.ResolvConf = "127.0.0.1:0", sidecar.StaticDirectory{}, "127.0.0.1:0", "/nonexistent/resolv.conf"
		}, "dns: read nameservers"},
		{"no nameserver", func(c *sidecar.Config) {
			c.OutboundAddr, c.Directory, c.DNSAddr, c.ResolvConf = "127.0.0.1:0", sidecar.StaticDirectory{}, "127.0.0.1:0", empty
		}, "dns: no nameserver in " + empty},
		{"bad address", func(c *sidecar.Config) {
			c.OutboundAddr, c.Directory, c.DNSAddr, c.DNSServers = "127.0.0.1:0", sidecar.StaticDirectory{}, "127.0.0.1", []string{"127.0.0.1:53"}
		}, "dns address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := base
			tc.mod(&cfg)
			sc, err := sidecar.New(cfg)
			if err == nil {
				t.Fatalf("New: no error, want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, want %q", err, tc.want)
			}
			_ = sc
		})
	}
}

// TestDNSThroughRedirect: in a network namespace standing for a pod, with
// the injector's init container (fedmesh-init, nftables) and the fedmesh-sidecar binary run as
// the injector configures it (UID 1337, FEDMESH_DNS_ADDR), the app's
// queries to its nameserver (port 53, UDP and TCP) reach the sidecar: a
// clusterset.local name is answered from the service directory, any other
// name by the pod's nameserver (in the host's namespace, from the
// namespace's resolv.conf), which the sidecar reaches unredirected. Over
// IPv6 (ip6tables redirects to ::1) when the kernel has IPv6 NAT.
func TestDNSThroughRedirect(t *testing.T) {
	testutil.CheckGoroutines(t)
	needTransparentPrereqs(t)
	ns := newPodNetns(t)
	inj := redirect(t, ns)
	// The sidecar's environment, as the injector writes it.
	patch, err := inj.Patch(&corev1.Pod{})
	if err != nil {
		t.Fatal(err)
	}
	dnsEnv := fmt.Sprintf(`{"name":%q,"value":"localhost:%d"}`, injector.EnvDNSAddr, inj.DNSPort)
	if !bytes.Contains(patch, []byte(dnsEnv)) {
		t.Fatalf("the injector's patch lacks %s:\n%s", dnsEnv, patch)
	}
	t.Setenv(injector.EnvDNSAddr, fmt.Sprintf("localhost:%d", inj.DNSPort))

	// The pod's nameserver, as ip netns exec shows it the namespace's own
	// /etc/netns/<name>/resolv.conf.
	upstream := startUpstreamDNSAt(t, ns.hostIP+":53", false)
	etc := filepath.Join("/etc/netns", ns.name)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(etc) })
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte("nameserver "+ns.hostIP+"\noptions ndots:5\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	west := gatewaytest.Start(t, []string{"west"}, nil)["west"]
	vipImport := ns.prefix + "201"
	discoAddr := startFakeDiscovery(t, ns, west, &fakeController{dir: &pb.Directory{LocalCluster: "west", Version: 1, Services: []*pb.VirtualService{
		{Namespace: "shop", Name: "checkout", Ips: []string{ns.prefix + "200"}, Ports: []*pb.Port{{Name: "http", Protocol: "TCP", Port: 80}}},
		{Namespace: "shop", Name: "checkout", Imported: true, Ips: []string{vipImport}, Ports: []*pb.Port{{Name: "http", Protocol: "TCP", Port: 80}}},
	}}})
	logs, admin := startNetnsSidecar(t, ns, west, discoAddr, true)
	waitFor(t, "the service directory", 10*time.Second, func() bool {
		resp, err := http.Get("http://" + admin + "/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	ctx := context.Background()
	resolver := func(network, server string) *net.Resolver {
		return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return ns.dialNet(ctx, network, server)
		}}
	}
	servers := []string{ns.hostIP + ":53"}
	if exec.Command("ip", "netns", "exec", ns.name, "ip6tables", "-t", "nat", "-S", "FEDMESH_OUTBOUND").Run() == nil {
		// The pod's own /64 is on-link: the query is redirected before
		// it would need a neighbour.
		servers = append(servers, "["+ns.prefix6+"1]:53")
	} else {
		t.Log("no IPv6 NAT in the namespace: IPv6 not tested")
	}
	for _, server := range servers {
		for _, network := range []string{"udp", "tcp"} {
			r := resolver(network, server)
			got, err := r.LookupNetIP(ctx, "ip4", "checkout.shop.svc.clusterset.local")
			if err != nil || !slices.Equal(got, ips(vipImport)) {
				t.Errorf("%s %s: clusterset name: %v %v, want %s\n%s", network, server, got, err, vipImport, logs.String())
			}
			if _, err := r.LookupNetIP(ctx, "ip4", "nope.shop.svc.clusterset.local"); err == nil {
				t.Errorf("%s %s: an unknown clusterset name resolved", network, server)
			}
		}
	}
	for _, network := range []string{"udp", "tcp"} {
		before := len(upstream.answers())
		got, err := resolver(network, servers[0]).LookupNetIP(ctx, "ip4", "outside.example")
		if err != nil || !slices.Equal(got, []netip.Addr{upstreamAnswer}) {
			t.Errorf("%s: outside name: %v %v, want %s from the pod's nameserver", network, got, err, upstreamAnswer)
		}
		if len(upstream.answers()) == before {
			t.Errorf("%s: the pod's nameserver was not asked", network)
		}
	}
	metrics := scrape(t, "http://"+admin+"/metrics")
	for _, want := range []string{`fedmesh_sidecar_dns_queries_total{result="answered"}`, `fedmesh_sidecar_dns_queries_total{result="forwarded"}`} {
		if !strings.Contains(metrics, want) || strings.Contains(metrics, want+" 0\n") {
			t.Errorf("metrics: want %s above 0:\n%s", want, grepLines(metrics, "dns"))
		}
	}
}

// TestDNSTruncated: a local answer too big for UDP (512 bytes without
// EDNS) comes truncated and without records; over TCP it is whole.
func TestDNSTruncated(t *testing.T) {
	testutil.CheckGoroutines(t)
	big := sidecar.VirtualService{Namespace: "shop", Name: "big", Imported: true}
	for i := range 60 {
		big.IPs = append(big.IPs, fmt.Sprintf("10.97.1.%d", i+1))
	}
	rs := startDNSSidecar(t, newDirFeed([]sidecar.VirtualService{big}), 0, startUpstreamDNS(t, false).addr)
	q := dnsQuery(t, 5, "big.shop.svc.clusterset.local.", dnsmessage.TypeA)
	b, err := dnsExchange("udp", rs.DNSAddr().String(), q)
	if err != nil {
		t.Fatal(err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		t.Fatal(err)
	}
	if !m.Truncated || len(m.Answers) != 0 || len(b) > 512 {
		t.Fatalf("udp: truncated %v, %d answers, %d bytes; want truncated, none, at most 512", m.Truncated, len(m.Answers), len(b))
	}
	if b, err = dnsExchange("tcp", rs.DNSAddr().String(), q); err != nil {
		t.Fatal(err)
	}
	if a := parseAnswer(t, b); len(a.ips) != 60 {
		t.Fatalf("tcp: %d answers, want 60", len(a.ips))
	}
	// The Go resolver retries over TCP by itself.
	got, err := resolverTo("udp", rs.DNSAddr().String()).LookupNetIP(context.Background(), "ip4", "big.shop.svc.clusterset.local")
	if err != nil || len(got) != 60 {
		t.Fatalf("go resolver: %d addresses, %v", len(got), err)
	}
}
