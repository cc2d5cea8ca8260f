package tunnel

import (
	"encoding/binary"
	"errors"
	"io"
	"sync"
)

// On the TCP egress (a sidecar's TLS connection to its gateway), the bytes
// of a proxied connection travel in frames after the answer: a 2-byte
// big-endian length and that many bytes; length 0 ends the direction (the
// half-close). With an in-band end, a TLS connection whose two directions
// both ended cleanly can carry the next proxied connection, so a new
// connection rarely pays a handshake. A TCP or TLS end without an end frame
// is a truncation and resets the other side.

// MaxFramePayload keeps a frame and its length in one TLS record.
const MaxFramePayload = 1<<14 - 2

// ErrTruncated is a direction that ended without an end frame.
var ErrTruncated = errors.New("egress connection ended without an end frame")

// errEnded is a write after the end frame.
var errEnded = errors.New("write after the end of this direction")

// FrameReader returns the payload bytes of the frames read from R, and
// io.EOF at the end frame. It keeps its place across errors, so a Read
// that failed with a timeout can be retried.
type FrameReader struct {
	R         io.Reader
	remaining int // payload bytes left in the current frame
	hdr       [2]byte
	hdrN      int
	ended     bool // the end frame arrived
}

func (f *FrameReader) Read(p []byte) (int, error) {
	if f.ended {
		return 0, io.EOF
	}
	for f.remaining == 0 {
		n, err := f.R.Read(f.hdr[f.hdrN:])
		f.hdrN += n
		if f.hdrN < len(f.hdr) {
			if err == nil {
				continue
			}
			if errors.Is(err, io.EOF) {
				err = ErrTruncated
			}
			return 0, err
		}
		f.hdrN = 0
		f.remaining = int(binary.BigEndian.Uint16(f.hdr[:]))
		if f.remaining == 0 {
			f.ended = true
			return 0, io.EOF
		}
	}
	if len(p) > f.remaining {
		p = p[:f.remaining]
	}
	n, err := f.R.Read(p)
	f.remaining -= n
	if errors.Is(err, io.EOF) {
		err = ErrTruncated
		if n > 0 {
			err = nil // the next Read reports it
		}
	}
	return n, err
}

// Ended reports whether the end frame arrived.
func (f *FrameReader) Ended() bool { return f.ended }

// FramePool holds buffers of 2+MaxFramePayload bytes: one frame.
var FramePool = sync.Pool{New: func() any { b := make([]byte, 2+MaxFramePayload); return &b }}

// FrameWriter writes bytes as frames to W, each in one Write (one TLS
// record), and the end frame once. It is safe for concurrent use.
type FrameWriter struct {
	W      io.Writer
	mu     sync.Mutex
	prefix []byte // written with the first frame, see Prefix
	ended  bool   // the end frame was written
	err    error
}

// Prefix sets bytes to write with the first frame (or the end frame, or
// Flush), in the same Write: a request header that then reaches the
// gateway with the first application bytes, in one TLS record. Call it
// before any other method.
func (f *FrameWriter) Prefix(b []byte) { f.prefix = b }

// Flush writes the prefix, if it was not written yet.
func (f *FrameWriter) Flush() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil || len(f.prefix) == 0 {
		return f.err
	}
	return f.write(nil)
}

func (f *FrameWriter) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return 0, f.err
	}
	if f.ended {
		return 0, errEnded
	}
	bp := FramePool.Get().(*[]byte)
	defer FramePool.Put(bp)
	written := 0
	for len(p) > 0 {
		buf := append((*bp)[:0], f.prefix...)
		n := min(len(p), MaxFramePayload-len(f.prefix))
		buf = binary.BigEndian.AppendUint16(buf, uint16(n))
		buf = append(buf, p[:n]...)
		if err := f.write(buf); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// End writes the end frame (once).
func (f *FrameWriter) End() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil || f.ended {
		return f.err
	}
	f.ended = true
	var buf [2]byte // a zero length
	if len(f.prefix) > 0 {
		return f.write(append(f.prefix[:len(f.prefix):len(f.prefix)], buf[:]...))
	}
	return f.write(buf[:])
}

// write writes b, or the prefix alone for a nil b; f.mu is held.
func (f *FrameWriter) write(b []byte) error {
	if b == nil {
		b = f.prefix
	}
	if _, err := f.W.Write(b); err != nil {
		f.err = err
		return err
	}
	f.prefix = nil
	return nil
}

// Clean reports whether the end frame was written without an error.
func (f *FrameWriter) Clean() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ended && f.err == nil
}
