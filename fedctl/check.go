package fedctl

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	apiextclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation/crds"
	"github.com/fedmesh/fedmesh/localfed"
)

// Check is one diagnostic: what was checked, whether it passed, and what to
// do when it did not.
type Check struct {
	Scope  string `json:"scope"` // "machine" or a cluster context
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Warn   bool   `json:"warning,omitempty"` // failed, but does not fail the command
	Detail string `json:"detail"`
	Remedy string `json:"remedy,omitempty"`
}

func newCheckCommand(g *globals) *cobra.Command {
	var preflight bool
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Diagnose this machine and the federation; every failure says what to do",
		Long: `check runs preflight checks of this machine (binaries for the local federation,
tmpfs, UDP buffer limits) and, unless --preflight, health checks of every
member cluster: API server, CRDs, cluster ID, federation controller lease,
peers, gateways, trust bundle expiry, conflicting or invalid exports. It
exits 1 when a check fails.`,
		Example: `  fedctl check --preflight
  fedctl check
  fedctl check --kubeconfig ~/.kube/config --context east --context west -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if g.output != "table" && g.output != "json" && g.output != "yaml" {
				return usagef("-o must be table, json or yaml, got %q", g.output)
			}
			checks := machineChecks()
			if !preflight {
				fed, err := federationChecks(cmd.Context(), g)
				if err != nil {
					return err
				}
				checks = append(checks, fed...)
			}
			failed := 0
			for _, c := range checks {
				if !c.OK && !c.Warn {
					failed++
				}
			}
			if g.output == "table" {
				renderChecks(g, checks)
			} else if err := printObject(g.out, checks, g.output); err != nil {
				return err
			}
			if failed > 0 {
				return fmt.Errorf("%d of %d checks failed", failed, len(checks))
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&preflight, "preflight", false, "check only this machine (before fedctl up)")
	cmd.Flags().StringVarP(&g.output, "output", "o", "table", "table, json or yaml")
	return cmd
}

func machineChecks() []Check {
	var out []Check
	add := func(c Check) { c.Scope = "machine"; out = append(out, c) }
	for _, b := range []string{"fedmesh-controller", "fedmesh-issuer", "fedmesh-gateway"} {
		p, err := localfed.FindBinary(b)
		add(Check{Name: "binary " + b, OK: err == nil, Detail: orDefault(p, errString(err)), Remedy: "run `make build` and use bin/fedctl"})
	}
	if p, err := exec.LookPath("etcd"); err == nil {
		add(Check{Name: "etcd", OK: true, Detail: p})
	} else {
		add(Check{Name: "etcd", Detail: "not on PATH", Remedy: "run `make deps` (installs Debian's etcd-server)"})
	}
	kas, err := controlplane.FindKubeAPIServer("")
	add(Check{Name: "kube-apiserver " + controlplane.KubeVersion, OK: err == nil, Detail: orDefault(kas, errString(err)),
		Remedy: "run `make deps` (builds it from the Go module proxy into bin/) or set FEDMESH_KUBE_APISERVER"})
	st, err := os.Stat("/dev/shm")
	add(Check{Name: "tmpfs for etcd", OK: err == nil && st.IsDir(), Warn: true, Detail: "/dev/shm",
		Remedy: "without tmpfs etcd writes to disk and the local federation is slower"})
	if v, err := sysctlInt("/proc/sys/net/core/rmem_max"); err == nil {
		const want = 7 << 20
		add(Check{Name: "UDP receive buffer limit", OK: v >= want, Warn: true, Detail: fmt.Sprintf("net.core.rmem_max=%d (quic-go wants %d)", v, want),
			Remedy: fmt.Sprintf("sysctl -w net.core.rmem_max=%d net.core.wmem_max=%d (gateways running as root force larger buffers anyway)", want, want)})
	}
	return out
}

func sysctlInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func federationChecks(ctx context.Context, g *globals) ([]Check, error) {
	st, err := gatherStatus(ctx, g)
	if err != nil {
		return nil, err
	}
	ms, _, err := g.members()
	if err != nil {
		return nil, err
	}
	var out []Check
	now := time.Now()
	for i, cl := range st.Clusters {
		add := func(c Check) { c.Scope = cl.Context; out = append(out, c) }
		add(Check{Name: "API server reachable", OK: cl.Reachable, Detail: orDefault(firstLine(cl.Error), cl.APIServer),
			Remedy: "check the kubeconfig context and that the API server runs (local federation: fedctl up)"})
		if !cl.Reachable {
			continue
		}
		add(crdCheck(ctx, ms[i]))
		add(Check{Name: "cluster ID", OK: cl.ClusterID != "", Detail: cl.ClusterID,
			Remedy: "create ClusterProperty cluster.clusterset.k8s.io or start the controller with --cluster-id"})
		fresh := cl.Controller.Leader != "" && now.Sub(cl.Controller.Renewed) < 30*time.Second
		add(Check{Name: "federation controller leads", OK: fresh,
			Detail: fmt.Sprintf("leader %q, lease renewed %s ago", cl.Controller.Leader, age(now.Sub(cl.Controller.Renewed))),
			Remedy: "see the controller's log; in Kubernetes: kubectl -n fedmesh-system logs deploy/fedmesh-controller"})
		for _, p := range cl.Peers {
			add(Check{Name: "peer " + orDefault(p.ClusterID, p.Name), OK: p.Reachable,
				Detail: orDefault(firstLine(p.Error), fmt.Sprintf("stale=%v", p.Stale)),
				Remedy: "check the peer's API server and the peer Secret (fedctl link) in fedmesh-system"})
		}
		// What status could not find out is not a pass: say so, as a
		// warning (through a kubeconfig some of it is out of reach by design).
		for _, u := range cl.Unknown {
			add(Check{Name: u.What, Warn: true, Detail: "unknown: " + u.Why,
				Remedy: "run the components in pods of fedmesh-system with their admin ports (clusters/base), or check from the machine that runs them (fedctl check --dir)"})
		}
		for j, gw := range cl.Gateways {
			ok := gw.Error == ""
			var down []string
			for _, p := range gw.Peers {
				if !p.Up {
					ok = false
					down = append(down, p.Cluster)
				}
			}
			add(Check{Name: fmt.Sprintf("gateway %d links", j), OK: ok,
				Detail: orDefault(firstLine(gw.Error), "unreachable peer clusters: "+orDefault(strings.Join(down, ","), "none")),
				Remedy: "check the gateway's log and the WAN (fedctl drill leaves faults healed; restart with fedctl down/up)"})
		}
		if cl.Trust != nil && (cl.Trust.Roots > 0 || cl.Trust.Error != "" || unknownWhy(cl, "trust roots") == "") {
			left := cl.Trust.RootsExpire.Sub(now)
			add(Check{Name: "trust bundle", OK: cl.Trust.Error == "" && left > time.Hour,
				Detail: orDefault(cl.Trust.Error, fmt.Sprintf("%d roots, earliest expires in %s", cl.Trust.Roots, age(left))),
				Remedy: "the issuer rotates its CA by itself; if it is stuck, see its log"})
		}
	}
	for _, s := range st.Services {
		name := s.Namespace + "/" + s.Name
		if s.Conflict != "" {
			out = append(out, Check{Scope: "clusterset", Name: "export " + name, Warn: true, Detail: "conflict: " + s.Conflict,
				Remedy: "make the exporting Services agree (the oldest export wins until then)"})
		}
		for _, inv := range s.Invalid {
			out = append(out, Check{Scope: "clusterset", Name: "export " + name, Detail: "invalid in " + inv,
				Remedy: "create the Service (NoService) or stop exporting an ExternalName Service"})
		}
	}
	return out, nil
}

func crdCheck(ctx context.Context, m member) Check {
	c := Check{Name: "CRDs installed", Remedy: "install clusters/base (kubectl apply -k) or run the controller once"}
	cs, err := apiextclient.NewForConfig(m.config)
	if err != nil {
		c.Detail = err.Error()
		return c
	}
	all, err := crds.All()
	if err != nil {
		c.Detail = err.Error()
		return c
	}
	var missing []string
	for _, crd := range all {
		if _, err := cs.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{}); err != nil {
			missing = append(missing, crd.Name)
		}
	}
	c.OK = len(missing) == 0
	c.Detail = "missing: " + orDefault(strings.Join(missing, ", "), "none")
	return c
}

func renderChecks(g *globals, checks []Check) {
	c := colorsFor(g.out)
	tw := tabwriter.NewWriter(g.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SCOPE\tCHECK\tRESULT\tDETAIL")
	var remedies []string
	for _, ch := range checks {
		res := c.good("ok")
		switch {
		case !ch.OK && ch.Warn:
			res = c.bad("warning")
		case !ch.OK:
			res = c.bad("FAILED")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", ch.Scope, ch.Name, res, ch.Detail)
		if !ch.OK && ch.Remedy != "" {
			remedies = append(remedies, fmt.Sprintf("%s / %s: %s", ch.Scope, ch.Name, ch.Remedy))
		}
	}
	tw.Flush()
	if len(remedies) > 0 {
		fmt.Fprintln(g.out, "\nWhat to do:")
		for _, r := range remedies {
			fmt.Fprintln(g.out, "  - "+r)
		}
	}
}
