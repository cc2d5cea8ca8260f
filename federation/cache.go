package federation

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsinformers "sigs.k8s.io/mcs-api/pkg/client/informers/externalversions"
	mcslisters "sigs.k8s.io/mcs-api/pkg/client/listers/apis/v1beta1"
)

const (
	// sliceByService indexes a Service's own EndpointSlices by "ns/service".
	sliceByService = "fedmesh/by-service"
	// sliceByImport indexes the EndpointSlices fedmesh mirrors by "ns/import".
	sliceByImport = "fedmesh/by-import"
)

// clusterCache is one cluster's view: informers over the objects the
// controller reads. The local cluster's cache also watches what the
// controller writes (ServiceImports, namespaces).
type clusterCache struct {
	kube kubernetes.Interface
	mcs  mcsclient.Interface

	exports  mcslisters.ServiceExportLister
	services corelisters.ServiceLister
	slices   cache.Indexer

	// local cluster only
	imports    mcslisters.ServiceImportLister
	namespaces corelisters.NamespaceLister
	// informers whose changes also concern traffic policy (local cluster)
	serviceInformer, importInformer cache.SharedIndexInformer

	synced []cache.InformerSynced
	start  func() // starts the informers; called once
	cancel context.CancelFunc
	wait   func() // waits for the informers and their handlers to end
}

// handler receives every change a cache sees, already mapped to keys.
type handler interface {
	enqueue(ns, name string)
	enqueueNamespace(ns string)
}

func newClusterCache(cfg *rest.Config, local bool, resync time.Duration, h handler) (*clusterCache, error) {
	kube, err := newKube(cfg)
	if err != nil {
		return nil, err
	}
	mcs, err := mcsclient.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("mcs client: %w", err)
	}
	var kopts []informers.SharedInformerOption
	if !local {
		// A peer's own imports (mirrored slices, derived Services) are not
		// its exports: don't even receive them.
		kopts = append(kopts, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.LabelSelector = "!" + mcsv1beta1.LabelSourceCluster + ",!" + labelDerivedService
		}))
	}
	kf := informers.NewSharedInformerFactoryWithOptions(kube, resync, kopts...)
	mf := mcsinformers.NewSharedInformerFactory(mcs, resync)
	c := &clusterCache{kube: kube, mcs: mcs}

	byKey := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { enqueueObject(h, o) },
		UpdateFunc: func(_, o any) { enqueueObject(h, o) },
		DeleteFunc: func(o any) { enqueueObject(h, o) },
	}
	exp := mf.Multicluster().V1beta1().ServiceExports()
	svc := kf.Core().V1().Services()
	sl := kf.Discovery().V1().EndpointSlices().Informer()
	if err := sl.AddIndexers(cache.Indexers{sliceByService: indexSliceByService, sliceByImport: indexSliceByImport}); err != nil {
		return nil, err
	}
	for _, inf := range []cache.SharedIndexInformer{exp.Informer(), svc.Informer()} {
		if _, err := inf.AddEventHandler(byKey); err != nil {
			return nil, err
		}
		c.synced = append(c.synced, inf.HasSynced)
	}
	if _, err := sl.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { enqueueSlice(h, o) },
		UpdateFunc: func(_, o any) { enqueueSlice(h, o) },
		DeleteFunc: func(o any) { enqueueSlice(h, o) },
	}); err != nil {
		return nil, err
	}
	c.synced = append(c.synced, sl.HasSynced)
	c.exports, c.services, c.slices = exp.Lister(), svc.Lister(), sl.GetIndexer()
	c.serviceInformer = svc.Informer()

	if local {
		imp := mf.Multicluster().V1beta1().ServiceImports()
		if _, err := imp.Informer().AddEventHandler(byKey); err != nil {
			return nil, err
		}
		nsi := kf.Core().V1().Namespaces()
		if _, err := nsi.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: func(o any) { h.enqueueNamespace(o.(*corev1.Namespace).Name) },
			UpdateFunc: func(old, o any) {
				if old.(*corev1.Namespace).Status.Phase != o.(*corev1.Namespace).Status.Phase {
					h.enqueueNamespace(o.(*corev1.Namespace).Name)
				}
			},
			DeleteFunc: func(o any) {
				if ns, ok := o.(*corev1.Namespace); ok {
					h.enqueueNamespace(ns.Name)
				}
			},
		}); err != nil {
			return nil, err
		}
		c.imports, c.namespaces = imp.Lister(), nsi.Lister()
		c.importInformer = imp.Informer()
		c.synced = append(c.synced, imp.Informer().HasSynced, nsi.Informer().HasSynced)
	}

	c.start = func() {
		ctx, cancel := context.WithCancel(context.Background())
		c.cancel = cancel
		kf.Start(ctx.Done())
		mf.Start(ctx.Done())
	}
	c.wait = func() {
		kf.Shutdown()
		mf.Shutdown()
	}
	return c, nil
}

// waitSynced waits until every informer has listed once.
func (c *clusterCache) waitSynced(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), c.synced...)
}

// stop stops the informers and waits for them and their handlers, so no
// handler enqueues into the controller after stop returns. It must not be
// called from one of this cache's own handlers.
func (c *clusterCache) stop() {
	if c.cancel != nil {
		c.cancel()
	}
	c.wait()
}

// serviceSlices returns the EndpointSlices a cluster's own endpoint
// controller keeps for a Service.
func (c *clusterCache) serviceSlices(ns, name string) []*discoveryv1.EndpointSlice {
	return slicesFrom(c.slices.ByIndex(sliceByService, ns+"/"+name))
}

// importSlices returns the EndpointSlices fedmesh mirrored for an import.
func (c *clusterCache) importSlices(ns, name string) []*discoveryv1.EndpointSlice {
	return slicesFrom(c.slices.ByIndex(sliceByImport, ns+"/"+name))
}

func slicesFrom(objs []any, err error) []*discoveryv1.EndpointSlice {
	out := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*discoveryv1.EndpointSlice))
	}
	return out
}

func indexSliceByService(o any) ([]string, error) {
	s := o.(*discoveryv1.EndpointSlice)
	if _, mirrored := s.Labels[mcsv1beta1.LabelSourceCluster]; mirrored {
		return nil, nil
	}
	if svc := s.Labels[discoveryv1.LabelServiceName]; svc != "" {
		return []string{s.Namespace + "/" + svc}, nil
	}
	return nil, nil
}

func indexSliceByImport(o any) ([]string, error) {
	s := o.(*discoveryv1.EndpointSlice)
	if s.Labels[discoveryv1.LabelManagedBy] != ManagedBy {
		return nil, nil
	}
	if imp := s.Labels[mcsv1beta1.LabelServiceName]; imp != "" {
		return []string{s.Namespace + "/" + imp}, nil
	}
	return nil, nil
}

func enqueueObject(h handler, o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	m, ok := o.(metav1.Object)
	if !ok {
		return
	}
	// A derived Service stands for its import.
	if imp := m.GetLabels()[mcsv1beta1.LabelServiceName]; imp != "" && m.GetLabels()[labelDerivedService] == "true" {
		h.enqueue(m.GetNamespace(), imp)
		return
	}
	h.enqueue(m.GetNamespace(), m.GetName())
}

func enqueueSlice(h handler, o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	s, ok := o.(*discoveryv1.EndpointSlice)
	if !ok {
		return
	}
	if imp := s.Labels[mcsv1beta1.LabelServiceName]; imp != "" && s.Labels[mcsv1beta1.LabelSourceCluster] != "" {
		h.enqueue(s.Namespace, imp)
		return
	}
	if svc := s.Labels[discoveryv1.LabelServiceName]; svc != "" {
		h.enqueue(s.Namespace, svc)
	}
}
