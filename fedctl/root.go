// Package fedctl is the fedmesh command line: it starts and stops the local
// federation, shows the state of any federation at a glance, writes
// ServiceExports, and runs failover drills that measure and report. It keeps
// kubectl's habits: --kubeconfig/--context, -o table|json|yaml, examples in
// every --help, and exit codes that mean something (0 ok, 1 failure or
// missed objective, 2 bad usage).
package fedctl

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/fedmesh/fedmesh/localfed"
)

// Version is set at build time with -ldflags "-X ...fedctl.Version=...".
var Version = "dev"

// ExitCode maps an error from Execute to the process exit code.
func ExitCode(err error) int {
	var u usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &u):
		return 2
	default:
		return 1
	}
}

type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

type globals struct {
	dir        string
	kubeconfig string
	contexts   []string
	output     string
	out        io.Writer
	errOut     io.Writer
}

// NewCommand builds the fedctl command tree.
func NewCommand(out, errOut io.Writer) *cobra.Command {
	g := &globals{out: out, errOut: errOut}
	root := &cobra.Command{
		Use:   "fedctl",
		Short: "Run, inspect and drill a fedmesh federation",
		Long: `fedctl runs a local fedmesh federation on this machine, shows the state of
any federation, writes ServiceExports and runs measured failover drills.

A local federation (fedctl up) is found with --dir (default $FEDMESH_DIR or
~/.fedmesh/local); any other federation with --kubeconfig and one --context per
member cluster.`,
		Example: `  fedctl up                          # three clusters: east, west, north
  fedctl status
  fedctl export echo -n demo --context fedmesh-east
  fedctl drill peer-apiserver-down --cluster west
  fedctl down`,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       Version,
	}
	root.SetOut(out)
	root.SetErr(errOut)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	pf := root.PersistentFlags()
	pf.StringVar(&g.dir, "dir", localfed.DefaultDir(), "state directory of the local federation")
	pf.StringVar(&g.kubeconfig, "kubeconfig", "", "kubeconfig of a federation not started by fedctl up (default: the local federation's)")
	pf.StringSliceVar(&g.contexts, "context", nil, "kubeconfig contexts of the member clusters (repeatable; default: every context)")
	root.AddCommand(newUpCommand(g), newDownCommand(g), newSuperviseCommand(g), newStatusCommand(g),
		newExportCommand(g), newUnexportCommand(g), newDrillCommand(g), newLinkCommand(g), newCheckCommand(g))
	return root
}

// exactArgs and noArgs make argument mistakes usage errors (exit 2).
func exactArgs(n int) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if err := cobra.ExactArgs(n)(c, args); err != nil {
			return usageError{err}
		}
		return nil
	}
}

func noArgs(c *cobra.Command, args []string) error {
	if err := cobra.NoArgs(c, args); err != nil {
		return usageError{err}
	}
	return nil
}
