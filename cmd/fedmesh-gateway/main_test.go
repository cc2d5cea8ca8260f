package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/gatewaytest"
	"github.com/fedmesh/fedmesh/gateway/tunnel"
)

type domain = gatewaytest.Domain

func TestHelp(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--help"}, io.Discard, &out); err != nil {
		t.Fatalf("--help: %v", err)
	}
	for _, want := range []string{"Usage: fedmesh-gateway", "-peer", "-dead-after", "-catalog", "-kubeconfig", "fedmesh-tunnel/1"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("--help lacks %q", want)
		}
	}
}

func TestFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no cluster", []string{"--catalog", "x"}, "--cluster is required"},
		{"no catalog", []string{"--cluster", "east"}, "exactly one of --kubeconfig and --catalog"},
		{"both catalogs", []string{"--cluster", "east", "--catalog", "a", "--kubeconfig", "b"}, "exactly one"},
		{"bad peer", []string{"--cluster", "east", "--catalog", "a", "--peer", "west"}, "CLUSTER[@TRUST_DOMAIN]=HOST:PORT"},
		{"bad peer addr", []string{"--cluster", "east", "--catalog", "a", "--peer", "west=nohost"}, "want HOST:PORT"},
		{"bad duration", []string{"--cluster", "east", "--catalog", "a", "--dead-after", "soon"}, "dead-after"},
		{"stray argument", []string{"--cluster", "east", "--catalog", "a", "extra"}, "unexpected arguments"},
		{"missing catalog file", []string{"--cluster", "east", "--catalog", "/nonexistent/c.json"}, "read catalog"},
		{"bad log level", []string{"--cluster", "east", "--catalog", "a", "--log-level", "loud"}, "--log-level"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), tc.args, io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestProcesses runs two gateway processes (this binary's main) with SVIDs
// from real issuers, carries a TCP conversation through them, reads the
// admin state, and stops both with SIGTERM.
func TestProcesses(t *testing.T) {
	doms := gatewaytest.Start(t, []string{"west", "east"}, [][2]string{{"west", "east"}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	west, east := startPair(t, doms, "shop/checkout:80="+ln.Addr().String())
	client, err := gateway.NewClient(doms["west"].Source(t, "web"), doms["west"].ID("gateway"), west.addrs["egress"])
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	var st gateway.State
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + west.addrs["admin"] + "/state")
		if err == nil {
			st = gateway.State{}
			_ = json.NewDecoder(resp.Body).Decode(&st)
			resp.Body.Close()
			if len(st.Clusters) == 1 && st.Clusters[0].Up {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("west never reported east up: %+v, %v", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, tunnel.Request{Cluster: "east", Namespace: "shop", Service: "checkout", Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo %q, %v", buf, err)
	}
	c.Close()
	if _, err := client.Dial(ctx, tunnel.Request{Cluster: "east", Namespace: "shop", Service: "cart", Port: 80}); err == nil || !strings.Contains(err.Error(), "not_exported") {
		t.Errorf("cart: %v, want not_exported", err)
	}

	resp, err := http.Get("http://" + east.addrs["admin"] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `fedmesh_gateway_streams_total{direction="ingress",result="not_exported"} 1`) {
		t.Errorf("east metrics lack the not_exported stream:\n%s", grep(string(body), "fedmesh_gateway_streams_total"))
	}
	for name, ch := range map[string]*child{"west": west, "east": east} {
		if err := ch.terminate(t); err != nil {
			t.Errorf("%s exit after SIGTERM: %v", name, err)
		}
	}
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
