package gateway

import (
	"os"
	"path/filepath"
	"testing"
)

func TestLoadStatelessResetKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "reset.key")
	a, err := LoadStatelessResetKey(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file %v mode %v, want 0600", err, st.Mode())
	}
	b, err := LoadStatelessResetKey(path)
	if err != nil || *a != *b {
		t.Fatalf("second load %v: the key must survive a restart", err)
	}
	if err := os.WriteFile(path, []byte("short"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadStatelessResetKey(path); err == nil {
		t.Fatal("a key of the wrong size must be refused")
	}
}
