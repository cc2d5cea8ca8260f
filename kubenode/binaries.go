package kubenode

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/fedmesh/fedmesh/controlplane"
)

// Binaries are the programs a node runs, by absolute path.
type Binaries struct {
	// Built by `make deps` from the Go module proxy.
	APIServer, ControllerManager, Scheduler, Kubelet, Proxy, CoreDNS string
	// Built by `make build` (or by the test) from cmd/fedmesh-pause.
	Pause string
	// Debian's packages (scripts/install-deps.sh).
	Etcd, Containerd, Shim, Ctr, Runc, IP, Iptables, Nsenter, Unshare, Mount string
	// CNIDir holds the CNI plugins (bridge, host-local, loopback, portmap).
	CNIDir string
}

// MissingError names the programs a node needs that are not installed.
type MissingError struct{ Missing []string }

func (e *MissingError) Error() string {
	return "kubernetes node binaries missing: " + strings.Join(e.Missing, ", ") +
		" (run `make deps`: it builds the Kubernetes components and CoreDNS into bin/ and installs Debian's containerd, runc, CNI plugins and etcd; fedmesh-pause comes from `make build`)"
}

// FindBinaries locates every program a node runs. binDir holds the
// versioned Kubernetes and CoreDNS binaries (default: where
// controlplane.FindKubeAPIServer finds kube-apiserver); pause defaults to
// binDir/fedmesh-pause.
func FindBinaries(binDir, pause string) (Binaries, error) {
	var missing []string
	if binDir == "" {
		if kas, err := controlplane.FindKubeAPIServer(""); err == nil {
			binDir = filepath.Dir(kas)
		} else {
			binDir = "bin"
		}
	}
	versioned := func(name, version string) string {
		p := filepath.Join(binDir, name+"-"+version)
		if st, err := os.Stat(p); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			missing = append(missing, p)
		}
		abs, _ := filepath.Abs(p)
		return abs
	}
	b := Binaries{
		APIServer:         versioned("kube-apiserver", KubeVersion),
		ControllerManager: versioned("kube-controller-manager", KubeVersion),
		Scheduler:         versioned("kube-scheduler", KubeVersion),
		Kubelet:           versioned("kubelet", KubeVersion),
		Proxy:             versioned("kube-proxy", KubeVersion),
		CoreDNS:           versioned("coredns", CoreDNSVersion),
	}
	if pause == "" {
		pause = filepath.Join(binDir, "fedmesh-pause")
	}
	if st, err := os.Stat(pause); err != nil || st.IsDir() {
		missing = append(missing, pause)
	}
	b.Pause = pause
	onPath := func(name string) string {
		p, err := exec.LookPath(name)
		if err != nil {
			// Debian puts some in sbin, which a user's PATH may lack.
			for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin"} {
				if st, err := os.Stat(filepath.Join(d, name)); err == nil && !st.IsDir() {
					return filepath.Join(d, name)
				}
			}
			missing = append(missing, name)
		}
		return p
	}
	b.Etcd, b.Containerd, b.Shim, b.Ctr = onPath("etcd"), onPath("containerd"), onPath("containerd-shim-runc-v2"), onPath("ctr")
	b.Runc, b.IP, b.Iptables = onPath("runc"), onPath("ip"), onPath("iptables")
	b.Nsenter, b.Unshare, b.Mount = onPath("nsenter"), onPath("unshare"), onPath("mount")
	for _, d := range []string{"/usr/lib/cni", "/opt/cni/bin"} {
		if _, err := os.Stat(filepath.Join(d, "bridge")); err == nil {
			b.CNIDir = d
			break
		}
	}
	if b.CNIDir == "" {
		missing = append(missing, "CNI plugins (/usr/lib/cni/bridge)")
	}
	if len(missing) > 0 {
		return b, &MissingError{Missing: missing}
	}
	return b, nil
}

// String lists the binaries, for logs.
func (b Binaries) String() string {
	return fmt.Sprintf("kube %s from %s, coredns %s, containerd %s, runc %s, CNI %s",
		KubeVersion, filepath.Dir(b.APIServer), CoreDNSVersion, b.Containerd, b.Runc, b.CNIDir)
}
