package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/identity/mtls"
	"github.com/fedmesh/fedmesh/injector"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/sidecar/appprobe"
)

// TestPortFlags: the injector's flags (--inbound-port, --outbound-port)
// are understood, and the combinations that cannot work are refused
// before anything starts.
func TestPortFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"inbound twice", []string{"--cluster=west", "--inbound=:1", "--inbound-port=15006"}, "--inbound and --inbound-port are exclusive"},
		{"inbound port range", []string{"--cluster=west", "--inbound-port=70000"}, "not a port"},
		{"outbound without discovery", []string{"--cluster=west", "--outbound-port=15001"}, "--outbound-port needs --discovery"},
		{"outbound port range", []string{"--cluster=west", "--outbound-port=70000", "--discovery=127.0.0.1:1"}, "not a port"},
		{"dns without outbound", []string{"--cluster=west", "--dns-addr=127.0.0.1:15053"}, "--dns-addr needs --outbound-port"},
		{"unknown flag", []string{"--cluster=west", "--outbound=:15001"}, "flag provided but not defined"},
		{"app probes not JSON", []string{"--cluster=west", "--probe-addr=127.0.0.1:0", "--app-probes={"}, "--app-probes: decode app probes"},
		{"app probe invalid", []string{"--cluster=west", "--probe-addr=127.0.0.1:0", `--app-probes={"/app-health/app/readyz":{"type":"exec","port":8080}}`},
			`--app-probes: app probe /app-health/app/readyz: type "exec"`},
		{"app probes without probe server", []string{"--cluster=west", `--app-probes={"/app-health/app/readyz":{"type":"tcp","port":8080}}`}, "--app-probes needs --probe-addr"},
		{"probe address taken", []string{"--cluster=west", "--probe-addr=256.0.0.1:1"}, "--probe-addr"},
		{"socket io unknown", []string{"--cluster=west", "--socket-io=fast"}, `--socket-io: socket I/O mode "fast": want auto, raw or std`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), tc.args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("run(%v) = %v, want an error with %q", tc.args, err, tc.want)
			}
		})
	}
}

// TestProbeEnvironment: the injector sets the probe server up through the
// environment, the defaults of --probe-addr and --app-probes.
func TestProbeEnvironment(t *testing.T) {
	t.Setenv(appprobe.EnvAddr, "127.0.0.1:0")
	t.Setenv(appprobe.EnvProbes, `{"/app-health/app/readyz":{"type":"tcp","port":0}}`)
	err := run(context.Background(), []string{"--cluster=west"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "--app-probes: app probe /app-health/app/readyz: port 0 out of range") {
		t.Fatalf("run: %v, want the environment's probes checked", err)
	}
}

// TestDNSEnvironment: the injector sets the DNS server up through the
// environment, the default of --dns-addr, which needs the transparent
// outbound.
func TestDNSEnvironment(t *testing.T) {
	t.Setenv(injector.EnvDNSAddr, "localhost:15053")
	err := run(context.Background(), []string{"--cluster=west"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "--dns-addr needs --outbound-port") {
		t.Fatalf("run: %v, want the environment's DNS address checked", err)
	}
}

// TestSocketIOEnvironment: the injector picks the socket I/O through the
// environment, the default of --socket-io.
func TestSocketIOEnvironment(t *testing.T) {
	t.Setenv(injector.EnvSocketIO, "fast")
	err := run(context.Background(), []string{"--cluster=west"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), `--socket-io: socket I/O mode "fast": want auto, raw or std`) {
		t.Fatalf("run: %v, want the environment's socket I/O checked", err)
	}
}

// freeAddr is a loopback address nothing listens on (for flags that take
// an address and report no bound port).
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func getStatus(url string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestProbeServer runs the sidecar in process with a probe server: the
// app's probe answers while the sidecar still waits for its identity (and
// /ready says not ready), and /ready turns 200 once the SVID arrives.
func TestProbeServer(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
		}
	}))
	defer app.Close()
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(app.URL, "http://"))
	probes := `{"/app-health/app/readyz":{"type":"http","port":` + port + `,"path":"/healthz"}}`

	start := func(t *testing.T, workloadAPI string) (base string, stop func() error) {
		addr := freeAddr(t)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- run(ctx, []string{"--cluster=west", "--workload-api=" + workloadAPI, "--probe-addr=" + addr, "--app-probes=" + probes}, io.Discard)
		}()
		base = "http://" + addr
		waitFor(t, "the probe server", 10*time.Second, func() bool {
			select {
			case err := <-done:
				t.Fatalf("sidecar exited: %v", err)
			default:
			}
			_, _, err := getStatus(base + "/ready")
			return err == nil
		})
		return base, func() error {
			cancel()
			select {
			case err := <-done:
				return err
			case <-time.After(10 * time.Second):
				t.Fatal("sidecar did not stop")
				return nil
			}
		}
	}

	t.Run("before the identity", func(t *testing.T) {
		dir, err := os.MkdirTemp("", "fmpb")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(dir)
		base, stop := start(t, "unix://"+filepath.Join(dir, "nobody.sock"))
		if s, body, err := getStatus(base + "/ready"); s != 503 || body != "sidecar not ready" {
			t.Errorf("/ready: %d %q %v", s, body, err)
		}
		if s, body, err := getStatus(base + "/app-health/app/readyz"); s != 200 {
			t.Errorf("app probe: %d %q %v", s, body, err)
		}
		if s, _, err := getStatus(base + "/app-health/other/readyz"); s != 404 {
			t.Errorf("unknown probe: %d %v", s, err)
		}
		if err := stop(); err == nil || !strings.Contains(err.Error(), "workload api") {
			t.Errorf("run: %v, want the Workload API's error", err)
		}
		if _, _, err := getStatus(base + "/ready"); err == nil {
			t.Error("the probe server still answers after run returned")
		}
	})
	t.Run("ready", func(t *testing.T) {
		west := gatewaytest.Start(t, []string{"west"}, nil)["west"]
		base, stop := start(t, west.Addr("web"))
		waitFor(t, "/ready", 30*time.Second, func() bool {
			s, _, _ := getStatus(base + "/ready")
			return s == 200
		})
		if s, body, err := getStatus(base + "/app-health/app/readyz"); s != 200 {
			t.Errorf("app probe: %d %q %v", s, body, err)
		}
		if err := stop(); err != nil {
			t.Errorf("run: %v", err)
		}
	})
}

// Helper process of TestProbesThroughRedirect: the pod's app and the
// sidecar, inside the pod's network namespace.
const (
	helperEnv      = "FEDMESH_TEST_NETNS_HELPER" // the sidecar's arguments, JSON
	helperUnhealth = "FEDMESH_TEST_UNHEALTHY"    // the app fails /healthz while this file exists
)

// TestNetnsHelper is not a test: TestProbesThroughRedirect runs the test
// binary with this test alone, inside a network namespace.
func TestNetnsHelper(t *testing.T) {
	raw := os.Getenv(helperEnv)
	if raw == "" {
		return
	}
	var args []string
	if err := json.Unmarshal([]byte(raw), &args); err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(2)
	}
	// The app listens on every address of the pod, port 8080.
	ln, err := net.Listen("tcp", ":8080")
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper app:", err)
		os.Exit(2)
	}
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := os.Stat(os.Getenv(helperUnhealth)); err == nil {
			http.Error(w, "app unhealthy", http.StatusInternalServerError)
			return
		}
		io.WriteString(w, "app healthy\n")
	}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, args, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "helper sidecar:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// newPodNetns makes a network namespace standing for a pod: a veth pair
// to the host (host end 198.19.N.1, pod 198.19.N.2) and a default route
// through the host. It returns the namespace's name and the pod's address.
func newPodNetns(t *testing.T) (name, podIP string) {
	t.Helper()
	routes, err := exec.Command("ip", "-4", "route", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	third := -1
	for i := 150; i < 200; i++ { // sidecar's transparent tests take 200-255
		if !strings.Contains(string(routes), fmt.Sprintf("198.19.%d.0/24", i)) {
			third = i
			break
		}
	}
	if third < 0 {
		t.Fatal("no free 198.19.x.0/24")
	}
	name = fmt.Sprintf("fmpb-%d-%d", os.Getpid(), third)
	hostIf, podIf := fmt.Sprintf("fmpb%dh", third), fmt.Sprintf("fmpb%dn", third)
	hostIP, podIP := fmt.Sprintf("198.19.%d.1", third), fmt.Sprintf("198.19.%d.2", third)
	t.Cleanup(func() {
		exec.Command("ip", "netns", "delete", name).Run()
		exec.Command("ip", "link", "delete", hostIf).Run()
	})
	mustRun(t, "ip", "netns", "add", name)
	mustRun(t, "ip", "link", "add", hostIf, "type", "veth", "peer", "name", podIf)
	mustRun(t, "ip", "link", "set", podIf, "netns", name)
	mustRun(t, "ip", "addr", "add", hostIP+"/24", "dev", hostIf)
	mustRun(t, "ip", "link", "set", hostIf, "up")
	mustRun(t, "ip", "-n", name, "link", "set", "lo", "up")
	mustRun(t, "ip", "-n", name, "addr", "add", podIP+"/24", "dev", podIf)
	mustRun(t, "ip", "-n", name, "link", "set", podIf, "up")
	mustRun(t, "ip", "-n", name, "route", "add", "default", "via", hostIP)
	return name, podIP
}

// TestProbesThroughRedirect is the bug this machinery fixes, in a network
// namespace standing for a pod: the injector's own patch of a pod whose
// app (port 8080, all addresses) has an httpGet readiness probe on a named
// port and a tcpSocket liveness probe, its init container's redirect
// (fedmesh-init, nftables) installed for real, and this binary's sidecar running there
// with the injected arguments and environment. From outside the namespace,
// as the kubelet: the original probe (plaintext to podIP:8080) lands on
// the mTLS inbound and fails, the rewritten probes (podIP:15021) reach the
// app through the sidecar and follow its health, and the sidecar's own
// readiness probe answers.
func TestProbesThroughRedirect(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("network namespaces need Linux")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and installs the injector's redirect in it")
	}
	for _, bin := range []string{"ip"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s (scripts/install-deps.sh installs iproute2): %v", bin, err)
		}
	}
	ns, podIP := newPodNetns(t)

	// The injector's patch of an echo-like pod.
	cfg := injector.Config{Cluster: "west"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "echo", Image: "echo", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromString("http")}}, TimeoutSeconds: 2},
			LivenessProbe:  &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}}},
		}}},
	}
	patch, err := cfg.Patch(pod)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(pod)
	p, err := jsonpatch.DecodePatch(patch)
	if err != nil {
		t.Fatal(err)
	}
	if raw, err = p.Apply(raw); err != nil {
		t.Fatal(err)
	}
	injected := &corev1.Pod{}
	if err := json.Unmarshal(raw, injected); err != nil {
		t.Fatal(err)
	}
	app, sc := injected.Spec.Containers[0], injected.Spec.Containers[1]
	// The init container as injected: its command is fedmesh-init, built
	// here as `make build` builds it, with the injected arguments.
	ic := injected.Spec.InitContainers[0]
	if len(ic.Command) != 1 || ic.Command[0] != injector.InitCommand {
		t.Fatalf("init container command %q, want %s", ic.Command, injector.InitCommand)
	}
	initBin, err := testutil.BuildCommand(t.TempDir(), "fedmesh-init")
	if err != nil {
		t.Fatal(err)
	}
	mustRun(t, "ip", append([]string{"netns", "exec", ns, initBin}, ic.Args...)...)

	// The sidecar: the injected arguments but the transparent outbound
	// (it needs a discovery API; sidecar's TestTransparentOutbound runs
	// it), the injected environment, and a Workload API of a test issuer.
	west := gatewaytest.Start(t, []string{"west"}, nil)["west"]
	args := []string{"--workload-api=" + west.Addr("web")}
	for _, a := range sc.Args {
		if !strings.HasPrefix(a, "--outbound-port=") {
			args = append(args, a)
		}
	}
	rawArgs, _ := json.Marshal(args)
	unhealthy := filepath.Join(t.TempDir(), "unhealthy")
	cmd := exec.Command("ip", "netns", "exec", ns, os.Args[0], "-test.run=^TestNetnsHelper$", "-test.timeout=5m")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(rawArgs), helperUnhealth+"="+unhealthy)
	for _, e := range sc.Env {
		// Without the transparent outbound there is no DNS server either
		// (sidecar's TestDNSThroughRedirect runs both).
		if e.Name != mtls.EndpointSocketEnv && e.Name != injector.EnvDNSAddr {
			cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
		}
	}
	logs, exited := testutil.Start(t, cmd, "sidecar")

	// The kubelet's probes, from the node.
	probeURL := func(pr *corev1.Probe) string {
		return fmt.Sprintf("http://%s:%d%s", podIP, pr.HTTPGet.Port.IntValue(), pr.HTTPGet.Path)
	}
	sidecarReady := probeURL(sc.ReadinessProbe)
	waitFor(t, "the sidecar's readiness probe", 30*time.Second, func() bool {
		select {
		case <-exited:
			t.Fatalf("sidecar exited:\n%s", logs.String())
		default:
		}
		s, _, _ := getStatus(sidecarReady)
		return s == 200
	})
	for _, pr := range []*corev1.Probe{app.ReadinessProbe, app.LivenessProbe} {
		if s, body, err := getStatus(probeURL(pr)); s != 200 || body != "ok" {
			t.Errorf("rewritten probe %s: %d %q %v", probeURL(pr), s, body, err)
		}
	}
	if s, body, err := getStatus("http://" + podIP + ":8080/healthz"); err == nil && s == 200 {
		t.Errorf("the original probe reached the app: %d %q; the inbound redirect is not in place", s, body)
	} else {
		t.Logf("the original probe, plaintext to the redirected port, fails as it did before the rewrite: %d %v", s, err)
	}

	if err := os.WriteFile(unhealthy, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if s, body, _ := getStatus(probeURL(app.ReadinessProbe)); s != 503 || !strings.Contains(body, "status code 500") {
		t.Errorf("readiness of an unhealthy app: %d %q, want 503 naming the app's 500", s, body)
	}
	if s, _, _ := getStatus(probeURL(app.LivenessProbe)); s != 200 {
		t.Errorf("tcp liveness of an unhealthy app that still accepts: %d", s)
	}
	if err := os.Remove(unhealthy); err != nil {
		t.Fatal(err)
	}
	if s, _, _ := getStatus(probeURL(app.ReadinessProbe)); s != 200 {
		t.Errorf("readiness after recovery: %d", s)
	}
	if !strings.Contains(logs.String(), `"msg":"serving probes","addr":"[::]:15021","app_probes":2`) {
		t.Errorf("the sidecar did not log its probe server on :15021:\n%s", logs.String())
	}
}
