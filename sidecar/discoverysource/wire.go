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
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
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
	err := walk(b, func(f *field) error {
		switch f.num {
		case 1:
			return f.string("namespace", &m.Namespace)
		case 2:
			return f.string("service", &m.Service)
		case 3:
			return f.string("local_cluster", &m.LocalCluster)
		case 4:
			return f.bool("imported", &m.Imported)
		case 5:
			return appendMessage(f, "ports", &m.Ports, decodePort)
		case 6:
			return appendMessage(f, "clusters", &m.Clusters, decodeCluster)
		case 7:
			return f.appendString("egress", &m.Egress)
		case 8:
			return f.uint64("version", &m.Version)
		case 9:
			return f.bytes("policy", &m.Policy)
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
	err := walk(b, func(f *field) error {
		switch f.num {
		case 1:
			return f.string("name", &m.Name)
		case 2:
			return f.string("protocol", &m.Protocol)
		case 3:
			return f.int32("port", &m.Port)
		case 4:
			return f.string("app_protocol", &m.AppProtocol)
		}
		return nil
	})
	return m, err
}

func decodeCluster(b []byte) (cluster, error) {
	var m cluster
	err := walk(b, func(f *field) error {
		switch f.num {
		case 1:
			return f.string("name", &m.Name)
		case 2:
			return f.bool("local", &m.Local)
		case 3:
			return f.bool("stale", &m.Stale)
		case 4:
			return appendMessage(f, "endpoints", &m.Endpoints, decodeEndpoint)
		case 5:
			return f.int32("ready", &m.Ready)
		case 6:
			return f.int32("total", &m.Total)
		case 7:
			return f.int64("rtt_micros", &m.RTTMicros)
		}
		return nil
	})
	return m, err
}

func decodeEndpoint(b []byte) (endpoint, error) {
	var m endpoint
	err := walk(b, func(f *field) error {
		switch f.num {
		case 1:
			return f.string("address", &m.Address)
		case 2:
			return f.bool("ready", &m.Ready)
		case 3:
			return f.bool("serving", &m.Serving)
		case 4:
			return f.bool("terminating", &m.Terminating)
		case 5:
			return f.string("hostname", &m.Hostname)
		case 6:
			return f.string("zone", &m.Zone)
		case 7:
			return appendMessage(f, "ports", &m.Ports, decodePort)
		}
		return nil
	})
	return m, err
}

// decodeDirectory decodes a Directory message.
func decodeDirectory(b []byte) (directory, error) {
	var m directory
	err := walk(b, func(f *field) error {
		switch f.num {
		case 1:
			return f.string("local_cluster", &m.LocalCluster)
		case 2:
			return appendMessage(f, "services", &m.Services, decodeVirtualService)
		case 3:
			return f.uint64("version", &m.Version)
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
	err := walk(b, func(f *field) error {
		switch f.num {
		case 1:
			return f.string("namespace", &m.Namespace)
		case 2:
			return f.string("name", &m.Name)
		case 3:
			return f.bool("imported", &m.Imported)
		case 4:
			return f.appendString("ips", &m.IPs)
		case 5:
			return appendMessage(f, "ports", &m.Ports, decodePort)
		}
		return nil
	})
	return m, err
}

// field is the field of a message that walk is at: its number, its wire
// type, and the message from its value on. A decode method reads the value
// into its destination and sets n to the value's length; a field no method
// read is unknown and skipped.
type field struct {
	num protowire.Number
	typ protowire.Type
	b   []byte
	n   int
}

// walk calls fn for each field of message b in turn.
func walk(b []byte, fn func(*field) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("field tag: %w", parseError(n))
		}
		if num > protowire.MaxValidNumber { // ConsumeTag checks only the lower bound
			return fmt.Errorf("field tag: invalid field number %d", num)
		}
		f := field{num: num, typ: typ, b: b[n:], n: -1}
		if err := fn(&f); err != nil {
			return err
		}
		if f.n < 0 {
			if f.n = protowire.ConsumeFieldValue(num, typ, f.b); f.n < 0 {
				return fmt.Errorf("unknown field %d: %w", num, parseError(f.n))
			}
		}
		b = f.b[f.n:]
	}
	return nil
}

func (f *field) varint(name string) (uint64, error) {
	if err := f.want(name, protowire.VarintType); err != nil {
		return 0, err
	}
	v, n := protowire.ConsumeVarint(f.b)
	if n < 0 {
		return 0, fmt.Errorf("%s: %w", name, parseError(n))
	}
	f.n = n
	return v, nil
}

func (f *field) bool(name string, dst *bool) error {
	v, err := f.varint(name)
	*dst = v != 0
	return err
}

// int32 reads an int32, which proto3 sends as the varint of its sign
// extension to 64 bits; like protobuf-go it keeps the low 32 bits of
// whatever arrives.
func (f *field) int32(name string, dst *int32) error {
	v, err := f.varint(name)
	*dst = int32(v)
	return err
}

func (f *field) int64(name string, dst *int64) error {
	v, err := f.varint(name)
	*dst = int64(v)
	return err
}

func (f *field) uint64(name string, dst *uint64) error {
	v, err := f.varint(name)
	*dst = v
	return err
}

// value is the content of a length-delimited field: it aliases the message.
func (f *field) value(name string) ([]byte, error) {
	if err := f.want(name, protowire.BytesType); err != nil {
		return nil, err
	}
	v, n := protowire.ConsumeBytes(f.b)
	if n < 0 {
		return nil, fmt.Errorf("%s: %w", name, parseError(n))
	}
	f.n = n
	return v, nil
}

func (f *field) string(name string, dst *string) error {
	v, err := f.value(name)
	if err != nil {
		return err
	}
	if !utf8.Valid(v) {
		return fmt.Errorf("%s: invalid UTF-8", name)
	}
	*dst = string(v)
	return nil
}

func (f *field) appendString(name string, dst *[]string) error {
	var s string
	if err := f.string(name, &s); err != nil {
		return err
	}
	*dst = append(*dst, s)
	return nil
}

// bytes copies the value, so the message it came in is not kept alive.
func (f *field) bytes(name string, dst *[]byte) error {
	v, err := f.value(name)
	if err != nil {
		return err
	}
	*dst = nil
	if len(v) > 0 {
		*dst = append([]byte(nil), v...)
	}
	return nil
}

func appendMessage[T any](f *field, name string, dst *[]T, decode func([]byte) (T, error)) error {
	v, err := f.value(name)
	if err != nil {
		return err
	}
	m, err := decode(v)
	if err != nil {
		return fmt.Errorf("%s[%d]: %w", name, len(*dst), err)
	}
	*dst = append(*dst, m)
	return nil
}

func (f *field) want(name string, typ protowire.Type) error {
	if f.typ != typ {
		return fmt.Errorf("%s (field %d): %w %s, want %s", name, f.num, errWireType, wireType(f.typ), wireType(typ))
	}
	return nil
}

func wireType(t protowire.Type) string {
	switch t {
	case protowire.VarintType:
		return "varint"
	case protowire.Fixed32Type:
		return "fixed32"
	case protowire.Fixed64Type:
		return "fixed64"
	case protowire.BytesType:
		return "length-delimited"
	case protowire.StartGroupType:
		return "start group"
	case protowire.EndGroupType:
		return "end group"
	}
	return fmt.Sprintf("%d", t)
}

var (
	// errTruncated is a message that ends inside a field.
	errTruncated = errors.New("message truncated")
	// errWireType is a known field encoded as another type than its own.
	errWireType = errors.New("wire type")
)

// parseError is protowire's error for a negative length n: its
// io.ErrUnexpectedEOF said as what it means here, any other without
// protobuf-go's "proto:" prefix (whose space varies from build to build,
// so that nobody matches the text).
func parseError(n int) error {
	err := protowire.ParseError(n)
	if err == io.ErrUnexpectedEOF {
		return errTruncated
	}
	return errors.New(strings.TrimLeft(strings.TrimPrefix(err.Error(), "proto:"), " \u00a0"))
}
