package kubenode

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func TestUnescapeMount(t *testing.T) {
	for in, want := range map[string]string{
		`/tmp/plain`:          "/tmp/plain",
		`/tmp/with\040space`:  "/tmp/with space",
		`/tmp/tab\011and\134`: "/tmp/tab\tand\\",
	} {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestProcessStart(t *testing.T) {
	if processStart(os.Getpid()) == "" {
		t.Fatal("no start time for this process")
	}
	if processStart(1<<22+7) != "" {
		t.Fatal("a start time for a process that cannot exist")
	}
}

// The configuration carries what this machine needs, and nothing that
// would reach outside the node.
func TestConfigs(t *testing.T) {
	n := &Node{Name: "cfg", Dir: "/tmp/fedmesh-node-cfg", addrs: slotAddrs(3), cgroups: &cgroupTree{root: "/fedmesh-node3-cfg"},
		pki: &pki{caPath: "/x/ca.crt"}, cniBinDir: "/usr/lib/cni"}
	n.NodeIP, n.PodCIDR = n.addrs.nodeIP, n.addrs.podCIDR
	n.paths = paths{containerdSock: "/s.sock", containerdRoot: "/r", containerdState: "/st", cniConfDir: "/c", cniIPAMDir: "/i",
		kubeletServing: &pair{certPath: "/k.crt", keyPath: "/k.key"}}
	containerd := n.containerdConfig()
	for _, want := range []string{"restrict_oom_score_adj = true", `sandbox_image = "` + PauseImage + `"`, `conf_dir = "/c"`, `bin_dir = "/usr/lib/cni"`, "netns_mounts_under_state_dir = true"} {
		if !strings.Contains(containerd, want) {
			t.Errorf("containerd config lacks %s", want)
		}
	}
	kubelet := n.kubeletConfig()
	for _, want := range []string{"failCgroupV1: false", "failSwapOn: false", "cgroupDriver: cgroupfs", `cgroupRoot: "/fedmesh-node3-cfg"`, "protectKernelDefaults: true", `clusterDNS: ["198.19.142.10"]`} {
		if !strings.Contains(kubelet, want) {
			t.Errorf("kubelet config lacks %s", want)
		}
	}
	cni, err := n.cniConfig()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cni), `"subnet": "198.19.141.0/24"`) || !strings.Contains(string(cni), `"ipMasq": false`) {
		t.Errorf("CNI config: %s", cni)
	}
	if strings.Contains(corefile(), "forward") {
		t.Error("the Corefile forwards queries outside the node")
	}
}

// A missing binary is named, with the make target that provides it.
func TestFindBinariesNamesWhatIsMissing(t *testing.T) {
	_, err := FindBinaries(t.TempDir(), "")
	var me *MissingError
	if !errors.As(err, &me) {
		t.Fatalf("FindBinaries in an empty directory: %v, want a *MissingError", err)
	}
	msg := err.Error()
	for _, want := range []string{"kubelet-" + KubeVersion, "coredns-" + CoreDNSVersion, "fedmesh-pause", "make deps"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not name %s", msg, want)
		}
	}
}
