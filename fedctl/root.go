// Package fedctl is the fedmesh command line: it starts and stops the local
// federation, shows the state of any federation at a glance, writes
// ServiceExports, and runs failover drills that measure and report. It keeps
// kubectl's habits: --kubeconfig, $KUBECONFIG (merged as kubectl merges it)
// and --context, -o table|json|yaml, examples in every --help, and exit
// codes that mean something (0 ok, 1 failure or missed objective, 2 bad
// usage, including any unknown command, scenario or argument).
package fedctl

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

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
	// flags are the root's persistent flags: members() asks whether --dir
	// was given explicitly.
	flags *pflag.FlagSet
	// localOnly makes members() ignore $KUBECONFIG: drills act on the
	// processes of a local federation, which only --dir names.
	localOnly bool
	// getenv reads the environment ($KUBECONFIG); tests replace it.
	getenv func(string) string
}

// NewCommand builds the fedctl command tree.
func NewCommand(out, errOut io.Writer) *cobra.Command {
	return newCommand(out, errOut, os.Getenv)
}

// newCommand is NewCommand reading the environment through getenv.
func newCommand(out, errOut io.Writer, getenv func(string) string) *cobra.Command {
	root, _ := newCommandGlobals(out, errOut, getenv)
	return root
}

func newCommandGlobals(out, errOut io.Writer, getenv func(string) string) (*cobra.Command, *globals) {
	g := &globals{out: out, errOut: errOut, getenv: getenv}
	root := &cobra.Command{
		Use:   "fedctl",
		Short: "Run, inspect and drill a fedmesh federation",
		Long: `fedctl runs a local fedmesh federation on this machine, shows the state of
any federation, writes ServiceExports and runs measured failover drills.

Where the member clusters are found, first match wins:
  1. --kubeconfig FILE
  2. --dir DIR: the local federation (fedctl up) in DIR
  3. $KUBECONFIG, one or more files separated by ':' and merged as kubectl
     merges them (the first file to define a context, cluster or user wins)
  4. the local federation in $FEDMESH_DIR, else ~/.fedmesh/local
Every context of that kubeconfig is a member cluster unless --context names
some (repeatable). Drills act on a local federation's processes and read only
--dir, $FEDMESH_DIR or ~/.fedmesh/local.

Through a kubeconfig, status shows what the API servers tell and what the
controllers' and gateways' admin endpoints tell through the API server's pod
proxy; whatever it cannot reach is named with the reason. With a local
federation it also reads the admin endpoints and trust bundles on this
machine.

Exit codes: 0 ok, 1 failure or a missed drill objective, 2 bad usage (an
unknown command, drill scenario, flag or argument).`,
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
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		// `fedctl drill nosuch --cluster west`: the group does not know the
		// scenario's flags, but the mistake is the unknown scenario.
		if c.HasSubCommands() && len(c.Flags().Args()) > 0 {
			return unknownName(c, c.Flags().Args()[0])
		}
		return usageError{err}
	})
	pf := root.PersistentFlags()
	g.flags = pf
	pf.StringVar(&g.dir, "dir", localfed.DefaultDir(), "state directory of the local federation")
	pf.StringVar(&g.kubeconfig, "kubeconfig", "", "kubeconfig of the federation (default: $KUBECONFIG, else the local federation's; see above)")
	pf.StringSliceVar(&g.contexts, "context", nil, "kubeconfig contexts of the member clusters (repeatable; default: every context)")
	root.AddCommand(newUpCommand(g), newDownCommand(g), newSuperviseCommand(g), newStatusCommand(g),
		newExportCommand(g), newUnexportCommand(g), newDrillCommand(g), newLinkCommand(g), newCheckCommand(g))
	root.SetHelpCommand(newHelpCommand())
	root.InitDefaultCompletionCmd()
	strictArgs(root)
	return root, g
}

// strictArgs makes every argument mistake in the tree a usage error (exit
// 2): a command with subcommands rejects an unknown name and lists the valid
// ones (cobra would print its help and exit 0 for any command below the
// root), and every other command's argument check answers with a usage
// error.
func strictArgs(c *cobra.Command) {
	for _, sub := range c.Commands() {
		strictArgs(sub)
	}
	if c.HasSubCommands() {
		c.Args = subcommandArgs
		if c.RunE == nil && c.Run == nil {
			c.RunE = func(c *cobra.Command, _ []string) error {
				if !c.HasParent() {
					return c.Help()
				}
				return usagef("%s needs one of: %s", c.CommandPath(), strings.Join(subcommandNames(c), ", "))
			}
		}
		return
	}
	args := c.Args
	if args == nil {
		args = noArgs
	}
	c.Args = func(c *cobra.Command, a []string) error {
		if err := args(c, a); err != nil {
			var u usageError
			if errors.As(err, &u) {
				return err
			}
			return usageError{err}
		}
		return nil
	}
}

// subcommandArgs rejects anything but a known subcommand; cobra has already
// descended into every known one, so any argument left is unknown.
func subcommandArgs(c *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	return unknownName(c, args[0])
}

func unknownName(c *cobra.Command, name string) error {
	what := "command"
	if c.Name() == "drill" {
		what = "scenario"
	}
	msg := fmt.Sprintf("unknown %s %q for %q; valid: %s", what, name, c.CommandPath(), strings.Join(subcommandNames(c), ", "))
	if s := c.SuggestionsFor(name); len(s) > 0 {
		msg += fmt.Sprintf(" (did you mean %s?)", strings.Join(s, " or "))
	}
	return usageError{errors.New(msg)}
}

func subcommandNames(c *cobra.Command) []string {
	var out []string
	for _, s := range c.Commands() {
		if s.IsAvailableCommand() || s.Name() == "help" {
			out = append(out, s.Name())
		}
	}
	return out
}

// newHelpCommand is cobra's help command, except that an unknown topic is a
// usage error rather than a message and exit 0.
func newHelpCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "help [command]",
		Short: "Help about any command",
		Long:  "help shows the help of any command: fedctl help drill peer-apiserver-down.",
		Args:  cobra.ArbitraryArgs,
		RunE: func(c *cobra.Command, args []string) error {
			cmd, rest, err := c.Root().Find(args)
			if err != nil {
				return usageError{err}
			}
			if len(rest) > 0 {
				return unknownName(cmd, rest[0])
			}
			cmd.InitDefaultHelpFlag()
			cmd.InitDefaultVersionFlag()
			return cmd.Help()
		},
	}
}

// exactArgs and noArgs make argument mistakes usage errors (exit 2).
func exactArgs(n int) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("usage: %s; got %d argument(s): %q", c.UseLine(), len(args), strings.Join(args, " "))
		}
		return nil
	}
}

func noArgs(c *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %q", c.CommandPath(), strings.Join(args, " "))
	}
	return nil
}
