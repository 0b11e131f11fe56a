package rotation

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/zeebo/blake3"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// REPFormat is the manifest format this package writes and verifies.
const REPFormat = "sigil-rep/1"

// ErrInvalidREP is wrapped by every VerifyREP failure.
var ErrInvalidREP = errors.New("rotation evidence pack does not verify")

// Manifest is a Rotation Evidence Pack's content. Its canonical JSON
// encoding (CanonicalJSON) is what the evidence key signs.
type Manifest struct {
	Format      string              `json:"format"` // REPFormat
	Tenant      string              `json:"tenant"`
	Slot        string              `json:"slot"`   // "tenant/slot"
	Number      int                 `json:"number"` // the pack's number: the new version's
	Reason      string              `json:"reason"`
	Emergency   bool                `json:"emergency"`
	Host        string              `json:"host,omitempty"`
	StartedAt   time.Time           `json:"started_at"`
	CutoverAt   time.Time           `json:"cutover_at"`
	CompletedAt time.Time           `json:"completed_at"`
	Overlap     string              `json:"overlap"` // Go duration; "0s" for emergencies
	Old         KeyEvidence         `json:"old"`
	New         KeyEvidence         `json:"new"`
	PolicyHash  string              `json:"policy_hash"` // hex BLAKE3 of the tenant's policy
	CSR         CSREvidence         `json:"csr"`
	Canary      CanaryEvidence      `json:"canary"`
	Audit       AuditEvidence       `json:"audit"`
	Attestation AttestationEvidence `json:"attestation"`
	EvidenceKey string              `json:"evidence_key"` // EvidenceKeyID of the signing key
}

// KeyEvidence describes one version in a REP, as it is after the rotation.
type KeyEvidence struct {
	Version   int       `json:"version"`
	KID       string    `json:"kid"`
	Provider  string    `json:"provider"`
	Key       string    `json:"key"`
	URI       string    `json:"uri,omitempty"`
	KeyType   string    `json:"key_type"`
	PublicKey string    `json:"public_key"` // PEM "PUBLIC KEY" (SPKI)
	State     string    `json:"state"`
	Activated time.Time `json:"activated,omitzero"`
	T1        time.Time `json:"t1,omitzero"`
}

// CSREvidence is the CSR issued for the new key.
type CSREvidence struct {
	Subject string `json:"subject"`
	PEM     string `json:"pem"`
}

// CanaryEvidence is the canary set's result. Every signature is included,
// so a verifier re-derives the payloads (CanaryPayload) and re-verifies
// them against the new public key offline.
type CanaryEvidence struct {
	Scheme         string   `json:"scheme"` // CanaryScheme
	Algorithm      string   `json:"algorithm"`
	Count          int      `json:"count"`
	Verified       int      `json:"verified"`
	AllVerified    bool     `json:"all_verified"`
	SigningKID     string   `json:"signing_kid"`     // the kid the slot resolved to when signing
	SignaturesHash string   `json:"signatures_hash"` // hex BLAKE3-256 over len16(sig) ‖ sig, in order
	Signatures     []string `json:"signatures"`      // base64 (standard, padded)
}

// AuditEvidence anchors the rotation in the audit chain: its records are
// FirstSeq..LastSeq (other slots' records may sit between them), LastHash
// is the hash of record LastSeq, and HeadSeq/HeadHash the journal head
// when the pack was made (HeadSeq ≥ LastSeq). The pack's own record
// ("rotate.rep", quoting the manifest's BLAKE3) follows.
type AuditEvidence struct {
	FirstSeq uint64 `json:"first_seq"`
	LastSeq  uint64 `json:"last_seq"`
	LastHash string `json:"last_hash"`
	HeadSeq  uint64 `json:"head_seq"`
	HeadHash string `json:"head_hash"`
}

// AttestationEvidence is the device's attestation of the new key, if the
// provider offered one.
type AttestationEvidence struct {
	Offered bool   `json:"offered"`
	Format  string `json:"format,omitempty"`
	Data    string `json:"data,omitempty"` // base64
	Note    string `json:"note"`
}

// CanonicalJSON encodes v in the canonical form REPs are signed in: JSON
// with object keys sorted (byte order) at every level, no insignificant
// white space, no HTML escaping, numbers as written (integers only in a
// manifest). For REP manifests (ASCII keys, no floats) this is the JSON
// Canonicalization Scheme of RFC 8785.
func CanonicalJSON(v any) ([]byte, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var tree any
	if err := dec.Decode(&tree); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(tree); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// EvidenceKeyID is the fingerprint of an evidence public key:
// hex(BLAKE3-256(SPKI DER))[:32]. Verifiers pin it.
func EvidenceKeyID(pub ed25519.PublicKey) string {
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return ""
	}
	sum := blake3.Sum256(spki)
	return hex.EncodeToString(sum[:16])
}

func publicKeyPEM(spki []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki}))
}

func keyEvidence(v Version) KeyEvidence {
	return KeyEvidence{
		Version: v.Number, KID: v.KID, Provider: v.Provider, Key: v.Key, URI: v.URI, KeyType: string(v.KeyType),
		PublicKey: publicKeyPEM(v.SPKI), State: string(v.State), Activated: v.Activated.UTC(), T1: v.T1.UTC(),
	}
}

// evidence builds, signs, writes and stores the pack, and journals it.
func (u *rotation) evidence(ctx context.Context) (*Result, error) {
	r := u.r
	cur, _ := r.store.Get(u.slot)
	oldV, ok1 := cur.Version(u.old.Number)
	newV, ok2 := cur.Version(u.n)
	if !ok1 || !ok2 {
		return nil, errors.New("versions of the rotation not found")
	}
	headSeq, headHash := r.store.j.Head()
	m := &Manifest{
		Format: REPFormat, Tenant: u.tenant, Slot: u.slot, Number: u.n,
		Reason: u.opts.Reason, Emergency: u.opts.Emergency, Host: r.opts.Host,
		StartedAt: u.started.UTC(), CutoverAt: u.cutoverAt.UTC(), CompletedAt: r.now().UTC(),
		Overlap: u.opts.Overlap.String(),
		Old:     keyEvidence(oldV), New: keyEvidence(newV),
		PolicyHash: hexHash(u.opts.PolicyHash),
		CSR: CSREvidence{
			Subject: u.opts.Subject.String(),
			PEM:     string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: u.csrDER})),
		},
		Canary: CanaryEvidence{
			Scheme: CanaryScheme, Algorithm: u.canary.alg.String(), Count: u.canary.count,
			Verified: u.canary.verified, AllVerified: u.canary.verified == u.canary.count,
			SigningKID: u.canary.signingKID, SignaturesHash: hexHash(u.canary.sigsHash),
			Signatures: make([]string, len(u.canary.sigs)),
		},
		Audit: AuditEvidence{
			FirstSeq: u.firstSeq, LastSeq: u.lastSeq, LastHash: hexHash(u.lastHash),
			HeadSeq: headSeq, HeadHash: hexHash(headHash),
		},
		Attestation: AttestationEvidence{Note: "none offered: the provider has no attestation for its keys"},
		EvidenceKey: EvidenceKeyID(r.evidencePub),
	}
	for i, s := range u.canary.sigs {
		m.Canary.Signatures[i] = base64.StdEncoding.EncodeToString(s)
	}
	if a := u.attestation; a != nil {
		m.Attestation = AttestationEvidence{Offered: true, Format: a.Format,
			Data: base64.StdEncoding.EncodeToString(a.Data), Note: "offered by the provider"}
	}
	manifest, sig, err := r.signManifest(m)
	if err != nil {
		return nil, err
	}
	sum := blake3.Sum256(manifest)
	rec := u.rec("rotate.rep", u.n, u.newKey.KID,
		fmt.Sprintf("rep-%d manifest blake3 %x, evidence key %s", u.n, sum, m.EvidenceKey))
	err = u.append(ctx, rec,
		journal.StateChange{Key: repKey(u.tenant, u.name, u.n, "json"), Value: manifest},
		journal.StateChange{Key: repKey(u.tenant, u.name, u.n, "sig"), Value: sig})
	if err != nil && u.evidenceStored(ctx, manifest) {
		// The pack is in the journal, its record with it: the rotation
		// is done. Failing it now would retire the version the stored
		// pack vouches for.
		r.log.Warn("the evidence pack's commit was not confirmed but landed; the rotation stands",
			zap.String("slot", u.slot), zap.Int("rep", u.n), zap.Error(err))
		err = nil
	}
	if err != nil {
		return nil, err
	}
	// The files after the commit: written before it, a crash between the
	// two would leave a pack on disk that verifies although the journal,
	// where the rotation is recorded, has none. The journal holds the
	// pack either way; `sigil rep export` writes it out again.
	var files []string
	if r.opts.EvidenceDir != "" {
		if files, err = WriteREP(r.opts.EvidenceDir, m, manifest, sig); err != nil {
			r.log.Error("evidence pack stored in the journal, but its files could not be written; export it with sigil rep export",
				zap.String("slot", u.slot), zap.Int("rep", u.n), zap.Error(err))
			files = nil
		}
	}
	return &Result{
		Slot: u.slot, Old: oldV, New: newV, REP: u.n, Manifest: manifest, Signature: sig, Files: files,
		FirstSeq: u.firstSeq, LastSeq: u.lastSeq,
	}, nil
}

// evidenceStored reports whether the pack's commit, which the journal did
// not confirm, landed all the same (journal doc.go, "Failures"): once the
// journal has resolved every commit before (Barrier), the stored manifest
// is read back. When that cannot be told, it reports false, and the
// rotation fails and is undone as before.
func (u *rotation) evidenceStored(ctx context.Context, manifest []byte) bool {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	defer cancel()
	if err := u.r.store.j.Barrier(cctx); err != nil {
		return false
	}
	stored, err := u.r.store.j.Get(repKey(u.tenant, u.name, u.n, "json"))
	return err == nil && bytes.Equal(stored, manifest)
}

func (r *Rotator) signManifest(m *Manifest) (manifest, sig []byte, err error) {
	if manifest, err = CanonicalJSON(m); err != nil {
		return nil, nil, fmt.Errorf("encode manifest: %w", err)
	}
	if sig, err = r.opts.EvidenceKey.Sign(rand.Reader, manifest, crypto.Hash(0)); err != nil {
		return nil, nil, fmt.Errorf("sign manifest with the evidence key: %w", err)
	}
	if !ed25519.Verify(r.evidencePub, manifest, sig) {
		return nil, nil, errors.New("the evidence key's signature does not verify")
	}
	return manifest, sig, nil
}

// VerifyREP checks a Rotation Evidence Pack offline: the detached Ed25519
// signature over the exact manifest bytes with evidencePub, that the
// manifest is in canonical form and names that key, and its content: each
// kid matches its public key, the CSR is signed by the new key and is for
// it, and every canary signature verifies against the new public key and
// matches the quoted hash. Any edited byte of the manifest or signature
// fails. Errors wrap ErrInvalidREP.
func VerifyREP(manifest, sig []byte, evidencePub ed25519.PublicKey) (*Manifest, error) {
	bad := func(format string, args ...any) (*Manifest, error) {
		return nil, fmt.Errorf("%w: %s", ErrInvalidREP, fmt.Sprintf(format, args...))
	}
	if len(evidencePub) != ed25519.PublicKeySize {
		return bad("evidence public key of %d bytes", len(evidencePub))
	}
	if len(sig) != ed25519.SignatureSize {
		return bad("signature of %d bytes (want a raw %d-byte Ed25519 signature)", len(sig), ed25519.SignatureSize)
	}
	if !ed25519.Verify(evidencePub, manifest, sig) {
		return bad("the signature does not match the manifest and this evidence key (edited, or signed by another key)")
	}
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(manifest))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return bad("manifest: %v", err)
	}
	if m.Format != REPFormat {
		return bad("format %q (this verifier knows %q)", m.Format, REPFormat)
	}
	if canon, err := CanonicalJSON(&m); err != nil || !bytes.Equal(canon, manifest) {
		return bad("manifest is not in canonical form")
	}
	if m.EvidenceKey != EvidenceKeyID(evidencePub) {
		return bad("manifest names evidence key %s, verified with %s", m.EvidenceKey, EvidenceKeyID(evidencePub))
	}
	if err := checkManifestContent(&m); err != nil {
		return bad("%v", err)
	}
	return &m, nil
}

// VerifyREPFile verifies the pack at manifestPath (rep-<n>.json) with its
// signature beside it (rep-<n>.sig), and that it is the pack its place
// names (CheckREPPlace): `sigil rep verify FILE`.
func VerifyREPFile(manifestPath string, evidencePub ed25519.PublicKey) (*Manifest, error) {
	manifest, err := os.ReadFile(manifestPath)
	if err != nil {
		return nil, err
	}
	sig, err := os.ReadFile(strings.TrimSuffix(manifestPath, ".json") + ".sig")
	if err != nil {
		return nil, err
	}
	m, err := VerifyREP(manifest, sig, evidencePub)
	if err != nil {
		return nil, err
	}
	if err := CheckREPPlace(manifestPath, m); err != nil {
		return nil, err
	}
	return m, nil
}

// CheckREPPlace checks that a verified pack read from path is the pack
// that path names. A file named rep-<n>.json (REPPaths: the agent and
// `sigil rep export` write <tenant>/<slot>/rep-<n>.json) must hold pack n
// of that slot: the signature binds the manifest to the evidence key,
// not to a place, so an older pack replayed, or another slot's, put in
// its place would verify as well. A file under any other name is not
// checked: it is verified as what its manifest says it is. Errors wrap
// ErrInvalidREP.
func CheckREPPlace(path string, m *Manifest) error {
	base := filepath.Base(path)
	digits, ok := strings.CutPrefix(base, "rep-")
	digits, ok2 := strings.CutSuffix(digits, ".json")
	if !ok || !ok2 || digits == "" || strings.Trim(digits, "0123456789") != "" {
		return nil
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrInvalidREP, path, err)
	}
	dir := filepath.Dir(abs)
	place := filepath.Base(filepath.Dir(dir)) + "/" + filepath.Base(dir)
	if base != "rep-"+strconv.Itoa(m.Number)+".json" || place != m.Slot {
		return fmt.Errorf("%w: %s is the place of pack %s of %s, but holds pack %d of %s (another pack put in its place; a copy kept outside TENANT/SLOT/ verifies under another file name)",
			ErrInvalidREP, base, digits, place, m.Number, m.Slot)
	}
	return nil
}

func parseKeyEvidence(k *KeyEvidence) (crypto.PublicKey, []byte, error) {
	block, rest := pem.Decode([]byte(k.PublicKey))
	if block == nil || block.Type != "PUBLIC KEY" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, nil, fmt.Errorf("v%d: public key is not one PEM PUBLIC KEY block", k.Version)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("v%d: public key: %v", k.Version, err)
	}
	if kt, err := providers.KeyTypeOf(pub); err != nil || string(kt) != k.KeyType {
		return nil, nil, fmt.Errorf("v%d: public key is not a %s key", k.Version, k.KeyType)
	}
	if providers.ComputeKID(block.Bytes, k.Provider, k.Key) != k.KID {
		return nil, nil, fmt.Errorf("v%d: kid %s does not match its public key, provider and name", k.Version, k.KID)
	}
	return pub, block.Bytes, nil
}

func checkManifestContent(m *Manifest) error {
	if tenant, _, err := SplitSlot(m.Slot); err != nil || tenant != m.Tenant {
		return fmt.Errorf("slot %q of tenant %q", m.Slot, m.Tenant)
	}
	if m.New.Version != m.Number || m.Old.Version >= m.New.Version {
		return fmt.Errorf("versions v%d -> v%d in pack %d", m.Old.Version, m.New.Version, m.Number)
	}
	if _, _, err := parseKeyEvidence(&m.Old); err != nil {
		return err
	}
	newPub, newSPKI, err := parseKeyEvidence(&m.New)
	if err != nil {
		return err
	}
	block, _ := pem.Decode([]byte(m.CSR.PEM))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return errors.New("csr: no PEM CERTIFICATE REQUEST")
	}
	if err := checkCSR(block.Bytes, newSPKI); err != nil {
		return fmt.Errorf("csr: %v", err)
	}
	c := &m.Canary
	if c.Scheme != CanaryScheme {
		return fmt.Errorf("canary scheme %q", c.Scheme)
	}
	if c.Count != len(c.Signatures) || c.Count < 1 {
		return fmt.Errorf("canary count %d with %d signatures", c.Count, len(c.Signatures))
	}
	if c.SigningKID != m.New.KID {
		return fmt.Errorf("canaries signed by kid %s, not the new version's", c.SigningKID)
	}
	alg, err := parseAlgorithm(c.Algorithm)
	if err != nil {
		return fmt.Errorf("canary algorithm: %v", err)
	}
	sigs := make([][]byte, len(c.Signatures))
	verified := 0
	for i, s := range c.Signatures {
		if sigs[i], err = base64.StdEncoding.DecodeString(s); err != nil {
			return fmt.Errorf("canary %d: %v", i, err)
		}
		if providers.Verify(newPub, alg, canaryInput(alg, CanaryPayload(m.Slot, m.Number, i)), sigs[i]) == nil {
			verified++
		}
	}
	if verified != c.Verified || c.AllVerified != (verified == c.Count) || !c.AllVerified {
		return fmt.Errorf("canaries: %d of %d verify, the pack says %d (all_verified %v)", verified, c.Count, c.Verified, c.AllVerified)
	}
	if h := canarySignaturesHash(sigs); hexHash(h) != c.SignaturesHash {
		return errors.New("canary signatures hash does not match the signatures")
	}
	if m.Audit.FirstSeq == 0 || m.Audit.LastSeq < m.Audit.FirstSeq || m.Audit.HeadSeq < m.Audit.LastSeq {
		return fmt.Errorf("audit range %d..%d with head %d", m.Audit.FirstSeq, m.Audit.LastSeq, m.Audit.HeadSeq)
	}
	return nil
}

// parseAlgorithm reverses providers.Algorithm.String for the algorithms a
// canary set uses (each key type's default).
func parseAlgorithm(s string) (providers.Algorithm, error) {
	for _, kt := range providers.KeyTypes {
		if a := kt.DefaultAlgorithm(); a.String() == s {
			return a, nil
		}
	}
	return providers.Algorithm{}, fmt.Errorf("%q: %w", s, providers.ErrUnsupportedAlgorithm)
}

// REPPaths are the files of pack n of a slot under dir.
func REPPaths(dir, slot string, n int) (manifest, sig, statement string, err error) {
	tenant, name, err := SplitSlot(slot)
	if err != nil {
		return "", "", "", err
	}
	base := filepath.Join(dir, tenant, name, "rep-"+strconv.Itoa(n))
	return base + ".json", base + ".sig", base + ".md", nil
}

// WriteREP writes a pack's files: <dir>/<tenant>/<slot>/rep-<n>.json (the
// canonical manifest, exactly the signed bytes), rep-<n>.sig (the raw
// 64-byte Ed25519 signature) and rep-<n>.md (the statement rendered from
// m). Each file is written whole or not at all.
func WriteREP(dir string, m *Manifest, manifest, sig []byte) ([]string, error) {
	mp, sp, dp, err := REPPaths(dir, m.Slot, m.Number)
	if err != nil {
		return nil, err
	}
	var written []string
	for _, f := range []struct {
		path string
		data []byte
	}{{mp, manifest}, {sp, sig}, {dp, RenderREPStatement(m)}} {
		if err := writeFileAtomic(filepath.Dir(f.path), filepath.Base(f.path), f.data); err != nil {
			for _, w := range written {
				_ = os.Remove(w)
			}
			return nil, fmt.Errorf("write %s: %w", f.path, err)
		}
		written = append(written, f.path)
	}
	return written, nil
}

// ExportREP writes stored pack n of slot into dir (as WriteREP) after
// verifying it with the rotator's evidence key: `sigil rep export`.
func (r *Rotator) ExportREP(slot string, n int, dir string) ([]string, error) {
	manifest, sig, err := r.store.REP(slot, n)
	if err != nil {
		return nil, err
	}
	m, err := VerifyREP(manifest, sig, r.evidencePub)
	if err != nil {
		return nil, fmt.Errorf("stored rep %d of %s: %w", n, slot, err)
	}
	return WriteREP(dir, m, manifest, sig)
}

// writeFileAtomic writes data to dir/name through a temporary file, an
// fsync and a rename (mode 0644: evidence is for auditors, not secret).
func writeFileAtomic(dir, name string, data []byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".tmp-"+name+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// LoadOrCreateEvidenceKey loads the agent's Ed25519 evidence key from path
// (PKCS#8 PEM), creating it with mode 0600 when the file does not exist.
// The file is read and written as software keys are (software.ReadKeyFile,
// WriteKeyFile): a file readable by group or others is refused, and an
// existing file is never replaced.
func LoadOrCreateEvidenceKey(path string) (ed25519.PrivateKey, error) {
	key, err := loadEvidenceKey(path)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := software.WriteKeyFile(path, priv); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return loadEvidenceKey(path) // another process made it first
		}
		return nil, fmt.Errorf("evidence key %s: %w", path, err)
	}
	return priv, nil
}

func loadEvidenceKey(path string) (ed25519.PrivateKey, error) {
	signer, err := software.ReadKeyFile(path)
	if err != nil {
		return nil, err
	}
	priv, ok := signer.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("evidence key %s: %T, want Ed25519", path, signer)
	}
	return priv, nil
}

// MarshalEvidencePublicKey encodes an evidence public key as PEM (SPKI).
func MarshalEvidencePublicKey(pub ed25519.PublicKey) []byte {
	spki, _ := x509.MarshalPKIXPublicKey(pub)
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki})
}

// ParseEvidencePublicKey reads an evidence public key: PEM (as
// MarshalEvidencePublicKey writes it) or the raw 32 bytes.
func ParseEvidencePublicKey(b []byte) (ed25519.PublicKey, error) {
	if block, _ := pem.Decode(b); block != nil {
		if block.Type != "PUBLIC KEY" {
			return nil, fmt.Errorf("evidence public key: PEM %s, want PUBLIC KEY", block.Type)
		}
		pub, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("evidence public key: %w", err)
		}
		ed, ok := pub.(ed25519.PublicKey)
		if !ok {
			return nil, fmt.Errorf("evidence public key is %T, want Ed25519", pub)
		}
		return ed, nil
	}
	if len(b) == ed25519.PublicKeySize {
		return ed25519.PublicKey(bytes.Clone(b)), nil
	}
	return nil, errors.New("evidence public key: neither PEM nor 32 raw bytes")
}
