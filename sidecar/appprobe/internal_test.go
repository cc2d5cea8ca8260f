package appprobe

import (
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

func TestDecodeHealthStatus(t *testing.T) {
	msg := func(fields ...func([]byte) []byte) []byte {
		var b []byte
		for _, f := range fields {
			b = f(b)
		}
		return b
	}
	status := func(v uint64) func([]byte) []byte {
		return func(b []byte) []byte {
			return protowire.AppendVarint(protowire.AppendTag(b, 1, protowire.VarintType), v)
		}
	}
	unknown := func(b []byte) []byte {
		return protowire.AppendString(protowire.AppendTag(b, 7, protowire.BytesType), "future")
	}
	for _, tc := range []struct {
		name    string
		in      []byte
		want    uint64
		wantErr bool
	}{
		{name: "empty is UNKNOWN", in: nil, want: 0},
		{name: "serving", in: msg(status(1)), want: 1},
		{name: "not serving after an unknown field", in: msg(unknown, status(2)), want: 2},
		{name: "last status wins", in: msg(status(2), status(1)), want: 1},
		{name: "truncated varint", in: []byte{0x08, 0x80}, wantErr: true},
		{name: "truncated field", in: []byte{0x3a, 0x05, 'a'}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := decodeHealthStatus(tc.in)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("decode %x: %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.wantErr)
			}
		})
	}
}

// FuzzDecodeHealthStatus: any bytes from the app decode or fail, never
// panic.
func FuzzDecodeHealthStatus(f *testing.F) {
	f.Add([]byte{0x08, 0x01})
	f.Add([]byte{0x3a, 0x01, 'x', 0x08, 0x02})
	f.Add([]byte{0x08, 0x80})
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = decodeHealthStatus(b) })
}
