// Package rawio reads and writes TCP sockets with raw system calls, off the
// Go scheduler's syscall path, for the sidecar's proxied connections.
package rawio
