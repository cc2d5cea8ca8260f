package fedctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
	"github.com/fedmesh/fedmesh/gateway"
)

// What status reads through the API server when it has only a kubeconfig:
// the components' pods (labels and admin ports as clusters/base deploys
// them) and their admin endpoints through the API server's pod proxy
// (/api/v1/namespaces/fedmesh-system/pods/<pod>:<port>/proxy/<path>). The
// controller is asked through its leader's pod, the one that probes peers.
const (
	appLabel            = "app.kubernetes.io/name"
	controllerApp       = "fedmesh-federation-controller"
	gatewayApp          = "fedmesh-gateway"
	controllerAdminPort = 9402  // --metrics-addr=:9402, container port "metrics"
	gatewayAdminPort    = 15000 // --admin-addr=:15000, container port "admin"
	leaseName           = "fedmesh-federation-controller"
	annotationTrust     = "multicluster.fedmesh.dev/trust-domain" // on a peer Secret (fedctl link)
	bundleKey           = "bundle.spiffe"                         // in ConfigMap trust-bundle-<cluster> (fedctl link)
	proxyTimeout        = 1500 * time.Millisecond                 // per request through the pod proxy
)

// Unknown is something status could not find out, and why.
type Unknown struct {
	What string `json:"what"`
	Why  string `json:"why"`
}

// ObjectStatus is one ServiceExport or ServiceImport with its conditions.
type ObjectStatus struct {
	Namespace  string      `json:"namespace"`
	Name       string      `json:"name"`
	Type       string      `json:"type,omitempty"`     // an import's ClusterSetIP or Headless
	Clusters   []string    `json:"clusters,omitempty"` // an import's source clusters
	Conditions []Condition `json:"conditions"`
}

// Condition is a status condition as its controller wrote it.
type Condition struct {
	Type    string `json:"type"`
	Status  string `json:"status"`
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message,omitempty"`
}

func conditions(cs []metav1.Condition) []Condition {
	out := make([]Condition, 0, len(cs))
	for _, c := range cs {
		out = append(out, Condition{Type: c.Type, Status: string(c.Status), Reason: c.Reason, Message: c.Message})
	}
	return out
}

func (cs *ClusterStatus) unknown(what string, format string, a ...any) {
	cs.Unknown = append(cs.Unknown, Unknown{What: what, Why: fmt.Sprintf(format, a...)})
}

// proxyGet GETs path from a pod's port through the API server's pod proxy.
func proxyGet(ctx context.Context, kube kubernetes.Interface, pod string, port int, path string) ([]byte, error) {
	// An admin endpoint that does not answer must not use up the time the
	// rest of the cluster's status needs.
	ctx, cancel := context.WithTimeout(ctx, proxyTimeout)
	defer cancel()
	b, err := kube.CoreV1().RESTClient().Get().Namespace(controlplane.SystemNamespace).Resource("pods").
		SubResource("proxy").Name(net.JoinHostPort(pod, strconv.Itoa(port))).Suffix(path).
		SetHeader("Accept", "application/json, */*").Do(ctx).Raw()
	if err != nil {
		return nil, fmt.Errorf("%s (GET /api/v1/namespaces/%s/pods/%s:%d/proxy/%s)", proxyError(err, b), controlplane.SystemNamespace, pod, port, strings.TrimPrefix(path, "/"))
	}
	return b, nil
}

// proxyError is the API server's answer to a failed proxy request: a Status
// whose message is the proxied error ("error trying to reach service: dial
// tcp ...: connection refused"), which client-go does not decode for a
// proxy subresource; else what client-go made of it.
func proxyError(err error, body []byte) string {
	var status metav1.Status
	if json.Unmarshal(body, &status) == nil && status.Kind == "Status" && status.Message != "" {
		return status.Message
	}
	if txt := strings.TrimSpace(string(body)); txt != "" && !strings.HasPrefix(txt, "{") && !strings.HasPrefix(txt, "k8s") {
		return firstLine(txt)
	}
	var st apierrors.APIStatus
	if errors.As(err, &st) {
		s := st.Status()
		msg := s.Message
		if s.Details != nil {
			for _, c := range s.Details.Causes {
				if m := strings.TrimSpace(c.Message); m != "" && !strings.Contains(msg, m) {
					msg += ": " + m
				}
			}
		}
		return msg
	}
	return err.Error()
}

// containerPort is the pod's port named name, else def.
func containerPort(p *corev1.Pod, name string, def int) int {
	for _, c := range p.Spec.Containers {
		for _, port := range c.Ports {
			if port.Name == name {
				return int(port.ContainerPort)
			}
		}
	}
	return def
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// gatherControllerAPI reads the controller's replicas from its pods, and its
// peers and version from the leader's admin endpoint through the API server.
func gatherControllerAPI(ctx context.Context, kube kubernetes.Interface, cs *ClusterStatus) {
	ns := controlplane.SystemNamespace
	pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: appLabel + "=" + controllerApp})
	if err != nil {
		cs.unknown("controller replicas", "list pods %s=%s in %s: %v", appLabel, controllerApp, ns, err)
	} else if len(pods.Items) == 0 {
		cs.unknown("controller replicas", "no pod %s=%s in %s: the controller runs outside this cluster's pods, or under other labels", appLabel, controllerApp, ns)
	} else {
		cs.Controller.Replicas = len(pods.Items)
		for i := range pods.Items {
			if podReady(&pods.Items[i]) {
				cs.Controller.Ready++
			}
		}
	}
	if cs.Controller.Leader == "" {
		cs.unknown("peers", "no federation controller holds the Lease %s/%s, so no controller admin endpoint to ask", ns, leaseName)
		return
	}
	pod, err := kube.CoreV1().Pods(ns).Get(ctx, cs.Controller.Leader, metav1.GetOptions{})
	if err != nil {
		cs.unknown("peers", "controller admin not reachable through the API server's pod proxy: the Lease holder %q is not a pod in %s (%v); its admin endpoint is reachable only where it runs", cs.Controller.Leader, ns, err)
		return
	}
	port := containerPort(pod, "metrics", controllerAdminPort)
	b, err := proxyGet(ctx, kube, pod.Name, port, "peers")
	if err != nil {
		cs.unknown("peers", "controller admin not reachable through the API server's pod proxy: %v", err)
		return
	}
	var peers []federation.PeerStatus
	if err := json.Unmarshal(b, &peers); err != nil {
		cs.unknown("peers", "controller admin /peers of pod %s: %v", pod.Name, err)
		return
	}
	cs.Peers = peers
	if len(peers) == 0 {
		cs.Peers = []federation.PeerStatus{}
	}
	if b, err := proxyGet(ctx, kube, pod.Name, port, "version"); err == nil {
		var v federation.BuildVersion
		if json.Unmarshal(b, &v) == nil && v.Version != "" {
			cs.Controller.Version = v.String()
		}
	}
}

// gatherGatewaysAPI reads every gateway replica's admin /state through the
// API server; the first one that answers names the trust domain.
func gatherGatewaysAPI(ctx context.Context, kube kubernetes.Interface, cs *ClusterStatus) {
	ns := controlplane.SystemNamespace
	pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: appLabel + "=" + gatewayApp})
	if err != nil {
		cs.unknown("gateways", "list pods %s=%s in %s: %v", appLabel, gatewayApp, ns, err)
		return
	}
	if len(pods.Items) == 0 {
		cs.unknown("gateways", "no gateway pod (%s=%s) in %s", appLabel, gatewayApp, ns)
		return
	}
	sort.Slice(pods.Items, func(i, j int) bool { return pods.Items[i].Name < pods.Items[j].Name })
	for i := range pods.Items {
		p := &pods.Items[i]
		port := containerPort(p, "admin", gatewayAdminPort)
		admin := fmt.Sprintf("pod %s:%d", p.Name, port)
		b, err := proxyGet(ctx, kube, p.Name, port, "state")
		if err != nil {
			cs.Gateways = append(cs.Gateways, GatewayStatus{Admin: admin, Error: "not reachable through the API server's pod proxy: " + err.Error()})
			continue
		}
		var st gateway.State
		if err := json.Unmarshal(b, &st); err != nil {
			cs.Gateways = append(cs.Gateways, GatewayStatus{Admin: admin, Error: "admin /state: " + err.Error()})
			continue
		}
		cs.Gateways = append(cs.Gateways, gatewayFromState(admin, &st))
		if cs.Trust == nil && st.TrustDomain != "" {
			cs.Trust = &TrustStatus{TrustDomain: st.TrustDomain, Source: "gateway " + p.Name}
		}
	}
}

// peerLinks is what members publish about each other (fedctl link): a peer
// Secret's trust-domain annotation and a trust bundle ConfigMap, by the
// cluster they describe.
type peerLinks struct {
	trustDomain map[string]string // cluster -> trust domain
	tdSource    map[string]string
	bundle      map[string][]byte
	bundleFrom  map[string]string
}

func (l *peerLinks) gather(ctx context.Context, kube kubernetes.Interface, context string) error {
	ns := controlplane.SystemNamespace
	secrets, err := kube.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{LabelSelector: federation.LabelPeerSecret + "=true"})
	if err != nil {
		return fmt.Errorf("list peer secrets: %w", err)
	}
	for _, s := range secrets.Items {
		cl, td := s.Labels[federation.LabelPeerCluster], s.Annotations[annotationTrust]
		if cl != "" && td != "" && l.trustDomain[cl] == "" {
			l.trustDomain[cl] = td
			l.tdSource[cl] = fmt.Sprintf("peer Secret %s/%s in %s", ns, s.Name, context)
		}
	}
	cms, err := kube.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list configmaps: %w", err)
	}
	for _, cm := range cms.Items {
		if cl, ok := strings.CutPrefix(cm.Name, "trust-bundle-"); ok && cm.Data[bundleKey] != "" && l.bundle[cl] == nil {
			l.bundle[cl] = []byte(cm.Data[bundleKey])
			l.bundleFrom[cl] = fmt.Sprintf("ConfigMap %s/%s in %s", ns, cm.Name, context)
		}
	}
	return nil
}

// fillTrust completes a cluster's trust from what the other members hold.
func (l *peerLinks) fillTrust(cs *ClusterStatus) {
	if cs.Trust == nil && l.trustDomain[cs.ClusterID] != "" {
		cs.Trust = &TrustStatus{TrustDomain: l.trustDomain[cs.ClusterID], Source: l.tdSource[cs.ClusterID]}
	}
	if cs.Trust == nil {
		cs.unknown("trust domain", "no gateway admin endpoint answered and no other member has a peer Secret (fedctl link) with the %s annotation for %s", annotationTrust, cs.ClusterID)
		return
	}
	b := l.bundle[cs.ClusterID]
	if b == nil {
		cs.unknown("trust roots", "no other member holds a ConfigMap trust-bundle-%s (fedctl link writes one when the bundle is known)", cs.ClusterID)
		return
	}
	id, err := spiffeid.TrustDomainFromString(cs.Trust.TrustDomain)
	if err == nil {
		var bundle *spiffebundle.Bundle
		if bundle, err = spiffebundle.Parse(id, b); err == nil {
			for _, c := range bundle.X509Authorities() {
				cs.Trust.Roots++
				if cs.Trust.RootsExpire.IsZero() || c.NotAfter.Before(cs.Trust.RootsExpire) {
					cs.Trust.RootsExpire = c.NotAfter
				}
			}
			return
		}
	}
	cs.unknown("trust roots", "%s: %v", l.bundleFrom[cs.ClusterID], err)
}
