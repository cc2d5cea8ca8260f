package fedctl

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/fedmesh/fedmesh/federation"
	"github.com/fedmesh/fedmesh/federation/about"
	"github.com/fedmesh/fedmesh/gateway/faultnet"
	"github.com/fedmesh/fedmesh/localfed"
)

// DrillResult is one measured figure of a drill and its objective.
type DrillResult struct {
	Figure    string  `json:"figure"`
	Value     float64 `json:"value"`
	Unit      string  `json:"unit"`
	Objective string  `json:"objective"`
	Met       bool    `json:"met"`
}

// DrillReport is what a drill prints.
type DrillReport struct {
	Scenario string        `json:"scenario"`
	Target   string        `json:"target"`
	Results  []DrillResult `json:"results"`
	Passed   bool          `json:"passed"`
}

func newDrillCommand(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "drill SCENARIO",
		Short: "Inject a fault into the federation, measure what happens, and report",
		Long: `drill injects a fault, measures detection and recovery, and prints a table (or
-o json, --junit FILE). It exits 1 when a figure misses its objective.

Scenarios available today (local federation only):
  peer-apiserver-down   stop one cluster's kube-apiserver: the others must mark
                        it stale fast, keep its endpoints, and resync when it
                        returns.
  wan-partition         cut one cluster off the WAN (every gateway link to it
                        drops all packets): every other cluster's gateways must
                        declare it dead within the bound, and see it again after
                        the heal.
  kill-local-endpoints  kill every echo pod of a cluster under load: no request
                        may fail; traffic fails over to another cluster through
                        the gateways and comes home after the restart.
  controller-restart    kill a cluster's federation controller under load: no
                        request may fail; it must lead again in time.

  gateway-replica-loss  lose a gateway replica of every other cluster while a
                        cluster is served remotely: no request may fail.

  wan-degraded          serve a cluster remotely over a WAN with delay, jitter
                        and loss: no request may fail, p99 stays bounded.

  svid-rotation         rotate every SVID of a cluster every few seconds under
                        load: no request may fail.

  canary-shift          move an HTTPRoute's weight between the local Service
                        and a ServiceImport served by another cluster under
                        load: traffic follows fast, no request may fail.`,
		Example: `  fedctl drill peer-apiserver-down --cluster west
  fedctl drill peer-apiserver-down --cluster north --max-detection 1s -o json --junit drill.xml`,
	}
	cmd.AddCommand(newPeerAPIServerDownDrill(g), newWANPartitionDrill(g), newKillLocalEndpointsDrill(g), newControllerRestartDrill(g), newGatewayReplicaLossDrill(g), newWANDegradedDrill(g), newSVIDRotationDrill(g), newCanaryShiftDrill(g), newNearestRemoteDrill(g))
	return cmd
}

func newPeerAPIServerDownDrill(g *globals) *cobra.Command {
	var target, junit string
	var maxDetect, maxRecover time.Duration
	cmd := &cobra.Command{
		Use:   "peer-apiserver-down",
		Short: "Stop one cluster's API server; measure stale detection and resync",
		Args:  noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			return drillPeerDown(ctx, g, target, maxDetect, maxRecover)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "west", "the cluster whose API server goes down")
	cmd.Flags().DurationVar(&maxDetect, "max-detection", 2*time.Second, "objective: every other cluster marks it stale within this time")
	cmd.Flags().DurationVar(&maxRecover, "max-recovery", 10*time.Second, "objective: stale cleared everywhere within this time after it returns")
	return withReportFlags(g, cmd, &junit)
}

func ids(cs []drillCluster) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = c.id
	}
	return out
}

type drillCluster struct {
	id   string
	kube kubernetes.Interface
	mcs  mcsclient.Interface
}

func drillPeerDown(ctx context.Context, g *globals, target string, maxDetect, maxRecover time.Duration) (*DrillReport, error) {
	ms, st, err := g.members()
	if err != nil {
		return nil, err
	}
	var clusters []drillCluster
	var tgt *drillCluster
	for _, m := range ms {
		kube, err := kubernetes.NewForConfig(m.config)
		if err != nil {
			return nil, err
		}
		mcs, err := mcsclient.NewForConfig(m.config)
		if err != nil {
			return nil, err
		}
		dyn, err := dynamic.NewForConfig(m.config)
		if err != nil {
			return nil, err
		}
		id, err := about.Get(ctx, dyn, about.ClusterIDProperty)
		if err != nil {
			return nil, fmt.Errorf("context %s: %w", m.context, err)
		}
		clusters = append(clusters, drillCluster{id: id, kube: kube, mcs: mcs})
	}
	for i := range clusters {
		if clusters[i].id == target {
			tgt = &clusters[i]
		}
	}
	if tgt == nil {
		return nil, usagef("--cluster %q is not a member of this federation; valid: %s", target, strings.Join(ids(clusters), ", "))
	}
	const ns, name = "fedmesh-drill", "drill-peer-down"
	say := g.say
	say("exporting %s/%s with 2 ready endpoints from %s", ns, name, target)
	for _, c := range clusters {
		if _, err := c.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("create namespace in %s: %w", c.id, err)
		}
	}
	cleanup := func() {
		bg, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tgt.mcs.MulticlusterV1beta1().ServiceExports(ns).Delete(bg, name, metav1.DeleteOptions{})
		tgt.kube.CoreV1().Services(ns).Delete(bg, name, metav1.DeleteOptions{})
		tgt.kube.DiscoveryV1().EndpointSlices(ns).Delete(bg, name, metav1.DeleteOptions{})
	}
	cleanup()
	defer cleanup()
	if _, err := tgt.kube.CoreV1().Services(ns).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}}, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create drill service: %w", err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Port: new(int32(8080))}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"198.18.0.10"}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}},
			{Addresses: []string{"198.18.0.11"}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}},
		},
	}
	if _, err := tgt.kube.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create drill endpoints: %w", err)
	}
	if _, err := tgt.mcs.MulticlusterV1beta1().ServiceExports(ns).Create(ctx, &mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create drill export: %w", err)
	}
	others := []drillCluster{}
	for _, c := range clusters {
		if c.id != target {
			others = append(others, c)
		}
	}
	// observe returns, per observer, whether the import is stale and how many
	// endpoints from the target it keeps.
	observe := func(c drillCluster) (stale bool, kept int, err error) {
		si, err := c.mcs.MulticlusterV1beta1().ServiceImports(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, 0, err
		}
		stale = meta.IsStatusConditionTrue(si.Status.Conditions, federation.ConditionStale)
		sl, err := c.kube.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: mcsv1beta1.LabelSourceCluster + "=" + target})
		if err != nil {
			return false, 0, err
		}
		for _, s := range sl.Items {
			kept += len(s.Endpoints)
		}
		return stale, kept, nil
	}
	waitAll := func(timeout time.Duration, cond func(stale bool, kept int) bool) (time.Duration, error) {
		start := time.Now()
		for {
			ok := true
			for _, c := range others {
				stale, kept, err := observe(c)
				if err != nil || !cond(stale, kept) {
					ok = false
					break
				}
			}
			if ok {
				return time.Since(start), nil
			}
			if time.Since(start) > timeout {
				return time.Since(start), fmt.Errorf("not reached within %s", timeout)
			}
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	imported, err := waitAll(30*time.Second, func(stale bool, kept int) bool { return !stale && kept == 2 })
	if err != nil {
		return nil, fmt.Errorf("drill service was not imported everywhere: %w", err)
	}
	say("imported in every other cluster after %s", imported.Round(time.Millisecond))

	say("killing %s's kube-apiserver", target)
	if err := localfed.Control(ctx, st.Dir, target, "kill"); err != nil {
		return nil, err
	}
	restarted := false
	defer func() {
		if !restarted {
			localfed.Control(context.Background(), st.Dir, target, "start")
		}
	}()
	detect, detectErr := waitAll(maxDetect+10*time.Second, func(stale bool, _ int) bool { return stale })
	keptAll := true
	for _, c := range others {
		if _, kept, err := observe(c); err != nil || kept != 2 {
			keptAll = false
		}
	}
	say("stale everywhere after %s; endpoints kept: %v", detect.Round(time.Millisecond), keptAll)
	say("restarting %s's kube-apiserver", target)
	restartStart := time.Now()
	if err := localfed.Control(ctx, st.Dir, target, "start"); err != nil {
		return nil, err
	}
	restarted = true
	apiBack := time.Since(restartStart)
	recovered, recoverErr := waitAll(maxRecover+20*time.Second, func(stale bool, kept int) bool { return !stale && kept == 2 })
	say("API server serving after %s; stale cleared everywhere %s later", apiBack.Round(time.Millisecond), recovered.Round(time.Millisecond))

	// A change made in the recovered cluster flows again.
	slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{Addresses: []string{"198.18.0.12"}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}})
	cur, err := tgt.kube.DiscoveryV1().EndpointSlices(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	cur.Endpoints = slice.Endpoints
	if _, err := tgt.kube.DiscoveryV1().EndpointSlices(ns).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		return nil, err
	}
	propagated, propErr := waitAll(10*time.Second, func(_ bool, kept int) bool { return kept == 3 })

	r := &DrillReport{Scenario: "peer-apiserver-down", Target: target, Passed: true}
	r.add("detection (stale in every other cluster)", detect, maxDetect, detectErr)
	keptVal := 0.0
	if keptAll {
		keptVal = 1
	}
	r.Results = append(r.Results, DrillResult{Figure: "endpoints kept while stale", Value: keptVal, Unit: "bool", Objective: "1 (all kept)", Met: keptAll})
	r.Passed = r.Passed && keptAll
	r.add("recovery (stale cleared after restart)", recovered, maxRecover, recoverErr)
	r.add("change after recovery reaches peers", propagated, 2*time.Second, propErr)
	return r, nil
}

func renderDrill(g *globals, r *DrillReport) {
	c := colorsFor(g.out)
	fmt.Fprintf(g.out, "\nDrill %s (target %s)\n", r.Scenario, r.Target)
	tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FIGURE\tMEASURED\tOBJECTIVE\tRESULT")
	for _, res := range r.Results {
		v := fmt.Sprintf("%.1f %s", res.Value, res.Unit)
		if res.Unit == "bool" {
			v = map[bool]string{true: "yes", false: "no"}[res.Value == 1]
		}
		status := c.good("met")
		if !res.Met {
			status = c.bad("MISSED")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", res.Figure, v, res.Objective, status)
	}
	tw.Flush()
	if r.Passed {
		fmt.Fprintln(g.out, c.good("PASSED"))
	} else {
		fmt.Fprintln(g.out, c.bad("FAILED"))
	}
}

func writeJUnit(path string, r *DrillReport) error {
	type failure struct {
		Message string `xml:"message,attr"`
	}
	type tc struct {
		Name    string   `xml:"name,attr"`
		Failure *failure `xml:"failure,omitempty"`
	}
	type suite struct {
		XMLName  xml.Name `xml:"testsuite"`
		Name     string   `xml:"name,attr"`
		Tests    int      `xml:"tests,attr"`
		Failures int      `xml:"failures,attr"`
		Cases    []tc     `xml:"testcase"`
	}
	s := suite{Name: "fedctl drill " + r.Scenario}
	for _, res := range r.Results {
		c := tc{Name: res.Figure}
		if !res.Met {
			c.Failure = &failure{Message: fmt.Sprintf("measured %.1f %s, objective %s", res.Value, res.Unit, res.Objective)}
			s.Failures++
		}
		s.Tests++
		s.Cases = append(s.Cases, c)
	}
	b, err := xml.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append([]byte(xml.Header), b...), 0o644)
}

func newWANPartitionDrill(g *globals) *cobra.Command {
	var target, junit string
	var maxDetect, maxRecover, hold time.Duration
	cmd := &cobra.Command{
		Use:   "wan-partition",
		Short: "Cut one cluster off the WAN; measure how fast every gateway declares it dead and sees it again",
		Example: `  fedctl drill wan-partition --cluster west
  fedctl drill wan-partition --cluster north --max-detection 1500ms -o json`,
		Args: noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			return drillWANPartition(ctx, g, target, maxDetect, maxRecover, hold)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "west", "the cluster cut off")
	cmd.Flags().DurationVar(&maxDetect, "max-detection", 2*time.Second, "objective: every other cluster's gateways declare it dead within this time")
	cmd.Flags().DurationVar(&maxRecover, "max-recovery", 5*time.Second, "objective: links back up within this time after the heal")
	cmd.Flags().DurationVar(&hold, "hold", 3*time.Second, "how long the partition lasts after detection")
	return withReportFlags(g, cmd, &junit)
}

func drillWANPartition(ctx context.Context, g *globals, target string, maxDetect, maxRecover, hold time.Duration) (*DrillReport, error) {
	st, err := localfed.ReadState(g.dir)
	if err != nil {
		return nil, err
	}
	var others []localfed.Cluster
	found := false
	for _, c := range st.Clusters {
		if c.Name == target {
			found = true
		} else {
			others = append(others, c)
		}
	}
	if !found {
		return nil, usagef("--cluster %q is not a member of this federation; valid: %s", target, strings.Join(localNames(st), ", "))
	}
	say := g.say
	// targetUp reports, over every replica of every other cluster, whether
	// all see the target up (want=true) or all see it down (want=false).
	allSee := func(want bool) bool {
		for _, c := range others {
			for _, gw := range c.Gateways {
				gs, err := localfed.GatewayState(ctx, gw.Admin)
				if err != nil {
					return false
				}
				for _, cs := range gs.Clusters {
					if cs.Cluster == target && cs.Up != want {
						return false
					}
				}
			}
		}
		return true
	}
	waitFor := func(want bool, timeout time.Duration) (time.Duration, error) {
		start := time.Now()
		for !allSee(want) {
			if time.Since(start) > timeout {
				return time.Since(start), fmt.Errorf("not reached within %s", timeout)
			}
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
		return time.Since(start), nil
	}
	if _, err := waitFor(true, 10*time.Second); err != nil {
		return nil, fmt.Errorf("gateways do not all see %s up before the drill: %w", target, err)
	}
	// With sample pods, a client in another cluster whose own pods are down
	// is served remotely through the drill; the drill picks one whose traffic
	// goes to the target before the cut. After the detection not one of its
	// requests may be answered by (so sent to) the cut-off cluster, and none
	// may fail.
	var client *localfed.Cluster
	var done chan []sample
	stopLoad := func() {}
	for i := range others {
		url := clientOutbound(others[i])
		if url == "" {
			continue
		}
		if err := localfed.EchoControl(ctx, st.Dir, others[i].Name, "kill"); err != nil {
			return nil, err
		}
		lctx, stop := context.WithCancel(ctx)
		ch := make(chan []sample, 1)
		go func() { ch <- load(lctx, url, 200, 10*time.Second) }()
		time.Sleep(1500 * time.Millisecond)
		if sidecarSends(ctx, others[i], target) {
			client, done, stopLoad = &others[i], ch, stop
			say("%s's echo pods killed: its client is served remotely, partly by %s, under load", others[i].Name, target)
			defer restoreEcho(context.Background(), st, others[i].Name)
			break
		}
		stop()
		<-ch
		if err := restoreEcho(ctx, st, others[i].Name); err != nil {
			return nil, err
		}
	}
	defer stopLoad()
	if client == nil && len(others) > 0 && len(others[0].Workloads) > 0 {
		say("no client routes to %s right now; measuring the gateways only", target)
	}
	say("cutting %s off the WAN (every link to it drops all packets)", target)
	cutAt := time.Now()
	healed := false
	heal := func() error {
		var errs []error
		for _, c := range others {
			errs = append(errs, localfed.SetWAN(context.Background(), st.Dir, c.Name, target, faultnet.Faults{}))
		}
		healed = true
		return errors.Join(errs...)
	}
	defer func() {
		if !healed {
			heal()
		}
	}()
	for _, c := range others {
		if err := localfed.SetWAN(ctx, st.Dir, c.Name, target, faultnet.Faults{Partition: true}); err != nil {
			return nil, err
		}
	}
	detect, detectErr := waitFor(false, maxDetect+10*time.Second)
	say("every other cluster's gateways declared %s dead after %s", target, detect.Round(time.Millisecond))
	time.Sleep(hold)
	var samples []sample
	if client != nil {
		stopLoad()
		samples = <-done
	}
	say("healing the WAN")
	if err := heal(); err != nil {
		return nil, err
	}
	recovered, recoverErr := waitFor(true, maxRecover+10*time.Second)
	say("links to %s up again after %s", target, recovered.Round(time.Millisecond))

	r := &DrillReport{Scenario: "wan-partition", Target: target, Passed: true}
	r.add("detection (every gateway declares it dead)", detect, maxDetect, detectErr)
	r.add("recovery (every gateway links up after heal)", recovered, maxRecover, recoverErr)
	if client != nil {
		detectedAt := cutAt.Add(detect)
		failed, toTarget, after := 0, 0, 0
		for _, s := range samples {
			switch {
			case !s.ok:
				failed++
			case s.start.After(detectedAt):
				after++
				if s.servedBy == target {
					toTarget++
				}
			}
		}
		say("%s's client: %d requests, %d failed, %d answered by %s after the detection (of %d)", client.Name, len(samples), failed, toTarget, target, after)
		r.Results = append(r.Results,
			DrillResult{Figure: client.Name + "'s requests failed", Value: float64(failed), Unit: fmt.Sprintf("of %d", len(samples)), Objective: "0", Met: failed == 0},
			DrillResult{Figure: "requests sent to " + target + " after detection", Value: float64(toTarget), Unit: fmt.Sprintf("of %d", after), Objective: "0", Met: toTarget == 0 && after > 0})
		r.Passed = r.Passed && failed == 0 && toTarget == 0 && after > 0
	}
	return r, nil
}

func (r *DrillReport) add(figure string, d, limit time.Duration, err error) {
	met := err == nil && d <= limit
	r.Results = append(r.Results, DrillResult{Figure: figure, Value: float64(d.Microseconds()) / 1000, Unit: "ms",
		Objective: "<= " + limit.String(), Met: met})
	r.Passed = r.Passed && met
}

// report prints a drill's results and turns a missed objective into exit 1.
func report(g *globals, rep *DrillReport, junit string) error {
	if g.output == "table" {
		renderDrill(g, rep)
	} else if err := printObject(g.out, rep, g.output); err != nil {
		return err
	}
	if junit != "" {
		if err := writeJUnit(junit, rep); err != nil {
			return err
		}
	}
	if !rep.Passed {
		return errors.New("drill missed an objective")
	}
	return nil
}

// sidecarSends reports whether a cluster's client sidecar currently sends
// some of its traffic to target (from its /state).
func sidecarSends(ctx context.Context, c localfed.Cluster, target string) bool {
	for _, w := range c.Workloads {
		if w.Outbound == "" || w.Admin == "" {
			continue
		}
		doc, err := sidecarState(ctx, w.Admin)
		for _, s := range serving(c.Name, w, doc, err) {
			if s.Shares[target] > 0.01 {
				return true
			}
		}
	}
	return false
}

// localDrill is the RunE of every drill: they act on the local federation's
// processes, so --kubeconfig is refused; the report goes out as a table,
// JSON or YAML (and JUnit), and a missed objective exits 1.
func localDrill(g *globals, junit *string, run func(ctx context.Context) (*DrillReport, error)) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, _ []string) error {
		if g.output != "table" && g.output != "json" && g.output != "yaml" {
			return usagef("-o must be table, json or yaml, got %q", g.output)
		}
		if g.kubeconfig != "" {
			return usagef("drills act on a local federation's processes (fedctl up); drop --kubeconfig")
		}
		g.localOnly = true // $KUBECONFIG names no processes: drills read only the local federation
		rep, err := run(cmd.Context())
		if err != nil {
			return err
		}
		return report(g, rep, *junit)
	}
}

// withReportFlags adds the output flags every drill has.
func withReportFlags(g *globals, cmd *cobra.Command, junit *string) *cobra.Command {
	cmd.Flags().StringVarP(&g.output, "output", "o", "table", "table, json or yaml")
	cmd.Flags().StringVar(junit, "junit", "", "also write the results as a JUnit XML file")
	return cmd
}

// restoreEcho starts a cluster's echo pods again and waits until its
// client sidecar has every local endpoint available (not ejected, checked
// healthy), so a drill leaves the federation as it found it: until then
// the client's overprovisioning still sends a share of its traffic away.
func restoreEcho(ctx context.Context, st *localfed.State, cluster string) error {
	if err := localfed.EchoControl(ctx, st.Dir, cluster, "start"); err != nil {
		return err
	}
	return waitLocalAvailable(ctx, st, cluster)
}

// waitLocalAvailable waits up to 15 s until the cluster's client sidecar
// (if it has one) has local endpoints and all of them are available.
func waitLocalAvailable(ctx context.Context, st *localfed.State, cluster string) error {
	var admin string
	for _, c := range st.Clusters {
		for _, w := range c.Workloads {
			if c.Name == cluster && w.Outbound != "" {
				admin = w.Admin
			}
		}
	}
	if admin == "" {
		return nil
	}
	for deadline := time.Now().Add(15 * time.Second); ; {
		if doc, err := sidecarState(ctx, admin); err == nil && len(doc.Upstreams) > 0 && localAvailable(doc, cluster) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s's echo pods are not all available to its client 15 s after their restart", cluster)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// localAvailable reports whether the first upstream of a sidecar's state
// has local endpoints and all of them are available.
func localAvailable(doc *sidecarDoc, cluster string) bool {
	n := 0
	for _, e := range doc.Upstreams[0].Endpoints {
		if e.Cluster == cluster {
			if !e.Available {
				return false
			}
			n++
		}
	}
	return n > 0
}

// say prints a drill's progress line, on the table output only.
func (g *globals) say(format string, a ...any) {
	if g.output == "table" {
		fmt.Fprintf(g.out, "  - "+format+"\n", a...)
	}
}

// clientOutbound is the URL of a cluster's client sidecar outbound listener
// (with path), or "" without sample pods.
func clientOutbound(c localfed.Cluster) string {
	for _, w := range c.Workloads {
		if w.Outbound != "" {
			return w.Outbound + "/drill"
		}
	}
	return ""
}

// localNames are the cluster names of a local federation.
func localNames(st *localfed.State) []string {
	out := make([]string, len(st.Clusters))
	for i, c := range st.Clusters {
		out[i] = c.Name
	}
	return out
}
