package main

import (
	"context"
	"io"
	"strings"
	"testing"
)

// TestPortFlags: the injector's flags (--inbound-port, --outbound-port)
// are understood, and the combinations that cannot work are refused
// before anything starts.
func TestPortFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"inbound twice", []string{"--cluster=west", "--inbound=:1", "--inbound-port=15006"}, "--inbound and --inbound-port are exclusive"},
		{"inbound port range", []string{"--cluster=west", "--inbound-port=70000"}, "not a port"},
		{"outbound without discovery", []string{"--cluster=west", "--outbound-port=15001"}, "--outbound-port needs --discovery"},
		{"outbound port range", []string{"--cluster=west", "--outbound-port=70000", "--discovery=127.0.0.1:1"}, "not a port"},
		{"unknown flag", []string{"--cluster=west", "--outbound=:15001"}, "flag provided but not defined"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), tc.args, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("run(%v) = %v, want an error with %q", tc.args, err, tc.want)
			}
		})
	}
}
