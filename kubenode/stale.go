package kubenode

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// A node whose program died without Stop (killed, a test timed out) leaves
// its containers and shims running (they outlive their parents by design),
// mounts, cgroups and its network namespace. Each running node therefore
// keeps a record of what it made, and Start removes the remains of every
// node whose program is gone before it picks a slot, so a crash costs one
// slot until the next Start, not the machine.

const recordDir = "/run/fedmesh-kubenode"

// record is what a node made, enough to undo it without the Node.
type record struct {
	PID         int    `json:"pid"`
	StartTime   string `json:"startTime"` // of PID, so a reused PID is not taken for the owner
	Name        string `json:"name"`
	Slot        int    `json:"slot"`
	Dir         string `json:"dir,omitempty"`
	EtcdDir     string `json:"etcdDir,omitempty"`
	CgroupRoot  string `json:"cgroupRoot,omitempty"`
	MadeLogsDir bool   `json:"madeLogsDir,omitempty"`
}

func recordPath(slot int) string { return filepath.Join(recordDir, fmt.Sprintf("slot-%d.json", slot)) }

// processStart returns the start time of pid (field 22 of its stat), or ""
// when pid does not exist.
func processStart(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	// The command name may hold spaces; the fields after it do not.
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 20 {
		return ""
	}
	return fields[19]
}

// writeRecord saves what n has made so far.
func (n *Node) writeRecord() error {
	if err := os.MkdirAll(recordDir, 0o700); err != nil {
		return err
	}
	r := record{PID: os.Getpid(), StartTime: processStart(os.Getpid()), Name: n.Name, Slot: n.addrs.slot,
		Dir: n.Dir, EtcdDir: n.etcdDir, MadeLogsDir: n.madeLogsDir}
	if n.cgroups != nil {
		r.CgroupRoot = n.cgroups.root
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	tmp := recordPath(n.addrs.slot) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, recordPath(n.addrs.slot))
}

// removeRecord removes the node's record, and the record directory once
// no node has one, under the slot lock (a node starting at the same time
// may be writing its own).
func (n *Node) removeRecord() {
	if n.addrs.netns == "" {
		return
	}
	unlock, err := lockSlots()
	if err != nil {
		return
	}
	defer unlock()
	os.Remove(recordPath(n.addrs.slot))
	os.Remove(recordDir) // only when empty
}

// cleanStale removes the remains of every node whose program is gone. The
// caller holds the slot lock.
func cleanStale(log *slog.Logger) error {
	files, _ := filepath.Glob(filepath.Join(recordDir, "slot-*.json"))
	var errs []error
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var r record
		if err := json.Unmarshal(b, &r); err != nil {
			log.Warn("unreadable node record removed", "file", f, "err", err)
			os.Remove(f)
			continue
		}
		if st := processStart(r.PID); st != "" && st == r.StartTime {
			continue // its program still runs
		}
		if err := syscall.Kill(r.PID, 0); err == nil && r.StartTime == "" {
			continue
		}
		n := &Node{Name: r.Name, Dir: r.Dir, etcdDir: r.EtcdDir, addrs: slotAddrs(r.Slot), madeLogsDir: r.MadeLogsDir, log: log}
		if r.Dir != "" {
			n.paths.containerdState = filepath.Join(r.Dir, "containerd", "state")
		}
		if r.CgroupRoot != "" {
			hs, err := hierarchies()
			if err == nil {
				n.cgroups = &cgroupTree{root: r.CgroupRoot, hierarchies: hs}
			}
		}
		err = n.stop()
		log.Info("removed the remains of a node whose program is gone", "node", r.Name, "slot", r.Slot, "pid", r.PID, "err", err)
		if err != nil {
			errs = append(errs, fmt.Errorf("remains of node %s (slot %d, pid %d): %w", r.Name, r.Slot, r.PID, err))
			continue
		}
		os.Remove(f)
	}
	return errors.Join(errs...)
}
