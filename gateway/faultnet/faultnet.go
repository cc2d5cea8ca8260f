// Package faultnet is a userspace UDP relay that injects the faults a WAN
// between clusters has: delay, jitter, random loss and full partitions.
//
// It exists so that gateway liveness (a dead peer detected within its bound,
// recovery after a heal) is tested over real sockets instead of mocks, and so
// that the local federation can put the same relay between its clusters'
// gateways. Faults change at run time with SetFaults; packets in flight keep
// the faults they were sent under.
package faultnet

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Faults describes what the relay does to each packet, in both directions.
type Faults struct {
	Delay     time.Duration // added one-way delay
	Jitter    time.Duration // uniform extra delay in [0, Jitter)
	Loss      float64       // probability in [0,1] that a packet is dropped
	Partition bool          // drop everything
}

func (f Faults) validate() error {
	if f.Delay < 0 || f.Jitter < 0 {
		return errors.New("negative delay or jitter")
	}
	if f.Loss < 0 || f.Loss > 1 {
		return fmt.Errorf("loss %v not in [0,1]", f.Loss)
	}
	return nil
}

// Stats counts packets.
type Stats struct {
	Forwarded uint64
	Dropped   uint64 // by loss or partition
	Overflow  uint64 // dropped because too many packets were already delayed
}

const (
	maxFlows   = 1024
	maxPending = 1 << 16 // delayed packets held at once
	maxPacket  = 64 << 10
)

// Relay forwards datagrams between clients that send to its address and one
// target. Each client address gets its own upstream socket, so the target
// sees one distinct source per client, as through a NAT.
type Relay struct {
	conn   *net.UDPConn
	target *net.UDPAddr

	faults  atomic.Pointer[Faults]
	pending atomic.Int64
	fwd     atomic.Uint64
	dropped atomic.Uint64
	over    atomic.Uint64

	mu     sync.Mutex
	flows  map[netip.AddrPort]*net.UDPConn
	timers map[*time.Timer]struct{} // delayed packets not yet sent
	closed bool
	wg     sync.WaitGroup // the read loops and the delayed sends
}

// New listens on listen (e.g. "127.0.0.1:0") and relays to target.
func New(listen, target string) (*Relay, error) {
	taddr, err := net.ResolveUDPAddr("udp", target)
	if err != nil {
		return nil, fmt.Errorf("resolve relay target %s: %w", target, err)
	}
	laddr, err := net.ResolveUDPAddr("udp", listen)
	if err != nil {
		return nil, fmt.Errorf("resolve relay address %s: %w", listen, err)
	}
	conn, err := net.ListenUDP("udp", laddr)
	if err != nil {
		return nil, fmt.Errorf("listen relay %s: %w", listen, err)
	}
	r := &Relay{conn: conn, target: taddr, flows: map[netip.AddrPort]*net.UDPConn{}, timers: map[*time.Timer]struct{}{}}
	r.faults.Store(&Faults{})
	r.wg.Add(1)
	go r.downstream()
	return r, nil
}

// Addr is where clients send.
func (r *Relay) Addr() *net.UDPAddr { return r.conn.LocalAddr().(*net.UDPAddr) }

// SetFaults replaces the faults applied to packets from now on.
func (r *Relay) SetFaults(f Faults) error {
	if err := f.validate(); err != nil {
		return fmt.Errorf("set faults: %w", err)
	}
	r.faults.Store(&f)
	return nil
}

// Faults are the faults in force.
func (r *Relay) Faults() Faults { return *r.faults.Load() }

// Stats are the packet counters so far.
func (r *Relay) Stats() Stats {
	return Stats{Forwarded: r.fwd.Load(), Dropped: r.dropped.Load(), Overflow: r.over.Load()}
}

// Close stops the relay and its upstream sockets, drops the packets still
// delayed, and returns when nothing of the relay runs any more.
func (r *Relay) Close() error {
	r.mu.Lock()
	r.closed = true
	for _, c := range r.flows {
		c.Close()
	}
	for t := range r.timers {
		if t.Stop() { // it will never run
			r.pending.Add(-1)
			r.wg.Done()
		}
	}
	clear(r.timers)
	r.mu.Unlock()
	err := r.conn.Close()
	r.wg.Wait()
	return err
}

// downstream reads from clients and forwards to the target.
func (r *Relay) downstream() {
	defer r.wg.Done()
	buf := make([]byte, maxPacket)
	for {
		n, from, err := r.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		up := r.flow(from)
		if up == nil {
			continue
		}
		r.send(buf[:n], func(p []byte) { _, _ = up.Write(p) })
	}
}

// flow returns the upstream socket of a client, creating it on first use.
func (r *Relay) flow(from netip.AddrPort) *net.UDPConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	if c, ok := r.flows[from]; ok {
		return c
	}
	if len(r.flows) >= maxFlows {
		return nil
	}
	c, err := net.DialUDP("udp", nil, r.target)
	if err != nil {
		return nil
	}
	r.flows[from] = c
	r.wg.Add(1)
	go r.upstream(c, net.UDPAddrFromAddrPort(from))
	return c
}

// upstream reads the target's answers to one client and sends them back.
func (r *Relay) upstream(c *net.UDPConn, client *net.UDPAddr) {
	defer r.wg.Done()
	buf := make([]byte, maxPacket)
	for {
		n, err := c.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && !ne.Timeout() && !errors.Is(err, net.ErrClosed) {
				continue // e.g. ICMP port unreachable while the target is down
			}
			return
		}
		r.send(buf[:n], func(p []byte) { _, _ = r.conn.WriteToUDP(p, client) })
	}
}

// send applies the faults to one packet.
func (r *Relay) send(p []byte, write func([]byte)) {
	f := r.faults.Load()
	if f.Partition || (f.Loss > 0 && rand.Float64() < f.Loss) {
		r.dropped.Add(1)
		return
	}
	d := f.Delay
	if f.Jitter > 0 {
		d += rand.N(f.Jitter)
	}
	if d <= 0 {
		r.fwd.Add(1)
		write(p)
		return
	}
	if r.pending.Add(1) > maxPending {
		r.pending.Add(-1)
		r.over.Add(1)
		return
	}
	cp := append([]byte(nil), p...)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		r.pending.Add(-1)
		return
	}
	// The read loop calling send holds a count of wg, so this Add never
	// races with Close's Wait from zero.
	r.wg.Add(1)
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		defer r.wg.Done()
		r.mu.Lock()
		delete(r.timers, t)
		closed := r.closed
		r.mu.Unlock()
		r.pending.Add(-1)
		if closed {
			return
		}
		r.fwd.Add(1)
		write(cp)
	})
	r.timers[t] = struct{}{}
}
