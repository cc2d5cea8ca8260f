package fedctl_test

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/localfed"
)

// BenchmarkLocalFederationUp runs `fedctl up` for three clusters with the
// real binaries and reports the time until it returned ready and the
// resident memory of every process of the federation (etcd, API servers,
// issuers, controllers, gateways, sample pods and sidecars, the supervisor).
func BenchmarkLocalFederationUp(b *testing.B) {
	bin := b.TempDir()
	for _, c := range []string{"fedctl", "fedmesh-controller", "fedmesh-issuer", "fedmesh-gateway", "fedmesh-sidecar", "fedmesh-echo"} {
		if _, err := testutil.BuildCommand(bin, c); err != nil { // as `make build` builds them
			b.Fatal(err)
		}
	}
	var took time.Duration
	var rss float64
	var procs int
	for b.Loop() {
		dir := b.TempDir()
		start := time.Now()
		if out, err := exec.Command(filepath.Join(bin, "fedctl"), "up", "--dir", dir).CombinedOutput(); err != nil {
			b.Fatalf("up: %v\n%s", err, out)
		}
		took = time.Since(start)
		time.Sleep(2 * time.Second) // let every component settle
		st, err := localfed.ReadState(dir)
		if err != nil {
			b.Fatal(err)
		}
		pids := localfed.Leftovers(dir, st)
		procs = len(pids)
		rss = 0
		for _, pid := range pids {
			kb, err := statusKB(pid, "VmRSS:")
			if err == nil {
				rss += float64(kb) / 1024
			}
		}
		if out, err := exec.Command(filepath.Join(bin, "fedctl"), "down", "--dir", dir).CombinedOutput(); err != nil {
			b.Fatalf("down: %v\n%s", err, out)
		}
	}
	b.ReportMetric(took.Seconds(), "up-s")
	b.ReportMetric(rss, "rss-mb")
	b.ReportMetric(float64(procs), "processes")
}

func statusKB(pid int, field string) (int, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field); ok {
			return strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}
