package sidecar_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/fedmesh/fedmesh/federation/discovery"
	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/injector"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar"
)

// fakeController is a discovery API source with fixed endpoint sets and a
// fixed service directory (the federation package tests the controller's
// own, against a real API server).
type fakeController struct {
	sets map[string]*pb.EndpointSet
	dir  *pb.Directory
}

func (f *fakeController) Snapshot(ns, name string) (*pb.EndpointSet, error) {
	if s := f.sets[ns+"/"+name]; s != nil {
		return s, nil
	}
	return &pb.EndpointSet{Namespace: ns, Service: name, LocalCluster: "west"}, nil
}

func (f *fakeController) Directory() (*pb.Directory, error) {
	if f.dir == nil {
		return nil, status.Error(codes.Unavailable, "no directory")
	}
	return f.dir, nil
}

// podNetns is a network namespace standing for a pod: a veth pair to the
// host (host end .1, pod .2 of a 198.19.x.0/24 no route uses yet) and a
// default route through the host.
type podNetns struct {
	name, hostIf  string
	prefix        string // "198.19.N."
	prefix6       string // "fd00:fe19:N::", the pod's IPv6 /64 (never leaves the namespace)
	hostIP, podIP string
	path          string // /run/netns/<name>
}

func needTransparentPrereqs(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("transparent mode needs Linux")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and installs nftables rules in it")
	}
	for _, bin := range []string{"ip", "setpriv"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s (scripts/install-deps.sh installs iproute2): %v", bin, err)
		}
	}
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// redirect runs the injector's own init container, the fedmesh-init
// binary built as `make build` builds it, with the arguments the injector
// gives it, in the pod's namespace: the admin port 15000 is exempt from
// the inbound redirect (as the probe port is) so that tests can read the
// sidecar's state and metrics. It returns the injector's configuration.
func redirect(t *testing.T, ns *podNetns) injector.Config {
	t.Helper()
	inj := injector.Config{ExcludeInboundPorts: []int32{15000}}
	if err := inj.Validate(); err != nil {
		t.Fatal(err)
	}
	bin, err := testutil.BuildCommand(t.TempDir(), "fedmesh-init")
	if err != nil {
		t.Fatal(err)
	}
	mustRun(t, "ip", append([]string{"netns", "exec", ns.name, bin}, inj.InitArgs()...)...)
	return inj
}

func newPodNetns(t *testing.T) *podNetns {
	t.Helper()
	routes, err := exec.Command("ip", "-4", "route", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	third := -1
	for i := 200; i < 256; i++ {
		if !strings.Contains(string(routes), fmt.Sprintf("198.19.%d.0/24", i)) {
			third = i
			break
		}
	}
	if third < 0 {
		t.Fatal("no free 198.19.x.0/24")
	}
	n := &podNetns{
		name:    fmt.Sprintf("fmtp-%d-%d", os.Getpid(), third),
		hostIf:  fmt.Sprintf("fmtp%dh", third),
		prefix:  fmt.Sprintf("198.19.%d.", third),
		prefix6: fmt.Sprintf("fd00:fe19:%x::", third),
	}
	n.hostIP, n.podIP, n.path = n.prefix+"1", n.prefix+"2", "/run/netns/"+n.name
	peer := fmt.Sprintf("fmtp%dn", third)
	t.Cleanup(func() {
		exec.Command("ip", "netns", "delete", n.name).Run()
		exec.Command("ip", "link", "delete", n.hostIf).Run()
	})
	mustRun(t, "ip", "netns", "add", n.name)
	mustRun(t, "ip", "link", "add", n.hostIf, "type", "veth", "peer", "name", peer)
	mustRun(t, "ip", "link", "set", peer, "netns", n.name)
	mustRun(t, "ip", "addr", "add", n.hostIP+"/24", "dev", n.hostIf)
	mustRun(t, "ip", "link", "set", n.hostIf, "up")
	mustRun(t, "ip", "-n", n.name, "link", "set", "lo", "up")
	mustRun(t, "ip", "-n", n.name, "addr", "add", n.podIP+"/24", "dev", peer)
	mustRun(t, "ip", "-n", n.name, "addr", "add", n.prefix6+"2/64", "dev", peer, "nodad")
	mustRun(t, "ip", "-n", n.name, "link", "set", peer, "up")
	mustRun(t, "ip", "-n", n.name, "route", "add", "default", "via", n.hostIP)
	return n
}

// dial connects over TCP from inside the namespace (within 5 s), as the
// pod's app would.
func (n *podNetns) dial(addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return n.dialNet(ctx, "tcp", addr)
}

// dialNet dials from inside the namespace, as the pod's app would (as
// root, so its traffic is redirected): the socket is made on a thread
// moved into the namespace, and that thread is thrown away afterwards.
func (n *podNetns) dialNet(ctx context.Context, network, addr string) (net.Conn, error) {
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		f, err := os.Open(n.path)
		if err != nil {
			ch <- res{nil, err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- res{nil, fmt.Errorf("setns: %w", err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		ch <- res{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func (n *podNetns) httpClient() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true, // one redirected connection per request
		DialContext:       func(_ context.Context, _, addr string) (net.Conn, error) { return n.dial(addr) },
	}}
}

// startEcho runs a TCP server that answers every line with prefix+line.
func startEcho(t *testing.T, addr, prefix string) (net.Listener, chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	peers := make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			select {
			case peers <- c.RemoteAddr().String():
			default:
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := io.WriteString(c, prefix+line); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln, peers
}

func echoOnce(c net.Conn, line string) (string, error) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return "", err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSuffix(got, "\n"), err
}

// TestTransparentOutbound runs the fedmesh-sidecar binary in a pod-like
// network namespace with the injector's own redirect (fedmesh-init) installed, as
// UID 1337 (the injector's ProxyUID), with its endpoint sets and service
// directory from a discovery API server over SPIFFE mTLS. The app (this
// test, dialing from inside the namespace as root) calls services by
// virtual IPs only: a Service's cluster IPs (IPv4 and IPv6) and a
// ServiceImport's clusterset IP reach the HTTP backend through the server's sidecar (mTLS inbound),
// a tcp- port reaches a TCP backend the same way, an unknown destination is
// passed through unchanged, and a connection to the sidecar's own port is
// refused rather than looped.
func TestTransparentOutbound(t *testing.T) {
	testutil.CheckGoroutines(t)
	needTransparentPrereqs(t)
	ns := newPodNetns(t)

	redirect(t, ns)

	doms := gatewaytest.Start(t, []string{"west"}, nil)
	west := doms["west"]
	// The sidecar runs as 1337: let it reach its Workload API socket.
	if err := os.Chmod(filepath.Dir(west.Socket("web")), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(west.Socket("web"), 0o777); err != nil {
		t.Fatal(err)
	}

	// Backends in the host's namespace, reached through the veth pair:
	// an HTTP app and a TCP echo app, each behind a server sidecar.
	checkout := startApp(t, "checkout", "")
	checkoutSC := startSidecar(t, "checkout", sidecar.Config{Cluster: "west", TrustDomain: west.TD,
		Source: west.Source(t, "web"), InboundAddr: ns.hostIP + ":0", AppAddr: checkout.addr()})
	dbApp, _ := startEcho(t, "127.0.0.1:0", "db:")
	dbSC := startSidecar(t, "db", sidecar.Config{Cluster: "west", TrustDomain: west.TD,
		Source: west.Source(t, "web"), InboundAddr: ns.hostIP + ":0", AppAddr: dbApp.Addr().String()})
	// Something outside the mesh, not in the directory.
	plain, plainPeers := startEcho(t, ns.hostIP+":0", "plain:")

	endpointSet := func(name, port string, svcPort int32, sc *runningSidecar) *pb.EndpointSet {
		_, p, _ := net.SplitHostPort(sc.InboundAddr().String())
		target, _ := strconv.Atoi(p)
		return &pb.EndpointSet{Namespace: "shop", Service: name, LocalCluster: "west",
			Ports: []*pb.Port{{Name: port, Protocol: "TCP", Port: svcPort}},
			Clusters: []*pb.Cluster{{Name: "west", Local: true, Ready: 1, Total: 1, Endpoints: []*pb.Endpoint{{
				Address: ns.hostIP, Ready: true, Serving: true, Ports: []*pb.Port{{Name: port, Protocol: "TCP", Port: int32(target)}}}}}}}
	}
	vipSvc, vipImport, vipDB, vipGarbage := ns.prefix+"200", ns.prefix+"201", ns.prefix+"202", ns.prefix+"203"
	vipSvc6 := ns.prefix6 + "c8" // the Service is dual-stack
	ctrl := &fakeController{
		sets: map[string]*pb.EndpointSet{
			"shop/checkout": endpointSet("checkout", "http", 80, checkoutSC),
			"shop/db":       endpointSet("db", "tcp-postgres", 5432, dbSC),
		},
		dir: &pb.Directory{LocalCluster: "west", Version: 1, Services: []*pb.VirtualService{
			{Namespace: "shop", Name: "checkout", Ips: []string{vipSvc, vipSvc6}, Ports: []*pb.Port{{Name: "http", Protocol: "TCP", Port: 80}}},
			{Namespace: "shop", Name: "checkout", Imported: true, Ips: []string{vipImport}, Ports: []*pb.Port{{Name: "http", Protocol: "TCP", Port: 80}}},
			{Namespace: "shop", Name: "db", Ips: []string{vipDB}, Ports: []*pb.Port{{Name: "tcp-postgres", Protocol: "TCP", Port: 5432}}},
			{Namespace: "shop", Name: "garbage", Ips: []string{"not-an-ip", vipGarbage}, Ports: []*pb.Port{{Name: "http", Protocol: "TCP", Port: 80}}},
		}},
	}
	discoAddr := startFakeDiscovery(t, ns, west, ctrl)

	logs, admin := startNetnsSidecar(t, ns, west, discoAddr, true)

	client := ns.httpClient()
	get := func(url string) (string, error) {
		resp, err := client.Get(url)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("status %d (%s)", resp.StatusCode, resp.Header.Get("X-Fedmesh-Error"))
		}
		return resp.Header.Get("X-Served-By"), nil
	}
	t.Run("service cluster IP", func(t *testing.T) {
		for i := range 5 {
			by, err := get("http://" + vipSvc + "/")
			if err != nil || by != "checkout" {
				t.Fatalf("request %d to %s: served by %q, %v", i, vipSvc, by, err)
			}
		}
	})
	t.Run("service IPv6 cluster IP", func(t *testing.T) {
		by, err := get("http://[" + vipSvc6 + "]/")
		if err != nil || by != "checkout" {
			t.Fatalf("request to %s: served by %q, %v", vipSvc6, by, err)
		}
	})
	t.Run("import clusterset IP", func(t *testing.T) {
		by, err := get("http://" + vipImport + "/")
		if err != nil || by != "checkout" {
			t.Fatalf("request to %s: served by %q, %v", vipImport, by, err)
		}
	})
	if n := metricSum(t, checkoutSC.reg, "fedmesh_sidecar_inbound_connections_total"); n < 1 {
		t.Errorf("checkout's sidecar accepted %v mTLS connections", n)
	}
	if n := strings.Count(logs.String(), `"transparent upstream started","upstream":"shop/checkout:80"`); n != 1 {
		t.Errorf("the upstream of shop/checkout:80 was started %d times, want once (both IPs, every connection)", n)
	}
	t.Run("tcp port", func(t *testing.T) {
		c, err := ns.dial(vipDB + ":5432")
		if err != nil {
			t.Fatal(err)
		}
		if got, err := echoOnce(c, "select 1"); err != nil || got != "db:select 1" {
			t.Fatalf("echo through db: %q, %v", got, err)
		}
		if n := metricSum(t, dbSC.reg, "fedmesh_sidecar_inbound_connections_total"); n < 1 {
			t.Errorf("db's sidecar accepted %v mTLS connections", n)
		}
	})
	t.Run("passthrough", func(t *testing.T) {
		c, err := ns.dial(plain.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if got, err := echoOnce(c, "hello"); err != nil || got != "plain:hello" {
			t.Fatalf("passthrough echo: %q, %v", got, err)
		}
		// The sidecar dialed it from the pod's address, as the app would.
		if from := <-plainPeers; !strings.HasPrefix(from, ns.podIP+":") {
			t.Errorf("plain server saw %s, want the pod address %s", from, ns.podIP)
		}
	})
	t.Run("no loop", func(t *testing.T) {
		for _, addr := range []string{"127.0.0.1:15001", ns.podIP + ":15001"} {
			c, err := ns.dial(addr)
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, "x\n")
			n, err := c.Read(make([]byte, 1))
			c.Close()
			if n != 0 || err == nil {
				t.Errorf("%s: read %d bytes, %v; want the connection closed", addr, n, err)
			}
		}
	})
	metrics := scrape(t, "http://"+admin+"/metrics")
	for _, want := range []string{
		`fedmesh_sidecar_transparent_connections_total{result="service"} 8`,
		`fedmesh_sidecar_transparent_connections_total{result="passthrough"} 1`,
		`fedmesh_sidecar_transparent_connections_total{result="loop"} 2`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s:\n%s", want, grepLines(metrics, "transparent"))
		}
	}
	if n := strings.Count(logs.String(), "service directory entry skipped"); n != 1 {
		t.Errorf("garbage entry logged %d times, want once", n)
	}
	// /state lists the upstreams the transparent listener made, with
	// their protocol; /ready is 200 (the directory arrived).
	var st sidecar.State
	if err := json.Unmarshal([]byte(scrape(t, "http://"+admin+"/state")), &st); err != nil {
		t.Fatal(err)
	}
	var transparent []string
	for _, u := range st.Upstreams {
		if u.Transparent {
			transparent = append(transparent, u.Upstream+","+u.Protocol)
		}
	}
	if len(transparent) < 2 {
		t.Errorf("/state lists transparent upstreams %v, want the service ports called above", transparent)
	}
	if resp, err := http.Get("http://" + admin + "/ready"); err != nil || resp.StatusCode != 200 {
		t.Errorf("/ready: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
}

func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func grepLines(s, sub string) string {
	var out bytes.Buffer
	for l := range strings.SplitSeq(s, "\n") {
		if strings.Contains(l, sub) {
			out.WriteString(l + "\n")
		}
	}
	return out.String()
}

// buildSidecarBinary builds cmd/fedmesh-sidecar where UID 1337 can run it.
func buildSidecarBinary(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fmtp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin, err := testutil.BuildCommand(dir, "fedmesh-sidecar") // as `make build` builds it
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// startFakeDiscovery serves ctrl's sets and directory as a discovery API
// over SPIFFE mTLS on the host end of the namespace's veth pair.
func startFakeDiscovery(t *testing.T, ns *podNetns, west *gatewaytest.Domain, ctrl *fakeController) string {
	t.Helper()
	ln, err := net.Listen("tcp", ns.hostIP+":0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(mtls.ServerConfig(west.Source(t, "gateway"), mtls.MemberOf(west.TD)))))
	pb.RegisterDiscoveryServer(srv, discovery.NewServer(ctrl, nil, nil))
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return ln.Addr().String()
}

// startNetnsSidecar runs the fedmesh-sidecar binary in the namespace with
// the injector's flags, as UID 1337 (the UID the redirect exempts) or, to
// show what a wrong UID does, as root. It returns its logs and its admin
// address (on the pod address, port 15000, which the redirect exempts).
func startNetnsSidecar(t *testing.T, ns *podNetns, west *gatewaytest.Domain, discoAddr string, asProxyUID bool) (*testutil.SyncBuffer, string) {
	t.Helper()
	// The sidecar may run as 1337: let it reach its Workload API socket.
	if err := os.Chmod(filepath.Dir(west.Socket("web")), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(west.Socket("web"), 0o777); err != nil {
		t.Fatal(err)
	}
	bin := buildSidecarBinary(t)
	admin := ns.podIP + ":15000"
	args := []string{"netns", "exec", ns.name}
	if asProxyUID {
		args = append(args, "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups")
	}
	args = append(args, bin, "--cluster", "west", "--workload-api", west.Addr("web"), "--discovery", discoAddr,
		"--outbound-port", "15001", "--admin", admin, "--log-level", "debug")
	logs, exited := testutil.Start(t, exec.Command("ip", args...), "transparent sidecar")
	waitFor(t, "the sidecar's admin endpoint", 30*time.Second, func() bool {
		select {
		case <-exited:
			t.Fatalf("sidecar exited:\n%s", logs.String())
		default:
		}
		resp, err := http.Get("http://" + admin + "/live")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return logs, admin
}

// TestTransparentOwnTrafficRedirected runs the sidecar as root, whose
// traffic the injector's rules do redirect: every dial of its own (its
// discovery API connection, the passthrough of the app's connection) comes
// back to itself, is recognized by its source port and refused, so
// connections end instead of looping, and the cause is logged once.
func TestTransparentOwnTrafficRedirected(t *testing.T) {
	testutil.CheckGoroutines(t)
	needTransparentPrereqs(t)
	ns := newPodNetns(t)
	redirect(t, ns)
	west := gatewaytest.Start(t, []string{"west"}, nil)["west"]
	discoAddr := startFakeDiscovery(t, ns, west, &fakeController{dir: &pb.Directory{LocalCluster: "west", Version: 1}})
	plain, _ := startEcho(t, ns.hostIP+":0", "plain:")
	logs, admin := startNetnsSidecar(t, ns, west, discoAddr, false)

	for i := range 2 { // each waits 5 s for a directory that cannot come
		c, err := ns.dial(plain.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if got, err := echoOnce(c, "hello"); err == nil {
			t.Fatalf("attempt %d: %q came back through a sidecar whose own traffic is redirected", i, got)
		}
	}
	metrics := scrape(t, "http://"+admin+"/metrics")
	var loops float64
	for l := range strings.SplitSeq(metrics, "\n") {
		if v, ok := strings.CutPrefix(l, `fedmesh_sidecar_transparent_connections_total{result="loop"} `); ok {
			loops, _ = strconv.ParseFloat(v, 64)
		}
	}
	if loops < 2 {
		t.Errorf("want at least 2 loops refused (the app's two connections):\n%s", grepLines(metrics, "transparent"))
	}
	if n := strings.Count(logs.String(), "redirected back to it"); n != 1 {
		t.Errorf("the cause was logged %d times, want once", n)
	}
}
