package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func TestParseFlags(t *testing.T) {
	req := []string{"--trust-domain", "east.fedmesh.test", "--data-dir", "/tmp/d", "--socket", "/tmp/s.sock"}
	peer := "trust-domain=west.fedmesh.test,url=https://127.0.0.1:8443,endpoint-id=spiffe://west.fedmesh.test/fedmesh/issuer,bundle=/tmp/west.json"
	tests := []struct {
		name    string
		args    []string
		wantErr string
		check   func(t *testing.T, o options)
	}{
		{"required only", req, "", func(t *testing.T, o options) {
			if o.cfg.SVIDTTL != time.Hour || o.cfg.TrustDomain.Name() != "east.fedmesh.test" {
				t.Errorf("got ttl %s td %s", o.cfg.SVIDTTL, o.cfg.TrustDomain)
			}
		}},
		{"peer", append(req, "--federate", peer, "--svid-ttl", "1m"), "", func(t *testing.T, o options) {
			if len(o.cfg.Peers) != 1 || o.cfg.Peers[0].TrustDomain.Name() != "west.fedmesh.test" || o.cfg.Peers[0].BundleFile != "/tmp/west.json" {
				t.Errorf("peers %+v", o.cfg.Peers)
			}
		}},
		{"missing trust domain", req[2:], "--trust-domain is required", nil},
		{"bad trust domain", append([]string{"--trust-domain", "East!"}, req[2:]...), "--trust-domain", nil},
		{"missing data dir", append(req[:2:2], req[4:]...), "--data-dir is required", nil},
		{"missing socket", req[:4], "--socket is required", nil},
		{"bad duration", append(req, "--svid-ttl", "an hour"), "invalid value", nil},
		{"stray argument", append(req, "extra"), "unexpected arguments", nil},
		{"peer without url", append(req, "--federate", "trust-domain=west.fedmesh.test,endpoint-id=spiffe://west.fedmesh.test/x"), "url is required", nil},
		{"peer unknown key", append(req, "--federate", peer+",color=red"), `unknown key "color"`, nil},
		{"peer bad endpoint id", append(req, "--federate", "trust-domain=west.fedmesh.test,url=https://x,endpoint-id=west"), "endpoint-id", nil},
		{"peer key twice", append(req, "--federate", peer+",url=https://y"), "url given twice", nil},
		{"bad log level", append(req, "--log-level", "loud"), "invalid value", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			o, err := parseFlags(tt.args, &stderr)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, o)
		})
	}
}

func TestHelp(t *testing.T) {
	var stderr bytes.Buffer
	_, err := parseFlags([]string{"--help"}, &stderr)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("error %v, want flag.ErrHelp", err)
	}
	for _, want := range []string{"Usage:", "--trust-domain", "-federate", "-svid-ttl", "-ca-ttl", "-bundle-endpoint", "SPIFFE_ENDPOINT_SOCKET"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("help lacks %q", want)
		}
	}
}

// TestRun: the binary's run serves SVIDs from an entries file and returns
// cleanly when its context ends; a bad entries file is a clear error.
func TestRun(t *testing.T) {
	dir, err := os.MkdirTemp("", "fm")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	entries := filepath.Join(dir, "entries.yaml")
	body := "entries:\n- spiffeID: spiffe://east.fedmesh.test/ns/shop/sa/checkout\n  selectors: [\"unix:uid:" + strconv.Itoa(os.Getuid()) + "\"]\n"
	if err := os.WriteFile(entries, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	o, err := parseFlags([]string{"--trust-domain", "east.fedmesh.test", "--data-dir", filepath.Join(dir, "data"),
		"--socket", sock, "--entries", entries, "--bundle-endpoint", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, o, io.Discard) }()

	fctx, fcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer fcancel()
	var svid string
	for svid == "" && fctx.Err() == nil { // the socket appears once run has started
		x, err := workloadapi.FetchX509SVID(fctx, workloadapi.WithAddr("unix://"+sock))
		if err == nil {
			svid = x.ID.String()
		} else {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if svid != "spiffe://east.fedmesh.test/ns/shop/sa/checkout" {
		t.Fatalf("fetched %q", svid)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return after cancel")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}

	if err := os.WriteFile(entries, []byte("entries:\n- spiffeID: spiffe://west.fedmesh.test/ns/a/sa/b\n  selectors: [\"unix:uid:0\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run(context.Background(), o, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "is not the issuer's") {
		t.Fatalf("run with an entry of another trust domain: %v", err)
	}
}
