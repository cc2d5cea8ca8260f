package federation

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
)

// syncSlices mirrors every exporting cluster's EndpointSlices for the
// service into the local cluster, labelled for the MCS API and for the
// derived Service, and removes mirrored slices nobody exports any more. The
// local cluster's own endpoints are mirrored too, so the clusterset IP
// reaches them as well. It reports whether any mirrored slice exists.
func (c *Controller) syncSlices(ctx context.Context, ns, name, derived string, clusters []string, sources map[string]source) (bool, error) {
	want := map[string]*discoveryv1.EndpointSlice{}
	for _, cl := range clusters {
		src := sources[cl]
		for _, s := range src.cache.serviceSlices(ns, name) {
			m := mirrorSlice(s, name, derived, cl, src.stale)
			want[m.Name] = m
		}
	}
	api := c.local.kube.DiscoveryV1().EndpointSlices(ns)
	var errs []error
	have := map[string]bool{}
	for _, cur := range c.local.importSlices(ns, name) {
		have[cur.Name] = true
		w, keep := want[cur.Name]
		switch {
		case !keep || w.AddressType != cur.AddressType:
			// Gone at the source, or an immutable field changed.
			errs = append(errs, ignoreNotFound(api.Delete(ctx, cur.Name, metav1.DeleteOptions{})))
			delete(have, cur.Name)
		case !sameSlice(cur, w):
			upd := cur.DeepCopy()
			upd.Labels, upd.Annotations, upd.Endpoints, upd.Ports = w.Labels, w.Annotations, w.Endpoints, w.Ports
			if _, err := api.Update(ctx, upd, metav1.UpdateOptions{}); err != nil {
				errs = append(errs, fmt.Errorf("update endpointslice %s/%s: %w", ns, cur.Name, err))
			}
		}
	}
	for n, w := range want {
		if have[n] {
			continue
		}
		if _, err := api.Create(ctx, w, metav1.CreateOptions{}); err != nil {
			errs = append(errs, fmt.Errorf("create endpointslice %s/%s: %w", ns, n, err))
		}
	}
	return len(want) > 0, errors.Join(errs...)
}

func sameSlice(a, b *discoveryv1.EndpointSlice) bool {
	return mapsEqual(a.Labels, b.Labels) && mapsEqual(a.Annotations, b.Annotations) &&
		equality.Semantic.DeepEqual(a.Endpoints, b.Endpoints) && equality.Semantic.DeepEqual(a.Ports, b.Ports)
}

// mirrorSlice copies what is meaningful outside the source cluster:
// addresses, conditions, hostnames, zones and ports. Node names and pod
// references name objects of another cluster and are dropped.
func mirrorSlice(src *discoveryv1.EndpointSlice, importName, derived, cluster string, stale bool) *discoveryv1.EndpointSlice {
	sum := sha256.Sum256([]byte(cluster + "/" + src.Name))
	m := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:      fmt.Sprintf("%s-%s-%s", trunc(importName, 40), trunc(cluster, 40), hex.EncodeToString(sum[:])[:10]),
			Namespace: src.Namespace,
			Labels: map[string]string{
				mcsv1beta1.LabelServiceName:   importName,
				mcsv1beta1.LabelSourceCluster: cluster,
				discoveryv1.LabelManagedBy:    ManagedBy,
				discoveryv1.LabelServiceName:  derived,
			},
			Annotations: map[string]string{"multicluster.fedmesh.dev/source-endpointslice": src.Name},
		},
		AddressType: src.AddressType,
		Ports:       src.Ports,
	}
	if stale {
		m.Labels[LabelStale] = "true"
	}
	for _, e := range src.Endpoints {
		m.Endpoints = append(m.Endpoints, discoveryv1.Endpoint{
			Addresses:  e.Addresses,
			Conditions: e.Conditions,
			Hostname:   e.Hostname,
			Zone:       e.Zone,
		})
	}
	return m
}

func trunc(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
