package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha512"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/proto"
)

// verify-signature --key looks the key up once (its type picks the hash)
// and then asks the agent to verify: both steps must see the same key
// version. The fake agent is a slot that rotated between the two: the
// lookup answered kid-v1 (P-384), and the slot's active version is now
// kid-v2 (P-256), which a Verify by name alone reaches. Verify used to
// send the name only, so a kid-v1 signature was INVALID and a kid-v2 one
// was "OK: kid kid-v1"; it now pins the kid it looked up.
func TestVerifySignatureVerifiesTheKeyItLookedUp(t *testing.T) {
	v1, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	v2, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	spki, err := x509.MarshalPKIXPublicKey(&v1.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	versions := map[string]*ecdsa.PublicKey{"kid-v1": &v1.PublicKey, "kid-v2": &v2.PublicKey}

	socket := filepath.Join(shortSocketDir(t), "rotating.sock")
	listenUnix(t, socket, func(nc net.Conn) {
		go fakeAgent(nc, func(req *proto.Request) *proto.Response {
			switch req.Op {
			case proto.OpPublicKey: // before the cut-over
				return &proto.Response{Code: proto.OK, Key: "release", KID: "kid-v1", KeyType: "ecdsa-p384", Pub: spki}
			case proto.OpVerify: // after it
				kid := req.KID
				if kid == "" {
					kid = "kid-v2"
				}
				pub, ok := versions[kid]
				if !ok || req.Key != "release" {
					return &proto.Response{Code: proto.NotFound, Msg: "no such key"}
				}
				return &proto.Response{Code: proto.OK, Key: "release", KID: kid, Valid: ecdsa.VerifyASN1(pub, req.Digest, req.Sig)}
			}
			return &proto.Response{Code: proto.BadRequest, Msg: "unexpected op"}
		})
	})

	dir := t.TempDir()
	in := filepath.Join(dir, "release.tar")
	if err := os.WriteFile(in, []byte("the release"), 0o600); err != nil {
		t.Fatal(err)
	}
	digest := sha512.Sum384([]byte("the release"))

	for _, tc := range []struct {
		name   string
		signer *ecdsa.PrivateKey
		code   int
		says   string
	}{
		{"signed by the version looked up", v1, exitOK, `signature OK: key "release" (kid kid-v1)`},
		{"signed by the version that replaced it", v2, exitFailure, `signature INVALID: not made by key "release" (kid kid-v1)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sig, err := ecdsa.SignASN1(rand.Reader, tc.signer, digest[:])
			if err != nil {
				t.Fatal(err)
			}
			sigPath := filepath.Join(dir, "sig")
			if err := os.WriteFile(sigPath, sig, 0o600); err != nil {
				t.Fatal(err)
			}
			stdout, stderr, code := run(t, "--socket", socket, "verify-signature", "--in", in, "--sig", sigPath, "--key", "release")
			if code != tc.code || !strings.Contains(stdout+stderr, tc.says) {
				t.Fatalf("exit %d (want %d), want %q:\nstdout: %s\nstderr: %s", code, tc.code, tc.says, stdout, stderr)
			}
		})
	}
}
