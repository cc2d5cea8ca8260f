package merge

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func export(cluster string, age int, mut func(*Export)) Export {
	e := Export{
		Cluster: cluster,
		Created: metav1.NewTime(t0.Add(time.Duration(age) * time.Second)),
		Service: &corev1.Service{Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  "10.0.0.1",
			Ports:      []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80}},
			IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
		}},
	}
	if mut != nil {
		mut(&e)
	}
	return e
}

func TestConflicts(t *testing.T) {
	ptr := func(s string) *string { return &s }
	local := corev1.ServiceInternalTrafficPolicyLocal
	cases := []struct {
		name    string
		mut     func(*Export) // applied to the newer export (west)
		reasons string
	}{
		{"identical", nil, "NoConflicts"},
		{"port number", func(e *Export) { e.Service.Spec.Ports[0].Port = 8080 }, "PortConflict"},
		{"extra port", func(e *Export) {
			e.Service.Spec.Ports = append(e.Service.Spec.Ports, corev1.ServicePort{Name: "grpc", Protocol: corev1.ProtocolTCP, Port: 9090})
		}, "PortConflict"},
		{"app protocol", func(e *Export) { e.Service.Spec.Ports[0].AppProtocol = ptr("http") }, "PortConflict"},
		{"headless", func(e *Export) { e.Service.Spec.ClusterIP = corev1.ClusterIPNone }, "TypeConflict"},
		{"session affinity", func(e *Export) { e.Service.Spec.SessionAffinity = corev1.ServiceAffinityClientIP }, "SessionAffinityConflict,SessionAffinityConfigConflict"},
		{"internal traffic policy", func(e *Export) { e.Service.Spec.InternalTrafficPolicy = &local }, "InternalTrafficPolicyConflict"},
		{"traffic distribution", func(e *Export) { e.Service.Spec.TrafficDistribution = ptr("PreferClose") }, "TrafficDistributionConflict"},
		{"ip family", func(e *Export) { e.Service.Spec.IPFamilies = []corev1.IPFamily{corev1.IPv6Protocol} }, "IPFamilyConflict"},
		{"labels", func(e *Export) { e.ExportedLabels = map[string]string{"tier": "gold"} }, "LabelsConflict"},
		{"annotations", func(e *Export) { e.ExportedAnnotations = map[string]string{"a": "b"} }, "AnnotationsConflict"},
		{"several", func(e *Export) {
			e.Service.Spec.Ports[0].Port = 81
			e.Service.Spec.ClusterIP = corev1.ClusterIPNone
		}, "PortConflict,TypeConflict"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, ok := Exports([]Export{export("west", 10, tc.mut), export("east", 0, nil)})
			if !ok {
				t.Fatal("no result")
			}
			if got := r.Reason(); got != tc.reasons {
				t.Fatalf("reason = %q, want %q (%s)", got, tc.reasons, r.Message())
			}
			if r.Winner != "east" {
				t.Errorf("winner = %s, want the oldest (east)", r.Winner)
			}
			if tc.reasons != "NoConflicts" && !strings.Contains(r.Message(), "west") {
				t.Errorf("message does not name the differing cluster: %s", r.Message())
			}
		})
	}
}

func TestOldestWins(t *testing.T) {
	older := export("west", 0, func(e *Export) {
		e.Service.Spec.ClusterIP = corev1.ClusterIPNone
		e.ExportedLabels = map[string]string{"owner": "west"}
	})
	newer := export("east", 5, func(e *Export) { e.ExportedLabels = map[string]string{"owner": "east"} })
	r, _ := Exports([]Export{newer, older})
	if r.Spec.Type != mcsv1beta1.Headless {
		t.Errorf("type = %s, want Headless from the oldest export", r.Spec.Type)
	}
	if diff := cmp.Diff(map[string]string{"owner": "west"}, r.Labels); diff != "" {
		t.Errorf("labels (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"east", "west"}, r.Clusters); diff != "" {
		t.Errorf("clusters (-want +got):\n%s", diff)
	}
}

func TestSameTimestampTieBreaksByCluster(t *testing.T) {
	a := export("west", 0, func(e *Export) { e.Service.Spec.Ports[0].Port = 81 })
	b := export("east", 0, nil)
	for _, in := range [][]Export{{a, b}, {b, a}} {
		r, _ := Exports(in)
		if r.Winner != "east" || r.Spec.Ports[0].Port != 80 {
			t.Fatalf("winner %s port %d: order of input must not matter", r.Winner, r.Spec.Ports[0].Port)
		}
	}
}

func TestPortUnion(t *testing.T) {
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	east := export("east", 0, func(e *Export) {
		e.Service.Spec.Ports = []corev1.ServicePort{{Name: "http", Protocol: tcp, Port: 80}, {Name: "dns", Protocol: udp, Port: 53}}
	})
	west := export("west", 1, func(e *Export) {
		e.Service.Spec.Ports = []corev1.ServicePort{
			{Name: "http", Protocol: tcp, Port: 8080}, // same name: east's wins
			{Name: "web", Protocol: udp, Port: 53},    // same protocol+port as dns: merged
			{Name: "grpc", Protocol: tcp, Port: 9090}, // new: added
		}
	})
	north := export("north", 2, func(e *Export) {
		e.Service.Spec.Ports = []corev1.ServicePort{{Name: "metrics", Protocol: tcp, Port: 9100}}
	})
	r, _ := Exports([]Export{north, west, east})
	want := []mcsv1beta1.ServicePort{
		{Name: "http", Protocol: tcp, Port: 80},
		{Name: "dns", Protocol: udp, Port: 53},
		{Name: "grpc", Protocol: tcp, Port: 9090},
		{Name: "metrics", Protocol: tcp, Port: 9100},
	}
	if diff := cmp.Diff(want, r.Spec.Ports); diff != "" {
		t.Errorf("ports (-want +got):\n%s", diff)
	}
	if r.Reason() != "PortConflict" {
		t.Errorf("reason = %s, want PortConflict even though the union is used", r.Reason())
	}
}

func TestSingleExport(t *testing.T) {
	r, ok := Exports([]Export{export("east", 0, nil)})
	if !ok || r.Reason() != "NoConflicts" || r.Spec.Type != mcsv1beta1.ClusterSetIP {
		t.Fatalf("got %+v", r)
	}
	if *r.Spec.InternalTrafficPolicy != corev1.ServiceInternalTrafficPolicyCluster || r.Spec.SessionAffinity != corev1.ServiceAffinityNone {
		t.Errorf("defaults not filled: %+v", r.Spec)
	}
	if _, ok := Exports(nil); ok {
		t.Error("no exports must give no result")
	}
}

func TestIPFamilyOrderIsNoConflict(t *testing.T) {
	v4, v6 := corev1.IPv4Protocol, corev1.IPv6Protocol
	a := export("east", 0, func(e *Export) { e.Service.Spec.IPFamilies = []corev1.IPFamily{v4, v6} })
	b := export("west", 1, func(e *Export) { e.Service.Spec.IPFamilies = []corev1.IPFamily{v6, v4} })
	r, _ := Exports([]Export{a, b})
	if r.Reason() != "NoConflicts" {
		t.Fatalf("reason = %s: both clusters serve both families", r.Reason())
	}
	if diff := cmp.Diff([]corev1.IPFamily{v4, v6}, r.Spec.IPFamilies); diff != "" {
		t.Errorf("families keep the oldest export's order (-want +got):\n%s", diff)
	}
}
