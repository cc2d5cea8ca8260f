// Package rawio reads and writes TCP sockets with raw system calls, off the
// Go scheduler's syscall path, for the sidecar's proxied connections; in
// Auto mode only while the process reads busily, and through the
// scheduler's path while it is lightly loaded (see Conn).
package rawio
