package metrics

import (
	"bytes"
	"errors"
	"math"
	"os"
	"strconv"
	"syscall"
)

// userHZ is the unit of the times in /proc/<pid>/stat: USER_HZ, 100 on
// every Linux architecture (procfs assumes it too).
const userHZ = 100

func registerProcess(r *Registry) error {
	for _, g := range []struct {
		name, help string
		f          func() float64
	}{
		{"process_resident_memory_bytes", "Resident memory size in bytes.", func() float64 { _, rss := statm(); return rss }},
		{"process_virtual_memory_bytes", "Virtual memory size in bytes.", func() float64 { vsz, _ := statm(); return vsz }},
		{"process_open_fds", "Number of open file descriptors.", openFDs},
		{"process_max_fds", "Maximum number of open file descriptors.", maxFDs},
	} {
		if err := r.NewGaugeFunc(g.name, g.help, g.f); err != nil {
			return err
		}
	}
	if err := r.NewCounterFunc("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", cpuSeconds); err != nil {
		return err
	}
	// The start time does not change: read once; left out if /proc says
	// nothing usable.
	if start, err := startTime(); err == nil {
		if err := r.NewGaugeFunc("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", func() float64 { return start }); err != nil {
			return err
		}
	}
	return nil
}

// statm returns the virtual and resident size from /proc/self/statm (NaN
// when it cannot be read).
func statm() (vsz, rss float64) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return math.NaN(), math.NaN()
	}
	f := bytes.Fields(b)
	if len(f) < 2 {
		return math.NaN(), math.NaN()
	}
	page := float64(os.Getpagesize())
	v, err1 := strconv.ParseUint(string(f[0]), 10, 64)
	r, err2 := strconv.ParseUint(string(f[1]), 10, 64)
	if err1 != nil || err2 != nil {
		return math.NaN(), math.NaN()
	}
	return float64(v) * page, float64(r) * page
}

func openFDs() float64 {
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return math.NaN()
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return math.NaN()
	}
	return float64(len(names))
}

func maxFDs() float64 {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return math.NaN()
	}
	return float64(l.Cur)
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return math.NaN()
	}
	// Sum in microseconds, then divide once: 0.013456, not 0.013456000000000001.
	us := (int64(ru.Utime.Sec)+int64(ru.Stime.Sec))*1e6 + int64(ru.Utime.Usec) + int64(ru.Stime.Usec)
	return float64(us) / 1e6
}

// startTime returns the process's start as unix seconds: its start in
// ticks after boot (/proc/self/stat, field 22) plus the boot time
// (/proc/stat, btime).
func startTime() (float64, error) {
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, err
	}
	// The command (field 2) is in parentheses and may hold spaces: count
	// fields after the last ')', where field 3 starts.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("/proc/self/stat: no command field")
	}
	f := bytes.Fields(stat[i+1:])
	if len(f) < 20 {
		return 0, errors.New("/proc/self/stat: too few fields")
	}
	ticks, err := strconv.ParseUint(string(f[22-3]), 10, 64)
	if err != nil {
		return 0, err
	}
	all, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	for line := range bytes.Lines(all) {
		if v, ok := bytes.CutPrefix(line, []byte("btime ")); ok {
			boot, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 10, 64)
			if err != nil {
				return 0, err
			}
			return float64(boot) + float64(ticks)/userHZ, nil
		}
	}
	return 0, errors.New("/proc/stat: no btime")
}
