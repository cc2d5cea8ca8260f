package sidecar

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
)

// The DNS server answers the Multi-Cluster Services zone,
// <name>.<ns>.svc.clusterset.local, from the service directory the
// transparent listener already has (the ServiceImports' clusterset IPs),
// as Istio's DNS proxying does: the cluster's DNS need not serve that zone
// (kind's CoreDNS does not). Every other query is forwarded unchanged to
// the pod's own nameservers. iptables redirects the workload's port 53,
// UDP and TCP, here.

// DefaultResolvConf is where the nameservers queries outside
// clusterset.local are forwarded to are read from.
const DefaultResolvConf = "/etc/resolv.conf"

const (
	dnsZone           = "svc.clusterset.local."
	dnsTTL            = 5                  // seconds, of every local answer
	dnsForwardTimeout = 2 * time.Second    // per nameserver, then the next one
	dnsMaxInflight    = 256                // UDP queries being answered; more are dropped
	dnsMaxConns       = 64                 // TCP connections; more are closed
	dnsIdleTimeout    = 10 * time.Second   // a TCP connection without a query is closed
	dnsLogEvery       = int64(time.Minute) // malformed queries are logged at most this often
	dnsMaxUDP         = 512                // UDP answer size without EDNS (RFC 1035)
	dnsEDNSSize       = 1232               // the UDP size local answers advertise
	dnsMaxMessage     = 65535              // the biggest DNS message
)

// Results of DNS queries (fedmesh_sidecar_dns_queries_total).
const (
	dnsAnswered  = "answered"  // in svc.clusterset.local.: answered here (with or without records)
	dnsNXDomain  = "nxdomain"  // in svc.clusterset.local.: no such ServiceImport
	dnsForwarded = "forwarded" // outside: a nameserver's answer relayed
	dnsServfail  = "servfail"  // no nameserver answered, or no directory yet
	dnsMalformed = "malformed" // not a DNS query: dropped (UDP) or connection closed (TCP)
	dnsDropped   = "dropped"   // too many queries at once: dropped (UDP) or connection closed (TCP)
)

// dnsServer serves DNS on UDP and TCP at Config.DNSAddr.
type dnsServer struct {
	s       *Sidecar
	t       *transparent
	pcs     []net.PacketConn
	lns     []net.Listener
	servers []string // host:port, tried in order
	timeout time.Duration

	results *imetrics.CounterVec
	udpSem  chan struct{}
	tcpSem  chan struct{}
	lastBad atomic.Int64 // unix nanoseconds of the last malformed query logged
}

// newDNSServer binds the DNS server's sockets. It needs the transparent
// listener, whose directory it answers from.
func newDNSServer(s *Sidecar, t *transparent) (*dnsServer, error) {
	d := &dnsServer{
		s: s, t: t,
		timeout: dnsForwardTimeout,
		udpSem:  make(chan struct{}, dnsMaxInflight),
		tcpSem:  make(chan struct{}, dnsMaxConns),
	}
	if s.cfg.DNSTimeout > 0 {
		d.timeout = s.cfg.DNSTimeout
	}
	var err error
	d.results, err = s.cfg.Registry.NewCounterVec("fedmesh_sidecar_dns_queries_total",
		"DNS queries of the workload by result: answered and nxdomain (svc.clusterset.local, answered from the service directory), forwarded (to the pod's nameservers), servfail (none answered), malformed and dropped (too many at once).",
		"result")
	if err != nil {
		return nil, fmt.Errorf("register dns metrics: %w", err)
	}
	for _, r := range []string{dnsAnswered, dnsNXDomain, dnsForwarded, dnsServfail, dnsMalformed, dnsDropped} {
		d.results.WithLabelValues(r)
	}
	servers := s.cfg.DNSServers
	if len(servers) == 0 {
		if servers, err = readNameservers(s.cfg.ResolvConf); err != nil {
			return nil, err
		}
	}
	if d.pcs, d.lns, err = listenDNS(s.cfg.DNSAddr, s.log); err != nil {
		return nil, err
	}
	// A nameserver that is this server would forward queries to itself.
	self := map[string]bool{}
	for _, pc := range d.pcs {
		self[pc.LocalAddr().String()] = true
	}
	for _, srv := range servers {
		if ap, err := netip.ParseAddrPort(srv); err == nil && self[net.UDPAddrFromAddrPort(ap).String()] {
			s.log.Warn("dns: nameserver skipped: it is this server", "nameserver", srv)
			continue
		}
		d.servers = append(d.servers, srv)
	}
	return d, nil
}

// readNameservers returns the nameservers of a resolv.conf as host:port.
func readNameservers(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("dns: read nameservers: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		host := fields[1]
		if _, err := netip.ParseAddr(host); err != nil {
			continue
		}
		out = append(out, net.JoinHostPort(host, "53"))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("dns: read nameservers from %s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("dns: no nameserver in %s: queries outside clusterset.local could not be forwarded", path)
	}
	return out, nil
}

// listenDNS binds UDP and TCP at the same address. The host "localhost"
// means 127.0.0.1 and ::1 (where iptables and ip6tables REDIRECT the
// pod's queries); ::1 is skipped when the kernel has no IPv6. Port 0
// picks one port for all of them.
func listenDNS(addr string, log *slog.Logger) ([]net.PacketConn, []net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dns address %q: %w", addr, err)
	}
	hosts := []string{host}
	if host == "localhost" {
		hosts = []string{"127.0.0.1", "::1"}
	}
	var pcs []net.PacketConn
	var lns []net.Listener
	fail := func(err error) ([]net.PacketConn, []net.Listener, error) {
		for _, pc := range pcs {
			_ = pc.Close()
		}
		for _, ln := range lns {
			_ = ln.Close()
		}
		return nil, nil, err
	}
	for i, h := range hosts {
		var pc net.PacketConn
		var ln net.Listener
		for attempt := 0; ; attempt++ {
			pc, ln, err = listenUDPTCP(net.JoinHostPort(h, port))
			if err == nil || port != "0" || attempt == 9 {
				break // with port 0, the TCP port may be taken: another try
			}
		}
		if err != nil {
			if i > 0 && h == "::1" {
				log.Info("dns: not listening on ::1 (no IPv6?)", "err", err)
				continue
			}
			return fail(err)
		}
		pcs, lns = append(pcs, pc), append(lns, ln)
		if port == "0" {
			port = fmt.Sprint(pc.LocalAddr().(*net.UDPAddr).Port)
		}
	}
	return pcs, lns, nil
}

func listenUDPTCP(addr string) (net.PacketConn, net.Listener, error) {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("listen dns udp: %w", err)
	}
	host, _, _ := net.SplitHostPort(addr)
	ln, err := net.Listen("tcp", net.JoinHostPort(host, fmt.Sprint(pc.LocalAddr().(*net.UDPAddr).Port)))
	if err != nil {
		_ = pc.Close()
		return nil, nil, fmt.Errorf("listen dns tcp: %w", err)
	}
	return pc, ln, nil
}

// run serves every socket until it is closed.
func (d *dnsServer) run(ctx context.Context, wg *sync.WaitGroup) {
	for _, pc := range d.pcs {
		wg.Go(func() { d.serveUDP(ctx, pc) })
	}
	for _, ln := range d.lns {
		wg.Go(func() { d.serveTCP(ctx, ln) })
	}
}

func (d *dnsServer) close() {
	for _, pc := range d.pcs {
		_ = pc.Close()
	}
	for _, ln := range d.lns {
		_ = ln.Close()
	}
}

func (d *dnsServer) serveUDP(ctx context.Context, pc net.PacketConn) {
	var wg sync.WaitGroup
	defer wg.Wait()
	buf := make([]byte, dnsMaxMessage)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				d.s.log.Error("dns: read udp", "err", err)
			}
			return
		}
		q, err := parseDNSQuery(buf[:n])
		if err != nil {
			d.malformed(from, err)
			continue
		}
		select {
		case d.udpSem <- struct{}{}:
		default:
			d.results.WithLabelValues(dnsDropped).Inc()
			continue
		}
		q.raw = append([]byte(nil), q.raw...)
		wg.Go(func() {
			defer func() { <-d.udpSem }()
			resp, result := d.resolve(ctx, q, false)
			d.results.WithLabelValues(result).Inc()
			if resp != nil {
				_, _ = pc.WriteTo(resp, from)
			}
		})
	}
}

func (d *dnsServer) serveTCP(ctx context.Context, ln net.Listener) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				d.s.log.Error("dns: accept tcp", "err", err)
			}
			return
		}
		select {
		case d.tcpSem <- struct{}{}:
		default:
			d.results.WithLabelValues(dnsDropped).Inc()
			_ = c.Close()
			continue
		}
		wg.Go(func() {
			defer func() { <-d.tcpSem }()
			defer c.Close()
			stop := context.AfterFunc(ctx, func() { _ = c.Close() }) // shutdown
			defer stop()
			if err := d.serveConn(ctx, c); err != nil {
				d.s.log.Debug("dns: tcp connection ended", "from", c.RemoteAddr().String(), "err", err)
			}
		})
	}
}

// serveConn answers the queries of one TCP connection, one after another,
// until the client closes it or goes idle; a malformed query ends it.
func (d *dnsServer) serveConn(ctx context.Context, c net.Conn) error {
	for {
		_ = c.SetReadDeadline(time.Now().Add(dnsIdleTimeout))
		msg, err := readTCPMessage(c)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		q, err := parseDNSQuery(msg)
		if err != nil {
			d.malformed(c.RemoteAddr(), err)
			return err
		}
		resp, result := d.resolve(ctx, q, true)
		d.results.WithLabelValues(result).Inc()
		_ = c.SetWriteDeadline(time.Now().Add(dnsForwardTimeout))
		if err := writeTCPMessage(c, resp); err != nil {
			return err
		}
	}
}

func readTCPMessage(r io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	msg := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, fmt.Errorf("read dns message: %w", err)
	}
	return msg, nil
}

func writeTCPMessage(w io.Writer, msg []byte) error {
	b := make([]byte, 2, 2+len(msg))
	binary.BigEndian.PutUint16(b, uint16(len(msg)))
	_, err := w.Write(append(b, msg...))
	return err
}

// malformed counts a malformed query and logs at most once a minute.
func (d *dnsServer) malformed(from net.Addr, err error) {
	d.results.WithLabelValues(dnsMalformed).Inc()
	now := time.Now().UnixNano()
	last := d.lastBad.Load()
	if last != 0 && now-last < dnsLogEvery || !d.lastBad.CompareAndSwap(last, now) {
		return
	}
	sender := "unknown"
	if from != nil {
		sender = from.String()
	}
	d.s.log.Warn("dns: malformed query dropped (logged at most once a minute)", "from", sender, "err", err)
}

// dnsQuery is a parsed query.
type dnsQuery struct {
	raw   []byte
	hdr   dnsmessage.Header
	q     dnsmessage.Question
	hasQ  bool   // exactly one question
	edns  uint16 // the client's EDNS UDP size; 0 without OPT
	local bool   // the question is in svc.clusterset.local.
}

var errNotQuery = errors.New("a response, not a query")

// parseDNSQuery parses a whole query: an error means the packet is no DNS
// query at all. A query this server does not answer itself (another
// opcode, no question or several, another class, another zone) is
// forwarded.
func parseDNSQuery(raw []byte) (*dnsQuery, error) {
	var p dnsmessage.Parser
	h, err := p.Start(raw)
	if err != nil {
		return nil, err
	}
	if h.Response {
		return nil, errNotQuery
	}
	q := &dnsQuery{raw: raw, hdr: h}
	questions := 0
	for {
		qq, err := p.Question()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return nil, err
		}
		if questions == 0 {
			q.q = qq
		}
		questions++
	}
	if err := p.SkipAllAnswers(); err != nil {
		return nil, err
	}
	if err := p.SkipAllAuthorities(); err != nil {
		return nil, err
	}
	for {
		rh, err := p.AdditionalHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return nil, err
		}
		if rh.Type == dnsmessage.TypeOPT && q.edns == 0 {
			q.edns = max(uint16(rh.Class), dnsMaxUDP) // the client's UDP size
		}
		if err := p.SkipAdditional(); err != nil {
			return nil, err
		}
	}
	q.hasQ = questions == 1
	name := strings.ToLower(q.q.Name.String())
	q.local = h.OpCode == 0 && q.hasQ && q.q.Class == dnsmessage.ClassINET &&
		(name == dnsZone || strings.HasSuffix(name, "."+dnsZone))
	return q, nil
}

// resolve answers a query here or through a nameserver; nil means no
// answer at all (the server is shutting down).
func (d *dnsServer) resolve(ctx context.Context, q *dnsQuery, tcp bool) ([]byte, string) {
	if q.local {
		return d.answer(ctx, q, tcp)
	}
	resp, err := d.forward(ctx, q, tcp)
	if err == nil {
		return resp, dnsForwarded
	}
	if ctx.Err() != nil {
		return nil, dnsServfail
	}
	d.s.log.Debug("dns: no nameserver answered", "question", q.q.Name.String(), "err", err)
	return d.reply(q, tcp, dnsmessage.RCodeServerFailure, false, nil), dnsServfail
}

// answer answers a question in svc.clusterset.local. from the directory:
// a ServiceImport's IPv4 (A) or IPv6 (AAAA) clusterset IPs.
func (d *dnsServer) answer(ctx context.Context, q *dnsQuery, tcp bool) ([]byte, string) {
	dir := d.directory(ctx)
	if dir == nil {
		return d.reply(q, tcp, dnsmessage.RCodeServerFailure, false, nil), dnsServfail
	}
	name := strings.TrimSuffix(strings.ToLower(q.q.Name.String()), dnsZone)
	name = strings.TrimSuffix(name, ".") // "<name>.<ns>", "<ns>" or ""
	ips, ok := dir.imports[name]
	if !ok && !dir.hasImportsIn(name) {
		return d.reply(q, tcp, dnsmessage.RCodeNameError, true, nil), dnsNXDomain
	}
	var answers []netip.Addr
	for _, ip := range ips {
		if q.q.Type == dnsmessage.TypeA && ip.Is4() || q.q.Type == dnsmessage.TypeAAAA && ip.Is6() {
			answers = append(answers, ip)
		}
	}
	return d.reply(q, tcp, dnsmessage.RCodeSuccess, true, answers), dnsAnswered
}

// directory is the current directory, waiting for the first one a while.
func (d *dnsServer) directory(ctx context.Context) *vipDirectory {
	if dir := d.t.dir.Load(); dir != nil {
		return dir
	}
	tm := time.NewTimer(min(dnsForwardTimeout, d.timeout))
	defer tm.Stop()
	select {
	case <-d.t.dirReady:
	case <-tm.C:
	case <-ctx.Done():
	}
	return d.t.dir.Load()
}

// reply builds an answer to q. UDP answers that do not fit the client's
// size are sent truncated, without records: the client retries over TCP.
func (d *dnsServer) reply(q *dnsQuery, tcp bool, rcode dnsmessage.RCode, authoritative bool, ips []netip.Addr) []byte {
	limit := dnsMaxMessage
	if !tcp {
		limit = dnsMaxUDP
		if q.edns > 0 {
			limit = int(q.edns)
		}
	}
	msg, err := buildReply(q, rcode, authoritative, ips, false)
	if err == nil && len(msg) > limit {
		msg, err = buildReply(q, rcode, authoritative, nil, true)
	}
	if err != nil {
		// Only a question name too long to pack again could get here.
		d.s.log.Error("dns: build answer", "question", q.q.Name.String(), "err", err)
		msg, _ = buildReply(&dnsQuery{hdr: q.hdr}, dnsmessage.RCodeServerFailure, false, nil, false)
	}
	return msg
}

func buildReply(q *dnsQuery, rcode dnsmessage.RCode, authoritative bool, ips []netip.Addr, truncated bool) ([]byte, error) {
	b := dnsmessage.NewBuilder(make([]byte, 0, dnsMaxUDP), dnsmessage.Header{
		ID: q.hdr.ID, Response: true, OpCode: q.hdr.OpCode, Authoritative: authoritative, Truncated: truncated,
		RecursionDesired: q.hdr.RecursionDesired, RecursionAvailable: true, RCode: rcode,
	})
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if q.hasQ {
		if err := b.Question(q.q); err != nil {
			return nil, err
		}
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	for _, ip := range ips {
		rh := dnsmessage.ResourceHeader{Name: q.q.Name, Class: dnsmessage.ClassINET, TTL: dnsTTL}
		var err error
		if ip.Is4() {
			err = b.AResource(rh, dnsmessage.AResource{A: ip.As4()})
		} else {
			err = b.AAAAResource(rh, dnsmessage.AAAAResource{AAAA: ip.As16()})
		}
		if err != nil {
			return nil, err
		}
	}
	if q.edns > 0 {
		if err := b.StartAdditionals(); err != nil {
			return nil, err
		}
		var rh dnsmessage.ResourceHeader
		if err := rh.SetEDNS0(dnsEDNSSize, dnsmessage.RCodeSuccess, false); err != nil {
			return nil, err
		}
		if err := b.OPTResource(rh, dnsmessage.OPTResource{}); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

// forward sends the query unchanged to each nameserver in turn (over the
// client's transport) until one answers, and returns its answer as is.
func (d *dnsServer) forward(ctx context.Context, q *dnsQuery, tcp bool) ([]byte, error) {
	if len(d.servers) == 0 {
		return nil, errors.New("no nameservers")
	}
	var errs []error
	for _, srv := range d.servers {
		var resp []byte
		var err error
		if tcp {
			resp, err = d.exchangeTCP(ctx, srv, q)
		} else {
			resp, err = d.exchangeUDP(ctx, srv, q)
		}
		if err == nil {
			return resp, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

// exchangeConn dials a nameserver under the forward timeout; the
// connection's deadline also ends it when ctx does.
func (d *dnsServer) exchangeConn(ctx context.Context, network, srv string) (net.Conn, func(), error) {
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	var dl net.Dialer
	c, err := dl.DialContext(ctx, network, srv)
	if err != nil {
		cancel()
		return nil, nil, fmt.Errorf("dial nameserver %s: %w", srv, err)
	}
	deadline, _ := ctx.Deadline()
	_ = c.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	return c, func() { stop(); cancel(); _ = c.Close() }, nil
}

func (d *dnsServer) exchangeUDP(ctx context.Context, srv string, q *dnsQuery) ([]byte, error) {
	c, done, err := d.exchangeConn(ctx, "udp", srv)
	if err != nil {
		return nil, err
	}
	defer done()
	if _, err := c.Write(q.raw); err != nil {
		return nil, fmt.Errorf("query nameserver %s: %w", srv, err)
	}
	buf := make([]byte, dnsMaxMessage)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, fmt.Errorf("query nameserver %s: %w", srv, err)
		}
		if isReplyTo(buf[:n], q) {
			return append([]byte(nil), buf[:n]...), nil
		}
		// Not the answer to this query (a late one to another): wait on.
	}
}

func (d *dnsServer) exchangeTCP(ctx context.Context, srv string, q *dnsQuery) ([]byte, error) {
	c, done, err := d.exchangeConn(ctx, "tcp", srv)
	if err != nil {
		return nil, err
	}
	defer done()
	if err := writeTCPMessage(c, q.raw); err != nil {
		return nil, fmt.Errorf("query nameserver %s: %w", srv, err)
	}
	resp, err := readTCPMessage(c)
	if err != nil {
		return nil, fmt.Errorf("query nameserver %s: %w", srv, err)
	}
	if !isReplyTo(resp, q) {
		return nil, fmt.Errorf("query nameserver %s: the answer is not to the query", srv)
	}
	return resp, nil
}

// isReplyTo reports whether a message is a response with the query's ID.
func isReplyTo(msg []byte, q *dnsQuery) bool {
	return len(msg) >= 12 && msg[2]&0x80 != 0 && binary.BigEndian.Uint16(msg) == q.hdr.ID // 0x80: QR
}

// hasImportsIn reports whether name ("<ns>" or "", the zone itself) has
// ServiceImports below it: such a name exists (no records, not NXDOMAIN).
func (d *vipDirectory) hasImportsIn(name string) bool {
	if strings.Contains(name, ".") {
		return false
	}
	if name == "" {
		return len(d.imports) > 0
	}
	for k := range d.imports {
		if strings.HasSuffix(k, "."+name) {
			return true
		}
	}
	return false
}
