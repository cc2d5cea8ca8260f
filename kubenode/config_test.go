package kubenode

import (
	"net"
	"os"
	"strings"
	"testing"
)

// The versions the code expects are the ones the tool modules pin.
func TestVersionsMatchToolModules(t *testing.T) {
	for file, want := range map[string]string{
		"../tools/kubernetes/go.mod": "k8s.io/kubernetes " + KubeVersion,
		"../tools/coredns/go.mod":    "github.com/coredns/coredns " + CoreDNSVersion,
	} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), "require "+want+"\n") {
			t.Errorf("%s does not require %s", file, want)
		}
	}
}

// Every address of every slot is inside 198.18.0.0/15, in 198.19.128.0/17,
// and no two slots overlap.
func TestSlotAddresses(t *testing.T) {
	_, bench, _ := net.ParseCIDR("198.19.128.0/17")
	seen := map[string]int{}
	for s := range maxSlots {
		a := slotAddrs(s)
		for _, cidr := range []string{a.linkCIDR, a.podCIDR, a.serviceCIDR} {
			ip, _, err := net.ParseCIDR(cidr)
			if err != nil || !bench.Contains(ip) {
				t.Fatalf("slot %d: %s is outside 198.19.128.0/17", s, cidr)
			}
			if o, ok := seen[cidr]; ok {
				t.Fatalf("slots %d and %d share %s", o, s, cidr)
			}
			seen[cidr] = s
		}
		for _, ip := range []string{a.hostIP, a.nodeIP, a.podGateway, a.apiServiceIP, a.dnsIP} {
			if !bench.Contains(net.ParseIP(ip)) {
				t.Fatalf("slot %d: %s is outside 198.19.128.0/17", s, ip)
			}
		}
		if len(a.hostVeth) > 15 || len(a.nodeVeth) > 15 {
			t.Fatalf("slot %d: interface names %s, %s are longer than 15 bytes", s, a.hostVeth, a.nodeVeth)
		}
	}
}
