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
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
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

// leakWait bounds how long CheckGoroutines waits for goroutines to end
// after a test's cleanups: wide for a loaded 2-core machine under -race,
// and only a failing test ever waits that long.
const leakWait = 10 * time.Second

// CheckGoroutines fails the test if any goroutine that started during it
// (its own, or one it started, directly or not) still runs after its
// cleanups: an exact check by goroutine, not a count, with go.uber.org/goleak.
// Register it first, so it runs last. ignore adds goleak options for
// goroutines that are process-wide by design (say why where you pass one).
// A slow wind-down (over 500 ms) is logged.
func CheckGoroutines(t testing.TB, ignore ...goleak.Option) {
	t.Helper()
	opts := append([]goleak.Option{goleak.IgnoreCurrent()}, ignore...)
	t.Cleanup(func() {
		start := time.Now()
		for {
			err := goleak.Find(opts...) // itself retries for about half a second
			if err == nil {
				if d := time.Since(start); d > 500*time.Millisecond {
					t.Logf("goroutines took %s to wind down", d)
				}
				return
			}
			if time.Since(start) > leakWait {
				t.Errorf("goroutines that started during the test still run %s after its cleanups:\n%v", leakWait, err)
				return
			}
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

// BuildCommand builds github.com/fedmesh/fedmesh/cmd/<name> into dir/<name>
// as `make build` builds it (static, CGO_ENABLED=0, and -tags=grpcnotrace),
// so a test runs the binary users run, and returns its path.
func BuildCommand(dir, name string) (string, error) {
	bin := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-tags=grpcnotrace", "-o", bin, "github.com/fedmesh/fedmesh/cmd/"+name)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %w\n%s", name, err, out)
	}
	return bin, nil
}
