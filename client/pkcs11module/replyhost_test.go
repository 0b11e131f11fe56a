package pkcs11module

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// mutatingAgent answers as an agent would (keys of each type with
// certificates and intermediates; real signatures) and mutates most
// replies (Hellos about one in two, the rest about two in three). Where a mutation leaves the module waiting for bytes
// that will not come, the connection is closed after it, so that each
// call ends at once rather than at its deadline.
type mutatingAgent struct {
	mu      sync.Mutex // rng, counts
	rng     *rand.Rand
	entries []proto.KeyEntry
	fake    *fakeAgent // signs
	counts  map[string]int
}

func newMutatingAgent(t *testing.T, sock string, seed uint64) *mutatingAgent {
	t.Helper()
	keys := newReplyKeys(t)
	var fk []fakeKey
	for i, e := range keys.entries {
		fk = append(fk, fakeKey{name: e.Name, kid: e.KID, kty: e.KeyType, signer: keys.signers[i]})
	}
	m := &mutatingAgent{rng: rand.New(rand.NewPCG(seed, seed)), entries: keys.entries, fake: &fakeAgent{keys: fk}, counts: map[string]int{}}
	serveUnixConns(t, sock, m.handle)
	return m
}

func (m *mutatingAgent) handle(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	codec := proto.NewCodec()
	for {
		payload, err := proto.ReadFrame(br, nil, proto.DefaultMaxFrame)
		if err != nil {
			return
		}
		var req proto.Request
		if codec.DecodeRequest(payload, &req) != nil {
			return
		}
		var resp *proto.Response
		if req.Op == proto.OpListKeys {
			resp = &proto.Response{ID: req.ID, Keys: m.entries}
		} else {
			resp = m.fake.answer(&req)
		}
		out, hangUp := m.mutate(codec, req.Op, resp)
		if _, err := c.Write(out); err != nil || hangUp {
			return
		}
	}
}

// Mutations, by the request answered: each reply to a request of that op
// is one of these, drawn evenly. Hellos are mostly real, so that more
// calls get past the dial.
var (
	framing       = []string{"byte", "hostile byte", "cut", "header lies", "other id", "code", "stream ends", "two frames", "final OK"}
	helloKinds    = append([]string{"real", "real", "real", "real", "real", "real", "real", "real"}, framing...)
	listKeysKinds = append([]string{"real", "real", "real", "real", "real", "keys", "keys", "keys"}, framing...)
	signKinds     = append([]string{"real", "real", "real", "real", "real", "sig", "sig", "sig", "sig"}, framing...)
)

// mutate returns what to write for resp, the reply to a request of op,
// and whether to close the connection after it.
func (m *mutatingAgent) mutate(codec *proto.Codec, op proto.Op, resp *proto.Response) ([]byte, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.rng
	frame := func(resp *proto.Response) []byte {
		f, err := codec.AppendResponseFrame(nil, resp)
		if err != nil {
			panic(err) // the fake's own replies always encode
		}
		return f
	}
	kinds := helloKinds
	switch op {
	case proto.OpListKeys:
		kinds = listKeysKinds
	case proto.OpSign:
		kinds = signKinds
	}
	kind := kinds[r.IntN(len(kinds))]
	m.counts[kind]++
	out := frame(resp)
	payload := out[4:]
	switch kind {
	case "byte":
		for range 1 + r.IntN(4) {
			payload[r.IntN(len(payload))] = byte(r.UintN(256))
		}
	case "hostile byte":
		hostile := []byte{0x00, 0x7f, 0xc0, 0xc1, 0xc6, 0xdb, 0xdd, 0xdf, 0xff}
		payload[r.IntN(len(payload))] = hostile[r.IntN(len(hostile))]
	case "cut":
		return frameOf(payload[:r.IntN(len(payload))]), false
	case "header lies":
		lies := []uint32{0, uint32(len(payload) - 1), uint32(len(payload) + 1), proto.DefaultMaxFrame + 1, 0xffffffff}
		binary.BigEndian.PutUint32(out, lies[r.IntN(len(lies))])
		return out, true
	case "other id":
		resp.ID += 1 + r.Uint64N(1<<40)
		return frame(resp), false
	case "code":
		codes := []proto.Code{proto.OK, proto.BadRequest, proto.NotFound, proto.Paused, proto.Unavailable, proto.Internal, 99, 0xffff}
		resp.Code = codes[r.IntN(len(codes))]
		return frame(resp), false
	case "sig":
		sigs := [][]byte{nil, {}, bytes.Repeat([]byte{0xff}, 1+r.IntN(1100)), append(bytes.Clone(resp.Sig), 0),
			resp.Sig[:len(resp.Sig)/2], {0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00},
			append([]byte{0x30, 0x82, 0x01, 0x06, 0x02, 0x82, 0x01, 0x01}, bytes.Repeat([]byte{0x7f}, 0x101)...)}
		resp.Sig = sigs[r.IntN(len(sigs))]
		return frame(resp), false
	case "keys":
		if resp.Keys == nil {
			break
		}
		keys := append([]proto.KeyEntry(nil), resp.Keys...)
		i := r.IntN(len(keys))
		switch r.IntN(5) {
		case 0:
			keys[i].Pub = nil
		case 1:
			keys = append(keys, keys...) // every key twice
		case 2:
			keys[i].Cert = keys[i].Cert[:r.IntN(len(keys[i].Cert))]
		case 3:
			keys[i].Pub, keys[i].Cert = keys[(i+1)%len(keys)].Pub, nil // another key's public key
		case 4:
			keys[i].Chain = [][]byte{{}, {0x30}, keys[i].Cert, keys[i].Cert, keys[i].Cert, keys[i].Cert}
		}
		resp.Keys = keys
		return frame(resp), false
	case "stream ends":
		return out[:r.IntN(len(out))], true
	case "two frames":
		return append(out, out...), false
	case "final OK":
		resp.ID, resp.Code = 0, proto.OK
		return frame(resp), true
	}
	return out, false
}

// The module in a host while the agent's replies are mutated under it
// (testdata/replyhost.c, under AddressSanitizer where the toolchain has
// it): every call returns, with a result code the module documents, no
// signature is longer than its length query, and nothing is read or
// written out of bounds. SIGIL_REPLYHOST_SEED replays a run's mutations
// (the host is single-threaded, so they land on the same requests).
func TestHostSurvivesMutatedReplies(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SIGIL_REPLYHOST_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("SIGIL_REPLYHOST_SEED=%d", seed)
	dir := shortDir(t)
	sock := filepath.Join(dir, "agent.sock")
	agent := newMutatingAgent(t, sock, seed)
	conf := filepath.Join(dir, "pkcs11.conf")
	if err := os.WriteFile(conf, []byte("socket = "+sock+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mod, flags := asanBuild(t)
	bin := filepath.Join(t.TempDir(), "replyhost")
	args := append([]string{"-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror", "-I/usr/include/p11-kit-1"}, flags...)
	if out, err := exec.Command("cc", append(args, "-o", bin, "testdata/replyhost.c", "-ldl")...).CombinedOutput(); err != nil {
		t.Fatalf("cc replyhost.c: %v\n%s", err, out)
	}
	env := []string{"SIGIL_PKCS11_CONF=" + conf, "ASAN_OPTIONS=detect_leaks=0"}
	out := runBounded(t, 3*time.Minute, env, bin, mod, "600")

	documented := map[uint64]bool{
		0x0: true, 0x5: true, 0x11: true, 0x12: true, 0x20: true, 0x21: true, 0x30: true, 0x60: true,
		0x63: true, 0x68: true, 0x70: true, 0x82: true, 0x200: true,
	}
	results := map[string]int{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		call, rvText, ok := strings.Cut(l, " ")
		rv, err := strconv.ParseUint(rvText, 0, 64)
		if !ok || err != nil {
			t.Fatalf("line %q of the host's output", l)
		}
		if !documented[rv] {
			t.Errorf("%s returned %#x, which the module does not document", call, rv)
		}
		results[fmt.Sprintf("%s %#x", call, rv)]++
	}
	agent.mu.Lock()
	t.Logf("replies: %v", agent.counts)
	agent.mu.Unlock()
	t.Logf("calls: %v", results)
	for _, want := range []string{"C_Initialize 0x0", "C_Finalize 0x0", "C_Sign 0x0", "C_FindObjectsInit 0x0", "C_FindObjectsInit 0x30"} {
		if results[want] == 0 {
			t.Errorf("no %s in the run: the mutations did not reach both the module's paths", want)
		}
	}
}
