//go:build !linux

package metrics

// registerProcess registers nothing: the process series are read from
// Linux's /proc.
func registerProcess(*Registry) error { return nil }
