package federation_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"

	"github.com/fedmesh/fedmesh/federation"
)

const converge = 10 * time.Second

func TestExportLifecycle(t *testing.T) {
	need(t)
	ns := env.ns(t)
	env.service(t, "east", ns, "web", func(s *corev1.Service) {
		s.Spec.IPFamilyPolicy = new(corev1.IPFamilyPolicyRequireDualStack)
		s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol, corev1.IPv4Protocol}
	})
	env.endpoints(t, "east", ns, "web", "web-abc", []bool{true, false}, "10.1.0")
	env.export(t, "east", ns, "web", nil)

	for _, cl := range env.clusters {
		eventually(t, converge, "import in "+cl, func() error {
			si, err := env.getImport(cl, ns, "web")
			if err != nil {
				return err
			}
			if si.Spec.Type != mcsv1beta1.ClusterSetIP {
				return fmt.Errorf("type %s", si.Spec.Type)
			}
			if err := wantCondition(si.Status.Conditions, "Ready", metav1.ConditionTrue, "Ready"); err != nil {
				return err
			}
			if diff := cmp.Diff([]mcsv1beta1.ClusterStatus{{Cluster: "east"}}, si.Status.Clusters); diff != "" {
				return fmt.Errorf("clusters: %s", diff)
			}
			if si.Status.EndpointSliceObjects != mcsv1beta1.EndpointSliceObjectsPresent {
				return fmt.Errorf("endpointSliceObjects = %q", si.Status.EndpointSliceObjects)
			}
			// ips are the derived Service's ClusterIPs, in ipFamilies order.
			derived, err := env.kube[cl].CoreV1().Services(ns).Get(context.Background(), federation.DerivedServiceName("web"), metav1.GetOptions{})
			if err != nil {
				return err
			}
			if !slices.Equal(si.Spec.IPs, derived.Spec.ClusterIPs) || len(si.Spec.IPs) != 2 {
				return fmt.Errorf("ips %v, derived service has %v", si.Spec.IPs, derived.Spec.ClusterIPs)
			}
			if diff := cmp.Diff([]corev1.IPFamily{corev1.IPv6Protocol, corev1.IPv4Protocol}, si.Spec.IPFamilies); diff != "" {
				return fmt.Errorf("ipFamilies: %s", diff)
			}
			if !strings.Contains(si.Spec.IPs[0], ":") || strings.Contains(si.Spec.IPs[1], ":") {
				return fmt.Errorf("ips %v do not follow ipFamilies [IPv6 IPv4]", si.Spec.IPs)
			}
			if diff := cmp.Diff([]mcsv1beta1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80}}, si.Spec.Ports); diff != "" {
				return fmt.Errorf("ports: %s", diff)
			}
			return nil
		})
		eventually(t, converge, "mirrored endpoints in "+cl, func() error {
			sl, err := env.mirrored(cl, ns, "web")
			if err != nil {
				return err
			}
			if len(sl) != 1 {
				return fmt.Errorf("%d mirrored slices, want 1", len(sl))
			}
			s := sl[0]
			want := map[string]string{
				mcsv1beta1.LabelServiceName:   "web",
				mcsv1beta1.LabelSourceCluster: "east",
				discoveryv1.LabelManagedBy:    federation.ManagedBy,
				discoveryv1.LabelServiceName:  federation.DerivedServiceName("web"),
			}
			for k, v := range want {
				if s.Labels[k] != v {
					return fmt.Errorf("label %s = %q, want %q", k, s.Labels[k], v)
				}
			}
			if len(s.Endpoints) != 2 || *s.Endpoints[0].Conditions.Ready != true || *s.Endpoints[1].Conditions.Ready != false {
				return fmt.Errorf("endpoints %+v", s.Endpoints)
			}
			if s.Endpoints[0].NodeName != nil || s.Endpoints[0].TargetRef != nil {
				return fmt.Errorf("node name and pod reference of another cluster leaked: %+v", s.Endpoints[0])
			}
			if s.Endpoints[0].Conditions.Serving == nil || s.Endpoints[0].Conditions.Terminating == nil {
				return fmt.Errorf("serving/terminating not mirrored: %+v", s.Endpoints[0].Conditions)
			}
			return nil
		})
	}
	eventually(t, converge, "export conditions", func() error {
		se, err := env.getExport("east", ns, "web")
		if err != nil {
			return err
		}
		for _, c := range [][3]string{{"Valid", "True", "Valid"}, {"Conflict", "False", "NoConflicts"}, {"Ready", "True", "Exported"}} {
			if err := wantCondition(se.Status.Conditions, c[0], metav1.ConditionStatus(c[1]), c[2]); err != nil {
				return err
			}
		}
		return nil
	})

	// A readiness flip reaches every cluster.
	env.endpoints(t, "east", ns, "web", "web-abc", []bool{false, true}, "10.1.0")
	for _, cl := range []string{"west", "north"} {
		eventually(t, converge, "readiness flip in "+cl, func() error {
			sl, err := env.mirrored(cl, ns, "web")
			if err != nil || len(sl) != 1 {
				return fmt.Errorf("slices %v, %v", len(sl), err)
			}
			if *sl[0].Endpoints[0].Conditions.Ready || !*sl[0].Endpoints[1].Conditions.Ready {
				return fmt.Errorf("conditions not flipped: %+v", sl[0].Endpoints)
			}
			return nil
		})
	}

	// Unexport: import, derived Service and slices go everywhere.
	env.unexport(t, "east", ns, "web")
	for _, cl := range env.clusters {
		eventually(t, converge, "import withdrawn in "+cl, func() error {
			if _, err := env.getImport(cl, ns, "web"); !apierrors.IsNotFound(err) {
				return fmt.Errorf("import still there (err %v)", err)
			}
			if sl, _ := env.mirrored(cl, ns, "web"); len(sl) != 0 {
				return fmt.Errorf("%d mirrored slices left", len(sl))
			}
			if _, err := env.kube[cl].CoreV1().Services(ns).Get(context.Background(), federation.DerivedServiceName("web"), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return fmt.Errorf("derived service left (err %v)", err)
			}
			return nil
		})
	}
}

func TestInvalidExports(t *testing.T) {
	need(t)
	ns := env.ns(t)
	env.export(t, "west", ns, "ghost", nil)
	env.service(t, "west", ns, "ext", func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeExternalName
		s.Spec.ExternalName = "example.invalid"
		s.Spec.Ports = nil
	})
	env.export(t, "west", ns, "ext", nil)
	for name, reason := range map[string]string{"ghost": "NoService", "ext": "InvalidServiceType"} {
		eventually(t, converge, name+" invalid", func() error {
			se, err := env.getExport("west", ns, name)
			if err != nil {
				return err
			}
			if err := wantCondition(se.Status.Conditions, "Valid", metav1.ConditionFalse, reason); err != nil {
				return err
			}
			return wantCondition(se.Status.Conditions, "Ready", metav1.ConditionFalse, "Failed")
		})
	}
	// No import for either, anywhere. Every controller gets west's
	// exports on one watch, in order: once a valid export made after the
	// two has been imported everywhere, every controller has seen them and
	// reconciled them or is doing so (its workers take keys in order).
	env.service(t, "west", ns, "marker", nil)
	env.export(t, "west", ns, "marker", nil)
	for _, cl := range env.clusters {
		eventually(t, converge, "marker imported in "+cl, func() error { _, err := env.getImport(cl, ns, "marker"); return err })
	}
	for _, cl := range env.clusters {
		for _, name := range []string{"ghost", "ext"} {
			if _, err := env.getImport(cl, ns, name); !apierrors.IsNotFound(err) {
				t.Errorf("%s: import of invalid export %s exists (err %v)", cl, name, err)
			}
		}
	}
	// Creating the missing Service makes the export valid and imported.
	env.service(t, "west", ns, "ghost", nil)
	eventually(t, converge, "ghost becomes valid", func() error {
		se, err := env.getExport("west", ns, "ghost")
		if err != nil {
			return err
		}
		if err := wantCondition(se.Status.Conditions, "Valid", metav1.ConditionTrue, "Valid"); err != nil {
			return err
		}
		_, err = env.getImport("north", ns, "ghost")
		return err
	})
}

// TestConflicts exports one service from west and, a second later (so
// west's export is the oldest even though "east" sorts first), a
// different one from east, for every conflict kind at once.
func TestConflicts(t *testing.T) {
	need(t)
	ptr := func(s string) *string { return &s }
	local := corev1.ServiceInternalTrafficPolicyLocal
	type tc struct {
		name   string
		west   func(*corev1.Service)
		east   func(*corev1.Service)
		eastSE func(*mcsv1beta1.ServiceExport)
		reason string
		check  func(*mcsv1beta1.ServiceImport) error
	}
	cases := []tc{
		{name: "port", reason: "PortConflict", east: func(s *corev1.Service) { s.Spec.Ports[0].Port = 8080 },
			check: func(si *mcsv1beta1.ServiceImport) error {
				if len(si.Spec.Ports) != 1 || si.Spec.Ports[0].Port != 80 {
					return fmt.Errorf("ports %+v, want west's http:80", si.Spec.Ports)
				}
				return nil
			}},
		{name: "union", reason: "PortConflict", east: func(s *corev1.Service) {
			s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "grpc", Protocol: corev1.ProtocolTCP, Port: 9090})
		}, check: func(si *mcsv1beta1.ServiceImport) error {
			if len(si.Spec.Ports) != 2 || si.Spec.Ports[1].Name != "grpc" {
				return fmt.Errorf("ports %+v, want the union http:80 grpc:9090", si.Spec.Ports)
			}
			return nil
		}},
		{name: "type", reason: "TypeConflict", east: func(s *corev1.Service) {
			s.Spec.ClusterIP = corev1.ClusterIPNone
			s.Spec.IPFamilyPolicy = new(corev1.IPFamilyPolicySingleStack) // headless defaults to dual-stack otherwise
		},
			check: func(si *mcsv1beta1.ServiceImport) error {
				if si.Spec.Type != mcsv1beta1.ClusterSetIP {
					return fmt.Errorf("type %s, want west's ClusterSetIP", si.Spec.Type)
				}
				return nil
			}},
		{name: "affinity", reason: "SessionAffinityConflict,SessionAffinityConfigConflict", east: func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		}},
		{name: "affinity-config", reason: "SessionAffinityConfigConflict", west: func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		}, east: func(s *corev1.Service) {
			s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: new(int32(60))}}
		}},
		{name: "itp", reason: "InternalTrafficPolicyConflict", east: func(s *corev1.Service) { s.Spec.InternalTrafficPolicy = &local }},
		{name: "td", reason: "TrafficDistributionConflict", east: func(s *corev1.Service) { s.Spec.TrafficDistribution = ptr("PreferClose") }},
		{name: "family", reason: "IPFamilyConflict", east: func(s *corev1.Service) {
			s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol}
		}, check: func(si *mcsv1beta1.ServiceImport) error {
			if !slices.Equal(si.Spec.IPFamilies, []corev1.IPFamily{corev1.IPv4Protocol}) {
				return fmt.Errorf("ipFamilies %v, want west's [IPv4]", si.Spec.IPFamilies)
			}
			return nil
		}},
		{name: "labels", reason: "LabelsConflict", eastSE: func(se *mcsv1beta1.ServiceExport) {
			se.Spec.ExportedLabels = map[string]string{"tier": "bronze"}
		}, check: func(si *mcsv1beta1.ServiceImport) error {
			if si.Labels["tier"] != "gold" {
				return fmt.Errorf("labels %v, want west's tier=gold", si.Labels)
			}
			return nil
		}},
		{name: "annotations", reason: "AnnotationsConflict", eastSE: func(se *mcsv1beta1.ServiceExport) {
			se.Spec.ExportedAnnotations = map[string]string{"owner": "team-east"}
		}},
	}
	nss := make([]string, len(cases))
	westSE := func(se *mcsv1beta1.ServiceExport) { se.Spec.ExportedLabels = map[string]string{"tier": "gold"} }
	for i, c := range cases {
		nss[i] = env.ns(t)
		env.service(t, "west", nss[i], "svc", func(s *corev1.Service) {
			s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol}
			if c.west != nil {
				c.west(s)
			}
		})
		env.export(t, "west", nss[i], "svc", westSE)
		east := func(s *corev1.Service) { s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol} }
		if c.east != nil {
			east = func(s *corev1.Service) { s.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv4Protocol}; c.east(s) }
		}
		env.service(t, "east", nss[i], "svc", east)
	}
	time.Sleep(1100 * time.Millisecond) // creationTimestamp has second resolution
	for i, c := range cases {
		eastSE := westSE
		if c.eastSE != nil {
			eastSE = func(se *mcsv1beta1.ServiceExport) { westSE(se); c.eastSE(se) }
		}
		env.export(t, "east", nss[i], "svc", eastSE)
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ns := nss[i]
			// The condition is on every export of the service.
			for _, cl := range []string{"east", "west"} {
				eventually(t, converge, "conflict on "+cl, func() error {
					se, err := env.getExport(cl, ns, "svc")
					if err != nil {
						return err
					}
					cond, err := condition(se.Status.Conditions, "Conflict")
					if err != nil {
						return err
					}
					if cond.Status != metav1.ConditionTrue || cond.Reason != c.reason {
						return fmt.Errorf("Conflict = %s/%s, want True/%s (%s)", cond.Status, cond.Reason, c.reason, cond.Message)
					}
					if !strings.Contains(cond.Message, "west's (oldest export)") && !strings.Contains(cond.Message, "west's (oldest export) definition") {
						return fmt.Errorf("message does not say the oldest (west) wins: %s", cond.Message)
					}
					return wantCondition(se.Status.Conditions, "Ready", metav1.ConditionTrue, "Exported")
				})
			}
			eventually(t, converge, "import follows the oldest export", func() error {
				si, err := env.getImport("north", ns, "svc")
				if err != nil {
					return err
				}
				if len(si.Status.Clusters) != 2 {
					return fmt.Errorf("clusters %v", si.Status.Clusters)
				}
				if c.check != nil {
					return c.check(si)
				}
				return nil
			})
		})
	}
}

func TestHeadless(t *testing.T) {
	need(t)
	ns := env.ns(t)
	env.service(t, "north", ns, "db", func(s *corev1.Service) { s.Spec.ClusterIP = corev1.ClusterIPNone })
	env.endpoints(t, "north", ns, "db", "db-1", []bool{true}, "10.3.0")
	env.export(t, "north", ns, "db", nil)
	eventually(t, converge, "headless import", func() error {
		si, err := env.getImport("east", ns, "db")
		if err != nil {
			return err
		}
		if si.Spec.Type != mcsv1beta1.Headless || len(si.Spec.IPs) != 0 {
			return fmt.Errorf("type %s ips %v, want Headless with no ips", si.Spec.Type, si.Spec.IPs)
		}
		sl, err := env.mirrored("east", ns, "db")
		if err != nil || len(sl) != 1 || sl[0].Endpoints[0].Addresses[0] != "10.3.0.1" {
			return fmt.Errorf("mirrored slices %+v %v", sl, err)
		}
		return wantCondition(si.Status.Conditions, "Ready", metav1.ConditionTrue, "Ready")
	})
}

func TestExportedLabelsAndAnnotations(t *testing.T) {
	need(t)
	ns := env.ns(t)
	env.service(t, "east", ns, "api", func(s *corev1.Service) {
		s.Labels = map[string]string{"not-exported": "x"}
		s.Annotations = map[string]string{"not-exported": "y"}
	})
	env.export(t, "east", ns, "api", func(se *mcsv1beta1.ServiceExport) {
		se.Labels = map[string]string{"export-own-label": "z"}
		se.Spec.ExportedLabels = map[string]string{"team": "payments"}
		se.Spec.ExportedAnnotations = map[string]string{"fedmesh.dev/docs": "https://wiki.invalid/api"}
	})
	eventually(t, converge, "exported metadata", func() error {
		si, err := env.getImport("west", ns, "api")
		if err != nil {
			return err
		}
		if diff := cmp.Diff(map[string]string{"team": "payments"}, si.Labels); diff != "" {
			return fmt.Errorf("labels (-want +got): %s", diff)
		}
		if diff := cmp.Diff(map[string]string{"fedmesh.dev/docs": "https://wiki.invalid/api"}, si.Annotations); diff != "" {
			return fmt.Errorf("annotations (-want +got): %s", diff)
		}
		return nil
	})
}

func TestNamespaceAbsent(t *testing.T) {
	need(t)
	ns := env.ns(t, "east", "west")
	env.service(t, "east", ns, "cart", nil)
	env.export(t, "east", ns, "cart", nil)
	eventually(t, converge, "import in west", func() error { _, err := env.getImport("west", ns, "cart"); return err })
	if _, err := env.getImport("north", ns, "cart"); !apierrors.IsNotFound(err) {
		t.Fatalf("north has no namespace %s, yet: %v", ns, err)
	}
	env.createNS(t, "north", ns)
	eventually(t, converge, "import in north once the namespace exists", func() error { _, err := env.getImport("north", ns, "cart"); return err })
}
