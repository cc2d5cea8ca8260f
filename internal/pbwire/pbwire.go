// Package pbwire decodes protobuf messages by hand, over protowire: a
// message is walked field by field and each known field is read into its
// destination with a check of its wire type; unknown fields are skipped.
// It exists so that the sidecar can read the discovery API and the
// Workload API without the protobuf runtime (see internal/grpclite). Errors
// name the field; a message that ends inside a field is ErrTruncated, a
// known field with another wire type ErrWireType.
package pbwire

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// Field is the field of a message that Walk is at: its number, its wire
// type, and the message from its value on. A decode method reads the value
// into its destination and sets n to the value's length; a field no method
// read is unknown and skipped.
type Field struct {
	Num protowire.Number
	typ protowire.Type
	b   []byte
	n   int
}

// Walk calls fn for each field of message b in turn.
func Walk(b []byte, fn func(*Field) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("field tag: %w", parseError(n))
		}
		if num > protowire.MaxValidNumber { // ConsumeTag checks only the lower bound
			return fmt.Errorf("field tag: invalid field number %d", num)
		}
		f := Field{Num: num, typ: typ, b: b[n:], n: -1}
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

func (f *Field) varint(name string) (uint64, error) {
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

func (f *Field) Bool(name string, dst *bool) error {
	v, err := f.varint(name)
	*dst = v != 0
	return err
}

// Int32 reads an int32, which proto3 sends as the varint of its sign
// extension to 64 bits; like protobuf-go it keeps the low 32 bits of
// whatever arrives.
func (f *Field) Int32(name string, dst *int32) error {
	v, err := f.varint(name)
	*dst = int32(v)
	return err
}

func (f *Field) Int64(name string, dst *int64) error {
	v, err := f.varint(name)
	*dst = int64(v)
	return err
}

func (f *Field) Uint64(name string, dst *uint64) error {
	v, err := f.varint(name)
	*dst = v
	return err
}

// Value is the content of a length-delimited field: it aliases the message.
func (f *Field) Value(name string) ([]byte, error) {
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

func (f *Field) Str(name string, dst *string) error {
	v, err := f.Value(name)
	if err != nil {
		return err
	}
	if !utf8.Valid(v) {
		return fmt.Errorf("%s: invalid UTF-8", name)
	}
	*dst = string(v)
	return nil
}

func (f *Field) AppendStr(name string, dst *[]string) error {
	var s string
	if err := f.Str(name, &s); err != nil {
		return err
	}
	*dst = append(*dst, s)
	return nil
}

// Bytes copies the value, so the message it came in is not kept alive.
func (f *Field) Bytes(name string, dst *[]byte) error {
	v, err := f.Value(name)
	if err != nil {
		return err
	}
	*dst = nil
	if len(v) > 0 {
		*dst = append([]byte(nil), v...)
	}
	return nil
}

func AppendMessage[T any](f *Field, name string, dst *[]T, decode func([]byte) (T, error)) error {
	v, err := f.Value(name)
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

func (f *Field) want(name string, typ protowire.Type) error {
	if f.typ != typ {
		return fmt.Errorf("%s (field %d): %w %s, want %s", name, f.Num, ErrWireType, wireType(f.typ), wireType(typ))
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
	// ErrTruncated is a message that ends inside a field.
	ErrTruncated = errors.New("message truncated")
	// ErrWireType is a known field encoded as another type than its own.
	ErrWireType = errors.New("wire type")
)

// parseError is protowire's error for a negative length n: its
// io.ErrUnexpectedEOF said as what it means here, any other without
// protobuf-go's "proto:" prefix (whose space varies from build to build,
// so that nobody matches the text).
func parseError(n int) error {
	err := protowire.ParseError(n)
	if err == io.ErrUnexpectedEOF {
		return ErrTruncated
	}
	return errors.New(strings.TrimLeft(strings.TrimPrefix(err.Error(), "proto:"), " \u00a0"))
}
