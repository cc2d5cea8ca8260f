package fedctl

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
	"github.com/fedmesh/fedmesh/federation/about"
	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/localfed"
)

// Status is what `fedctl status -o json` prints.
type Status struct {
	Clusters []ClusterStatus `json:"clusters"`
	Services []ServiceStatus `json:"services"`
	// Policies are the routes and traffic policies of every cluster, with
	// whether its controller accepted them.
	Policies []PolicyStatus `json:"policies,omitempty"`
}

// ClusterStatus is one member cluster.
type ClusterStatus struct {
	Context    string                  `json:"context"`
	ClusterID  string                  `json:"clusterID,omitempty"`
	ClusterSet string                  `json:"clusterSet,omitempty"`
	APIServer  string                  `json:"apiServer"`
	Reachable  bool                    `json:"reachable"`
	Error      string                  `json:"error,omitempty"`
	Controller ControllerStatus        `json:"controller"`
	Peers      []federation.PeerStatus `json:"peers,omitempty"`
	Trust      *TrustStatus            `json:"trust,omitempty"`
	Gateways   []GatewayStatus         `json:"gateways,omitempty"`
	Serving    []ServingStatus         `json:"serving,omitempty"`
	Exports    int                     `json:"exports"`
	Imports    int                     `json:"imports"`
	// ServiceExports and ServiceImports are this cluster's objects with the
	// conditions the controller wrote.
	ServiceExports []ObjectStatus `json:"serviceExports,omitempty"`
	ServiceImports []ObjectStatus `json:"serviceImports,omitempty"`
	// Unknown is what status could not find out about this cluster, and why.
	Unknown []Unknown `json:"unknown,omitempty"`
}

// ControllerStatus is the federation controller's leader lease.
type ControllerStatus struct {
	Leader  string    `json:"leader,omitempty"`
	Renewed time.Time `json:"renewed,omitzero"`
	// Version is the controller's build (its admin /version in a local
	// federation, else the image of the fedmesh-federation-controller
	// Deployment); empty when unknown.
	Version string `json:"version,omitempty"`
	// Replicas and Ready count the controller's pods (through a kubeconfig;
	// a local federation runs one controller process per cluster).
	Replicas int  `json:"replicas,omitempty"`
	Ready    int  `json:"ready,omitempty"`
	Local    bool `json:"local,omitempty"`
}

// ServingStatus is where one client sidecar's upstream is served right now:
// the traffic share of its own cluster and of each remote cluster.
type ServingStatus struct {
	Workload string             `json:"workload"`
	Upstream string             `json:"upstream"`
	Shares   map[string]float64 `json:"shares"` // by cluster
	Remote   bool               `json:"remote"` // some traffic leaves the cluster
	Error    string             `json:"error,omitempty"`
}

// GatewayStatus is one gateway replica as its admin endpoint reports it.
type GatewayStatus struct {
	Admin       string              `json:"admin"`
	Error       string              `json:"error,omitempty"`
	OpenStreams int64               `json:"openStreams"`
	Peers       []GatewayPeerStatus `json:"peers,omitempty"`
}

// GatewayPeerStatus is a replica's view of one remote cluster.
type GatewayPeerStatus struct {
	Cluster  string  `json:"cluster"`
	Up       bool    `json:"up"`
	Replicas int     `json:"replicasUp"`
	RTTP50MS float64 `json:"rttP50ms"`
	RTTP99MS float64 `json:"rttP99ms"`
	// LossPct is the highest share of QUIC packets declared lost on any
	// replica's live connection to this cluster.
	LossPct float64 `json:"quicLossPct"`
}

// TrustStatus is the cluster's trust domain and bundle.
type TrustStatus struct {
	TrustDomain string `json:"trustDomain"`
	// Source says where the trust domain was read: a gateway's admin
	// endpoint or a peer Secret in another member; empty for a local
	// federation (its state file).
	Source      string    `json:"source,omitempty"`
	Roots       int       `json:"roots"`
	RootsExpire time.Time `json:"rootsExpire,omitzero"`
	// SVIDs is how many sample workloads' sidecars reported their SVID,
	// SVIDsExpire the earliest expiry among them (renewed at half life).
	SVIDs       int       `json:"svids,omitempty"`
	SVIDsExpire time.Time `json:"svidsExpire,omitzero"`
	Federated   []string  `json:"federatedWith,omitempty"`
	Error       string    `json:"error,omitempty"`
}

// ServiceStatus is one exported name across the clusterset.
type ServiceStatus struct {
	Namespace  string                   `json:"namespace"`
	Name       string                   `json:"name"`
	ExportedBy []string                 `json:"exportedBy"`
	Conflict   string                   `json:"conflict,omitempty"`
	Invalid    []string                 `json:"invalid,omitempty"`
	Imports    map[string]ImportSummary `json:"imports"` // by cluster ID
}

// ImportSummary is a ServiceImport as one cluster sees it.
type ImportSummary struct {
	Ready          bool           `json:"ready"`
	Stale          []string       `json:"staleClusters,omitempty"`
	ReadyEndpoints map[string]int `json:"readyEndpoints"` // by source cluster
}

func newStatusCommand(g *globals) *cobra.Command {
	var watch bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the federation at a glance: clusters, controllers, peers, trust, services",
		Example: `  fedctl status
  fedctl status -o json
  fedctl status --kubeconfig ~/.kube/config --context east --context west
  fedctl status --watch`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if g.output != "table" && g.output != "json" && g.output != "yaml" {
				return usagef("-o must be table, json or yaml, got %q", g.output)
			}
			for {
				st, err := gatherStatus(cmd.Context(), g)
				if err != nil {
					return err
				}
				if watch {
					fmt.Fprint(g.out, "\x1b[H\x1b[2J")
				}
				if g.output == "table" {
					renderStatus(g.out, st, colorsFor(g.out), time.Now())
				} else if err := printObject(g.out, st, g.output); err != nil {
					return err
				}
				if !watch {
					return nil
				}
				select {
				case <-cmd.Context().Done():
					return nil
				case <-time.After(2 * time.Second):
				}
			}
		},
	}
	cmd.Flags().StringVarP(&g.output, "output", "o", "table", "table, json or yaml")
	cmd.Flags().BoolVarP(&watch, "watch", "w", false, "refresh every 2 s")
	return cmd
}

func gatherStatus(ctx context.Context, g *globals) (*Status, error) {
	ms, _, err := g.members()
	if err != nil {
		return nil, err
	}
	st := &Status{}
	services := map[string]*ServiceStatus{}
	svc := func(ns, name string) *ServiceStatus {
		k := ns + "/" + name
		if services[k] == nil {
			services[k] = &ServiceStatus{Namespace: ns, Name: name, ExportedBy: []string{}, Imports: map[string]ImportSummary{}}
		}
		return services[k]
	}
	links := &peerLinks{trustDomain: map[string]string{}, tdSource: map[string]string{}, bundle: map[string][]byte{}, bundleFrom: map[string]string{}}
	for _, m := range ms {
		cs := ClusterStatus{Context: m.context, APIServer: m.config.Host}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := gatherCluster(cctx, m, &cs, svc, &st.Policies)
		if err == nil && m.local == nil {
			if kube, kerr := kubernetes.NewForConfig(m.config); kerr == nil {
				if lerr := links.gather(cctx, kube, m.context); lerr != nil {
					cs.unknown("peer links", "%v", lerr)
				}
			}
		}
		cancel()
		if err != nil {
			cs.Error = err.Error()
		}
		st.Clusters = append(st.Clusters, cs)
	}
	for i, m := range ms {
		if cs := &st.Clusters[i]; m.local == nil && cs.ClusterID != "" {
			links.fillTrust(cs)
		}
	}
	keys := make([]string, 0, len(services))
	for k := range services {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		s := services[k]
		sort.Strings(s.ExportedBy)
		sort.Strings(s.Invalid)
		st.Services = append(st.Services, *s)
	}
	return st, nil
}

func gatherCluster(ctx context.Context, m member, cs *ClusterStatus, svc func(ns, name string) *ServiceStatus, pols *[]PolicyStatus) error {
	kube, err := kubernetes.NewForConfig(m.config)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(m.config)
	if err != nil {
		return err
	}
	mcs, err := mcsclient.NewForConfig(m.config)
	if err != nil {
		return err
	}
	id, err := about.Get(ctx, dyn, about.ClusterIDProperty)
	if err != nil {
		if apierrors.IsNotFound(err) || apierrors.IsForbidden(err) || strings.Contains(err.Error(), "has no spec.value") {
			cs.Reachable = true
			return fmt.Errorf("not a fedmesh member: %w", err)
		}
		return err
	}
	cs.Reachable, cs.ClusterID = true, id
	cs.ClusterSet, _ = about.Get(ctx, dyn, about.ClusterSetProperty)
	ps, err := gatherPolicies(ctx, dyn, id)
	*pols = append(*pols, ps...)
	if err != nil {
		cs.unknown("routes and policies", "%v", err)
	}
	if l, err := kube.CoordinationV1().Leases(controlplane.SystemNamespace).Get(ctx, leaseName, metav1.GetOptions{}); err == nil {
		if l.Spec.HolderIdentity != nil {
			cs.Controller.Leader = *l.Spec.HolderIdentity
		}
		if l.Spec.RenewTime != nil {
			cs.Controller.Renewed = l.Spec.RenewTime.Time
		}
	} else if !apierrors.IsNotFound(err) {
		cs.unknown("controller leader", "get Lease %s/%s: %v", controlplane.SystemNamespace, leaseName, err)
	}
	if m.local != nil {
		cs.Controller.Version = controllerVersion(ctx, m.local.ControllerAdmin)
	} else if d, err := kube.AppsV1().Deployments(controlplane.SystemNamespace).Get(ctx, "fedmesh-federation-controller", metav1.GetOptions{}); err == nil {
		for _, c := range d.Spec.Template.Spec.Containers {
			if c.Name == "controller" || len(d.Spec.Template.Spec.Containers) == 1 {
				cs.Controller.Version = c.Image
			}
		}
	}
	if m.local == nil {
		gatherControllerAPI(ctx, kube, cs)
		gatherGatewaysAPI(ctx, kube, cs)
	}
	if m.local != nil {
		cs.Controller.Local = true
		cs.Peers = controllerPeers(ctx, m.local.ControllerAdmin)
		cs.Trust = trust(m.local.TrustDomain, m.local.Bundle, cs.Peers)
		for _, g := range m.local.Gateways {
			cs.Gateways = append(cs.Gateways, gatewayStatus(ctx, g.Admin))
		}
		for _, w := range m.local.Workloads {
			if w.Admin == "" {
				continue
			}
			doc, err := sidecarState(ctx, w.Admin)
			if err == nil && cs.Trust != nil && !doc.SVID.Expires.IsZero() {
				cs.Trust.SVIDs++
				if cs.Trust.SVIDsExpire.IsZero() || doc.SVID.Expires.Before(cs.Trust.SVIDsExpire) {
					cs.Trust.SVIDsExpire = doc.SVID.Expires
				}
			}
			if w.Outbound != "" {
				cs.Serving = append(cs.Serving, serving(id, w, doc, err)...)
			}
		}
	}
	exps, err := mcs.MulticlusterV1beta1().ServiceExports("").List(ctx, metav1.ListOptions{})
	if err != nil {
		cs.unknown("exports", "list serviceexports: %v", err)
		exps = &mcsv1beta1.ServiceExportList{}
	}
	cs.Exports = len(exps.Items)
	for _, e := range exps.Items {
		cs.ServiceExports = append(cs.ServiceExports, ObjectStatus{Namespace: e.Namespace, Name: e.Name, Conditions: conditions(e.Status.Conditions)})
		s := svc(e.Namespace, e.Name)
		if meta.IsStatusConditionTrue(e.Status.Conditions, string(mcsv1beta1.ServiceExportConditionValid)) {
			s.ExportedBy = append(s.ExportedBy, id)
		} else if c := meta.FindStatusCondition(e.Status.Conditions, string(mcsv1beta1.ServiceExportConditionValid)); c != nil {
			s.Invalid = append(s.Invalid, id+": "+c.Reason)
		}
		if c := meta.FindStatusCondition(e.Status.Conditions, string(mcsv1beta1.ServiceExportConditionConflict)); c != nil && c.Status == metav1.ConditionTrue {
			s.Conflict = c.Reason + ": " + c.Message
		}
	}
	imps, err := mcs.MulticlusterV1beta1().ServiceImports("").List(ctx, metav1.ListOptions{})
	if err != nil {
		cs.unknown("imports", "list serviceimports: %v", err)
		imps = &mcsv1beta1.ServiceImportList{}
	}
	cs.Imports = len(imps.Items)
	slices, err := kube.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelManagedBy + "=" + federation.ManagedBy})
	if err != nil {
		cs.unknown("imported endpoints", "list endpointslices: %v", err)
		slices = &discoveryv1.EndpointSliceList{}
	}
	ready := map[string]map[string]int{}
	for _, sl := range slices.Items {
		k := sl.Namespace + "/" + sl.Labels[mcsv1beta1.LabelServiceName]
		if ready[k] == nil {
			ready[k] = map[string]int{}
		}
		src := sl.Labels[mcsv1beta1.LabelSourceCluster]
		for _, ep := range sl.Endpoints {
			if ep.Conditions.Ready == nil || *ep.Conditions.Ready {
				ready[k][src]++
			} else {
				ready[k][src] += 0
			}
		}
	}
	for _, i := range imps.Items {
		o := ObjectStatus{Namespace: i.Namespace, Name: i.Name, Type: string(i.Spec.Type), Conditions: conditions(i.Status.Conditions)}
		for _, c := range i.Status.Clusters {
			o.Clusters = append(o.Clusters, c.Cluster)
		}
		cs.ServiceImports = append(cs.ServiceImports, o)
		s := svc(i.Namespace, i.Name)
		sum := ImportSummary{Ready: meta.IsStatusConditionTrue(i.Status.Conditions, string(mcsv1beta1.ServiceImportConditionReady)), ReadyEndpoints: map[string]int{}}
		for _, c := range i.Status.Clusters {
			sum.ReadyEndpoints[c.Cluster] = ready[i.Namespace+"/"+i.Name][c.Cluster]
		}
		if c := meta.FindStatusCondition(i.Status.Conditions, federation.ConditionStale); c != nil && c.Status == metav1.ConditionTrue {
			for _, cl := range i.Status.Clusters {
				if strings.Contains(c.Message, cl.Cluster+" (") {
					sum.Stale = append(sum.Stale, cl.Cluster)
				}
			}
		}
		s.Imports[id] = sum
	}
	return nil
}

// controllerVersion is the build the controller's admin /version reports.
func controllerVersion(ctx context.Context, admin string) string {
	if admin == "" {
		return ""
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, admin+"/version", nil)
	if err != nil {
		return ""
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	var v federation.BuildVersion
	if resp.StatusCode != http.StatusOK || json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&v) != nil {
		return ""
	}
	return v.String()
}

func controllerPeers(ctx context.Context, admin string) []federation.PeerStatus {
	if admin == "" {
		return nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, admin+"/peers", nil)
	if err != nil {
		return nil
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return []federation.PeerStatus{{Name: "?", Error: "controller admin endpoint unreachable: " + err.Error()}}
	}
	defer resp.Body.Close()
	var ps []federation.PeerStatus
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&ps); err != nil {
		return []federation.PeerStatus{{Name: "?", Error: "controller admin endpoint: " + err.Error()}}
	}
	return ps
}

// serving reads a client sidecar's /state: the traffic share per priority,
// spread over the clusters of that priority by their available endpoints.
// sidecarDoc is the part of a sidecar's /state that status reads.
type sidecarDoc struct {
	SVID struct {
		ID      string    `json:"id"`
		Expires time.Time `json:"expires"`
	} `json:"svid"`
	Upstreams []struct {
		Upstream string    `json:"upstream"`
		Loads    []float64 `json:"loads"`
		Clusters []struct {
			Name     string  `json:"name"`
			Priority int     `json:"priority"`
			RTTMS    float64 `json:"rttMs"`
		} `json:"clusters"`
		Endpoints []struct {
			Cluster   string `json:"cluster"`
			Priority  int    `json:"priority"`
			Available bool   `json:"available"`
		} `json:"endpoints"`
	} `json:"upstreams"`
}

func sidecarState(ctx context.Context, admin string) (*sidecarDoc, error) {
	var st sidecarDoc
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, admin+"/state", nil)
	if err == nil {
		var resp *http.Response
		if resp, err = http.DefaultClient.Do(req); err == nil {
			err = json.NewDecoder(io.LimitReader(resp.Body, 4<<20)).Decode(&st)
			resp.Body.Close()
		}
	}
	return &st, err
}

func serving(cluster string, w localfed.Workload, st *sidecarDoc, err error) []ServingStatus {
	if err != nil {
		return []ServingStatus{{Workload: w.Name, Error: err.Error()}}
	}
	var out []ServingStatus
	for _, u := range st.Upstreams {
		s := ServingStatus{Workload: w.Name, Upstream: u.Upstream, Shares: map[string]float64{}}
		for prio, load := range u.Loads {
			avail := map[string]int{}
			n := 0
			for _, e := range u.Endpoints {
				if e.Priority == prio && e.Available {
					avail[e.Cluster]++
					n++
				}
			}
			for cl, k := range avail {
				s.Shares[cl] += load * float64(k) / float64(n)
			}
		}
		for cl, share := range s.Shares {
			if cl != cluster && share > 0.001 {
				s.Remote = true
			}
		}
		out = append(out, s)
	}
	return out
}

func gatewayStatus(ctx context.Context, admin string) GatewayStatus {
	st, err := localfed.GatewayState(ctx, admin)
	if err != nil {
		return GatewayStatus{Admin: admin, Error: err.Error()}
	}
	return gatewayFromState(admin, st)
}

// gatewayFromState summarises a replica's admin /state.
func gatewayFromState(admin string, st *gateway.State) GatewayStatus {
	gs := GatewayStatus{Admin: admin}
	for _, n := range st.Streams {
		gs.OpenStreams += n
	}
	for _, c := range st.Clusters {
		p := GatewayPeerStatus{Cluster: c.Cluster, Up: c.Up}
		for _, r := range c.Replicas {
			if r.Up {
				p.Replicas++
				p.RTTP50MS = max(p.RTTP50MS, r.RTTP50MS)
				p.RTTP99MS = max(p.RTTP99MS, r.RTTP99MS)
				p.LossPct = max(p.LossPct, r.LossPct)
			}
		}
		gs.Peers = append(gs.Peers, p)
	}
	return gs
}

func trust(td, bundlePath string, peers []federation.PeerStatus) *TrustStatus {
	t := &TrustStatus{TrustDomain: td}
	id, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		t.Error = err.Error()
		return t
	}
	b, err := spiffebundle.Load(id, bundlePath)
	if err != nil {
		t.Error = err.Error()
		return t
	}
	for _, c := range b.X509Authorities() {
		t.Roots++
		if t.RootsExpire.IsZero() || c.NotAfter.Before(t.RootsExpire) {
			t.RootsExpire = c.NotAfter
		}
	}
	for _, p := range peers {
		if p.ClusterID != "" {
			t.Federated = append(t.Federated, p.ClusterID+".fedmesh.test")
		}
	}
	return t
}

func renderStatus(w io.Writer, st *Status, c colors, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CLUSTER\tID\tAPI SERVER\tCONTROLLER LEADER\tREPLICAS\tPEERS\tTRUST DOMAIN\tROOTS, SVIDS\tEXPORTS\tIMPORTS")
	for _, cl := range st.Clusters {
		if !cl.Reachable {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\t\t\t\t\t\n", cl.Context, "-", cl.APIServer, c.bad("UNREACHABLE: "+firstLine(cl.Error)))
			continue
		}
		if cl.ClusterID == "" {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\t\t\t\t\t\n", cl.Context, "-", cl.APIServer, c.bad("NOT A FEDMESH MEMBER: "+firstLine(strings.TrimPrefix(cl.Error, "not a fedmesh member: "))))
			continue
		}
		leader := c.bad("none")
		if cl.Controller.Leader != "" {
			leader = fmt.Sprintf("%s (renewed %s ago)", cl.Controller.Leader, age(now.Sub(cl.Controller.Renewed)))
			if cl.Controller.Version != "" {
				leader += " " + cl.Controller.Version
			}
			if now.Sub(cl.Controller.Renewed) > 30*time.Second {
				leader = c.bad(leader)
			}
		}
		replicas := "-"
		switch {
		case cl.Controller.Local:
			replicas = "1 (local process)"
		case unknownWhy(cl, "controller replicas") != "":
			replicas = "unknown"
		default:
			replicas = fmt.Sprintf("%d/%d ready", cl.Controller.Ready, cl.Controller.Replicas)
			if cl.Controller.Ready == 0 {
				replicas = c.bad(replicas)
			}
		}
		var peers []string
		for _, p := range cl.Peers {
			switch {
			case p.Reachable:
				peers = append(peers, c.good(p.ClusterID+" ok"))
			case p.Stale:
				peers = append(peers, c.bad(fmt.Sprintf("%s STALE %s", p.ClusterID, age(now.Sub(p.StaleSince)))))
			default:
				peers = append(peers, c.bad(orDefault(p.ClusterID, p.Name)+" DOWN"))
			}
		}
		peerCell := strings.Join(peers, ", ")
		switch {
		case unknownWhy(cl, "peers") != "":
			peerCell = c.bad("unknown")
		case peerCell == "":
			peerCell = "none"
		}
		td, roots := c.bad("unknown"), c.bad("unknown")
		if cl.Trust != nil {
			td = cl.Trust.TrustDomain
			roots = fmt.Sprintf("%d (expire in %s)", cl.Trust.Roots, age(cl.Trust.RootsExpire.Sub(now)))
			if cl.Trust.Roots == 0 && unknownWhy(cl, "trust roots") != "" {
				roots = c.bad("unknown")
			}
			if cl.Trust.SVIDs > 0 {
				roots += fmt.Sprintf(", %d SVIDs (next expiry in %s)", cl.Trust.SVIDs, age(cl.Trust.SVIDsExpire.Sub(now)))
			}
			if cl.Trust.Error != "" {
				roots = c.bad(firstLine(cl.Trust.Error))
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", cl.Context, cl.ClusterID, cl.APIServer, leader,
			replicas, peerCell, td, roots, cl.Exports, cl.Imports)
	}
	tw.Flush()
	renderUnknown(w, st, c)
	renderGateways(w, st, c)
	renderObjects(w, st, c)
	fmt.Fprintln(w)
	if len(st.Services) == 0 {
		fmt.Fprintln(w, "No exported services. Export one with: fedctl export NAME -n NAMESPACE --context CONTEXT")
		return
	}
	ids := []string{}
	for _, cl := range st.Clusters {
		if cl.Reachable && cl.ClusterID != "" {
			ids = append(ids, cl.ClusterID)
		}
	}
	header := "SERVICE\tEXPORTED BY"
	for _, id := range ids {
		header += "\tIN " + strings.ToUpper(id)
	}
	fmt.Fprintln(tw, header+"\tPROBLEMS")
	for _, s := range st.Services {
		row := fmt.Sprintf("%s/%s\t%s", s.Namespace, s.Name, orDefault(strings.Join(s.ExportedBy, ","), "-"))
		for _, id := range ids {
			imp, ok := s.Imports[id]
			if !ok {
				row += "\t-"
				continue
			}
			var parts []string
			for _, src := range sortedMapKeys(imp.ReadyEndpoints) {
				parts = append(parts, fmt.Sprintf("%s:%d", src, imp.ReadyEndpoints[src]))
			}
			cell := strings.Join(parts, " ")
			if len(imp.Stale) > 0 {
				cell += c.bad(" stale:" + strings.Join(imp.Stale, ","))
			}
			if !imp.Ready {
				cell = c.bad("not ready ") + cell
			}
			row += "\t" + orDefault(cell, "no endpoints")
		}
		var problems []string
		if s.Conflict != "" {
			problems = append(problems, "conflict "+s.Conflict)
		}
		for _, inv := range s.Invalid {
			problems = append(problems, "invalid export in "+inv)
		}
		p := "-"
		if len(problems) > 0 {
			p = c.bad(strings.Join(problems, "; "))
		}
		fmt.Fprintln(tw, row+"\t"+p)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nIn each cluster: ready endpoints per exporting cluster (source:count).")
	renderPolicies(w, st, c)
	renderServing(w, st, c)
}

func renderServing(w io.Writer, st *Status, c colors) {
	var lines []string
	any := false
	for _, cl := range st.Clusters {
		for _, s := range cl.Serving {
			any = true
			if s.Error != "" {
				lines = append(lines, fmt.Sprintf("  %s %s: %s", cl.ClusterID, s.Workload, c.bad("sidecar unreachable: "+firstLine(s.Error))))
				continue
			}
			if !s.Remote {
				continue
			}
			var parts []string
			keys := make([]string, 0, len(s.Shares))
			for k := range s.Shares {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			for _, k := range keys {
				if s.Shares[k] >= 0.005 {
					parts = append(parts, fmt.Sprintf("%s %.0f%%", k, 100*s.Shares[k]))
				}
			}
			lines = append(lines, fmt.Sprintf("  %s %s (%s): %s", cl.ClusterID, s.Workload, s.Upstream, c.bad(strings.Join(parts, ", "))))
		}
	}
	if !any {
		return
	}
	fmt.Fprintln(w, "\nServed remotely right now (client sidecars):")
	if len(lines) == 0 {
		fmt.Fprintln(w, c.good("  nothing: every client is served by its own cluster"))
	}
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
}

func renderGateways(w io.Writer, st *Status, c colors) {
	any := false
	for _, cl := range st.Clusters {
		any = any || len(cl.Gateways) > 0
	}
	if !any {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GATEWAY	ADMIN	STREAMS	PEER CLUSTERS (replicas up, RTT p50/p99, QUIC packets lost)")
	for _, cl := range st.Clusters {
		for i, g := range cl.Gateways {
			name := fmt.Sprintf("%s/%d", cl.ClusterID, i)
			if g.Error != "" {
				fmt.Fprintf(tw, "%s\t%s\t-\t%s\n", name, g.Admin, c.bad("DOWN: "+strings.SplitN(g.Error, "\n", 2)[0]))
				continue
			}
			var peers []string
			for _, p := range g.Peers {
				s := fmt.Sprintf("%s %d up %.2f/%.2f ms %.1f%% lost", p.Cluster, p.Replicas, p.RTTP50MS, p.RTTP99MS, p.LossPct)
				if p.LossPct >= 1 {
					s = c.bad(s)
				}
				if !p.Up {
					s = c.bad(p.Cluster + " UNREACHABLE")
				}
				peers = append(peers, s)
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", name, g.Admin, g.OpenStreams, strings.Join(peers, ", "))
		}
	}
	tw.Flush()
}

func sortedMapKeys(m map[string]int) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func age(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 80 {
		s = s[:79] + "…"
	}
	return s
}

// unknownWhy is why status could not find out what about a cluster; empty
// when it could.
func unknownWhy(cl ClusterStatus, what string) string {
	for _, u := range cl.Unknown {
		if u.What == what {
			return u.Why
		}
	}
	return ""
}

// renderUnknown says, per cluster, what status could not find out and why.
func renderUnknown(w io.Writer, st *Status, c colors) {
	var lines []string
	for _, cl := range st.Clusters {
		for _, u := range cl.Unknown {
			lines = append(lines, fmt.Sprintf("  %s %s: %s", cl.Context, u.What, c.bad(u.Why)))
		}
		switch {
		case !cl.Reachable:
			lines = append(lines, fmt.Sprintf("  %s everything: %s", cl.Context, c.bad("API server unreachable: "+cl.Error)))
		case cl.ClusterID == "":
			lines = append(lines, fmt.Sprintf("  %s everything: %s", cl.Context, c.bad(cl.Error)))
		case cl.Error != "":
			lines = append(lines, fmt.Sprintf("  %s: %s", cl.Context, c.bad(cl.Error)))
		}
	}
	if len(lines) == 0 {
		return
	}
	fmt.Fprintln(w, "\nNot known, and why:")
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
}

// renderObjects lists every ServiceExport and ServiceImport with the
// conditions the controller wrote; a condition that reports a problem shows
// its reason and message.
func renderObjects(w io.Writer, st *Status, c colors) {
	any := false
	for _, cl := range st.Clusters {
		any = any || len(cl.ServiceExports)+len(cl.ServiceImports) > 0
	}
	if !any {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CLUSTER\tOBJECT\tCONDITIONS")
	for _, cl := range st.Clusters {
		for _, o := range cl.ServiceExports {
			fmt.Fprintf(tw, "%s\tServiceExport %s/%s\t%s\n", cl.ClusterID, o.Namespace, o.Name, conditionCell(o.Conditions, c))
		}
		for _, o := range cl.ServiceImports {
			from := ""
			if len(o.Clusters) > 0 {
				from = " (from " + strings.Join(o.Clusters, ",") + ")"
			}
			fmt.Fprintf(tw, "%s\tServiceImport %s/%s%s\t%s\n", cl.ClusterID, o.Namespace, o.Name, from, conditionCell(o.Conditions, c))
		}
	}
	tw.Flush()
}

func conditionCell(cs []Condition, c colors) string {
	if len(cs) == 0 {
		return c.bad("none yet (the controller has not written any)")
	}
	var parts []string
	for _, cd := range cs {
		s := cd.Type + "=" + cd.Status
		// Conflict and Stale report a problem when true, the others when not.
		problem := cd.Status != string(metav1.ConditionTrue)
		if cd.Type == string(mcsv1beta1.ServiceExportConditionConflict) || cd.Type == federation.ConditionStale {
			problem = cd.Status == string(metav1.ConditionTrue)
		}
		if problem {
			s = c.bad(s + " " + cd.Reason + ": " + firstLine(cd.Message))
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}
