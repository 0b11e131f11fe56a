package rotation

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/zeebo/blake3"

	"github.com/sigil-agent/sigil/providers"
)

func TestREPVerifiesAndDescribesTheRotation(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	o := e.opts()
	o.PolicyHash = blake3.Sum256([]byte("policy"))
	res, err := e.rot.Rotate(context.Background(), testSlot, o)
	if err != nil {
		t.Fatal(err)
	}
	m, err := VerifyREP(res.Manifest, res.Signature, e.rot.EvidencePublicKey())
	if err != nil {
		t.Fatalf("VerifyREP: %v", err)
	}
	recs := e.records()
	var cutover, lastStep, repRec = recs[4], recs[len(recs)-2], recs[len(recs)-1]
	for _, c := range []struct {
		what      string
		got, want any
	}{
		{"tenant", m.Tenant, "payments"},
		{"slot", m.Slot, testSlot},
		{"number", m.Number, 2},
		{"old version", m.Old.Version, 1},
		{"new version", m.New.Version, 2},
		{"old kid", m.Old.KID, res.Old.KID},
		{"new kid", m.New.KID, res.New.KID},
		{"old state", m.Old.State, "accepted"},
		{"old T1", m.Old.T1, t0.Add(DefaultOverlap)},
		{"new state", m.New.State, "active"},
		{"cutover time", m.CutoverAt, cutover.Time},
		{"policy hash", m.PolicyHash, hexHash(o.PolicyHash)},
		{"canaries", [3]any{m.Canary.Count, m.Canary.Verified, m.Canary.AllVerified}, [3]any{10, 10, true}},
		{"audit first", m.Audit.FirstSeq, res.FirstSeq},
		{"audit last", m.Audit.LastSeq, lastStep.Seq},
		{"audit last hash", m.Audit.LastHash, hexHash(lastStep.Hash)},
		{"head", m.Audit.HeadSeq, lastStep.Seq},
		{"attestation", [2]any{m.Attestation.Offered, strings.HasPrefix(m.Attestation.Note, "none offered")}, [2]any{false, true}},
		{"host", m.Host, "test-host"},
		{"evidence key", m.EvidenceKey, EvidenceKeyID(e.rot.EvidencePublicKey())},
		{"rep record", repRec.Op, "rotate.rep"},
	} {
		if c.got != c.want {
			t.Errorf("%s: %v, want %v", c.what, c.got, c.want)
		}
	}
	sum := blake3.Sum256(res.Manifest)
	if !strings.Contains(repRec.Detail, hexHash(sum)) {
		t.Errorf("rep record %q does not quote the manifest hash", repRec.Detail)
	}

	// The files: the manifest exactly as signed, the raw signature, the statement.
	mp, sp, dp, _ := REPPaths(e.evDir, testSlot, 2)
	if got, _ := os.ReadFile(mp); !bytes.Equal(got, res.Manifest) {
		t.Error("rep-2.json differs from the signed manifest")
	}
	if got, _ := os.ReadFile(sp); !bytes.Equal(got, res.Signature) {
		t.Error("rep-2.sig differs from the signature")
	}
	if _, err := VerifyREPFile(mp, e.rot.EvidencePublicKey()); err != nil {
		t.Fatalf("VerifyREPFile: %v", err)
	}
	md, err := os.ReadFile(dp)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"payments", testSlot, res.Old.KID, res.New.KID, "10 of 10 verified", "none offered", m.EvidenceKey} {
		if !bytes.Contains(md, []byte(want)) {
			t.Errorf("statement lacks %q:\n%s", want, md)
		}
	}
	pubPEM, err := os.ReadFile(filepath.Join(e.evDir, "evidence-key.pub.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if pub, err := ParseEvidencePublicKey(pubPEM); err != nil || !pub.Equal(e.rot.EvidencePublicKey()) {
		t.Fatalf("evidence public key file: %v", err)
	}

	// Export from the journal gives the same bytes.
	out := t.TempDir()
	files, err := e.rot.ExportREP(testSlot, 2, out)
	if err != nil || len(files) != 3 {
		t.Fatalf("ExportREP: %v %v", files, err)
	}
	if got, _ := os.ReadFile(files[0]); !bytes.Equal(got, res.Manifest) {
		t.Error("exported manifest differs")
	}
}

// Any edited byte of the manifest or the signature fails verification.
func TestREPAnyEditedByteFails(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	res := e.rotate()
	pub := e.rot.EvidencePublicKey()
	for i := range res.Manifest {
		edited := bytes.Clone(res.Manifest)
		edited[i] ^= 0x01
		if _, err := VerifyREP(edited, res.Signature, pub); !errors.Is(err, ErrInvalidREP) {
			t.Fatalf("manifest byte %d flipped: %v", i, err)
		}
	}
	for i := range res.Signature {
		edited := bytes.Clone(res.Signature)
		edited[i] ^= 0x80
		if _, err := VerifyREP(res.Manifest, edited, pub); !errors.Is(err, ErrInvalidREP) {
			t.Fatalf("signature byte %d flipped: %v", i, err)
		}
	}
	other := newEvidenceKey(t).Public().(ed25519.PublicKey)
	for name, args := range map[string][3][]byte{
		"other key":        {res.Manifest, res.Signature, other},
		"truncated":        {res.Manifest[:len(res.Manifest)-1], res.Signature, pub},
		"appended newline": {append(bytes.Clone(res.Manifest), '\n'), res.Signature, pub},
		"no signature":     {res.Manifest, nil, pub},
		"base64 signature": {res.Manifest, []byte(base64.StdEncoding.EncodeToString(res.Signature)), pub},
	} {
		if _, err := VerifyREP(args[0], args[1], ed25519.PublicKey(args[2])); !errors.Is(err, ErrInvalidREP) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// A manifest signed by the right key but not describing a sound rotation
// fails too: the verifier re-checks kids, the CSR and every canary.
func TestREPContentChecks(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	res := e.rotate()
	other, err := e.soft.GenerateKey(context.Background(), "other", providers.KeyECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		edit func(m *Manifest)
	}{
		{"new kid", func(m *Manifest) { m.New.KID = m.Old.KID }},
		{"new public key swapped", func(m *Manifest) { m.New.PublicKey = publicKeyPEM(other.SPKI) }},
		{"canary signature replaced", func(m *Manifest) { m.Canary.Signatures[3] = m.Canary.Signatures[4] }},
		{"canary dropped", func(m *Manifest) { m.Canary.Signatures = m.Canary.Signatures[1:] }},
		{"canaries hash", func(m *Manifest) { m.Canary.SignaturesHash = hexHash([32]byte{}) }},
		{"canaries claimed verified", func(m *Manifest) { m.Canary.Verified, m.Canary.Signatures[0] = 10, m.Canary.Signatures[1] }},
		{"signing kid", func(m *Manifest) { m.Canary.SigningKID = m.Old.KID }},
		{"csr removed", func(m *Manifest) { m.CSR.PEM = "" }},
		{"evidence key id", func(m *Manifest) { m.EvidenceKey = "00" }},
		{"format", func(m *Manifest) { m.Format = "sigil-rep/0" }},
		{"audit range", func(m *Manifest) { m.Audit.FirstSeq = 0 }},
		{"slot of another tenant", func(m *Manifest) { m.Tenant = "other" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var m Manifest
			if err := json.Unmarshal(res.Manifest, &m); err != nil {
				t.Fatal(err)
			}
			tc.edit(&m)
			manifest, sig, err := e.rot.signManifest(&m)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := VerifyREP(manifest, sig, e.rot.EvidencePublicKey()); !errors.Is(err, ErrInvalidREP) {
				t.Fatalf("VerifyREP: %v, want ErrInvalidREP", err)
			}
		})
	}
	// A correctly signed but non-canonical encoding is refused as well.
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, res.Manifest, "", "  "); err != nil {
		t.Fatal(err)
	}
	sig := ed25519.Sign(e.evidence, pretty.Bytes())
	if _, err := VerifyREP(pretty.Bytes(), sig, e.rot.EvidencePublicKey()); !errors.Is(err, ErrInvalidREP) {
		t.Fatalf("non-canonical manifest: %v", err)
	}
}

func TestCanonicalJSON(t *testing.T) {
	got, err := CanonicalJSON(map[string]any{"b": 1, "a": []any{"<x>", 2}, "c": map[string]any{"z": true, "y": nil}})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"a":["<x>",2],"b":1,"c":{"y":null,"z":true}}`; string(got) != want {
		t.Fatalf("%s, want %s", got, want)
	}
}

// attestingMaker offers a device attestation for the keys it makes.
type attestingMaker struct{ KeyMaker }

func (attestingMaker) Attest(_ context.Context, k providers.KeyInfo) (Attestation, error) {
	return Attestation{Format: "test-attestation", Data: []byte("attests " + k.KID)}, nil
}

func TestREPQuotesAttestation(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	o := e.opts()
	o.Maker = attestingMaker{e.soft}
	res, err := e.rot.Rotate(context.Background(), testSlot, o)
	if err != nil {
		t.Fatal(err)
	}
	m, err := VerifyREP(res.Manifest, res.Signature, e.rot.EvidencePublicKey())
	if err != nil {
		t.Fatal(err)
	}
	data, _ := base64.StdEncoding.DecodeString(m.Attestation.Data)
	if !m.Attestation.Offered || m.Attestation.Format != "test-attestation" || string(data) != "attests "+res.New.KID {
		t.Fatalf("attestation %+v", m.Attestation)
	}
}

func TestEvidenceKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "evidence.key")
	k1, err := LoadOrCreateEvidenceKey(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v %v", st.Mode().Perm(), err)
	}
	k2, err := LoadOrCreateEvidenceKey(path)
	if err != nil || !k1.Equal(k2) {
		t.Fatalf("second load: %v, same key %v", err, k1.Equal(k2))
	}
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateEvidenceKey(path); err == nil {
		t.Fatal("group-readable evidence key accepted")
	}
	pub := k1.Public().(ed25519.PublicKey)
	for _, in := range [][]byte{MarshalEvidencePublicKey(pub), []byte(pub)} {
		if got, err := ParseEvidencePublicKey(in); err != nil || !got.Equal(pub) {
			t.Fatalf("ParseEvidencePublicKey: %v", err)
		}
	}
	if _, err := NewRotator(&Store{}, Options{EvidenceKey: nil}); err == nil {
		t.Fatal("NewRotator without an evidence key")
	}
}

// NewRotator never writes its evidence public key over a file that holds
// another key, or one it cannot read: the packs in the evidence directory
// are verified with that file. It used to replace it whatever it held. A
// first start (no file) and a restart (the same key) write it.
func TestNewRotatorKeepsAnotherKeysPublicKeyFile(t *testing.T) {
	key := func() ed25519.PrivateKey {
		_, k, err := ed25519.GenerateKey(nil)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	ours, theirs := key(), key()
	for _, tc := range []struct {
		name    string
		had     []byte // nil: no file
		refused bool
	}{
		{"no file: a first start", nil, false},
		{"the same key: a restart", MarshalEvidencePublicKey(ours.Public().(ed25519.PublicKey)), false},
		{"another key", MarshalEvidencePublicKey(theirs.Public().(ed25519.PublicKey)), true},
		{"a file that does not parse", []byte("-----BEGIN PUBLIC KEY-----\ncut"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, EvidencePublicKeyFile)
			if tc.had != nil {
				if err := os.WriteFile(path, tc.had, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			_, err := NewRotator(&Store{}, Options{EvidenceKey: ours, EvidenceDir: dir})
			after, _ := os.ReadFile(path)
			if tc.refused {
				if !errors.Is(err, ErrEvidenceKeyMismatch) || !bytes.Equal(after, tc.had) {
					t.Fatalf("NewRotator: %v, the file kept %v; want ErrEvidenceKeyMismatch and the file as it was", err, bytes.Equal(after, tc.had))
				}
				return
			}
			if got, perr := ParseEvidencePublicKey(after); err != nil || perr != nil || !got.Equal(ours.Public()) {
				t.Fatalf("NewRotator: %v; the file: %v", err, perr)
			}
		})
	}
}
