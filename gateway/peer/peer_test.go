package peer

import (
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

func TestTimeoutsStayWithinBound(t *testing.T) {
	for _, d := range []time.Duration{10 * time.Millisecond, 300 * time.Millisecond, time.Second, 7 * time.Second} {
		idle, ka := Timeouts(d)
		if idle+ka > d || ka <= 0 || idle <= ka {
			t.Errorf("dead-after %s: idle %s + keepalive %s", d, idle, ka)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	tr := &quic.Transport{}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no transport", Config{Addr: "x:1", TLS: &tls.Config{}}, "no transport"},
		{"no tls", Config{Addr: "x:1", Transport: tr}, "no tls config"},
		{"no addr", Config{Transport: tr, TLS: &tls.Config{}}, "no address"},
		{"tiny dead-after", Config{Addr: "x:1", Transport: tr, TLS: &tls.Config{}, DeadAfter: time.Millisecond}, "under 10ms"},
		{"backoff range", Config{Addr: "x:1", Transport: tr, TLS: &tls.Config{}, MinBackoff: time.Second, MaxBackoff: time.Millisecond}, "not a range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
	l, err := New(Config{Cluster: "east", Addr: "127.0.0.1:1", Transport: tr, TLS: &tls.Config{}})
	if err != nil {
		t.Fatal(err)
	}
	if l.Up() || l.Status().Up {
		t.Error("a link that never ran is up")
	}
	if _, err := l.OpenStream(t.Context()); err != ErrDown {
		t.Errorf("open stream on a down link: %v, want ErrDown", err)
	}
}
