package federation

import (
	"context"
	"crypto/sha256"
	"encoding/base32"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"

	"github.com/fedmesh/fedmesh/federation/merge"
)

// source is one cluster's valid export of the service being reconciled.
type source struct {
	cluster    string
	cache      *clusterCache
	stale      bool
	staleSince time.Time
}

// reconcile converges everything the controller owns for one exported
// name, reading only its caches: the local export's conditions, the
// ServiceImport, its derived Service and the mirrored EndpointSlices.
func (c *Controller) reconcile(ctx context.Context, key string) error {
	ns, name, ok := strings.Cut(key, "/")
	if !ok {
		return nil
	}
	now := time.Now()
	type clusterView struct {
		id         string
		cache      *clusterCache
		stale      bool
		staleSince time.Time
	}
	views := []clusterView{{id: c.clusterID, cache: c.local}}
	for _, v := range c.peerViews(now) {
		if !v.expired {
			views = append(views, clusterView{v.id, v.cache, v.stale, v.staleSince})
		}
	}

	var (
		exports     []merge.Export
		sources     = map[string]source{}
		localExport *mcsv1beta1.ServiceExport
		localValid  metav1.Condition
	)
	for _, v := range views {
		se, err := v.cache.exports.ServiceExports(ns).Get(name)
		if err != nil || se.DeletionTimestamp != nil {
			continue
		}
		svc, err := v.cache.services.Services(ns).Get(name)
		if err != nil {
			svc = nil
		}
		valid := validity(se, svc)
		if v.cache == c.local {
			localExport, localValid = se, valid
		}
		if valid.Status != metav1.ConditionTrue {
			continue
		}
		exports = append(exports, merge.Export{
			Cluster: v.id, Created: se.CreationTimestamp, Service: svc,
			ExportedLabels: se.Spec.ExportedLabels, ExportedAnnotations: se.Spec.ExportedAnnotations,
		})
		sources[v.id] = source{cluster: v.id, cache: v.cache, stale: v.stale, staleSince: v.staleSince}
	}
	result, exported := merge.Exports(exports)
	if c.log.Enabled(ctx, slog.LevelDebug) {
		var stale []string
		for _, s := range sources {
			if s.stale {
				stale = append(stale, s.cluster)
			}
		}
		c.log.Debug("reconcile", "service", key, "exportedBy", result.Clusters, "stale", stale, "conflict", result.Reason())
	}
	c.conflicted.set(key, exported && len(result.Conflicts) > 0)

	nsObj, err := c.local.namespaces.Get(ns)
	nsLive := err == nil && nsObj.Status.Phase != corev1.NamespaceTerminating
	var importErr error
	if exported && nsLive {
		importErr = c.syncImport(ctx, ns, name, result, sources, now)
		c.imported.set(key, importErr == nil)
	} else {
		importErr = c.deleteImport(ctx, ns, name)
		c.imported.set(key, false)
	}
	if localExport != nil {
		if err := c.syncExportStatus(ctx, localExport, localValid, result, importErr); err != nil {
			return errors.Join(importErr, err)
		}
	}
	return importErr
}

func validity(se *mcsv1beta1.ServiceExport, svc *corev1.Service) metav1.Condition {
	cond := metav1.Condition{Type: string(mcsv1beta1.ServiceExportConditionValid), ObservedGeneration: se.Generation}
	switch {
	case svc == nil:
		cond.Status, cond.Reason = metav1.ConditionFalse, string(mcsv1beta1.ServiceExportReasonNoService)
		cond.Message = fmt.Sprintf("Service %s/%s does not exist; create it or delete this export", se.Namespace, se.Name)
	case svc.Spec.Type == corev1.ServiceTypeExternalName:
		cond.Status, cond.Reason = metav1.ConditionFalse, string(mcsv1beta1.ServiceExportReasonInvalidServiceType)
		cond.Message = fmt.Sprintf("Service %s/%s is of type ExternalName, which cannot be exported", se.Namespace, se.Name)
	default:
		cond.Status, cond.Reason = metav1.ConditionTrue, string(mcsv1beta1.ServiceExportReasonValid)
		cond.Message = fmt.Sprintf("Service %s/%s is exported", se.Namespace, se.Name)
	}
	return cond
}

func (c *Controller) syncExportStatus(ctx context.Context, se *mcsv1beta1.ServiceExport, valid metav1.Condition, result merge.Result, importErr error) error {
	conds := slices.Clone(se.Status.Conditions)
	meta.SetStatusCondition(&conds, valid)
	conflict := metav1.Condition{Type: string(mcsv1beta1.ServiceExportConditionConflict), ObservedGeneration: se.Generation}
	ready := metav1.Condition{Type: string(mcsv1beta1.ServiceExportConditionReady), ObservedGeneration: se.Generation}
	switch {
	case valid.Status != metav1.ConditionTrue:
		conflict.Status, conflict.Reason = metav1.ConditionFalse, string(mcsv1beta1.ServiceExportReasonNoConflicts)
		conflict.Message = "the export is not valid, so it takes no part in the multi-cluster service"
		ready.Status, ready.Reason = metav1.ConditionFalse, string(mcsv1beta1.ServiceExportReasonFailed)
		ready.Message = "not exported: " + valid.Message
	default:
		conflict.Reason, conflict.Message = result.Reason(), result.Message()
		conflict.Status = metav1.ConditionFalse
		if len(result.Conflicts) > 0 {
			conflict.Status = metav1.ConditionTrue
		}
		if importErr != nil {
			ready.Status, ready.Reason = metav1.ConditionFalse, string(mcsv1beta1.ServiceExportReasonPending)
			ready.Message = "export is being applied; last attempt: " + importErr.Error()
		} else {
			ready.Status, ready.Reason = metav1.ConditionTrue, string(mcsv1beta1.ServiceExportReasonExported)
			ready.Message = fmt.Sprintf("exported to the clusterset (exporting clusters: %s)", strings.Join(result.Clusters, ", "))
		}
	}
	meta.SetStatusCondition(&conds, conflict)
	meta.SetStatusCondition(&conds, ready)
	if equality.Semantic.DeepEqual(conds, se.Status.Conditions) {
		return nil
	}
	upd := se.DeepCopy()
	upd.Status.Conditions = conds
	if _, err := c.local.mcs.MulticlusterV1beta1().ServiceExports(se.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update serviceexport %s/%s status: %w", se.Namespace, se.Name, err)
	}
	return nil
}

// DerivedServiceName is the name of the Service that gives an import its
// clusterset IP in the importing cluster: stable, short and collision-free.
func DerivedServiceName(importName string) string {
	sum := sha256.Sum256([]byte(importName))
	return "derived-" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:])[:10])
}

func (c *Controller) syncImport(ctx context.Context, ns, name string, result merge.Result, sources map[string]source, now time.Time) error {
	derived, famErr := c.syncDerivedService(ctx, ns, name, result)
	if famErr != nil && !errors.Is(famErr, errFamilyNotSupported) {
		return famErr
	}
	spec := result.Spec
	if derived != nil && spec.Type == mcsv1beta1.ClusterSetIP {
		spec.IPs = slices.Clone(derived.Spec.ClusterIPs)
		spec.IPFamilies = slices.Clone(derived.Spec.IPFamilies)
	}
	cur, err := c.local.imports.ServiceImports(ns).Get(name)
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	api := c.local.mcs.MulticlusterV1beta1().ServiceImports(ns)
	if cur == nil {
		si := &mcsv1beta1.ServiceImport{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: result.Labels, Annotations: result.Annotations},
			Spec:       spec,
		}
		if cur, err = api.Create(ctx, si, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create serviceimport %s/%s: %w", ns, name, err)
		}
	} else if !equality.Semantic.DeepEqual(cur.Spec, spec) || !mapsEqual(cur.Labels, result.Labels) || !mapsEqual(cur.Annotations, result.Annotations) {
		upd := cur.DeepCopy()
		upd.Spec, upd.Labels, upd.Annotations = spec, result.Labels, result.Annotations
		if cur, err = api.Update(ctx, upd, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("update serviceimport %s/%s: %w", ns, name, err)
		}
	}

	present := false
	if derived != nil {
		if present, err = c.syncSlices(ctx, ns, name, derived.Name, result.Clusters, sources); err != nil {
			return err
		}
	}

	conds := slices.Clone(cur.Status.Conditions)
	ready := metav1.Condition{Type: string(mcsv1beta1.ServiceImportConditionReady), ObservedGeneration: cur.Generation}
	if famErr != nil {
		ready.Status, ready.Reason = metav1.ConditionFalse, string(mcsv1beta1.ServiceImportReasonIPFamilyNotSupported)
		ready.Message = famErr.Error()
	} else {
		ready.Status, ready.Reason = metav1.ConditionTrue, string(mcsv1beta1.ServiceImportReasonReady)
		ready.Message = fmt.Sprintf("imported from %s", strings.Join(result.Clusters, ", "))
	}
	meta.SetStatusCondition(&conds, ready)
	meta.SetStatusCondition(&conds, staleCondition(cur.Generation, result.Clusters, sources, c.opts.StaleBound))
	status := mcsv1beta1.ServiceImportStatus{Conditions: conds, EndpointSliceObjects: mcsv1beta1.EndpointSliceObjectsAbsent}
	if present {
		status.EndpointSliceObjects = mcsv1beta1.EndpointSliceObjectsPresent
	}
	for _, cl := range result.Clusters {
		status.Clusters = append(status.Clusters, mcsv1beta1.ClusterStatus{Cluster: cl})
	}
	if !equality.Semantic.DeepEqual(status, cur.Status) {
		upd := cur.DeepCopy()
		upd.Status = status
		if _, err := api.UpdateStatus(ctx, upd, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("update serviceimport %s/%s status: %w", ns, name, err)
		}
	}
	return nil
}

func staleCondition(gen int64, clusters []string, sources map[string]source, bound time.Duration) metav1.Condition {
	cond := metav1.Condition{Type: ConditionStale, ObservedGeneration: gen, Status: metav1.ConditionFalse, Reason: "AllClustersReachable",
		Message: "the state of every exporting cluster is current"}
	var stale []string
	for _, cl := range clusters {
		if s := sources[cl]; s.stale {
			msg := fmt.Sprintf("%s (unreachable since %s", cl, s.staleSince.UTC().Format(time.RFC3339))
			if bound >= 0 {
				msg += fmt.Sprintf(", endpoints withdrawn after %s", s.staleSince.Add(bound).UTC().Format(time.RFC3339))
			}
			stale = append(stale, msg+")")
		}
	}
	if len(stale) > 0 {
		cond.Status, cond.Reason = metav1.ConditionTrue, "PeerUnreachable"
		cond.Message = "serving the last known state of " + strings.Join(stale, "; ")
	}
	return cond
}

var errFamilyNotSupported = errors.New("ip family not supported")

// syncDerivedService keeps the Service that carries the import's clusterset
// IP. Its ClusterIPs become the ServiceImport's ips, in ipFamilies order.
func (c *Controller) syncDerivedService(ctx context.Context, ns, name string, result merge.Result) (*corev1.Service, error) {
	want := derivedService(ns, name, result)
	api := c.local.kube.CoreV1().Services(ns)
	cur, err := c.local.services.Services(ns).Get(want.Name)
	if err != nil && !apierrors.IsNotFound(err) {
		return nil, err
	}
	if cur != nil && (cur.Spec.ClusterIP == corev1.ClusterIPNone) != (want.Spec.ClusterIP == corev1.ClusterIPNone) ||
		cur != nil && len(want.Spec.IPFamilies) > 0 && !slices.Equal(cur.Spec.IPFamilies, want.Spec.IPFamilies) {
		// Headless-ness and IP families are immutable: replace the Service.
		if err := api.Delete(ctx, cur.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &cur.UID}}); err != nil && !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("replace derived service %s/%s: %w", ns, cur.Name, err)
		}
		cur = nil
	}
	if cur == nil {
		created, err := api.Create(ctx, want, metav1.CreateOptions{})
		if apierrors.IsInvalid(err) && len(want.Spec.IPFamilies) > 0 {
			return nil, fmt.Errorf("%w: cluster %s cannot allocate a clusterset IP of families %v: %v",
				errFamilyNotSupported, c.clusterID, want.Spec.IPFamilies, apierrors.ReasonForError(err))
		}
		if apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("create derived service %s/%s: %w (retrying once the cache catches up)", ns, want.Name, err)
		}
		if err != nil {
			return nil, fmt.Errorf("create derived service %s/%s: %w", ns, want.Name, err)
		}
		return created, nil
	}
	if equality.Semantic.DeepEqual(cur.Spec.Ports, want.Spec.Ports) &&
		cur.Spec.SessionAffinity == want.Spec.SessionAffinity &&
		equality.Semantic.DeepEqual(cur.Spec.SessionAffinityConfig, want.Spec.SessionAffinityConfig) &&
		equality.Semantic.DeepEqual(cur.Spec.InternalTrafficPolicy, want.Spec.InternalTrafficPolicy) &&
		equality.Semantic.DeepEqual(cur.Spec.TrafficDistribution, want.Spec.TrafficDistribution) &&
		mapsEqual(cur.Labels, want.Labels) {
		return cur, nil
	}
	upd := cur.DeepCopy()
	upd.Labels = want.Labels
	upd.Spec.Ports = want.Spec.Ports
	upd.Spec.SessionAffinity, upd.Spec.SessionAffinityConfig = want.Spec.SessionAffinity, want.Spec.SessionAffinityConfig
	upd.Spec.InternalTrafficPolicy, upd.Spec.TrafficDistribution = want.Spec.InternalTrafficPolicy, want.Spec.TrafficDistribution
	updated, err := api.Update(ctx, upd, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("update derived service %s/%s: %w", ns, cur.Name, err)
	}
	return updated, nil
}

func derivedService(ns, name string, result merge.Result) *corev1.Service {
	s := result.Spec
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{
			Name: DerivedServiceName(name), Namespace: ns,
			Labels: map[string]string{mcsv1beta1.LabelServiceName: name, labelDerivedService: "true"},
			Annotations: map[string]string{
				"multicluster.fedmesh.dev/service-import": name,
			},
		},
		Spec: corev1.ServiceSpec{
			Type:                  corev1.ServiceTypeClusterIP,
			SessionAffinity:       s.SessionAffinity,
			SessionAffinityConfig: s.SessionAffinityConfig.DeepCopy(),
			InternalTrafficPolicy: s.InternalTrafficPolicy,
			TrafficDistribution:   s.TrafficDistribution,
			IPFamilies:            slices.Clone(s.IPFamilies),
		},
	}
	switch len(s.IPFamilies) {
	case 1:
		svc.Spec.IPFamilyPolicy = new(corev1.IPFamilyPolicySingleStack)
	case 2:
		svc.Spec.IPFamilyPolicy = new(corev1.IPFamilyPolicyRequireDualStack)
	}
	if s.Type == mcsv1beta1.Headless {
		svc.Spec.ClusterIP = corev1.ClusterIPNone
		svc.Spec.SessionAffinity, svc.Spec.SessionAffinityConfig = corev1.ServiceAffinityNone, nil
	}
	for _, p := range s.Ports {
		sp := corev1.ServicePort{Name: p.Name, Protocol: p.Protocol, Port: p.Port, TargetPort: intstr.FromInt32(p.Port), AppProtocol: p.AppProtocol}
		if sp.Name == "" && len(s.Ports) > 1 {
			// A Service with several ports needs every port named.
			sp.Name = strings.ToLower(fmt.Sprintf("%s-%d", p.Protocol, p.Port))
		}
		svc.Spec.Ports = append(svc.Spec.Ports, sp)
	}
	return svc
}

// deleteImport removes the import, its derived Service and mirrored slices,
// touching the API only for objects the cache shows.
func (c *Controller) deleteImport(ctx context.Context, ns, name string) error {
	var errs []error
	for _, s := range c.local.importSlices(ns, name) {
		errs = append(errs, ignoreNotFound(c.local.kube.DiscoveryV1().EndpointSlices(ns).Delete(ctx, s.Name, metav1.DeleteOptions{})))
	}
	if svc, err := c.local.services.Services(ns).Get(DerivedServiceName(name)); err == nil && svc.Labels[labelDerivedService] == "true" {
		errs = append(errs, ignoreNotFound(c.local.kube.CoreV1().Services(ns).Delete(ctx, svc.Name, metav1.DeleteOptions{})))
	}
	if _, err := c.local.imports.ServiceImports(ns).Get(name); err == nil {
		errs = append(errs, ignoreNotFound(c.local.mcs.MulticlusterV1beta1().ServiceImports(ns).Delete(ctx, name, metav1.DeleteOptions{})))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("withdraw import %s/%s: %w", ns, name, err)
	}
	return nil
}

func ignoreNotFound(err error) error {
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}
