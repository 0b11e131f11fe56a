package pkcs11module

import (
	"bufio"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/proto"
)

// freshKeysPerList fill a frame: each entry is about 157 bytes.
const freshKeysPerList = (proto.DefaultMaxFrame - 1024) / 160

// freshKeysAgent answers every ListKeys with as many keys as fit in one
// frame, each listed for the first and only time (a new name and kid):
// an agent that is not ours, or one whose keys churn.
func freshKeysAgent(t *testing.T, sock string) {
	t.Helper()
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pub, err := x509.MarshalPKIXPublicKey(p256.Public())
	if err != nil {
		t.Fatal(err)
	}
	var serial atomic.Int64
	serveUnixConns(t, sock, func(c net.Conn) {
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
			resp := &proto.Response{ID: req.ID, Version: proto.Version}
			if req.Op == proto.OpListKeys {
				for range freshKeysPerList {
					n := serial.Add(1)
					resp.Keys = append(resp.Keys, proto.KeyEntry{Name: fmt.Sprintf("k%d", n), KID: fmt.Sprintf("%032x", n), Pub: pub})
				}
			}
			frame, err := codec.AppendResponseFrame(nil, resp)
			if err != nil {
				t.Errorf("the fake's reply: %v", err)
				return
			}
			if _, err := c.Write(frame); err != nil {
				return
			}
		}
	})
}

// The module's memory is bounded by what one key list holds, whatever
// the agent lists over time. Every key ever listed stayed in the key
// table until C_Finalize: an agent listing 64 KiB of new keys at each
// search cost the host about 1.7 MB more per search (30 searches: 52 MB),
// and each search compared every entry with the whole table.
func TestKeyListsDoNotAccumulate(t *testing.T) {
	dir := shortDir(t)
	sock := filepath.Join(dir, "agent.sock")
	freshKeysAgent(t, sock)
	conf := filepath.Join(dir, "pkcs11.conf")
	if err := os.WriteFile(conf, []byte("socket = "+sock+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bin := ccProgram(t, "keytable")
	const rounds = 30
	out := runBounded(t, 2*time.Minute, []string{"SIGIL_PKCS11_CONF=" + conf}, bin, modulePath(t), strconv.Itoa(rounds))
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != rounds+1 {
		t.Fatalf("want %d searches and the heap:\n%s", rounds, out)
	}
	for _, l := range lines[:rounds] {
		var i, objects int
		var rv uint
		if _, err := fmt.Sscanf(l, "search %d: %v, %d objects", &i, &rv, &objects); err != nil || rv != 0 || objects != 2*freshKeysPerList {
			t.Fatalf("want CKR_OK and every listed key's two objects: %q", l)
		}
	}
	var first, last int64
	if _, err := fmt.Sscanf(lines[rounds], "heap %d %d", &first, &last); err != nil {
		t.Fatalf("%q: %v", lines[rounds], err)
	}
	t.Logf("heap after the first search %d bytes, after the last %d", first, last)
	if last > 2*first {
		t.Fatalf("the heap grew from %d bytes after the first search to %d after the %dth: keys no longer listed are kept", first, last, rounds)
	}
}

// What the table keeps of keys no longer listed: a key listed again soon
// keeps its handles; past MAX_ABSENT_KEYS (64) others unlisted, the
// oldest is dropped, its handles name no object and a search gives it
// new ones. A signing operation begun on a dropped key still signs with
// it: the session holds its own copy of what the signature needs.
func TestUnlistedKeysAreDroppedPastALimit(t *testing.T) {
	base := newFakeKeys(t)
	fresh := func(n int) []fakeKey {
		keys := make([]fakeKey, n)
		for i := range keys {
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			keys[i] = fakeKey{fmt.Sprintf("fresh%d-%d", n, i), fmt.Sprintf("%032x", 1000*n+i), "ecdsa-p256", k}
		}
		return keys
	}
	fake := startFake(t, base)
	t.Setenv(proto.SocketEnv, fake.sock)
	ctx := openModule(t)
	signing, searching := openSession(t, ctx), openSession(t, ctx)
	priv := findKey(t, ctx, searching, p11.CKO_PRIVATE_KEY, "p256")
	if err := ctx.SignInit(signing, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, priv); err != nil {
		t.Fatalf("C_SignInit: %v", err)
	}
	search := func(keys []fakeKey) {
		t.Helper()
		fake.setKeys(keys)
		if err := ctx.FindObjectsInit(searching, nil); err != nil {
			t.Fatalf("C_FindObjectsInit: %v", err)
		}
		ctx.FindObjectsFinal(searching)
	}

	listedAgain := func(why string) {
		t.Helper()
		fake.setKeys(base)
		if again := findKey(t, ctx, searching, p11.CKO_PRIVATE_KEY, "p256"); again != priv {
			t.Fatalf("p256 listed again (%s): handle %#x, was %#x", why, again, priv)
		}
	}
	search(fresh(70)) // base unlisted: 4 absent, kept
	listedAgain("4 unlisted")
	// 70 keys rotated away for good, then base missing from one list (its
	// provider out): the keys unlisted longest go first, not base, though
	// it came first (reviewer BO: the first-added went first).
	search(fresh(71))
	listedAgain("missing from one list after 70 others went for good")
	// Base unlisted longer than all but 60 of 64 others: it goes.
	search(fresh(72))
	search(fresh(73))

	fake.setKeys(base) // the agent signs with p256 again; no search yet
	sig, err := ctx.Sign(signing, sum(crypto.SHA256, message))
	if err != nil {
		t.Fatalf("C_Sign begun before p256 was dropped: %v", err)
	}
	if err := verify(base[0].signer.Public(), crypto.SHA256, false, sig); err != nil {
		t.Fatalf("the signature: %v", err)
	}
	if _, err := ctx.GetAttributeValue(searching, priv, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, nil)}); ckr(err) != p11.CKR_OBJECT_HANDLE_INVALID {
		t.Fatalf("C_GetAttributeValue on dropped p256's handle: %v, want CKR_OBJECT_HANDLE_INVALID", err)
	}
	if again := findKey(t, ctx, searching, p11.CKO_PRIVATE_KEY, "p256"); again == priv {
		t.Fatalf("p256 listed after it was dropped kept handle %#x", priv)
	}
}

// Keys that leave the list together (their provider out) go latest added
// first: the long-lived key, added first, keeps its handles.
func TestKeysUnlistedTogetherGoLatestAddedFirst(t *testing.T) {
	base := newFakeKeys(t)
	later := make([]fakeKey, 70)
	for i := range later {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		later[i] = fakeKey{fmt.Sprintf("later-%d", i), fmt.Sprintf("%032x", 5000+i), "ecdsa-p256", k}
	}
	fake := startFake(t, append(append([]fakeKey(nil), base...), later...))
	t.Setenv(proto.SocketEnv, fake.sock)
	ctx := openModule(t)
	s := openSession(t, ctx)
	priv := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256") // base, then the 70, listed
	fake.setKeys(nil)                                       // all 74 unlisted at once: 10 go
	if err := ctx.FindObjectsInit(s, nil); err != nil {
		t.Fatalf("C_FindObjectsInit: %v", err)
	}
	ctx.FindObjectsFinal(s)
	fake.setKeys(base)
	if again := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256"); again != priv {
		t.Fatalf("p256, added first, listed again: handle %#x, was %#x", again, priv)
	}
}
