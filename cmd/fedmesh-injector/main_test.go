package main

import (
	"context"
	"strings"
	"testing"
)

// TestRunRejectsBadConfig checks that run stops with a clear error before
// listening when its configuration is wrong.
func TestRunRejectsBadConfig(t *testing.T) {
	base := config{addr: "127.0.0.1:0", logLevel: "info", socketSource: "hostPath", failurePolicy: "Ignore",
		certFile: "/nonexistent/tls.crt", keyFile: "/nonexistent/tls.key"}
	for _, tc := range []struct {
		name    string
		mod     func(*config)
		wantErr string
	}{
		{name: "log level", mod: func(c *config) { c.logLevel = "loud" }, wantErr: "--log-level"},
		{name: "exclude ports", mod: func(c *config) { c.excludePorts = "80,http" }, wantErr: "--exclude-inbound-ports"},
		{name: "failure policy", mod: func(c *config) { c.failurePolicy = "Sometimes" }, wantErr: "failure policy"},
		{name: "socket source", mod: func(c *config) { c.socketSource = "nfs" }, wantErr: "socket source"},
		{name: "probe port", mod: func(c *config) { c.inj.ProbePort = 15001 }, wantErr: "probe port 15001 is also the inbound or outbound port"},
		{name: "dns port", mod: func(c *config) { c.inj.DNSPort = 15006 }, wantErr: "dns port 15006 is also the inbound, outbound or probe port"},
		{name: "missing cert", mod: func(*config) {}, wantErr: "load serving certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			tc.mod(&c)
			err := run(context.Background(), c)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("run: %v, want error containing %q", err, tc.wantErr)
			}
		})
	}
}
