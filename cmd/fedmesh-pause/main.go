// Command fedmesh-pause is the sandbox ("pause") container of every pod on
// fedmesh's local Kubernetes nodes: it holds the pod's namespaces open, reaps
// the zombies it inherits as a pod's PID 1, and exits on SIGINT or SIGTERM.
// The usual pause image comes from a registry this machine cannot reach, so
// the node builds its sandbox image from this static binary.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
