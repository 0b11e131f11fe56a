package pkcs11

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/sigil-agent/sigil/providers"
	"go.uber.org/zap"
)

// Module instances. SoftHSM2 (and other software tokens) serialize cheap
// operations inside one process: every C_Sign of the process takes the same
// per-token locks, so more sessions or threads do not sign faster
// (ANCHORS.md: ECDSA gains 1.10x from 1 to 2 threads in one process, but
// 1.5-1.8x with two processes). Measured here (bench, SoftHSM2 ECDSA P-256,
// 2 cores, in-process miekg loops, one run): one module instance signs
// 23.5k/s at 8 goroutines, two instances 37.2k/s, with CPU per signature
// 65 → 52 µs since the threads stop contending. A pool of worker processes
// each loading the module would get the same locks apart but add a
// cross-process hop per signature, which on these machines costs more than
// the signature (docs/performance.md); two agent processes splitting the
// clients, the upper bound of that design, gained only 1.18x at 8.
//
// So the provider can load the module several times into the agent's own
// process. The dynamic loader hands back the library it already has for a
// path it has seen, so instance i > 0 loads a private copy of the module
// file, written into a fresh directory only this process can write (0700,
// made by os.MkdirTemp) and removed as soon as the copy is loaded: the
// mapping stays, nothing is left on disk. Each instance has its own Cryptoki
// state, login, sessions and supervisor; Sign goes to the least busy one.
//
// What this asks of the module, and why it is off by default: the module
// must tolerate two copies of itself in one process. SoftHSM2 does (each
// copy has its own globals; libcrypto is shared and thread-safe). Vendor
// libraries of network HSMs often keep process-wide state in daemons or
// files and parallelise in the device anyway: leave Instances at 1 for them.
// SoftHSM2 guards its token files with fcntl locks, which are per process,
// so two instances in one process do not exclude each other: every write to
// the token (GenerateKey) therefore runs on instance 0 while the other
// instances are paused, and signatures meanwhile go to instance 0 only.
// Writing to the token from outside the agent (softhsm2-util) while it
// serves with several instances is not supported.

// MaxInstances bounds Config.Instances: each instance costs a login, a
// session pool and a copy of the module's memory.
const MaxInstances = 16

// Open loads the module (or shares it with another provider in the process),
// finds the token, logs in once, finds every configured key and its public
// half, and opens the session pool; with Instances > 1 it does so for each
// module instance. A wrong PIN fails with providers.ErrPINIncorrect, a
// locked token with providers.ErrTokenLocked; neither is retried. A reload
// of the module by another provider meanwhile is waited out (within ctx);
// one that leaves the module down fails the open with
// providers.ErrUnavailable.
func Open(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.ID == "" {
		return nil, errors.New("pkcs11 provider: empty id")
	}
	for i, kc := range cfg.Keys {
		if kc.Name == "" {
			return nil, fmt.Errorf("pkcs11 provider %s: key with an empty name", cfg.ID)
		}
		for _, other := range cfg.Keys[:i] {
			if other.Name == kc.Name {
				return nil, fmt.Errorf("pkcs11 provider %s: key %q configured twice", cfg.ID, kc.Name)
			}
		}
	}
	// Before the defaults: what Validate refuses, Open refuses.
	if err := cfg.Validate(nil); err != nil {
		return nil, fmt.Errorf("pkcs11 provider %s: %w", cfg.ID, err)
	}
	cfg.ensureDefaults()
	cfg.pinRefused = new(atomic.Bool)
	// Before the load, which runs the module's code; the copies for the
	// other instances are read from this file too.
	if err := checkModulePath(cfg.Module); err != nil {
		return nil, fmt.Errorf("pkcs11 provider %s: load module %s: %w", cfg.ID, cfg.Module, err)
	}
	if cfg.Instances == 1 {
		return openInstance(ctx, cfg)
	}
	sessions := cfg.Sessions / cfg.Instances
	if cfg.Sessions%cfg.Instances != 0 {
		sessions++
	}
	first := cfg
	first.Sessions = sessions
	p, err := openInstance(ctx, first)
	if err != nil {
		return nil, err
	}
	tmp, err := copiesParent(os.TempDir())
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("pkcs11 provider %s: module instances: %w", cfg.ID, err)
	}
	for i := 1; i < cfg.Instances; i++ {
		dir, err := os.MkdirTemp(tmp, "sigil-pkcs11-")
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("pkcs11 provider %s: module instances: %w", cfg.ID, err)
		}
		// The copy goes as soon as the loader has mapped it (loaded, before
		// C_Initialize, which a network HSM's library may spend long in):
		// a process killed later in the open, by a watchdog or a crash,
		// leaves nothing for the next start to add to. This removal is for
		// an open that fails before that.
		defer os.RemoveAll(dir)
		copyPath := filepath.Join(dir, fmt.Sprintf("instance-%d-%s", i, filepath.Base(cfg.Module)))
		if err := copyFile(cfg.Module, copyPath); err != nil {
			p.Close()
			return nil, fmt.Errorf("pkcs11 provider %s: module instance %d: %w", cfg.ID, i, err)
		}
		sub := cfg
		sub.Sessions = sessions
		sub.loadFrom = copyPath
		sub.loaded = func() { os.RemoveAll(dir) }
		sub.Logger = cfg.Logger.With(zap.Int("instance", i))
		peer, err := openInstance(ctx, sub)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("module instance %d (a copy of the module under %s, which must allow executable mappings: set TMPDIR if it is mounted noexec): %w", i, os.TempDir(), err)
		}
		p.peers = append(p.peers, peer)
	}
	p.log.Info("pkcs11 module instances open", zap.Int("instances", cfg.Instances), zap.Int("sessions_each", sessions))
	return p, nil
}

// copiesParent checks that no other user can rename or replace what the
// agent makes in dir (TMPDIR), and returns it made absolute. The copies
// are loaded by path after they are written: whoever may rename the 0700
// directory holding them (a parent others may write without the sticky
// bit, which keeps them from renaming entries not theirs, or one another
// user owns) could put a library of theirs under a copy's name in
// between, and the agent would run its code. providers.TrustedPath holds
// every directory and link on the way to the module's own rule. Root's
// directories are trusted: root is not defended against
// (docs/security.md). A refusal is ErrModuleLoad: starting again fails the
// same way until an operator changes TMPDIR.
func copiesParent(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	fi, err := providers.TrustedPath(abs)
	if err == nil && !fi.IsDir() {
		err = fmt.Errorf("not a directory (%v)", fi.Mode().Type())
	}
	if err != nil {
		return "", fmt.Errorf("%w: the module copies' directory %s (TMPDIR): %w; set TMPDIR to a directory only the agent's user or root can change", ErrModuleLoad, dir, err)
	}
	return abs, nil
}

// copyFile copies the module to dst, which must not exist yet (O_EXCL: the
// directory is fresh, so anything already there is not ours).
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o500)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// pickInstance returns the instance with the fewest calls in flight,
// skipping instances that are being repaired; instance 0 (p) on ties and
// during a token write.
func (p *Provider) pickInstance() *Provider {
	if len(p.peers) == 0 || p.exclusive.Load() {
		return p
	}
	best, least := p, int64(math.MaxInt64)
	if p.state.Load().kind == stateHealthy {
		least = p.inflight.Load()
	}
	for _, q := range p.peers {
		if n := q.inflight.Load(); n < least && q.state.Load().kind == stateHealthy {
			best, least = q, n
		}
	}
	return best
}

// writeExclusive runs a token write on instance 0 while the other instances
// are paused (see the comment at the top: SoftHSM2's file locks do not
// exclude instances of one process). Signatures go to instance 0 meanwhile.
func (p *Provider) writeExclusive(fn func() error) error {
	if len(p.peers) == 0 {
		return fn()
	}
	p.exclusive.Store(true)
	defer p.exclusive.Store(false)
	return pauseAll(p.peers, fn)
}

// pauseAll pauses each instance's module in turn, nesting, and runs fn
// inside the innermost pause.
func pauseAll(peers []*Provider, fn func() error) error {
	if len(peers) == 0 {
		return fn()
	}
	var err error
	if perr := peers[0].mod.pause(func() { err = pauseAll(peers[1:], fn) }); perr != nil {
		return perr
	}
	return err
}

// addToPeers makes a key instance 0 serves known to the other instances.
// An instance that cannot find it leaves the key to instance 0: Sign falls
// back to instance 0 for a key an instance does not have.
func (p *Provider) addToPeers(ctx context.Context, kc KeyConfig) {
	for i, q := range p.peers {
		if _, err := q.addKey(ctx, kc); err != nil {
			p.log.Warn("pkcs11 module instance cannot find the key; instance 0 signs with it",
				zap.Int("instance", i+1), zap.String("key", kc.Name), zap.Error(err))
		}
	}
}

// closePeers closes the instances after the first.
func (p *Provider) closePeers() error {
	var errs []error
	for _, q := range p.peers {
		errs = append(errs, q.Close())
	}
	return errors.Join(errs...)
}

// healthyPeers reports whether any instance after the first works: with
// several instances the provider can sign while one is being repaired.
func (p *Provider) healthyPeers() bool {
	for _, q := range p.peers {
		if q.Healthy() == nil {
			return true
		}
	}
	return false
}

// peerStats adds the other instances' pools to stats.
func (p *Provider) peerStats(stats providers.PoolStats) providers.PoolStats {
	for _, q := range p.peers {
		s := q.PoolStats()
		stats.Size += s.Size
		stats.Open += s.Open
		stats.Idle += s.Idle
		stats.Repairs += s.Repairs
	}
	return stats
}
