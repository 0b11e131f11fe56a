package pkcs11

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
	"go.uber.org/zap"
)

// Provider serves the keys of one token of one PKCS#11 module.
type Provider struct {
	id         string
	modulePath string
	log        *zap.Logger
	mod        *module
	tokenSel   tokenSelector
	tokenLabel string        // for messages
	serial     string        // the token's identity for login sharing
	tokenInfo  p11.TokenInfo // as found at Open: what a key URI's token attributes must match
	pin        string
	pinRefused *atomic.Bool // shared by the instances of one Open (login); never nil
	// tokenFiles serializes the calls that read or write SoftHSM2's
	// token.object (C_Login rewrites it, C_Login and C_GetTokenInfo read
	// it) among every provider and module instance of the module's path.
	// SoftHSM2 guards the file with fcntl locks, which are per process:
	// a module instance reading it while another rewrote it found it
	// truncated, and its C_Login or C_GetTokenInfo failed with
	// CKR_GENERAL_ERROR. Signatures, key searches and session calls do not
	// touch the file and do not take the lock, but for the session check
	// after a key search that found a key missing: it must not fall
	// between a C_Login and its count (module.loginCalls).
	tokenFiles *sync.Mutex
	inject     func(string) uint
	size       int
	backoff    time.Duration

	slot atomic.Uint64 // current slot id; may change across a module reload
	gen  atomic.Uint64 // module generation the slot, the login and the key handles belong to

	keysMu sync.Mutex // serializes key changes with the token work before them
	keys   providers.KeySet[*key]

	idle    chan *session
	live    atomic.Int32  // sessions open: idle plus checked out
	repairs atomic.Uint64 // repairs done, for PoolStats

	stateMu sync.Mutex
	state   atomic.Pointer[state]
	wanted  repairLevel // guarded by stateMu
	// running is the repair under way (repairNone between repairs); a
	// request it covers is not queued behind it. Guarded by stateMu.
	running repairLevel
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}

	loggedIn bool // holds a login reference on the module (set in Open)

	// peers are the further module instances of an Open with Instances > 1
	// (instances.go); nil in the peers themselves.
	peers     []*Provider
	exclusive atomic.Bool // a token write is under way: sign on this instance only

	inflight  atomic.Int64
	closed    atomic.Bool
	drained   chan struct{}
	drainOnce sync.Once
	// closeDone is closed when the first Close has finished, with its
	// error in closeErr: a second Close waits for it (a caller told the
	// provider is closed may unload what it loaded).
	closeDone chan struct{}
	closeErr  error
}

var _ providers.Provider = (*Provider)(nil)

// closeDrainTimeout bounds how long Close waits for calls still inside the
// module (a wedged network HSM can hold a C_Sign indefinitely).
const closeDrainTimeout = 5 * time.Second

// openInstance opens one instance of the module: see Open.
func openInstance(ctx context.Context, cfg Config) (*Provider, error) {
	cfg.ensureDefaults()
	fail := func(err error) (*Provider, error) {
		return nil, fmt.Errorf("pkcs11 provider %s: %w", cfg.ID, err)
	}
	sel, objs, err := cfg.parse(nil) // Open has checked the id and the key names
	if err != nil {
		return fail(err)
	}
	keys := make([]*key, len(cfg.Keys))
	for i, kc := range cfg.Keys {
		keys[i] = &key{obj: objs[i]}
		keys[i].info.Name = kc.Name
	}
	pin, err := readPIN(&cfg, cfg.Logger)
	if err != nil {
		return fail(err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}

	mod, err := acquireModule(cfg.loadPath(), cfg.loaded)
	if err != nil {
		return fail(err)
	}
	p := &Provider{
		id:         cfg.ID,
		modulePath: cfg.Module,
		log:        cfg.Logger,
		mod:        mod,
		tokenSel:   sel,
		tokenLabel: sel.String(),
		pin:        pin,
		pinRefused: cfg.pinRefused,
		tokenFiles: tokenFileLock(cfg.Module),
		inject:     cfg.FaultHook,
		size:       cfg.Sessions,
		backoff:    cfg.Backoff,
		idle:       make(chan *session, cfg.Sessions),
		wake:       make(chan struct{}, 1),
		stop:       make(chan struct{}),
		done:       make(chan struct{}),
		drained:    make(chan struct{}),
		closeDone:  make(chan struct{}),
	}
	for _, k := range keys {
		_ = p.keys.Add(k.info.Name, k) // names checked above
	}
	p.state.Store(&state{kind: stateHealthy, changed: make(chan struct{})})
	if err := p.connectAcrossReloads(ctx); err != nil {
		p.disconnect()
		mod.release()
		return fail(err)
	}
	go p.supervise()
	p.log.Info("pkcs11 provider open",
		zap.String("module", cfg.Module), zap.String("token", p.tokenLabel), zap.String("serial", p.serial),
		zap.Uint64("slot", p.slot.Load()), zap.Int("keys", p.keys.Len()), zap.Int("sessions", p.size))
	return p, nil
}

// maxOpenReloads bounds the reloads by other providers on the module that
// one Open waits out.
const maxOpenReloads = 3

// connectAcrossReloads connects in the module's current generation. A
// reload by another provider on the module meanwhile (its gate closed
// while it runs; what connect found, void after it) is waited out and
// connect is made again: the open succeeds once the module is back, also
// when the reload gave up before the generation moved (a call met its
// gate, but it was over by the time the open looked).
// When that reload leaves the module down, the open fails with
// ErrUnavailable; the PIN is never presented again after the token
// refused it.
func (p *Provider) connectAcrossReloads(ctx context.Context) error {
	for reloads := 0; ; reloads++ {
		gen := p.mod.gen.Load()
		p.gen.Store(gen)
		err := p.connect(ctx)
		if err == nil {
			if p.mod.gen.Load() == gen {
				return nil
			}
			err = errStale // what it found is of a generation now over
		}
		if errors.Is(err, providers.ErrPINIncorrect) || errors.Is(err, providers.ErrTokenLocked) || ctx.Err() != nil {
			return err
		}
		if p.mod.isDown() {
			return fmt.Errorf("module %s is down: another provider's reload of it failed, and that provider retries it: %w", p.modulePath, providers.ErrUnavailable)
		}
		if !errors.Is(err, errStale) && !errors.Is(err, errGated) && !p.mod.reloading(gen) {
			return err
		}
		p.disconnect()
		if reloads == maxOpenReloads {
			return fmt.Errorf("module %s: %d reloads by other providers met during the open: %w", p.modulePath, reloads+1, providers.ErrUnavailable)
		}
		p.log.Info("pkcs11 module reloaded by another provider during the open; opening again", zap.String("module", p.modulePath))
		if werr := p.mod.awaitReload(ctx); werr != nil {
			return fmt.Errorf("waiting for another provider's reload of module %s: %w: %w", p.modulePath, providers.ErrUnavailable, werr)
		}
	}
}

// disconnect undoes what a connect that failed (or whose generation ended)
// did: its sessions and its hold on the token's login.
func (p *Provider) disconnect() {
	if p.loggedIn {
		p.loggedIn = false
		if p.mod.releaseLogin(p.serial) {
			p.logout()
		}
	}
	p.closeSessions()
}

// connect finds the slot, logs in, resolves every key and fills the pool.
func (p *Provider) connect(ctx context.Context) error {
	slot, ti, err := p.findSlot()
	if err != nil {
		return err
	}
	p.slot.Store(uint64(slot))
	p.serial = trimPadded(ti.SerialNumber)
	p.tokenLabel = trimPadded(ti.Label)
	p.tokenInfo = ti
	s, err := p.openSession(false)
	if err != nil {
		return fmt.Errorf("open session on token %s: %w", p.tokenLabel, err)
	}
	if err := p.login(s); err != nil {
		p.release(s)
		return err
	}
	p.mod.holdLogin(p.serial)
	p.loggedIn = true
	for _, k := range p.keys.All() {
		if err := ctx.Err(); err != nil {
			p.release(s)
			return err
		}
		if err := p.resolveKey(s, k); err != nil {
			p.release(s)
			return fmt.Errorf("key %q (%s): %w", k.info.Name, k.obj, err)
		}
		if other := p.sameObject(k); other != nil {
			p.release(s)
			return fmt.Errorf("keys %q and %q name the same object", other.info.Name, k.info.Name)
		}
	}
	p.release(s)
	for p.live.Load() < int32(p.size) {
		s, err := p.openSession(false)
		if err != nil {
			return fmt.Errorf("open session on token %s: %w", p.tokenLabel, err)
		}
		p.release(s)
	}
	return nil
}

// resolveKey finds k's private key object, reads its public key and fills in
// k's KeyInfo, signature length and handle.
func (p *Provider) resolveKey(s *session, k *key) error {
	return p.onSession(context.Background(), "find", s.gen, func(c *p11.Ctx) error {
		h, err := findPrivateKey(c, s.h, k.obj)
		if err != nil {
			return err
		}
		if always, err := c.GetAttributeValue(s.h, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_ALWAYS_AUTHENTICATE, nil)}); err == nil &&
			len(always[0].Value) == 1 && always[0].Value[0] != 0 {
			return errors.New("key demands a PIN per signature (CKA_ALWAYS_AUTHENTICATE): unsupported")
		}
		pub, err := readPublicKey(c, s.h, h)
		if err != nil {
			return err
		}
		if err := checkPair(c, s.h, h, pub); err != nil {
			return err
		}
		info, err := providers.NewKeyInfo(p.id, k.info.Name, pub)
		if err != nil {
			return err
		}
		n, err := signatureLen(pub)
		if err != nil {
			return err
		}
		k.info, k.sigLen = info, n
		k.setHandle(h, s.gen)
		return nil
	})
}

// sameObject returns a served key other than k whose object is k's. Config
// validation catches one URI spelled twice; two spellings (object= and
// id=) of one object only show on the token. Served under two names, one
// key would sign under two kids, each with its own policy.
func (p *Provider) sameObject(k *key) *key {
	h := k.handle.Load()
	if h == nil {
		return nil
	}
	for _, other := range p.keys.All() {
		if o := other.handle.Load(); other != k && o != nil && o.gen == h.gen && o.obj == h.obj {
			return other
		}
	}
	return nil
}

func trimPadded(s string) string {
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == 0) {
		s = s[:len(s)-1]
	}
	return s
}

// ID implements providers.Provider.
func (p *Provider) ID() string { return p.id }

// Keys implements providers.Provider.
func (p *Provider) Keys(ctx context.Context) ([]providers.KeyInfo, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("pkcs11 keys: %w", errClosed)
	}
	return p.keys.Infos(func(k *key) providers.KeyInfo { return k.info }), nil
}

// Sign implements providers.Provider: C_SignInit and one C_Sign on a pooled
// session of the least busy module instance (instances.go). A signature that fails for any reason but a bad request is
// retried once, after the repair the failure called for, on a newly opened
// session checked to be logged in; the caller sees an error only if that
// retry fails too or no working session can be had before ctx's deadline.
func (p *Provider) Sign(ctx context.Context, name string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if q := p.pickInstance(); q != p {
		if _, ok := q.keys.Get(name); ok {
			return q.signOn(ctx, name, alg, digest)
		}
	}
	return p.signOn(ctx, name, alg, digest)
}

func (p *Provider) signOn(ctx context.Context, name string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	k, _ := p.keys.Get(name)
	if k == nil {
		return nil, fmt.Errorf("pkcs11 sign %s: %w", name, providers.ErrNotFound)
	}
	if err := providers.CheckRequest(k.info.Type, alg, digest); err != nil {
		return nil, fmt.Errorf("pkcs11 sign %s: %w", name, err)
	}
	var in [maxPKCS1v15InputLen]byte
	params, input, err := k.signParams(alg, digest, &in)
	if err != nil {
		return nil, fmt.Errorf("pkcs11 sign %s: %w", name, err)
	}
	if !p.enter() {
		return nil, fmt.Errorf("pkcs11 sign %s: %w", name, errClosed)
	}
	defer p.exit()

	var out [maxSignatureLen]byte
	var epoch uint64
	for attempt := 0; ; attempt++ {
		var s *session
		if attempt == 0 {
			s, epoch, err = p.acquire(ctx)
		} else {
			s, epoch, err = p.acquireFresh(ctx)
		}
		if err != nil {
			return nil, fmt.Errorf("pkcs11 sign %s: %w", name, err)
		}
		h := k.handle.Load()
		if h == nil {
			p.release(s)
			return nil, fmt.Errorf("pkcs11 sign %s: key object %s is missing from the token or was replaced: %w", name, k.obj, providers.ErrUnavailable)
		}
		rv, n, failedInit := p.signCall(ctx, s, h, &params, input, out[:k.sigLen])
		if rv == p11.CKR_OK {
			p.release(s)
			return k.encode(out[:n])
		}
		if rv == rvGaveUp {
			// The caller's deadline passed while key generation paused
			// this instance; nothing reached the module.
			p.release(s)
			return nil, fmt.Errorf("pkcs11 sign %s: waiting out a key generation: %w", name, ctx.Err())
		}
		if rv == rvStale {
			// A reload ran or is running: nothing was sent to the module.
			// The session is kept unless its generation is over; a session
			// dropped here without C_CloseSession would stay open on the
			// token if the reload gave up.
			p.release(s)
			p.requestRepair(repairReload, epoch)
			if attempt > 0 {
				return nil, fmt.Errorf("pkcs11 sign %s: retry failed: module reloading: %w", name, providers.ErrUnavailable)
			}
			continue
		}
		cls := classify(rv)
		call := "C_Sign"
		if failedInit {
			call = "C_SignInit"
		}
		p.afterFault(s, cls, rv, epoch, call)
		switch {
		case cls == faultRequest:
			return nil, fmt.Errorf("pkcs11 sign %s: %w: %w", name, requestError(rv), p11.Error(rv))
		case attempt > 0:
			return nil, fmt.Errorf("pkcs11 sign %s: retry failed: %w: %w", name, providers.ErrUnavailable, p11.Error(rv))
		}
	}
}

func requestError(rv uint) error {
	switch rv {
	case p11.CKR_DATA_INVALID, p11.CKR_DATA_LEN_RANGE, p11.CKR_ARGUMENTS_BAD:
		return providers.ErrBadRequest
	}
	return providers.ErrUnsupportedAlgorithm
}

// rvStale is signCall's answer when the module was or is being reloaded
// under the caller; it is no CKR_ value, and nothing reached the module.
const rvStale = ^uint(0)

// rvGaveUp is signCall's answer when the caller's context ended while a
// pause held the module; no CKR_ value either, and nothing reached it.
const rvGaveUp = ^uint(0) - 1

// signCall is the hot path's one cgo crossing (see shim.go).
func (p *Provider) signCall(ctx context.Context, s *session, key *keyHandle, params *signParams, input, out []byte) (rv uint, n int, failedInit bool) {
	if p.inject != nil {
		if rv := p.inject("sign"); rv != 0 {
			return rv, 0, true
		}
	}
	if ok, err := p.mod.enterCtx(ctx); err != nil {
		return rvGaveUp, 0, true
	} else if !ok {
		return rvStale, 0, true
	}
	// Inside the gate the generation cannot move. A reload between acquire
	// and here voided both handles, and their numbers may have been given
	// to other sessions and objects (another provider's keys among them).
	// The provider's generation is not enough for the key: it moves when
	// its reload starts, the key's handle only when the reload's search
	// finds it again.
	if g := p.mod.gen.Load(); s.gen != g || key.gen != g || p.gen.Load() != g {
		p.mod.exit()
		return rvStale, 0, true
	}
	rv, n, failedInit = p.mod.lib.sign(uint(s.h), uint(key.obj), params, input, out)
	p.mod.exit()
	return rv, n, failedInit
}

// Healthy reports whether a working session can be had now: nil, or the
// error a Sign would get. It probes an idle session with C_GetSessionInfo
// and starts a repair if the probe fails.
func (p *Provider) Healthy() error {
	err := p.healthy()
	if err != nil && p.healthyPeers() {
		return nil
	}
	return err
}

func (p *Provider) healthy() error {
	// Counted as a call in flight, as Sign is: Close must not finalize the
	// module (a crash in C_GetSessionInfo) or close the pool (a session
	// handed back to a closed pool stays open) under the probe.
	if !p.enter() {
		return errClosed
	}
	defer p.exit()
	st := p.state.Load()
	if err := stateError(st); err != nil {
		return fmt.Errorf("pkcs11 provider %s: %w", p.id, err)
	}
	var s *session
	select {
	case s = <-p.idle:
	default:
		if p.live.Load() > 0 {
			return nil // every session busy signing: working
		}
		p.requestRepair(repairSweep, st.epoch)
		return fmt.Errorf("pkcs11 provider %s: no open session: %w", p.id, providers.ErrUnavailable)
	}
	if s.gen != p.mod.gen.Load() {
		p.drop(s, false)
		p.requestRepair(repairLogin, st.epoch)
		return fmt.Errorf("pkcs11 provider %s: module reloaded: %w", p.id, providers.ErrUnavailable)
	}
	info, err := p.sessionInfo(s)
	if errors.Is(err, errStale) {
		p.drop(s, false)
		p.requestRepair(repairLogin, st.epoch)
		return fmt.Errorf("pkcs11 provider %s: module reloaded: %w", p.id, providers.ErrUnavailable)
	}
	if err != nil {
		p.afterFault(s, classify(rvOf(err)), rvOf(err), st.epoch, "C_GetSessionInfo")
		return fmt.Errorf("pkcs11 provider %s: %w: %w", p.id, providers.ErrUnavailable, err)
	}
	p.release(s)
	if !isUserState(info.State) {
		p.requestRepair(repairLogin, st.epoch)
		return fmt.Errorf("pkcs11 provider %s: token logged out: %w", p.id, providers.ErrUnavailable)
	}
	return nil
}

// enter counts a call that may reach the module; false after Close.
func (p *Provider) enter() bool {
	p.inflight.Add(1)
	if p.closed.Load() {
		p.exit()
		return false
	}
	return true
}

func (p *Provider) exit() {
	if p.inflight.Add(-1) == 0 && p.closed.Load() {
		p.drainOnce.Do(func() { close(p.drained) })
	}
}

// Close stops the supervisor, waits for calls in flight, closes the
// sessions, logs out (unless another provider in the process still relies on
// the token's login) and finalizes the module when no provider uses it.
// Sign fails with providers.ErrUnavailable afterwards.
func (p *Provider) Close() error {
	if !p.closed.CompareAndSwap(false, true) {
		<-p.closeDone
		return p.closeErr
	}
	p.closeErr = p.close()
	close(p.closeDone)
	return p.closeErr
}

func (p *Provider) close() error {
	peerErr := p.closePeers()
	p.stateMu.Lock()
	p.setStateLocked(stateClosed, nil, false)
	p.stateMu.Unlock()
	close(p.stop)
	select {
	case <-p.done:
	case <-time.After(closeDrainTimeout):
		// A repair's call hangs in the module (a login on a wedged
		// network HSM): as for calls in flight, leave it loaded.
		p.log.Error("pkcs11 close: the supervisor's repair is still inside the module; module left loaded")
		return fmt.Errorf("pkcs11 provider %s: close: a repair still inside the module after %s", p.id, closeDrainTimeout)
	}
	if p.inflight.Load() != 0 {
		t := time.NewTimer(closeDrainTimeout)
		defer t.Stop()
		select {
		case <-p.drained:
		case <-t.C:
			// Finalizing under a running call is undefined behaviour: leave
			// the module loaded rather than risk the process.
			p.log.Error("pkcs11 close: calls still inside the module; module left loaded", zap.Int64("calls", p.inflight.Load()))
			return fmt.Errorf("pkcs11 provider %s: close: %d calls still inside the module after %s", p.id, p.inflight.Load(), closeDrainTimeout)
		}
	}
	if p.mod.releaseLogin(p.serial) {
		p.logout()
	}
	p.closeSessions()
	p.pin = ""
	p.mod.release()
	p.log.Info("pkcs11 provider closed")
	return peerErr
}

func (p *Provider) logout() {
	for {
		var s *session
		select {
		case s = <-p.idle:
		default:
			return
		}
		if s.gen != p.mod.gen.Load() {
			p.drop(s, false)
			continue
		}
		err := p.onSession(context.Background(), "", s.gen, func(c *p11.Ctx) error { return c.Logout(s.h) })
		p.idle <- s
		if err != nil && !isRV(err, p11.CKR_USER_NOT_LOGGED_IN) {
			p.log.Warn("pkcs11 logout failed", zap.Error(err))
		}
		return
	}
}

func (p *Provider) closeSessions() {
	for {
		select {
		case s := <-p.idle:
			p.drop(s, true)
		default:
			return
		}
	}
}

// PoolStats implements providers.PoolReporter.
func (p *Provider) PoolStats() providers.PoolStats {
	return p.peerStats(providers.PoolStats{Size: p.size, Open: int(p.live.Load()), Idle: len(p.idle), Repairs: p.repairs.Load()})
}
