package kubenode

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Addresses. Every node takes one slot s (0-31) of 198.19.128.0/17, which
// nothing else in the project uses (the local federation's pod networks are
// in 198.18.0.0/16, tests' namespaces count up from 198.19.1.0/24), and in
// it four /24s starting at 198.19.(128+4s).0:
//
//	+0  the link between the host and the node: host end .1, node .2
//	+1  the pod network (bridge cni0 at .1, pods from .2)
//	+2  the service network (kubernetes at .1, the cluster DNS at .10)
//	+3  kept free for the federation (gateway NodePorts, relays)
//
// All of it is inside 198.18.0.0/15; IPv6 is disabled in the node.
const maxSlots = 32

type addrs struct {
	slot                      int
	hostIP, nodeIP            string
	linkCIDR                  string
	podCIDR, podGateway       string
	serviceCIDR, apiServiceIP string
	dnsIP                     string
	netns, hostVeth, nodeVeth string
	netnsPath                 string
}

func slotAddrs(s int) addrs {
	t := 128 + 4*s
	a := addrs{
		slot:   s,
		hostIP: fmt.Sprintf("198.19.%d.1", t), nodeIP: fmt.Sprintf("198.19.%d.2", t),
		linkCIDR: fmt.Sprintf("198.19.%d.0/24", t),
		podCIDR:  fmt.Sprintf("198.19.%d.0/24", t+1), podGateway: fmt.Sprintf("198.19.%d.1", t+1),
		serviceCIDR: fmt.Sprintf("198.19.%d.0/24", t+2), apiServiceIP: fmt.Sprintf("198.19.%d.1", t+2),
		dnsIP:    fmt.Sprintf("198.19.%d.10", t+2),
		netns:    fmt.Sprintf("fedmesh-node%d", s),
		hostVeth: fmt.Sprintf("fmnode%dh", s),
		nodeVeth: fmt.Sprintf("fmnode%dn", s),
	}
	a.netnsPath = filepath.Join("/run/netns", a.netns)
	return a
}

// lockSlots serialises slot choice between nodes started at the same time
// (by this process or another); the returned function releases the lock.
func lockSlots() (func(), error) {
	if err := os.MkdirAll("/run/lock", 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile("/run/lock/fedmesh-kubenode.lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open slot lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock slots: %w", err)
	}
	return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

// freeSlot returns a slot no route, interface or network namespace uses.
// The caller holds the slot lock.
func freeSlot() (int, error) {
	routes, err := exec.Command("ip", "-4", "route", "show", "table", "all").Output()
	if err != nil {
		return 0, fmt.Errorf("ip route show: %w", err)
	}
	for s := range maxSlots {
		a := slotAddrs(s)
		if strings.Contains(string(routes), a.linkCIDR) {
			continue
		}
		if _, err := os.Stat(a.netnsPath); err == nil {
			continue
		}
		if _, err := net.InterfaceByName(a.hostVeth); err == nil {
			continue
		}
		return s, nil
	}
	return 0, fmt.Errorf("all %d node slots of 198.19.128.0/17 are in use", maxSlots)
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// createNetns makes the node's network namespace: IPv6 off, loopback up,
// forwarding on (it routes for its pods), and a veth pair to the host whose
// host end has IPv6 off too, so nothing but 198.19.(128+4s).0/24 is on the
// link. The service network is routed towards the host only so that a
// connection to a ClusterIP finds a route before kube-proxy's DNAT rewrites
// it; every ClusterIP has a rule, so no such packet leaves.
func createNetns(a addrs) error {
	if err := run("ip", "netns", "add", a.netns); err != nil {
		return err
	}
	inNode := func(script string) []string {
		return []string{"ip", "netns", "exec", a.netns, "sh", "-c", script}
	}
	steps := [][]string{
		inNode("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 && echo 1 > /proc/sys/net/ipv4/ip_forward"),
		{"ip", "link", "add", a.hostVeth, "type", "veth", "peer", "name", a.nodeVeth},
		{"sh", "-c", fmt.Sprintf("echo 1 > /proc/sys/net/ipv6/conf/%s/disable_ipv6", a.hostVeth)},
		{"ip", "link", "set", a.nodeVeth, "netns", a.netns},
		{"ip", "-n", a.netns, "link", "set", a.nodeVeth, "name", "eth0"},
		{"ip", "-n", a.netns, "link", "set", "lo", "up"},
		{"ip", "-n", a.netns, "addr", "add", a.nodeIP + "/24", "dev", "eth0"},
		{"ip", "-n", a.netns, "link", "set", "eth0", "up"},
		{"ip", "addr", "add", a.hostIP + "/24", "dev", a.hostVeth},
		{"ip", "link", "set", a.hostVeth, "up"},
		{"ip", "-n", a.netns, "route", "add", a.serviceCIDR, "via", a.hostIP},
	}
	// Pod-to-service traffic between two pods of the bridge needs the
	// bridge's frames to pass iptables; the switch is per network namespace
	// on this kernel, so setting it touches only the node.
	if _, err := os.Stat("/proc/sys/net/bridge/bridge-nf-call-iptables"); err == nil {
		steps = append(steps, inNode("test -w /proc/sys/net/bridge/bridge-nf-call-iptables && echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables || true"))
	}
	for _, s := range steps {
		if err := run(s[0], s[1:]...); err != nil {
			deleteNetns(a)
			return err
		}
	}
	return nil
}

// deleteNetns removes the namespace (and with it the veth pair, the bridge
// and every iptables rule kube-proxy wrote there).
func deleteNetns(a addrs) {
	exec.Command("ip", "netns", "delete", a.netns).Run()
	exec.Command("ip", "link", "delete", a.hostVeth).Run()
}

// inNetns runs fn on an OS thread that has joined the network namespace at
// path, and returns the thread to its own namespace afterwards. The thread
// must survive: a child started with Pdeathsig (every node daemon) is killed
// when the thread that forked it exits, and Go ends a thread whose goroutine
// exits locked. Only when the way back fails is the thread given up.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		own, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own network namespace: %w", err)
			return
		}
		defer own.Close()
		target, err := os.Open(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open network namespace %s: %w", path, err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter network namespace %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(own.Fd()), unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		} // else: stay locked, and the thread ends with this goroutine.
		errc <- ferr
	}()
	return <-errc
}
