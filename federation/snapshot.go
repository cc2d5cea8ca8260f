package federation

import (
	"cmp"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"

	"github.com/fedmesh/fedmesh/federation/discovery"
	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"
	"github.com/fedmesh/fedmesh/policy"
)

const (
	// GatewayService is the local gateway's Service in the system namespace.
	GatewayService = "fedmesh-gateway"
	// AnnotationEgress on the gateway Service lists its egress addresses
	// (host:port, comma-separated) for the discovery API.
	AnnotationEgress = "multicluster.fedmesh.dev/egress-addresses"
	// AnnotationPeerRTT on the gateway Service is the gateway's measured
	// round-trip time to each peer cluster's gateway: a JSON object, cluster
	// name to microseconds. The gateway writes it (gateway.AnnotationPeerRTT);
	// the controller passes it on as Cluster.rtt_micros so sidecars try
	// remote clusters nearest first.
	AnnotationPeerRTT = "multicluster.fedmesh.dev/peer-rtt"
)

var (
	_ discovery.Source          = (*Controller)(nil)
	_ discovery.DirectorySource = (*Controller)(nil)
)

// Discovery is the discovery API server fed by this controller.
func (c *Controller) Discovery() *discovery.Server { return c.disco }

// Snapshot builds a service's endpoint set from the local cluster's cache:
// the Service's own EndpointSlices as the local cluster, the mirrored slices
// as every other exporting cluster, and the service's compiled traffic
// policy. A cluster stale for longer than the service's FailoverPolicy
// staleAfter is left out.
func (c *Controller) Snapshot(ns, name string) (*pb.EndpointSet, error) {
	select {
	case <-c.leading:
	default:
		return nil, status.Error(codes.Unavailable, "this federation controller replica is not leading; retry")
	}
	local := c.local
	set := &pb.EndpointSet{Namespace: ns, Service: name, LocalCluster: c.clusterID}
	if imp, err := local.imports.ServiceImports(ns).Get(name); err == nil {
		set.Imported = true
		for _, p := range imp.Spec.Ports {
			set.Ports = append(set.Ports, &pb.Port{Name: p.Name, Protocol: string(p.Protocol), Port: p.Port, AppProtocol: deref(p.AppProtocol)})
		}
	} else if svc, err := local.services.Services(ns).Get(name); err == nil {
		for _, p := range svc.Spec.Ports {
			set.Ports = append(set.Ports, &pb.Port{Name: p.Name, Protocol: string(p.Protocol), Port: p.Port, AppProtocol: deref(p.AppProtocol)})
		}
	}
	var drop map[string]bool
	if t := c.traffic.Load(); t != nil {
		var pol *policy.Service
		pol, set.Policy = t.policyOf(ns, name)
		if pol != nil && pol.Failover != nil && pol.Failover.StaleAfter > 0 {
			drop = c.staleBeyond(time.Duration(pol.Failover.StaleAfter), time.Now())
		}
	}
	own := &pb.Cluster{Name: c.clusterID, Local: true}
	for _, s := range local.serviceSlices(ns, name) {
		addEndpoints(own, s)
	}
	set.Clusters = append(set.Clusters, own)
	remote := map[string]*pb.Cluster{}
	for _, s := range local.importSlices(ns, name) {
		src := s.Labels[mcsv1beta1.LabelSourceCluster]
		if src == "" || src == c.clusterID || drop[src] {
			continue
		}
		cl := remote[src]
		if cl == nil {
			cl = &pb.Cluster{Name: src}
			remote[src] = cl
		}
		cl.Stale = cl.Stale || s.Labels[LabelStale] == "true"
		addEndpoints(cl, s)
	}
	names := make([]string, 0, len(remote))
	for n := range remote {
		names = append(names, n)
	}
	sort.Strings(names)
	var rtts map[string]int64
	if gw, err := local.services.Services(c.opts.Namespace).Get(GatewayService); err == nil {
		for _, a := range strings.Split(gw.Annotations[AnnotationEgress], ",") {
			if a = strings.TrimSpace(a); a != "" {
				set.Egress = append(set.Egress, a)
			}
		}
		rtts = c.peerRTTs(gw.Annotations[AnnotationPeerRTT])
	}
	for _, n := range names {
		remote[n].RttMicros = rtts[n]
		set.Clusters = append(set.Clusters, remote[n])
	}
	return set, nil
}

// peerRTTs decodes the gateway's RTT annotation. A value that does not
// decode means no RTTs (clusters are then ordered by name) and is logged
// once per distinct value.
func (c *Controller) peerRTTs(v string) map[string]int64 {
	if v == "" {
		return nil
	}
	var m map[string]int64
	err := json.Unmarshal([]byte(v), &m)
	if err == nil {
		for cl, us := range m {
			if us < 0 {
				err = fmt.Errorf("cluster %q: negative RTT %d", cl, us)
				break
			}
		}
	}
	if err != nil {
		if old := c.badRTT.Swap(&v); old == nil || *old != v {
			c.log.Warn("ignoring the gateway Service's RTT annotation: want a JSON object of cluster name to microseconds",
				"service", c.opts.Namespace+"/"+GatewayService, "annotation", AnnotationPeerRTT, "value", v, "err", err)
		}
		return nil
	}
	return m
}

func addEndpoints(cl *pb.Cluster, s *discoveryv1.EndpointSlice) {
	var ports []*pb.Port
	for _, p := range s.Ports {
		port := &pb.Port{Name: deref(p.Name), AppProtocol: deref(p.AppProtocol)}
		if p.Port != nil {
			port.Port = *p.Port
		}
		if p.Protocol != nil {
			port.Protocol = string(*p.Protocol)
		} else {
			port.Protocol = string(corev1.ProtocolTCP)
		}
		ports = append(ports, port)
	}
	for _, e := range s.Endpoints {
		ready := e.Conditions.Ready == nil || *e.Conditions.Ready // nil means ready (EndpointSlice API)
		serving := ready
		if e.Conditions.Serving != nil {
			serving = *e.Conditions.Serving
		}
		term := e.Conditions.Terminating != nil && *e.Conditions.Terminating
		for _, addr := range e.Addresses {
			cl.Endpoints = append(cl.Endpoints, &pb.Endpoint{Address: addr, Ready: ready, Serving: serving, Terminating: term,
				Hostname: deref(e.Hostname), Zone: deref(e.Zone), Ports: ports})
			cl.Total++
			if ready {
				cl.Ready++
			}
		}
	}
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// Directory lists the local cluster's service directory from the informer
// cache: every Service with its cluster IPs and every ServiceImport with its
// IPs (its derived Service's cluster IPs), with their ports. Derived
// Services are left out (their import stands for them), and so are entries
// without an IP (headless Services, imports whose derived Service has no IP
// yet).
func (c *Controller) Directory() (*pb.Directory, error) {
	select {
	case <-c.leading:
	default:
		return nil, status.Error(codes.Unavailable, "this federation controller replica is not leading; retry")
	}
	local := c.local
	dir := &pb.Directory{LocalCluster: c.clusterID}
	svcs, err := local.services.List(labels.Everything())
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list services: %v", err)
	}
	for _, svc := range svcs {
		if svc.Labels[labelDerivedService] == "true" {
			continue
		}
		ips := virtualIPs(svc.Spec.ClusterIPs)
		if len(ips) == 0 && svc.Spec.ClusterIP != "" {
			ips = virtualIPs([]string{svc.Spec.ClusterIP})
		}
		if len(ips) == 0 {
			continue
		}
		vs := &pb.VirtualService{Namespace: svc.Namespace, Name: svc.Name, Ips: ips}
		for _, p := range svc.Spec.Ports {
			vs.Ports = append(vs.Ports, &pb.Port{Name: p.Name, Protocol: string(p.Protocol), Port: p.Port, AppProtocol: deref(p.AppProtocol)})
		}
		dir.Services = append(dir.Services, vs)
	}
	imps, err := local.imports.List(labels.Everything())
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list service imports: %v", err)
	}
	for _, imp := range imps {
		ips := virtualIPs(imp.Spec.IPs)
		if len(ips) == 0 {
			continue
		}
		vs := &pb.VirtualService{Namespace: imp.Namespace, Name: imp.Name, Imported: true, Ips: ips}
		for _, p := range imp.Spec.Ports {
			vs.Ports = append(vs.Ports, &pb.Port{Name: p.Name, Protocol: string(p.Protocol), Port: p.Port, AppProtocol: deref(p.AppProtocol)})
		}
		dir.Services = append(dir.Services, vs)
	}
	slices.SortFunc(dir.Services, func(a, b *pb.VirtualService) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name), compareBool(a.Imported, b.Imported))
	})
	return dir, nil
}

// virtualIPs keeps the addresses of a Service's clusterIPs or an import's
// ips that are IPs ("None" of a headless Service is not).
func virtualIPs(in []string) []string {
	var out []string
	for _, s := range in {
		if _, err := netip.ParseAddr(s); err == nil {
			out = append(out, s)
		}
	}
	return out
}

func compareBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case !a:
		return -1
	}
	return 1
}

// feedDirectory tells the discovery server about every change of the local
// cluster's Services and ServiceImports; it rebuilds the directory once per
// debounce window, and only while a sidecar watches it.
func (c *Controller) feedDirectory(local *clusterCache) error {
	notify := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.disco.NotifyDirectory() },
		UpdateFunc: func(_, _ any) { c.disco.NotifyDirectory() },
		DeleteFunc: func(any) { c.disco.NotifyDirectory() },
	}
	for _, inf := range []cache.SharedIndexInformer{local.serviceInformer, local.importInformer} {
		if _, err := inf.AddEventHandler(notify); err != nil {
			return err
		}
	}
	return nil
}
