package gateway

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"

	"github.com/quic-go/quic-go"
)

// LoadStatelessResetKey reads the 32-byte QUIC stateless reset key at path,
// creating it (random, mode 0600) if it does not exist. The key must stay
// the same across restarts of one replica and stay secret: whoever knows it
// can reset that replica's connections.
func LoadStatelessResetKey(path string) (*quic.StatelessResetKey, error) {
	var key quic.StatelessResetKey
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if len(b) != len(key) {
			return nil, fmt.Errorf("stateless reset key %s: %d bytes, want %d", path, len(b), len(key))
		}
		copy(key[:], b)
		return &key, nil
	case errors.Is(err, os.ErrNotExist):
		if _, err := rand.Read(key[:]); err != nil {
			return nil, err
		}
		if err := os.WriteFile(path, key[:], 0o600); err != nil {
			return nil, fmt.Errorf("write stateless reset key %s: %w", path, err)
		}
		return &key, nil
	default:
		return nil, fmt.Errorf("read stateless reset key %s: %w", path, err)
	}
}
