package proto

import (
	"bufio"
	"bytes"
	"reflect"
	"testing"
)

// FuzzDecodeRequest feeds arbitrary payloads to the request decoder: it must
// return an error or a request, never panic, hang or allocate beyond the input.
// A request that decodes must survive a re-encode and decode unchanged.
func FuzzDecodeRequest(f *testing.F) {
	c := NewCodec()
	for _, r := range []Request{
		{ID: 1, Op: OpHello, Version: Version, Features: FeaturePipelining},
		{ID: 2, Op: OpSign, Key: "k", Scheme: SchemeECDSA, Hash: HashSHA256, Digest: make([]byte, 32), TimeoutMillis: 100},
		{ID: 3, Op: OpVerify, KID: "abcd", Scheme: SchemeEd25519, Digest: []byte("m"), Sig: make([]byte, 64)},
	} {
		frame, _ := c.AppendRequestFrame(nil, &r)
		f.Add(frame[FrameHeaderLen:])
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		var r Request
		if err := c.DecodeRequest(payload, &r); err != nil {
			return
		}
		frame, err := c.AppendRequestFrame(nil, &r)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		var again Request
		if err := c.DecodeRequest(frame[FrameHeaderLen:], &again); err != nil {
			t.Fatalf("decode of re-encoded request: %v", err)
		}
		// Every field, not a few: a value the decoder reads but the
		// encoder writes differently would be signed or audited as
		// another request than the one a proxy or a log saw.
		normalize(&r.Digest, &r.Sig, &again.Digest, &again.Sig)
		if !reflect.DeepEqual(again, r) {
			t.Fatalf("re-encode changed the request: %+v vs %+v", again, r)
		}
	})
}

// FuzzReadFrame checks the frame reader against arbitrary streams: a frame over
// the limit is refused and nothing reads past the stream.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{0, 0, 0, 3, 'a', 'b', 'c'})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, stream []byte) {
		r := bufio.NewReader(bytes.NewReader(stream))
		var buf []byte
		for {
			p, err := ReadFrame(r, buf, 1024)
			if err != nil {
				return
			}
			if len(p) > 1024 || len(p) == 0 {
				t.Fatalf("frame of %d bytes passed a 1024 limit", len(p))
			}
			buf = p
		}
	})
}

// FuzzDecodeResponse: the client decodes what an agent (or an impostor) sends.
func FuzzDecodeResponse(f *testing.F) {
	c := NewCodec()
	for _, r := range []Response{
		{ID: 1, Code: OK, Version: Version},
		{ID: 2, Code: OK, Keys: []KeyEntry{{Name: "a", KID: "b", Provider: "c", KeyType: "ed25519", Pub: []byte{1}, Cert: []byte{0x30, 0}}}},
		{ID: 3, Code: NotFound, Msg: "x"},
	} {
		frame, _ := c.AppendResponseFrame(nil, &r)
		f.Add(frame[FrameHeaderLen:])
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		var r Response
		_ = c.DecodeResponse(payload, &r)
	})
}
