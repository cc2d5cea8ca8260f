package discoverysource

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/fedmesh/fedmesh/federation/discovery/discoveryv1"

	"github.com/fedmesh/fedmesh/internal/pbwire"
)

// The codec is checked against protobuf-go and the generated types: the
// controller marshals with them.

// setFromPB is what decodeEndpointSet must make of m's encoding.
func setFromPB(m *pb.EndpointSet) endpointSet {
	out := endpointSet{Namespace: m.Namespace, Service: m.Service, LocalCluster: m.LocalCluster, Imported: m.Imported,
		Ports: portsFromPB(m.Ports), Egress: nilIfEmpty(m.Egress), Version: m.Version}
	if len(m.Policy) > 0 {
		out.Policy = bytes.Clone(m.Policy)
	}
	for _, c := range m.Clusters {
		oc := cluster{Name: c.Name, Local: c.Local, Stale: c.Stale, Ready: c.Ready, Total: c.Total, RTTMicros: c.RttMicros}
		for _, e := range c.Endpoints {
			oc.Endpoints = append(oc.Endpoints, endpoint{Address: e.Address, Ready: e.Ready, Serving: e.Serving,
				Terminating: e.Terminating, Hostname: e.Hostname, Zone: e.Zone, Ports: portsFromPB(e.Ports)})
		}
		out.Clusters = append(out.Clusters, oc)
	}
	return out
}

// dirFromPB is what decodeDirectory must make of m's encoding.
func dirFromPB(m *pb.Directory) directory {
	out := directory{LocalCluster: m.LocalCluster, Version: m.Version}
	for _, vs := range m.Services {
		out.Services = append(out.Services, virtualService{Namespace: vs.Namespace, Name: vs.Name, Imported: vs.Imported,
			IPs: nilIfEmpty(vs.Ips), Ports: portsFromPB(vs.Ports)})
	}
	return out
}

func portsFromPB(ps []*pb.Port) []port {
	var out []port
	for _, p := range ps {
		out = append(out, port{Name: p.Name, Protocol: p.Protocol, Port: p.Port, AppProtocol: p.AppProtocol})
	}
	return out
}

func nilIfEmpty(s []string) []string {
	if len(s) == 0 {
		return nil
	}
	return s
}

// gen makes random messages, every field set or left empty at random, with
// random unknown fields (of every wire type) at every level.
type gen struct{ r *rand.Rand }

func (g gen) n(max int) int { return g.r.IntN(max + 1) }

func (g gen) str() string {
	if g.n(3) == 0 {
		return ""
	}
	parts := []string{"a", "z", "-", ".", "10.0.0.1", "fd00::7", "é", "日本", "🙂", "\x00", " "}
	var b strings.Builder
	for range 1 + g.n(6) {
		b.WriteString(parts[g.r.IntN(len(parts))])
	}
	return b.String()
}

func (g gen) strs() []string {
	var out []string
	for range g.n(3) {
		out = append(out, g.str()) // empty elements are kept: repeated fields have no presence
	}
	return out
}

func (g gen) bool() bool { return g.r.IntN(2) == 0 }

func (g gen) i32() int32 {
	switch g.n(3) {
	case 0:
		return 0
	case 1:
		return int32(g.r.IntN(65536))
	case 2:
		return -int32(g.r.IntN(1 << 31)) // ten-byte varints
	}
	return int32(g.r.Uint32())
}

func (g gen) u64() uint64 {
	if g.bool() {
		return uint64(g.r.IntN(1000))
	}
	return g.r.Uint64()
}

// unknown gives m unknown fields, numbered past every known one.
func (g gen) unknown(m proto.Message) {
	if g.n(3) != 0 {
		return
	}
	var b []byte
	for range 1 + g.n(2) {
		num := protowire.Number(10 + g.r.IntN(5000))
		switch g.r.IntN(5) {
		case 0:
			b = protowire.AppendTag(b, num, protowire.VarintType)
			b = protowire.AppendVarint(b, g.r.Uint64())
		case 1:
			b = protowire.AppendTag(b, num, protowire.Fixed32Type)
			b = protowire.AppendFixed32(b, g.r.Uint32())
		case 2:
			b = protowire.AppendTag(b, num, protowire.Fixed64Type)
			b = protowire.AppendFixed64(b, g.r.Uint64())
		case 3:
			b = protowire.AppendTag(b, num, protowire.BytesType)
			b = protowire.AppendString(b, g.str())
		case 4:
			b = protowire.AppendTag(b, num, protowire.StartGroupType)
			b = protowire.AppendTag(b, 1, protowire.VarintType)
			b = protowire.AppendVarint(b, g.r.Uint64())
			b = protowire.AppendTag(b, num, protowire.EndGroupType)
		}
	}
	m.ProtoReflect().SetUnknown(protoreflect.RawFields(b))
}

func (g gen) ports() []*pb.Port {
	var out []*pb.Port
	for range g.n(3) {
		p := &pb.Port{Name: g.str(), Protocol: g.str(), Port: g.i32(), AppProtocol: g.str()}
		g.unknown(p)
		out = append(out, p)
	}
	return out
}

func (g gen) endpointSet() *pb.EndpointSet {
	m := &pb.EndpointSet{Namespace: g.str(), Service: g.str(), LocalCluster: g.str(), Imported: g.bool(),
		Ports: g.ports(), Egress: g.strs(), Version: g.u64()}
	if g.bool() {
		m.Policy = []byte(g.str())
	}
	for range g.n(3) {
		c := &pb.Cluster{Name: g.str(), Local: g.bool(), Stale: g.bool(), Ready: g.i32(), Total: g.i32(), RttMicros: int64(g.u64())}
		for range g.n(4) {
			e := &pb.Endpoint{Address: g.str(), Ready: g.bool(), Serving: g.bool(), Terminating: g.bool(),
				Hostname: g.str(), Zone: g.str(), Ports: g.ports()}
			g.unknown(e)
			c.Endpoints = append(c.Endpoints, e)
		}
		g.unknown(c)
		m.Clusters = append(m.Clusters, c)
	}
	g.unknown(m)
	return m
}

func (g gen) directory() *pb.Directory {
	m := &pb.Directory{LocalCluster: g.str(), Version: g.u64()}
	for range g.n(4) {
		vs := &pb.VirtualService{Namespace: g.str(), Name: g.str(), Imported: g.bool(), Ips: g.strs(), Ports: g.ports()}
		g.unknown(vs)
		m.Services = append(m.Services, vs)
	}
	g.unknown(m)
	return m
}

func newGen(t *testing.T) gen {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	return gen{rand.New(rand.NewPCG(seed, seed))}
}

func marshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDecodeEndpointSetRoundTrip: random sets marshaled by protobuf-go
// decode to the same values, field by field. Every fourth input is two
// messages concatenated, which proto defines as their merge: the second's
// scalars win, repeated fields append.
func TestDecodeEndpointSetRoundTrip(t *testing.T) {
	g := newGen(t)
	for i := range 3000 {
		in := g.endpointSet()
		b := marshal(t, in)
		if i%4 == 3 {
			second := g.endpointSet()
			b = append(b, marshal(t, second)...)
			proto.Merge(in, second)
		}
		got, err := decodeEndpointSet(b)
		if err != nil {
			t.Fatalf("input %d: %v\n%v", i, err, in)
		}
		if diff := cmp.Diff(setFromPB(in), got); diff != "" {
			t.Fatalf("input %d (-want +got):\n%s", i, diff)
		}
	}
}

// TestDecodeDirectoryRoundTrip is TestDecodeEndpointSetRoundTrip for
// directories.
func TestDecodeDirectoryRoundTrip(t *testing.T) {
	g := newGen(t)
	for i := range 3000 {
		in := g.directory()
		b := marshal(t, in)
		if i%4 == 3 {
			second := g.directory()
			b = append(b, marshal(t, second)...)
			proto.Merge(in, second)
		}
		got, err := decodeDirectory(b)
		if err != nil {
			t.Fatalf("input %d: %v\n%v", i, err, in)
		}
		if diff := cmp.Diff(dirFromPB(in), got); diff != "" {
			t.Fatalf("input %d (-want +got):\n%s", i, diff)
		}
	}
}

func TestAppendWatchRequest(t *testing.T) {
	for _, tc := range []struct{ name, ns, svc string }{
		{"both", "demo", "echo"},
		{"no namespace", "", "echo"},
		{"empty", "", ""},
		{"unicode", "日本", "é🙂"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := appendWatchRequest(nil, tc.ns, tc.svc)
			want := marshal(t, &pb.WatchRequest{Namespace: tc.ns, Service: tc.svc})
			if !bytes.Equal(got, want) {
				t.Errorf("encoded %x, protobuf-go %x", got, want)
			}
			var back pb.WatchRequest
			if err := proto.Unmarshal(got, &back); err != nil || back.Namespace != tc.ns || back.Service != tc.svc {
				t.Errorf("decoded by protobuf-go: %v, %v", &back, err)
			}
		})
	}
}

// TestDecodeSkipsUnknownFields: fields of every wire type with numbers the
// schema does not know, before, between and after known ones and inside
// nested messages, are skipped.
func TestDecodeSkipsUnknownFields(t *testing.T) {
	unknowns := func(num protowire.Number) []byte {
		var b []byte
		b = protowire.AppendTag(b, num, protowire.VarintType)
		b = protowire.AppendVarint(b, 1<<63)
		b = protowire.AppendTag(b, num+1, protowire.Fixed32Type)
		b = protowire.AppendFixed32(b, 7)
		b = protowire.AppendTag(b, num+2, protowire.Fixed64Type)
		b = protowire.AppendFixed64(b, 7)
		b = protowire.AppendTag(b, num+3, protowire.BytesType)
		b = protowire.AppendBytes(b, []byte("a new field"))
		b = protowire.AppendTag(b, num+4, protowire.StartGroupType)
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, "in a group")
		b = protowire.AppendTag(b, num+4, protowire.EndGroupType)
		return b
	}
	// An endpoint's port with unknown fields around its known ones.
	var portMsg []byte
	portMsg = append(portMsg, unknowns(100)...)
	portMsg = append(portMsg, marshal(t, &pb.Port{Name: "http", Port: 8080})...)
	portMsg = append(portMsg, unknowns(200)...)
	var ep []byte
	ep = append(ep, marshal(t, &pb.Endpoint{Address: "10.0.0.1", Ready: true})...)
	ep = append(ep, unknowns(8)...)
	ep = protowire.AppendTag(ep, 7, protowire.BytesType)
	ep = protowire.AppendBytes(ep, portMsg)
	var cl []byte
	cl = append(cl, unknowns(1000)...)
	cl = append(cl, marshal(t, &pb.Cluster{Name: "east", Local: true})...)
	cl = protowire.AppendTag(cl, 4, protowire.BytesType)
	cl = protowire.AppendBytes(cl, ep)

	var b []byte
	b = append(b, unknowns(10)...)
	b = append(b, marshal(t, &pb.EndpointSet{Namespace: "demo", Service: "echo", Version: 3})...)
	b = append(b, unknowns(1<<20)...)
	b = protowire.AppendTag(b, 6, protowire.BytesType)
	b = protowire.AppendBytes(b, cl)
	b = append(b, unknowns(protowire.MaxValidNumber-4)...)

	want := endpointSet{Namespace: "demo", Service: "echo", Version: 3, Clusters: []cluster{{Name: "east", Local: true,
		Endpoints: []endpoint{{Address: "10.0.0.1", Ready: true, Ports: []port{{Name: "http", Port: 8080}}}}}}}
	got, err := decodeEndpointSet(b)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	// The same bytes are a valid message to protobuf-go.
	var m pb.EndpointSet
	if err := proto.Unmarshal(b, &m); err != nil {
		t.Fatalf("protobuf-go: %v", err)
	}
	if diff := cmp.Diff(want, setFromPB(&m)); diff != "" {
		t.Errorf("protobuf-go (-want +got):\n%s", diff)
	}
}

func TestDecodeErrors(t *testing.T) {
	tag := func(num protowire.Number, typ protowire.Type) []byte { return protowire.AppendTag(nil, num, typ) }
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	lenPrefixed := func(b []byte) []byte { return protowire.AppendBytes(nil, b) }
	endpointIn := func(e []byte) []byte { // a set with one cluster with endpoint e
		return cat(tag(6, protowire.BytesType), lenPrefixed(cat(tag(4, protowire.BytesType), lenPrefixed(e))))
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want string
		is   error
	}{
		{"truncated varint", cat(tag(8, protowire.VarintType), []byte{0x80, 0x80}),
			"decode EndpointSet: version: message truncated", pbwire.ErrTruncated},
		{"truncated length", cat(tag(1, protowire.BytesType), []byte{10, 'a', 'b'}),
			"decode EndpointSet: namespace: message truncated", pbwire.ErrTruncated},
		{"truncated tag", []byte{0x80},
			"decode EndpointSet: field tag: message truncated", pbwire.ErrTruncated},
		{"truncated inside an endpoint", endpointIn(cat(tag(1, protowire.BytesType), []byte{5, '1', '0'})),
			"decode EndpointSet: clusters[0]: endpoints[0]: address: message truncated", pbwire.ErrTruncated},
		{"truncated unknown field", cat(tag(99, protowire.Fixed64Type), []byte{1, 2, 3}),
			"decode EndpointSet: unknown field 99: message truncated", pbwire.ErrTruncated},
		{"unterminated group", cat(tag(99, protowire.StartGroupType), tag(1, protowire.VarintType), []byte{1}),
			"decode EndpointSet: unknown field 99: message truncated", pbwire.ErrTruncated},
		{"string as varint", cat(tag(1, protowire.VarintType), []byte{1}),
			"decode EndpointSet: namespace (field 1): wire type varint, want length-delimited", pbwire.ErrWireType},
		{"bool as bytes", endpointIn(cat(tag(2, protowire.BytesType), lenPrefixed([]byte{1}))),
			"decode EndpointSet: clusters[0]: endpoints[0]: ready (field 2): wire type length-delimited, want varint", pbwire.ErrWireType},
		{"message as fixed32", cat(tag(5, protowire.Fixed32Type), []byte{1, 2, 3, 4}),
			"decode EndpointSet: ports (field 5): wire type fixed32, want length-delimited", pbwire.ErrWireType},
		{"known field as group", cat(tag(6, protowire.StartGroupType), tag(6, protowire.EndGroupType)),
			"decode EndpointSet: clusters (field 6): wire type start group, want length-delimited", pbwire.ErrWireType},
		{"invalid UTF-8", cat(tag(7, protowire.BytesType), lenPrefixed([]byte{0xff, 'x'})),
			"decode EndpointSet: egress: invalid UTF-8", nil},
		{"field number 0", []byte{0x02, 0},
			"decode EndpointSet: field tag: invalid field number", nil},
		{"field number too large", cat(tag(protowire.MaxValidNumber+1, protowire.VarintType), []byte{0}),
			"decode EndpointSet: field tag: invalid field number 536870912", nil},
		{"stray end group", tag(99, protowire.EndGroupType),
			"decode EndpointSet: unknown field 99: mismatching end group marker", nil},
		{"varint overflow", cat(tag(8, protowire.VarintType), bytes.Repeat([]byte{0xff}, 11)),
			"decode EndpointSet: version: variable length integer overflow", nil},
		{"reserved wire type", tag(99, 6),
			"decode EndpointSet: unknown field 99: cannot parse reserved wire type", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeEndpointSet(tc.in)
			if err == nil {
				t.Fatalf("decoded %x", tc.in)
			}
			if err.Error() != tc.want {
				t.Errorf("error %q\n          want %q", err, tc.want)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %q is not %q", err, tc.is)
			}
		})
	}
}

// TestDecodePrefixes: every prefix of a valid message decodes, or fails as
// truncated (a cut between two fields is a valid, shorter message).
func TestDecodePrefixes(t *testing.T) {
	g := newGen(t)
	for range 20 {
		b := marshal(t, g.endpointSet())
		for i := range len(b) {
			if _, err := decodeEndpointSet(b[:i]); err != nil && !errors.Is(err, pbwire.ErrTruncated) {
				t.Fatalf("prefix %d of %x: %v, want a truncation", i, b, err)
			}
		}
		d := marshal(t, g.directory())
		for i := range len(d) {
			if _, err := decodeDirectory(d[:i]); err != nil && !errors.Is(err, pbwire.ErrTruncated) {
				t.Fatalf("prefix %d of %x: %v, want a truncation", i, d, err)
			}
		}
	}
}

// fuzzSeeds are valid messages and wreckage of them.
func fuzzSeeds(f *testing.F, msgs ...proto.Message) {
	f.Add([]byte{})
	f.Add([]byte{0x80})
	f.Add([]byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f})
	for _, m := range msgs {
		b := marshal(f, m)
		f.Add(b)
		f.Add(b[:len(b)/2])
		f.Add(append(bytes.Clone(b), b...))
	}
}

// checkAgainstProto holds our decoder to protobuf-go's on input b: the
// same values when both accept, and a refusal only where protobuf-go also
// refuses, except a known field of the wrong wire type (which protobuf-go
// keeps as an unknown field).
func checkAgainstProto[T any](t *testing.T, b []byte, got T, err error, m proto.Message, want func() T) {
	perr := proto.Unmarshal(b, m)
	switch {
	case err == nil && perr != nil:
		t.Fatalf("accepted what protobuf-go refuses (%v): %+v", perr, got)
	case err == nil:
		if diff := cmp.Diff(want(), got); diff != "" {
			t.Fatalf("(-protobuf-go +ours):\n%s", diff)
		}
	case perr == nil && !errors.Is(err, pbwire.ErrWireType):
		t.Fatalf("refused what protobuf-go accepts: %v", err)
	case !strings.HasPrefix(err.Error(), "decode "):
		t.Fatalf("error does not say what failed: %v", err)
	}
}

func FuzzDecodeEndpointSet(f *testing.F) {
	g := gen{rand.New(rand.NewPCG(1, 2))}
	fuzzSeeds(f, g.endpointSet(), g.endpointSet(), g.endpointSet(), &pb.EndpointSet{Namespace: "demo", Service: "echo",
		Ports:    []*pb.Port{{Name: "http", Port: 80}},
		Clusters: []*pb.Cluster{{Name: "east", Local: true, Endpoints: []*pb.Endpoint{{Address: "10.0.0.1", Ready: true, Ports: []*pb.Port{{Name: "http", Port: 8080}}}}}},
		Policy:   []byte(`{"rules":[]}`)})
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeEndpointSet(b)
		var m pb.EndpointSet
		checkAgainstProto(t, b, got, err, &m, func() endpointSet { return setFromPB(&m) })
	})
}

func FuzzDecodeDirectory(f *testing.F) {
	g := gen{rand.New(rand.NewPCG(3, 4))}
	fuzzSeeds(f, g.directory(), g.directory(), &pb.Directory{LocalCluster: "east", Version: 1, Services: []*pb.VirtualService{
		{Namespace: "demo", Name: "echo", Imported: true, Ips: []string{"10.97.0.1"}, Ports: []*pb.Port{{Name: "http", Port: 80}}}}})
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeDirectory(b)
		var m pb.Directory
		checkAgainstProto(t, b, got, err, &m, func() directory { return dirFromPB(&m) })
	})
}
