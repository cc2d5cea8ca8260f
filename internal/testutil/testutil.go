// Package testutil holds what tests in several packages need alike: a log
// buffer that child processes and goroutines may write while the test
// reads it, a child process that is stopped at cleanup with its output
// shown when the test failed, a goroutine-leak check, a throwaway TLS
// certificate and the accept loop of a test server.
package testutil

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// SyncBuffer is a bytes.Buffer safe for concurrent Write and String.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Start starts cmd with its stdout and stderr in a new SyncBuffer, and
// returns that and a channel closed when the process exits. At cleanup it
// sends an interrupt, kills the process if it has not exited 10 s later,
// and logs the output under name when the test failed.
func Start(t testing.TB, cmd *exec.Cmd, name string) (*SyncBuffer, <-chan struct{}) {
	t.Helper()
	logs := &SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("%s logs:\n%s", name, logs.String())
		}
	})
	return logs, exited
}

// CheckGoroutines fails the test if goroutines started during it are still
// running 5 s after its cleanups; register it first so it runs last. The
// failure shows the stacks of the goroutines that can be ours (fedmesh,
// quic-go, grpc, net/http), and a slow wind-down (over 500 ms) is logged.
func CheckGoroutines(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		start := time.Now()
		deadline := start.Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				n := runtime.Stack(buf, true)
				var keep []string
				for _, g := range strings.Split(string(buf[:n]), "\n\n") {
					if strings.Contains(g, "fedmesh") || strings.Contains(g, "quic-go") || strings.Contains(g, "grpc") || strings.Contains(g, "net/http") {
						keep = append(keep, g)
					}
				}
				t.Errorf("goroutine leak: %d running, %d before the test\n%s", runtime.NumGoroutine(), before, strings.Join(keep, "\n\n"))
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Logf("goroutines took %s to wind down", d)
		}
	})
}

// SelfSignedCert is a throwaway P-256 certificate for tests that need TLS
// but not SPIFFE identities (a transport under test, not who is talking).
func SelfSignedCert(t testing.TB) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// Serve accepts connections on ln until it is closed, and runs handle on
// each in its own goroutine, closing the connection when handle returns:
// the accept loop of tests' little servers.
func Serve(ln net.Listener, handle func(c net.Conn)) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}
