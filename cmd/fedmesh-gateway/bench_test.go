package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
)

// The benchmarks run the gateways as child processes (this test binary
// re-executed into the real main, see TestMain), so that the RSS and CPU
// they report are the gateways' own. The client, the servers and the
// issuers live in the benchmark process. Every benchmark measures many
// samples inside one iteration, since `make bench` runs each once.

const (
	bulkFor    = 2 * time.Second // per throughput case
	latSamples = 2000
)

// sink reads a connection or stream to EOF, then answers with the byte
// count (8 bytes) so the sender knows everything arrived.
func sink(rw io.ReadWriter) {
	buf := make([]byte, 256<<10)
	var n uint64
	for {
		m, err := rw.Read(buf)
		n += uint64(m)
		if err != nil {
			break
		}
	}
	_ = binary.Write(rw, binary.BigEndian, n)
}

// send writes for d, half-closes, waits for the sink's count and returns
// the bytes delivered and the time until the count came back.
func send(c io.ReadWriter, closeWrite func() error, d time.Duration) (uint64, time.Duration, error) {
	buf := make([]byte, 256<<10)
	_, _ = rand.Read(buf)
	start := time.Now()
	var sent uint64
	for time.Since(start) < d {
		n, err := c.Write(buf)
		sent += uint64(n)
		if err != nil {
			return 0, 0, fmt.Errorf("write: %w", err)
		}
	}
	if err := closeWrite(); err != nil {
		return 0, 0, err
	}
	var got uint64
	if err := binary.Read(c, binary.BigEndian, &got); err != nil {
		return 0, 0, fmt.Errorf("read count: %w", err)
	}
	if got != sent {
		return 0, 0, fmt.Errorf("sink got %d bytes, sent %d", got, sent)
	}
	return sent, time.Since(start), nil
}

func serveTCP(tb testing.TB, handle func(net.Conn)) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	return ln.Addr().String()
}

func echoStream(s *quic.Stream) {
	buf := make([]byte, 4096)
	for {
		n, err := s.Read(buf)
		if err != nil {
			return
		}
		if _, err := s.Write(buf[:n]); err != nil {
			return
		}
	}
}

func echo(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		if _, err := c.Write(buf[:n]); err != nil {
			return
		}
	}
}

type benchEnv struct {
	west, east *child
	client     *gateway.Client // the default egress transport (TCP)
	quicClient *gateway.Client // the QUIC egress
	sinkAddr   string
	echoAddr   string
}

func setup(b *testing.B) *benchEnv {
	b.Helper()
	doms := gatewaytest.Start(b, []string{"west", "east"}, [][2]string{{"west", "east"}})
	e := &benchEnv{
		sinkAddr: serveTCP(b, func(c net.Conn) { sink(c) }),
		echoAddr: serveTCP(b, echo),
	}
	e.west, e.east = startPair(b, doms, "shop/sink:80="+e.sinkAddr, "shop/echo:80="+e.echoAddr)
	var err error
	e.client, err = gateway.NewClient(doms["west"].Source(b, "web"), doms["west"].ID("gateway"), e.west.addrs["egress"])
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.client.Close() })
	e.quicClient, err = gateway.NewClient(doms["west"].Source(b, "web"), doms["west"].ID("gateway"), e.west.addrs["egress"], gateway.WithTransport(gateway.QUIC))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.quicClient.Close() })
	deadline := time.Now().Add(10 * time.Second)
	for !e.westUp() {
		if time.Now().After(deadline) {
			b.Fatal("west never connected to east")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return e
}

func (e *benchEnv) westUp() bool {
	st, err := adminState(e.west.addrs["admin"])
	return err == nil && len(st.Clusters) == 1 && st.Clusters[0].Up
}

func adminState(addr string) (gateway.State, error) {
	var st gateway.State
	resp, err := http.Get("http://" + addr + "/state")
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

func (e *benchEnv) dial(service string) (*gateway.Conn, error) {
	return dialWith(e.client, service)
}

func dialWith(c *gateway.Client, service string) (*gateway.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return c.Dial(ctx, tunnel.Request{Cluster: "east", Namespace: "shop", Service: service, Port: 80})
}

func dialEarlyWith(c *gateway.Client, service string) (*gateway.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return c.DialEarly(ctx, tunnel.Request{Cluster: "east", Namespace: "shop", Service: service, Port: 80})
}

// parallel runs n senders at once and returns the aggregate Gbit/s.
func parallel(n int, open func() (io.ReadWriter, func() error, func(), error)) (float64, error) {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		total uint64
		long  time.Duration
		first error
	)
	for range n {
		c, cw, closer, err := open()
		if err != nil {
			return 0, err
		}
		wg.Go(func() {
			defer closer()
			sent, d, err := send(c, cw, bulkFor)
			mu.Lock()
			defer mu.Unlock()
			if err != nil && first == nil {
				first = err
			}
			total += sent
			long = max(long, d)
		})
	}
	wg.Wait()
	if first != nil {
		return 0, first
	}
	return float64(total) * 8 / long.Seconds() / 1e9, nil
}

// BenchmarkThroughput: bulk transfer for 2 s per case, 1 and 8 connections,
// through client -(TCP egress)-> west gateway -> QUIC -> east gateway ->
// server, the same through the QUIC egress, against plain loopback TCP to
// the same server and a bare quic-go stream to another process (the
// transport's ceiling). Also the gateways' CPU per Gbit/s (TCP egress).
func BenchmarkThroughput(b *testing.B) {
	e := setup(b)
	qs := startChild(b, "quicsink")
	qconf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"bench"}} //nolint:gosec // a throughput ceiling, not a security test
	for b.Loop() {
		tcp := func() (io.ReadWriter, func() error, func(), error) {
			c, err := net.Dial("tcp", e.sinkAddr)
			if err != nil {
				return nil, nil, nil, err
			}
			return c, c.(*net.TCPConn).CloseWrite, func() { c.Close() }, nil
		}
		proxiedWith := func(cl *gateway.Client) func() (io.ReadWriter, func() error, func(), error) {
			return func() (io.ReadWriter, func() error, func(), error) {
				c, err := dialWith(cl, "sink")
				if err != nil {
					return nil, nil, nil, err
				}
				return c, c.CloseWrite, func() { c.Close() }, nil
			}
		}
		proxied, proxiedQUIC := proxiedWith(e.client), proxiedWith(e.quicClient)
		qconn, err := quic.DialAddr(context.Background(), qs.addrs["quic"], qconf, gateway.DefaultQUICConfig())
		if err != nil {
			b.Fatal(err)
		}
		bare := func() (io.ReadWriter, func() error, func(), error) {
			s, err := qconn.OpenStreamSync(context.Background())
			if err != nil {
				return nil, nil, nil, err
			}
			return s, s.Close, func() {}, nil
		}
		for _, n := range []int{1, 8} {
			for _, c := range []struct {
				name string
				open func() (io.ReadWriter, func() error, func(), error)
			}{{"tcp", tcp}, {"quic", bare}, {"proxied", proxied}, {"proxied-quic-egress", proxiedQUIC}} {
				var cpu0 [2]time.Duration
				if c.name == "proxied" {
					cpu0 = e.cpu(b)
				}
				start := time.Now()
				gbps, err := parallel(n, c.open)
				if err != nil {
					b.Fatalf("%s x%d: %v", c.name, n, err)
				}
				b.ReportMetric(gbps, fmt.Sprintf("%s-%d-Gbps", c.name, n))
				if c.name == "proxied" {
					cpu1 := e.cpu(b)
					wall := time.Since(start).Seconds()
					west := (cpu1[0] - cpu0[0]).Seconds() / wall
					east := (cpu1[1] - cpu0[1]).Seconds() / wall
					b.ReportMetric((west+east)/gbps, fmt.Sprintf("gw-cores-per-Gbps-%d", n))
					b.ReportMetric(west, fmt.Sprintf("west-cores-%d", n))
					b.ReportMetric(east, fmt.Sprintf("east-cores-%d", n))
				}
			}
		}
		_ = qconn.CloseWithError(0, "")
	}
}

func (e *benchEnv) cpu(b *testing.B) [2]time.Duration {
	var out [2]time.Duration
	for i, c := range []*child{e.west, e.east} {
		d, err := procCPU(c.cmd.Process.Pid)
		if err != nil {
			b.Fatal(err)
		}
		out[i] = d
	}
	return out
}

// BenchmarkLatency: with no background load, 2,000 samples each of (a) a
// new connection plus a first 1-byte round trip and (b) a 1-byte round trip
// on an open connection, direct TCP to an echo server and proxied through
// both gateways (TCP egress, and QUIC egress for comparison), interleaved.
// Reports p50/p99 and the added latency. The same samples through a bare
// quic-go connection to an echo in another process (a new stream and its
// first round trip; a round trip on an open stream) show what the one QUIC
// hop of the proxied path costs by itself at the same moment.
func BenchmarkLatency(b *testing.B) {
	e := setup(b)
	qs := startChild(b, "quicsink")
	qconf := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"bench-echo"}} //nolint:gosec // a latency reference, not a security test
	bare, err := quic.DialAddr(context.Background(), qs.addrs["quic"], qconf, gateway.DefaultQUICConfig())
	if err != nil {
		b.Fatal(err)
	}
	defer bare.CloseWithError(0, "")
	one := []byte{'x'}
	rt := func(c io.ReadWriter) error {
		if _, err := c.Write(one); err != nil {
			return err
		}
		var buf [1]byte
		_, err := io.ReadFull(c, buf[:])
		return err
	}
	for b.Loop() {
		var newDirect, newProxied, newWait, rtDirect, rtProxied, newQUIC, rtQUIC, newBare, rtBare []time.Duration
		dc, err := net.Dial("tcp", e.echoAddr)
		if err != nil {
			b.Fatal(err)
		}
		pc, err := e.dial("echo")
		if err != nil {
			b.Fatal(err)
		}
		qc, err := dialWith(e.quicClient, "echo")
		if err != nil {
			b.Fatal(err)
		}
		bs, err := bare.OpenStreamSync(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		for range 100 { // warm up
			_ = rt(dc)
			_ = rt(pc)
			_ = rt(qc)
			_ = rt(bs)
		}
		for range latSamples {
			start := time.Now()
			c, err := net.Dial("tcp", e.echoAddr)
			if err == nil {
				err = rt(c)
				c.Close()
			}
			if err != nil {
				b.Fatal(err)
			}
			newDirect = append(newDirect, time.Since(start))

			start = time.Now()
			p, err := dialEarlyWith(e.client, "echo") // write at once
			if err == nil {
				err = rt(p)
				p.Close()
			}
			if err != nil {
				b.Fatal(err)
			}
			newProxied = append(newProxied, time.Since(start))

			start = time.Now()
			p, err = e.dial("echo") // waiting for the gateway's answer first
			if err == nil {
				err = rt(p)
				p.Close()
			}
			if err != nil {
				b.Fatal(err)
			}
			newWait = append(newWait, time.Since(start))

			start = time.Now()
			if err := rt(dc); err != nil {
				b.Fatal(err)
			}
			rtDirect = append(rtDirect, time.Since(start))
			start = time.Now()
			if err := rt(pc); err != nil {
				b.Fatal(err)
			}
			rtProxied = append(rtProxied, time.Since(start))

			// The same through the QUIC egress (two QUIC hops).
			start = time.Now()
			p, err = dialEarlyWith(e.quicClient, "echo")
			if err == nil {
				err = rt(p)
				p.Close()
			}
			if err != nil {
				b.Fatal(err)
			}
			newQUIC = append(newQUIC, time.Since(start))
			start = time.Now()
			if err := rt(qc); err != nil {
				b.Fatal(err)
			}
			rtQUIC = append(rtQUIC, time.Since(start))

			// A bare quic-go hop.
			start = time.Now()
			s, err := bare.OpenStreamSync(context.Background())
			if err == nil {
				err = rt(s)
				s.CancelRead(0)
				s.Close()
			}
			if err != nil {
				b.Fatal(err)
			}
			newBare = append(newBare, time.Since(start))
			start = time.Now()
			if err := rt(bs); err != nil {
				b.Fatal(err)
			}
			rtBare = append(rtBare, time.Since(start))
		}
		bs.Close()
		dc.Close()
		pc.Close()
		qc.Close()
		report := func(name string, direct, proxied []time.Duration) {
			d50, d99 := pct(direct, 50), pct(direct, 99)
			p50, p99 := pct(proxied, 50), pct(proxied, 99)
			b.ReportMetric(ms(d50), name+"-direct-p50-ms")
			b.ReportMetric(ms(d99), name+"-direct-p99-ms")
			b.ReportMetric(ms(p50), name+"-proxied-p50-ms")
			b.ReportMetric(ms(p99), name+"-proxied-p99-ms")
			b.ReportMetric(ms(p50-d50), name+"-added-p50-ms")
			b.ReportMetric(ms(p99-d99), name+"-added-p99-ms")
		}
		report("new", newDirect, newProxied)
		b.ReportMetric(ms(pct(newWait, 50)-pct(newDirect, 50)), "new-wait-added-p50-ms")
		report("rt", rtDirect, rtProxied)
		b.ReportMetric(ms(pct(newQUIC, 50)-pct(newDirect, 50)), "quic-egress-new-added-p50-ms")
		b.ReportMetric(ms(pct(rtQUIC, 50)-pct(rtDirect, 50)), "quic-egress-rt-added-p50-ms")
		b.ReportMetric(ms(pct(newBare, 50)), "bare-quic-new-p50-ms")
		b.ReportMetric(ms(pct(rtBare, 50)), "bare-quic-rt-p50-ms")
	}
}

func pct(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[(len(s)-1)*p/100]
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// BenchmarkStreams1000: RSS of each gateway process with 1,000 proxied
// connections open (each has completed a round trip), and before.
func BenchmarkStreams1000(b *testing.B) {
	e := setup(b)
	for b.Loop() {
		var idle [2]float64
		for i, c := range []*child{e.west, e.east} {
			idle[i] = mustMem(b, c.cmd.Process.Pid, "VmRSS")
		}
		conns := make([]*gateway.Conn, 0, 1000)
		for range 1000 {
			c, err := e.dial("echo")
			if err != nil {
				b.Fatal(err)
			}
			if _, err := c.Write([]byte{1}); err != nil {
				b.Fatal(err)
			}
			var one [1]byte
			if _, err := io.ReadFull(c, one[:]); err != nil {
				b.Fatal(err)
			}
			conns = append(conns, c)
		}
		st, err := adminState(e.east.addrs["admin"])
		if err != nil || st.Streams["ingress"] != 1000 {
			b.Fatalf("east reports %v open ingress streams (%v), want 1000", st.Streams, err)
		}
		for i, c := range []*child{e.west, e.east} {
			name := []string{"west", "east"}[i]
			rss := mustMem(b, c.cmd.Process.Pid, "VmRSS")
			b.ReportMetric(rss, name+"-rss-mb")
			b.ReportMetric(idle[i], name+"-idle-rss-mb")
			b.ReportMetric((rss-idle[i])*1024/1000, name+"-kb-per-stream")
		}
		for _, c := range conns {
			c.Close()
		}
	}
}

func mustMem(b *testing.B, pid int, field string) float64 {
	v, err := procMemMB(pid, field)
	if err != nil {
		b.Fatal(err)
	}
	return v
}

// procCPU is the CPU time a process's threads have run: the sum of the
// first field of /proc/<pid>/task/*/schedstat (ns resolution).
func procCPU(pid int) (time.Duration, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var total int64
	for _, task := range tasks {
		data, err := os.ReadFile(filepath.Join(dir, task.Name(), "schedstat"))
		if err != nil {
			continue // the thread is gone
		}
		f := strings.Fields(string(data))
		if len(f) == 0 {
			return 0, fmt.Errorf("parse %s/%s/schedstat", dir, task.Name())
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse %s/%s/schedstat: %w", dir, task.Name(), err)
		}
		total += ns
	}
	return time.Duration(total), nil
}

// procMemMB reads a kB field (VmRSS, VmHWM) of /proc/<pid>/status in MB.
func procMemMB(pid int, field string) (float64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// quicSink is the child side of the bare quic-go references: a QUIC server
// with the gateway's flow-control windows whose streams are sinks, or
// echoes on a connection that negotiated ALPN "bench-echo".
func quicSink() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err
	}
	tr := &quic.Transport{Conn: uc}
	ln, err := tr.Listen(&tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"bench", "bench-echo"}}, gateway.DefaultQUICConfig())
	if err != nil {
		return err
	}
	fmt.Printf("serving quic=%s\n", uc.LocalAddr())
	for {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			return err
		}
		go func() {
			for {
				s, err := conn.AcceptStream(context.Background())
				if err != nil {
					if !errors.Is(err, context.Canceled) {
						return
					}
					return
				}
				if conn.ConnectionState().TLS.NegotiatedProtocol == "bench-echo" {
					go func() { echoStream(s); s.Close() }()
					continue
				}
				go func() { sink(s); s.Close() }()
			}
		}()
	}
}
