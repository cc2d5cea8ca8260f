package fedctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/fedmesh/fedmesh/localfed"
)

func newUpCommand(g *globals) *cobra.Command {
	var clusters []string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Start a local federation on this machine and return when it is ready",
		Long: `up starts a local federation: per cluster a real kube-apiserver (one etcd for
all), a federation controller and a SPIFFE issuer federated with every other
cluster. It shows progress, returns when the federation is ready and leaves it
running in the background; fedctl down stops it.

It writes DIR/kubeconfig (contexts fedmesh-<cluster>) and DIR/federation.json
(addresses of every component).`,
		Example: `  fedctl up
  fedctl up --clusters east,west --dir /tmp/fed
  kubectl --kubeconfig ~/.fedmesh/local/kubeconfig --context fedmesh-east get serviceimports -A`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runUp(cmd.Context(), g, clusters, timeout)
		},
	}
	cmd.Flags().StringSliceVar(&clusters, "clusters", []string{"east", "west", "north"}, "names of the member clusters")
	cmd.Flags().DurationVar(&timeout, "timeout", 3*time.Minute, "how long to wait for the federation to be ready")
	return cmd
}

func runUp(ctx context.Context, g *globals, clusters []string, timeout time.Duration) error {
	if len(clusters) < 2 {
		return usagef("--clusters: a federation needs at least two clusters, got %d", len(clusters))
	}
	dir, err := filepath.Abs(g.dir)
	if err != nil {
		return err
	}
	if pid := localfed.RunningPID(dir); pid != 0 {
		return fmt.Errorf("a local federation is already running in %s (supervisor pid %d); use `fedctl status` to see it or `fedctl down --dir %s` to stop it", dir, pid, dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, f := range []string{localfed.ProgressFile, localfed.StateFile} {
		os.Remove(filepath.Join(dir, f))
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(dir, localfed.LogFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	sup := exec.Command(self, "supervise", "--dir", dir, "--clusters", strings.Join(clusters, ","))
	sup.Stdout, sup.Stderr = logf, logf
	sup.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // outlives this command
	if err := sup.Start(); err != nil {
		return fmt.Errorf("start the supervisor: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- sup.Wait() }()

	start := time.Now()
	fmt.Fprintf(g.out, "Starting a local federation of %d clusters in %s\n", len(clusters), dir)
	printed := 0
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(timeout)
	interrupted := make(chan os.Signal, 1)
	signal.Notify(interrupted, os.Interrupt)
	defer signal.Stop(interrupted)
	for {
		printed = printProgress(g, dir, printed)
		if _, err := os.Stat(filepath.Join(dir, localfed.StateFile)); err == nil {
			fmt.Fprintf(g.out, "Federation ready in %s.\n\n", time.Since(start).Round(100*time.Millisecond))
			fmt.Fprintf(g.out, "  kubeconfig:  %s (contexts %s)\n", filepath.Join(dir, localfed.KubeconfigFile), contexts(clusters))
			fmt.Fprintf(g.out, "  components:  %s\n", filepath.Join(dir, localfed.StateFile))
			if st, err := localfed.ReadState(dir); err == nil {
				for _, c := range st.Clusters {
					for _, w := range c.Workloads {
						if w.Outbound != "" {
							fmt.Fprintf(g.out, "  %-11s  curl %s/   (demo/echo through %s's client sidecar)\n", "mesh:", w.Outbound, c.Name)
						}
					}
				}
			}
			fmt.Fprintf(g.out, "  next:        fedctl status --dir %s\n", dir)
			return nil
		}
		select {
		case err := <-exited:
			printProgress(g, dir, printed)
			return fmt.Errorf("the local federation failed to start (%v); its log %s ends with:\n%s", err, logf.Name(), tailFile(logf.Name(), 15))
		case <-deadline:
			sup.Process.Signal(syscall.SIGTERM)
			return fmt.Errorf("the local federation was not ready within %s; stopped it. Log: %s", timeout, logf.Name())
		case <-interrupted:
			sup.Process.Signal(syscall.SIGTERM)
			<-exited
			return errors.New("interrupted; the partial federation was stopped")
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

func contexts(clusters []string) string {
	out := make([]string, len(clusters))
	for i, c := range clusters {
		out[i] = localfed.ContextName(c)
	}
	return strings.Join(out, ", ")
}

func printProgress(g *globals, dir string, printed int) int {
	f, err := os.Open(filepath.Join(dir, localfed.ProgressFile))
	if err != nil {
		return printed
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		n++
		if n > printed {
			fmt.Fprintf(g.out, "  - %s\n", sc.Text())
		}
	}
	return n
}

func tailFile(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func newSuperviseCommand(g *globals) *cobra.Command {
	var clusters []string
	cmd := &cobra.Command{
		Use:    "supervise",
		Short:  "Run the local federation in the foreground (used by up)",
		Hidden: true,
		Args:   noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			progress, err := os.OpenFile(filepath.Join(g.dir, localfed.ProgressFile), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
			if err != nil {
				return err
			}
			defer progress.Close()
			return localfed.Supervise(ctx, localfed.Options{Dir: g.dir, Clusters: clusters, Progress: progress, Logger: newLogger(g.errOut)})
		},
	}
	cmd.Flags().StringSliceVar(&clusters, "clusters", []string{"east", "west", "north"}, "names of the member clusters")
	return cmd
}

func newDownCommand(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "down",
		Short:   "Stop the local federation and remove what it left running",
		Example: "  fedctl down\n  fedctl down --dir /tmp/fed",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, err := filepath.Abs(g.dir)
			if err != nil {
				return err
			}
			st, _ := localfed.ReadState(dir)
			pid := localfed.RunningPID(dir)
			if pid == 0 {
				left := localfed.Leftovers(dir, st)
				if len(left) == 0 {
					return fmt.Errorf("%w in %s: nothing to stop", localfed.ErrNotRunning, dir)
				}
				fmt.Fprintf(g.out, "No supervisor in %s, but %d of its processes are left; stopping them.\n", dir, len(left))
			} else {
				fmt.Fprintf(g.out, "Stopping the local federation in %s (supervisor pid %d)...\n", dir, pid)
				syscall.Kill(pid, syscall.SIGTERM)
				deadline := time.Now().Add(45 * time.Second)
				for localfed.RunningPID(dir) != 0 && time.Now().Before(deadline) {
					time.Sleep(100 * time.Millisecond)
				}
				if localfed.RunningPID(dir) != 0 {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			if left := localfed.KillLeftovers(dir, st); len(left) > 0 {
				return fmt.Errorf("could not stop processes %v", left)
			}
			if left := localfed.DeleteNamespaces(dir); len(left) > 0 {
				return fmt.Errorf("could not delete network namespaces %v", left)
			}
			if st != nil && st.EtcdDir != "" && strings.HasPrefix(st.EtcdDir, "/dev/shm/") {
				os.RemoveAll(st.EtcdDir)
			}
			fmt.Fprintln(g.out, "Stopped. No fedmesh process is left.")
			return nil
		},
	}
}
