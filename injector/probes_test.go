package injector

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/fedmesh/fedmesh/sidecar/appprobe"
)

// rewritten is the probe the kubelet gets instead of p: a GET of the probe
// server's path for it, with p's timing and thresholds.
func rewritten(p *corev1.Probe, path string, port int32) *corev1.Probe {
	np := p.DeepCopy()
	np.ProbeHandler = corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromInt32(port), Scheme: corev1.URISchemeHTTP}}
	return np
}

// sidecarProbes returns the original probes the injected sidecar got, nil
// when it got none.
func sidecarProbes(t *testing.T, p *corev1.Pod) map[string]appprobe.Probe {
	t.Helper()
	sc := p.Spec.Containers[len(p.Spec.Containers)-1]
	if sc.Name != SidecarName {
		t.Fatalf("last container is %s", sc.Name)
	}
	for _, e := range sc.Env {
		if e.Name == appprobe.EnvProbes {
			probes, err := appprobe.Parse(e.Value)
			if err != nil {
				t.Fatalf("the sidecar would refuse its probes: %v", err)
			}
			return probes
		}
	}
	return nil
}

// TestRewriteProbes runs pods with probes through the handler and applies
// its patch: probes of redirected ports point at the probe server with
// their timing kept, the sidecar gets the originals (named ports
// resolved), and everything else is left alone.
func TestRewriteProbes(t *testing.T) {
	svc := "web"
	httpProbe := &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
			Path: "/healthz?full=1", Port: intstr.FromString("http"), Scheme: corev1.URISchemeHTTPS,
			HTTPHeaders: []corev1.HTTPHeader{{Name: "X-Probe", Value: "kubelet"}, {Name: "Host", Value: "web.local"}},
		}},
		InitialDelaySeconds: 5, TimeoutSeconds: 3, PeriodSeconds: 7, SuccessThreshold: 1, FailureThreshold: 4,
	}
	tcpProbe := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}}, PeriodSeconds: 20}
	grace := int64(12)
	grpcProbe := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 9090, Service: &svc}},
		FailureThreshold: 30, TerminationGracePeriodSeconds: &grace}
	execProbe := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}}
	hostHTTP := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Host: "10.0.0.1", Port: intstr.FromInt32(8080)}}}
	hostTCP := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Host: "10.0.0.1", Port: intstr.FromInt32(8080)}}}
	web := func(p *corev1.Pod) {
		p.Spec.Containers[0] = corev1.Container{Name: "web", Image: "web",
			Ports:          []corev1.ContainerPort{{Name: "http", ContainerPort: 8443}, {Name: "grpc", ContainerPort: 9090}},
			ReadinessProbe: httpProbe.DeepCopy(), LivenessProbe: tcpProbe.DeepCopy(), StartupProbe: grpcProbe.DeepCopy()}
	}
	always := corev1.ContainerRestartPolicyAlways
	for _, tc := range []struct {
		name string
		cfg  Config
		pod  *corev1.Pod
		// want maps "containers/<i>" or "initContainers/<i>" (in the
		// patched pod) to its liveness, readiness and startup probes.
		want       map[string][3]*corev1.Probe
		wantProbes map[string]appprobe.Probe
	}{
		{name: "every type, named port", pod: pod(web),
			want: map[string][3]*corev1.Probe{"containers/0": {
				rewritten(tcpProbe, "/app-health/web/livez", 15021),
				rewritten(httpProbe, "/app-health/web/readyz", 15021),
				rewritten(grpcProbe, "/app-health/web/startupz", 15021),
			}},
			wantProbes: map[string]appprobe.Probe{
				"/app-health/web/livez": {Type: appprobe.TCP, Port: 8080},
				"/app-health/web/readyz": {Type: appprobe.HTTP, Port: 8443, Path: "/healthz?full=1", Scheme: "HTTPS", TimeoutSeconds: 3,
					HTTPHeaders: []appprobe.Header{{Name: "X-Probe", Value: "kubelet"}, {Name: "Host", Value: "web.local"}}},
				"/app-health/web/startupz": {Type: appprobe.GRPC, Port: 9090, Service: "web"},
			}},
		{name: "exec and host probes untouched", pod: pod(func(p *corev1.Pod) {
			p.Spec.Containers[0].LivenessProbe, p.Spec.Containers[0].ReadinessProbe, p.Spec.Containers[0].StartupProbe = execProbe, hostHTTP, hostTCP
		}), want: map[string][3]*corev1.Probe{"containers/0": {execProbe, hostHTTP, hostTCP}}},
		{name: "excluded ports untouched", cfg: Config{ExcludeInboundPorts: []int32{8443, 8080}}, pod: pod(web),
			want:       map[string][3]*corev1.Probe{"containers/0": {tcpProbe, httpProbe, rewritten(grpcProbe, "/app-health/web/startupz", 15021)}},
			wantProbes: map[string]appprobe.Probe{"/app-health/web/startupz": {Type: appprobe.GRPC, Port: 9090, Service: "web"}}},
		{name: "other probe port", cfg: Config{ProbePort: 16021}, pod: pod(func(p *corev1.Pod) { p.Spec.Containers[0].LivenessProbe = tcpProbe }),
			want:       map[string][3]*corev1.Probe{"containers/0": {rewritten(tcpProbe, "/app-health/app/livez", 16021), nil, nil}},
			wantProbes: map[string]appprobe.Probe{"/app-health/app/livez": {Type: appprobe.TCP, Port: 8080}}},
		{name: "a probe of the probe port is not redirected", pod: pod(func(p *corev1.Pod) {
			p.Spec.Containers[0].LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/app-health/x/livez", Port: intstr.FromInt32(15021)}}}
		}), want: map[string][3]*corev1.Probe{"containers/0": {{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/app-health/x/livez", Port: intstr.FromInt32(15021)}}}, nil, nil}}},
		{name: "opted out", pod: pod(func(p *corev1.Pod) {
			web(p)
			p.Annotations = map[string]string{AnnotationRewriteProbes: "False"}
		}), want: map[string][3]*corev1.Probe{"containers/0": {tcpProbe, httpProbe, grpcProbe}}},
		{name: "two containers and a native sidecar behind an init container", pod: pod(func(p *corev1.Pod) {
			web(p)
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "worker", Image: "w", LivenessProbe: tcpProbe.DeepCopy()})
			p.Spec.InitContainers = []corev1.Container{
				{Name: "migrate", Image: "m"},
				{Name: "logs", Image: "l", RestartPolicy: &always, ReadinessProbe: tcpProbe.DeepCopy()},
			}
		}), want: map[string][3]*corev1.Probe{
			"containers/0": {
				rewritten(tcpProbe, "/app-health/web/livez", 15021),
				rewritten(httpProbe, "/app-health/web/readyz", 15021),
				rewritten(grpcProbe, "/app-health/web/startupz", 15021),
			},
			"containers/1":     {rewritten(tcpProbe, "/app-health/worker/livez", 15021), nil, nil},
			"initContainers/0": {nil, nil, nil}, // fedmesh-init
			"initContainers/1": {nil, nil, nil},
			"initContainers/2": {nil, rewritten(tcpProbe, "/app-health/logs/readyz", 15021), nil},
		}, wantProbes: map[string]appprobe.Probe{
			"/app-health/web/livez": {Type: appprobe.TCP, Port: 8080},
			"/app-health/web/readyz": {Type: appprobe.HTTP, Port: 8443, Path: "/healthz?full=1", Scheme: "HTTPS", TimeoutSeconds: 3,
				HTTPHeaders: []appprobe.Header{{Name: "X-Probe", Value: "kubelet"}, {Name: "Host", Value: "web.local"}}},
			"/app-health/web/startupz": {Type: appprobe.GRPC, Port: 9090, Service: "web"},
			"/app-health/worker/livez": {Type: appprobe.TCP, Port: 8080},
			"/app-health/logs/readyz":  {Type: appprobe.TCP, Port: 8080},
		}},
		{name: "no probes", pod: pod(nil), want: map[string][3]*corev1.Probe{"containers/0": {}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := New(Options{Config: tc.cfg})
			if err != nil {
				t.Fatal(err)
			}
			resp, result, out := apply(t, h, tc.pod)
			if result != "injected" {
				t.Fatalf("result %s, warnings %q", result, resp.Warnings)
			}
			if err := checkInjected(out, tc.pod, h.cfg); err != nil {
				t.Fatal(err)
			}
			for at, want := range tc.want {
				list, idx, _ := strings.Cut(at, "/")
				cs := out.Spec.Containers
				if list == "initContainers" {
					cs = out.Spec.InitContainers
				}
				i := int(idx[0] - '0')
				got := [3]*corev1.Probe{cs[i].LivenessProbe, cs[i].ReadinessProbe, cs[i].StartupProbe}
				if d := cmp.Diff(want, got); d != "" {
					t.Errorf("%s (%s) probes (-want +got):\n%s", at, cs[i].Name, d)
				}
			}
			if d := cmp.Diff(tc.wantProbes, sidecarProbes(t, out)); d != "" {
				t.Errorf("the sidecar's original probes (-want +got):\n%s", d)
			}
		})
	}
}

// TestRewriteProbesRefused: a probe the sidecar could not perform, or a
// container on the probe port, means no injection: the failure policy
// applies with a message naming the cause.
func TestRewriteProbesRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*corev1.Pod)
		want string
	}{
		{name: "unknown named port", mod: func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}
			p.Spec.Containers[0].ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("metrics")}}}
		}, want: `container app: readinessProbe: httpGet: port "metrics" is not the name of a port of container app`},
		{name: "unknown named tcp port", mod: func(p *corev1.Pod) {
			p.Spec.Containers[0].LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromString("db")}}}
		}, want: `container app: livenessProbe: tcpSocket: port "db" is not the name of a port of container app`},
		{name: "port out of range", mod: func(p *corev1.Pod) {
			p.Spec.Containers[0].StartupProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 70000}}}
		}, want: "startupProbe: grpc: port 70000 out of range"},
		{name: "a URL for a path", mod: func(p *corev1.Pod) {
			p.Spec.Containers[0].ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "http://elsewhere/", Port: intstr.FromInt32(80)}}}
		}, want: "app probe /app-health/app/readyz: path"},
		{name: "container on the probe port", mod: func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 15021}}
		}, want: "container app uses port 15021, which the sidecar needs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, policy := range []FailurePolicy{Ignore, Fail} {
				h, err := New(Options{Config: Config{FailurePolicy: policy}})
				if err != nil {
					t.Fatal(err)
				}
				p := pod(tc.mod)
				resp, result, out := apply(t, h, p)
				msg := strings.Join(resp.Warnings, "\n")
				if resp.Result != nil {
					msg = resp.Result.Message
				}
				if resp.Patch != nil || !strings.Contains(msg, tc.want) {
					t.Fatalf("%s: result %s, patch %s, message %q; want no patch and %q", policy, result, resp.Patch, msg, tc.want)
				}
				if d := cmp.Diff(p, out); d != "" {
					t.Fatalf("pod changed:\n%s", d)
				}
			}
		})
	}
}
