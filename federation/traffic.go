package federation

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"
	gwclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gwinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"
	gwlisters "sigs.k8s.io/gateway-api/pkg/client/listers/apis/v1"

	"github.com/fedmesh/fedmesh/federation/routes"
	"github.com/fedmesh/fedmesh/policy"
	"github.com/fedmesh/fedmesh/policy/v1alpha1"
)

// routeByBackendNamespace indexes routes by the other namespaces their
// backendRefs name, so a Service appearing there recompiles the route.
const routeByBackendNamespace = "fedmesh/by-backend-namespace"

// traffic is the controller's traffic-policy side: informers over the
// Gateway API routes and fedmesh's policies of the own cluster, a
// per-namespace queue that recompiles (package routes), writes status
// when it changed and wakes the discovery streams of every service whose
// compiled policy changed.
type traffic struct {
	c        *Controller
	log      *slog.Logger
	compiler *routes.Compiler
	queue    workqueue.TypedRateLimitingInterface[string] // namespaces

	gw         gwclient.Interface
	dyn        dynamic.Interface
	httpRoutes gwlisters.HTTPRouteLister
	grpcRoutes gwlisters.GRPCRouteLister
	grants     gwlisters.ReferenceGrantLister
	httpIdx    cache.Indexer
	grpcIdx    cache.Indexer
	policies   map[string]cache.GenericLister // by kind; nil when the CRDs are absent

	mu       sync.RWMutex
	compiled map[string]compiledPolicy // by namespace/name

	tallyMu sync.Mutex
	tally   map[string]map[verdictKey]int // by namespace: objects by kind and verdict
}

type verdictKey struct{ kind, verdict string }

// count records a namespace's verdicts and sets the
// fedmesh_federation_traffic_objects gauges to the cluster's totals.
func (t *traffic) count(ns string, out routes.Output) {
	n := map[verdictKey]int{}
	for k, parents := range out.Routes {
		v := "accepted"
		for _, p := range parents {
			for _, c := range p.Conditions {
				if c.Status != metav1.ConditionTrue {
					v = "rejected"
				}
			}
		}
		n[verdictKey{k.Kind, v}]++
	}
	for k, c := range out.Policies {
		v := "accepted"
		if c.Status != metav1.ConditionTrue {
			v = "rejected"
		}
		n[verdictKey{k.Kind, v}]++
	}
	t.tallyMu.Lock()
	defer t.tallyMu.Unlock()
	if t.tally == nil {
		t.tally = map[string]map[verdictKey]int{}
	}
	t.tally[ns] = n
	total := map[verdictKey]int{}
	for _, m := range t.tally {
		for k, v := range m {
			total[k] += v
		}
	}
	for _, kind := range []string{policy.KindHTTPRoute, policy.KindGRPCRoute, routes.KindAuthorizationPolicy, routes.KindRateLimitPolicy, routes.KindFailoverPolicy} {
		for _, v := range []string{"accepted", "rejected"} {
			t.c.metrics.trafficObjects.WithLabelValues(kind, v).Set(float64(total[verdictKey{kind, v}]))
		}
	}
}

type compiledPolicy struct {
	svc  *policy.Service
	wire []byte
}

var policyResources = map[string]schema.GroupVersionResource{
	routes.KindAuthorizationPolicy: v1alpha1.AuthorizationPolicies,
	routes.KindRateLimitPolicy:     v1alpha1.RateLimitPolicies,
	routes.KindFailoverPolicy:      v1alpha1.FailoverPolicies,
}

// served reports whether the API server serves every named resource of a
// group version.
func served(dc discovery.DiscoveryInterface, gv schema.GroupVersion, resources ...string) bool {
	l, err := dc.ServerResourcesForGroupVersion(gv.String())
	if err != nil {
		return false
	}
	for _, want := range resources {
		if !slices.ContainsFunc(l.APIResources, func(r metav1.APIResource) bool { return r.Name == want }) {
			return false
		}
	}
	return true
}

// startTraffic starts the traffic-policy informers and workers. A cluster
// with neither the Gateway API nor the fedmesh policy CRDs is checked every
// CRDPollInterval until one set is installed (Snapshot carries no policy
// meanwhile); a cluster with one set only runs without the other (logged
// once; installing it later needs a restart).
func (c *Controller) startTraffic(ctx context.Context, wg *sync.WaitGroup) error {
	kube, err := newKube(c.opts.Config)
	if err != nil {
		return err
	}
	check := func() (bool, bool) {
		return served(kube.Discovery(), schema.GroupVersion{Group: gwv1.GroupName, Version: "v1"}, "httproutes", "grpcroutes", "referencegrants"),
			served(kube.Discovery(), v1alpha1.SchemeGroupVersion, "authorizationpolicies", "ratelimitpolicies", "failoverpolicies")
	}
	hasRoutes, hasPolicies := check()
	if !hasRoutes && !hasPolicies {
		// Installing the CRDs after the controller must not need a restart:
		// wait for them, then start.
		c.log.Warn("neither the Gateway API CRDs (httproutes, grpcroutes, referencegrants of gateway.networking.k8s.io/v1) nor the fedmesh policy CRDs (policy.fedmesh.dev/v1alpha1) are installed; serving endpoints without traffic policy until they are", "check-every", c.opts.CRDPollInterval)
		tick := time.NewTicker(c.opts.CRDPollInterval)
		defer tick.Stop()
		for !hasRoutes && !hasPolicies {
			select {
			case <-ctx.Done():
				return nil
			case <-tick.C:
			}
			if hasRoutes, hasPolicies = check(); hasRoutes || hasPolicies {
				// Both sets usually arrive together: give the other a moment.
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(2 * time.Second):
				}
				hasRoutes, hasPolicies = check()
				c.log.Info("traffic policy CRDs installed; starting traffic policy", "routes", hasRoutes, "policies", hasPolicies)
			}
		}
	}
	if !hasRoutes {
		c.log.Warn("Gateway API CRDs (httproutes, grpcroutes, referencegrants of gateway.networking.k8s.io/v1) are not installed; running without routes (install them and restart the controller)")
	}
	if !hasPolicies {
		c.log.Warn("fedmesh policy CRDs (policy.fedmesh.dev/v1alpha1) are not installed; running without authorization, rate limit and failover policies (install them and restart the controller)")
	}
	t := &traffic{
		c: c, log: c.log.With("part", "traffic"), compiler: routes.NewCompiler(), compiled: map[string]compiledPolicy{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "traffic"}),
	}
	// The queue's goroutines end with it, on every way out of here.
	wg.Go(func() {
		<-ctx.Done()
		t.queue.ShutDown()
	})
	byNS := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { t.enqueueObject(o) },
		UpdateFunc: func(_, o any) { t.enqueueObject(o) },
		DeleteFunc: func(o any) { t.enqueueObject(o) },
	}
	var synced []cache.InformerSynced
	// Each factory starts on ctx and is shut down (which waits for its
	// informers and handlers) on wg once ctx ends.
	type factory interface {
		Start(stop <-chan struct{})
		Shutdown()
	}
	var factories []factory
	if hasRoutes {
		if t.gw, err = gwclient.NewForConfig(c.opts.Config); err != nil {
			return fmt.Errorf("gateway api client: %w", err)
		}
		f := gwinformers.NewSharedInformerFactory(t.gw, c.opts.ResyncPeriod)
		hr, gr, rg := f.Gateway().V1().HTTPRoutes(), f.Gateway().V1().GRPCRoutes(), f.Gateway().V1().ReferenceGrants()
		if err := hr.Informer().AddIndexers(cache.Indexers{routeByBackendNamespace: indexHTTPRouteBackends}); err != nil {
			return err
		}
		if err := gr.Informer().AddIndexers(cache.Indexers{routeByBackendNamespace: indexGRPCRouteBackends}); err != nil {
			return err
		}
		for _, inf := range []cache.SharedIndexInformer{hr.Informer(), gr.Informer()} {
			if _, err := inf.AddEventHandler(byNS); err != nil {
				return err
			}
			synced = append(synced, inf.HasSynced)
		}
		grantChanged := func(o any) {
			if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = d.Obj
			}
			if g, ok := o.(*gwv1.ReferenceGrant); ok {
				for _, from := range g.Spec.From {
					t.queue.Add(string(from.Namespace))
				}
			}
		}
		if _, err := rg.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: grantChanged, UpdateFunc: func(old, o any) { grantChanged(old); grantChanged(o) }, DeleteFunc: grantChanged,
		}); err != nil {
			return err
		}
		synced = append(synced, rg.Informer().HasSynced)
		t.httpRoutes, t.grpcRoutes, t.grants = hr.Lister(), gr.Lister(), rg.Lister()
		t.httpIdx, t.grpcIdx = hr.Informer().GetIndexer(), gr.Informer().GetIndexer()
		factories = append(factories, f)
	}
	if hasPolicies {
		if t.dyn, err = dynamic.NewForConfig(c.opts.Config); err != nil {
			return err
		}
		f := dynamicinformer.NewDynamicSharedInformerFactory(t.dyn, c.opts.ResyncPeriod)
		t.policies = map[string]cache.GenericLister{}
		for kind, gvr := range policyResources {
			inf := f.ForResource(gvr)
			if _, err := inf.Informer().AddEventHandler(byNS); err != nil {
				return err
			}
			synced = append(synced, inf.Informer().HasSynced)
			t.policies[kind] = inf.Lister()
		}
		factories = append(factories, f)
	}
	// Services and ServiceImports of the own cluster are targets, parents
	// and backends.
	svcChanged := cache.ResourceEventHandlerFuncs{
		AddFunc: func(o any) { t.serviceChanged(o) },
		UpdateFunc: func(old, o any) {
			if !servicePortsEqual(old, o) {
				t.serviceChanged(o)
			}
		},
		DeleteFunc: func(o any) { t.serviceChanged(o) },
	}
	for _, inf := range []cache.SharedIndexInformer{c.local.serviceInformer, c.local.importInformer} {
		// The handler lives as long as the local cache, which lead stops.
		if _, err := inf.AddEventHandler(svcChanged); err != nil {
			return err
		}
	}
	for _, f := range factories {
		f.Start(ctx.Done())
		wg.Go(func() {
			<-ctx.Done()
			f.Shutdown()
		})
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return ctx.Err()
	}
	c.traffic.Store(t)
	for range 2 {
		wg.Go(func() {
			for t.processNext(ctx) {
			}
		})
	}
	c.log.Info("traffic policy on", "routes", hasRoutes, "policies", hasPolicies)
	return nil
}

func (t *traffic) enqueueObject(o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	if m, ok := o.(metav1.Object); ok {
		t.queue.Add(m.GetNamespace())
	}
}

// serviceChanged recompiles the Service's namespace and every namespace
// whose routes name a backend in it.
func (t *traffic) serviceChanged(o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	m, ok := o.(metav1.Object)
	if !ok || m.GetLabels()[labelDerivedService] == "true" {
		return
	}
	ns := m.GetNamespace()
	t.queue.Add(ns)
	for _, idx := range []cache.Indexer{t.httpIdx, t.grpcIdx} {
		if idx == nil {
			continue
		}
		objs, _ := idx.ByIndex(routeByBackendNamespace, ns)
		for _, r := range objs {
			t.queue.Add(r.(metav1.Object).GetNamespace())
		}
	}
}

func servicePortsEqual(old, cur any) bool {
	a, ok1 := old.(*corev1.Service)
	b, ok2 := cur.(*corev1.Service)
	if !ok1 || !ok2 {
		return false // ServiceImports: any change counts
	}
	return slices.EqualFunc(a.Spec.Ports, b.Spec.Ports, func(x, y corev1.ServicePort) bool { return x.Port == y.Port })
}

func indexHTTPRouteBackends(o any) ([]string, error) {
	r := o.(*gwv1.HTTPRoute)
	var out []string
	for _, rule := range r.Spec.Rules {
		for _, b := range rule.BackendRefs {
			if b.Namespace != nil && string(*b.Namespace) != r.Namespace && !slices.Contains(out, string(*b.Namespace)) {
				out = append(out, string(*b.Namespace))
			}
		}
	}
	return out, nil
}

func indexGRPCRouteBackends(o any) ([]string, error) {
	r := o.(*gwv1.GRPCRoute)
	var out []string
	for _, rule := range r.Spec.Rules {
		for _, b := range rule.BackendRefs {
			if b.Namespace != nil && string(*b.Namespace) != r.Namespace && !slices.Contains(out, string(*b.Namespace)) {
				out = append(out, string(*b.Namespace))
			}
		}
	}
	return out, nil
}

func (t *traffic) processNext(ctx context.Context) bool {
	ns, quit := t.queue.Get()
	if quit {
		return false
	}
	defer t.queue.Done(ns)
	if err := t.sync(ctx, ns); err != nil {
		if ctx.Err() == nil {
			t.log.Warn("traffic policy sync failed; will retry", "namespace", ns, "err", err, "retries", t.queue.NumRequeues(ns))
			t.queue.AddRateLimited(ns)
		}
		return true
	}
	t.queue.Forget(ns)
	return true
}

// sync recompiles one namespace, publishes what changed to the discovery
// streams, and writes status where it differs.
func (t *traffic) sync(ctx context.Context, ns string) error {
	in := routes.Input{Namespace: ns, Cluster: clusterView{t}}
	if t.httpRoutes != nil {
		in.HTTPRoutes, _ = t.httpRoutes.HTTPRoutes(ns).List(labels.Everything())
		in.GRPCRoutes, _ = t.grpcRoutes.GRPCRoutes(ns).List(labels.Everything())
	}
	var err error
	if t.policies != nil {
		if in.AuthorizationPolicies, err = listPolicies[v1alpha1.AuthorizationPolicy](t.policies[routes.KindAuthorizationPolicy], ns); err != nil {
			return err
		}
		if in.RateLimitPolicies, err = listPolicies[v1alpha1.RateLimitPolicy](t.policies[routes.KindRateLimitPolicy], ns); err != nil {
			return err
		}
		if in.FailoverPolicies, err = listPolicies[v1alpha1.FailoverPolicy](t.policies[routes.KindFailoverPolicy], ns); err != nil {
			return err
		}
	}
	out := t.compiler.Compile(in)
	t.publish(ns, out.Services)
	t.count(ns, out)

	var errs []error
	now := metav1.Now()
	for _, r := range in.HTTPRoutes {
		merged, changed := routes.MergeParents(r.Status.Parents, out.Routes[routes.ObjectKey{Kind: policy.KindHTTPRoute, Name: r.Name}], now)
		if changed {
			cp := r.DeepCopy()
			cp.Status.Parents = merged
			if _, err := t.gw.GatewayV1().HTTPRoutes(ns).UpdateStatus(ctx, cp, metav1.UpdateOptions{}); err != nil && !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("update status of HTTPRoute %s/%s: %w", ns, r.Name, err))
			}
		}
	}
	for _, r := range in.GRPCRoutes {
		merged, changed := routes.MergeParents(r.Status.Parents, out.Routes[routes.ObjectKey{Kind: policy.KindGRPCRoute, Name: r.Name}], now)
		if changed {
			cp := r.DeepCopy()
			cp.Status.Parents = merged
			if _, err := t.gw.GatewayV1().GRPCRoutes(ns).UpdateStatus(ctx, cp, metav1.UpdateOptions{}); err != nil && !apierrors.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("update status of GRPCRoute %s/%s: %w", ns, r.Name, err))
			}
		}
	}
	if t.policies != nil {
		for kind, gvr := range policyResources {
			objs, _ := t.policies[kind].ByNamespace(ns).List(labels.Everything())
			for _, o := range objs {
				u := o.(*unstructured.Unstructured)
				want, ok := out.Policies[routes.ObjectKey{Kind: kind, Name: u.GetName()}]
				if !ok {
					continue
				}
				if err := t.writePolicyStatus(ctx, gvr, u, want, now); err != nil {
					errs = append(errs, fmt.Errorf("update status of %s %s/%s: %w", kind, ns, u.GetName(), err))
				}
			}
		}
	}
	if len(errs) > 0 {
		return errs[0]
	}
	return nil
}

func (t *traffic) writePolicyStatus(ctx context.Context, gvr schema.GroupVersionResource, u *unstructured.Unstructured, want metav1.Condition, now metav1.Time) error {
	var st v1alpha1.PolicyStatus
	if m, ok := u.Object["status"].(map[string]any); ok {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &st); err != nil {
			return err
		}
	}
	merged, changed := routes.MergeCondition(st.Conditions, want, now)
	if !changed {
		return nil
	}
	st.Conditions = merged
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&st)
	if err != nil {
		return err
	}
	cp := u.DeepCopy()
	cp.Object["status"] = m
	_, err = t.dyn.Resource(gvr).Namespace(u.GetNamespace()).UpdateStatus(ctx, cp, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// publish swaps in a namespace's compiled policies and wakes the streams
// of every service whose policy changed.
func (t *traffic) publish(ns string, svcs map[string]*policy.Service) {
	var changed []string
	t.mu.Lock()
	for key, cur := range t.compiled {
		if cur.svc.Namespace == ns && svcs[cur.svc.Name] == nil {
			delete(t.compiled, key)
			changed = append(changed, key)
		}
	}
	for name, s := range svcs {
		wire, err := policy.Encode(s)
		if err != nil {
			t.log.Error("encode compiled policy", "service", ns+"/"+name, "err", err)
			continue
		}
		key := ns + "/" + name
		if cur, ok := t.compiled[key]; ok && bytes.Equal(cur.wire, wire) {
			continue
		}
		t.compiled[key] = compiledPolicy{svc: s, wire: wire}
		changed = append(changed, key)
	}
	t.mu.Unlock()
	for _, key := range changed {
		t.c.disco.Notify(key)
	}
}

// policyOf returns a service's compiled policy (nil, nil when none).
func (t *traffic) policyOf(ns, name string) (*policy.Service, []byte) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	cp, ok := t.compiled[ns+"/"+name]
	if !ok {
		return nil, nil
	}
	return cp.svc, cp.wire
}

// staleAfterServices returns the staleAfter of every service whose
// FailoverPolicy has one.
func (t *traffic) staleAfterServices() map[string]time.Duration {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := map[string]time.Duration{}
	for key, cp := range t.compiled {
		if f := cp.svc.Failover; f != nil && f.StaleAfter > 0 {
			out[key] = time.Duration(f.StaleAfter)
		}
	}
	return out
}

// notifyStaleAfter wakes the streams of every service with a
// FailoverPolicy staleAfter that a stale peer crossed since the last tick,
// so Snapshot drops that cluster. It runs on the periodic goroutine only.
func (c *Controller) notifyStaleAfter(now time.Time) {
	prev := c.lastStaleTick
	c.lastStaleTick = now
	t := c.traffic.Load()
	if t == nil || prev.IsZero() {
		return
	}
	var stale []time.Time
	for _, v := range c.peerViews(now) {
		if v.stale {
			stale = append(stale, v.staleSince)
		}
	}
	if len(stale) == 0 {
		return
	}
	for key, after := range t.staleAfterServices() {
		for _, since := range stale {
			if now.Sub(since) > after && prev.Sub(since) <= after {
				c.disco.Notify(key)
				break
			}
		}
	}
}

// staleBeyond returns the IDs of peers stale for longer than d.
func (c *Controller) staleBeyond(d time.Duration, now time.Time) map[string]bool {
	out := map[string]bool{}
	for _, v := range c.peerViews(now) {
		if v.stale && now.Sub(v.staleSince) > d {
			out[v.id] = true
		}
	}
	return out
}

func listPolicies[T any](l cache.GenericLister, ns string) ([]*T, error) {
	objs, err := l.ByNamespace(ns).List(labels.Everything())
	if err != nil {
		return nil, err
	}
	out := make([]*T, 0, len(objs))
	for _, o := range objs {
		p := new(T)
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.(*unstructured.Unstructured).Object, p); err != nil {
			return nil, fmt.Errorf("read %s %s/%s: %w", o.GetObjectKind().GroupVersionKind().Kind, ns, o.(*unstructured.Unstructured).GetName(), err)
		}
		out = append(out, p)
	}
	return out, nil
}

// clusterView is routes.Cluster over the local cache.
type clusterView struct{ t *traffic }

var _ routes.Cluster = clusterView{}

func (v clusterView) Service(ns, name string) *corev1.Service {
	s, err := v.t.c.local.services.Services(ns).Get(name)
	if err != nil || s.Labels[labelDerivedService] == "true" {
		return nil
	}
	return s
}

func (v clusterView) Services(ns string) []*corev1.Service {
	all, _ := v.t.c.local.services.Services(ns).List(labels.Everything())
	out := all[:0:0]
	for _, s := range all {
		if s.Labels[labelDerivedService] != "true" {
			out = append(out, s)
		}
	}
	return out
}

func (v clusterView) ServiceImportExists(ns, name string) bool {
	_, err := v.t.c.local.imports.ServiceImports(ns).Get(name)
	return err == nil
}

func (v clusterView) ReferenceGrants(ns string) []*gwv1.ReferenceGrant {
	if v.t.grants == nil {
		return nil
	}
	out, _ := v.t.grants.ReferenceGrants(ns).List(labels.Everything())
	return out
}
