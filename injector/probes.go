package injector

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/fedmesh/fedmesh/sidecar/appprobe"
)

// AnnotationRewriteProbes "false" on a pod leaves its probes as they are:
// then a probe of a redirected port fails unless that port is in
// Config.ExcludeInboundPorts.
const AnnotationRewriteProbes = "fedmesh.dev/rewrite-app-probes"

// probeFields are a container's probes: the JSON field, the kind (the last
// element of its probe server path) and the field itself.
var probeFields = []struct {
	field, kind string
	get         func(*corev1.Container) *corev1.Probe
}{
	{"livenessProbe", appprobe.Liveness, func(c *corev1.Container) *corev1.Probe { return c.LivenessProbe }},
	{"readinessProbe", appprobe.Readiness, func(c *corev1.Container) *corev1.Probe { return c.ReadinessProbe }},
	{"startupProbe", appprobe.Startup, func(c *corev1.Container) *corev1.Probe { return c.StartupProbe }},
}

// rewriteProbes points the kubelet's probes of pod's redirected ports at
// the sidecar's probe server. The kubelet probes from the node, in
// plaintext, to the pod's address: the inbound redirect would hand such a
// probe to the mTLS inbound, where it fails. It returns the replace
// operations (on the pod's own container indexes, so they go before the
// init container is added) and the original probes by path for the
// sidecar. httpGet and tcpSocket probes with a host, exec probes and
// probes of ports that are not redirected stay as they are; so does every
// probe of a pod that opts out with AnnotationRewriteProbes.
func (c *Config) rewriteProbes(pod *corev1.Pod) ([]patchOp, map[string]appprobe.Probe, error) {
	if strings.EqualFold(pod.Annotations[AnnotationRewriteProbes], "false") {
		return nil, nil, nil
	}
	var ops []patchOp
	probes := map[string]appprobe.Probe{}
	visit := func(list string, i int, ct *corev1.Container) error {
		for _, f := range probeFields {
			p := f.get(ct)
			if p == nil {
				continue
			}
			orig, ok, err := c.originalProbe(ct, p)
			if err != nil {
				return fmt.Errorf("container %s: %s: %w", ct.Name, f.field, err)
			}
			if !ok {
				continue
			}
			path := appprobe.Path(ct.Name, f.kind)
			probes[path] = orig
			np := *p // timing and thresholds stay
			np.ProbeHandler = corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Path: path, Port: intstr.FromInt32(c.ProbePort), Scheme: corev1.URISchemeHTTP,
			}}
			ops = append(ops, patchOp{"replace", fmt.Sprintf("/spec/%s/%d/%s", list, i, f.field), &np})
		}
		return nil
	}
	for i := range pod.Spec.Containers {
		if err := visit("containers", i, &pod.Spec.Containers[i]); err != nil {
			return nil, nil, err
		}
	}
	// Native sidecars (restartable init containers) may have probes too;
	// they start after fedmesh-init, so their ports are redirected.
	for i := range pod.Spec.InitContainers {
		ct := &pod.Spec.InitContainers[i]
		if ct.RestartPolicy != nil && *ct.RestartPolicy == corev1.ContainerRestartPolicyAlways {
			if err := visit("initContainers", i, ct); err != nil {
				return nil, nil, err
			}
		}
	}
	return ops, probes, nil
}

// originalProbe is p as the sidecar performs it, and whether it is to be
// rewritten at all.
func (c *Config) originalProbe(ct *corev1.Container, p *corev1.Probe) (appprobe.Probe, bool, error) {
	orig := appprobe.Probe{TimeoutSeconds: p.TimeoutSeconds}
	switch {
	case p.HTTPGet != nil:
		g := p.HTTPGet
		if g.Host != "" {
			return orig, false, nil
		}
		port, err := resolvePort(ct, g.Port)
		if err != nil {
			return orig, false, fmt.Errorf("httpGet: %w", err)
		}
		orig.Type, orig.Port, orig.Path, orig.Scheme = appprobe.HTTP, port, g.Path, string(g.Scheme)
		if orig.Scheme == "" {
			orig.Scheme = string(corev1.URISchemeHTTP)
		}
		for _, h := range g.HTTPHeaders {
			orig.HTTPHeaders = append(orig.HTTPHeaders, appprobe.Header{Name: h.Name, Value: h.Value})
		}
	case p.TCPSocket != nil:
		if p.TCPSocket.Host != "" {
			return orig, false, nil
		}
		port, err := resolvePort(ct, p.TCPSocket.Port)
		if err != nil {
			return orig, false, fmt.Errorf("tcpSocket: %w", err)
		}
		orig.Type, orig.Port = appprobe.TCP, port
	case p.GRPC != nil:
		if p.GRPC.Port < 1 || p.GRPC.Port > 65535 {
			return orig, false, fmt.Errorf("grpc: port %d out of range", p.GRPC.Port)
		}
		orig.Type, orig.Port = appprobe.GRPC, p.GRPC.Port
		if p.GRPC.Service != nil {
			orig.Service = *p.GRPC.Service
		}
	default: // exec, or no handler (the API server rejects that)
		return orig, false, nil
	}
	return orig, c.redirected(orig.Port), nil
}

// redirected reports whether the init container's rules send inbound
// connections to port to the sidecar's mTLS inbound.
func (c *Config) redirected(port int32) bool {
	return port != c.ProbePort && !slices.Contains(c.ExcludeInboundPorts, port)
}

// resolvePort is a probe's port number: a number as it is, a name as the
// container's port of that name (as the kubelet resolves it).
func resolvePort(ct *corev1.Container, port intstr.IntOrString) (int32, error) {
	if port.Type == intstr.String {
		for _, p := range ct.Ports {
			if p.Name == port.StrVal {
				return p.ContainerPort, nil
			}
		}
		return 0, fmt.Errorf("port %q is not the name of a port of container %s", port.StrVal, ct.Name)
	}
	if port.IntVal < 1 || port.IntVal > 65535 {
		return 0, fmt.Errorf("port %d out of range", port.IntVal)
	}
	return port.IntVal, nil
}

// probesEnv is the sidecar's EnvProbes value: the original probes by path.
func probesEnv(probes map[string]appprobe.Probe) (string, error) {
	b, err := json.Marshal(probes) // keys sorted: the same pod gets the same value
	if err != nil {
		return "", fmt.Errorf("encode app probes: %w", err)
	}
	return string(b), nil
}
