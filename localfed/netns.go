package localfed

import (
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// The sample pods of each cluster live in a network namespace of their own
// when the supervisor runs as root: EndpointSlices may not hold loopback
// addresses, and a namespace per cluster is what a real cluster looks like.
// Cluster i of a federation in slot s gets 198.18.(8s+i+1).0/24: the host
// end of its veth pair is .1 (where the controller's discovery API and the
// gateways' egress listen for that cluster), pods are .10, .11, ... and the
// client is .100. Only addresses of these namespaces are ever dialed.

// netns is one cluster's pod network.
type netns struct {
	name   string // ip netns name
	host   string // host-side veth
	peer   string // namespace-side veth
	prefix string // "198.18.N." for this cluster
}

func (n *netns) hostAddr() string { return n.prefix + "1" }
func (n *netns) podAddr(p int) string {
	return fmt.Sprintf("%s%d", n.prefix, p)
}

// nsPrefix names every namespace of the federation in dir.
func nsPrefix(dir string) string {
	sum := sha256.Sum256([]byte(dir))
	return fmt.Sprintf("fm-%x-", sum[:3])
}

func canNetns() bool {
	if os.Geteuid() != 0 {
		return false
	}
	_, err := exec.LookPath("ip")
	return err == nil
}

func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// freeSlot finds a slot whose subnets no route uses yet.
func freeSlot(clusters int) (int, error) {
	out, err := exec.Command("ip", "-4", "route", "show").Output()
	if err != nil {
		return 0, fmt.Errorf("ip route show: %w", err)
	}
	routes := string(out)
	for s := range 256 / 8 {
		used := false
		for i := range clusters {
			if strings.Contains(routes, fmt.Sprintf("198.18.%d.0/24", 8*s+i+1)) {
				used = true
			}
		}
		if !used {
			return s, nil
		}
	}
	return 0, fmt.Errorf("every 198.18.0.0/15 slot is in use by other local federations")
}

// createNetns makes cluster i's namespace with its veth pair and pod addresses.
func createNetns(dir string, slot, i int, pods []int) (*netns, error) {
	n := &netns{
		name:   fmt.Sprintf("%s%d", nsPrefix(dir), i),
		host:   fmt.Sprintf("fm%02x%dh", slot, i),
		peer:   fmt.Sprintf("fm%02x%dn", slot, i),
		prefix: fmt.Sprintf("198.18.%d.", 8*slot+i+1),
	}
	steps := [][]string{
		{"netns", "add", n.name},
		{"link", "add", n.host, "type", "veth", "peer", "name", n.peer},
		{"link", "set", n.peer, "netns", n.name},
		{"addr", "add", n.hostAddr() + "/24", "dev", n.host},
		{"link", "set", n.host, "up"},
		{"-n", n.name, "link", "set", "lo", "up"},
		{"-n", n.name, "addr", "add", n.prefix + "2/24", "dev", n.peer},
	}
	for _, p := range pods {
		steps = append(steps, []string{"-n", n.name, "addr", "add", n.podAddr(p) + "/24", "dev", n.peer})
	}
	steps = append(steps, []string{"-n", n.name, "link", "set", n.peer, "up"})
	for _, s := range steps {
		if err := ip(s...); err != nil {
			n.delete()
			return nil, err
		}
	}
	return n, nil
}

// delete removes the namespace (and so its veth pair).
func (n *netns) delete() {
	exec.Command("ip", "netns", "delete", n.name).Run()
	exec.Command("ip", "link", "delete", n.host).Run()
}

// Namespaces lists the network namespaces of the federation in dir.
func Namespaces(dir string) []string {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return nil
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], nsPrefix(dir)) {
			names = append(names, f[0])
		}
	}
	return names
}

// DeleteNamespaces removes every network namespace left by dir's federation.
func DeleteNamespaces(dir string) []string {
	for _, n := range Namespaces(dir) {
		exec.Command("ip", "netns", "delete", n).Run()
	}
	return Namespaces(dir)
}
