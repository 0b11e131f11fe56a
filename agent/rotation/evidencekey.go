package rotation

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// EvidencePublicKeyFile is the name of the evidence public key in the
// evidence directory; every pack's statement points at it.
const EvidencePublicKeyFile = "evidence-key.pub.pem"

var (
	// ErrEvidenceKeyLost: the evidence key file is missing while evidence
	// it signed is kept (its public key file, packs). Making a new key
	// would leave those packs pointing at a public key that no longer
	// verifies them, so only an operator can choose: restore the key, or
	// keep the old public key aside and begin a new one.
	ErrEvidenceKeyLost = errors.New("evidence key lost")
	// ErrEvidenceKeyMismatch: the evidence directory's public key file
	// holds another key than the rotator's (or does not parse). It is not
	// overwritten: the packs kept there are verified with it.
	ErrEvidenceKeyMismatch = errors.New("evidence public key file holds another key")
)

// KeptEvidencePublicKeyFile is the name under which an evidence key's
// public half is kept in the evidence directory once a new evidence key has
// replaced it, so the packs it signed still verify on this host.
func KeptEvidencePublicKeyFile(id string) string { return "evidence-key-" + id + ".pub.pem" }

// WriteEvidencePublicKey writes pub as dir's EvidencePublicKeyFile, where
// every pack's statement under dir looks for it, and returns its path. A
// file there holding another key, or one that does not parse, is not
// replaced: the packs kept beside it are verified with it. The error then
// wraps ErrEvidenceKeyMismatch and names where to keep the old key
// (KeptEvidencePublicKeyFile).
func WriteEvidencePublicKey(dir string, pub ed25519.PublicKey) (string, error) {
	path := filepath.Join(dir, EvidencePublicKeyFile)
	switch had, err := readEvidencePublicKey(path); {
	case err == nil && had.Equal(pub):
		return path, nil
	case err == nil:
		return "", fmt.Errorf("%w: %s holds evidence key %s, not this agent's %s; it verifies the packs kept there and is not replaced (restore the evidence key it belongs to, or move it to %s to keep it beside them and begin with this key)",
			ErrEvidenceKeyMismatch, path, EvidenceKeyID(had), EvidenceKeyID(pub), filepath.Join(dir, KeptEvidencePublicKeyFile(EvidenceKeyID(had))))
	case !errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("%w: %w", ErrEvidenceKeyMismatch, err)
	}
	if err := writeFileAtomic(dir, EvidencePublicKeyFile, MarshalEvidencePublicKey(pub)); err != nil {
		return "", fmt.Errorf("evidence dir: %w", err)
	}
	return path, nil
}

// CopyEvidencePublicKey writes pub as dir/name, replacing whatever is
// there: the agent's own copy of the key in force (DATA_DIR/evidence.pub),
// for operators. It is replaced whole, through a temporary file and a
// rename, as written in place an agent killed during the write would leave
// it cut short; a file already holding pub is left as it is.
func CopyEvidencePublicKey(dir, name string, pub ed25519.PublicKey) error {
	if had, err := readEvidencePublicKey(filepath.Join(dir, name)); err == nil && had.Equal(pub) {
		return nil
	}
	return writeFileAtomic(dir, name, MarshalEvidencePublicKey(pub))
}

// OpenEvidenceKey loads the evidence key at keyPath. It creates one
// (LoadOrCreateEvidenceKey) only when no evidence of an earlier key is
// kept: no public key file in evidenceDir, and every pack there and in
// store signed by a key whose public half is kept aside in evidenceDir
// (KeptEvidencePublicKeyFile). Otherwise the key file was lost and the
// error wraps ErrEvidenceKeyLost, naming the key the evidence needs and
// the ways on. store may be nil.
func OpenEvidenceKey(ctx context.Context, keyPath, evidenceDir string, store *Store) (ed25519.PrivateKey, error) {
	key, err := loadEvidenceKey(keyPath)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	pubPath := filepath.Join(evidenceDir, EvidencePublicKeyFile)
	pub, err := readEvidencePublicKey(pubPath)
	switch {
	case err == nil:
		id := EvidenceKeyID(pub)
		return nil, fmt.Errorf("%w: %s is missing, and %s holds evidence key %s, which the packs it signed are verified with: restore %s; or, to begin a new evidence key, move %s to %s (kept there, it still verifies the old packs)",
			ErrEvidenceKeyLost, keyPath, pubPath, id, keyPath, pubPath, filepath.Join(evidenceDir, KeptEvidencePublicKeyFile(id)))
	case !errors.Is(err, fs.ErrNotExist):
		// Fail closed: what cannot be read may be the key the packs need.
		return nil, fmt.Errorf("%w: %s is missing, and %w", ErrEvidenceKeyLost, keyPath, err)
	}
	needed, err := packEvidenceKeys(ctx, evidenceDir, store)
	if err != nil {
		return nil, fmt.Errorf("evidence key %s is missing; reading the packs kept: %w", keyPath, err)
	}
	for _, n := range needed {
		kept := filepath.Join(evidenceDir, KeptEvidencePublicKeyFile(n.id))
		if pub, err := readEvidencePublicKey(kept); err == nil && EvidenceKeyID(pub) == n.id {
			continue
		}
		return nil, fmt.Errorf("%w: %s is missing, and packs signed by evidence key %s are kept (%s), its public key not beside them: restore %s; or, to begin a new evidence key, put that key's public key (the old %s; DATA_DIR/evidence.pub holds it until a new key begins) at %s",
			ErrEvidenceKeyLost, keyPath, n.id, n.where, keyPath, EvidencePublicKeyFile, kept)
	}
	return LoadOrCreateEvidenceKey(keyPath)
}

// readEvidencePublicKey reads an evidence public key file (PEM or raw).
func readEvidencePublicKey(path string) (ed25519.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pub, err := ParseEvidencePublicKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return pub, nil
}

// NamedEvidenceKey is the evidence key fingerprint a manifest names
// (its evidence_key), read without verifying anything: "" when the
// manifest does not parse or names nothing that looks like a fingerprint
// (EvidenceKeyID), so what an edited file says is never shown raw. It
// tells which key a pack needs, as its signature cannot.
func NamedEvidenceKey(manifest []byte) string {
	var m struct {
		EvidenceKey string `json:"evidence_key"`
	}
	if json.Unmarshal(manifest, &m) != nil || len(m.EvidenceKey) != 32 || strings.Trim(m.EvidenceKey, "0123456789abcdef") != "" {
		return ""
	}
	return m.EvidenceKey
}

type packKey struct{ id, where string }

// packEvidenceKeys lists the evidence keys the packs name, once each with
// the first pack found: the files under evidenceDir, then the journal's.
func packEvidenceKeys(ctx context.Context, evidenceDir string, store *Store) ([]packKey, error) {
	var out []packKey
	add := func(manifest []byte, where string) {
		// A file that names no key cannot be tied to one; verifying it
		// fails whatever key is made.
		id := NamedEvidenceKey(manifest)
		if id == "" {
			return
		}
		if !slices.ContainsFunc(out, func(k packKey) bool { return k.id == id }) {
			out = append(out, packKey{id, where})
		}
	}
	if evidenceDir != "" {
		files, err := filepath.Glob(filepath.Join(evidenceDir, "*", "*", "rep-*.json"))
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return nil, err
			}
			add(b, f)
		}
	}
	if store == nil {
		return out, nil
	}
	for _, sl := range store.Slots() {
		nums, err := store.REPNumbers(ctx, sl.FullName())
		if err != nil {
			return nil, err
		}
		for _, n := range nums {
			manifest, _, err := store.REP(sl.FullName(), n)
			if err != nil {
				return nil, err
			}
			add(manifest, fmt.Sprintf("pack %d of %s in the journal", n, sl.FullName()))
		}
	}
	return out, nil
}
