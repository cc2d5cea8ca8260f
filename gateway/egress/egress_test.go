package egress

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/internal/testutil"
)

// TestNoQUIC: the package exists so that sidecars reach their gateway
// without linking quic-go.
func TestNoQUIC(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Skipf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "quic-go") {
			t.Errorf("package egress depends on %s", dep)
		}
	}
}

// fakeGateway is a TCP egress that answers every header with code and,
// after an ok, echoes frames until the end frame, which it returns. got
// receives the bytes of the first TLS record of each connection.
func fakeGateway(t *testing.T, dom *gatewaytest.Domain, code tunnel.Code) (addr string, got chan []byte) {
	t.Helper()
	cfg := TLSConfig(mtls.QUICServerConfig(dom.Source(t, "gateway"), mtls.MemberOf(dom.TD), tunnel.ALPNEgress))
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got = make(chan []byte, 16)
	testutil.Serve(ln, func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 1<<15)
		n, err := c.Read(buf) // crypto/tls returns one record at most
		if err != nil {
			return
		}
		select {
		case got <- buf[:n]:
		default: // nobody reads the first records of this many connections
		}
		r := io.MultiReader(bytes.NewReader(buf[:n]), c)
		if _, err := tunnel.ReadRequest(r); err != nil {
			return
		}
		if err := tunnel.WriteResponse(c, code, "fake"); err != nil || code != tunnel.CodeOK {
			return
		}
		fr := &tunnel.FrameReader{R: r}
		fw := &tunnel.FrameWriter{W: c}
		if _, err := io.Copy(fw, fr); err == nil {
			_ = fw.End()
		}
	})
	return ln.Addr().String(), got
}

// newClient is a Client of the gateway at addr with the given number of
// spare connections, closed with the test.
func newClient(t *testing.T, dom *gatewaytest.Domain, addr string, spares int) *Client {
	t.Helper()
	c, err := NewClient(dom.Source(t, "web"), dom.ID("gateway"), addr, WithSpares(spares))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestDialEarly: the header goes with the first write, in one TLS record,
// and a refusal surfaces on the first Read.
func TestDialEarly(t *testing.T) {
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	req := tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80}
	hdr, err := tunnel.AppendRequest(nil, &req)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, tc := range []struct {
		name string
		code tunnel.Code
	}{{"ok", tunnel.CodeOK}, {"refused", tunnel.CodeNotExported}} {
		t.Run(tc.name, func(t *testing.T) {
			addr, got := fakeGateway(t, doms["west"], tc.code)
			c := newClient(t, doms["west"], addr, 0)
			conn, err := c.DialEarly(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := conn.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			want := append(append(hdr[:len(hdr):len(hdr)], 0, 5), "hello"...)
			if first := <-got; !bytes.Equal(first, want) {
				t.Errorf("first record %q, want the header and the first frame %q", first, want)
			}
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 16)
			n, err := conn.Read(buf)
			if tc.code != tunnel.CodeOK {
				var te *tunnel.Error
				if !errors.As(err, &te) || te.Code != tc.code {
					t.Errorf("read: %v, want code %s", err, tc.code)
				}
				return
			}
			if err != nil || string(buf[:n]) != "hello" {
				t.Errorf("read %q, %v; want the echo", buf[:n], err)
			}
		})
	}
}

// TestDial: Dial sends the header alone and waits for the answer; Close
// ends the direction with an end frame.
func TestDial(t *testing.T) {
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	addr, got := fakeGateway(t, doms["west"], tunnel.CodeOK)
	c := newClient(t, doms["west"], addr, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req := tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80}
	conn, err := c.Dial(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	hdr, _ := tunnel.AppendRequest(nil, &req)
	if first := <-got; !bytes.Equal(first, hdr) {
		t.Errorf("first record %q, want the header alone", first)
	}
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if err := conn.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(conn)
	if err != nil || string(b) != "ping" {
		t.Errorf("read %q, %v; want the echo, then the end", b, err)
	}
	conn.Close()
}

// TestDialEarlyNoWrite: with nothing written, the header goes alone before
// the first Read, or with the end frame on CloseWrite.
func TestDialEarlyNoWrite(t *testing.T) {
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	req := tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80}
	hdr, _ := tunnel.AppendRequest(nil, &req)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name  string
		first func(*Conn) error
		want  []byte
	}{
		{"read first", func(c *Conn) error {
			_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			_, err := c.Read(make([]byte, 1)) // the answer, then no bytes
			if ne, ok := err.(interface{ Timeout() bool }); !ok || !ne.Timeout() {
				return err
			}
			return c.CloseWrite()
		}, hdr},
		{"half-close first", func(c *Conn) error { return c.CloseWrite() }, append(hdr[:len(hdr):len(hdr)], 0, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, got := fakeGateway(t, doms["west"], tunnel.CodeOK)
			c := newClient(t, doms["west"], addr, 0)
			conn, err := c.DialEarly(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if err := tc.first(conn); err != nil {
				t.Fatal(err)
			}
			if first := <-got; !bytes.Equal(first, tc.want) {
				t.Errorf("first record %q, want %q", first, tc.want)
			}
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, err := io.ReadAll(conn); err != nil || len(b) != 0 {
				t.Errorf("read %q, %v; want the gateway's end", b, err)
			}
		})
	}
}

// TestCloseDuringRead: Close while another goroutine is blocked in Read (a
// TLS handshake interrupted by its context does exactly that) resets the
// connection instead of draining it for reuse, so nothing reads the frames
// concurrently (the race detector watches); the Read returns at once, and
// later calls fail with net.ErrClosed or the reset.
func TestCloseDuringRead(t *testing.T) {
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	addr, _ := fakeGateway(t, doms["west"], tunnel.CodeOK)
	c := newClient(t, doms["west"], addr, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, early := range []bool{false, true} {
		dial := c.Dial
		if early {
			dial = c.DialEarly
		}
		conn, err := dial(ctx, tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := conn.Read(make([]byte, 16))
			done <- err
		}()
		// Wait until the Read holds the read lock (it is blocked: the echo
		// has nothing to send), so Close meets a Read in progress.
		waitLocked(t, &conn.rmu)
		start := time.Now()
		_ = conn.Close()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("early=%v: the blocked Read returned no error after Close", early)
			}
		case <-time.After(time.Second):
			t.Fatalf("early=%v: the blocked Read did not return within 1s of Close", early)
		}
		if _, err := conn.Write([]byte("x")); err == nil {
			t.Errorf("early=%v: Write after Close succeeded", early)
		}
		t.Logf("early=%v: Read returned %s after Close", early, time.Since(start))
	}
}

// waitLocked waits (at most 10 s) until another goroutine holds mu.
func waitLocked(t *testing.T, mu *sync.Mutex) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); mu.TryLock(); {
		mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatal("the Read did not start within 10s")
		}
		runtime.Gosched()
		time.Sleep(time.Millisecond)
	}
}

// TestConnCloseRacesClientClose: connections closed while, and after, the
// client closes start no drain (a goroutine Close no longer waits for, and a
// WaitGroup Add concurrent with its Wait, which the race detector reports):
// they are closed at once, and nothing of the client's outlives Close.
func TestConnCloseRacesClientClose(t *testing.T) {
	testutil.CheckGoroutines(t)
	doms := gatewaytest.Start(t, []string{"west"}, nil)
	addr, _ := fakeGateway(t, doms["west"], tunnel.CodeOK)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for round := range 20 {
		c, err := NewClient(doms["west"].Source(t, "web"), doms["west"].ID("gateway"), addr, WithSpares(2))
		if err != nil {
			t.Fatal(err)
		}
		var conns []*Conn
		for range 4 {
			conn, err := c.Dial(ctx, tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80})
			if err != nil {
				t.Fatalf("round %d: dial: %v", round, err)
			}
			conns = append(conns, conn)
		}
		var wg sync.WaitGroup
		for _, conn := range conns[:2] {
			wg.Go(func() { _ = conn.Close() }) // beside Client.Close
		}
		_ = c.Close()
		wg.Wait()
		for _, conn := range conns[2:] {
			_ = conn.Close() // after Client.Close
			if _, err := conn.NetConn().Write([]byte{0}); err == nil {
				t.Fatalf("round %d: a connection closed after the client is still open", round)
			}
		}
		if ready, draining := c.Pool(); ready != 0 || draining != 0 {
			t.Fatalf("round %d: after Close the pool holds %d ready and %d draining connections, want none", round, ready, draining)
		}
	}
}
