package fedctl

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
)

const (
	// CanaryService is what the canary-shift drill exports from the canary
	// cluster (in namespace demo): the same echo pods under another name, so
	// the target cluster can route a share of demo/echo to a ServiceImport
	// served only there.
	CanaryService = "echo-canary"
	canaryRoute   = "echo-canary-shift"
	echoPort      = 8080
)

func newCanaryShiftDrill(g *globals) *cobra.Command {
	var target, canary, junit string
	var rate, from, to int
	var hold, settle, maxFollow time.Duration
	var tolerance float64
	cmd := &cobra.Command{
		Use:   "canary-shift",
		Short: "Move an HTTPRoute weight between a local Service and a remote ServiceImport under load; measure how fast traffic follows",
		Long: `canary-shift exports demo/echo-canary from --canary-cluster (the same echo pods
under another name), attaches an HTTPRoute to demo/echo in --cluster that
splits it between the local Service demo/echo and the ServiceImport
demo/echo-canary (weights 100-FROM and FROM), sends a steady load of GETs
through --cluster's client sidecar, then changes the weights to 100-TO and TO.
It measures: failed requests (objective: none), the time from the route
update to the first answer from the canary cluster, the time until the
canary's share over a sliding window of requests is within --tolerance of TO,
and the canary's share over the rest of the hold. Everything it created is
deleted at the end.`,
		Example: `  fedctl drill canary-shift
  fedctl drill canary-shift --cluster east --canary-cluster north --from 10 --to 50 -o json`,
		Args: noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			if rate < 10 || rate > 5000 {
				return nil, usagef("--rate must be 10..5000 requests per second")
			}
			if from < 0 || from > 100 || to < 0 || to > 100 || from == to {
				return nil, usagef("--from and --to must be different percentages (0..100)")
			}
			if tolerance <= 0 || tolerance >= 50 {
				return nil, usagef("--tolerance must be between 0 and 50 percentage points")
			}
			return drillCanaryShift(ctx, g, target, canary, rate, from, to, settle, hold, maxFollow, tolerance)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "east", "the cluster whose client is routed")
	cmd.Flags().StringVar(&canary, "canary-cluster", "", "the cluster that serves the canary (default: the first other cluster)")
	cmd.Flags().IntVar(&rate, "rate", 300, "requests per second")
	cmd.Flags().IntVar(&from, "from", 0, "canary weight (percent) before the shift")
	cmd.Flags().IntVar(&to, "to", 50, "canary weight (percent) after the shift")
	cmd.Flags().DurationVar(&settle, "settle", 2*time.Second, "load before the shift")
	cmd.Flags().DurationVar(&hold, "hold", 5*time.Second, "load after the shift")
	cmd.Flags().DurationVar(&maxFollow, "max-follow", 2*time.Second, "objective: the canary share is within tolerance of --to this soon after the route update")
	cmd.Flags().Float64Var(&tolerance, "tolerance", 5, "allowed distance of the canary share from --to, in percentage points")
	return withReportFlags(g, cmd, &junit)
}

func drillCanaryShift(ctx context.Context, g *globals, target, canary string, rate, from, to int, settle, hold, maxFollow time.Duration, tolerance float64) (*DrillReport, error) {
	_, _, others, url, err := g.drillTarget(target)
	if err != nil {
		return nil, err
	}
	if canary == "" {
		if len(others) == 0 {
			return nil, usagef("canary-shift needs a second cluster")
		}
		canary = others[0]
	}
	if canary == target {
		return nil, usagef("--canary-cluster must differ from --cluster")
	}
	tcfg, err := g.localConfig(target)
	if err != nil {
		return nil, err
	}
	ccfg, err := g.localConfig(canary)
	if err != nil {
		return nil, err
	}
	say := g.say

	cleanup, err := ExportCanary(ctx, ccfg)
	defer cleanup()
	if err != nil {
		return nil, fmt.Errorf("export demo/%s from %s: %w", CanaryService, canary, err)
	}
	say("exported demo/%s from %s (its echo pods under another name)", CanaryService, canary)
	if err := waitImportReady(ctx, tcfg, CanaryService, 30*time.Second); err != nil {
		return nil, fmt.Errorf("%s: %w", target, err)
	}
	gw, err := gwclient.NewForConfig(tcfg)
	if err != nil {
		return nil, err
	}
	routes := gw.GatewayV1().HTTPRoutes("demo")
	_ = routes.Delete(ctx, canaryRoute, metav1.DeleteOptions{})
	route := canaryHTTPRoute(from)
	if _, err := routes.Create(ctx, route, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create HTTPRoute demo/%s in %s: %w", canaryRoute, target, err)
	}
	defer routes.Delete(context.Background(), canaryRoute, metav1.DeleteOptions{})
	if err := waitRouteAccepted(ctx, gw, 1, 15*time.Second); err != nil {
		return nil, fmt.Errorf("%s: %w", target, err)
	}
	say("HTTPRoute demo/%s accepted in %s: demo/echo -> Service echo %d%%, ServiceImport %s %d%%", canaryRoute, target, 100-from, CanaryService, from)

	lctx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	done := make(chan []sample, 1)
	go func() { done <- load(lctx, url, rate, 5*time.Second) }()
	say("load: %d GET/s through %s's client sidecar to demo/echo", rate, target)
	time.Sleep(settle)

	cur, err := routes.Get(ctx, canaryRoute, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	setCanaryWeights(cur, to)
	shiftAt := time.Now()
	if _, err := routes.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		return nil, fmt.Errorf("update HTTPRoute demo/%s: %w", canaryRoute, err)
	}
	say("weights moved to %d%% / %d%%", 100-to, to)
	time.Sleep(hold)
	stopLoad()
	samples := <-done

	r := &DrillReport{Scenario: "canary-shift", Target: target, Passed: true}
	failed, total := 0, len(samples)
	var before, beforeCanary int
	for _, s := range samples {
		if !s.ok {
			failed++
			continue
		}
		if s.end.Before(shiftAt) && s.start.After(shiftAt.Add(-settle/2)) {
			before++
			if s.servedBy == canary {
				beforeCanary++
			}
		}
	}
	say("%d requests, %d failed", total, failed)
	r.Results = append(r.Results, DrillResult{Figure: "failed requests", Value: float64(failed), Unit: fmt.Sprintf("of %d", total), Objective: "0", Met: failed == 0})
	r.Passed = r.Passed && failed == 0
	if before > 0 {
		share := 100 * float64(beforeCanary) / float64(before)
		met := math.Abs(share-float64(from)) <= tolerance
		r.Results = append(r.Results, DrillResult{Figure: "canary share before the shift", Value: round1(share), Unit: "%",
			Objective: fmt.Sprintf("%d ± %.0f", from, tolerance), Met: met})
		r.Passed = r.Passed && met
	}
	first, follow, after := canaryFollow(samples, canary, shiftAt, to, tolerance, rate)
	if to > from {
		var ferr error
		if first < 0 {
			ferr = fmt.Errorf("no canary answer")
		}
		r.add("route update to first canary answer", max(first, 0), maxFollow, ferr)
	}
	var ferr error
	if follow < 0 {
		ferr = fmt.Errorf("never within tolerance")
	}
	r.add(fmt.Sprintf("route update until the canary share is %d ± %.0f%%", to, tolerance), max(follow, 0), maxFollow, ferr)
	met := !math.IsNaN(after) && math.Abs(after-float64(to)) <= tolerance
	r.Results = append(r.Results, DrillResult{Figure: "canary share after it followed", Value: round1(after), Unit: "%",
		Objective: fmt.Sprintf("%d ± %.0f", to, tolerance), Met: met})
	r.Passed = r.Passed && met
	return r, nil
}

// canaryFollow measures, from the samples after the route update: the time
// to the first answer from the canary cluster; the time until the canary's
// share over a sliding window of requests (a quarter second of load, at
// least 50) is within tol of to; and the share over every request started
// after that point.
func canaryFollow(samples []sample, canary string, shiftAt time.Time, to int, tol float64, rate int) (first, follow time.Duration, after float64) {
	first, follow, after = -1, -1, math.NaN()
	var post []sample
	for _, s := range samples {
		if s.ok && !s.start.Before(shiftAt) {
			post = append(post, s)
		}
	}
	for _, s := range post {
		if s.servedBy == canary {
			first = s.end.Sub(shiftAt)
			break
		}
	}
	w := max(50, rate/4)
	if len(post) < w {
		return first, follow, after
	}
	n := 0
	for i, s := range post {
		if s.servedBy == canary {
			n++
		}
		if i >= w && post[i-w].servedBy == canary {
			n--
		}
		if i+1 >= w && math.Abs(100*float64(n)/float64(w)-float64(to)) <= tol {
			follow = s.end.Sub(shiftAt)
			rest := post[i+1:]
			if len(rest) > 0 {
				c := 0
				for _, s := range rest {
					if s.servedBy == canary {
						c++
					}
				}
				after = 100 * float64(c) / float64(len(rest))
			}
			break
		}
	}
	return first, follow, after
}

func round1(v float64) float64 { return math.Round(v*10) / 10 }

func canaryHTTPRoute(canaryWeight int) *gatewayv1.HTTPRoute {
	port := gatewayv1.PortNumber(echoPort)
	mcsGroup := gatewayv1.Group(mcsv1beta1.GroupName)
	importKind := gatewayv1.Kind("ServiceImport")
	coreGroup := gatewayv1.Group("")
	svcKind := gatewayv1.Kind("Service")
	r := &gatewayv1.HTTPRoute{
		ObjectMeta: metav1.ObjectMeta{Name: canaryRoute, Namespace: "demo", Labels: map[string]string{"app.kubernetes.io/managed-by": "fedctl-drill"}},
		Spec: gatewayv1.HTTPRouteSpec{
			CommonRouteSpec: gatewayv1.CommonRouteSpec{ParentRefs: []gatewayv1.ParentReference{{Group: &coreGroup, Kind: &svcKind, Name: "echo", Port: &port}}},
			Rules: []gatewayv1.HTTPRouteRule{{BackendRefs: []gatewayv1.HTTPBackendRef{
				{BackendRef: gatewayv1.BackendRef{BackendObjectReference: gatewayv1.BackendObjectReference{Group: &coreGroup, Kind: &svcKind, Name: "echo", Port: &port}}},
				{BackendRef: gatewayv1.BackendRef{BackendObjectReference: gatewayv1.BackendObjectReference{Group: &mcsGroup, Kind: &importKind, Name: CanaryService, Port: &port}}},
			}}},
		},
	}
	setCanaryWeights(r, canaryWeight)
	return r
}

func setCanaryWeights(r *gatewayv1.HTTPRoute, canaryWeight int) {
	refs := r.Spec.Rules[0].BackendRefs
	refs[0].Weight = new(int32(100 - canaryWeight))
	refs[1].Weight = new(int32(canaryWeight))
}

// ExportCanary creates, in the canary cluster, Service demo/echo-canary, an
// EndpointSlice with the echo pods' endpoints and a ServiceExport. The
// returned func deletes them (it is safe to call after an error). The
// canary-shift drill uses it, and so do the end-to-end tests.
func ExportCanary(ctx context.Context, cfg *rest.Config) (func(), error) {
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return func() {}, err
	}
	mcs, err := mcsclient.NewForConfig(cfg)
	if err != nil {
		return func() {}, err
	}
	cleanup := func() {
		bg, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = mcs.MulticlusterV1beta1().ServiceExports("demo").Delete(bg, CanaryService, metav1.DeleteOptions{})
		_ = kube.DiscoveryV1().EndpointSlices("demo").Delete(bg, CanaryService+"-local", metav1.DeleteOptions{})
		_ = kube.CoreV1().Services("demo").Delete(bg, CanaryService, metav1.DeleteOptions{})
	}
	src, err := kube.DiscoveryV1().EndpointSlices("demo").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=echo,!" + mcsv1beta1.LabelSourceCluster})
	if err != nil {
		return cleanup, err
	}
	if len(src.Items) == 0 {
		return cleanup, fmt.Errorf("demo/echo has no EndpointSlice of its own pods")
	}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: CanaryService, Namespace: "demo"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: echoPort, AppProtocol: new("http")}}}}
	if _, err := kube.CoreV1().Services("demo").Create(ctx, svc, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return cleanup, err
	}
	sl := src.Items[0].DeepCopy()
	sl.ObjectMeta = metav1.ObjectMeta{Name: CanaryService + "-local", Namespace: "demo", Labels: map[string]string{
		discoveryv1.LabelServiceName: CanaryService, discoveryv1.LabelManagedBy: "fedctl-drill"}}
	if _, err := kube.DiscoveryV1().EndpointSlices("demo").Create(ctx, sl, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return cleanup, err
	}
	se := &mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: CanaryService, Namespace: "demo"}}
	if _, err := mcs.MulticlusterV1beta1().ServiceExports("demo").Create(ctx, se, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return cleanup, err
	}
	return cleanup, nil
}

// waitImportReady waits until the cluster has ServiceImport demo/name with
// Ready=True.
func waitImportReady(ctx context.Context, cfg *rest.Config, name string, timeout time.Duration) error {
	mcs, err := mcsclient.NewForConfig(cfg)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for {
		imp, err := mcs.MulticlusterV1beta1().ServiceImports("demo").Get(ctx, name, metav1.GetOptions{})
		if err == nil && meta.IsStatusConditionTrue(imp.Status.Conditions, string(mcsv1beta1.ServiceImportConditionReady)) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("ServiceImport demo/%s not ready after %s (last error: %v)", name, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// waitRouteAccepted waits until fedmesh's controller reports the drill's
// route Accepted and ResolvedRefs for generation gen or later.
func waitRouteAccepted(ctx context.Context, gw gwclient.Interface, gen int64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		r, err := gw.GatewayV1().HTTPRoutes("demo").Get(ctx, canaryRoute, metav1.GetOptions{})
		if err == nil {
			for _, p := range r.Status.Parents {
				if string(p.ControllerName) == MeshControllerName &&
					meta.IsStatusConditionTrue(p.Conditions, string(gatewayv1.RouteConditionAccepted)) &&
					meta.IsStatusConditionTrue(p.Conditions, string(gatewayv1.RouteConditionResolvedRefs)) {
					if c := meta.FindStatusCondition(p.Conditions, string(gatewayv1.RouteConditionAccepted)); c.ObservedGeneration >= gen {
						return nil
					}
				}
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("HTTPRoute demo/%s not accepted by %s after %s (status: %v, error: %v)", canaryRoute, MeshControllerName, timeout, routeConditions(r), err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func routeConditions(r *gatewayv1.HTTPRoute) []string {
	if r == nil {
		return nil
	}
	var out []string
	for _, p := range r.Status.Parents {
		for _, c := range p.Conditions {
			out = append(out, fmt.Sprintf("%s=%s %s: %s", c.Type, c.Status, c.Reason, c.Message))
		}
	}
	return out
}

// localConfig is the REST config of a local federation cluster by name.
func (g *globals) localConfig(name string) (*rest.Config, error) {
	ms, _, err := g.members()
	if err != nil {
		return nil, err
	}
	for _, m := range ms {
		if m.local != nil && m.local.Name == name {
			return m.config, nil
		}
	}
	return nil, usagef("cluster %q is not in the local federation", name)
}
