// Package merge decides what one multi-cluster service looks like when
// several clusters export it, following the MCS API's conflict rules
// (KEP-1645): the oldest export wins each property, ports are the union of all
// exports, and every disagreement is reported rather than hidden. It is pure
// logic so that every controller in the clusterset, seeing the same exports,
// reaches the same answer without talking to the others.
package merge

import (
	"cmp"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
)

// Export is one cluster's valid export: the ServiceExport's creation time and
// exported metadata, and the Service it exports.
type Export struct {
	Cluster             string
	Created             metav1.Time
	Service             *corev1.Service
	ExportedLabels      map[string]string
	ExportedAnnotations map[string]string
}

// Conflict is one property on which the exports disagree.
type Conflict struct {
	Reason  mcsv1beta1.ServiceExportConditionReason
	Message string
}

// Result is the merged service.
type Result struct {
	Spec        mcsv1beta1.ServiceImportSpec // without IPs: those are per importing cluster
	Labels      map[string]string
	Annotations map[string]string
	Clusters    []string   // exporting clusters, sorted
	Winner      string     // cluster of the oldest export
	Conflicts   []Conflict // in a fixed order of reasons
}

// Reason joins the conflict reasons with commas, as the MCS API allows, or
// returns NoConflicts.
func (r Result) Reason() string {
	if len(r.Conflicts) == 0 {
		return string(mcsv1beta1.ServiceExportReasonNoConflicts)
	}
	rs := make([]string, len(r.Conflicts))
	for i, c := range r.Conflicts {
		rs[i] = string(c.Reason)
	}
	return strings.Join(rs, ",")
}

// Message is a human-readable summary of every conflict.
func (r Result) Message() string {
	if len(r.Conflicts) == 0 {
		return fmt.Sprintf("all %d exporting clusters agree", len(r.Clusters))
	}
	ms := make([]string, len(r.Conflicts))
	for i, c := range r.Conflicts {
		ms[i] = c.Message
	}
	return strings.Join(ms, "; ")
}

// Oldest sorts exports oldest first; equal timestamps (second resolution) are
// ordered by cluster name so every controller agrees.
func Oldest(exports []Export) {
	slices.SortStableFunc(exports, func(a, b Export) int {
		if c := a.Created.Time.Compare(b.Created.Time); c != 0 {
			return c
		}
		return cmp.Compare(a.Cluster, b.Cluster)
	})
}

// Exports merges one service's exports. It returns false when there are none.
func Exports(exports []Export) (Result, bool) {
	if len(exports) == 0 {
		return Result{}, false
	}
	exports = slices.Clone(exports)
	Oldest(exports)
	w := exports[0]
	r := Result{Winner: w.Cluster}
	for _, e := range exports {
		r.Clusters = append(r.Clusters, e.Cluster)
	}
	slices.Sort(r.Clusters)

	ws := w.Service.Spec
	r.Spec.Type = importType(w.Service)
	r.Spec.SessionAffinity = affinity(ws.SessionAffinity)
	if r.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		r.Spec.SessionAffinityConfig = ws.SessionAffinityConfig.DeepCopy()
	}
	r.Spec.IPFamilies = slices.Clone(ws.IPFamilies)
	itp := trafficPolicy(ws.InternalTrafficPolicy)
	r.Spec.InternalTrafficPolicy = &itp
	if ws.TrafficDistribution != nil {
		r.Spec.TrafficDistribution = new(*ws.TrafficDistribution)
	}
	r.Labels = maps.Clone(w.ExportedLabels)
	r.Annotations = maps.Clone(w.ExportedAnnotations)

	var ports portUnion
	for _, e := range exports {
		ports.add(e)
	}
	r.Spec.Ports = ports.ports

	type check struct {
		reason mcsv1beta1.ServiceExportConditionReason
		what   string
		value  func(Export) any
	}
	checks := []check{
		{mcsv1beta1.ServiceExportReasonPortConflict, "ports", func(e Export) any { return portSet(e.Service) }},
		{mcsv1beta1.ServiceExportReasonTypeConflict, "type", func(e Export) any { return importType(e.Service) }},
		{mcsv1beta1.ServiceExportReasonSessionAffinityConflict, "sessionAffinity", func(e Export) any { return affinity(e.Service.Spec.SessionAffinity) }},
		{mcsv1beta1.ServiceExportReasonSessionAffinityConfigConflict, "sessionAffinityConfig", func(e Export) any { return affinityConfig(e.Service) }},
		{mcsv1beta1.ServiceExportReasonInternalTrafficPolicyConflict, "internalTrafficPolicy", func(e Export) any { return trafficPolicy(e.Service.Spec.InternalTrafficPolicy) }},
		{mcsv1beta1.ServiceExportReasonTrafficDistributionConflict, "trafficDistribution", func(e Export) any { return deref(e.Service.Spec.TrafficDistribution, "<unset>") }},
		{mcsv1beta1.ServiceExportReasonIPFamilyConflict, "ipFamilies", func(e Export) any { return familySet(e.Service.Spec.IPFamilies) }},
		{mcsv1beta1.ServiceExportReasonLabelsConflict, "exportedLabels", func(e Export) any { return nonNil(e.ExportedLabels) }},
		{mcsv1beta1.ServiceExportReasonAnnotationsConflict, "exportedAnnotations", func(e Export) any { return nonNil(e.ExportedAnnotations) }},
	}
	for _, c := range checks {
		want := c.value(w)
		var differ []string
		for _, e := range exports[1:] {
			if !reflect.DeepEqual(c.value(e), want) {
				differ = append(differ, e.Cluster)
			}
		}
		if len(differ) == 0 {
			continue
		}
		use := fmt.Sprintf("using %s's (oldest export)", w.Cluster)
		if c.reason == mcsv1beta1.ServiceExportReasonPortConflict {
			use = fmt.Sprintf("using the union of all ports, %s's (oldest export) definition where they clash", w.Cluster)
		}
		r.Conflicts = append(r.Conflicts, Conflict{
			Reason:  c.reason,
			Message: fmt.Sprintf("%s of %s differ from %s's %s; %s", c.what, strings.Join(differ, ", "), w.Cluster, describe(want), use),
		})
	}
	return r, true
}

func importType(s *corev1.Service) mcsv1beta1.ServiceImportType {
	if s.Spec.ClusterIP == corev1.ClusterIPNone {
		return mcsv1beta1.Headless
	}
	return mcsv1beta1.ClusterSetIP
}

func affinity(a corev1.ServiceAffinity) corev1.ServiceAffinity {
	if a == "" {
		return corev1.ServiceAffinityNone
	}
	return a
}

// affinityConfig compares the effective timeout: Kubernetes defaults it to
// 10800 s when affinity is ClientIP and ignores it otherwise.
func affinityConfig(s *corev1.Service) int32 {
	if affinity(s.Spec.SessionAffinity) != corev1.ServiceAffinityClientIP {
		return 0
	}
	c := s.Spec.SessionAffinityConfig
	if c == nil || c.ClientIP == nil || c.ClientIP.TimeoutSeconds == nil {
		return corev1.DefaultClientIPServiceAffinitySeconds
	}
	return *c.ClientIP.TimeoutSeconds
}

func trafficPolicy(p *corev1.ServiceInternalTrafficPolicy) corev1.ServiceInternalTrafficPolicy {
	if p == nil {
		return corev1.ServiceInternalTrafficPolicyCluster
	}
	return *p
}

func familySet(f []corev1.IPFamily) []corev1.IPFamily {
	s := slices.Clone(f)
	slices.Sort(s)
	return nonNilSlice(s)
}

func nonNil(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

func nonNilSlice[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

func describe(v any) string {
	switch v := v.(type) {
	case []mcsv1beta1.ServicePort:
		parts := make([]string, len(v))
		for i, p := range v {
			parts[i] = portString(p)
		}
		return "[" + strings.Join(parts, " ") + "]"
	case map[string]string:
		keys := slices.Sorted(maps.Keys(v))
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = k + "=" + v[k]
		}
		return "{" + strings.Join(parts, ",") + "}"
	}
	return fmt.Sprint(v)
}

func portString(p mcsv1beta1.ServicePort) string {
	s := fmt.Sprintf("%d/%s", p.Port, p.Protocol)
	if p.Name != "" {
		s = p.Name + ":" + s
	}
	if p.AppProtocol != nil {
		s += "(" + *p.AppProtocol + ")"
	}
	return s
}

func importPort(p corev1.ServicePort) mcsv1beta1.ServicePort {
	proto := p.Protocol
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
	out := mcsv1beta1.ServicePort{Name: p.Name, Protocol: proto, Port: p.Port}
	if p.AppProtocol != nil {
		out.AppProtocol = new(*p.AppProtocol)
	}
	return out
}

// portSet is a Service's ports in a canonical order, for comparison.
func portSet(s *corev1.Service) []mcsv1beta1.ServicePort {
	out := make([]mcsv1beta1.ServicePort, 0, len(s.Spec.Ports))
	for _, p := range s.Spec.Ports {
		out = append(out, importPort(p))
	}
	slices.SortFunc(out, func(a, b mcsv1beta1.ServicePort) int {
		return cmp.Or(cmp.Compare(a.Name, b.Name), cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port))
	})
	return out
}

// portUnion collects ports oldest export first. A port joins an existing
// entry with the same name or, failing that, the same protocol and number;
// the existing (older) definition is kept. Otherwise it is added.
type portUnion struct{ ports []mcsv1beta1.ServicePort }

func (u *portUnion) add(e Export) {
	for _, sp := range e.Service.Spec.Ports {
		p := importPort(sp)
		if u.find(p) < 0 {
			u.ports = append(u.ports, p)
		}
	}
}

func (u *portUnion) find(p mcsv1beta1.ServicePort) int {
	if p.Name != "" {
		if i := slices.IndexFunc(u.ports, func(q mcsv1beta1.ServicePort) bool { return q.Name == p.Name }); i >= 0 {
			return i
		}
	}
	return slices.IndexFunc(u.ports, func(q mcsv1beta1.ServicePort) bool {
		return q.Protocol == p.Protocol && q.Port == p.Port
	})
}
