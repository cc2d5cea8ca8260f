package clusters

import (
	"context"
	"net"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/federation"
	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/kubecatalog"
)

// gatewayUser is the gateway's ServiceAccount as the API server sees it.
const gatewayUser = "system:serviceaccount:fedmesh-system:gateway"

// gatewayObjects are the rendered objects of the gateway in one overlay.
type gatewayObjects struct {
	deploy   *appsv1.Deployment
	services map[string]*corev1.Service // every rendered Service, by name
	peers    *corev1.ConfigMap
}

// flagValue is the value of the last --name=value in args.
func flagValue(args []string, name string) (string, bool) {
	v, ok := "", false
	for _, a := range args {
		if rest, found := strings.CutPrefix(a, "--"+name+"="); found {
			v, ok = rest, true
		}
	}
	return v, ok
}

// containerPort resolves a named or numbered port of c.
func containerPort(c *corev1.Container, p intstr.IntOrString) (corev1.ContainerPort, bool) {
	for _, cp := range c.Ports {
		if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
			return cp, true
		}
	}
	return corev1.ContainerPort{}, false
}

func hasPort(c *corev1.Container, name string, port int32, proto corev1.Protocol) bool {
	cp, ok := containerPort(c, intstr.FromString(name))
	return ok && cp.ContainerPort == port && cp.Protocol == proto
}

func selects(svc *corev1.Service, d *appsv1.Deployment) bool {
	if len(svc.Spec.Selector) == 0 {
		return false
	}
	for k, v := range svc.Spec.Selector {
		if d.Spec.Template.Labels[k] != v {
			return false
		}
	}
	return true
}

// checkGateway checks an overlay's gateway: the identity sidecars and peers
// expect, its cluster name, the probes reaching the admin endpoint, the
// Workload API socket mounted like the controller's, the peers file, the
// egress Service the federation controller reads and the tunnel Service
// peers reach.
func checkGateway(t *testing.T, cluster string, gw gatewayObjects, ctrl *appsv1.Deployment) {
	t.Helper()
	d := gw.deploy
	if d == nil {
		t.Fatal("no fedmesh-gateway Deployment")
	}
	if r := d.Spec.Replicas; r == nil || *r != 2 {
		t.Errorf("gateway replicas %v, want 2", r)
	}
	pod := d.Spec.Template.Spec
	if got := "/ns/" + d.Namespace + "/sa/" + pod.ServiceAccountName; got != gateway.DefaultGatewayPath {
		t.Errorf("gateway runs as %s in %s: SPIFFE path %s, but sidecars and peers accept %s", pod.ServiceAccountName, d.Namespace, got, gateway.DefaultGatewayPath)
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("gateway has %d containers, want 1", len(pod.Containers))
	}
	c := &pod.Containers[0]
	args := c.Args
	for _, want := range []string{"--cluster=" + cluster, "--in-cluster"} {
		if !slices.Contains(args, want) {
			t.Errorf("gateway args %q lack %s", args, want)
		}
	}
	for _, bad := range []string{"kubeconfig", "catalog", "peer"} {
		if v, ok := flagValue(args, bad); ok {
			t.Errorf("gateway has --%s=%s: exports come from the API server (--in-cluster), peers from the ConfigMap", bad, v)
		}
	}

	// Security and resources.
	if sc := pod.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Error("gateway pod may run as root")
	}
	if sc := c.SecurityContext; sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Errorf("gateway container security context %+v, want a read-only root, no privilege escalation, all capabilities dropped", sc)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("gateway resources %+v, want cpu and memory requests and a memory limit", c.Resources)
	}

	// Listeners and their container ports.
	for _, l := range []struct {
		flag, port string
		proto      corev1.Protocol
	}{{"tunnel-addr", "tunnel", corev1.ProtocolUDP}, {"egress-addr", "egress", corev1.ProtocolTCP}, {"egress-addr", "egress-quic", corev1.ProtocolUDP}, {"admin-addr", "admin", corev1.ProtocolTCP}} {
		v, _ := flagValue(args, l.flag)
		_, p, err := net.SplitHostPort(v)
		n, _ := strconv.Atoi(p)
		if err != nil || !hasPort(c, l.port, int32(n), l.proto) {
			t.Errorf("--%s=%q has no container port %s/%s on that port", l.flag, v, l.port, l.proto)
		}
	}
	// The kubelet probes the pod's address: the admin endpoint (default
	// 127.0.0.1) must listen there.
	admin, _ := flagValue(args, "admin-addr")
	if host, _, _ := net.SplitHostPort(admin); host != "" && host != "0.0.0.0" && host != "::" {
		t.Errorf("--admin-addr=%s: the kubelet's probes cannot reach it", admin)
	}
	for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" {
			t.Errorf("gateway %s probe %+v, want GET /healthz", name, p)
			continue
		}
		if cp, ok := containerPort(c, p.HTTPGet.Port); !ok || cp.Name != "admin" {
			t.Errorf("gateway %s probe on port %s, want the admin port", name, p.HTTPGet.Port.String())
		}
	}

	// The Workload API socket, the same way the controller gets it.
	mountOf := func(spec corev1.PodSpec, c *corev1.Container, match func(corev1.Volume) bool) (corev1.Volume, corev1.VolumeMount, bool) {
		for _, v := range spec.Volumes {
			if !match(v) {
				continue
			}
			for _, m := range c.VolumeMounts {
				if m.Name == v.Name {
					return v, m, true
				}
			}
		}
		return corev1.Volume{}, corev1.VolumeMount{}, false
	}
	spire := func(v corev1.Volume) bool { return v.HostPath != nil && strings.Contains(v.HostPath.Path, "spire") }
	cv, cm, ok1 := mountOf(ctrl.Spec.Template.Spec, &ctrl.Spec.Template.Spec.Containers[0], spire)
	gv, gm, ok2 := mountOf(pod, c, spire)
	ctrlSocket, _ := flagValue(ctrl.Spec.Template.Spec.Containers[0].Args, "spiffe-socket")
	gwSocket, _ := flagValue(args, "spiffe-socket")
	switch {
	case !ok1 || !ok2:
		t.Errorf("SPIRE agent socket mounted in controller %v, gateway %v", ok1, ok2)
	case !cmp.Equal(cv.HostPath, gv.HostPath) || cm.MountPath != gm.MountPath || !gm.ReadOnly || ctrlSocket != gwSocket:
		t.Errorf("gateway gets the Workload API as %+v at %s (read-only %v, --spiffe-socket=%s), the controller as %+v at %s (--spiffe-socket=%s)",
			gv.HostPath, gm.MountPath, gm.ReadOnly, gwSocket, cv.HostPath, cm.MountPath, ctrlSocket)
	}

	// Peers from the ConfigMap kind-e2e.sh (or an overlay) writes.
	peersFile, _ := flagValue(args, "peers-file")
	pv, pm, ok := mountOf(pod, c, func(v corev1.Volume) bool { return v.ConfigMap != nil && v.ConfigMap.Name == "fedmesh-gateway-peers" })
	if !ok || path.Join(pm.MountPath, "peers") != peersFile || pv.ConfigMap.Optional != nil && *pv.ConfigMap.Optional {
		t.Errorf("--peers-file=%s is not key peers of the ConfigMap fedmesh-gateway-peers (mounted: %v at %s)", peersFile, ok, pm.MountPath)
	}
	if gw.peers == nil {
		t.Error("no ConfigMap fedmesh-gateway-peers")
	} else if _, ok := gw.peers.Data["peers"]; !ok {
		t.Errorf("ConfigMap fedmesh-gateway-peers has no key peers: %v", gw.peers.Data)
	}
	// The stateless reset key is written at start: not on the read-only root.
	keyFile, _ := flagValue(args, "stateless-reset-key-file")
	if _, _, ok := mountOf(pod, c, func(v corev1.Volume) bool {
		if v.EmptyDir == nil {
			return false
		}
		for _, m := range c.VolumeMounts {
			if m.Name == v.Name && filepath.Dir(keyFile) == m.MountPath && !m.ReadOnly {
				return true
			}
		}
		return false
	}); keyFile == "" || !ok {
		t.Errorf("--stateless-reset-key-file=%q is not in a writable emptyDir", keyFile)
	}

	// The egress Service, read by the federation controller by name.
	if gateway.ServiceName != federation.GatewayService || gateway.AnnotationPeerRTT != federation.AnnotationPeerRTT {
		t.Fatalf("gateway writes %s on Service %s, the controller reads %s on %s", gateway.AnnotationPeerRTT, gateway.ServiceName, federation.AnnotationPeerRTT, federation.GatewayService)
	}
	svc := gw.services[federation.GatewayService]
	if svc == nil {
		t.Fatalf("no Service %s", federation.GatewayService)
	}
	if svc.Namespace != "fedmesh-system" || !selects(svc, d) || (svc.Spec.Type != "" && svc.Spec.Type != corev1.ServiceTypeClusterIP) {
		t.Errorf("Service %s/%s (type %q) must be a ClusterIP in fedmesh-system selecting the gateway pods", svc.Namespace, svc.Name, svc.Spec.Type)
	}
	if _, ok := svc.Annotations[federation.AnnotationPeerRTT]; ok {
		t.Errorf("Service %s sets %s: the gateways write it", svc.Name, federation.AnnotationPeerRTT)
	}
	egress := svc.Annotations[federation.AnnotationEgress]
	host, port, err := net.SplitHostPort(egress)
	if err != nil || host != svc.Name+"."+svc.Namespace+".svc" {
		t.Errorf("%s=%q, want %s.%s.svc:PORT", federation.AnnotationEgress, egress, svc.Name, svc.Namespace)
	}
	for _, proto := range []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP} {
		found := false
		for _, sp := range svc.Spec.Ports {
			if strconv.Itoa(int(sp.Port)) == port && sp.Protocol == proto {
				cp, ok := containerPort(c, sp.TargetPort)
				found = ok && cp.Protocol == proto && strings.HasPrefix(cp.Name, "egress")
			}
		}
		if !found {
			t.Errorf("Service %s has no %s port %s to the gateway's egress", svc.Name, proto, port)
		}
	}

	// The tunnel, reachable from other clusters: a fixed NodePort on kind.
	var tunnel *corev1.Service
	for _, s := range gw.services {
		for _, sp := range s.Spec.Ports {
			if cp, ok := containerPort(c, sp.TargetPort); ok && cp.Name == "tunnel" && selects(s, d) {
				tunnel = s
			}
		}
	}
	if tunnel == nil {
		t.Fatal("no Service exposes the gateway's tunnel port")
	}
	if tunnel.Spec.Type != corev1.ServiceTypeNodePort || len(tunnel.Spec.Ports) != 1 || tunnel.Spec.Ports[0].Protocol != corev1.ProtocolUDP ||
		tunnel.Spec.Ports[0].Port != 15443 || tunnel.Spec.Ports[0].NodePort == 0 {
		t.Errorf("tunnel Service %s = %+v, want a NodePort with only UDP 15443 on a fixed node port", tunnel.Name, tunnel.Spec)
	}
}

// TestGatewayRules lists everything the rendered RBAC grants the gateway's
// ServiceAccount: exactly what its catalog's informers read, and the patch
// of its own Service. No binding to a group reaches it either.
func TestGatewayRules(t *testing.T) {
	type grant struct {
		Scope string // "" cluster-wide, else the namespace
		Rule  rbacv1.PolicyRule
	}
	roles := map[string][]rbacv1.PolicyRule{} // "ClusterRole/name" or "Role/ns/name"
	type binding struct {
		scope, role string
		subjects    []rbacv1.Subject
	}
	var bindings []binding
	for _, u := range render(t, filepath.Join("overlays", "east")) {
		switch u.GetKind() {
		case "ClusterRole", "Role":
			var r rbacv1.Role
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &r); err != nil {
				t.Fatal(err)
			}
			key := "ClusterRole/" + r.Name
			if u.GetKind() == "Role" {
				key = "Role/" + r.Namespace + "/" + r.Name
			}
			roles[key] = r.Rules
		case "ClusterRoleBinding", "RoleBinding":
			var b rbacv1.RoleBinding
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &b); err != nil {
				t.Fatal(err)
			}
			role := b.RoleRef.Kind + "/" + b.RoleRef.Name
			if b.RoleRef.Kind == "Role" {
				role = "Role/" + b.Namespace + "/" + b.RoleRef.Name
			}
			bindings = append(bindings, binding{scope: b.Namespace, role: role, subjects: b.Subjects})
		}
	}
	var got []grant
	for _, b := range bindings {
		for _, s := range b.subjects {
			switch {
			case s.Kind == rbacv1.ServiceAccountKind && s.Namespace == "fedmesh-system" && s.Name == "gateway":
				for _, r := range roles[b.role] {
					got = append(got, grant{Scope: b.scope, Rule: r})
				}
			case s.Kind == rbacv1.GroupKind:
				t.Errorf("%s binds group %s: it would reach the gateway (and every other account)", b.role, s.Name)
			}
		}
	}
	read := []string{"list", "watch"}
	want := []grant{
		{"", rbacv1.PolicyRule{APIGroups: []string{"multicluster.x-k8s.io"}, Resources: []string{"serviceexports"}, Verbs: read}},
		{"", rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"services"}, Verbs: read}},
		{"", rbacv1.PolicyRule{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: read}},
		{"fedmesh-system", rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"services"}, ResourceNames: []string{"fedmesh-gateway"}, Verbs: []string{"patch"}}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("grants to the gateway (-want +got):\n%s", diff)
	}
}

// checkGatewayAccess runs, as the gateway's ServiceAccount (impersonated)
// against a real API server with the rendered RBAC installed, what the
// gateway does there: its catalog syncs and sees an export arrive, and it
// writes the RTT annotation on its Service, but not on a Service of
// another namespace.
func checkGatewayAccess(t *testing.T, ctx context.Context, c *cluster) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, u := range render(t, filepath.Join("overlays", "east")) {
		if u.GetKind() == "Service" && u.GetName() == gateway.ServiceName {
			if err := c.apply(ctx, u, false); err != nil {
				t.Fatalf("create Service %s: %v", u.GetName(), err)
			}
		}
	}
	as := rest.CopyConfig(c.cfg)
	as.Impersonate = rest.ImpersonationConfig{UserName: gatewayUser, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:fedmesh-system", "system:authenticated"}}
	kube := kubernetes.NewForConfigOrDie(as)
	cat := kubecatalog.New(kube, mcsclient.NewForConfigOrDie(as), 0, nil)
	if err := cat.Start(ctx, 30*time.Second); err != nil {
		t.Fatalf("the catalog as the gateway: %v", err)
	}

	// An export made by the admin reaches the gateway's informers.
	const ns = "gateway-rbac"
	admin := c.kube
	if _, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ready, port, name := true, int32(8080), "http"
	if _, err := admin.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "echo-1", Labels: map[string]string{discoveryv1.LabelServiceName: "echo"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.10.0.7"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := mcsclient.NewForConfigOrDie(c.cfg).MulticlusterV1beta1().ServiceExports(ns).Create(ctx,
		&mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "echo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		eps, exported := cat.Lookup(ns, "echo", 80)
		if exported && len(eps) == 1 && eps[0].Addr.String() == "10.10.0.7:8080" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the gateway's catalog never saw the export: exported=%v endpoints=%v", exported, eps)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// The RTT annotation: its own Service only.
	if err := gateway.PublishPeerRTT(ctx, kube, "fedmesh-system", map[string]int64{"west": 1234, "north": 35012}); err != nil {
		t.Fatalf("the RTT patch as the gateway: %v", err)
	}
	svc, err := admin.CoreV1().Services("fedmesh-system").Get(ctx, gateway.ServiceName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := svc.Annotations[gateway.AnnotationPeerRTT]; got != `{"north":35012,"west":1234}` {
		t.Errorf("annotation %s=%q after the patch", gateway.AnnotationPeerRTT, got)
	}
	if svc.Annotations[federation.AnnotationEgress] == "" {
		t.Errorf("the patch dropped %s: %v", federation.AnnotationEgress, svc.Annotations)
	}
	if _, err := admin.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: gateway.ServiceName},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 15444}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := gateway.PublishPeerRTT(ctx, kube, ns, map[string]int64{"west": 1}); !apierrors.IsForbidden(err) {
		t.Errorf("the RTT patch of %s/%s as the gateway: %v, want forbidden", ns, gateway.ServiceName, err)
	}
}
