package kubenode

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// The daemons' configuration files. Every path is the node's own, every
// address is the node's slot, and every default that would reach outside the
// node (an image registry, 10.88.0.0/16, /etc/resolv.conf's servers, the
// host's kernel settings) is replaced.

// containerdConfig is containerd 1.6's config (version 2) for one node:
// its own root, state, socket and CNI directories, the locally imported
// sandbox image, and restrict_oom_score_adj (this sandbox refuses a lower
// oom_score_adj, and without it every pod sandbox fails with "can't get
// final child's PID from pipe"). runc keeps its state under the node's state
// directory; pod network namespaces are mounted there too.
func (n *Node) containerdConfig() string {
	c := n.paths
	return fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  max_container_log_line_size = 16384

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = %q

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
`, c.containerdRoot, c.containerdState, c.containerdSock, c.containerdSock+".ttrpc",
		filepath.Join(n.Dir, "containerd-opt"), PauseImage,
		filepath.Join(c.containerdState, "runc"), n.cniBinDir, c.cniConfDir)
}

// cniConfig is a bridge network over the slot's pod CIDR with host-local
// addresses kept in the node's directory (not /var/lib/cni). No masquerade:
// nothing outside 198.18.0.0/15 is ever a destination.
func (n *Node) cniConfig() ([]byte, error) {
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       "fedmesh-node",
		"plugins": []map[string]any{
			{
				"type":        "bridge",
				"bridge":      "cni0",
				"isGateway":   true,
				"ipMasq":      false,
				"hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": n.PodCIDR, "gateway": n.addrs.podGateway}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
					"dataDir": n.paths.cniIPAMDir,
				},
			},
			{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	}
	return json.MarshalIndent(conf, "", "  ")
}

// kubeletConfig is the KubeletConfiguration measured on this machine:
// cgroup v1 allowed, swap tolerated, cgroupfs with the node's own cgroupRoot,
// its own directories, eviction and image GC that never fire on a busy
// developer disk (an evicted CoreDNS or a collected image would fail the
// node for reasons that are not the node's), and protectKernelDefaults so the
// kubelet never writes the host's kernel settings (it reads them through the
// overlay kubeletLauncher mounts in its own mount namespace).
func (n *Node) kubeletConfig() string {
	p := n.paths
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
cgroupRoot: %q
cgroupsPerQOS: true
containerRuntimeEndpoint: unix://%s
imageServiceEndpoint: unix://%s
address: %q
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: %q
tlsPrivateKeyFile: %q
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: %q
authorization:
  mode: Webhook
clusterDomain: cluster.local
clusterDNS: [%q]
resolvConf: %q
podLogsDir: %q
volumePluginDir: %q
staticPodPath: ""
protectKernelDefaults: true
localStorageCapacityIsolation: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%%"
  nodefs.inodesFree: "1%%"
  imagefs.available: "1%%"
mergeDefaultEvictionSettings: false
maxPods: 110
serializeImagePulls: false
registerNode: true
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 10s
runtimeRequestTimeout: 2m
shutdownGracePeriod: 0s
`, n.cgroups.root, p.containerdSock, p.containerdSock, n.NodeIP,
		p.kubeletServing.certPath, p.kubeletServing.keyPath, n.pki.caPath,
		n.addrs.dnsIP, p.resolvConf, p.podLogsDir, p.volumePluginDir)
}

// kernelDefaults are the kernel settings the kubelet insists on. The host's
// may differ, and the kubelet would either rewrite them (machine-wide) or,
// with protectKernelDefaults, refuse to start; kubeletLauncher shows the
// kubelet these values in its own mount namespace instead.
var kernelDefaults = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

// kubeletLauncher is the shell script the kubelet starts through, under
// `unshare --mount --propagation unchanged`: in the kubelet's own mount
// namespace it covers the kernel settings the kubelet checks with files of
// the values it wants (private mounts under /proc, seen by no one else),
// then enters the node's network namespace and runs the kubelet. The
// kubelet's root directory is a shared mount made by Start, so the volumes
// the kubelet mounts there reach containerd in the host's mount namespace.
func (n *Node) kubeletLauncher() (string, error) {
	dir := filepath.Join(n.Dir, "kernel-defaults")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString("set -e\nmount --make-rprivate /proc\n")
	for k, v := range kernelDefaults {
		f := filepath.Join(dir, strings.ReplaceAll(k, "/", "."))
		if err := os.WriteFile(f, []byte(v+"\n"), 0o444); err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "mount --bind %q /proc/sys/%s\n", f, k)
	}
	b.WriteString("netns=$1\nshift\nexec nsenter --net=\"$netns\" -- \"$@\"\n")
	return b.String(), nil
}

// corefile serves cluster.local and the reverse zones from the API, and
// nothing else: there is no forward plugin, because no server outside the
// node may be asked.
func corefile() string {
	return `.:53 {
    errors
    health :8080 {
        lameduck 2s
    }
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
    loadbalance
}
`
}
