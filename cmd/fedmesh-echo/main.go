// Command fedmesh-echo is the sample workload of the local federation and the
// kind samples: an HTTP server that answers every request with who served it
// (cluster, pod), so a user curling through the mesh sees where traffic went.
// The same port speaks HTTP/2 without TLS and gRPC: the standard health
// service (grpc.health.v1), whose answers carry the cluster and pod in the
// response headers fedmesh-cluster and fedmesh-pod.
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
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

func main() {
	fs := flag.NewFlagSet("fedmesh-echo", flag.ExitOnError)
	addr := fs.String("listen", "127.0.0.1:8080", "HTTP listen address")
	cluster := fs.String("cluster", os.Getenv("FEDMESH_CLUSTER"), "cluster name reported in answers")
	pod := fs.String("pod", os.Getenv("HOSTNAME"), "pod name reported in answers")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "fedmesh-echo answers every HTTP request with JSON naming the cluster and pod that served it,\nand gRPC health checks (grpc.health.v1, HTTP/2 without TLS on the same port) with the\ncluster and pod in the headers fedmesh-cluster and fedmesh-pod.\n\nFlags:")
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
	who := metadata.Pairs("fedmesh-cluster", cluster, "fedmesh-pod", pod)
	gs := grpc.NewServer(
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			_ = grpc.SetHeader(ctx, who)
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			_ = ss.SetHeader(who)
			return h(srv, ss)
		}),
	)
	healthpb.RegisterHealthServer(gs, health.NewServer()) // "" is SERVING
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(answer{Cluster: cluster, Pod: pod, Method: r.Method, Path: r.URL.Path})
	})
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Protocols: &protos, ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
				gs.ServeHTTP(w, r)
				return
			}
			mux.ServeHTTP(w, r)
		})}
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
