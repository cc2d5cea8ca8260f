package fedctl

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fedmesh/fedmesh/controlplane"
)

// execute runs fedctl in-process with env as its environment and returns
// its exit code and what it would print on stdout and stderr.
func execute(env map[string]string, args ...string) (int, string) {
	var out, errOut bytes.Buffer
	cmd := newCommand(&out, &errOut, func(k string) string { return env[k] })
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(context.Background())
	if err != nil {
		fmt.Fprintln(&errOut, "fedctl:", err)
	}
	return ExitCode(err), out.String() + errOut.String()
}

// TestDrillUnknownScenarioGolden is issue 20's first case: a mistyped
// scenario printed the drill help and exited 0.
func TestDrillUnknownScenarioGolden(t *testing.T) {
	code, out := execute(nil, "drill", "nosuch", "--dir", t.TempDir())
	golden(t, "drill_unknown.golden", fmt.Appendf(nil, "$ fedctl drill nosuch\n%sexit %d\n", out, code))
	if code != 2 {
		t.Errorf("fedctl drill nosuch: exit %d, want 2", code)
	}
}

// TestEveryCommandRejectsUnknownArguments walks the whole command tree: an
// unknown subcommand or an extra positional argument anywhere is a usage
// error (exit 2) that names it, and below a command with subcommands the
// message lists every valid one.
func TestEveryCommandRejectsUnknownArguments(t *testing.T) {
	root := NewCommand(&bytes.Buffer{}, &bytes.Buffer{})
	var walk func(c *cobra.Command)
	n := 0
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			walk(sub)
		}
		if c.Name() == "help" {
			return // takes a command path; checked below
		}
		n++
		path := strings.Fields(c.CommandPath())[1:]
		// The positional arguments the command takes (export SERVICE),
		// then one too many.
		for _, w := range strings.Fields(c.Use)[1:] {
			if w == strings.ToUpper(w) && !c.HasSubCommands() {
				path = append(path, "x")
			}
		}
		args := append(append(path, "nosuch-arg"), "--dir", t.TempDir())
		t.Run(strings.Join(append([]string{"fedctl"}, path...), " "), func(t *testing.T) {
			code, out := execute(nil, args...)
			if code != 2 || !strings.Contains(out, "nosuch-arg") {
				t.Errorf("fedctl %s: exit %d, want 2 and a message naming the argument:\n%s", strings.Join(args, " "), code, out)
			}
			for _, sub := range c.Commands() {
				if !sub.Hidden && !strings.Contains(out, sub.Name()) {
					t.Errorf("fedctl %s: the message does not list %q:\n%s", strings.Join(args, " "), sub.Name(), out)
				}
			}
		})
	}
	walk(root)
	if n < 20 {
		t.Fatalf("walked %d commands, want the whole tree", n)
	}
	for _, args := range [][]string{{"help", "nosuch"}, {"help", "drill", "nosuch"}, {"drill"}, {"drill", "nosuch", "--cluster", "west"}} {
		if code, out := execute(nil, append(args, "--dir", t.TempDir())...); code != 2 || !strings.Contains(out, "peer-apiserver-down") && args[0] != "help" {
			t.Errorf("fedctl %s: exit %d, want 2 and the valid names:\n%s", strings.Join(args, " "), code, out)
		}
	}
	for _, args := range [][]string{{"--nosuch-flag"}, {"drill", "--nosuch-flag"}, {"status", "--nosuch-flag"}} {
		if code, out := execute(nil, args...); code != 2 || !strings.Contains(out, "unknown flag: --nosuch-flag") {
			t.Errorf("fedctl %s: exit %d, want 2 and the unknown flag:\n%s", strings.Join(args, " "), code, out)
		}
	}
	if code, out := execute(nil, "help", "drill", "peer-apiserver-down"); code != 0 || !strings.Contains(out, "--max-detection") {
		t.Errorf("fedctl help drill peer-apiserver-down: exit %d\n%s", code, out)
	}
	if code, out := execute(nil); code != 0 || !strings.Contains(out, "Available Commands") {
		t.Errorf("fedctl alone: exit %d, want its help\n%s", code, out)
	}
}

// TestKubeconfigSources checks where fedctl finds the member clusters:
// --kubeconfig, then an explicit --dir, then $KUBECONFIG (several files
// merged as kubectl merges them: the first to define a context wins), then
// the local federation; drills read only the local federation.
func TestKubeconfigSources(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, servers map[string]string) string {
		cfgs := map[string]*rest.Config{}
		for ctx, host := range servers {
			cfgs[ctx] = &rest.Config{Host: host, BearerToken: "t"}
		}
		p := filepath.Join(dir, name)
		if err := clientcmd.WriteToFile(*controlplane.KubeconfigFor(cfgs, ""), p); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a := write("a", map[string]string{"east": "https://east-from-a.invalid"})
	b := write("b", map[string]string{"east": "https://east-from-b.invalid", "west": "https://west-from-b.invalid"})
	noLocal := filepath.Join(dir, "no-local")
	t.Setenv("FEDMESH_DIR", noLocal) // the default --dir: nothing runs there
	for _, tc := range []struct {
		name    string
		env     string
		args    []string
		want    []string // context=host
		wantErr string
		code    int
	}{
		{name: "$KUBECONFIG merges, the first file wins", env: a + string(os.PathListSeparator) + b,
			want: []string{"east=https://east-from-a.invalid", "west=https://west-from-b.invalid"}},
		{name: "$KUBECONFIG skips a missing file", env: filepath.Join(dir, "missing") + string(os.PathListSeparator) + b,
			want: []string{"east=https://east-from-b.invalid", "west=https://west-from-b.invalid"}},
		{name: "--kubeconfig wins over $KUBECONFIG", env: a, args: []string{"--kubeconfig", b},
			want: []string{"east=https://east-from-b.invalid", "west=https://west-from-b.invalid"}},
		{name: "--context picks from $KUBECONFIG", env: a + string(os.PathListSeparator) + b, args: []string{"--context", "west"},
			want: []string{"west=https://west-from-b.invalid"}},
		{name: "an unknown --context lists the valid ones", env: b, args: []string{"--context", "north"},
			wantErr: `context "north" is not in $KUBECONFIG (` + b + `); valid: east, west`, code: 2},
		{name: "an explicit --dir wins over $KUBECONFIG", env: a, args: []string{"--dir", filepath.Join(dir, "fed")},
			wantErr: "no local federation is running in " + filepath.Join(dir, "fed"), code: 1},
		{name: "no $KUBECONFIG: the local federation", env: "",
			wantErr: "no local federation is running in " + noLocal, code: 1},
		{name: "$KUBECONFIG with no file", env: filepath.Join(dir, "missing"),
			wantErr: "none of the files in $KUBECONFIG exists: " + filepath.Join(dir, "missing"), code: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root, g := newCommandGlobals(&bytes.Buffer{}, &bytes.Buffer{}, func(k string) string {
				if k == "KUBECONFIG" {
					return tc.env
				}
				return ""
			})
			if err := root.PersistentFlags().Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			ms, _, err := g.members()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || ExitCode(err) != tc.code {
					t.Fatalf("got %v (exit %d), want %q (exit %d)", err, ExitCode(err), tc.wantErr, tc.code)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range ms {
				got = append(got, m.context+"="+m.config.Host)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("members %v, want %v", got, tc.want)
			}
		})
	}
	// A drill acts on the local federation's processes: $KUBECONFIG does
	// not redirect it, --kubeconfig is refused.
	code, out := execute(map[string]string{"KUBECONFIG": b}, "drill", "peer-apiserver-down")
	if code != 1 || !strings.Contains(out, "no local federation is running in "+noLocal) {
		t.Errorf("drill with $KUBECONFIG: exit %d\n%s", code, out)
	}
	if code, out := execute(nil, "drill", "peer-apiserver-down", "--kubeconfig", b); code != 2 || !strings.Contains(out, "drop --kubeconfig") {
		t.Errorf("drill with --kubeconfig: exit %d\n%s", code, out)
	}
}
