package pkcs11module

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/proto"
)

// The module's reading of replies (testdata/replyfuzz.c: read_frame, the
// msgpack decoder, key objects built from the key list, the signature
// conversions) under AddressSanitizer and UBSan, fed hostile replies: the
// module lives in host processes, and an agent that is not ours (SIGIL_SOCK
// pointing elsewhere) or a broken one must cost a call, never memory.

// buildReplyHarness compiles testdata/replyfuzz.c, with the sanitizers when
// the toolchain has them.
func buildReplyHarness(t testing.TB) string {
	t.Helper()
	need(t, "cc")
	dir := t.TempDir()
	bin := filepath.Join(dir, "replyfuzz")
	base := []string{"-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
		"-I/usr/include/p11-kit-1", "-O1", "-g", "-fno-omit-frame-pointer"}
	san := []string{"-fsanitize=address,undefined", "-fno-sanitize-recover=all"}
	tail := []string{"-o", bin, "testdata/replyfuzz.c", "-lcrypto", "-lpthread"}
	out, err := exec.Command("cc", append(append(base, san...), tail...)...).CombinedOutput()
	if err != nil {
		t.Logf("no sanitizers here (%v: %s): the harness checks crashes and invariants only", err, bytes.TrimSpace(out))
		if out, err = exec.Command("cc", append(base, tail...)...).CombinedOutput(); err != nil {
			t.Fatalf("cc replyfuzz.c: %v\n%s", err, out)
		}
	}
	return bin
}

// replyHarness is one running harness; feed sends it records one by one.
type replyHarness struct {
	bin    string
	cmd    *exec.Cmd
	in     io.WriteCloser
	out    io.Reader
	stderr *bytes.Buffer
}

func (h *replyHarness) start() error {
	h.cmd = exec.Command(h.bin)
	h.stderr = new(bytes.Buffer)
	h.cmd.Stderr = h.stderr
	// A leak check at exit needs ptrace, which some sandboxes refuse.
	h.cmd.Env = append(os.Environ(), "ASAN_OPTIONS=detect_leaks=0:quarantine_size_mb=16:malloc_context_size=8", "UBSAN_OPTIONS=print_stacktrace=1")
	var err error
	if h.in, err = h.cmd.StdinPipe(); err != nil {
		return err
	}
	if h.out, err = h.cmd.StdoutPipe(); err != nil {
		return err
	}
	return h.cmd.Start()
}

// feed runs one record (what the agent writes to the socket); an error
// carries the sanitizer's report, and the harness is started afresh.
func (h *replyHarness) feed(stream []byte) error {
	if h.cmd == nil {
		if err := h.start(); err != nil {
			return err
		}
	}
	rec := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(stream)), uint32(len(stream)))
	rec = append(rec, stream...)
	var ack [1]byte
	_, werr := h.in.Write(rec)
	if werr == nil {
		_, werr = io.ReadFull(h.out, ack[:])
	}
	if werr == nil {
		return nil
	}
	h.in.Close()
	h.cmd.Wait()
	report := h.stderr.String()
	h.cmd = nil
	return fmt.Errorf("harness died (%v):\n%s", werr, report)
}

func (h *replyHarness) stop() {
	if h.cmd != nil {
		h.in.Close()
		h.cmd.Wait()
		h.cmd = nil
	}
}

// frameOf puts the proto frame header on payload.
func frameOf(payload []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
}

// mp writes msgpack by hand, for the shapes package proto never writes.
type mp []byte

func (m mp) mapN(n uint32) mp {
	if n < 16 {
		return append(m, 0x80|byte(n))
	}
	return binary.BigEndian.AppendUint32(append(m, 0xdf), n)
}

func (m mp) arr(n uint32) mp {
	if n < 16 {
		return append(m, 0x90|byte(n))
	}
	return binary.BigEndian.AppendUint32(append(m, 0xdd), n)
}

func (m mp) str(s string) mp {
	if len(s) < 32 {
		m = append(m, 0xa0|byte(len(s)))
	} else {
		m = binary.BigEndian.AppendUint32(append(m, 0xdb), uint32(len(s)))
	}
	return append(m, s...)
}

func (m mp) bin(b []byte) mp {
	return append(binary.BigEndian.AppendUint32(append(m, 0xc6), uint32(len(b))), b...)
}

func (m mp) raw(b ...byte) mp { return append(m, b...) }

// replyKeys are keys of each type the module shows, each with a
// certificate from a CA through an intermediate.
type replyKeys struct {
	entries []proto.KeyEntry
	signers []crypto.Signer
}

// makeReplyKeys runs once per test binary: RSA key generation dominates.
var makeReplyKeys = sync.OnceValues(func() (replyKeys, error) {
	var keys replyKeys
	root, err := devcerts.NewCA("fuzz root")
	if err != nil {
		return keys, err
	}
	mid, err := root.NewIntermediate("fuzz intermediate")
	if err != nil {
		return keys, err
	}
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return keys, err
	}
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	for i, s := range []crypto.Signer{p256, p384, rk, ed} {
		pub, err := x509.MarshalPKIXPublicKey(s.Public())
		if err != nil {
			return keys, err
		}
		name := []string{"p256", "p384", "rsa", "ed"}[i]
		cert, err := mid.Certify(s.Public(), devcerts.Leaf{CommonName: name, CodeSigning: true})
		if err != nil {
			return keys, err
		}
		keys.entries = append(keys.entries, proto.KeyEntry{
			Name: name, KID: fmt.Sprintf("%032x", i+1), Provider: "soft", KeyType: name, Pub: pub,
			Cert: cert, Chain: [][]byte{mid.Cert.Raw, root.Cert.Raw},
		})
		keys.signers = append(keys.signers, s)
	}
	return keys, nil
})

func newReplyKeys(t testing.TB) replyKeys {
	t.Helper()
	keys, err := makeReplyKeys()
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// replySeeds are real replies as package proto writes them: Hello, an
// error, a signature of each kind, key lists with certificates and chains.
func replySeeds(t testing.TB) map[string][]byte {
	t.Helper()
	keys := newReplyKeys(t)
	seeds := map[string][]byte{
		"hello":  goResponse(t, &proto.Response{ID: 1, Version: 1, Features: 1}),
		"error":  goResponse(t, &proto.Response{ID: 2, Code: proto.Paused, Msg: "paused\x00after a NUL"}),
		"keys":   goResponse(t, &proto.Response{ID: 3, Keys: keys.entries}),
		"nokeys": goResponse(t, &proto.Response{ID: 4, Keys: []proto.KeyEntry{}}),
	}
	digest := sha256.Sum256([]byte("fuzz"))
	for i, s := range keys.signers {
		var opts crypto.SignerOpts = crypto.SHA256
		msg := digest[:]
		if _, ok := s.(ed25519.PrivateKey); ok {
			opts = crypto.Hash(0)
		}
		sig, err := s.Sign(rand.Reader, msg, opts)
		if err != nil {
			t.Fatal(err)
		}
		e := keys.entries[i]
		seeds["sig-"+e.Name] = goResponse(t, &proto.Response{ID: 5, Key: e.Name, KID: e.KID, Sig: sig})
		one := e
		one.Chain = [][]byte{e.Chain[0], e.Chain[1], e.Chain[0], e.Chain[1], e.Chain[0], e.Chain[1]} // past SG_MAX_CHAIN
		seeds["key-"+e.Name] = goResponse(t, &proto.Response{ID: 6, Keys: []proto.KeyEntry{one}})
	}
	return seeds
}

// derMutations are the DER element b cut at every byte and with each byte
// set to values that turn lengths and tags hostile.
func derMutations(b []byte) [][]byte {
	var out [][]byte
	for i := 0; i < len(b); i++ {
		out = append(out, b[:i])
		for _, v := range []byte{0x00, 0x81, 0xff} {
			if b[i] == v {
				continue
			}
			m := bytes.Clone(b)
			m[i] = v
			out = append(out, m)
		}
	}
	return out
}

// hostileReplies is the regular corpus: records of what an agent might
// write, each a frame header and a payload.
func hostileReplies(t testing.TB) [][]byte {
	t.Helper()
	var recs [][]byte
	add := func(payload []byte) { recs = append(recs, frameOf(payload)) }
	seeds := replySeeds(t)
	for _, s := range seeds {
		add(s)
	}

	// The msgpack: every truncation of a key list, and on small
	// replies every byte replaced by a value that makes a length, a count
	// or a type hostile (certificates left small, so that the bytes are
	// mostly msgpack's own).
	full := seeds["key-p256"]
	for i := range full {
		add(full[:i])
	}
	keys := newReplyKeys(t)
	p256, rk := keys.entries[0], keys.entries[2]
	small := p256
	small.Cert, small.Chain = []byte{0x30, 0x00}, [][]byte{{0x30, 0x00}, {}}
	smallList := goResponse(t, &proto.Response{ID: 10, Keys: []proto.KeyEntry{small}})
	for _, s := range [][]byte{smallList, seeds["sig-p256"], seeds["error"], seeds["hello"]} {
		for i := range s {
			for _, v := range []byte{0x00, 0x7f, 0xc0, 0xc1, 0xc6, 0xdd, 0xdf, 0xff} {
				if s[i] != v {
					m := bytes.Clone(s)
					m[i] = v
					add(m)
				}
			}
		}
	}

	// The DER inside well-formed msgpack: each key's SubjectPublicKeyInfo
	// and certificate, cut and corrupted.
	for _, e := range keys.entries {
		for _, pub := range derMutations(e.Pub) {
			k := e
			k.Pub, k.Cert, k.Chain = pub, nil, nil
			add(goResponse(t, &proto.Response{ID: 7, Keys: []proto.KeyEntry{k}}))
		}
	}
	for _, cert := range derMutations(p256.Cert) {
		k := p256
		k.Cert, k.Chain = cert, [][]byte{cert}
		add(goResponse(t, &proto.Response{ID: 8, Keys: []proto.KeyEntry{k}}))
	}
	for _, sigName := range []string{"sig-p256", "sig-p384"} {
		var r proto.Response
		if err := proto.NewCodec().DecodeResponse(seeds[sigName], &r); err != nil {
			t.Fatal(err)
		}
		for _, sig := range derMutations(r.Sig) {
			add(goResponse(t, &proto.Response{ID: 9, Sig: sig}))
		}
	}

	// Shapes package proto never writes.
	entry := func(m mp) mp {
		return m.mapN(3).str("name").str("k").str("kid").str("00").str("pub").bin(p256.Pub)
	}
	nested := func(depth int) mp {
		m := mp{}.mapN(1).str("x")
		for i := 0; i < depth; i++ {
			m = m.arr(1)
		}
		return m.raw(0x01)
	}
	nestedInEntry := func(depth int) mp {
		m := mp{}.mapN(1).str("keys").arr(1).mapN(1).str("x")
		for i := 0; i < depth; i++ {
			m = m.raw(0x81, 0xa1, 'y')
		}
		return m.raw(0xc0)
	}
	big := bytes.Repeat([]byte{0x30}, proto.DefaultMaxFrame-64)
	shapes := map[string]mp{
		"huge keys count":     mp{}.mapN(1).str("keys").arr(0xffffffff),
		"huge keys, one":      entry(mp{}.mapN(1).str("keys").arr(0xffffffff)),
		"huge entry map":      mp{}.mapN(1).str("keys").arr(1).mapN(0xffffffff).str("name").str("k"),
		"huge chain":          mp{}.mapN(1).str("keys").arr(1).mapN(1).str("chain").arr(0xffffffff).bin([]byte{1}),
		"huge top map":        mp{}.mapN(0xffffffff),
		"nil entries":         mp{}.mapN(1).str("keys").arr(5).raw(0xc0, 0xc0, 0xc0, 0xc0, 0xc0),
		"nil chain items":     mp{}.mapN(1).str("keys").arr(1).mapN(1).str("chain").arr(3).raw(0xc0, 0xc0, 0xc0),
		"empty entry":         mp{}.mapN(1).str("keys").arr(1).mapN(0),
		"entry not a map":     mp{}.mapN(1).str("keys").arr(1).raw(0x01),
		"keys not an array":   mp{}.mapN(1).str("keys").mapN(0),
		"name is an int":      mp{}.mapN(1).str("keys").arr(1).mapN(1).str("name").raw(0x05),
		"pub is a map":        mp{}.mapN(1).str("keys").arr(1).mapN(1).str("pub").mapN(0),
		"cert is an array":    mp{}.mapN(1).str("keys").arr(1).mapN(1).str("cert").arr(0),
		"chain is bin":        mp{}.mapN(1).str("keys").arr(1).mapN(1).str("chain").bin([]byte{1}),
		"chain item is a map": mp{}.mapN(1).str("keys").arr(1).mapN(1).str("chain").arr(1).mapN(0),
		"key is an int":       mp{}.mapN(1).raw(0x01, 0x01),
		"sig is bool":         mp{}.mapN(1).str("sig").raw(0xc3),
		"code is a str":       mp{}.mapN(1).str("code").str("0"),
		"code negative":       mp{}.mapN(1).str("code").raw(0xd0, 0xff),
		"bin32 past end":      mp{}.mapN(1).str("sig").raw(0xc6, 0x7f, 0xff, 0xff, 0xff, 1, 2),
		"str8 past end":       mp{}.mapN(1).str("msg").raw(0xd9, 0xff, 'a'),
		"ext32 past end":      mp{}.mapN(1).str("x").raw(0xc9, 0xff, 0xff, 0xff, 0xff, 1),
		"ext32 max":           mp{}.mapN(1).str("x").raw(0xc9, 0xff, 0xff, 0xff, 0xff),
		"nested 31":           nested(31),
		"nested 32":           nested(32),
		"nested 33":           nested(33),
		"nested 5000":         nested(5000),
		"nested in entry 40":  nestedInEntry(40),
		"nested in entry 999": nestedInEntry(999),
		"NUL in name":         mp{}.mapN(1).str("keys").arr(1).mapN(3).str("name").str("a\x00b").str("kid").str("\x00\x00").str("pub").bin(p256.Pub),
		"name of 300":         mp{}.mapN(1).str("keys").arr(1).mapN(3).str("name").str(strings.Repeat("n", 300)).str("kid").str("00").str("pub").bin(p256.Pub),
		"kid of 200 hex":      mp{}.mapN(1).str("keys").arr(1).mapN(3).str("name").str("k").str("kid").str(strings.Repeat("ab", 100)).str("pub").bin(p256.Pub),
		"kid of 129 hex":      mp{}.mapN(1).str("keys").arr(1).mapN(3).str("name").str("k").str("kid").str(strings.Repeat("a", 129)).str("pub").bin(p256.Pub),
		"NUL in msg":          mp{}.mapN(2).str("code").raw(0x0e).str("msg").str("a\x00b\x00"),
		"keys twice":          entry(mp{}.mapN(2).str("keys").arr(1)).str("keys").arr(0),
		"chain twice": mp{}.mapN(1).str("keys").arr(1).mapN(5).str("name").str("k").str("pub").bin(rk.Pub).str("cert").bin(rk.Cert).
			str("chain").arr(4).bin(rk.Chain[0]).bin(rk.Chain[1]).bin(rk.Chain[0]).bin(rk.Chain[1]).
			str("chain").arr(1).bin([]byte{0x30, 0x00}),
		"oversized cert":  mp{}.mapN(1).str("keys").arr(1).mapN(3).str("name").str("k").str("pub").bin(p256.Pub).str("cert").bin(big),
		"oversized chain": mp{}.mapN(1).str("keys").arr(1).mapN(4).str("name").str("k").str("pub").bin(p256.Pub).str("cert").bin(p256.Cert).str("chain").arr(3).bin(big[:20000]).bin(big[:20000]).bin(big[:20000]),
		"chain without cert": mp{}.mapN(1).str("keys").arr(1).mapN(3).str("name").str("k").str("pub").bin(p256.Pub).
			str("chain").arr(1).bin(p256.Chain[0]),
		"empty pub, cert": mp{}.mapN(1).str("keys").arr(1).mapN(2).str("pub").bin(nil).str("cert").bin(p256.Cert),
		"indefinite cert": mp{}.mapN(1).str("keys").arr(1).mapN(2).str("pub").bin(p256.Pub).str("cert").bin([]byte{0x30, 0x80, 0x30, 0x80, 0x02, 0x01, 0x01, 0, 0, 0, 0}),
	}
	for _, m := range shapes {
		add(m)
	}

	// Frame headers that lie: no payload, past the limit, shorter and
	// longer than what follows, and a stream that ends in the header.
	hello := seeds["hello"]
	lie := func(n uint32, payload []byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, n), payload...)
	}
	recs = append(recs,
		lie(0, hello), lie(proto.DefaultMaxFrame+1, hello), lie(0xffffffff, hello),
		lie(uint32(len(hello)-1), hello), lie(uint32(len(hello)+1), hello),
		lie(uint32(len(hello)), append(bytes.Clone(hello), hello...)),
		lie(proto.DefaultMaxFrame, bytes.Repeat([]byte{0xc0}, proto.DefaultMaxFrame)),
		[]byte{0, 0}, nil,
	)
	return recs
}

// Every hostile reply in the corpus leaves the harness standing: no
// sanitizer report, no broken invariant (a key built from an entry is that
// entry, fields lie within the payload, counts within their bounds).
func TestRepliesUnderSanitizers(t *testing.T) {
	h := &replyHarness{bin: buildReplyHarness(t)}
	defer h.stop()
	recs := hostileReplies(t)
	failures := 0
	for _, rec := range recs {
		if err := h.feed(rec); err != nil {
			failures++
			t.Errorf("record % x (%d bytes): %v", rec[:min(len(rec), 64)], len(rec), err)
			if failures == 3 {
				t.FailNow()
			}
		}
	}
	t.Logf("%d records", len(recs))
}

// Replies the harness once failed on, each kept as it was found.
func TestHostileReplyRegressions(t *testing.T) {
	keys := newReplyKeys(t)
	p256 := keys.entries[0].Pub
	cases := map[string][]byte{
		// An entry without a name reached the "keys =" filter as a NULL
		// pointer, which it passed to memchr and memcpy (UBSan: "null
		// pointer passed as argument 1"); a nil one is empty too.
		"entry without name":  mp{}.mapN(1).str("keys").arr(1).mapN(2).str("kid").str("00").str("pub").bin(p256),
		"entry with nil name": mp{}.mapN(1).str("keys").arr(1).mapN(3).str("name").raw(0xc0).str("kid").str("00").str("pub").bin(p256),
		// Failed DER parses left OpenSSL's errors on the calling thread's
		// queue, where a host using OpenSSL itself (the pkcs11 engine)
		// took them for its own ("left the OpenSSL error queue changed").
		"truncated pub": mp{}.mapN(1).str("keys").arr(1).mapN(3).str("name").str("k").str("kid").str("00").str("pub").bin(p256[:len(p256)-1]),
		"cert not DER": mp{}.mapN(1).str("keys").arr(1).mapN(4).str("name").str("k").str("kid").str("00").str("pub").bin(p256).
			str("cert").bin([]byte{0x30, 0x84, 0xff, 0xff, 0xff, 0xff}),
	}
	h := &replyHarness{bin: buildReplyHarness(t)}
	defer h.stop()
	for name, payload := range cases {
		// Twice: the harness alternates between an empty error queue
		// and one holding a marker of the host's.
		for range 2 {
			if err := h.feed(frameOf(payload)); err != nil {
				t.Errorf("%s: %v", name, err)
			}
		}
	}
}

// The harness under Go's fuzzer: the input is a payload, framed as the
// agent would frame it. `go test -run '^$' -fuzz FuzzRepliesUnderSanitizers`.
func FuzzRepliesUnderSanitizers(f *testing.F) {
	for _, s := range replySeeds(f) {
		f.Add(s)
	}
	h := &replyHarness{bin: buildReplyHarness(f)}
	f.Cleanup(h.stop)
	f.Fuzz(func(t *testing.T, payload []byte) {
		if len(payload) > proto.DefaultMaxFrame {
			return
		}
		if err := h.feed(frameOf(payload)); err != nil {
			t.Fatal(err)
		}
	})
}
