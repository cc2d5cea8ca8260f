// Package localfed runs a whole fedmesh federation on one machine, the
// project's embedded default: per cluster a real kube-apiserver (sharing one
// etcd), a federation controller and a SPIFFE issuer, all federated with each
// other. A supervisor process owns every child; `fedctl up` starts it and
// returns once the federation is ready, `fedctl down` stops it, leaving
// nothing behind.
//
// The state directory holds what a user needs: kubeconfig (contexts
// fedmesh-<cluster>), federation.json (addresses of everything), logs.
package localfed

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Files in the state directory.
const (
	PIDFile        = "supervisor.pid"
	StateFile      = "federation.json"
	KubeconfigFile = "kubeconfig"
	ProgressFile   = "progress.log"
	LogFile        = "supervisor.log"
	SocketFile     = "supervisor.sock"
)

// State is federation.json: everything a user or fedctl needs to find.
type State struct {
	Dir        string    `json:"dir"`
	ClusterSet string    `json:"clusterSet"`
	Kubeconfig string    `json:"kubeconfig"`
	Supervisor int       `json:"supervisorPID"`
	EtcdDir    string    `json:"etcdDir"`
	Clusters   []Cluster `json:"clusters"`
}

// Cluster is one member of the local federation.
type Cluster struct {
	Name              string `json:"name"`
	Context           string `json:"context"`
	APIServer         string `json:"apiServer"`
	TrustDomain       string `json:"trustDomain"`
	WorkloadAPISocket string `json:"workloadAPISocket"`
	BundleEndpoint    string `json:"bundleEndpoint"`
	Bundle            string `json:"bundleFile"`
	ControllerAdmin   string `json:"controllerAdmin"`
	Discovery         string `json:"discovery"`
	IssuerMetrics     string `json:"issuerMetrics"`
	// PodNetwork and NetworkNamespace are set when the sample pods run in
	// a network namespace of their own (root only).
	PodNetwork       string `json:"podNetwork,omitempty"`
	NetworkNamespace string `json:"networkNamespace,omitempty"`
	// Gateways and Workloads are filled in as those components land.
	Gateways  []Gateway  `json:"gateways"`
	Workloads []Workload `json:"workloads"`
}

// Workload is a sample workload: the client's sidecar outbound listener
// (curl it to go through the mesh) or an echo pod's sidecar inbound.
type Workload struct {
	Name     string `json:"name"`
	Outbound string `json:"outbound,omitempty"`
	Inbound  string `json:"inbound,omitempty"`
	Admin    string `json:"admin,omitempty"` // the sidecar's /state, /metrics
}

// dirEnv names the federation's directory in the environment of every
// process the supervisor starts.
const dirEnv = "FEDMESH_LOCALFED_DIR"

// ErrNotRunning says there is no local federation in the directory.
var ErrNotRunning = errors.New("no local federation is running")

// ReadState loads federation.json from dir.
func ReadState(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s (start one with `fedctl up --dir %s`)", ErrNotRunning, dir, dir)
	}
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("read %s: %w", filepath.Join(dir, StateFile), err)
	}
	return &s, nil
}

// RunningPID returns the supervisor's pid when one is alive in dir, or 0.
func RunningPID(dir string) int {
	b, err := os.ReadFile(filepath.Join(dir, PIDFile))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return 0
	}
	// A recycled pid is not our supervisor.
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if !strings.Contains(string(cmdline), "supervise") {
		return 0
	}
	return pid
}

// DefaultDir is where `fedctl up` keeps its state unless told otherwise.
func DefaultDir() string {
	if d := os.Getenv("FEDMESH_DIR"); d != "" {
		return d
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".fedmesh", "local")
	}
	return filepath.Join(os.TempDir(), "fedmesh-local")
}

// FindBinary looks for a fedmesh binary next to the running executable,
// then on PATH.
func FindBinary(name string) (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	for _, d := range filepath.SplitList(os.Getenv("PATH")) {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found next to this program or on PATH: run `make build` and use bin/fedctl", name)
}

// freeUDPTCPPort finds a port number free for both UDP and TCP on host:
// the gateway's egress serves QUIC and TCP+mTLS on the same number.
func freeUDPTCPPort(host string) (int, error) {
	for range 20 {
		p, err := freeUDPPort(host)
		if err != nil {
			return 0, err
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(p)))
		if err == nil {
			ln.Close()
			return p, nil
		}
	}
	return 0, fmt.Errorf("find a port free for both udp and tcp on %s: 20 tries failed", host)
}

func freeUDPPort(host string) (int, error) {
	c, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("find a free udp port: %w", err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port, nil
}
