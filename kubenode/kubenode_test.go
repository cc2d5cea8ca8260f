package kubenode

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/fedmesh/fedmesh/internal/ociimage"
)

// tWriter sends a logger's lines to the test log.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// buildStatic builds a command of this module as a static binary.
func buildStatic(t *testing.T, dir, pkg string) string {
	t.Helper()
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "github.com/fedmesh/fedmesh/"+pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v: %s", pkg, err, b)
	}
	return out
}

// hostState is what the node must not change on the host: the kernel
// settings the kubelet wants changed, and the host's iptables as far as
// kube-proxy, the kubelet or the CNI plugins would touch them (their chains
// are KUBE-*, CNI-*; other packages' tests may run beside this one and
// change other rules).
func hostState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command(save).Output()
		if err != nil {
			continue
		}
		for l := range strings.SplitSeq(string(out), "\n") {
			if (strings.Contains(l, "KUBE-") || strings.Contains(l, "CNI-") || strings.Contains(l, "cni0")) && !strings.HasPrefix(l, "#") {
				b.WriteString(l + "\n")
			}
		}
	}
	keys := make([]string, 0, len(kernelDefaults))
	for k := range kernelDefaults {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v, _ := os.ReadFile("/proc/sys/" + k)
		fmt.Fprintf(&b, "%s=%s", k, v)
	}
	return b.String()
}

// TestNodeServesPodsThroughServicesAndDNS starts a real single-node
// cluster, runs fedmesh-echo from a locally imported image, reaches it
// through its ClusterIP (kube-proxy's rules) and through its DNS name
// (CoreDNS) from inside the node, and checks that Stop leaves nothing
// behind and that the host's iptables and kernel settings never changed.
func TestNodeServesPodsThroughServicesAndDNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: a kubernetes node needs root (network namespaces, cgroups, mounts, containerd)")
	}
	tmp := t.TempDir()
	pause := buildStatic(t, tmp, "cmd/fedmesh-pause")
	if _, err := FindBinaries("", pause); err != nil {
		t.Skipf("skipped: %v", err)
	}
	echo := buildStatic(t, tmp, "cmd/fedmesh-echo")
	echoImage := filepath.Join(tmp, "fedmesh.tar")
	if err := ociimage.WriteFile(echoImage, ociimage.Image{
		Name: "ghcr.io/fedmesh/fedmesh:dev", User: "65532:65532",
		Entrypoint: []string{"/usr/local/bin/fedmesh-echo"},
		Files:      []ociimage.File{{Path: "usr/local/bin/fedmesh-echo", Source: echo}},
	}); err != nil {
		t.Fatal(err)
	}
	before := hostState(t)

	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(tWriter{t}, nil))
	start := time.Now()
	n, err := Start(ctx, Options{Name: "smoke", Pause: pause, Images: []string{echoImage}, Logger: log})
	if err != nil {
		t.Fatalf("start node: %v", err)
	}
	stopped := false
	t.Cleanup(func() {
		if t.Failed() && !stopped {
			logs, _ := filepath.Glob(filepath.Join(n.Dir, "logs", "*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				lines := strings.Split(strings.TrimSpace(string(b)), "\n")
				t.Logf("--- last lines of %s:\n%s", filepath.Base(l), strings.Join(lines[max(0, len(lines)-15):], "\n"))
			}
		}
		if !stopped {
			if err := n.Stop(); err != nil {
				t.Errorf("stop node: %v", err)
			}
		}
	})
	ready := time.Since(start)
	t.Logf("node %s Ready with CoreDNS in %s (apiserver https://%s:6443, pods %s, services %s)", n.Name, ready.Round(time.Millisecond), n.NodeIP, n.PodCIDR, n.ServiceCIDR)

	cs, err := n.Client()
	if err != nil {
		t.Fatal(err)
	}
	svcIP := runEcho(ctx, t, n, cs)

	// Through kube-proxy: the ClusterIP, from the node.
	body := getInNode(ctx, t, n, net.JoinHostPort(svcIP, "80"))
	var ans struct{ Cluster, Pod string }
	if err := json.Unmarshal(body, &ans); err != nil || ans.Pod != "echo" || ans.Cluster != "smoke" {
		t.Fatalf("echo through ClusterIP %s answered %q (%v), want pod echo of cluster smoke", svcIP, body, err)
	}
	t.Logf("ClusterIP %s:80 -> %s", svcIP, body)

	// Through CoreDNS: the name, from the node.
	const name = "echo.default.svc.cluster.local."
	resolved := lookupInNode(ctx, t, n, name)
	if resolved != svcIP {
		t.Fatalf("CoreDNS at %s resolved %s to %s, want the ClusterIP %s", n.DNSIP, name, resolved, svcIP)
	}
	body = getInNode(ctx, t, n, net.JoinHostPort(resolved, "80"))
	if !strings.Contains(string(body), `"pod":"echo"`) {
		t.Fatalf("echo by DNS name answered %q", body)
	}
	t.Logf("%s -> %s (CoreDNS %s) -> %s", name, resolved, n.DNSIP, body)

	// Memory of everything the node runs.
	byName := map[string]int64{}
	var total int64
	procs := n.Processes()
	for _, p := range procs {
		byName[p.Name] += p.RSS
		total += p.RSS
	}
	names := make([]string, 0, len(byName))
	for k := range byName {
		names = append(names, k)
	}
	slices.SortFunc(names, func(a, b string) int { return int(byName[b] - byName[a]) })
	var parts []string
	for _, k := range names {
		parts = append(parts, fmt.Sprintf("%s %d MiB", k, byName[k]>>20))
	}
	t.Logf("node RSS: %d MiB in %d processes: %s", total>>20, len(procs), strings.Join(parts, ", "))
	for _, s := range n.Timings {
		t.Logf("start step %6s  %s", s.Took.Round(10*time.Millisecond), s.Step)
	}

	dir, netns := n.Dir, n.NetNS
	stopStart := time.Now()
	stopped = true
	if err := n.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	t.Logf("stopped in %s", time.Since(stopStart).Round(time.Millisecond))
	if left := n.Leftovers(); len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
	for _, p := range procs {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", p.PID)); err == nil {
			if cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.PID)); strings.Contains(string(cmd), dir) || strings.Contains(string(cmd), "fedmesh") {
				t.Errorf("process %d (%s) of the node still runs", p.PID, p.Name)
			}
		}
	}
	if _, err := os.Stat(netns); err == nil {
		t.Errorf("network namespace %s still exists", netns)
	}
	if after := hostState(t); after != before {
		t.Errorf("the host's iptables or kernel settings changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// runEcho runs fedmesh-echo as a pod from the imported image (never
// pulled) behind a ClusterIP Service, and returns the Service's address.
func runEcho(ctx context.Context, t *testing.T, n *Node, cs kubernetes.Interface) string {
	t.Helper()
	labels := map[string]string{"app": "echo"}
	_, err := cs.CoreV1().Pods("default").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Labels: labels},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name: "echo", Image: "ghcr.io/fedmesh/fedmesh:dev", ImagePullPolicy: corev1.PullNever,
				Args:           []string{"-listen", ":8080", "-cluster", n.Name},
				Ports:          []corev1.ContainerPort{{ContainerPort: 8080}},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(8080)}}, PeriodSeconds: 1},
			}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create echo pod: %v", err)
	}
	svc, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create echo service: %v", err)
	}
	_, svcNet, _ := net.ParseCIDR(n.ServiceCIDR)
	if !svcNet.Contains(net.ParseIP(svc.Spec.ClusterIP)) {
		t.Fatalf("ClusterIP %s is outside the node's service CIDR %s", svc.Spec.ClusterIP, n.ServiceCIDR)
	}
	start := time.Now()
	var pod *corev1.Pod
	err = waitFor(ctx, 2*time.Minute, nil, func() error {
		pod, err = cs.CoreV1().Pods("default").Get(ctx, "echo", metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range pod.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return errors.New(podState(pod))
	})
	if err != nil {
		t.Fatalf("echo pod not ready: %v", err)
	}
	_, podNet, _ := net.ParseCIDR(n.PodCIDR)
	if !podNet.Contains(net.ParseIP(pod.Status.PodIP)) {
		t.Fatalf("pod IP %s is outside the node's pod CIDR %s", pod.Status.PodIP, n.PodCIDR)
	}
	t.Logf("echo pod Ready at %s in %s", pod.Status.PodIP, time.Since(start).Round(time.Millisecond))
	return svc.Spec.ClusterIP
}

// getInNode sends GET / to addr from the node's network namespace, retrying
// while kube-proxy has not written the Service's rules yet.
func getInNode(ctx context.Context, t *testing.T, n *Node, addr string) []byte {
	t.Helper()
	var body []byte
	err := waitFor(ctx, 30*time.Second, nil, func() error {
		return n.InNode(func() error {
			// Dialled on this goroutine, so the socket is the node's.
			c, err := net.DialTimeout("tcp", addr, 2*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"); err != nil {
				return err
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("status %s", resp.Status)
			}
			body, err = io.ReadAll(resp.Body)
			return err
		})
	})
	if err != nil {
		t.Fatalf("GET http://%s/ from the node: %v", addr, err)
	}
	return []byte(strings.TrimSpace(string(body)))
}

// lookupInNode asks the cluster DNS (the kube-dns ClusterIP, so through
// kube-proxy to CoreDNS) for name's A record from the node.
func lookupInNode(ctx context.Context, t *testing.T, n *Node, name string) string {
	t.Helper()
	var got string
	err := waitFor(ctx, 30*time.Second, nil, func() error {
		return n.InNode(func() error {
			q := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 0xfed, RecursionDesired: true})
			if err := q.StartQuestions(); err != nil {
				return err
			}
			if err := q.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}); err != nil {
				return err
			}
			msg, err := q.Finish()
			if err != nil {
				return err
			}
			c, err := net.Dial("udp", net.JoinHostPort(n.DNSIP, "53"))
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write(msg); err != nil {
				return err
			}
			buf := make([]byte, 1500)
			k, err := c.Read(buf)
			if err != nil {
				return err
			}
			var p dnsmessage.Parser
			h, err := p.Start(buf[:k])
			if err != nil {
				return err
			}
			if h.RCode != dnsmessage.RCodeSuccess {
				return fmt.Errorf("rcode %s", h.RCode)
			}
			if err := p.SkipAllQuestions(); err != nil {
				return err
			}
			for {
				ah, err := p.AnswerHeader()
				if err != nil {
					return fmt.Errorf("no A record: %w", err)
				}
				if ah.Type != dnsmessage.TypeA {
					if err := p.SkipAnswer(); err != nil {
						return err
					}
					continue
				}
				a, err := p.AResource()
				if err != nil {
					return err
				}
				got = net.IP(a.A[:]).String()
				return nil
			}
		})
	})
	if err != nil {
		t.Fatalf("look up %s at %s from the node: %v", name, n.DNSIP, err)
	}
	return got
}
