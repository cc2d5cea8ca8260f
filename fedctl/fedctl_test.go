package fedctl_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/fedctl"
	"github.com/fedmesh/fedmesh/internal/testutil"
	"github.com/fedmesh/fedmesh/localfed"
)

// TestUpStatusDrillDown drives the real fedctl binary the way a user does:
// up, up again, status, export errors, the peer-apiserver-down drill, down,
// down again; and checks that nothing is left behind.
func TestUpStatusDrillDown(t *testing.T) {
	if _, err := os.Stat("/proc/self/exe"); err != nil {
		t.Skip("needs /proc")
	}
	bin := t.TempDir()
	for _, c := range []string{"fedctl", "fedmesh-controller", "fedmesh-issuer", "fedmesh-gateway", "fedmesh-sidecar", "fedmesh-echo"} {
		if _, err := testutil.BuildCommand(bin, c); err != nil { // as `make build` builds them
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	run := func(args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(filepath.Join(bin, "fedctl"), append(args, "--dir", dir)...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return out.String(), code
	}
	if out, code := run("down"); code != 1 || !strings.Contains(out, "no local federation is running") {
		t.Errorf("down on nothing: exit %d, %q", code, out)
	}
	out, code := run("up")
	if code != 0 {
		t.Fatalf("up: exit %d\n%s\n%s", code, out, readFile(filepath.Join(dir, localfed.LogFile)))
	}
	defer func() {
		if localfed.RunningPID(dir) != 0 {
			run("down")
		}
	}()
	if !strings.Contains(out, "Federation ready in") {
		t.Errorf("up did not say it is ready:\n%s", out)
	}
	if out, code := run("up"); code != 1 || !strings.Contains(out, "already running") {
		t.Errorf("second up: exit %d, %q", code, out)
	}

	out, code = run("status", "-o", "json")
	if code != 0 {
		t.Fatalf("status: exit %d\n%s", code, out)
	}
	var st fedctl.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	if len(st.Clusters) != 3 {
		t.Fatalf("clusters %+v", st.Clusters)
	}
	for _, c := range st.Clusters {
		if !c.Reachable || c.Controller.Leader == "" || len(c.Peers) != 2 || !c.Peers[0].Reachable || !c.Peers[1].Reachable || c.Trust == nil || c.Trust.Roots == 0 {
			t.Errorf("cluster %s: %+v", c.Context, c)
		}
		if os.Geteuid() == 0 && (c.Trust == nil || c.Trust.SVIDs != 3 || !c.Trust.SVIDsExpire.After(time.Now())) {
			t.Errorf("cluster %s: want the SVIDs of its 3 sample sidecars with a future expiry, got %+v", c.Context, c.Trust)
		}
		if c.Controller.Version == "" {
			t.Errorf("cluster %s: no controller version in status", c.Context)
		}
		if len(c.Gateways) != localfed.GatewayReplicas {
			t.Errorf("cluster %s: %d gateway replicas, want %d", c.Context, len(c.Gateways), localfed.GatewayReplicas)
		}
		for _, g := range c.Gateways {
			if g.Error != "" || len(g.Peers) != 2 {
				t.Errorf("cluster %s gateway %+v: want both peer clusters", c.Context, g)
			}
			for _, p := range g.Peers {
				if !p.Up || p.Replicas != localfed.GatewayReplicas {
					t.Errorf("cluster %s gateway %s: peer %+v not up on every replica", c.Context, g.Admin, p)
				}
			}
		}
	}
	if len(st.Services) != 1 || st.Services[0].Name != "echo" || strings.Join(st.Services[0].ExportedBy, ",") != "east,north,west" || len(st.Services[0].Imports) != 3 {
		t.Errorf("services %+v", st.Services)
	}

	if out, code := run("check"); code != 0 || !strings.Contains(out, "federation controller leads") || strings.Contains(out, "FAILED") {
		t.Errorf("check on a healthy federation: exit %d\n%s", code, out)
	}
	if out, code := run("export", "nope", "-n", "demo", "--context", "fedmesh-east"); code != 1 || !strings.Contains(out, "does not exist") {
		t.Errorf("export of a missing service: exit %d, %q", code, out)
	}
	if out, code := run("export", "echo", "-n", "demo"); code != 2 || !strings.Contains(out, "--context") {
		t.Errorf("export without a context: exit %d, %q", code, out)
	}

	out, code = run("drill", "peer-apiserver-down", "--cluster", "west", "-o", "json", "--junit", filepath.Join(dir, "drill.xml"))
	if code != 0 {
		t.Fatalf("drill: exit %d\n%s", code, out)
	}
	var rep fedctl.DrillReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("drill -o json: %v\n%s", err, out)
	}
	if !rep.Passed || len(rep.Results) != 4 {
		t.Errorf("drill report %+v", rep)
	}
	for _, r := range rep.Results {
		t.Logf("drill: %s = %.1f %s (objective %s)", r.Figure, r.Value, r.Unit, r.Objective)
	}
	if !strings.Contains(readFile(filepath.Join(dir, "drill.xml")), `<testsuite name="fedctl drill peer-apiserver-down" tests="4" failures="0">`) {
		t.Errorf("junit file: %s", readFile(filepath.Join(dir, "drill.xml")))
	}

	// wan-partition: with pod networks, the drill also loads a client whose
	// traffic goes to the cut-off cluster; which client routes where depends
	// on measured RTTs, so cut each cluster until one drill exercised that.
	exercised := false
	for _, target := range []string{"west", "north", "east"} {
		out, code = run("drill", "wan-partition", "--cluster", target, "--hold", "1s", "-o", "json")
		if code != 0 {
			t.Fatalf("wan-partition drill: exit %d\n%s", code, out)
		}
		rep = fedctl.DrillReport{}
		if err := json.Unmarshal([]byte(out), &rep); err != nil || !rep.Passed || len(rep.Results) < 2 {
			t.Errorf("wan-partition report %+v (%v)", rep, err)
		}
		for _, r := range rep.Results {
			t.Logf("drill wan-partition %s: %s = %.1f %s (objective %s)", target, r.Figure, r.Value, r.Unit, r.Objective)
		}
		if len(rep.Results) == 4 {
			exercised = true
			break
		}
	}
	if os.Geteuid() == 0 && !exercised {
		t.Error("no wan-partition drill had a client routing to the cut-off cluster: 'no request sent to it afterwards' was never checked")
	}

	if os.Geteuid() == 0 {
		// Pod networks exist: traffic through the mesh, and the failover drill.
		state, err := localfed.ReadState(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range state.Clusters {
			if len(c.Workloads) == 0 || c.Workloads[0].Outbound == "" {
				t.Fatalf("cluster %s has no client sidecar: %+v", c.Name, c.Workloads)
			}
			// Every request must succeed; the answer must come from the own
			// cluster once a drill's restored pods are back (failback).
			var body []byte
			for try := 0; ; try++ {
				resp, err := http.Get(c.Workloads[0].Outbound + "/")
				if err != nil {
					t.Fatalf("curl through %s's client sidecar: %v", c.Name, err)
				}
				body, _ = io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Fatalf("through %s's client sidecar: %d %s", c.Name, resp.StatusCode, body)
				}
				if strings.Contains(string(body), `"cluster":"`+c.Name+`"`) {
					break
				}
				if try == 50 {
					t.Fatalf("through %s's client sidecar: still answered by another cluster after 5s: %s", c.Name, body)
				}
				time.Sleep(100 * time.Millisecond)
			}
			checkGRPCThroughMesh(t, c.Workloads[0].Outbound, c.Workloads[0].Admin, c.Name)
		}
		for _, drill := range [][]string{
			{"kill-local-endpoints", "--cluster", "east", "--hold", "2s"},
			{"controller-restart", "--cluster", "west", "--hold", "2s"},
			{"gateway-replica-loss", "--cluster", "north", "--hold", "2s"},
			{"wan-degraded", "--cluster", "west", "--hold", "3s"},
			{"svid-rotation", "--cluster", "east", "--ttl", "4s", "--hold", "8s"},
			{"canary-shift", "--cluster", "east", "--canary-cluster", "west", "--from", "0", "--to", "50"},
			{"nearest-remote", "--cluster", "east"},
		} {
			out, code = run(append(append([]string{"drill"}, drill...), "-o", "json")...)
			if code != 0 {
				t.Fatalf("%s drill: exit %d\n%s", drill[0], code, out)
			}
			rep = fedctl.DrillReport{}
			if err := json.Unmarshal([]byte(out), &rep); err != nil || !rep.Passed {
				t.Errorf("%s report %+v (%v)", drill[0], rep, err)
			}
			for _, r := range rep.Results {
				if r.Figure == "failed requests" && r.Value != 0 {
					t.Errorf("%s: %v failed requests", drill[0], r.Value)
				}
				t.Logf("drill %s: %s = %.1f %s (objective %s)", drill[0], r.Figure, r.Value, r.Unit, r.Objective)
			}
		}
		checkTrafficPolicy(t, state, run)
	} else {
		t.Log("not root: no pod networks, so no sample workloads, no traffic drills and no traffic policy checks")
	}

	state, err := localfed.ReadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if out, code := run("down"); code != 0 || !strings.Contains(out, "No fedmesh process is left") {
		t.Fatalf("down: exit %d, %q", code, out)
	}
	if left := localfed.Leftovers(dir, state); len(left) != 0 {
		t.Errorf("processes left after down: %v", left)
	}
	if _, err := os.Stat(state.EtcdDir); !os.IsNotExist(err) {
		t.Errorf("etcd data %s left after down (%v)", state.EtcdDir, err)
	}
	if ns := localfed.Namespaces(dir); len(ns) != 0 {
		t.Errorf("network namespaces left after down: %v", ns)
	}
	if _, err := os.Stat(filepath.Join(dir, localfed.SocketFile)); !os.IsNotExist(err) {
		t.Errorf("control socket left after down")
	}
	if out, code := run("down"); code != 1 {
		t.Errorf("second down: exit %d, %q", code, out)
	}
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}
