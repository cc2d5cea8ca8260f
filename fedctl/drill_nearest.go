package fedctl

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/fedmesh/fedmesh/gateway/faultnet"
	"github.com/fedmesh/fedmesh/localfed"
)

func newNearestRemoteDrill(g *globals) *cobra.Command {
	var target, slow, junit string
	var rate int
	var delay, hold, maxOrder time.Duration
	var minShare float64
	cmd := &cobra.Command{
		Use:   "nearest-remote",
		Short: "Slow one WAN link; failover must go to the nearest remote cluster by gateway RTT",
		Long: `nearest-remote adds --delay each way to the WAN link between --cluster and
--slow (default: the remote cluster that comes first by name, so that only
the RTT can put it last). The gateways measure the new RTT and publish it on
their Service, the federation controller passes it to the sidecars, and the
client sidecar of --cluster must then order the remote clusters by it: the
drill waits until its /state shows that order, then kills every local echo
pod under load. The nearest remote cluster must serve at least --min-share
of the answers. Everything is restored afterwards.`,
		Example: `  fedctl drill nearest-remote --cluster east
  fedctl drill nearest-remote --cluster west --slow east --delay 30ms`,
		Args: noArgs,
		RunE: localDrill(g, &junit, func(ctx context.Context) (*DrillReport, error) {
			if delay <= 0 {
				return nil, usagef("--delay must be positive")
			}
			if minShare <= 0 || minShare > 1 {
				return nil, usagef("--min-share must be in (0, 1]")
			}
			return drillNearestRemote(ctx, g, target, slow, rate, delay, hold, maxOrder, minShare)
		}),
	}
	cmd.Flags().StringVar(&target, "cluster", "east", "the cluster whose client fails over")
	cmd.Flags().StringVar(&slow, "slow", "", "the remote cluster whose WAN link gets slow (default: the first other cluster by name)")
	cmd.Flags().IntVar(&rate, "rate", 100, "requests per second")
	cmd.Flags().DurationVar(&delay, "delay", 20*time.Millisecond, "one-way delay added on the slow link")
	cmd.Flags().DurationVar(&hold, "hold", 3*time.Second, "how long the load runs with the local pods dead")
	cmd.Flags().DurationVar(&maxOrder, "max-reorder", 20*time.Second, "objective: slowing the link to the sidecar ordering clusters by the new RTT")
	cmd.Flags().Float64Var(&minShare, "min-share", 0.95, "objective: share of the answers from the nearest remote cluster")
	return withReportFlags(g, cmd, &junit)
}

func drillNearestRemote(ctx context.Context, g *globals, target, slow string, rate int, delay, hold, maxOrder time.Duration, minShare float64) (*DrillReport, error) {
	st, tc, others, url, err := g.drillTarget(target)
	if err != nil {
		return nil, err
	}
	slices.Sort(others)
	if len(others) < 2 {
		return nil, usagef("nearest-remote needs at least two other clusters; this federation has %v", others)
	}
	if slow == "" {
		slow = others[0]
	}
	if !slices.Contains(others, slow) {
		return nil, usagef("--slow %q is not another cluster of this federation (%s)", slow, strings.Join(others, ", "))
	}
	var admin string
	for _, w := range tc.Workloads {
		if w.Outbound != "" {
			admin = w.Admin
		}
	}
	say, bg := g.say, context.Background()

	say("slowing the WAN link %s <-> %s by %s each way", target, slow, delay)
	start := time.Now()
	if err := localfed.SetWAN(ctx, st.Dir, target, slow, faultnet.Faults{Delay: delay}); err != nil {
		return nil, err
	}
	defer localfed.SetWAN(bg, st.Dir, target, slow, faultnet.Faults{})

	// Wait until the client sidecar puts the slow cluster last, because of
	// an RTT at least the added delay above the nearest one's.
	var order []string
	var rtts map[string]float64
	reordered := time.Duration(-1)
	for deadline := start.Add(maxOrder + 10*time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		doc, err := sidecarState(ctx, admin)
		if err != nil || len(doc.Upstreams) == 0 {
			continue
		}
		order, rtts = nil, map[string]float64{}
		for _, c := range doc.Upstreams[0].Clusters {
			order = append(order, c.Name)
			rtts[c.Name] = c.RTTMS
		}
		if len(order) == len(others)+1 && order[len(order)-1] == slow && rtts[slow]-rtts[order[1]] >= float64(delay.Milliseconds()) {
			reordered = time.Since(start)
			break
		}
	}
	r := &DrillReport{Scenario: "nearest-remote", Target: target, Passed: true}
	var oerr error
	if reordered < 0 {
		oerr = fmt.Errorf("the client sidecar's cluster order stayed %v (RTT ms %v)", order, rtts)
	}
	r.add("slow link to clusters ordered by RTT", max(reordered, 0), maxOrder, oerr)
	if oerr != nil {
		return r, nil
	}
	nearest := order[1]
	say("the client sidecar orders %s (RTT ms: %s %.2f, %s %.2f)", strings.Join(order, " > "), nearest, rtts[nearest], slow, rtts[slow])

	say("killing every echo pod of %s under %d GET/s", target, rate)
	if err := localfed.EchoControl(ctx, st.Dir, target, "kill"); err != nil {
		return nil, err
	}
	restarted := false
	defer func() {
		if !restarted {
			restoreEcho(bg, st, target)
		}
	}()
	lctx, stop := context.WithTimeout(ctx, hold)
	defer stop()
	samples := load(lctx, url, rate, 5*time.Second)
	say("restarting them and restoring the link")
	restarted = true
	if err := localfed.SetWAN(ctx, st.Dir, target, slow, faultnet.Faults{}); err != nil {
		return nil, err
	}
	if err := restoreEcho(ctx, st, target); err != nil {
		return nil, err
	}
	failed, byCluster := 0, map[string]int{}
	for _, s := range samples {
		if !s.ok {
			failed++
			continue
		}
		byCluster[s.servedBy]++
	}
	answered := len(samples) - failed
	share := 0.0
	if answered > 0 {
		share = float64(byCluster[nearest]) / float64(answered)
	}
	say("%d requests: %v, %d failed", len(samples), byCluster, failed)
	r.Results = append(r.Results,
		DrillResult{Figure: "failed requests", Value: float64(failed), Unit: fmt.Sprintf("of %d", len(samples)), Objective: "0", Met: failed == 0},
		DrillResult{Figure: "answers from the nearest remote cluster (" + nearest + ")", Value: 100 * share, Unit: "%",
			Objective: fmt.Sprintf(">= %.0f", 100*minShare), Met: share >= minShare})
	r.Passed = r.Passed && failed == 0 && share >= minShare
	return r, nil
}
