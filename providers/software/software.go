package software

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/sigil-agent/sigil/providers"
)

// KeyConfig names one key and its type.
type KeyConfig struct {
	Name string
	Type providers.KeyType
}

// Config configures a software provider.
type Config struct {
	ID      string      // provider id, part of every kid
	DataDir string      // keys live in DataDir/<escaped name>.pem
	Keys    []KeyConfig // generated when absent, loaded when present
}

// Provider holds software keys in memory.
type Provider struct {
	id  string
	dir string

	mu     sync.RWMutex
	keys   map[string]*softKey
	order  []string
	closed bool

	genMu sync.Mutex // serializes GenerateKey, which runs without mu
}

type softKey struct {
	info   providers.KeyInfo
	signer crypto.Signer
}

var _ providers.Provider = (*Provider)(nil)

// Open loads the configured keys from cfg.DataDir, generating each one that
// does not exist yet. A key file whose type differs from the configuration is
// an error, never overwritten: it may be the only copy of a key in use.
func Open(cfg Config) (*Provider, error) {
	if cfg.ID == "" {
		return nil, errors.New("software provider: empty id")
	}
	if cfg.DataDir == "" {
		return nil, fmt.Errorf("software provider %s: empty data dir", cfg.ID)
	}
	if err := PrivateDir(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("software provider %s: %w", cfg.ID, err)
	}
	if err := RemoveStaleKeyTemps(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("software provider %s: %w", cfg.ID, err)
	}
	p := &Provider{id: cfg.ID, dir: cfg.DataDir, keys: make(map[string]*softKey)}
	for _, kc := range cfg.Keys {
		if _, dup := p.keys[kc.Name]; dup {
			return nil, fmt.Errorf("software provider %s: key %q configured twice", cfg.ID, kc.Name)
		}
		k, err := p.loadOrGenerate(kc)
		if err != nil {
			return nil, fmt.Errorf("software provider %s: key %q: %w", cfg.ID, kc.Name, err)
		}
		p.keys[kc.Name] = k
		p.order = append(p.order, kc.Name)
	}
	return p, nil
}

// ID implements providers.Provider.
func (p *Provider) ID() string { return p.id }

// Keys implements providers.Provider.
func (p *Provider) Keys(context.Context) ([]providers.KeyInfo, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	out := make([]providers.KeyInfo, 0, len(p.order))
	for _, name := range p.order {
		out = append(out, p.keys[name].info)
	}
	return out, nil
}

// Sign implements providers.Provider.
func (p *Provider) Sign(_ context.Context, name string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	p.mu.RLock()
	k, ok := p.keys[name]
	closed := p.closed
	p.mu.RUnlock()
	if closed {
		return nil, fmt.Errorf("software sign %s: provider closed: %w", name, providers.ErrUnavailable)
	}
	if !ok {
		return nil, fmt.Errorf("software sign %s: %w", name, providers.ErrNotFound)
	}
	// Go's signers do not refuse a scheme of another family: an RSA key
	// given Hash(0) signs its input raw, without a DigestInfo, and an
	// ECDSA key signs whatever the label says. The agent checks first,
	// but a provider must not depend on it (the PKCS#11 one does not).
	if err := providers.CheckRequest(k.info.Type, alg, digest); err != nil {
		return nil, fmt.Errorf("software sign %s: %w", name, err)
	}
	var opts crypto.SignerOpts = alg.Hash
	switch alg.Scheme {
	case providers.SchemePSS:
		// Salt length = hash length: what TLS 1.3 requires and what AWS KMS and
		// PKCS#11 tokens produce, so every provider's PSS signatures look alike.
		opts = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: alg.Hash}
	case providers.SchemeEd25519:
		opts = crypto.Hash(0)
	}
	sig, err := k.signer.Sign(rand.Reader, digest, opts)
	if err != nil {
		return nil, fmt.Errorf("software sign %s %s: %w", name, alg, err)
	}
	return sig, nil
}

// GenerateKey creates and persists a new key and serves it from now on.
// Rotation uses it for the next version of a slot.
//
// The key is made and written without p.mu: an RSA-4096 generation takes
// seconds, and Sign of every other key waits for p.mu. genMu keeps two
// generations apart, and WriteKeyFile never replaces a file.
func (p *Provider) GenerateKey(_ context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	p.genMu.Lock()
	defer p.genMu.Unlock()
	p.mu.RLock()
	_, dup := p.keys[name]
	p.mu.RUnlock()
	if dup {
		return providers.KeyInfo{}, fmt.Errorf("software generate %s: key exists", name)
	}
	if _, err := os.Stat(p.keyPath(name)); err == nil {
		return providers.KeyInfo{}, fmt.Errorf("software generate %s: key file exists", name)
	}
	k, err := p.loadOrGenerate(KeyConfig{Name: name, Type: kt})
	if err != nil {
		return providers.KeyInfo{}, fmt.Errorf("software generate %s: %w", name, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return providers.KeyInfo{}, fmt.Errorf("software generate %s: provider closed: %w", name, providers.ErrUnavailable)
	}
	if _, dup := p.keys[name]; dup { // adopted meanwhile, from the file just written
		return providers.KeyInfo{}, fmt.Errorf("software generate %s: key exists", name)
	}
	p.keys[name] = k
	p.order = append(p.order, name)
	return k.info, nil
}

// Adopt starts serving a key this provider generated earlier (a rotated key
// version, after a restart) from its file in the data dir. It never
// generates: a missing file is an error.
func (p *Provider) Adopt(name string, kt providers.KeyType) (providers.KeyInfo, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if k, ok := p.keys[name]; ok {
		return k.info, nil
	}
	if _, err := os.Stat(p.keyPath(name)); err != nil {
		return providers.KeyInfo{}, fmt.Errorf("software adopt %s: %w", name, err)
	}
	k, err := p.loadOrGenerate(KeyConfig{Name: name, Type: kt})
	if err != nil {
		return providers.KeyInfo{}, fmt.Errorf("software adopt %s: %w", name, err)
	}
	p.keys[name] = k
	p.order = append(p.order, name)
	return k.info, nil
}

// DestroyKey stops serving the key name and removes its key file: a key a
// rotation generated and never used (rotation.KeyDestroyer). check is given
// the key's info first; its error keeps the key and is returned. A key that
// is neither served nor has a file is an error wrapping
// providers.ErrNotFound.
func (p *Provider) DestroyKey(_ context.Context, name string, check func(providers.KeyInfo) error) error {
	fail := func(err error) error { return fmt.Errorf("software destroy %s: %w", name, err) }
	// No generation of the same name meanwhile.
	p.genMu.Lock()
	defer p.genMu.Unlock()
	path := p.keyPath(name)
	p.mu.RLock()
	k := p.keys[name]
	p.mu.RUnlock()
	var info providers.KeyInfo
	if k != nil {
		info = k.info
	} else {
		signer, err := ReadKeyFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			return fail(providers.ErrNotFound)
		}
		if err != nil {
			return fail(err)
		}
		if info, err = providers.NewKeyInfo(p.id, name, signer.Public()); err != nil {
			return fail(err)
		}
	}
	if err := check(info); err != nil {
		return fail(err)
	}
	p.mu.Lock()
	if k := p.keys[name]; k != nil && k.info.KID != info.KID {
		p.mu.Unlock()
		return fail(errors.New("another key was adopted under the name meanwhile"))
	}
	delete(p.keys, name)
	for i, n := range p.order {
		if n == name {
			p.order = append(p.order[:i:i], p.order[i+1:]...)
			break
		}
	}
	p.mu.Unlock()
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fail(err)
	}
	// The removal must last: a key file back after a crash is a key
	// nothing names.
	if err := syncDir(p.dir); err != nil {
		return fail(err)
	}
	return nil
}

// Close implements providers.Provider.
func (p *Provider) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	p.keys = map[string]*softKey{}
	p.order = nil
	return nil
}

func (p *Provider) keyPath(name string) string {
	// PathEscape keeps slot-style names ("payments/release") inside the directory.
	return filepath.Join(p.dir, url.PathEscape(name)+".pem")
}

func (p *Provider) loadOrGenerate(kc KeyConfig) (*softKey, error) {
	path := p.keyPath(kc.Name)
	signer, err := ReadKeyFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if signer, err = generate(kc.Type); err != nil {
			return nil, err
		}
		if err := WriteKeyFile(path, signer); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	}
	info, err := providers.NewKeyInfo(p.id, kc.Name, signer.Public())
	if err != nil {
		return nil, err
	}
	if info.Type != kc.Type {
		return nil, fmt.Errorf("key file %s holds a %s key, configuration says %s", path, info.Type, kc.Type)
	}
	return &softKey{info: info, signer: signer}, nil
}

func generate(kt providers.KeyType) (crypto.Signer, error) {
	switch kt {
	case providers.KeyECDSAP256:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case providers.KeyECDSAP384:
		return ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case providers.KeyRSA2048:
		return rsa.GenerateKey(rand.Reader, 2048)
	case providers.KeyRSA3072:
		return rsa.GenerateKey(rand.Reader, 3072)
	case providers.KeyRSA4096:
		return rsa.GenerateKey(rand.Reader, 4096)
	case providers.KeyEd25519:
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		return priv, err
	}
	return nil, fmt.Errorf("key type %q: %w", kt, providers.ErrUnsupportedAlgorithm)
}

// PrivateDir makes dir a directory for this user alone: created 0700, or,
// when it exists, refused unless this user owns it and then made 0700. A
// directory another user made first (a pre-made path under /tmp, a
// data_dir pointed at the wrong place) would let them plant keys, read the
// journal or delete it. Each level it creates is fsynced into its parent.
func PrivateDir(dir string) error {
	if err := mkdirAllSynced(dir); err != nil {
		return err
	}
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if uid, ok := providers.FileOwner(st); ok && uid != os.Getuid() {
		return fmt.Errorf("directory %s belongs to uid %d, not us (%d): refusing it", dir, uid, os.Getuid())
	}
	if st.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return err
		}
	}
	return nil
}

// mkdirAllSynced is os.MkdirAll(dir, 0o700) with each directory it creates
// fsynced into its parent. WriteKeyFile fsyncs a key and the directory that
// holds it, but not that directory's own entry: after a power cut on a first
// start, DATA_DIR/keys/<id> could be gone with the keys in it while the
// journal, synced since, names their kids, and the next start would make
// new keys under new kids.
func mkdirAllSynced(dir string) error {
	st, err := os.Stat(dir)
	if err == nil {
		if !st.IsDir() {
			return fmt.Errorf("%s is not a directory", dir)
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	parent := filepath.Dir(dir)
	if parent != dir {
		if err := mkdirAllSynced(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil // made meanwhile by another process, which syncs it; PrivateDir checks whose it is
		}
		return err
	}
	if err := syncDir(parent); err != nil && !errors.Is(err, fs.ErrPermission) {
		return err
	}
	// A parent this user may write into but not read (mode 0300, say)
	// cannot be opened to be synced: the directory is made all the same,
	// as os.MkdirAll made it before.
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// keyTempPattern names WriteKeyFile's temp files.
const keyTempPattern = ".tmp-key-*"

// staleKeyTempAge is the age from which a key temp file is a crash's
// leftover. WriteKeyFile holds its temp file for one encode and fsync, far
// less than this; a younger one may be a write in flight, as nothing locks a
// key dir: a second agent started on the same data dir opens its providers
// before its journal lock refuses it, beside a live agent's rotation.
const staleKeyTempAge = 5 * time.Minute

// RemoveStaleKeyTemps removes the temp files WriteKeyFile leaves in dir
// when the process dies before its deferred remove. Each holds a private
// key, one never served (the crash came before the link) or a second name of
// a key file (after it), so removing it loses nothing. Only regular files of
// ours named like one and staleKeyTempAge old go; a symlink is left, since
// its name is not the file it reaches.
func RemoveStaleKeyTemps(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	now := time.Now()
	for _, e := range entries {
		if ok, _ := filepath.Match(keyTempPattern, e.Name()); !ok || !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(dir, e.Name())
		st, err := os.Lstat(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if uid, ok := providers.FileOwner(st); !st.Mode().IsRegular() || (ok && uid != os.Getuid()) || now.Sub(st.ModTime()) < staleKeyTempAge {
			continue
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove stale key temp file: %w", err)
		}
	}
	return nil
}

// ReadKeyFile reads a PKCS#8 PEM private key written by WriteKeyFile. A file
// readable by group or others, or owned by another user, is refused rather
// than fixed: a key readable by others may already have been copied, and
// one another user wrote is theirs. Anything but a regular file is refused
// too: through a symlink the checks would judge the target, not the link,
// so a link planted while the directory was open would make a key of any
// file of ours, and a FIFO would hang the start. The checks are made on
// the file opened, so it cannot be swapped between them and the read.
// Errors never show the contents.
func ReadKeyFile(path string) (crypto.Signer, error) {
	lst, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if !lst.Mode().IsRegular() {
		return nil, fmt.Errorf("key file %s is %s, not a regular file: refusing it", path, fileKind(lst.Mode()))
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !os.SameFile(lst, st) {
		return nil, fmt.Errorf("key file %s changed while it was opened: refusing it", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("key file %s has mode %v; want 0600", path, st.Mode().Perm())
	}
	if uid, ok := providers.FileOwner(st); ok && uid != os.Getuid() {
		return nil, fmt.Errorf("key file %s belongs to uid %d, not us (%d): refusing it", path, uid, os.Getuid())
	}
	raw, err := io.ReadAll(f)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(raw)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("key file %s: no PKCS#8 PRIVATE KEY block", path)
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("key file %s: parse PKCS#8 (contents not shown)", path)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key file %s: %T cannot sign", path, key)
	}
	return signer, nil
}

// WriteKeyFile writes a private key as PKCS#8 PEM, mode 0600 from birth,
// through a temp file fsynced and then linked into place (the directory
// fsynced too): a crash leaves no key or a whole one, and an existing file
// is never replaced (the error wraps fs.ErrExist) — it may be the only copy
// of a key in use.
func WriteKeyFile(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal key: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), keyTempPattern)
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	err = f.Chmod(0o600)
	if err == nil {
		err = pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func fileKind(m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		return "a symlink"
	case m.IsDir():
		return "a directory"
	case m&fs.ModeNamedPipe != 0:
		return "a FIFO"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeDevice != 0:
		return "a device"
	}
	return "special (" + m.Type().String() + ")"
}
