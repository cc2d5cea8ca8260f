package sidecar

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/fedmesh/fedmesh/internal/testutil"
)

// TestReadNameservers: the nameservers of a resolv.conf, as host:port,
// in order; other lines and unparsable addresses are ignored.
func TestReadNameservers(t *testing.T) {
	testutil.CheckGoroutines(t)
	path := filepath.Join(t.TempDir(), "resolv.conf")
	conf := "# kubelet\nsearch shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00:10:96::a\nnameserver not-an-ip\n  nameserver   10.96.0.11  \noptions ndots:5\n"
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := readNameservers(path)
	want := []string{"10.96.0.10:53", "[fd00:10:96::a]:53", "10.96.0.11:53"}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("readNameservers: %q %v, want %q", got, err, want)
	}
}

// FuzzParseDNSQuery: no packet makes the parser, or the answer built for
// what it accepts, panic; what it accepts as local is in the zone.
func FuzzParseDNSQuery(f *testing.F) {
	for _, name := range []string{"checkout.shop.svc.clusterset.local.", "example.com.", "svc.clusterset.local."} {
		msg := dnsmessage.Message{Header: dnsmessage.Header{ID: 1, RecursionDesired: true},
			Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}}
		b, err := msg.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("hello"))
	f.Add([]byte{})
	d := &dnsServer{}
	f.Fuzz(func(t *testing.T, raw []byte) {
		q, err := parseDNSQuery(raw)
		if err != nil {
			return
		}
		if q.local && !q.hasQ {
			t.Fatal("local without a question")
		}
		for _, tcp := range []bool{false, true} {
			if b := d.reply(q, tcp, dnsmessage.RCodeNameError, true, nil); !tcp && len(b) > max(512, int(q.edns)) {
				t.Fatalf("udp reply of %d bytes", len(b))
			}
		}
	})
}
