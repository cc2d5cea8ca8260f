package fedctl

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/fedmesh/fedmesh/clusters"
	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
	"github.com/fedmesh/fedmesh/federation/about"
)

// LinkInput is everything `fedctl link` says about a cluster.
type LinkInput struct {
	ClusterID      string
	APIServer      string
	CAData         []byte
	Token          string
	TokenExpires   time.Time
	TrustDomain    string
	Bundle         []byte // SPIFFE bundle JSON, when known
	BundleEndpoint string // https_spiffe URL, when known
	Gateways       []string
}

const peerReader = "fedmesh-peer-reader"

func newLinkCommand(g *globals) *cobra.Command {
	var apiServer, trustDomain string
	var ttl time.Duration
	var noCreate bool
	cmd := &cobra.Command{
		Use:   "link",
		Short: "Print what another cluster needs to federate with this one, as YAML to apply there",
		Long: `link prints, for the cluster of --context, the objects a peer cluster applies
to federate with it:

  - a Secret (fedmesh-system, labelled multicluster.fedmesh.dev/peer=true) with
    a kubeconfig whose token belongs to the read-only ServiceAccount
    fedmesh-peer-reader (created with its RBAC if missing, unless
    --no-create-reader); the peer's federation controller picks it up;
  - annotations naming the cluster's trust domain and gateway addresses;
  - when the trust bundle is known (local federation), a ConfigMap with it and
    a SPIRE ClusterFederatedTrustDomain that bootstraps trust explicitly.`,
		Example: `  fedctl link --context fedmesh-west > west-link.yaml
  kubectl --context fedmesh-east apply -f west-link.yaml
  fedctl link --kubeconfig ~/.kube/config --context prod-eu --api-server https://eu.example.invalid:6443`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.one()
			if err != nil {
				return err
			}
			in, err := gatherLink(cmd.Context(), m, apiServer, trustDomain, ttl, !noCreate)
			if err != nil {
				return err
			}
			out, err := renderLink(in)
			if err != nil {
				return err
			}
			_, err = g.out.Write(out)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&apiServer, "api-server", "", "API server URL as the peer reaches it (default: the kubeconfig's)")
	f.StringVar(&trustDomain, "trust-domain", "", "this cluster's SPIFFE trust domain (default: <cluster id>.fedmesh.test)")
	f.DurationVar(&ttl, "token-ttl", 365*24*time.Hour, "lifetime of the peer-reader token")
	f.BoolVar(&noCreate, "no-create-reader", false, "fail instead of creating the fedmesh-peer-reader ServiceAccount and RBAC")
	return cmd
}

func gatherLink(ctx context.Context, m member, apiServer, td string, ttl time.Duration, create bool) (*LinkInput, error) {
	kube, err := kubernetes.NewForConfig(m.config)
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(m.config)
	if err != nil {
		return nil, err
	}
	id, err := about.Get(ctx, dyn, about.ClusterIDProperty)
	if err != nil {
		return nil, fmt.Errorf("%s is not a fedmesh member (%w): install fedmesh there first", m.context, err)
	}
	in := &LinkInput{ClusterID: id, APIServer: orDefault(apiServer, m.config.Host), TrustDomain: orDefault(td, id+".fedmesh.test")}
	in.CAData = m.config.CAData
	if len(in.CAData) == 0 && m.config.CAFile != "" {
		if in.CAData, err = os.ReadFile(m.config.CAFile); err != nil {
			return nil, fmt.Errorf("read the API server's CA: %w", err)
		}
	}
	if create {
		if err := ensurePeerReader(ctx, kube); err != nil {
			return nil, err
		}
	}
	secs := int64(ttl.Seconds())
	tr, err := kube.CoreV1().ServiceAccounts(controlplane.SystemNamespace).CreateToken(ctx, peerReader,
		&authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &secs}}, metav1.CreateOptions{})
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("ServiceAccount %s/%s does not exist in %s: install fedmesh's manifests or drop --no-create-reader", controlplane.SystemNamespace, peerReader, m.context)
	}
	if err != nil {
		return nil, fmt.Errorf("token for %s/%s: %w", controlplane.SystemNamespace, peerReader, err)
	}
	in.Token, in.TokenExpires = tr.Status.Token, tr.Status.ExpirationTimestamp.Time
	if m.local != nil {
		in.TrustDomain = orDefault(td, m.local.TrustDomain)
		in.BundleEndpoint = m.local.BundleEndpoint
		if b, err := os.ReadFile(m.local.Bundle); err == nil {
			in.Bundle = b
		}
		for _, gw := range m.local.Gateways {
			in.Gateways = append(in.Gateways, gw.Tunnel)
		}
	} else if gw, err := kube.CoreV1().Services(controlplane.SystemNamespace).Get(ctx, federation.GatewayService, metav1.GetOptions{}); err == nil {
		in.Gateways = gatewayAddresses(gw)
	}
	return in, nil
}

// gatewayAddresses are the tunnel addresses of a gateway Service: its load
// balancer's, or its node ports' when there is no load balancer.
func gatewayAddresses(svc *corev1.Service) []string {
	port := int32(15443)
	var nodePort int32
	for _, p := range svc.Spec.Ports {
		if p.Name == "tunnel" {
			port, nodePort = p.Port, p.NodePort
		}
	}
	var out []string
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		host := orDefault(ing.IP, ing.Hostname)
		out = append(out, fmt.Sprintf("%s:%d", host, port))
	}
	if len(out) == 0 && nodePort != 0 {
		out = append(out, fmt.Sprintf("<node-address>:%d", nodePort))
	}
	return out
}

// ensurePeerReader applies the embedded peer-reader ServiceAccount and RBAC
// (clusters/base/controller/peer-reader.yaml) when they are missing.
func ensurePeerReader(ctx context.Context, kube kubernetes.Interface) error {
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(clusters.PeerReader), 4096)
	for {
		var raw map[string]any
		if err := dec.Decode(&raw); err == io.EOF {
			return nil
		} else if err != nil {
			return fmt.Errorf("embedded peer-reader manifest: %w", err)
		}
		b, err := sigsyaml.Marshal(raw)
		if err != nil {
			return err
		}
		var created error
		switch raw["kind"] {
		case "ServiceAccount":
			var sa corev1.ServiceAccount
			if err := sigsyaml.UnmarshalStrict(b, &sa); err != nil {
				return err
			}
			sa.Namespace = controlplane.SystemNamespace
			_, created = kube.CoreV1().ServiceAccounts(sa.Namespace).Create(ctx, &sa, metav1.CreateOptions{})
		case "ClusterRole":
			var cr rbacv1.ClusterRole
			if err := sigsyaml.UnmarshalStrict(b, &cr); err != nil {
				return err
			}
			_, created = kube.RbacV1().ClusterRoles().Create(ctx, &cr, metav1.CreateOptions{})
		case "ClusterRoleBinding":
			var crb rbacv1.ClusterRoleBinding
			if err := sigsyaml.UnmarshalStrict(b, &crb); err != nil {
				return err
			}
			_, created = kube.RbacV1().ClusterRoleBindings().Create(ctx, &crb, metav1.CreateOptions{})
		default:
			return fmt.Errorf("embedded peer-reader manifest: unexpected kind %v", raw["kind"])
		}
		if created != nil && !apierrors.IsAlreadyExists(created) {
			return fmt.Errorf("create %v %s: %w", raw["kind"], peerReader, created)
		}
	}
}

// renderLink writes the objects a peer applies, as one YAML stream.
func renderLink(in *LinkInput) ([]byte, error) {
	kc := clientcmdapi.NewConfig()
	kc.Clusters[in.ClusterID] = &clientcmdapi.Cluster{Server: in.APIServer, CertificateAuthorityData: in.CAData}
	kc.AuthInfos[peerReader] = &clientcmdapi.AuthInfo{Token: in.Token}
	kc.Contexts[in.ClusterID] = &clientcmdapi.Context{Cluster: in.ClusterID, AuthInfo: peerReader}
	kc.CurrentContext = in.ClusterID
	kcBytes, err := clientcmd.Write(*kc)
	if err != nil {
		return nil, err
	}
	var docs []any
	secret := map[string]any{
		"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
		"metadata": map[string]any{
			"name": "peer-" + in.ClusterID, "namespace": controlplane.SystemNamespace,
			"labels": map[string]string{federation.LabelPeerSecret: "true", federation.LabelPeerCluster: in.ClusterID},
			"annotations": map[string]string{
				"multicluster.fedmesh.dev/trust-domain":      in.TrustDomain,
				"multicluster.fedmesh.dev/gateway-addresses": strings.Join(in.Gateways, ","),
				"multicluster.fedmesh.dev/token-expires":     in.TokenExpires.UTC().Format(time.RFC3339),
			},
		},
		"stringData": map[string]string{"kubeconfig": string(kcBytes)},
	}
	docs = append(docs, secret)
	if len(in.Bundle) > 0 {
		docs = append(docs, map[string]any{
			"apiVersion": "v1", "kind": "ConfigMap",
			"metadata": map[string]any{"name": "trust-bundle-" + in.ClusterID, "namespace": controlplane.SystemNamespace},
			"data":     map[string]string{"bundle.spiffe": string(in.Bundle)},
		})
		if in.BundleEndpoint != "" {
			docs = append(docs, map[string]any{
				"apiVersion": "spire.spiffe.io/v1alpha1", "kind": "ClusterFederatedTrustDomain",
				"metadata": map[string]any{"name": in.ClusterID},
				"spec": map[string]any{
					"trustDomain":           in.TrustDomain,
					"bundleEndpointURL":     in.BundleEndpoint,
					"bundleEndpointProfile": map[string]any{"type": "https_spiffe", "endpointSPIFFEID": "spiffe://" + in.TrustDomain + "/fedmesh/issuer"},
					"trustDomainBundle":     string(in.Bundle),
				},
			})
		}
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "# fedmesh link: apply in a peer cluster to federate it with cluster %q.\n", in.ClusterID)
	fmt.Fprintf(&buf, "# The token is valid until %s; run fedctl link again before then.\n", in.TokenExpires.UTC().Format(time.RFC3339))
	if len(in.Bundle) == 0 {
		buf.WriteString("# The trust bundle is not known here: bootstrap SPIRE federation with spire-config/bootstrap-federation.sh.\n")
	}
	for _, d := range docs {
		b, err := sigsyaml.Marshal(d)
		if err != nil {
			return nil, err
		}
		buf.WriteString("---\n")
		buf.Write(b)
	}
	return buf.Bytes(), nil
}
