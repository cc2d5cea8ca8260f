// Package injector is fedmesh's sidecar-injection admission webhook. Users
// should not have to hand-edit every Deployment to join the mesh: labelling a
// namespace (or a pod) is enough, and the API server asks this webhook to add
// the sidecar, the init step that redirects traffic to it (fedmesh-init,
// nftables over netlink: package injector/redirect), and
// the SPIFFE Workload API socket the sidecar gets its identity from. The
// redirect would also take the kubelet's probes of the app, so the webhook
// points them at the sidecar's probe server (probes.go).
package injector

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/fedmesh/fedmesh/injector/redirect"
	"github.com/fedmesh/fedmesh/sidecar/appprobe"
)

const (
	// LabelInject on a namespace ("enabled") turns injection on for its pods;
	// on a pod, as label or annotation, "true"/"enabled" opts in and "false"
	// opts out.
	LabelInject = "fedmesh.dev/inject"
	// AnnotationInjected marks a pod that has been injected, so that a second
	// pass (reinvocation, a re-sent request) changes nothing.
	AnnotationInjected = "fedmesh.dev/injected"

	// SidecarName and InitName are the names of the injected containers.
	SidecarName = "fedmesh-sidecar"
	InitName    = "fedmesh-init"
	// SocketVolume is the name of the Workload API socket volume.
	SocketVolume = "fedmesh-workload-api"
	// SocketEnv is the environment variable go-spiffe reads the Workload API
	// address from.
	SocketEnv = "SPIFFE_ENDPOINT_SOCKET"
	// EnvCluster and EnvDiscovery are the sidecar's defaults of --cluster
	// and --discovery (Config.Cluster, Config.Discovery).
	EnvCluster   = "FEDMESH_CLUSTER"
	EnvDiscovery = "FEDMESH_DISCOVERY"
	// EnvDNSAddr is the default of the sidecar's --dns-addr (Config.DNSAddr
	// of package sidecar): its DNS server, which answers clusterset.local.
	EnvDNSAddr = "FEDMESH_DNS_ADDR"
	// EnvSocketIO is the default of the sidecar's --socket-io (auto, raw
	// or std), set from the pod's AnnotationSocketIO.
	EnvSocketIO = "FEDMESH_SOCKET_IO"
	// AnnotationSocketIO on a pod ("auto", "raw" or "std") picks how its
	// sidecar reads and writes proxied sockets; absent, the sidecar's
	// default (auto).
	AnnotationSocketIO = "fedmesh.dev/socket-io"
)

// SocketSource says where the Workload API socket comes from.
type SocketSource string

const (
	// SocketHostPath mounts the agent's socket directory from the node.
	SocketHostPath SocketSource = "hostPath"
	// SocketCSI uses the SPIFFE CSI driver (csi.spiffe.io).
	SocketCSI SocketSource = "csi"
)

// FailurePolicy says what the webhook does with a pod it should inject but
// cannot: Ignore admits it unchanged with a warning (fail open), Fail
// rejects it (fail closed). It should match the failurePolicy of the
// MutatingWebhookConfiguration, which covers the webhook being unreachable.
type FailurePolicy string

// Failure policies, spelled as in admissionregistration/v1.
const (
	Ignore FailurePolicy = "Ignore"
	Fail   FailurePolicy = "Fail"
)

// Config is what gets injected. The zero value of each field means its
// default; call Validate (New does) to fill them in.
type Config struct {
	SidecarImage   string   // default ghcr.io/fedmesh/fedmesh:dev
	SidecarCommand []string // default /usr/local/bin/fedmesh-sidecar (clusters/Dockerfile)
	// SidecarArgs replaces the default arguments, which are made per pod:
	// --outbound-port (transparent outbound) and, for a pod that declares a
	// container port, --inbound-port with --app=127.0.0.1:<its first TCP
	// container port> (the mTLS inbound hands plaintext to that port).
	// The probe server is configured through the sidecar's environment
	// (FEDMESH_PROBE_ADDR, FEDMESH_APP_PROBES), which SidecarArgs leaves
	// alone: probes are rewritten either way, and arguments that move or
	// turn off --probe-addr make them, and the sidecar's readiness, fail.
	SidecarArgs []string
	// Cluster and Discovery, when set, reach every sidecar as
	// FEDMESH_CLUSTER and FEDMESH_DISCOVERY, the defaults of its --cluster
	// and --discovery: the own cluster's name and the federation
	// controller's discovery API (host:port), where transparent mode gets
	// the service directory and every endpoint set.
	Cluster, Discovery string
	// InitImage runs InitCommand, the static fedmesh-init binary; default
	// SidecarImage, the fedmesh image, which holds every fedmesh binary.
	InitImage string
	// InboundPort and OutboundPort are where the sidecar listens for
	// redirected traffic; ProxyUID is the UID it runs as, whose own traffic
	// is not redirected. Defaults 15006, 15001, 1337.
	InboundPort, OutboundPort int32
	ProxyUID                  int64
	// ExcludeInboundPorts are not redirected; probes of these ports are
	// left as they are.
	ExcludeInboundPorts []int32
	// ProbePort (default 15021) is the sidecar's probe server, never
	// redirected: the kubelet's httpGet, tcpSocket and grpc probes of
	// redirected ports are rewritten to HTTP GETs of it, and it performs
	// the original probes on the pod's loopback (package
	// sidecar/appprobe). The sidecar's own readiness probe is its /ready.
	ProbePort int32
	// DNSPort (default 15053) is the sidecar's DNS server on localhost
	// (127.0.0.1 and ::1): the app's DNS queries (UDP and TCP port 53) are
	// redirected to it, and it answers <svc>.<ns>.svc.clusterset.local
	// from the service directory and forwards the rest to the pod's
	// nameservers. NoDNSCapture leaves DNS alone: clusterset.local names
	// then need the cluster's DNS to serve that zone. With DNS capture,
	// SidecarArgs must keep --outbound-port (the sidecar refuses
	// FEDMESH_DNS_ADDR without it).
	DNSPort      int32
	NoDNSCapture bool

	SocketSource SocketSource // default hostPath
	// SocketDir is the node directory holding the agent socket (hostPath)
	// and the directory it is mounted at in the sidecar. Default
	// /run/spire/agent-sockets, as in spire-config/.
	SocketDir  string
	SocketName string // default spire-agent.sock
	CSIDriver  string // default csi.spiffe.io

	FailurePolicy FailurePolicy // default Ignore
}

// Validate fills in defaults and checks the configuration.
func (c *Config) Validate() error {
	if c.SidecarImage == "" {
		c.SidecarImage = "ghcr.io/fedmesh/fedmesh:dev"
	}
	if c.InitImage == "" {
		c.InitImage = c.SidecarImage
	}
	if c.InboundPort == 0 {
		c.InboundPort = 15006
	}
	if c.OutboundPort == 0 {
		c.OutboundPort = 15001
	}
	if c.ProbePort == 0 {
		c.ProbePort = 15021
	}
	if c.DNSPort == 0 {
		c.DNSPort = 15053
	}
	if c.ProxyUID == 0 {
		c.ProxyUID = 1337
	}
	if c.SocketSource == "" {
		c.SocketSource = SocketHostPath
	}
	if c.SocketDir == "" {
		c.SocketDir = "/run/spire/agent-sockets"
	}
	if c.SocketName == "" {
		c.SocketName = "spire-agent.sock"
	}
	if c.CSIDriver == "" {
		c.CSIDriver = "csi.spiffe.io"
	}
	if c.FailurePolicy == "" {
		c.FailurePolicy = Ignore
	}
	if len(c.SidecarCommand) == 0 {
		c.SidecarCommand = []string{"/usr/local/bin/fedmesh-sidecar"}
	}
	var errs []error
	for _, p := range append([]int32{c.InboundPort, c.OutboundPort, c.ProbePort, c.DNSPort}, c.ExcludeInboundPorts...) {
		if p < 1 || p > 65535 {
			errs = append(errs, fmt.Errorf("port %d out of range", p))
		}
	}
	if c.InboundPort == c.OutboundPort {
		errs = append(errs, fmt.Errorf("inbound and outbound port are both %d", c.InboundPort))
	}
	if c.ProbePort == c.InboundPort || c.ProbePort == c.OutboundPort {
		errs = append(errs, fmt.Errorf("probe port %d is also the inbound or outbound port", c.ProbePort))
	}
	if c.DNSPort == c.InboundPort || c.DNSPort == c.OutboundPort || c.DNSPort == c.ProbePort {
		errs = append(errs, fmt.Errorf("dns port %d is also the inbound, outbound or probe port", c.DNSPort))
	}
	if c.ProxyUID < 1 {
		errs = append(errs, fmt.Errorf("proxy uid %d must be positive", c.ProxyUID))
	}
	if c.SocketSource != SocketHostPath && c.SocketSource != SocketCSI {
		errs = append(errs, fmt.Errorf("socket source %q: want %q or %q", c.SocketSource, SocketHostPath, SocketCSI))
	}
	if !strings.HasPrefix(c.SocketDir, "/") {
		errs = append(errs, fmt.Errorf("socket dir %q must be absolute", c.SocketDir))
	}
	if c.FailurePolicy != Ignore && c.FailurePolicy != Fail {
		errs = append(errs, fmt.Errorf("failure policy %q: want %q or %q", c.FailurePolicy, Ignore, Fail))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("injector config: %w", err)
	}
	return nil
}

// Decision is why a pod was or was not injected; it is also the metric label.
type Decision string

// Decisions.
const (
	Injected        Decision = "injected"
	OptedOut        Decision = "opted_out"
	AlreadyInjected Decision = "already_injected"
)

// decide returns whether pod should be injected. Whether its namespace is
// enabled is the MutatingWebhookConfiguration's namespaceSelector's job: a
// pod that reaches the webhook is injected unless it opts out.
func decide(pod *corev1.Pod) (bool, Decision) {
	if pod.Annotations[AnnotationInjected] == "true" || hasContainer(pod.Spec.Containers, SidecarName) || hasContainer(pod.Spec.InitContainers, InitName) {
		return false, AlreadyInjected
	}
	for _, m := range []map[string]string{pod.Labels, pod.Annotations} {
		if v, ok := m[LabelInject]; ok && strings.EqualFold(v, "false") {
			return false, OptedOut
		}
	}
	return true, Injected
}

func hasContainer(cs []corev1.Container, name string) bool {
	return slices.ContainsFunc(cs, func(c corev1.Container) bool { return c.Name == name })
}

// patchOp is one RFC 6902 JSON patch operation.
type patchOp struct {
	Op    string `json:"op"`
	Path  string `json:"path"`
	Value any    `json:"value,omitempty"`
}

// Patch returns the JSON patch that injects pod, or an error when the pod
// cannot be injected safely.
func (c *Config) Patch(pod *corev1.Pod) ([]byte, error) {
	reserved := map[int32]bool{c.InboundPort: true, c.OutboundPort: true, c.ProbePort: true}
	if !c.NoDNSCapture {
		reserved[c.DNSPort] = true
	}
	for _, ct := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
		for _, p := range ct.Ports {
			if reserved[p.ContainerPort] {
				return nil, fmt.Errorf("container %s uses port %d, which the sidecar needs", ct.Name, p.ContainerPort)
			}
		}
	}
	if slices.ContainsFunc(pod.Spec.Volumes, func(v corev1.Volume) bool { return v.Name == SocketVolume }) {
		return nil, fmt.Errorf("pod already has a volume named %s", SocketVolume)
	}
	// Probes first: their paths use the pod's own container indexes, which
	// adding the init container shifts.
	ops, probes, err := c.rewriteProbes(pod)
	if err != nil {
		return nil, err
	}
	sidecar, err := c.sidecar(pod, probes)
	if err != nil {
		return nil, err
	}
	add := func(path string, exists bool, v any) {
		if exists {
			ops = append(ops, patchOp{"add", path + "/-", v})
		} else {
			ops = append(ops, patchOp{"add", path, []any{v}})
		}
	}
	// The init container runs first of all, so it goes to the front.
	if len(pod.Spec.InitContainers) > 0 {
		ops = append(ops, patchOp{"add", "/spec/initContainers/0", c.initContainer()})
	} else {
		ops = append(ops, patchOp{"add", "/spec/initContainers", []any{c.initContainer()}})
	}
	add("/spec/containers", len(pod.Spec.Containers) > 0, sidecar)
	add("/spec/volumes", len(pod.Spec.Volumes) > 0, c.socketVolume())
	if pod.Annotations == nil {
		ops = append(ops, patchOp{"add", "/metadata/annotations", map[string]string{AnnotationInjected: "true"}})
	} else {
		ops = append(ops, patchOp{"add", "/metadata/annotations/" + strings.ReplaceAll(AnnotationInjected, "/", "~1"), "true"})
	}
	return json.Marshal(ops)
}

// InitCommand is where the fedmesh image holds fedmesh-init (clusters/Dockerfile
// and the OCI images built without Docker put every binary there).
const InitCommand = "/usr/local/bin/fedmesh-init"

// Redirect is the redirect the init container installs (package
// injector/redirect): every inbound TCP connection to InboundPort (except
// to ProbePort and ExcludeInboundPorts), every outbound one (except the
// sidecar's own, by UID, and loopback) to OutboundPort, and unless
// NoDNSCapture outbound DNS (UDP and TCP port 53) to DNSPort; IPv4 and IPv6
// alike (one nftables table of family inet).
func (c *Config) Redirect() redirect.Rules {
	r := redirect.Rules{
		InboundPort: uint16(c.InboundPort), OutboundPort: uint16(c.OutboundPort), DNSPort: uint16(c.DNSPort),
		ProbePort: uint16(c.ProbePort), ProxyUID: uint32(c.ProxyUID), NoDNSCapture: c.NoDNSCapture,
	}
	for _, p := range c.ExcludeInboundPorts {
		r.ExcludeInboundPorts = append(r.ExcludeInboundPorts, uint16(p))
	}
	return r
}

// InitArgs are fedmesh-init's arguments for Redirect.
func (c *Config) InitArgs() []string {
	r := c.Redirect()
	args := []string{
		"--inbound-port=" + strconv.Itoa(int(r.InboundPort)),
		"--outbound-port=" + strconv.Itoa(int(r.OutboundPort)),
		"--dns-port=" + strconv.Itoa(int(r.DNSPort)),
		"--probe-port=" + strconv.Itoa(int(r.ProbePort)),
		"--proxy-uid=" + strconv.FormatUint(uint64(r.ProxyUID), 10),
	}
	if len(r.ExcludeInboundPorts) > 0 {
		ps := make([]string, len(r.ExcludeInboundPorts))
		for i, p := range r.ExcludeInboundPorts {
			ps[i] = strconv.Itoa(int(p))
		}
		args = append(args, "--exclude-inbound-ports="+strings.Join(ps, ","))
	}
	if r.NoDNSCapture {
		args = append(args, "--no-dns-capture")
	}
	return args
}

// sidecarArgs are the sidecar's arguments for pod: SidecarArgs when set,
// else the transparent outbound and, when the pod declares a TCP container
// port, the inbound handing plaintext to the first one.
func (c *Config) sidecarArgs(pod *corev1.Pod) []string {
	if len(c.SidecarArgs) > 0 {
		return c.SidecarArgs
	}
	args := []string{"--outbound-port=" + strconv.Itoa(int(c.OutboundPort))}
	if p := appPort(pod); p > 0 {
		args = append(args, "--inbound-port="+strconv.Itoa(int(c.InboundPort)), "--app=127.0.0.1:"+strconv.Itoa(int(p)))
	}
	return args
}

// appPort is the pod's first TCP container port, 0 when it declares none.
func appPort(pod *corev1.Pod) int32 {
	for _, ct := range pod.Spec.Containers {
		if ct.Name == SidecarName {
			continue
		}
		for _, p := range ct.Ports {
			if p.Protocol == "" || p.Protocol == corev1.ProtocolTCP {
				return p.ContainerPort
			}
		}
	}
	return 0
}

func (c *Config) initContainer() corev1.Container {
	f, t := false, true
	root := int64(0)
	return corev1.Container{
		Name:    InitName,
		Image:   c.InitImage,
		Command: []string{InitCommand},
		Args:    c.InitArgs(),
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                &root,
			RunAsNonRoot:             &f,
			AllowPrivilegeEscalation: &f,
			ReadOnlyRootFilesystem:   &t,
			Capabilities: &corev1.Capabilities{
				Add:  []corev1.Capability{"NET_ADMIN"}, // nftables over netlink needs nothing else
				Drop: []corev1.Capability{"ALL"},
			},
		},
	}
}

// sidecar is the sidecar container for pod, whose rewritten probes' originals
// are probes.
func (c *Config) sidecar(pod *corev1.Pod, probes map[string]appprobe.Probe) (corev1.Container, error) {
	f, t := false, true
	uid := c.ProxyUID
	env := []corev1.EnvVar{{Name: SocketEnv, Value: "unix://" + strings.TrimSuffix(c.SocketDir, "/") + "/" + c.SocketName}}
	if c.Cluster != "" {
		env = append(env, corev1.EnvVar{Name: EnvCluster, Value: c.Cluster})
	}
	if c.Discovery != "" {
		env = append(env, corev1.EnvVar{Name: EnvDiscovery, Value: c.Discovery})
	}
	if !c.NoDNSCapture {
		// localhost: 127.0.0.1 and ::1, where iptables and ip6tables
		// REDIRECT the app's queries.
		env = append(env, corev1.EnvVar{Name: EnvDNSAddr, Value: "localhost:" + strconv.Itoa(int(c.DNSPort))})
	}
	switch v, ok := pod.Annotations[AnnotationSocketIO]; {
	case !ok:
	case v == "auto" || v == "raw" || v == "std":
		env = append(env, corev1.EnvVar{Name: EnvSocketIO, Value: v})
	default:
		// Refused here, where the failure policy applies and the message
		// reaches the user, not at the sidecar's start.
		return corev1.Container{}, fmt.Errorf("annotation %s: %q is not auto, raw or std", AnnotationSocketIO, v)
	}
	probeAddr := ":" + strconv.Itoa(int(c.ProbePort))
	env = append(env, corev1.EnvVar{Name: appprobe.EnvAddr, Value: probeAddr})
	if len(probes) > 0 {
		v, err := probesEnv(probes)
		if err != nil {
			return corev1.Container{}, err
		}
		// What the sidecar would refuse at start fails here, where the
		// failure policy applies and the message reaches the user.
		if _, err := appprobe.Parse(v); err != nil {
			return corev1.Container{}, err
		}
		env = append(env, corev1.EnvVar{Name: appprobe.EnvProbes, Value: v})
	}
	return corev1.Container{
		Name:    SidecarName,
		Image:   c.SidecarImage,
		Command: c.SidecarCommand,
		Args:    c.sidecarArgs(pod),
		Env:     env,
		Ports: []corev1.ContainerPort{
			{Name: "fedmesh-in", ContainerPort: c.InboundPort, Protocol: corev1.ProtocolTCP},
			{Name: "fedmesh-out", ContainerPort: c.OutboundPort, Protocol: corev1.ProtocolTCP},
			{Name: "fedmesh-probe", ContainerPort: c.ProbePort, Protocol: corev1.ProtocolTCP},
		},
		// The sidecar's own readiness: its identity, and in transparent
		// mode the service directory (sidecar.Sidecar.Ready).
		ReadinessProbe: &corev1.Probe{
			ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Path: appprobe.ReadyPath, Port: intstr.FromInt32(c.ProbePort), Scheme: corev1.URISchemeHTTP,
			}},
			PeriodSeconds: 2,
		},
		VolumeMounts: []corev1.VolumeMount{{Name: SocketVolume, MountPath: c.SocketDir, ReadOnly: true}},
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                &uid,
			RunAsNonRoot:             &t,
			AllowPrivilegeEscalation: &f,
			ReadOnlyRootFilesystem:   &t,
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		},
	}, nil
}

func (c *Config) socketVolume() corev1.Volume {
	v := corev1.Volume{Name: SocketVolume}
	if c.SocketSource == SocketCSI {
		ro := true
		v.CSI = &corev1.CSIVolumeSource{Driver: c.CSIDriver, ReadOnly: &ro}
		return v
	}
	dir := corev1.HostPathDirectory
	v.HostPath = &corev1.HostPathVolumeSource{Path: c.SocketDir, Type: &dir}
	return v
}
