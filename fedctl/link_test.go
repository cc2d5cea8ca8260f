package fedctl_test

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	"sigs.k8s.io/yaml"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/fedctl"
	"github.com/fedmesh/fedmesh/federation"
)

// TestLinkFederatesThroughSecret links cluster b into cluster a the way a
// user does: `fedctl link` against b, its Secret applied in a. a's
// controller, which has no static peers, then imports what b exports, with
// nothing but the read-only peer-reader token.
func TestLinkFederatesThroughSecret(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"a", "b"}})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	a, b := cp.Cluster("a"), cp.Cluster("b")
	ctrl, err := federation.New(federation.Options{Config: a.Config, ProbeInterval: 250 * time.Millisecond,
		LeaderElection: federation.LeaderElection{Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- ctrl.Run(ctx) }()
	defer func() { cancel(); <-done }()

	kc := filepath.Join(t.TempDir(), "b.kubeconfig")
	if err := clientcmd.WriteToFile(*controlplane.KubeconfigFor(map[string]*rest.Config{"b": b.Config}, "b"), kc); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	cmd := fedctl.NewCommand(&out, &errOut)
	cmd.SetArgs([]string{"link", "--kubeconfig", kc, "--context", "b", "--token-ttl", "1h", "--dir", t.TempDir()})
	if err := cmd.ExecuteContext(ctx); err != nil {
		t.Fatalf("link: %v\n%s", err, errOut.String())
	}
	if !strings.Contains(out.String(), "kind: Secret") || strings.Contains(out.String(), "system:masters") {
		t.Fatalf("link output:\n%s", out.String())
	}
	var sec corev1.Secret
	if err := yaml.Unmarshal([]byte(strings.Split(out.String(), "---\n")[1]), &sec); err != nil {
		t.Fatal(err)
	}
	// The token must not be the admin's: it may read, never write.
	peerCfg, err := clientcmd.RESTConfigFromKubeConfig([]byte(sec.StringData["kubeconfig"]))
	if err != nil {
		t.Fatal(err)
	}
	peerKube := kubernetes.NewForConfigOrDie(peerCfg)
	if _, err := peerKube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "nope"}}, metav1.CreateOptions{}); err == nil {
		t.Error("the peer-reader token can create namespaces")
	}

	kubeA := kubernetes.NewForConfigOrDie(a.Config)
	if _, err := kubeA.CoreV1().Secrets(controlplane.SystemNamespace).Create(ctx, &sec, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubeB := kubernetes.NewForConfigOrDie(b.Config)
	for _, k := range []kubernetes.Interface{kubeA, kubeB} {
		if _, err := k.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := kubeB.CoreV1().Services("shop").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "cart"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := mcsclient.NewForConfigOrDie(b.Config).MulticlusterV1beta1().ServiceExports("shop").Create(ctx,
		&mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "cart"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mcsA := mcsclient.NewForConfigOrDie(a.Config)
	deadline := time.Now().Add(20 * time.Second)
	for {
		si, err := mcsA.MulticlusterV1beta1().ServiceImports("shop").Get(ctx, "cart", metav1.GetOptions{})
		if err == nil && len(si.Status.Clusters) == 1 && si.Status.Clusters[0].Cluster == "b" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a never imported b's export through the linked Secret (last: %v); peers: %+v", err, ctrl.Peers())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
