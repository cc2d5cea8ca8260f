package kubenode

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"
)

// mountPoints returns every mount point of this mount namespace, in the
// order they were mounted.
func mountPoints() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 {
			out = append(out, unescapeMount(fields[4]))
		}
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space, ...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isMountPoint(path string) bool { return slices.Contains(mountPoints(), path) }

// mountsUnder lists the mount points at or below dir.
func mountsUnder(dir string) []string {
	var out []string
	for _, m := range mountPoints() {
		if m == dir || strings.HasPrefix(m, dir+"/") {
			out = append(out, m)
		}
	}
	return out
}

// unmountUnder unmounts everything at or below dir, the latest mounts first
// (so a mount on top of another goes before it), retrying for a few seconds
// while a dying process still holds one.
func unmountUnder(dir string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		ms := mountsUnder(dir)
		if len(ms) == 0 {
			return nil
		}
		slices.Reverse(ms)
		var errs []error
		for _, m := range ms {
			if err := syscallUnmount(m); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
			}
		}
		if time.Now().After(deadline) {
			return errors.Join(append(errs, fmt.Errorf("still mounted under %s: %v", dir, mountsUnder(dir)))...)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func syscallUnmount(path string) error { return syscall.Unmount(path, 0) }
