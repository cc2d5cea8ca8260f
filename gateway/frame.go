package gateway

import (
	"encoding/binary"
	"errors"
	"io"
	"sync"
)

// After the answer, the bytes of a proxied connection on the TCP egress
// travel in frames: a 2-byte big-endian length and that many bytes; length
// 0 ends the direction (the half-close). With an in-band end, a TLS
// connection whose two directions both ended cleanly can carry the next
// proxied connection, so a new connection rarely pays a handshake. A TCP or
// TLS end without an end frame is a truncation and resets the other side.

// maxFramePayload keeps a frame and its header in one TLS record.
const maxFramePayload = 1<<14 - 2

// errTruncated is a direction that ended without an end frame.
var errTruncated = errors.New("egress connection ended without an end frame")

// frameReader returns the payload bytes of the frames read from r, and
// io.EOF at the end frame.
type frameReader struct {
	r         io.Reader
	remaining int // payload bytes left in the current frame
	hdr       [2]byte
	hdrN      int
	ended     bool // the end frame arrived
}

func (f *frameReader) Read(p []byte) (int, error) {
	if f.ended {
		return 0, io.EOF
	}
	for f.remaining == 0 {
		n, err := f.r.Read(f.hdr[f.hdrN:])
		f.hdrN += n
		if f.hdrN < len(f.hdr) {
			if err == nil {
				continue
			}
			if errors.Is(err, io.EOF) {
				err = errTruncated
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
	n, err := f.r.Read(p)
	f.remaining -= n
	if errors.Is(err, io.EOF) {
		err = errTruncated
		if n > 0 {
			err = nil // the next Read reports it
		}
	}
	return n, err
}

var framePool = sync.Pool{New: func() any { b := make([]byte, 2+maxFramePayload); return &b }}

// frameWriter writes p as frames to w, each in one Write (one TLS record),
// and the end frame once.
type frameWriter struct {
	w     io.Writer
	mu    sync.Mutex
	ended bool // the end frame was written
	err   error
}

var errEnded = errors.New("write after the end of this direction")

func (f *frameWriter) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return 0, f.err
	}
	if f.ended {
		return 0, errEnded
	}
	return f.writeLocked(p)
}

// writeLocked writes p as frames; f.mu is held.
func (f *frameWriter) writeLocked(p []byte) (int, error) {
	bp := framePool.Get().(*[]byte)
	defer framePool.Put(bp)
	buf := *bp
	written := 0
	for len(p) > 0 {
		n := min(len(p), maxFramePayload)
		binary.BigEndian.PutUint16(buf, uint16(n))
		copy(buf[2:], p[:n])
		if _, err := f.w.Write(buf[:2+n]); err != nil {
			f.err = err
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// end writes the end frame (once).
func (f *frameWriter) end() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil || f.ended {
		return f.err
	}
	f.ended = true
	if _, err := f.w.Write([]byte{0, 0}); err != nil {
		f.err = err
	}
	return f.err
}

// clean reports whether the end frame was written without an error.
func (f *frameWriter) clean() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ended && f.err == nil
}
