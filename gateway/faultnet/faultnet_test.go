package faultnet

import (
	"net"
	"testing"
	"time"
)

// echo is a UDP echo server on loopback.
func echo(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteToUDP(buf[:n], from)
		}
	}()
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrips sends n numbered pings through the relay and returns how many
// came back and the median round trip of those that did.
func roundTrips(t *testing.T, r *Relay, n int, wait time.Duration) (int, time.Duration) {
	t.Helper()
	c, err := net.DialUDP("udp", nil, r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := 0
	var rtts []time.Duration
	buf := make([]byte, 64)
	for i := range n {
		start := time.Now()
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(wait))
		for {
			m, err := c.Read(buf)
			if err != nil {
				break
			}
			if m == 1 && buf[0] == byte(i) {
				got++
				rtts = append(rtts, time.Since(start))
				break
			}
		}
	}
	if len(rtts) == 0 {
		return 0, 0
	}
	return got, rtts[len(rtts)/2]
}

func TestRelayFaults(t *testing.T) {
	srv := echo(t)
	r, err := New("127.0.0.1:0", srv.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()

	if got, _ := roundTrips(t, r, 20, time.Second); got != 20 {
		t.Fatalf("no faults: %d/20 came back", got)
	}

	if err := r.SetFaults(Faults{Delay: 20 * time.Millisecond, Jitter: 5 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	got, med := roundTrips(t, r, 10, time.Second)
	if got != 10 || med < 40*time.Millisecond || med > 500*time.Millisecond {
		t.Fatalf("delay 20ms each way: %d/10 back, median %s, want >= 40ms", got, med)
	}

	if err := r.SetFaults(Faults{Loss: 0.5}); err != nil {
		t.Fatal(err)
	}
	// Each round trip crosses the relay twice: P(back) = 0.25. With 200
	// tries, the 1e-6 tails are roughly 22..82.
	got, _ = roundTrips(t, r, 200, 20*time.Millisecond)
	if got < 15 || got > 90 {
		t.Fatalf("loss 0.5: %d/200 came back, want about 50", got)
	}

	if err := r.SetFaults(Faults{Partition: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := roundTrips(t, r, 10, 20*time.Millisecond); got != 0 {
		t.Fatalf("partition: %d/10 came back", got)
	}

	if err := r.SetFaults(Faults{}); err != nil {
		t.Fatal(err)
	}
	if got, _ := roundTrips(t, r, 10, time.Second); got != 10 {
		t.Fatalf("healed: %d/10 came back", got)
	}
	if s := r.Stats(); s.Dropped == 0 || s.Forwarded == 0 {
		t.Errorf("stats %+v", s)
	}
	if err := r.SetFaults(Faults{Loss: 2}); err == nil {
		t.Error("loss 2 accepted")
	}
}

// TestCloseDropsDelayed: packets still delayed when the relay closes are
// dropped at Close, not sent later on its closed sockets by timers nobody
// owns.
func TestCloseDropsDelayed(t *testing.T) {
	r, err := New("127.0.0.1:0", echo(t).LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.SetFaults(Faults{Delay: time.Minute}); err != nil {
		t.Fatal(err)
	}
	c, err := net.DialUDP("udp", nil, r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const n = 10
	for i := range n {
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for r.pending.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d packets delayed after 10s", r.pending.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if p, st := r.pending.Load(), r.Stats(); p != 0 || st.Forwarded != 0 {
		t.Fatalf("after Close: %d packets still delayed, %d forwarded; want none", p, st.Forwarded)
	}
}
