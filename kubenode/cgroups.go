package kubenode

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The node's processes live in one cgroup subtree per v1 hierarchy (this
// kernel mounts cgroup v1; the kubelet runs there with failCgroupV1: false
// and cgroupDriver: cgroupfs). The subtree is the kubelet's cgroupRoot, made
// beforehand under the cgroup this program runs in (so whoever accounts for
// this program accounts for the node too), with:
//
//	<root>/system   the node's daemons, containerd's shims with them
//	<root>/kubepods the kubelet's pods (the kubelet makes it)
//
// Stop kills every process in the subtree, then removes it; that is what
// makes "nothing left behind" hold for the containers too, whose shims
// outlive containerd by design.

const cgroupMount = "/sys/fs/cgroup"

// cgroupTree is one node's subtree in every v1 hierarchy.
type cgroupTree struct {
	root        string   // the kubelet's cgroupRoot, e.g. /fedmesh-node0-east
	hierarchies []string // mounted hierarchies, e.g. /sys/fs/cgroup/cpu, /sys/fs/cgroup/unified
	created     []string // directories made by create, parents first
}

// hierarchies lists the mounted cgroup v1 hierarchies and, on a hybrid
// system, the cgroup2 one beside them (runc makes every container's cgroup
// there too).
func hierarchies() ([]string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var hs []string
	v1 := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && (fields[2] == "cgroup" || fields[2] == "cgroup2") && strings.HasPrefix(fields[1], cgroupMount+"/") {
			hs = append(hs, fields[1])
			if fields[2] == "cgroup" {
				v1++
			}
		}
	}
	if v1 == 0 {
		return nil, errors.New("no cgroup v1 hierarchy is mounted under /sys/fs/cgroup (the node supports cgroup v1 only for now)")
	}
	return hs, sc.Err()
}

// ownCgroup returns this process's cgroup in the memory hierarchy.
func ownCgroup() string {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "/"
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		parts := strings.SplitN(l, ":", 3)
		if len(parts) == 3 && slices.Contains(strings.Split(parts[1], ","), "memory") {
			return parts[2]
		}
	}
	return "/"
}

// newCgroupTree names the subtree after the node's slot (unique on the
// machine while the node runs) and its name (for people reading it).
func newCgroupTree(slot int, name string) (*cgroupTree, error) {
	hs, err := hierarchies()
	if err != nil {
		return nil, err
	}
	return &cgroupTree{root: filepath.Join(ownCgroup(), fmt.Sprintf("fedmesh-node%d-%s", slot, name)), hierarchies: hs}, nil
}

// create makes root and root/system in every hierarchy, each new cpuset
// directory with the cpus and memory nodes of its parent (a new cpuset
// cgroup has none, and no process may join it then).
func (t *cgroupTree) create() error {
	for _, h := range t.hierarchies {
		for _, rel := range []string{t.root, filepath.Join(t.root, "system")} {
			var missing []string
			for d := filepath.Join(h, rel); d != h; d = filepath.Dir(d) {
				if _, err := os.Stat(d); err == nil {
					break
				}
				missing = append(missing, d)
			}
			for i := len(missing) - 1; i >= 0; i-- {
				d := missing[i]
				if err := os.Mkdir(d, 0o755); err != nil && !os.IsExist(err) {
					return fmt.Errorf("create cgroup %s: %w", d, err)
				}
				t.created = append(t.created, d)
				if filepath.Base(h) == "cpuset" {
					for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
						v, err := os.ReadFile(filepath.Join(filepath.Dir(d), f))
						if err != nil {
							return fmt.Errorf("read %s of %s: %w", f, filepath.Dir(d), err)
						}
						if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
							return fmt.Errorf("copy %s to %s: %w", f, d, err)
						}
					}
				}
			}
		}
	}
	return nil
}

// join moves pid into root/system in every hierarchy.
func (t *cgroupTree) join(pid int) error {
	for _, h := range t.hierarchies {
		p := filepath.Join(h, t.root, "system", "cgroup.procs")
		if err := os.WriteFile(p, []byte(strconv.Itoa(pid)), 0o644); err != nil {
			return fmt.Errorf("move pid %d to %s: %w", pid, p, err)
		}
	}
	return nil
}

// pids lists every process in the subtree, in any hierarchy.
func (t *cgroupTree) pids() []int {
	seen := map[int]bool{}
	for _, h := range t.hierarchies {
		filepath.WalkDir(filepath.Join(h, t.root), func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for f := range strings.FieldsSeq(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					seen[pid] = true
				}
			}
			return nil
		})
	}
	out := make([]int, 0, len(seen))
	for pid := range seen {
		out = append(out, pid)
	}
	slices.Sort(out)
	return out
}

// killAll SIGKILLs every process in the subtree until none is left (new
// ones may be forked while it works), for at most timeout.
func (t *cgroupTree) killAll(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		pids := t.pids()
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v still in cgroup %s after %s", pids, t.root, timeout)
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// remove deletes the subtree (deepest first) and the parents create made,
// retrying while the kernel still counts exiting tasks, for at most timeout.
func (t *cgroupTree) remove(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var dirs []string
	for _, h := range t.hierarchies {
		filepath.WalkDir(filepath.Join(h, t.root), func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	// Parents made by create (above root) go last, and only when empty.
	for i := len(t.created) - 1; i >= 0; i-- {
		if !slices.Contains(dirs, t.created[i]) {
			dirs = append(dirs, t.created[i])
		}
	}
	slices.SortStableFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	var errs []error
	for _, d := range dirs {
		for {
			err := syscall.Rmdir(d)
			if err == nil || errors.Is(err, syscall.ENOENT) {
				break
			}
			// A parent above root that holds other cgroups is not ours to remove.
			if errors.Is(err, syscall.EBUSY) && !strings.HasPrefix(d, t.hierarchyOf(d)+t.root) && hasSubdirs(d) {
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

func (t *cgroupTree) hierarchyOf(d string) string {
	for _, h := range t.hierarchies {
		if strings.HasPrefix(d, h+"/") {
			return h
		}
	}
	return ""
}

func hasSubdirs(d string) bool {
	ents, err := os.ReadDir(d)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if e.IsDir() {
			return true
		}
	}
	return false
}

// leftovers names every directory of the subtree that still exists.
func (t *cgroupTree) leftovers() []string {
	var left []string
	for _, h := range t.hierarchies {
		if _, err := os.Stat(filepath.Join(h, t.root)); err == nil {
			left = append(left, "cgroup "+filepath.Join(h, t.root))
		}
	}
	return left
}
