package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/fedmesh/fedmesh/controlplane"

	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
)

type domain = gatewaytest.Domain

func TestHelp(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--help"}, io.Discard, &out); err != nil {
		t.Fatalf("--help: %v", err)
	}
	for _, want := range []string{"Usage: fedmesh-gateway", "-peer", "-dead-after", "-catalog", "-kubeconfig", "-in-cluster", "-peers-file FILE", "-namespace", "-rtt-publish-interval", "multicluster.fedmesh.dev/peer-rtt", "fedmesh-tunnel/1"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("--help lacks %q", want)
		}
	}
}

func TestFlagErrors(t *testing.T) {
	badPeers := filepath.Join(t.TempDir(), "peers")
	if err := os.WriteFile(badPeers, []byte("# peers\nwest=192.0.2.1:15443\nnorth\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	goodPeers := filepath.Join(t.TempDir(), "peers")
	if err := os.WriteFile(goodPeers, []byte("west=192.0.2.1:15443\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	for _, tc := range []struct {
		name string
		args []string
		want string
		env  string // KUBERNETES_SERVICE_HOST
	}{
		{"no cluster", []string{"--catalog", "x"}, "--cluster is required", ""},
		{"no catalog", []string{"--cluster", "east"}, "exactly one of --kubeconfig, --in-cluster and --catalog (see --help)", ""},
		{"no catalog in a pod", []string{"--cluster", "east"}, "in a pod, --in-cluster uses its service account", "10.96.0.1"},
		{"both catalogs", []string{"--cluster", "east", "--catalog", "a", "--kubeconfig", "b"}, "exactly one", ""},
		{"in-cluster and catalog", []string{"--cluster", "east", "--catalog", "a", "--in-cluster"}, "exactly one", ""},
		{"in-cluster and kubeconfig", []string{"--cluster", "east", "--kubeconfig", "a", "--in-cluster"}, "exactly one", ""},
		{"in-cluster outside a pod", []string{"--cluster", "east", "--in-cluster"}, "--in-cluster: unable to load in-cluster configuration", ""},
		{"missing kubeconfig", []string{"--cluster", "east", "--kubeconfig", "/nonexistent/kubeconfig"}, "load kubeconfig /nonexistent/kubeconfig", ""},
		{"missing peers file", []string{"--cluster", "east", "--catalog", "a", "--peers-file", "/nonexistent/peers"}, "no such file", ""},
		{"bad peers file line", []string{"--cluster", "east", "--catalog", "a", "--peers-file", badPeers}, "line 3: want CLUSTER[@TRUST_DOMAIN]=HOST:PORT", ""},
		{"two peers files", []string{"--cluster", "east", "--catalog", "a", "--peers-file", goodPeers, "--peers-file", goodPeers}, "given twice", ""},
		{"negative rtt interval", []string{"--cluster", "east", "--catalog", "a", "--rtt-publish-interval", "-1s"}, "--rtt-publish-interval -1s is negative", ""},
		{"bad peer", []string{"--cluster", "east", "--catalog", "a", "--peer", "west"}, "CLUSTER[@TRUST_DOMAIN]=HOST:PORT", ""},
		{"bad peer addr", []string{"--cluster", "east", "--catalog", "a", "--peer", "west=nohost"}, "want HOST:PORT", ""},
		{"bad duration", []string{"--cluster", "east", "--catalog", "a", "--dead-after", "soon"}, "dead-after", ""},
		{"stray argument", []string{"--cluster", "east", "--catalog", "a", "extra"}, "unexpected arguments", ""},
		{"missing catalog file", []string{"--cluster", "east", "--catalog", "/nonexistent/c.json"}, "read catalog", ""},
		{"bad log level", []string{"--cluster", "east", "--catalog", "a", "--log-level", "loud"}, "--log-level", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("KUBERNETES_SERVICE_HOST", tc.env)
			err := run(context.Background(), tc.args, io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestPeersFile reads peers from a file, after and beside --peer flags.
func TestPeersFile(t *testing.T) {
	f := filepath.Join(t.TempDir(), "peers")
	if err := os.WriteFile(f, []byte("# written by kind-e2e.sh\n\n  west=192.0.2.10:15443,192.0.2.11:15443  # two replicas\nnorth@north.example=[2001:db8::7]:15443\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	o, err := parse([]string{"--cluster", "east", "--catalog", "c.json", "--peer", "south=198.51.100.1:15443", "--peers-file", f}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString
	want := peerFlags{
		{Cluster: "south", TrustDomain: td("south.fedmesh.test"), Addrs: []string{"198.51.100.1:15443"}},
		{Cluster: "west", TrustDomain: td("west.fedmesh.test"), Addrs: []string{"192.0.2.10:15443", "192.0.2.11:15443"}},
		{Cluster: "north", TrustDomain: td("north.example"), Addrs: []string{"[2001:db8::7]:15443"}},
	}
	if diff := cmp.Diff(want, o.peers, cmp.Comparer(func(a, b spiffeid.TrustDomain) bool { return a == b })); diff != "" {
		t.Fatalf("peers (-want +got):\n%s", diff)
	}
}

func TestPodNamespace(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct{ name, file, want string }{
		{"in a pod", write("ns", "mesh-gateways\n"), "mesh-gateways"},
		{"empty file", write("empty", " \n"), "fedmesh-system"},
		{"outside a pod", filepath.Join(dir, "missing"), "fedmesh-system"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := podNamespace(tc.file); got != tc.want {
				t.Fatalf("podNamespace(%s) = %q, want %q", tc.file, got, tc.want)
			}
		})
	}
	o, err := parse([]string{"--cluster", "east", "--catalog", "c.json", "--namespace", "gw"}, io.Discard)
	if err != nil || o.namespace != "gw" {
		t.Fatalf("--namespace gw: %q, %v", o.namespace, err)
	}
}

// TestProcesses runs two gateway processes (this binary's main) with SVIDs
// from real issuers, carries a TCP conversation through them, reads the
// admin state, and stops both with SIGTERM.
func TestProcesses(t *testing.T) {
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	west, east := startPair(t, doms, "shop/checkout:80="+ln.Addr().String())
	client, err := gateway.NewClient(doms["west"].Source(t, "web"), doms["west"].ID("gateway"), west.addrs["egress"])
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	var st gateway.State
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + west.addrs["admin"] + "/state")
		if err == nil {
			st = gateway.State{}
			_ = json.NewDecoder(resp.Body).Decode(&st)
			resp.Body.Close()
			if len(st.Clusters) == 1 && st.Clusters[0].Up {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("west never reported east up: %+v, %v", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo %q, %v", buf, err)
	}
	c.Close()
	if _, err := client.Dial(ctx, tunnel.Request{Cluster: "east", Namespace: "shop", Service: "cart", Port: 80}); err == nil || !strings.Contains(err.Error(), "not_exported") {
		t.Errorf("cart: %v, want not_exported", err)
	}

	resp, err := http.Get("http://" + east.addrs["admin"] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `fedmesh_gateway_streams_total{direction="ingress",result="not_exported"} 1`) {
		t.Errorf("east metrics lack the not_exported stream:\n%s", grep(string(body), "fedmesh_gateway_streams_total"))
	}
	for name, ch := range map[string]*child{"west": west, "east": east} {
		if err := ch.terminate(t); err != nil {
			t.Errorf("%s exit after SIGTERM: %v", name, err)
		}
	}
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestKubeconfigProcess runs west's gateway process against a real
// kube-apiserver (--kubeconfig, --namespace, --rtt-publish-interval) with
// its peer from --peers-file: it publishes its RTT to east on the Service
// fedmesh-gateway, and exits 0 on SIGTERM.
func TestKubeconfigProcess(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"west"}})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	kube := kubernetes.NewForConfigOrDie(cp.Cluster("west").Config)
	const ns = controlplane.SystemNamespace
	if _, err := kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: gateway.ServiceName},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "egress", Protocol: corev1.ProtocolTCP, Port: 15444}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	east := startChild(t, "gateway", "--cluster", "east", "--spiffe-socket", doms["east"].Addr("gateway"),
		"--tunnel-addr", "127.0.0.1:0", "--egress-addr", "", "--admin-addr", "",
		"--catalog", writeCatalog(t), "--federate", "west.fedmesh.test", "--log-level", "warn")
	peers := filepath.Join(t.TempDir(), "peers")
	if err := os.WriteFile(peers, []byte("# the kind ConfigMap's shape\neast="+east.addrs["tunnel"]+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	west := startChild(t, "gateway", "--cluster", "west", "--spiffe-socket", doms["west"].Addr("gateway"),
		"--tunnel-addr", "127.0.0.1:0", "--egress-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
		"--kubeconfig", cp.Cluster("west").Kubeconfig, "--namespace", ns, "--rtt-publish-interval", "200ms",
		"--peers-file", peers, "--log-level", "warn")

	var value string
	deadline := time.Now().Add(20 * time.Second)
	for {
		svc, err := kube.CoreV1().Services(ns).Get(ctx, gateway.ServiceName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		value = svc.Annotations[gateway.AnnotationPeerRTT]
		var rtts map[string]int64
		if json.Unmarshal([]byte(value), &rtts) == nil && len(rtts) == 1 && rtts["east"] > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("annotation %s=%q after 20s, want east's RTT", gateway.AnnotationPeerRTT, value)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%s: %s", gateway.AnnotationPeerRTT, value)
	for name, ch := range map[string]*child{"west": west, "east": east} {
		if err := ch.terminate(t); err != nil {
			t.Errorf("%s exit after SIGTERM: %v", name, err)
		}
	}
}
