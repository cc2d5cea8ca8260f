// Package testutil holds what tests in several packages need alike: a log
// buffer that child processes and goroutines may write while the test
// reads it, and a child process that is stopped at cleanup with its output
// shown when the test failed.
package testutil

import (
	"bytes"
	"os"
	"os/exec"
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
