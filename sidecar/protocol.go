package sidecar

import "strings"

func validProtocol(p string) bool {
	switch p {
	case ProtocolHTTP, ProtocolHTTP2, ProtocolGRPC, ProtocolTCP:
		return true
	}
	return false
}

// ProtocolFor picks a service port's protocol the way Kubernetes users
// declare it: the port's appProtocol first (IANA names, and the
// kubernetes.io/h2c and kubernetes.io/ws standard values), then the port
// name's prefix before a dash ("grpc-api", "http2", "http-web", "tcp-db",
// Istio's convention). HTTP/1.1 (with HTTP/2 prior knowledge detected per
// connection) is the default when neither says anything we know, since it
// still carries opaque TCP badly but fails loudly; a port that must be
// opaque should say tcp.
func ProtocolFor(appProtocol, portName string) string {
	if p := protocolName(appProtocol); p != "" {
		return p
	}
	name, _, _ := strings.Cut(strings.ToLower(portName), "-")
	if p := protocolName(name); p != "" {
		return p
	}
	return ProtocolHTTP
}

func protocolName(s string) string {
	switch strings.ToLower(s) {
	case "grpc":
		return ProtocolGRPC
	case "http2", "h2c", "kubernetes.io/h2c":
		return ProtocolHTTP2
	case "http", "grpc-web", "kubernetes.io/ws":
		return ProtocolHTTP
	case "tcp", "tls", "https", "kubernetes.io/wss", "mongo", "mysql", "redis", "postgres", "postgresql":
		return ProtocolTCP
	}
	return ""
}
