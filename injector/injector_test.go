package injector

import (
	"encoding/json"
	"strings"
	"testing"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/google/go-cmp/cmp"

	"github.com/fedmesh/fedmesh/sidecar/appprobe"
)

func pod(mod func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}
	if mod != nil {
		mod(p)
	}
	return p
}

// apply runs the handler on p and returns the response and the patched pod.
func apply(t *testing.T, h *Handler, p *corev1.Pod) (*admissionv1.AdmissionResponse, string, *corev1.Pod) {
	t.Helper()
	raw, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	resp, result := h.review(&admissionv1.AdmissionRequest{
		Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"}, Operation: admissionv1.Create,
		Namespace: p.Namespace, Name: p.Name, Object: runtime.RawExtension{Raw: raw},
	})
	out := p.DeepCopy()
	if resp.Patch != nil {
		patch, err := jsonpatch.DecodePatch(resp.Patch)
		if err != nil {
			t.Fatalf("decode patch: %v", err)
		}
		patched, err := patch.Apply(raw)
		if err != nil {
			t.Fatalf("apply patch %s: %v", resp.Patch, err)
		}
		out = &corev1.Pod{}
		if err := json.Unmarshal(patched, out); err != nil {
			t.Fatal(err)
		}
	}
	return resp, result, out
}

func TestReview(t *testing.T) {
	for _, tc := range []struct {
		name       string
		policy     FailurePolicy
		socket     SocketSource
		noDNS      bool
		pod        *corev1.Pod
		wantResult string
		wantAllow  bool
		wantInject bool
		wantWarn   bool
	}{
		{name: "plain pod", pod: pod(nil), wantResult: "injected", wantAllow: true, wantInject: true},
		{name: "csi socket", socket: SocketCSI, pod: pod(nil), wantResult: "injected", wantAllow: true, wantInject: true},
		{name: "existing init container, volumes, annotations", pod: pod(func(p *corev1.Pod) {
			p.Spec.InitContainers = []corev1.Container{{Name: "migrate", Image: "m"}}
			p.Spec.Volumes = []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
			p.Annotations = map[string]string{"a": "b"}
		}), wantResult: "injected", wantAllow: true, wantInject: true},
		{name: "opt out by label", pod: pod(func(p *corev1.Pod) { p.Labels = map[string]string{LabelInject: "false"} }), wantResult: "opted_out", wantAllow: true},
		{name: "opt out by annotation", pod: pod(func(p *corev1.Pod) { p.Annotations = map[string]string{LabelInject: "False"} }), wantResult: "opted_out", wantAllow: true},
		{name: "already injected", pod: pod(func(p *corev1.Pod) { p.Annotations = map[string]string{AnnotationInjected: "true"} }), wantResult: "already_injected", wantAllow: true},
		{name: "sidecar present", pod: pod(func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: SidecarName, Image: "x"})
		}), wantResult: "already_injected", wantAllow: true},
		{name: "port conflict fails open", policy: Ignore, pod: pod(func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 15001}}
		}), wantResult: "failed_open", wantAllow: true, wantWarn: true},
		{name: "port conflict fails closed", policy: Fail, pod: pod(func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 15006}}
		}), wantResult: "denied", wantAllow: false},
		{name: "dns port conflict", policy: Ignore, pod: pod(func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 15053, Protocol: corev1.ProtocolUDP}}
		}), wantResult: "failed_open", wantAllow: true, wantWarn: true},
		{name: "dns port free without dns capture", noDNS: true, pod: pod(func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 15053}}
		}), wantResult: "injected", wantAllow: true, wantInject: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := New(Options{Config: Config{FailurePolicy: tc.policy, SocketSource: tc.socket, NoDNSCapture: tc.noDNS}})
			if err != nil {
				t.Fatal(err)
			}
			resp, result, out := apply(t, h, tc.pod)
			if result != tc.wantResult || resp.Allowed != tc.wantAllow || (len(resp.Warnings) > 0) != tc.wantWarn {
				t.Fatalf("result %s allowed %v warnings %q; want %s %v warn=%v", result, resp.Allowed, resp.Warnings, tc.wantResult, tc.wantAllow, tc.wantWarn)
			}
			if !tc.wantAllow && (resp.Result == nil || !strings.Contains(resp.Result.Message, "15006")) {
				t.Fatalf("denial should name the conflicting port: %+v", resp.Result)
			}
			if err := checkInjected(out, tc.pod, h.cfg); (err == nil) != tc.wantInject {
				t.Fatalf("injected = %v, want %v: %v", err == nil, tc.wantInject, err)
			}
			if tc.wantInject {
				// Idempotent: a second pass over the injected pod changes nothing.
				resp, result, _ := apply(t, h, out)
				if result != "already_injected" || resp.Patch != nil {
					t.Fatalf("second pass: result %s, patch %s", result, resp.Patch)
				}
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{name: "defaults", cfg: Config{}},
		{name: "same ports", cfg: Config{InboundPort: 15001}, wantErr: "both 15001"},
		{name: "probe port is the inbound port", cfg: Config{ProbePort: 15006}, wantErr: "probe port 15006 is also the inbound or outbound port"},
		{name: "probe port is the outbound port", cfg: Config{ProbePort: 16001, OutboundPort: 16001}, wantErr: "probe port 16001"},
		{name: "probe port range", cfg: Config{ProbePort: -1}, wantErr: "port -1 out of range"},
		{name: "port range", cfg: Config{ExcludeInboundPorts: []int32{70000}}, wantErr: "out of range"},
		{name: "dns port range", cfg: Config{DNSPort: 65536}, wantErr: "port 65536 out of range"},
		{name: "dns port is the probe port", cfg: Config{DNSPort: 15021}, wantErr: "dns port 15021 is also the inbound, outbound or probe port"},
		{name: "dns port is the outbound port", cfg: Config{DNSPort: 15001}, wantErr: "dns port 15001"},
		{name: "dns port without capture", cfg: Config{DNSPort: 16053, NoDNSCapture: true}},
		{name: "socket source", cfg: Config{SocketSource: "nfs"}, wantErr: "socket source"},
		{name: "relative dir", cfg: Config{SocketDir: "run/spire"}, wantErr: "absolute"},
		{name: "policy", cfg: Config{FailurePolicy: "Maybe"}, wantErr: "failure policy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("err %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// TestSidecarArgs: the injected sidecar gets the flags fedmesh-sidecar
// defines: the transparent outbound always, the inbound with the app's
// first TCP port when the pod declares one; the cluster and discovery
// address as environment when configured, the probe server's address
// always and the DNS server's unless DNS capture is off; SidecarArgs
// replaces the arguments, not the environment.
func TestSidecarArgs(t *testing.T) {
	withPorts := func(p *corev1.Pod) {
		p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 53, Protocol: corev1.ProtocolUDP}, {ContainerPort: 8080}}
	}
	dnsEnv := map[string]string{EnvDNSAddr: "localhost:15053"}
	for _, tc := range []struct {
		name    string
		cfg     Config
		pod     *corev1.Pod
		args    []string
		wantEnv map[string]string
	}{
		{"no port", Config{}, pod(nil), []string{"--outbound-port=15001"}, dnsEnv},
		{"first TCP port", Config{}, pod(withPorts), []string{"--outbound-port=15001", "--inbound-port=15006", "--app=127.0.0.1:8080"}, dnsEnv},
		{"other ports, cluster and discovery", Config{InboundPort: 16006, OutboundPort: 16001, DNSPort: 16053, Cluster: "east", Discovery: "fedmesh-discovery.fedmesh-system.svc:15012"},
			pod(withPorts), []string{"--outbound-port=16001", "--inbound-port=16006", "--app=127.0.0.1:8080"},
			map[string]string{EnvCluster: "east", EnvDiscovery: "fedmesh-discovery.fedmesh-system.svc:15012", EnvDNSAddr: "localhost:16053"}},
		{"explicit args", Config{SidecarArgs: []string{"--cluster=west"}}, pod(withPorts), []string{"--cluster=west"}, dnsEnv},
		{"no dns capture", Config{NoDNSCapture: true}, pod(nil), []string{"--outbound-port=15001"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			sc, err := cfg.sidecar(tc.pod, nil)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(sc.Args, " ") != strings.Join(tc.args, " ") {
				t.Errorf("args %q, want %q", sc.Args, tc.args)
			}
			env := map[string]string{}
			for _, e := range sc.Env {
				env[e.Name] = e.Value
			}
			for k, v := range tc.wantEnv {
				if env[k] != v {
					t.Errorf("env %s=%q, want %q", k, env[k], v)
				}
			}
			if env[appprobe.EnvAddr] != ":15021" {
				t.Errorf("env %s=%q, want :15021", appprobe.EnvAddr, env[appprobe.EnvAddr])
			}
			if len(env) != 2+len(tc.wantEnv) {
				t.Errorf("env %v", env)
			}
		})
	}
}

// TestInitContainer: the init container runs the static fedmesh-init from
// the fedmesh image (no shell, no iptables), with NET_ADMIN alone, and its
// arguments carry every port of the configuration; the probe port and the
// excluded ports are exempt, DNS capture follows NoDNSCapture.
func TestInitContainer(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want []string
	}{
		{"defaults", Config{}, []string{"--inbound-port=15006", "--outbound-port=15001", "--dns-port=15053", "--probe-port=15021", "--proxy-uid=1337"}},
		{"excluded and no dns", Config{ExcludeInboundPorts: []int32{15000, 9090}, NoDNSCapture: true, DNSPort: 16053, ProxyUID: 2000},
			[]string{"--inbound-port=15006", "--outbound-port=15001", "--dns-port=16053", "--probe-port=15021", "--proxy-uid=2000", "--exclude-inbound-ports=15000,9090", "--no-dns-capture"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			if err := cfg.Validate(); err != nil {
				t.Fatal(err)
			}
			c := cfg.initContainer()
			if diff := cmp.Diff([]string{InitCommand}, c.Command); diff != "" {
				t.Errorf("command (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.want, c.Args); diff != "" {
				t.Errorf("args (-want +got):\n%s", diff)
			}
			if c.Image != cfg.SidecarImage {
				t.Errorf("init image %q, want the fedmesh image %q", c.Image, cfg.SidecarImage)
			}
			if caps := c.SecurityContext.Capabilities; len(caps.Add) != 1 || caps.Add[0] != "NET_ADMIN" || len(caps.Drop) != 1 || caps.Drop[0] != "ALL" {
				t.Errorf("capabilities %+v, want NET_ADMIN only", caps)
			}
			if err := cfg.Redirect().Validate(); err != nil {
				t.Errorf("the redirect of a valid configuration: %v", err)
			}
		})
	}
}

// TestSocketIOAnnotation: a pod's fedmesh.dev/socket-io reaches its sidecar
// as FEDMESH_SOCKET_IO; a value the sidecar would refuse is refused here.
func TestSocketIOAnnotation(t *testing.T) {
	h, err := New(Options{Config: Config{FailurePolicy: Fail}})
	if err != nil {
		t.Fatal(err)
	}
	envOf := func(p *corev1.Pod) (string, bool) {
		for _, c := range p.Spec.Containers {
			if c.Name != SidecarName {
				continue
			}
			for _, e := range c.Env {
				if e.Name == EnvSocketIO {
					return e.Value, true
				}
			}
		}
		return "", false
	}
	_, result, out := apply(t, h, pod(nil))
	if v, ok := envOf(out); result != "injected" || ok {
		t.Fatalf("no annotation: result %s, %s=%q set %v; want injected without it", result, EnvSocketIO, v, ok)
	}
	_, result, out = apply(t, h, pod(func(p *corev1.Pod) { p.Annotations = map[string]string{AnnotationSocketIO: "std"} }))
	if v, _ := envOf(out); result != "injected" || v != "std" {
		t.Fatalf("annotation std: result %s, %s=%q; want injected with std", result, EnvSocketIO, v)
	}
	resp, result, _ := apply(t, h, pod(func(p *corev1.Pod) { p.Annotations = map[string]string{AnnotationSocketIO: "fast"} }))
	if result != "denied" || resp.Allowed || resp.Result == nil || !strings.Contains(resp.Result.Message, `fedmesh.dev/socket-io: "fast" is not auto, raw or std`) {
		t.Fatalf("annotation fast: result %s allowed %v %+v; want denied naming the annotation", result, resp.Allowed, resp.Result)
	}
}
