package pkcs11

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
)

// A Cryptoki library has one state per process: C_Initialize succeeds once,
// C_Finalize ends it for every caller, and login state belongs to the token
// across all of the process's sessions. Two providers on the same module path
// (two tokens of one HSM, or the same token opened twice) therefore share one
// module value, reference counted, and a reload by one is seen by the other
// through gen.
type module struct {
	path string
	ctx  *p11.Ctx
	lib  *library

	// initialized records that our C_Initialize succeeded; when another user
	// in the process initialized the library first we must not finalize it.
	initialized bool
	refs        int            // guarded by modules.mu
	logins      map[string]int // token serial → providers relying on its login; guarded by modules.mu
	// loginCalls counts the C_Logins made through this module value, by
	// any provider on it, each counted before its tokenFiles lock is let
	// go. A key search that found a key missing can see a logout during it
	// only while the token stays logged out: a login since (another
	// provider's repair) hides it from C_GetSessionInfo, not from this.
	loginCalls atomic.Uint64

	// gen counts reloads (C_Finalize + C_Initialize). Every session and object
	// handle belongs to one generation; after a reload they are all void and
	// must never be passed to the module again (numbers are reused).
	gen atomic.Uint64

	// calls and gate let a reload (or a test's pause) wait until no
	// goroutine is inside the module: finalizing under a running C_Sign is
	// undefined behaviour, and SoftHSM frees a session closed under one.
	calls    atomic.Int64
	gate     atomic.Uint32 // gateOpen, gateReload or gatePause
	reloadMu sync.Mutex    // serializes reloads and pauses
	down     atomic.Bool   // finalized, and the last Initialize failed; set under reloadMu
	pauseMu  sync.Mutex
	paused   chan struct{} // guarded by pauseMu; closed when a pause ends
	reloaded chan struct{} // guarded by pauseMu; closed when the reload under way ends
}

const (
	gateOpen   = iota
	gateReload // calls fail with errGated: the library is going away
	gatePause  // calls wait for the pause to end
)

var modules = struct {
	mu sync.Mutex
	m  map[string]*module
}{m: make(map[string]*module)}

// tokenFileLocks holds one lock per configured module path; see
// Provider.tokenFiles.
var tokenFileLocks = struct {
	mu sync.Mutex
	m  map[string]*sync.Mutex
}{m: make(map[string]*sync.Mutex)}

// tokenFileLock returns the lock of the module configured at path: the
// same for every provider and every module instance (a private copy) of
// it, since they all read the same token files.
func tokenFileLock(path string) *sync.Mutex {
	key := filepath.Clean(path)
	tokenFileLocks.mu.Lock()
	defer tokenFileLocks.mu.Unlock()
	l := tokenFileLocks.m[key]
	if l == nil {
		l = new(sync.Mutex)
		tokenFileLocks.m[key] = l
	}
	return l
}

// errGated is what a call gets while another goroutine reloads the module.
// It reads as CKR_CRYPTOKI_NOT_INITIALIZED (the module is going away: a
// reload is the repair), and errors.Is tells it from the module's own
// answer: a reload that gives up before the generation moves leaves no
// other trace that it was met.
var errGated error = gatedError{}

type gatedError struct{}

func (gatedError) Error() string {
	return "module reloading: " + p11.Error(p11.CKR_CRYPTOKI_NOT_INITIALIZED).Error()
}
func (gatedError) Unwrap() error { return p11.Error(p11.CKR_CRYPTOKI_NOT_INITIALIZED) }

// reloadDrainTimeout bounds how long a reload waits for calls already inside
// the module to return before it gives up (and is retried with backoff). A
// variable for tests.
var reloadDrainTimeout = 5 * time.Second

// ErrModuleLoad: the configured module is not a PKCS#11 library this
// process can load. The dynamic loader refused the file (it is missing or
// unreadable, not a shared object for this machine, needs a library that
// is not installed, or lies on a noexec mount), it exports no
// C_GetFunctionList, or a user other than the agent's or root could change
// it or the directories on its path (checkModulePath; it is then never
// loaded). Starting again fails the same way until an operator fixes the
// path or the installation. A module that loads but whose C_Initialize
// fails is not this: its device may come back.
var ErrModuleLoad = errors.New("not a loadable PKCS#11 module")

// checkModulePath refuses a module file that a user other than the
// agent's or root could change, or put another library in the place of:
// dlopen runs a library's constructors with the agent's privileges before
// any PKCS#11 call, and the agent then hands the module the PIN. The file
// must be a regular file none but its owner may write, and every directory
// and link on its way must be as providers.TrustedPath asks (OpenSSH's
// StrictModes). Nothing is checked of what the module itself loads (its
// DT_NEEDED libraries, found by the loader's search path): that is the
// system's. A missing file is left to the loader to say so: its directory
// is one only the agent's user or root may write.
func checkModulePath(path string) error {
	fi, err := providers.TrustedPath(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("%w: %w", ErrModuleLoad, err)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("%w: not a regular file (%v)", ErrModuleLoad, fi.Mode().Type())
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("%w: the file may be written by its group or others (%v): only its owner may write a module the agent loads", ErrModuleLoad, fi.Mode())
	}
	return nil
}

// acquireModule loads the module at path, or takes another reference to
// it. loaded, if not nil, runs once a new load has mapped the library,
// before C_Initialize.
func acquireModule(path string, loaded func()) (*module, error) {
	key := filepath.Clean(path)
	modules.mu.Lock()
	defer modules.mu.Unlock()
	if m, ok := modules.m[key]; ok {
		m.refs++
		return m, nil
	}
	// The shim's load first: it says why a file does not load, and it
	// releases a library without C_GetFunctionList, which miekg's New
	// leaves loaded.
	lib, err := openLibrary(path)
	if err != nil {
		return nil, fmt.Errorf("load module %s: %w", path, err)
	}
	ctx := p11.New(path)
	if loaded != nil {
		loaded()
	}
	if ctx == nil {
		lib.close()
		return nil, fmt.Errorf("load module %s: dlopen failed", path)
	}
	m := &module{path: key, ctx: ctx, lib: lib, refs: 1, logins: make(map[string]int)}
	switch err := ctx.Initialize(); {
	case err == nil:
		m.initialized = true
	case isRV(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED):
		// Another user in this process (a test fixture, another library)
		// initialized it; sharing is what the standard asks for.
	default:
		lib.close()
		ctx.Destroy()
		return nil, fmt.Errorf("initialize module %s: %w", path, err)
	}
	modules.m[key] = m
	return m, nil
}

// release drops one reference; the last one finalizes and unloads.
func (m *module) release() {
	modules.mu.Lock()
	defer modules.mu.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules.m, m.path)
	if m.initialized {
		_ = m.ctx.Finalize()
	}
	m.lib.close()
	m.ctx.Destroy()
}

// enter marks a goroutine as inside the module; false while a reload holds
// the gate. Every call through ctx or lib is bracketed by enter and exit.
func (m *module) enter() bool {
	ok, _ := m.enterCtx(context.Background())
	return ok
}

// enterCtx is enter for a call with a deadline: while a pause (key
// generation on another instance) holds the gate it waits until the pause
// ends or ctx does, and then returns ctx's error. ctx.Done is asked for
// only then: the agent's request context arms a timer when it is.
func (m *module) enterCtx(ctx context.Context) (bool, error) {
	for {
		m.calls.Add(1)
		g := m.gate.Load()
		if g == gateOpen {
			return true, nil
		}
		m.calls.Add(-1)
		if g == gateReload {
			return false, nil
		}
		m.pauseMu.Lock()
		ch := m.paused
		m.pauseMu.Unlock()
		if ch != nil {
			select {
			case <-ch:
			case <-ctx.Done():
				return false, ctx.Err()
			}
		}
	}
}

func (m *module) exit() { m.calls.Add(-1) }

// doCtx is do for a caller with a deadline: a pause (key generation on
// another instance) is waited out only until ctx ends, whose error it then
// returns.
func (m *module) doCtx(ctx context.Context, fn func(*p11.Ctx) error) error {
	ok, err := m.enterCtx(ctx)
	if err != nil {
		return err
	}
	if !ok {
		return errGated
	}
	defer m.exit()
	return fn(m.ctx)
}

// do runs fn inside the module, or returns errGated during a reload.
func (m *module) do(fn func(*p11.Ctx) error) error {
	if !m.enter() {
		return errGated
	}
	defer m.exit()
	return fn(m.ctx)
}

// reload finalizes and re-initializes the library unless another provider
// already did since seenGen. It returns the current generation, and whether
// this call was the one that reloaded.
func (m *module) reload(seenGen uint64, inject func(string) uint) (gen uint64, reloaded bool, err error) {
	m.reloadMu.Lock()
	defer m.reloadMu.Unlock()
	if g := m.gen.Load(); g != seenGen && !m.down.Load() {
		return g, false, nil
	}
	m.pauseMu.Lock()
	m.reloaded = make(chan struct{})
	m.pauseMu.Unlock()
	m.gate.Store(gateReload)
	defer func() {
		m.gate.Store(gateOpen)
		m.pauseMu.Lock()
		close(m.reloaded)
		m.reloaded = nil
		m.pauseMu.Unlock()
	}()
	if err := m.drain(); err != nil {
		return seenGen, false, fmt.Errorf("reload: %w", err)
	}
	if err := m.ctx.Finalize(); err != nil && !isRV(err, p11.CKR_CRYPTOKI_NOT_INITIALIZED) {
		return seenGen, false, fmt.Errorf("finalize: %w", err)
	}
	// From here every old handle is void, whether or not Initialize works.
	g := m.gen.Add(1)
	m.down.Store(true)
	if rv := hook(inject, "initialize"); rv != 0 {
		return g, true, fmt.Errorf("initialize: %w", p11.Error(rv))
	}
	if err := m.ctx.Initialize(); err != nil && !isRV(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		return g, true, fmt.Errorf("initialize: %w", err)
	}
	m.down.Store(false)
	m.initialized = true
	return g, true, nil
}

// reloading reports whether a reload is under way, or has been since
// generation gen.
func (m *module) reloading(gen uint64) bool {
	return m.gate.Load() == gateReload || m.gen.Load() != gen
}

// isDown reports whether the module is finalized after a reload whose
// C_Initialize failed; not while a reload is under way (which finalizes
// the module before it initializes it again).
func (m *module) isDown() bool {
	return m.gate.Load() != gateReload && m.down.Load()
}

// awaitReload waits until no reload of the module is under way, or ctx
// ends.
func (m *module) awaitReload(ctx context.Context) error {
	m.pauseMu.Lock()
	ch := m.reloaded
	m.pauseMu.Unlock()
	if ch == nil {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// drain waits for the goroutines inside the module to leave; the gate is
// already closed to new ones.
func (m *module) drain() error {
	deadline := time.Now().Add(reloadDrainTimeout)
	for m.calls.Load() != 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d calls still inside the module after %s", m.calls.Load(), reloadDrainTimeout)
		}
		time.Sleep(100 * time.Microsecond)
	}
	return nil
}

// PauseModule runs fn while no provider of this process is inside the module
// at path; provider calls made meanwhile wait for fn to return. It is for
// tests that act on the module behind a provider's back: SoftHSM frees a
// session closed by C_CloseAllSessions while another thread is still signing
// on it, which a real token (whose sessions die on the device) does not do.
// Without a provider open on path, fn simply runs.
func PauseModule(path string, fn func()) error {
	modules.mu.Lock()
	m := modules.m[filepath.Clean(path)]
	modules.mu.Unlock()
	if m == nil {
		fn()
		return nil
	}
	return m.pause(fn)
}

// pause runs fn while no goroutine is inside the module; calls made
// meanwhile wait for fn to return.
func (m *module) pause(fn func()) error {
	m.reloadMu.Lock()
	defer m.reloadMu.Unlock()
	m.pauseMu.Lock()
	m.paused = make(chan struct{})
	m.pauseMu.Unlock()
	m.gate.Store(gatePause)
	defer func() {
		m.gate.Store(gateOpen)
		m.pauseMu.Lock()
		close(m.paused)
		m.paused = nil
		m.pauseMu.Unlock()
	}()
	if err := m.drain(); err != nil {
		return fmt.Errorf("pause module: %w", err)
	}
	fn()
	return nil
}

// holdLogin records that a provider relies on the token's login; releaseLogin
// reports whether it was the last one, so that only the last logs out (logout
// is token-wide and would strand the others).
func (m *module) holdLogin(serial string) {
	modules.mu.Lock()
	m.logins[serial]++
	modules.mu.Unlock()
}

func (m *module) releaseLogin(serial string) (last bool) {
	modules.mu.Lock()
	defer modules.mu.Unlock()
	m.logins[serial]--
	if m.logins[serial] <= 0 {
		delete(m.logins, serial)
		return true
	}
	return false
}

// hook consults the fault hook; 0 means "make the real call".
func hook(inject func(string) uint, op string) uint {
	if inject == nil {
		return 0
	}
	return inject(op)
}

// isRV reports whether err is the module return value rv.
func isRV(err error, rv uint) bool {
	var e p11.Error
	return errors.As(err, &e) && uint(e) == rv
}

// rvOf extracts a module return value from err, or 0.
func rvOf(err error) uint {
	var e p11.Error
	if errors.As(err, &e) {
		return uint(e)
	}
	return 0
}
