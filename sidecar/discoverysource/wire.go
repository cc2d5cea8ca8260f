package discoverysource

// The discovery API's messages (federation/discovery/discoveryv1/
// discovery.proto), encoded and decoded by hand with protowire: the
// generated types would link the protobuf runtime into every sidecar. The
// decoder follows proto3: fields in any order, a scalar given twice keeps
// the last value, repeated fields append, unknown fields are skipped, and
// strings must be UTF-8 (as the generated code checks). A known field with
// another wire type is an error (protobuf-go would keep it as an unknown
// field): this schema has no field whose encoding may legitimately vary,
// so a mismatch means a controller with an incompatible schema, which is
// better refused than read as empty. Nesting is fixed by the schema, so
// there is no recursion to bound.

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/fedmesh/fedmesh/internal/pbwire"
)

// The Discovery service's methods.
const (
	methodWatch          = "/fedmesh.discovery.v1.Discovery/Watch"
	methodWatchDirectory = "/fedmesh.discovery.v1.Discovery/WatchDirectory"
)

// endpointSet is an EndpointSet message.
type endpointSet struct {
	Namespace    string
	Service      string
	LocalCluster string
	Imported     bool
	Ports        []port
	Clusters     []cluster
	Egress       []string
	Version      uint64
	Policy       []byte // JSON of policy.Service; nil when absent
}

// port is a Port message.
type port struct {
	Name        string
	Protocol    string
	Port        int32
	AppProtocol string
}

// cluster is a Cluster message.
type cluster struct {
	Name      string
	Local     bool
	Stale     bool
	Endpoints []endpoint
	Ready     int32
	Total     int32
	RTTMicros int64
}

// endpoint is an Endpoint message.
type endpoint struct {
	Address     string
	Ready       bool
	Serving     bool
	Terminating bool
	Hostname    string
	Zone        string
	Ports       []port
}

// directory is a Directory message.
type directory struct {
	LocalCluster string
	Services     []virtualService
	Version      uint64
}

// virtualService is a VirtualService message.
type virtualService struct {
	Namespace string
	Name      string
	Imported  bool
	IPs       []string
	Ports     []port
}

// appendWatchRequest appends a WatchRequest message to b. Empty fields are
// left out, as proto3 encodes them.
func appendWatchRequest(b []byte, namespace, service string) []byte {
	b = appendString(b, 1, namespace)
	return appendString(b, 2, service)
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// decodeEndpointSet decodes an EndpointSet message.
func decodeEndpointSet(b []byte) (endpointSet, error) {
	var m endpointSet
	err := pbwire.Walk(b, func(f *pbwire.Field) error {
		switch f.Num {
		case 1:
			return f.Str("namespace", &m.Namespace)
		case 2:
			return f.Str("service", &m.Service)
		case 3:
			return f.Str("local_cluster", &m.LocalCluster)
		case 4:
			return f.Bool("imported", &m.Imported)
		case 5:
			return pbwire.AppendMessage(f, "ports", &m.Ports, decodePort)
		case 6:
			return pbwire.AppendMessage(f, "clusters", &m.Clusters, decodeCluster)
		case 7:
			return f.AppendStr("egress", &m.Egress)
		case 8:
			return f.Uint64("version", &m.Version)
		case 9:
			return f.Bytes("policy", &m.Policy)
		}
		return nil
	})
	if err != nil {
		return endpointSet{}, fmt.Errorf("decode EndpointSet: %w", err)
	}
	return m, nil
}

func decodePort(b []byte) (port, error) {
	var m port
	err := pbwire.Walk(b, func(f *pbwire.Field) error {
		switch f.Num {
		case 1:
			return f.Str("name", &m.Name)
		case 2:
			return f.Str("protocol", &m.Protocol)
		case 3:
			return f.Int32("port", &m.Port)
		case 4:
			return f.Str("app_protocol", &m.AppProtocol)
		}
		return nil
	})
	return m, err
}

func decodeCluster(b []byte) (cluster, error) {
	var m cluster
	err := pbwire.Walk(b, func(f *pbwire.Field) error {
		switch f.Num {
		case 1:
			return f.Str("name", &m.Name)
		case 2:
			return f.Bool("local", &m.Local)
		case 3:
			return f.Bool("stale", &m.Stale)
		case 4:
			return pbwire.AppendMessage(f, "endpoints", &m.Endpoints, decodeEndpoint)
		case 5:
			return f.Int32("ready", &m.Ready)
		case 6:
			return f.Int32("total", &m.Total)
		case 7:
			return f.Int64("rtt_micros", &m.RTTMicros)
		}
		return nil
	})
	return m, err
}

func decodeEndpoint(b []byte) (endpoint, error) {
	var m endpoint
	err := pbwire.Walk(b, func(f *pbwire.Field) error {
		switch f.Num {
		case 1:
			return f.Str("address", &m.Address)
		case 2:
			return f.Bool("ready", &m.Ready)
		case 3:
			return f.Bool("serving", &m.Serving)
		case 4:
			return f.Bool("terminating", &m.Terminating)
		case 5:
			return f.Str("hostname", &m.Hostname)
		case 6:
			return f.Str("zone", &m.Zone)
		case 7:
			return pbwire.AppendMessage(f, "ports", &m.Ports, decodePort)
		}
		return nil
	})
	return m, err
}

// decodeDirectory decodes a Directory message.
func decodeDirectory(b []byte) (directory, error) {
	var m directory
	err := pbwire.Walk(b, func(f *pbwire.Field) error {
		switch f.Num {
		case 1:
			return f.Str("local_cluster", &m.LocalCluster)
		case 2:
			return pbwire.AppendMessage(f, "services", &m.Services, decodeVirtualService)
		case 3:
			return f.Uint64("version", &m.Version)
		}
		return nil
	})
	if err != nil {
		return directory{}, fmt.Errorf("decode Directory: %w", err)
	}
	return m, nil
}

func decodeVirtualService(b []byte) (virtualService, error) {
	var m virtualService
	err := pbwire.Walk(b, func(f *pbwire.Field) error {
		switch f.Num {
		case 1:
			return f.Str("namespace", &m.Namespace)
		case 2:
			return f.Str("name", &m.Name)
		case 3:
			return f.Bool("imported", &m.Imported)
		case 4:
			return f.AppendStr("ips", &m.IPs)
		case 5:
			return pbwire.AppendMessage(f, "ports", &m.Ports, decodePort)
		}
		return nil
	})
	return m, err
}
