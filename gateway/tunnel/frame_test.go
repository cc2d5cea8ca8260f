package tunnel

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

// TestFrames: what a FrameWriter writes, a FrameReader returns, in any
// read size, ending with io.EOF at the end frame; a stream cut before it
// is a truncation.
func TestFrames(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789abcdef"), 5000) // several frames
	var wire bytes.Buffer
	fw := FrameWriter{W: &wire}
	if n, err := fw.Write(payload); err != nil || n != len(payload) {
		t.Fatalf("write: %d, %v", n, err)
	}
	if err := fw.End(); err != nil || !fw.Clean() {
		t.Fatalf("end: %v", err)
	}
	if _, err := fw.Write([]byte("x")); !errors.Is(err, errEnded) {
		t.Fatalf("write after the end: %v", err)
	}
	for _, size := range []int{1, 7, 1 << 14, 1 << 16} {
		fr := FrameReader{R: bytes.NewReader(wire.Bytes())}
		got, err := readAllSized(&fr, size)
		if err != nil || !bytes.Equal(got, payload) || !fr.ended {
			t.Fatalf("read size %d: %d bytes, %v, ended %v", size, len(got), err, fr.ended)
		}
	}
	cut := wire.Bytes()[:wire.Len()-2] // no end frame
	fr := FrameReader{R: bytes.NewReader(cut)}
	if _, err := readAllSized(&fr, 4096); !errors.Is(err, ErrTruncated) {
		t.Fatalf("cut stream: %v, want a truncation", err)
	}
}

// TestFramePrefix: a prefix goes with the first frame, or the end frame,
// or alone on Flush, in one Write, and only once.
func TestFramePrefix(t *testing.T) {
	for _, tc := range []struct {
		name  string
		do    func(*FrameWriter) error
		wires []string
	}{
		{"first frame", func(f *FrameWriter) error {
			if _, err := f.Write([]byte("ab")); err != nil {
				return err
			}
			_, err := f.Write([]byte("c"))
			return err
		}, []string{"HDR\x00\x02ab", "\x00\x01c"}},
		{"end", func(f *FrameWriter) error { return f.End() }, []string{"HDR\x00\x00"}},
		{"flush", func(f *FrameWriter) error {
			if err := f.Flush(); err != nil {
				return err
			}
			return f.Flush()
		}, []string{"HDR"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var w writes
			f := &FrameWriter{W: &w}
			f.Prefix([]byte("HDR"))
			if err := tc.do(f); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, b := range w {
				got = append(got, string(b))
			}
			if strings.Join(got, "|") != strings.Join(tc.wires, "|") {
				t.Errorf("writes %q, want %q", got, tc.wires)
			}
		})
	}
}

// writes records each Write.
type writes [][]byte

func (w *writes) Write(p []byte) (int, error) {
	*w = append(*w, bytes.Clone(p))
	return len(p), nil
}

func readAllSized(r io.Reader, size int) ([]byte, error) {
	var out []byte
	buf := make([]byte, size)
	for {
		n, err := r.Read(buf)
		out = append(out, buf[:n]...)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
	}
}

// FuzzFrameReader: any byte stream either yields payload bytes up to an end
// frame, or fails; it never panics and never returns more bytes than the
// stream holds.
func FuzzFrameReader(f *testing.F) {
	f.Add([]byte{0, 3, 'a', 'b', 'c', 0, 0})
	f.Add([]byte{0, 0})
	f.Add([]byte{0xff, 0xff, 1})
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := FrameReader{R: bytes.NewReader(data)}
		got, err := readAllSized(&fr, 5)
		if len(got) > len(data) {
			t.Fatalf("%d payload bytes from %d input bytes", len(got), len(data))
		}
		if err == nil && !fr.ended {
			t.Fatal("clean end without an end frame")
		}
	})
}
