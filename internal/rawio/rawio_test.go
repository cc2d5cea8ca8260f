package rawio_test

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/internal/rawio"
	"github.com/fedmesh/fedmesh/internal/testutil"
)

// pair is a real loopback TCP connection: a wrapped end (Raw mode) and a
// plain one.
func pair(t testing.TB) (wrapped net.Conn, peer *net.TCPConn) { return pairMode(t, rawio.Raw) }

// pairMode is pair with the wrapped end in mode m (Raw or Auto).
func pairMode(t testing.TB, m rawio.Mode) (wrapped net.Conn, peer *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- nil
			return
		}
		ch <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	p := <-ch
	if p == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); p.Close() })
	w := rawio.WrapMode(c, m)
	if runtime.GOOS == "linux" {
		if _, ok := w.(*rawio.Conn); !ok {
			t.Fatalf("Wrap(*net.TCPConn) = %T, want *rawio.Conn", w)
		}
	}
	return w, p.(*net.TCPConn)
}

func TestRoundTripLargerThanSocketBuffers(t *testing.T) {
	w, p := pair(t)
	roundTrip(t, w, p)
}

func roundTrip(t *testing.T, w net.Conn, p *net.TCPConn) {
	// 8 MiB does not fit the socket buffers: the writer meets EAGAIN and
	// must wait on the poller, then finish the write.
	want := make([]byte, 8<<20)
	_, _ = rand.Read(want)
	errc := make(chan error, 1)
	go func() {
		n, err := w.Write(want)
		if err == nil && n != len(want) {
			err = io.ErrShortWrite
		}
		errc <- err
	}()
	got := make([]byte, len(want))
	time.Sleep(50 * time.Millisecond) // let the writer fill the buffers first
	_ = p.SetReadDeadline(time.Now().Add(20 * time.Second))
	if n, err := io.ReadFull(p, got); err != nil {
		t.Fatalf("peer read %d of %d bytes: %v (write: %v)", n, len(want), err, <-errc)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("bytes differ after the round trip")
	}
	// And back: the wrapped side reads what the peer wrote, in pieces.
	go func() { _, _ = p.Write(want); _ = p.CloseWrite() }()
	back, err := io.ReadAll(w)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(back, want) {
		t.Fatalf("read %d bytes, differing from the %d written", len(back), len(want))
	}
}

func TestEOFAndHalfClose(t *testing.T) {
	w, p := pair(t)
	if err := w.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := p.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("peer after CloseWrite: %d, %v; want 0, EOF", n, err)
	}
	// The other direction still works.
	if _, err := p.Write([]byte("still open")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 32)
	n, err := w.Read(buf)
	if err != nil || string(buf[:n]) != "still open" {
		t.Fatalf("read after own CloseWrite: %q, %v", buf[:n], err)
	}
	_ = p.Close()
	if n, err := w.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read after peer close: %d, %v; want 0, EOF", n, err)
	}
}

func TestDeadline(t *testing.T) {
	w, _ := pair(t)
	_ = w.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	start := time.Now()
	_, err := w.Read(make([]byte, 8))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past deadline: %v is not a net.Error timeout", err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "read" {
		t.Fatalf("read past deadline: %#v, want a *net.OpError with Op read", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("deadline of 30ms took %v", d)
	}
	// A cleared deadline reads again.
	_ = w.SetReadDeadline(time.Time{})
	_ = w.SetWriteDeadline(time.Now().Add(-time.Second))
	if _, err := w.Write([]byte("x")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write past deadline: %v", err)
	}
}

func TestCloseUnblocksRead(t *testing.T) {
	w, _ := pair(t)
	errc := make(chan error, 1)
	go func() {
		_, err := w.Read(make([]byte, 8))
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	_ = w.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read on closed conn: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock Read")
	}
}

func TestResetIsASyscallError(t *testing.T) {
	w, p := pair(t)
	_ = p.SetLinger(0)
	_ = p.Close() // RST
	buf := make([]byte, 8)
	var err error
	for range 100 { // the RST may take a moment to land
		if _, err = w.Read(buf); err != nil {
			break
		}
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after peer reset: %v, want ECONNRESET", err)
	}
}

func TestTLSOverWrapped(t *testing.T) {
	w, p := pair(t)
	cert := testutil.SelfSignedCert(t)
	srv := tls.Server(p, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	cli := tls.Client(w, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}) //nolint:gosec // a throwaway self-signed peer
	go func() {
		_, _ = io.Copy(srv, srv) // echo
		_ = srv.Close()
	}()
	msg := bytes.Repeat([]byte("fedmesh "), 4096)
	go func() { _, _ = cli.Write(msg); _ = cli.CloseWrite() }()
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(cli, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("TLS echo differs")
	}
}

func TestNotTCPIsUnchanged(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if got := rawio.Wrap(a); got != a {
		t.Fatalf("Wrap(pipe) = %T, want the pipe itself", got)
	}
}

func TestNoAllocations(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("raw I/O is Linux only")
	}
	w, p := pair(t)
	msg := []byte("ping")
	buf := make([]byte, 64)
	pbuf := make([]byte, 64)
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := w.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(p, pbuf[:len(msg)]); err != nil {
			t.Fatal(err)
		}
		if _, err := p.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(w, buf[:len(msg)]); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per round trip through the wrapped end, want 0", allocs)
	}
}
