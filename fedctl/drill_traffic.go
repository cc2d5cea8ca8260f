package fedctl

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/fedmesh/fedmesh/gateway/faultnet"
	"github.com/fedmesh/fedmesh/localfed"
)

// sample is one request of a drill's load. A request the generator could
// not even send (too many in flight) is a failed sample with notSent set.
type sample struct {
	start, end time.Time
	ok         bool
	notSent    bool
	servedBy   string
}

// load sends GETs at a fixed rate to url until ctx ends, at most
// maxInflight at once, each with a timeout; it returns every sample.
// maxInflight bounds a drill's open requests: enough for a second of
// stalled requests at the highest allowed rate.
const maxInflight = 5000

func load(ctx context.Context, url string, rate int, timeout time.Duration) []sample {
	client := &http.Client{Timeout: timeout, Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
	defer client.CloseIdleConnections()
	var (
		mu   sync.Mutex
		out  []sample
		wg   sync.WaitGroup
		sem  = make(chan struct{}, maxInflight)
		tick = time.NewTicker(time.Second / time.Duration(rate))
	)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			slices.SortFunc(out, func(a, b sample) int { return a.start.Compare(b.start) })
			return out
		case <-tick.C:
		}
		select {
		case sem <- struct{}{}:
		default:
			mu.Lock()
			out = append(out, sample{start: time.Now(), end: time.Now(), notSent: true}) // counted as failed
			mu.Unlock()
			continue
		}
		wg.Go(func() {
			defer func() { <-sem }()
			s := sample{start: time.Now()}
			resp, err := client.Get(url)
			if err == nil {
				var a struct {
					Cluster string `json:"cluster"`
				}
				body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
				resp.Body.Close()
				s.ok = resp.StatusCode == http.StatusOK && json.Unmarshal(body, &a) == nil && a.Cluster != ""
				s.servedBy = a.Cluster
			}
			s.end = time.Now()
			mu.Lock()
			out = append(out, s)
			mu.Unlock()
		})
	}
}

func newKillLocalEndpointsDrill(g *globals) *cobra.Command {
	var target, junit string
	var rate int
	var maxFailover, maxFailback, hold time.Duration
	cmd := &cobra.Command{
		Use:   "kill-local-endpoints",
		Short: "Kill every local echo pod under load; measure failed requests, failover to a remote cluster and failback",
		Long: `kill-local-endpoints sends a steady load of idempotent GETs through the
client sidecar of --cluster to demo/echo, kills (as a crash) every echo pod of
that cluster and marks them not ready, holds, restarts them, and measures:
failed requests (objective: none), time from the kill to the first answer
from another cluster, p99 latency during the fault, and time from the restart
to the first answer from the own cluster again (failback).`,
		Example: `  fedctl drill kill-local-endpoints --cluster east
  fedctl drill kill-local-endpoints --cluster west --rate 500 -o json --junit drill.xml`,
		Args: noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			if rate < 1 || rate > 5000 {
				return nil, usagef("--rate must be 1..5000 requests per second")
			}
			return drillKillLocal(ctx, g, target, rate, hold, maxFailover, maxFailback)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "east", "the cluster whose echo pods die")
	cmd.Flags().IntVar(&rate, "rate", 200, "requests per second")
	cmd.Flags().DurationVar(&hold, "hold", 3*time.Second, "how long the pods stay dead")
	cmd.Flags().DurationVar(&maxFailover, "max-failover", time.Second, "objective: first remote answer within this time after the kill")
	cmd.Flags().DurationVar(&maxFailback, "max-failback", 5*time.Second, "objective: first local answer within this time after the restart")
	return withReportFlags(g, cmd, &junit)
}

func drillKillLocal(ctx context.Context, g *globals, target string, rate int, hold, maxFailover, maxFailback time.Duration) (*DrillReport, error) {
	st, _, _, url, err := g.drillTarget(target)
	if err != nil {
		return nil, err
	}
	say := g.say
	// The own cluster must answer before anything is broken.
	wctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	warm := load(wctx, url, 20, 2*time.Second)
	cancel()
	if !slices.ContainsFunc(warm, func(s sample) bool { return s.ok && s.servedBy == target }) {
		return nil, fmt.Errorf("before the drill no request through %s answered from %s (%d tried): is the federation healthy? run fedctl check", url, target, len(warm))
	}
	lctx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	done := make(chan []sample, 1)
	go func() { done <- load(lctx, url, rate, 5*time.Second) }()
	say("load: %d GET/s through %s's client sidecar to demo/echo", rate, target)
	time.Sleep(time.Second)
	killAt := time.Now()
	say("killing every echo pod of %s", target)
	if err := localfed.EchoControl(ctx, st.Dir, target, "kill"); err != nil {
		return nil, err
	}
	restarted := false
	defer func() {
		if !restarted {
			restoreEcho(context.Background(), st, target)
		}
	}()
	time.Sleep(hold)
	startAt := time.Now()
	say("restarting them")
	if err := localfed.EchoControl(ctx, st.Dir, target, "start"); err != nil {
		return nil, err
	}
	restarted = true
	time.Sleep(3 * time.Second)
	stopLoad()
	samples := <-done
	if err := waitLocalAvailable(ctx, st, target); err != nil {
		return nil, err
	}

	var failed, total int
	failover, failback := time.Duration(-1), time.Duration(-1)
	var during []time.Duration
	for _, s := range samples {
		total++
		if !s.ok {
			failed++
			continue
		}
		if s.start.After(killAt) && s.end.Before(startAt) {
			during = append(during, s.end.Sub(s.start))
		}
		if s.servedBy != target && s.end.After(killAt) && (failover < 0 || s.end.Sub(killAt) < failover) {
			failover = s.end.Sub(killAt)
		}
		if s.servedBy == target && s.start.After(startAt) && (failback < 0 || s.end.Sub(startAt) < failback) {
			failback = s.end.Sub(startAt)
		}
	}
	say("%d requests, %d failed", total, failed)
	r := &DrillReport{Scenario: "kill-local-endpoints", Target: target, Passed: true}
	r.Results = append(r.Results, DrillResult{Figure: "failed requests", Value: float64(failed), Unit: fmt.Sprintf("of %d", total), Objective: "0", Met: failed == 0})
	r.Passed = r.Passed && failed == 0
	var ferr, berr error
	if failover < 0 {
		ferr = fmt.Errorf("no answer from another cluster")
	}
	if failback < 0 {
		berr = fmt.Errorf("no answer from %s after the restart", target)
	}
	r.add("failover (kill to first remote answer)", max(failover, 0), maxFailover, ferr)
	if len(during) > 0 {
		slices.Sort(during)
		p99 := during[min(len(during)-1, len(during)*99/100)]
		r.Results = append(r.Results, DrillResult{Figure: "p99 latency during the fault", Value: float64(p99.Microseconds()) / 1000, Unit: "ms", Objective: "-", Met: true})
	}
	r.add("failback (restart to first local answer)", max(failback, 0), maxFailback, berr)
	return r, nil
}

func newControllerRestartDrill(g *globals) *cobra.Command {
	var target, junit string
	var rate int
	var hold, maxBack time.Duration
	cmd := &cobra.Command{
		Use:   "controller-restart",
		Short: "Kill a cluster's federation controller under load; traffic must not notice, and it must come back",
		Long: `controller-restart sends a steady load of GETs through the client sidecar of
--cluster, kills that cluster's federation controller (its discovery API
goes with it), holds, and starts it again. Sidecars keep serving from their
last endpoint sets, so no request may fail; the controller must lead again
within the objective.`,
		Example: `  fedctl drill controller-restart --cluster east`,
		Args:    noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			return drillControllerRestart(ctx, g, target, rate, hold, maxBack)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "east", "the cluster whose controller dies")
	cmd.Flags().IntVar(&rate, "rate", 200, "requests per second")
	cmd.Flags().DurationVar(&hold, "hold", 3*time.Second, "how long the controller stays dead")
	cmd.Flags().DurationVar(&maxBack, "max-recovery", 10*time.Second, "objective: the restarted controller leads within this time")
	return withReportFlags(g, cmd, &junit)
}

func drillControllerRestart(ctx context.Context, g *globals, target string, rate int, hold, maxBack time.Duration) (*DrillReport, error) {
	st, tc, _, url, err := g.drillTarget(target)
	if err != nil {
		return nil, err
	}
	admin := tc.ControllerAdmin
	say := g.say
	lctx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	done := make(chan []sample, 1)
	go func() { done <- load(lctx, url, rate, 5*time.Second) }()
	say("load: %d GET/s through %s's client sidecar to demo/echo", rate, target)
	time.Sleep(time.Second)
	say("killing %s's federation controller", target)
	if err := localfed.Control(ctx, st.Dir, target, "kill-controller"); err != nil {
		return nil, err
	}
	restarted := false
	defer func() {
		if !restarted {
			localfed.Control(context.Background(), st.Dir, target, "start-controller")
		}
	}()
	time.Sleep(hold)
	say("starting it again")
	startAt := time.Now()
	if err := localfed.Control(ctx, st.Dir, target, "start-controller"); err != nil {
		return nil, err
	}
	restarted = true
	// It is back when its admin endpoint answers and every peer is reachable.
	var back time.Duration
	var backErr error
	for {
		ps := controllerPeers(ctx, admin)
		up := len(ps) == len(st.Clusters)-1
		for _, p := range ps {
			up = up && p.Reachable
		}
		if up {
			back = time.Since(startAt)
			break
		}
		if time.Since(startAt) > maxBack+10*time.Second {
			back, backErr = time.Since(startAt), fmt.Errorf("not leading with every peer reachable")
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	say("leading again with every peer after %s", back.Round(time.Millisecond))
	time.Sleep(time.Second)
	stopLoad()
	samples := <-done
	failed := 0
	for _, s := range samples {
		if !s.ok {
			failed++
		}
	}
	r := &DrillReport{Scenario: "controller-restart", Target: target, Passed: failed == 0}
	r.Results = append(r.Results, DrillResult{Figure: "failed requests", Value: float64(failed), Unit: fmt.Sprintf("of %d", len(samples)), Objective: "0", Met: failed == 0})
	r.add("controller back (restart to leading, peers reachable)", back, maxBack, backErr)
	return r, nil
}

func newGatewayReplicaLossDrill(g *globals) *cobra.Command {
	var target, junit string
	var rate int
	var hold time.Duration
	cmd := &cobra.Command{
		Use:   "gateway-replica-loss",
		Short: "Lose a gateway replica of every other cluster while --cluster is served remotely; no request may fail",
		Long: `gateway-replica-loss kills every echo pod of --cluster so its client's requests
are served by other clusters through the gateways, then, under load, kills
the first gateway replica of every other cluster (as a crash). Peers spread
streams over replicas and move new ones to the survivors without a control
plane round trip, and the sidecar retries idempotent requests whose stream
died, so no request may fail. Everything is restored afterwards.`,
		Example: `  fedctl drill gateway-replica-loss --cluster east`,
		Args:    noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			return drillGatewayReplicaLoss(ctx, g, target, rate, hold)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "east", "the cluster whose clients are served remotely during the drill")
	cmd.Flags().IntVar(&rate, "rate", 200, "requests per second")
	cmd.Flags().DurationVar(&hold, "hold", 3*time.Second, "how long the replicas stay dead")
	return withReportFlags(g, cmd, &junit)
}

func drillGatewayReplicaLoss(ctx context.Context, g *globals, target string, rate int, hold time.Duration) (*DrillReport, error) {
	st, _, others, url, err := g.drillTarget(target)
	if err != nil {
		return nil, err
	}
	say := g.say
	bg := context.Background()
	say("killing every echo pod of %s, so its requests are served remotely", target)
	if err := localfed.EchoControl(ctx, st.Dir, target, "kill"); err != nil {
		return nil, err
	}
	defer restoreEcho(bg, st, target)
	lctx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	done := make(chan []sample, 1)
	go func() { done <- load(lctx, url, rate, 5*time.Second) }()
	say("load: %d GET/s through %s's client sidecar", rate, target)
	time.Sleep(1500 * time.Millisecond)
	killAt := time.Now()
	say("killing gateway replica 0 of %v", others)
	for _, o := range others {
		if err := localfed.Control(ctx, st.Dir, o, "kill-gateway-0"); err != nil {
			return nil, err
		}
		defer localfed.Control(bg, st.Dir, o, "start-gateway-0")
	}
	time.Sleep(hold)
	say("restarting them")
	for _, o := range others {
		if err := localfed.Control(ctx, st.Dir, o, "start-gateway-0"); err != nil {
			return nil, err
		}
	}
	time.Sleep(time.Second)
	stopLoad()
	samples := <-done
	failed, remote, after := 0, 0, 0
	for _, s := range samples {
		switch {
		case !s.ok:
			failed++
		case s.servedBy != target:
			remote++
			if s.start.After(killAt) {
				after++
			}
		}
	}
	say("%d requests, %d served remotely (%d after the replicas died), %d failed", len(samples), remote, after, failed)
	r := &DrillReport{Scenario: "gateway-replica-loss", Target: target, Passed: failed == 0 && after > 0}
	r.Results = append(r.Results,
		DrillResult{Figure: "failed requests", Value: float64(failed), Unit: fmt.Sprintf("of %d", len(samples)), Objective: "0", Met: failed == 0},
		DrillResult{Figure: "remote answers after the replicas died", Value: float64(after), Unit: "requests", Objective: "> 0", Met: after > 0})
	return r, nil
}

func newWANDegradedDrill(g *globals) *cobra.Command {
	var target, junit string
	var rate int
	var hold, delay, jitter, maxP99 time.Duration
	var loss float64
	cmd := &cobra.Command{
		Use:   "wan-degraded",
		Short: "Serve --cluster remotely over a WAN with delay, jitter and loss; no request may fail",
		Long: `wan-degraded kills every echo pod of --cluster so its client's requests cross
the WAN, then degrades every WAN link of that cluster (--delay, --jitter,
--loss, both ways) under load. QUIC recovers lost packets and the sidecar
retries what fails, so no request may fail; p99 latency must stay under
--max-p99. Everything is restored afterwards.`,
		Example: `  fedctl drill wan-degraded --cluster east
  fedctl drill wan-degraded --cluster west --delay 50ms --loss 0.05 --max-p99 2s`,
		Args: noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			if loss < 0 || loss >= 1 {
				return nil, usagef("--loss must be in [0, 1)")
			}
			return drillWANDegraded(ctx, g, target, rate, hold, faultnet.Faults{Delay: delay, Jitter: jitter, Loss: loss}, maxP99)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "east", "the cluster whose clients are served over the degraded WAN")
	cmd.Flags().IntVar(&rate, "rate", 100, "requests per second")
	cmd.Flags().DurationVar(&hold, "hold", 4*time.Second, "how long the WAN stays degraded under load")
	cmd.Flags().DurationVar(&delay, "delay", 25*time.Millisecond, "one-way delay added on the WAN")
	cmd.Flags().DurationVar(&jitter, "jitter", 10*time.Millisecond, "extra random delay, up to this much")
	cmd.Flags().Float64Var(&loss, "loss", 0.02, "probability that a WAN packet is dropped")
	cmd.Flags().DurationVar(&maxP99, "max-p99", time.Second, "objective: p99 latency while degraded")
	return withReportFlags(g, cmd, &junit)
}

func drillWANDegraded(ctx context.Context, g *globals, target string, rate int, hold time.Duration, f faultnet.Faults, maxP99 time.Duration) (*DrillReport, error) {
	st, _, others, url, err := g.drillTarget(target)
	if err != nil {
		return nil, err
	}
	say := g.say
	bg := context.Background()
	say("killing every echo pod of %s, so its requests cross the WAN", target)
	if err := localfed.EchoControl(ctx, st.Dir, target, "kill"); err != nil {
		return nil, err
	}
	defer restoreEcho(bg, st, target)
	say("degrading every WAN link of %s: delay %s, jitter %s, loss %.1f%%", target, f.Delay, f.Jitter, 100*f.Loss)
	for _, o := range others {
		if err := localfed.SetWAN(ctx, st.Dir, target, o, f); err != nil {
			return nil, err
		}
		defer localfed.SetWAN(bg, st.Dir, target, o, faultnet.Faults{})
	}
	lctx, stopLoad := context.WithTimeout(ctx, hold)
	defer stopLoad()
	samples := load(lctx, url, rate, 10*time.Second)
	failed, remote := 0, 0
	var lat []time.Duration
	for _, s := range samples {
		if !s.ok {
			failed++
			continue
		}
		if s.servedBy != target {
			remote++
		}
		lat = append(lat, s.end.Sub(s.start))
	}
	say("%d requests, %d served remotely, %d failed", len(samples), remote, failed)
	r := &DrillReport{Scenario: "wan-degraded", Target: target, Passed: failed == 0 && remote > 0}
	r.Results = append(r.Results,
		DrillResult{Figure: "failed requests", Value: float64(failed), Unit: fmt.Sprintf("of %d", len(samples)), Objective: "0", Met: failed == 0},
		DrillResult{Figure: "answers across the degraded WAN", Value: float64(remote), Unit: "requests", Objective: "> 0", Met: remote > 0})
	if len(lat) > 0 {
		slices.Sort(lat)
		r.add("p99 latency while degraded", lat[min(len(lat)-1, len(lat)*99/100)], maxP99, nil)
		r.Results = append(r.Results, DrillResult{Figure: "p50 latency while degraded", Value: float64(lat[len(lat)/2].Microseconds()) / 1000, Unit: "ms", Objective: "-", Met: true})
	}
	return r, nil
}

func newSVIDRotationDrill(g *globals) *cobra.Command {
	var target, junit string
	var rate, minIssued int
	var hold, ttl time.Duration
	cmd := &cobra.Command{
		Use:   "svid-rotation",
		Short: "Rotate every SVID of a cluster every few seconds under load; no request may fail",
		Long: `svid-rotation restarts the issuer of --cluster with an SVID lifetime of --ttl
(so every workload's SVID is renewed and pushed at half of it), sends a
steady load through the cluster's client sidecar to its echo pods (mTLS
between the sidecars) for --hold, and counts failed requests and SVIDs
issued. Afterwards the issuer goes back to its normal lifetime. The CA is
on disk, so trust never changes.`,
		Example: `  fedctl drill svid-rotation --cluster west --ttl 4s --hold 12s`,
		Args:    noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			if ttl < 2*time.Second || hold < ttl {
				return nil, usagef("--ttl must be at least 2s and --hold at least --ttl")
			}
			return drillSVIDRotation(ctx, g, target, rate, hold, ttl, minIssued)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "east", "the cluster whose identities rotate")
	cmd.Flags().IntVar(&rate, "rate", 200, "requests per second")
	cmd.Flags().DurationVar(&ttl, "ttl", 6*time.Second, "SVID lifetime during the drill (renewed at half of it)")
	cmd.Flags().DurationVar(&hold, "hold", 10*time.Second, "how long the load runs with rotating SVIDs")
	cmd.Flags().IntVar(&minIssued, "min-issued", 12, "objective: SVIDs issued during the drill (the cluster has 6 identities)")
	return withReportFlags(g, cmd, &junit)
}

func drillSVIDRotation(ctx context.Context, g *globals, target string, rate int, hold, ttl time.Duration, minIssued int) (*DrillReport, error) {
	st, tc, _, url, err := g.drillTarget(target)
	if err != nil {
		return nil, err
	}
	metrics := tc.IssuerMetrics
	if metrics == "" {
		return nil, usagef("--cluster %q has no issuer metrics in this federation", target)
	}
	say := g.say
	say("restarting %s's issuer with %s SVIDs (renewed every %s)", target, ttl, ttl/2)
	if err := localfed.IssuerTTL(ctx, st.Dir, target, ttl.String()); err != nil {
		return nil, err
	}
	defer localfed.IssuerTTL(context.Background(), st.Dir, target, "")
	lctx, stopLoad := context.WithTimeout(ctx, hold)
	defer stopLoad()
	say("load: %d GET/s through %s's client sidecar for %s", rate, target, hold)
	samples := load(lctx, url, rate, 5*time.Second)
	issued, err := counter(ctx, metrics+"/metrics", "fedmesh_issuer_x509_svids_issued_total")
	if err != nil {
		return nil, err
	}
	failed, local := 0, 0
	for _, s := range samples {
		if !s.ok {
			failed++
		} else if s.servedBy == target {
			local++
		}
	}
	say("%d requests (%d served in %s over rotating mTLS identities), %d failed; %d SVIDs issued", len(samples), local, target, failed, int(issued))
	r := &DrillReport{Scenario: "svid-rotation", Target: target, Passed: failed == 0 && int(issued) >= minIssued}
	r.Results = append(r.Results,
		DrillResult{Figure: "failed requests", Value: float64(failed), Unit: fmt.Sprintf("of %d", len(samples)), Objective: "0", Met: failed == 0},
		DrillResult{Figure: "SVIDs issued while under load", Value: issued, Unit: "SVIDs", Objective: fmt.Sprintf(">= %d", minIssued), Met: int(issued) >= minIssued})
	return r, nil
}

// counter sums a Prometheus counter's samples from a /metrics page.
func counter(ctx context.Context, url, name string) (float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return 0, err
	}
	var sum float64
	found := false
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, name+" ") || strings.HasPrefix(l, name+"{") {
			f := strings.Fields(l)
			var v float64
			if _, err := fmt.Sscan(f[len(f)-1], &v); err == nil {
				sum += v
				found = true
			}
		}
	}
	if !found {
		return 0, fmt.Errorf("%s not found at %s", name, url)
	}
	return sum, nil
}

// drillTarget resolves a traffic drill's --cluster in the local federation:
// its state, the cluster, the names of the others, and the URL of its client
// sidecar (a usage error when it has none).
func (g *globals) drillTarget(target string) (*localfed.State, localfed.Cluster, []string, string, error) {
	st, err := localfed.ReadState(g.dir)
	if err != nil {
		return nil, localfed.Cluster{}, nil, "", err
	}
	var tc localfed.Cluster
	var others []string
	found := false
	for _, c := range st.Clusters {
		if c.Name == target {
			tc, found = c, true
		} else {
			others = append(others, c.Name)
		}
	}
	if !found {
		return nil, tc, nil, "", usagef("--cluster %q is not a member of this federation; valid: %s", target, strings.Join(localNames(st), ", "))
	}
	url := clientOutbound(tc)
	if url == "" {
		return nil, tc, nil, "", usagef("--cluster %q has no client sidecar in this federation", target)
	}
	return st, tc, others, url, nil
}
