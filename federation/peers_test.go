package federation_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/dynamic"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/policy/v1alpha1"
)

// TestPeerDownAndBack stops west's API server: east keeps west's endpoints,
// marked stale, until the stale bound, then withdraws them; when west
// returns, everything is back and changes made in west flow again. A
// FailoverPolicy with a staleAfter shorter than the bound takes west out of
// the service's discovery set earlier.
func TestPeerDownAndBack(t *testing.T) {
	need(t)
	ns := env.ns(t)
	env.service(t, "west", ns, "pay", nil)
	env.endpoints(t, "west", ns, "pay", "pay-1", []bool{true, true}, "10.2.0")
	env.export(t, "west", ns, "pay", nil)
	env.service(t, "north", ns, "pay", nil)
	env.endpoints(t, "north", ns, "pay", "pay-1", []bool{true}, "10.3.0")
	env.export(t, "north", ns, "pay", nil)
	eventually(t, converge, "import from west and north in east", func() error {
		sl, err := env.mirrored("east", ns, "pay")
		if err != nil || len(sl) != 2 {
			return fmt.Errorf("%d slices (%v)", len(sl), err)
		}
		return nil
	})

	env.mu.Lock()
	east := env.ctrls["east"].ctrl
	env.mu.Unlock()
	dyn := dynamic.NewForConfigOrDie(env.cp.Cluster("east").Config)
	createPolicy(t, dyn, "failoverpolicies", &v1alpha1.FailoverPolicy{TypeMeta: metav1.TypeMeta{Kind: "FailoverPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "pay"},
		Spec:       v1alpha1.FailoverPolicySpec{TargetRef: v1alpha1.TargetRef{Group: "multicluster.x-k8s.io", Kind: "ServiceImport", Name: "pay"}, StaleAfter: "1s"}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream := watchPolicy(t, ctx, discoveryClient(t, east), ns, "pay")
	remote := func(set *pb.EndpointSet) []string {
		var out []string
		for _, c := range set.Clusters[1:] {
			out = append(out, c.Name)
		}
		return out
	}
	stream.untilSet(t, "failover policy and both remote clusters", func(set *pb.EndpointSet) error {
		if p, _ := policy.Decode(set.Policy); p == nil || p.Failover == nil {
			return fmt.Errorf("policy %q", set.Policy)
		}
		if r := remote(set); len(r) != 2 {
			return fmt.Errorf("remote clusters %v", r)
		}
		return nil
	})

	west := env.cp.Cluster("west")
	downAt := time.Now()
	west.KillAPIServer()
	restarted := false
	defer func() {
		if !restarted {
			west.StartAPIServer(context.Background())
		}
	}()

	// Within a second or two: stale, but nothing lost.
	eventually(t, 3*time.Second, "west marked stale in east", func() error {
		si, err := env.getImport("east", ns, "pay")
		if err != nil {
			return err
		}
		if err := wantCondition(si.Status.Conditions, federation.ConditionStale, metav1.ConditionTrue, "PeerUnreachable"); err != nil {
			return err
		}
		if len(si.Status.Clusters) != 2 {
			return fmt.Errorf("clusters %v: west must be kept while stale", si.Status.Clusters)
		}
		sl, err := env.mirrored("east", ns, "pay")
		if err != nil {
			return err
		}
		for _, s := range sl {
			if s.Labels[mcsv1beta1.LabelSourceCluster] == "west" {
				if s.Labels[federation.LabelStale] != "true" || len(s.Endpoints) != 2 {
					return fmt.Errorf("west slice labels %v endpoints %d", s.Labels, len(s.Endpoints))
				}
				return nil
			}
		}
		return fmt.Errorf("west's slice is gone")
	})
	if got := gauge(t, "east", "fedmesh_federation_peer_stale", "west"); got != 1 {
		t.Errorf("fedmesh_federation_peer_stale{peer=west} = %v, want 1", got)
	}
	t.Logf("stale detected %s after the API server stopped", time.Since(downAt).Round(time.Millisecond))

	// staleAfter (1s) is shorter than the bound: west leaves the set first.
	stream.untilSet(t, "west out of the discovery set after staleAfter", func(set *pb.EndpointSet) error {
		if r := remote(set); len(r) != 1 || r[0] != "north" {
			return fmt.Errorf("remote clusters %v", r)
		}
		return nil
	})
	if d := time.Since(downAt); d >= staleBound {
		t.Errorf("west left the set %s after going down, not before the %s bound", d, staleBound)
	}

	// Past the bound: withdrawn, north unaffected.
	eventually(t, staleBound+3*time.Second, "west withdrawn after the stale bound", func() error {
		si, err := env.getImport("east", ns, "pay")
		if err != nil {
			return err
		}
		if len(si.Status.Clusters) != 1 || si.Status.Clusters[0].Cluster != "north" {
			return fmt.Errorf("clusters %v, want north only", si.Status.Clusters)
		}
		sl, _ := env.mirrored("east", ns, "pay")
		if len(sl) != 1 || sl[0].Labels[mcsv1beta1.LabelSourceCluster] != "north" {
			return fmt.Errorf("%d slices", len(sl))
		}
		return nil
	})
	if time.Since(downAt) < staleBound {
		t.Fatalf("withdrawn after %s, before the %s bound", time.Since(downAt), staleBound)
	}

	restarted = true
	if err := west.StartAPIServer(context.Background()); err != nil {
		t.Fatal(err)
	}
	eventually(t, converge, "west back in east", func() error {
		si, err := env.getImport("east", ns, "pay")
		if err != nil {
			return err
		}
		if err := wantCondition(si.Status.Conditions, federation.ConditionStale, metav1.ConditionFalse, "AllClustersReachable"); err != nil {
			return err
		}
		sl, _ := env.mirrored("east", ns, "pay")
		if len(sl) != 2 {
			return fmt.Errorf("%d slices", len(sl))
		}
		for _, s := range sl {
			if s.Labels[federation.LabelStale] != "" {
				return fmt.Errorf("slice %s still stale", s.Name)
			}
		}
		return nil
	})
	// Changes in west flow again.
	env.endpoints(t, "west", ns, "pay", "pay-1", []bool{true, true, true}, "10.2.0")
	eventually(t, converge, "new west endpoint in east", func() error {
		sl, _ := env.mirrored("east", ns, "pay")
		for _, s := range sl {
			if s.Labels[mcsv1beta1.LabelSourceCluster] == "west" && len(s.Endpoints) == 3 {
				return nil
			}
		}
		return fmt.Errorf("west slice does not have 3 endpoints yet")
	})
}

// TestBadPeerSecret gives east a Secret with a broken kubeconfig: an event
// says so, and every other peer keeps working.
func TestBadPeerSecret(t *testing.T) {
	need(t)
	ctx := context.Background()
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "peer-broken", Namespace: controlplane.SystemNamespace,
			Labels: map[string]string{federation.LabelPeerSecret: "true"}},
		Data: map[string][]byte{"kubeconfig": []byte("this: is: not a kubeconfig")},
	}
	if _, err := env.kube["east"].CoreV1().Secrets(controlplane.SystemNamespace).Create(ctx, sec, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer env.kube["east"].CoreV1().Secrets(controlplane.SystemNamespace).Delete(ctx, sec.Name, metav1.DeleteOptions{})
	eventually(t, converge, "warning event on the secret", func() error {
		evs, err := env.kube["east"].CoreV1().Events(controlplane.SystemNamespace).List(ctx, metav1.ListOptions{
			FieldSelector: fields.OneTermEqualSelector("involvedObject.name", sec.Name).String()})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Reason == "InvalidPeerKubeconfig" && e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, "peer-broken") {
				return nil
			}
		}
		return fmt.Errorf("no InvalidPeerKubeconfig event among %d", len(evs.Items))
	})
	// Other peers are unaffected.
	ns := env.ns(t)
	env.service(t, "west", ns, "still", nil)
	env.export(t, "west", ns, "still", nil)
	eventually(t, converge, "west still imported in east", func() error { _, err := env.getImport("east", ns, "still"); return err })

	// A Secret pointing at a dead address: a PeerUnreachable event, no harm.
	dead := sec.DeepCopy()
	dead.Name = "peer-dead"
	dead.ResourceVersion = ""
	dead.Data["kubeconfig"] = []byte(`apiVersion: v1
kind: Config
clusters: [{name: dead, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: dead, user: {token: x}}]
contexts: [{name: dead, context: {cluster: dead, user: dead}}]
current-context: dead
`)
	if _, err := env.kube["east"].CoreV1().Secrets(controlplane.SystemNamespace).Create(ctx, dead, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer env.kube["east"].CoreV1().Secrets(controlplane.SystemNamespace).Delete(ctx, dead.Name, metav1.DeleteOptions{})
	eventually(t, converge, "PeerUnreachable event", func() error {
		evs, err := env.kube["east"].CoreV1().Events(controlplane.SystemNamespace).List(ctx, metav1.ListOptions{
			FieldSelector: fields.OneTermEqualSelector("involvedObject.name", dead.Name).String()})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Reason == "PeerUnreachable" {
				return nil
			}
		}
		return fmt.Errorf("no PeerUnreachable event among %d", len(evs.Items))
	})
	env.service(t, "north", ns, "again", nil)
	env.export(t, "north", ns, "again", nil)
	eventually(t, converge, "north still imported in east", func() error { _, err := env.getImport("east", ns, "again"); return err })
}

// TestTwoReplicas runs a second east controller: it waits as a follower,
// takes over when the leader stops, and keeps the federation converging.
func TestTwoReplicas(t *testing.T) {
	need(t)
	env.mu.Lock()
	leader := env.ctrls["east"]
	env.mu.Unlock()
	follower, err := env.startController("east", fmt.Sprintf("replica-%d", env.seq.Add(1)), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-follower.ctrl.Leading():
		t.Fatal("the second replica leads while the first holds the lease")
	default:
	}
	// Both running: exports still converge, written once.
	ns := env.ns(t)
	env.service(t, "west", ns, "a", nil)
	env.export(t, "west", ns, "a", nil)
	eventually(t, converge, "import a in east", func() error { _, err := env.getImport("east", ns, "a"); return err })

	stopped := time.Now()
	leader.cancel()
	if err := <-leader.done; err != nil {
		t.Fatalf("leader stopped with %v", err)
	}
	select {
	case <-follower.ctrl.Leading():
		t.Logf("follower took over %s after the leader stopped", time.Since(stopped).Round(time.Millisecond))
	case <-time.After(5 * time.Second):
		t.Fatal("follower did not take over within 5s")
	}
	env.mu.Lock()
	env.ctrls["east"] = follower
	env.mu.Unlock()

	env.service(t, "west", ns, "b", nil)
	env.export(t, "west", ns, "b", nil)
	eventually(t, converge, "import b in east after failover", func() error { _, err := env.getImport("east", ns, "b"); return err })
	env.unexport(t, "west", ns, "a")
	eventually(t, converge, "import a withdrawn after failover", func() error {
		if _, err := env.getImport("east", ns, "a"); !apierrors.IsNotFound(err) {
			return fmt.Errorf("still there (%v)", err)
		}
		return nil
	})
}

func gauge(t *testing.T, cluster, name, peer string) float64 {
	t.Helper()
	v, ok := findGauge(t, cluster, name, "peer", peer)
	if !ok {
		t.Fatalf("metric %s{peer=%s} not found", name, peer)
	}
	return v
}

// gaugeLabels reads a gauge of a cluster's controller whose labels include
// the given name/value pairs (0 when there is none).
func gaugeLabels(t *testing.T, cluster, name string, kv ...string) float64 {
	t.Helper()
	v, _ := findGauge(t, cluster, name, kv...)
	return v
}

func findGauge(t *testing.T, cluster, name string, kv ...string) (float64, bool) {
	t.Helper()
	env.mu.Lock()
	reg := env.ctrls[cluster].reg
	env.mu.Unlock()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.Metric {
			for i := 0; i+1 < len(kv); i += 2 {
				if !hasLabel(m, kv[i], kv[i+1]) {
					continue next
				}
			}
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

func hasLabel(m *dto.Metric, k, v string) bool {
	for _, l := range m.Label {
		if l.GetName() == k && l.GetValue() == v {
			return true
		}
	}
	return false
}
