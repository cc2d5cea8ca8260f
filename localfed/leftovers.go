package localfed

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Leftovers lists processes that still belong to the local federation in
// dir: fedmesh's own programs, kube-apiserver and etcd whose command line
// names the directory or its etcd data. Other programs (an editor, a tail
// of a log) are never touched.

func Leftovers(dir string, st *State) []int {
	marks := []string{dir + "/"}
	if st != nil && st.EtcdDir != "" {
		marks = append(marks, st.EtcdDir)
	}
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err != nil || !ours(filepath.Base(exe)) {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		env, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		inherited := slices.Contains(strings.Split(string(env), "\x00"), dirEnv+"="+dir)
		if inherited || slices.ContainsFunc(marks, func(m string) bool { return strings.Contains(cmd, m) }) {
			out = append(out, pid)
		}
	}
	return out
}

// KillLeftovers kills every leftover process and returns those that survive.
func KillLeftovers(dir string, st *State) []int {
	left := Leftovers(dir, st)
	for _, pid := range left {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(left) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		left = Leftovers(dir, st)
	}
	return left
}

func ours(exe string) bool {
	for _, p := range []string{"kube-apiserver", "etcd", "fedmesh-", "fedctl"} {
		if strings.HasPrefix(exe, p) {
			return true
		}
	}
	return false
}
