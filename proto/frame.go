package proto

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// FrameHeaderLen is the size of a frame's length prefix.
const FrameHeaderLen = 4

// ErrFrameTooLarge is returned by ReadFrame when a frame announces a payload
// over the limit; nothing has been allocated for it.
var ErrFrameTooLarge = errors.New("frame too large")

// ErrEmptyFrame is returned for a zero-length frame, which can hold no message.
var ErrEmptyFrame = errors.New("empty frame")

func appendFrame(dst, payload []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
	return append(dst, payload...)
}

// ReadFrame reads one frame from r and returns its payload, stored in buf when
// it fits (so a reader loop reuses one buffer). The announced length is checked
// against max before any allocation.
func ReadFrame(r *bufio.Reader, buf []byte, max int) ([]byte, error) {
	var hdr [FrameHeaderLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 {
		return nil, ErrEmptyFrame
	}
	if uint64(n) > uint64(max) {
		// Not the announced length: from a sender that lost its place in
		// the stream, those four bytes may be a digest's (docs/security.md).
		return nil, fmt.Errorf("%w: over the limit of %d bytes", ErrFrameTooLarge, max)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf, nil
}
