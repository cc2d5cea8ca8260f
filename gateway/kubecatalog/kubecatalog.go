// Package kubecatalog is the gateway's view of what its own cluster exports:
// a gateway.Catalog backed by client-go informers over ServiceExports
// (sigs.k8s.io/mcs-api v1beta1), Services and EndpointSlices.
//
// It exists so that the ingress can decide on every new stream, from memory
// and without an API call, whether a service may be reached from other
// clusters and which of its local endpoints are ready. Only the cluster's own
// endpoints count: slices mirrored from peer clusters by the federation
// controller (labelled multicluster.kubernetes.io/source-cluster) are
// ignored, so a gateway never forwards a stream back out to another cluster.
package kubecatalog

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsinformers "sigs.k8s.io/mcs-api/pkg/client/informers/externalversions"
	mcslisters "sigs.k8s.io/mcs-api/pkg/client/listers/apis/v1beta1"

	"github.com/fedmesh/fedmesh/gateway"
)

// SourceClusterLabel marks EndpointSlices mirrored from another cluster.
const SourceClusterLabel = "multicluster.kubernetes.io/source-cluster"

// Catalog implements gateway.Catalog over informer caches.
type Catalog struct {
	log      *slog.Logger
	kf       informers.SharedInformerFactory
	mf       mcsinformers.SharedInformerFactory
	services corelisters.ServiceLister
	slices   discoverylisters.EndpointSliceLister
	exports  mcslisters.ServiceExportLister
	synced   []cache.InformerSynced
}

var _ gateway.Catalog = (*Catalog)(nil)

// New builds the informers; Start runs them. resync 0 means no periodic
// resync (the caches are event-driven either way).
func New(kube kubernetes.Interface, mcs mcsclient.Interface, resync time.Duration, log *slog.Logger) *Catalog {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	kf := informers.NewSharedInformerFactory(kube, resync)
	mf := mcsinformers.NewSharedInformerFactory(mcs, resync)
	svc := kf.Core().V1().Services()
	sl := kf.Discovery().V1().EndpointSlices()
	ex := mf.Multicluster().V1beta1().ServiceExports()
	return &Catalog{
		log: log, kf: kf, mf: mf,
		services: svc.Lister(), slices: sl.Lister(), exports: ex.Lister(),
		synced: []cache.InformerSynced{svc.Informer().HasSynced, sl.Informer().HasSynced, ex.Informer().HasSynced},
	}
}

// Start runs the informers until ctx ends and waits at most syncTimeout
// for their first sync. Once ctx has ended, Wait returns when they have.
func (c *Catalog) Start(ctx context.Context, syncTimeout time.Duration) error {
	c.kf.Start(ctx.Done())
	c.mf.Start(ctx.Done())
	sctx, cancel := context.WithTimeout(ctx, syncTimeout)
	defer cancel()
	if !cache.WaitForCacheSync(sctx.Done(), c.synced...) {
		return fmt.Errorf("sync catalog caches within %s: %w", syncTimeout, context.Cause(sctx))
	}
	c.log.Info("catalog synced")
	return nil
}

// Wait waits for the informers Start ran to end, which they do once its
// ctx has ended; the owner calls it after cancelling that ctx, before it
// tears down what they use. Start cannot run again afterwards.
func (c *Catalog) Wait() {
	c.kf.Shutdown()
	c.mf.Shutdown()
}

// Lookup implements gateway.Catalog: exported when a ServiceExport of that
// name exists (not being deleted) and the Service has the port; endpoints are
// the ready, non-terminating addresses of the Service's local slices, on the
// target port that matches the Service port by name.
func (c *Catalog) Lookup(ns, name string, port int32) ([]gateway.Endpoint, bool) {
	ex, err := c.exports.ServiceExports(ns).Get(name)
	if err != nil || ex.DeletionTimestamp != nil {
		return nil, false
	}
	svc, err := c.services.Services(ns).Get(name)
	if err != nil {
		return nil, false
	}
	var sp *corev1.ServicePort
	for i := range svc.Spec.Ports {
		if p := &svc.Spec.Ports[i]; p.Port == port && (p.Protocol == "" || p.Protocol == corev1.ProtocolTCP) {
			sp = p
			break
		}
	}
	if sp == nil {
		return nil, false
	}
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: name})
	slices, err := c.slices.EndpointSlices(ns).List(sel)
	if err != nil {
		return nil, true
	}
	var eps []gateway.Endpoint
	for _, s := range slices {
		if _, mirrored := s.Labels[SourceClusterLabel]; mirrored || s.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		target := int32(0)
		for _, p := range s.Ports {
			if p.Port != nil && ptrOr(p.Name, "") == sp.Name && (p.Protocol == nil || *p.Protocol == corev1.ProtocolTCP) {
				target = *p.Port
				break
			}
		}
		if target == 0 {
			continue
		}
		for _, e := range s.Endpoints {
			if !ptrOr(e.Conditions.Ready, true) || ptrOr(e.Conditions.Terminating, false) || len(e.Addresses) == 0 {
				continue
			}
			addr, err := netip.ParseAddr(e.Addresses[0])
			if err != nil {
				continue
			}
			ep := gateway.Endpoint{Addr: netip.AddrPortFrom(addr, uint16(target))}
			if e.TargetRef != nil {
				ep.Name = e.TargetRef.Name
			}
			eps = append(eps, ep)
		}
	}
	return eps, true
}

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}
