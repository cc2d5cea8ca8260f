package rawio

import "fmt"

// Mode is how a proxied connection's reads and writes reach the kernel.
type Mode uint8

const (
	// Auto takes the scheduler's syscall path (as Std) while the process
	// is lightly loaded and raw system calls (as Raw) when it is busy; see
	// Conn.
	Auto Mode = iota
	// Raw always makes raw system calls: the least CPU per request.
	Raw
	// Std leaves the connection a net.TCPConn.
	Std
)

var modeNames = [...]string{Auto: "auto", Raw: "raw", Std: "std"}

func (m Mode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// ParseMode reads "auto", "raw" or "std".
func ParseMode(s string) (Mode, error) {
	for m, n := range modeNames {
		if s == n {
			return Mode(m), nil
		}
	}
	return 0, fmt.Errorf("socket I/O mode %q: want auto, raw or std", s)
}
