// Command fedmesh-echo is the sample workload of the local federation and the
// kind samples: an HTTP server that answers every request with who served it
// (cluster, pod), so a user curling through the mesh sees where traffic went.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	fs := flag.NewFlagSet("fedmesh-echo", flag.ExitOnError)
	addr := fs.String("listen", "127.0.0.1:8080", "HTTP listen address")
	cluster := fs.String("cluster", os.Getenv("FEDMESH_CLUSTER"), "cluster name reported in answers")
	pod := fs.String("pod", os.Getenv("HOSTNAME"), "pod name reported in answers")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "fedmesh-echo answers every HTTP request with JSON naming the cluster and pod that served it.\n\nFlags:")
		fs.PrintDefaults()
	}
	fs.Parse(os.Args[1:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *addr, *cluster, *pod); err != nil {
		fmt.Fprintln(os.Stderr, "fedmesh-echo:", err)
		os.Exit(1)
	}
}

type answer struct {
	Cluster string `json:"cluster"`
	Pod     string `json:"pod"`
	Method  string `json:"method"`
	Path    string `json:"path"`
}

func run(ctx context.Context, addr, cluster, pod string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(answer{Cluster: cluster, Pod: pod, Method: r.Method, Path: r.URL.Path})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	fmt.Printf("serving %s\n", ln.Addr())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
