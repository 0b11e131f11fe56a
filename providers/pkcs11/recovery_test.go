package pkcs11

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// signLoad signs in a loop on n goroutines until stop is closed, verifying
// every signature, and reports each error.
type signLoad struct {
	ok     atomic.Int64
	done   []atomic.Int64 // requests finished, per goroutine
	errs   chan error
	wg     sync.WaitGroup
	stop   chan struct{}
	perReq time.Duration
}

func startLoad(t *testing.T, p *Provider, name string, n int, perReq time.Duration) *signLoad {
	t.Helper()
	info := keyInfo(t, p, name)
	alg := info.Type.DefaultAlgorithm()
	l := &signLoad{errs: make(chan error, 1024), stop: make(chan struct{}), perReq: perReq, done: make([]atomic.Int64, n)}
	for g := 0; g < n; g++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				digest := digestOf(alg.Hash, fmt.Appendf(nil, "load %d %d", g, i))
				ctx, cancel := context.WithTimeout(context.Background(), perReq)
				sig, err := p.Sign(ctx, name, alg, digest)
				cancel()
				l.done[g].Add(1)
				if err == nil {
					err = providers.Verify(info.Public, alg, digest, sig)
				}
				if err != nil {
					select {
					case l.errs <- err:
					default:
					}
					continue
				}
				l.ok.Add(1)
			}
		}()
	}
	return l
}

func (l *signLoad) stopAndErrors() []error {
	close(l.stop)
	l.wg.Wait()
	close(l.errs)
	var errs []error
	for err := range l.errs {
		errs = append(errs, err)
	}
	return errs
}

// settle waits until every goroutine has finished two more requests, so that
// no request in flight now is still in flight at the next fault: the
// guarantee is one retry per fault, and a request straddling two faults may
// rightly fail. It also waits for n more good signatures.
func (l *signLoad) settle(t *testing.T, n int64, within time.Duration) {
	t.Helper()
	target := l.ok.Load() + n
	marks := make([]int64, len(l.done))
	for i := range l.done {
		marks[i] = l.done[i].Load() + 2
	}
	deadline := time.Now().Add(within)
	for {
		ready := l.ok.Load() >= target
		for i := range l.done {
			ready = ready && l.done[i].Load() >= marks[i]
		}
		if ready {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no progress: %d good signatures, want %d within %s", l.ok.Load(), target, within)
		}
		time.Sleep(time.Millisecond)
	}
}

// The sessions die and the login goes away behind the pool's back while
// callers sign: signing resumes without a restart, no caller sees an error,
// and every signature verifies.
func TestRecoveryBehindThePoolsBack(t *testing.T) {
	for _, kt := range []providers.KeyType{providers.KeyECDSAP256, providers.KeyEd25519} {
		t.Run(string(kt), func(t *testing.T) {
			tok := softhsmtest.New(t, "recover")
			tok.Around = pauseAround(t, tok)
			keys := tok.GenerateKeys(t, kt)
			core, logs := observer.New(zap.DebugLevel)
			p := open(t, tok, keyConfigs(keys), func(c *Config) { c.Logger = zap.New(core) })
			load := startLoad(t, p, string(kt), 6, 2*time.Second)

			load.settle(t, 200, 5*time.Second)
			for round := 0; round < 3; round++ {
				tok.CloseAllSessions(t) // sessions gone, and with the last of them the login
				load.settle(t, 200, 5*time.Second)
				tok.Logout(t) // sessions stay, login and object handles go
				load.settle(t, 200, 5*time.Second)
			}
			errs := load.stopAndErrors()
			for i, err := range errs {
				if i < 5 {
					t.Errorf("a caller saw: %v", err)
				}
			}
			if len(errs) > 0 {
				t.Fatalf("%d callers saw errors; %d signatures good", len(errs), load.ok.Load())
			}
			if err := p.Healthy(); err != nil {
				t.Errorf("Healthy after recovery: %v", err)
			}
			if n := logs.FilterMessage("pkcs11 logging in again").Len(); n < 3 {
				t.Errorf("%d re-logins logged, want at least 3", n)
			}
			if n := logs.FilterMessage("pkcs11 session evicted").Len(); n == 0 {
				t.Error("no session eviction logged")
			}
			assertNoSecret(t, logs, tok.PIN)
			t.Logf("%d good signatures; %d evictions, %d re-logins", load.ok.Load(),
				logs.FilterMessage("pkcs11 session evicted").Len(), logs.FilterMessage("pkcs11 logging in again").Len())
		})
	}
}

// pauseAround holds the provider's module calls while the test acts behind
// its back (see softhsmtest.Token.Around).
func pauseAround(t *testing.T, tok *softhsmtest.Token) func(func()) {
	return func(fn func()) {
		if err := PauseModule(tok.Module, fn); err != nil {
			t.Error(err)
		}
	}
}

// faultSwitch is a FaultHook whose answers a test can change while the
// provider runs.
type faultSwitch struct {
	mu     sync.Mutex
	answer map[string]uint
	calls  map[string]int
}

func newFaultSwitch() *faultSwitch {
	return &faultSwitch{answer: map[string]uint{}, calls: map[string]int{}}
}

func (f *faultSwitch) hook(op string) uint {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[op]++
	return f.answer[op]
}

func (f *faultSwitch) set(answers map[string]uint) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.answer = answers
}

func (f *faultSwitch) count(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

// The device disappears (SoftHSM cannot be unplugged, so the module's
// answers are injected, while the reload itself is real): callers get
// ErrUnavailable quickly, never a hang, the supervisor reloads the module
// with backoff, and signing resumes when the device is back.
func TestDeviceRemovedReloadsModule(t *testing.T) {
	tok := softhsmtest.New(t, "device")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	faults := newFaultSwitch()
	core, logs := observer.New(zap.DebugLevel)
	p := open(t, tok, keyConfigs(keys), func(c *Config) { c.FaultHook = faults.hook; c.Logger = zap.New(core) })
	name := string(providers.KeyECDSAP256)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	digest := digestOf(crypto.SHA256, []byte("device"))
	genBefore := p.mod.gen.Load()

	const removed = p11.CKR_DEVICE_REMOVED
	faults.set(map[string]uint{"sign": removed, "slot": p11.CKR_TOKEN_NOT_PRESENT})
	for i := 0; i < 20; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		start := time.Now()
		_, err := p.Sign(ctx, name, alg, digest)
		took := time.Since(start)
		cancel()
		if !errors.Is(err, providers.ErrUnavailable) {
			t.Fatalf("Sign with the device gone: %v, want ErrUnavailable", err)
		}
		// A Sign that ignored its deadline would wait for a reload that
		// keeps failing, i.e. forever: 1 s tells that apart with room for
		// a stalled CI machine.
		if took > time.Second {
			t.Fatalf("Sign with the device gone took %s with a 200ms deadline", took)
		}
	}
	if err := p.Healthy(); !errors.Is(err, providers.ErrUnavailable) {
		t.Errorf("Healthy with the device gone: %v, want ErrUnavailable", err)
	}
	// Backoff: a handful of slot lookups, not one per request.
	time.Sleep(100 * time.Millisecond)
	if n := faults.count("slot"); n < 1 || n > 8 {
		t.Errorf("%d reload attempts in ~100ms with a 20ms initial backoff", n)
	}

	faults.set(nil) // the device is back
	deadline := time.Now().Add(5 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		sig, err := p.Sign(ctx, name, alg, digest)
		cancel()
		if err == nil {
			if err := providers.Verify(keyInfo(t, p, name).Public, alg, digest, sig); err != nil {
				t.Fatal(err)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after the device came back: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if p.mod.gen.Load() == genBefore {
		t.Error("module was not reloaded")
	}
	if logs.FilterMessage("pkcs11 module reloaded").Len() == 0 || logs.FilterMessage("pkcs11 repair failed; backing off").Len() == 0 {
		t.Error("reload and backoff not logged")
	}
	if err := p.Healthy(); err != nil {
		t.Errorf("Healthy after recovery: %v", err)
	}
}

// One device fault costs one module reload. A signer that took its session
// before the fault and reaches the module while the supervisor repairs it
// meets the fault's consequences (the gate closed by the reload, a session
// of the old generation, the device gone) and reports them under the epoch
// the repair under way was asked for; that report is the repair's to
// answer. It used to be queued for a second repair, and the module was
// finalized and initialized again, voiding the sessions and the login the
// first had just made. Each case parks the straggler in the module's fault
// hook, holds the repair at the stage named, lets the straggler report
// there, and releases the repair.
func TestOneDeviceFaultReloadsOnce(t *testing.T) {
	type stage int
	const (
		draining   stage = iota // the reload waits for a call still inside the module
		finding                 // the module is reloaded; the keys are being found again
		escalating              // a re-login's sweep finds the device gone
	)
	tok := softhsmtest.New(t, "reloadonce")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	name := string(providers.KeyECDSAP256)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	for _, tc := range []struct {
		name      string
		at        stage
		first     uint // the first signer's C_Sign answer, which asks for the repair
		straggler uint // the straggler's; 0: the real call
	}{
		{"a signer meets the gate the reload closed", draining, p11.CKR_DEVICE_REMOVED, 0},
		{"a signer's session is from before the reload", finding, p11.CKR_DEVICE_REMOVED, 0},
		{"a re-login escalates to the reload a signer asked for", escalating, p11.CKR_USER_NOT_LOGGED_IN, p11.CKR_DEVICE_REMOVED},
	} {
		t.Run(tc.name, func(t *testing.T) {
			straggler := newHeldCall("sign") // the first signature, parked with its session
			straggler.rv = tc.straggler
			first := newHeldCall("sign") // the second, which asks for the repair: not held
			first.nth, first.rv = 2, tc.first
			first.release()
			repair := newHeldCall("") // the repair's module call held ("": none)
			switch tc.at {
			case finding:
				repair.op = "find"
			case escalating:
				repair.op, repair.rv = "session-info", p11.CKR_DEVICE_REMOVED // the device is gone
			}
			defer straggler.release()
			defer repair.release()
			p := open(t, tok, keyConfigs(keys), func(c *Config) { c.FaultHook = heldCalls(straggler, first, repair) })
			info := keyInfo(t, p, name)
			genBefore := p.mod.gen.Load()
			for _, h := range []*heldCall{straggler, first, repair} {
				h.armed.Store(true)
			}

			signers := newSigners(p, name, alg)
			go signers.sign("straggler")
			straggler.wait(t, "the straggler") // it holds a session of the healthy provider
			if tc.at == draining {
				// Another signer's call still inside the module holds the
				// reload in its drain, with the gate closed.
				inside := make(chan struct{})
				go p.mod.do(func(*p11.Ctx) error {
					close(inside)
					<-repair.out
					return nil
				})
				<-inside
			}
			go signers.sign("first")
			switch tc.at {
			case draining:
				waitFor(t, "the reload to close the gate", func() bool { return p.mod.gate.Load() == gateReload })
			default:
				repair.wait(t, "the repair")
			}
			straggler.release()
			if tc.straggler != 0 {
				// A fault above the repair under way is queued; the
				// escalation must then take it over.
				waitFor(t, "the straggler's reload request", func() bool { return pendingRepair(p) == repairReload })
			} else {
				// Nothing to wait for once it is dropped: give the
				// straggler time to report it.
				deadline := time.Now().Add(300 * time.Millisecond)
				for pendingRepair(p) == repairNone && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
			}
			repair.release()
			signers.verify(t, 2, info)
			waitHealthy(t, p, 5*time.Second)
			if n := p.mod.gen.Load() - genBefore; n != 1 {
				t.Errorf("one device fault reloaded the module %d times", n)
			}
		})
	}
}

// One device fault among signers under load reloads the module once, fault
// after fault, and no caller sees it.
func TestDeviceFaultsUnderLoadReloadOnceEach(t *testing.T) {
	tok := softhsmtest.New(t, "reloadload")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	var fault atomic.Bool
	p := open(t, tok, keyConfigs(keys), func(c *Config) {
		c.FaultHook = func(op string) uint {
			if op == "sign" && fault.CompareAndSwap(true, false) {
				return p11.CKR_DEVICE_REMOVED
			}
			return 0
		}
	})
	load := startLoad(t, p, string(providers.KeyECDSAP256), 8, 5*time.Second)
	load.settle(t, 100, 5*time.Second)
	const faults = 20
	for i := range faults {
		before := p.mod.gen.Load()
		fault.Store(true)
		waitFor(t, "a signer to meet the fault", func() bool { return !fault.Load() })
		load.settle(t, 100, 10*time.Second)
		waitHealthy(t, p, 5*time.Second)
		if n := p.mod.gen.Load() - before; n != 1 {
			t.Errorf("fault %d: %d module reloads, want 1", i, n)
		}
	}
	errs := load.stopAndErrors()
	for i, err := range errs {
		if i < 5 {
			t.Errorf("a caller saw: %v", err)
		}
	}
}

// pendingRepair is the repair the supervisor has been asked for and not
// yet started.
func pendingRepair(p *Provider) repairLevel {
	p.stateMu.Lock()
	defer p.stateMu.Unlock()
	return p.wanted
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10s for %s", what)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// No call outlives its deadline: with every session taken, Sign returns
// DeadlineExceeded at the deadline; with a repair that cannot finish, it
// returns ErrUnavailable by the deadline.
func TestSignHonoursDeadline(t *testing.T) {
	tok := softhsmtest.New(t, "deadline")
	tok.Around = pauseAround(t, tok)
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	faults := newFaultSwitch()
	p := open(t, tok, keyConfigs(keys), func(c *Config) { c.Sessions = 2; c.FaultHook = faults.hook })
	name := string(providers.KeyECDSAP256)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	digest := digestOf(crypto.SHA256, []byte("deadline"))
	// A Sign that missed its deadline here would hang (the pool is held
	// until it returns, the login never comes back): slack tells that
	// apart from a late return on a stalled CI machine.
	const deadline, slack = 200 * time.Millisecond, time.Second

	timed := func(t *testing.T) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		start := time.Now()
		_, err := p.Sign(ctx, name, alg, digest)
		return time.Since(start), err
	}

	t.Run("pool exhausted", func(t *testing.T) {
		var held []*session
		for i := 0; i < p.size; i++ {
			s, _, err := p.acquire(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, s)
		}
		took, err := timed(t)
		for _, s := range held {
			p.release(s)
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Sign on an exhausted pool: %v, want DeadlineExceeded", err)
		}
		if took < deadline-10*time.Millisecond || took > deadline+slack {
			t.Errorf("Sign on an exhausted pool returned after %s, deadline %s", took, deadline)
		}
	})

	t.Run("repair stuck", func(t *testing.T) {
		// The login goes away and every login attempt fails with an error
		// that is not about the PIN: the supervisor keeps trying, callers
		// get ErrUnavailable by their deadline.
		faults.set(map[string]uint{"login": p11.CKR_DEVICE_MEMORY})
		tok.Logout(t)
		for i := 0; i < 5; i++ {
			took, err := timed(t)
			if !errors.Is(err, providers.ErrUnavailable) {
				t.Fatalf("Sign while the login cannot be repaired: %v, want ErrUnavailable", err)
			}
			if took > deadline+slack {
				t.Fatalf("Sign while the login cannot be repaired took %s", took)
			}
		}
		faults.set(nil)
		waitHealthy(t, p, 5*time.Second)
		if took, err := timed(t); err != nil {
			t.Fatalf("Sign after the repair (%s): %v", took, err)
		}
	})

	t.Run("background context while degraded", func(t *testing.T) {
		// No deadline at all: a broken provider must still answer.
		faults.set(map[string]uint{"sign": p11.CKR_DEVICE_REMOVED, "slot": p11.CKR_TOKEN_NOT_PRESENT})
		done := make(chan error, 1)
		go func() {
			_, err := p.Sign(context.Background(), name, alg, digest)
			done <- err
		}()
		select {
		case err := <-done:
			if !errors.Is(err, providers.ErrUnavailable) {
				t.Errorf("Sign: %v, want ErrUnavailable", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("Sign without a deadline hung on a broken provider")
		}
		faults.set(nil)
		waitHealthy(t, p, 5*time.Second)
	})
}

func waitHealthy(t *testing.T, p *Provider, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := p.Healthy()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not healthy after %s: %v", within, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The PIN changes while the provider runs; when the login is lost the one
// re-login is refused, and the provider stops there: every request fails
// with ErrPINIncorrect and the PIN is never presented again.
func TestReloginWithWrongPINStopsRetrying(t *testing.T) {
	tok := softhsmtest.New(t, "repin")
	tok.Around = pauseAround(t, tok)
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	faults := newFaultSwitch()
	core, logs := observer.New(zap.DebugLevel)
	oldPIN := tok.PIN
	p := open(t, tok, keyConfigs(keys), func(c *Config) { c.FaultHook = faults.hook; c.Logger = zap.New(core) })
	name := string(providers.KeyECDSAP256)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	digest := digestOf(crypto.SHA256, []byte("repin"))
	if _, err := p.Sign(context.Background(), name, alg, digest); err != nil {
		t.Fatal(err)
	}
	loginsAtOpen := faults.count("login")

	tok.ChangePIN(t, "changed-pin-2024")
	tok.Logout(t)
	for i := 0; i < 10; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := p.Sign(ctx, name, alg, digest)
		cancel()
		if !errors.Is(err, providers.ErrPINIncorrect) {
			t.Fatalf("Sign %d after the PIN changed: %v, want ErrPINIncorrect", i, err)
		}
	}
	time.Sleep(200 * time.Millisecond) // ten backoff periods
	if n := faults.count("login") - loginsAtOpen; n != 1 {
		t.Errorf("%d login attempts after the PIN changed, want exactly 1", n)
	}
	if err := p.Healthy(); !errors.Is(err, providers.ErrPINIncorrect) {
		t.Errorf("Healthy: %v, want ErrPINIncorrect", err)
	}
	assertNoSecret(t, logs, oldPIN)
	assertNoSecret(t, logs, tok.PIN)
}

// A signature that fails because its session died is retried once on a fresh
// session; the caller never sees the first failure.
func TestDeadSessionRetriedOnce(t *testing.T) {
	tok := softhsmtest.New(t, "retry")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	name := string(providers.KeyECDSAP256)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	digest := digestOf(crypto.SHA256, []byte("retry"))
	cases := []struct {
		name     string
		answers  []uint // the module's answers to successive signs; 0 = real call
		wantErr  error
		wantSign int
	}{
		{"session handle invalid", []uint{p11.CKR_SESSION_HANDLE_INVALID}, nil, 2},
		{"session closed", []uint{p11.CKR_SESSION_CLOSED}, nil, 2},
		{"operation active", []uint{p11.CKR_OPERATION_ACTIVE}, nil, 2},
		{"device error", []uint{p11.CKR_DEVICE_ERROR}, nil, 2},
		{"transient", []uint{p11.CKR_FUNCTION_FAILED}, nil, 2},
		{"stale handle", []uint{p11.CKR_OBJECT_HANDLE_INVALID}, nil, 2},
		{"twice dead", []uint{p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_HANDLE_INVALID}, providers.ErrUnavailable, 2},
		{"bad mechanism", []uint{p11.CKR_MECHANISM_INVALID}, providers.ErrUnsupportedAlgorithm, 1},
		{"bad data", []uint{p11.CKR_DATA_LEN_RANGE}, providers.ErrBadRequest, 1},
	}
	var mu sync.Mutex
	var queue []uint
	signs := 0
	p := open(t, tok, keyConfigs(keys), func(c *Config) {
		c.FaultHook = func(op string) uint {
			if op != "sign" {
				return 0
			}
			mu.Lock()
			defer mu.Unlock()
			signs++
			if len(queue) == 0 {
				return 0
			}
			rv := queue[0]
			queue = queue[1:]
			return rv
		}
	})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			waitHealthy(t, p, 2*time.Second)
			mu.Lock()
			queue, signs = append([]uint(nil), tc.answers...), 0
			mu.Unlock()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			sig, err := p.Sign(ctx, name, alg, digest)
			mu.Lock()
			n := signs
			mu.Unlock()
			if n != tc.wantSign {
				t.Errorf("%d sign attempts, want %d", n, tc.wantSign)
			}
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Sign: %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			if err := providers.Verify(keyInfo(t, p, name).Public, alg, digest, sig); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Two providers share one module, so a reload by one voids the other's
// object handles too, and SoftHSM2 numbers handles from 1 again after
// C_Initialize: a provider that went on using its old handles would sign
// with whatever object now has the number, another provider's key among
// them. Every signature must still verify under the key it was asked of.
func TestReloadBySharerFindsKeysAgain(t *testing.T) {
	cases := []struct {
		name             string
		reloaderSessions int
		reloaderKeys     []string
		bystanderKeys    []string
		firstAfterReload string // its old handle is the number a reloader's key gets (SoftHSM2 2.6)
	}{
		{"two sessions, one key", 2, []string{"a0"}, []string{"b0", "b1"}, "b1"},
		{"three sessions, two keys", 3, []string{"a0", "a1"}, []string{"b0", "b1", "b2"}, "b2"},
	}
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tok := softhsmtest.New(t, "sharer")
			generate := func(labels []string, idBase byte) []KeyConfig {
				var kc []KeyConfig
				for i, l := range labels {
					k := tok.GenerateKey(t, providers.KeyECDSAP256, l, []byte{idBase + byte(i)})
					kc = append(kc, KeyConfig{Name: l, URI: k.URI})
				}
				return kc
			}
			bystanderKeys := generate(tc.bystanderKeys, 0x10)
			reloaderKeys := generate(tc.reloaderKeys, 0x20)
			bystander := open(t, tok, bystanderKeys, func(c *Config) { c.ID = "bystander"; c.Sessions = 1 })
			faults := newFaultSwitch()
			reloader := open(t, tok, reloaderKeys, func(c *Config) {
				c.ID = "reloader"
				c.Sessions = tc.reloaderSessions
				c.FaultHook = faults.hook
			})
			for _, kc := range bystanderKeys {
				signAndVerify(t, bystander, kc.Name, alg, []byte("before"))
			}

			genBefore := reloader.mod.gen.Load()
			faults.set(map[string]uint{"sign": p11.CKR_DEVICE_REMOVED})
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			_, err := reloader.Sign(ctx, reloaderKeys[0].Name, alg, digestOf(crypto.SHA256, []byte("gone")))
			cancel()
			if !errors.Is(err, providers.ErrUnavailable) {
				t.Fatalf("Sign with the device gone: %v, want ErrUnavailable", err)
			}
			faults.set(nil)
			waitHealthy(t, reloader, 5*time.Second)
			if reloader.mod.gen.Load() == genBefore {
				t.Fatal("the module was not reloaded")
			}

			signAndVerify(t, bystander, tc.firstAfterReload, alg, []byte("first after the sharer's reload"))
			if got, want := bystander.gen.Load(), bystander.mod.gen.Load(); got != want {
				t.Errorf("the bystander signed with handles of generation %d; the module is at %d", got, want)
			}
			for _, kc := range bystanderKeys {
				signAndVerify(t, bystander, kc.Name, alg, []byte("after the sharer's reload"))
			}
			for _, kc := range reloaderKeys {
				signAndVerify(t, reloader, kc.Name, alg, []byte("after its own reload"))
			}
		})
	}
}

// A provider's reload after a sharer's stores the module's generation
// before it finds its keys again; a signer that took a session of the new
// generation just before, and loaded its key's handle from the old one,
// must not reach the module with that handle in between: SoftHSM2 has
// given the number to the sharer's key (b1's old handle is a0's after the
// reload, as in TestReloadBySharerFindsKeysAgain), and the signature would
// verify under a0, not under the key asked for. Each case parks the signer
// in the sign hook with its session and handle in hand (its first try
// failed, so it holds a retry's fresh session opened after the sharer's
// reload), holds the bystander's repair at the stage named, and lets the
// signer go: it must get a clean ErrUnavailable or a signature that
// verifies under b1.
func TestStaleKeyHandleNeverSignsInANewGeneration(t *testing.T) {
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	for _, tc := range []struct {
		name   string
		heldOp string // the bystander's repair call held
	}{
		{"the generation is stored, the slot not yet found", "slot"},
		{"the keys are being found again", "find"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := softhsmtest.New(t, "stalehandle")
			generate := func(labels []string, idBase byte) []KeyConfig {
				var kc []KeyConfig
				for i, l := range labels {
					k := tok.GenerateKey(t, providers.KeyECDSAP256, l, []byte{idBase + byte(i)})
					kc = append(kc, KeyConfig{Name: l, URI: k.URI})
				}
				return kc
			}
			bystanderKeys := generate([]string{"b0", "b1"}, 0x10)
			reloaderKeys := generate([]string{"a0"}, 0x20)

			first := newHeldCall("sign") // its session dies; it retries on a fresh one
			first.rv = p11.CKR_SESSION_HANDLE_INVALID
			retry := newHeldCall("sign") // the retry, its session and handle in hand
			retry.nth = 2
			repair := newHeldCall(tc.heldOp)
			defer first.release()
			defer retry.release()
			defer repair.release()
			bystander := open(t, tok, bystanderKeys, func(c *Config) {
				c.ID = "bystander"
				c.Sessions = 1
				c.FaultHook = heldCalls(first, retry, repair)
			})
			faults := newFaultSwitch()
			reloader := open(t, tok, reloaderKeys, func(c *Config) {
				c.ID = "reloader"
				c.Sessions = 2
				c.FaultHook = faults.hook
			})
			b0, b1 := keyInfo(t, bystander, "b0"), keyInfo(t, bystander, "b1")
			a0 := keyInfo(t, reloader, "a0")

			type result struct {
				sig []byte
				err error
			}
			sign := func(name string, digest []byte) chan result {
				ch := make(chan result, 1)
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					sig, err := bystander.Sign(ctx, name, alg, digest)
					ch <- result{sig, err}
				}()
				return ch
			}

			first.armed.Store(true)
			retry.armed.Store(true)
			digest := digestOf(crypto.SHA256, []byte("asked of b1"))
			signer := sign("b1", digest)
			first.wait(t, "the signer's first try")

			// The sharer reloads the module; the bystander has not noticed.
			genBefore := reloader.mod.gen.Load()
			faults.set(map[string]uint{"sign": p11.CKR_DEVICE_REMOVED})
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			_, err := reloader.Sign(ctx, "a0", alg, digestOf(crypto.SHA256, []byte("gone")))
			cancel()
			if !errors.Is(err, providers.ErrUnavailable) {
				t.Fatalf("Sign with the device gone: %v, want ErrUnavailable", err)
			}
			faults.set(nil)
			waitHealthy(t, reloader, 5*time.Second)
			if reloader.mod.gen.Load() == genBefore {
				t.Fatal("the module was not reloaded")
			}

			first.release()
			retry.wait(t, "the signer's retry")

			// Another signer finds the bystander behind the module; its
			// repair is held with the provider's generation already new.
			repair.armed.Store(true)
			other := sign("b0", digestOf(crypto.SHA256, []byte("asked of b0")))
			repair.wait(t, "the bystander's repair")
			if got, want := bystander.gen.Load(), bystander.mod.gen.Load(); got != want {
				t.Fatalf("the repair is held with the provider at generation %d, the module at %d", got, want)
			}

			retry.release()
			var r result
			select {
			case r = <-signer:
				repair.release()
			case <-time.After(500 * time.Millisecond):
				// It waits for the repair: let it finish.
				repair.release()
				r = <-signer
			}
			switch {
			case r.err != nil:
				if !errors.Is(r.err, providers.ErrUnavailable) {
					t.Errorf("the signer got %v, want ErrUnavailable or a good signature", r.err)
				}
			case providers.Verify(b1.Public, alg, digest, r.sig) == nil:
			case providers.Verify(a0.Public, alg, digest, r.sig) == nil:
				t.Errorf("b1's signature verifies under the reloader's key a0: signed with a handle of the old generation")
			default:
				t.Errorf("b1's signature verifies under no key it was asked of: %v", providers.Verify(b1.Public, alg, digest, r.sig))
			}
			if o := <-other; o.err != nil {
				t.Errorf("the other signer: %v", o.err)
			} else if err := providers.Verify(b0.Public, alg, digestOf(crypto.SHA256, []byte("asked of b0")), o.sig); err != nil {
				t.Errorf("the other signer's signature: %v", err)
			}

			waitHealthy(t, bystander, 5*time.Second)
			for _, kc := range bystanderKeys {
				signAndVerify(t, bystander, kc.Name, alg, []byte("after the repair"))
			}
			signAndVerify(t, reloader, "a0", alg, []byte("after the repair"))
		})
	}
}

// signers runs Signs of one key in the background, each over a digest of
// the signer's name, for tests that hold signers at different points.
type signers struct {
	p       *Provider
	name    string
	alg     providers.Algorithm
	results chan signerResult
}

type signerResult struct {
	who         string
	digest, sig []byte
	err         error
}

func newSigners(p *Provider, name string, alg providers.Algorithm) *signers {
	return &signers{p: p, name: name, alg: alg, results: make(chan signerResult, 8)}
}

// sign signs as who (10 s deadline) and reports the outcome to verify.
func (s *signers) sign(who string) {
	digest := digestOf(crypto.SHA256, []byte(who))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sig, err := s.p.Sign(ctx, s.name, s.alg, digest)
	s.results <- signerResult{who, digest, sig, err}
}

// verify waits for n signers and fails the test for each whose Sign failed
// or whose signature does not verify under info.
func (s *signers) verify(t *testing.T, n int, info providers.KeyInfo) {
	t.Helper()
	for range n {
		r := <-s.results
		if r.err == nil {
			r.err = providers.Verify(info.Public, s.alg, r.digest, r.sig)
		}
		if r.err != nil {
			t.Errorf("%s signer: %v", r.who, r.err)
		}
	}
}

// heldCall parks the first call of op made once armed, until released.
// With nth set it parks the nth instead (counting from the arming), and
// with rv set the call, once released, fails with rv instead of being made.
type heldCall struct {
	op      string
	nth     int32
	rv      uint
	armed   atomic.Bool
	calls   atomic.Int32 // of op, since armed
	in, out chan struct{}
	release func()
}

func newHeldCall(op string) *heldCall {
	h := &heldCall{op: op, nth: 1, in: make(chan struct{}), out: make(chan struct{})}
	h.release = sync.OnceFunc(func() { close(h.out) })
	return h
}

func (h *heldCall) hook(op string) uint {
	if !h.counts(op) {
		return 0
	}
	return h.park()
}

// counts counts a call of op and reports whether it is the one to hold.
func (h *heldCall) counts(op string) bool {
	return op == h.op && h.armed.Load() && h.calls.Add(1) == h.nth
}

func (h *heldCall) park() uint {
	close(h.in)
	<-h.out
	return h.rv
}

// heldCalls is a fault hook made of several heldCalls: every one counts
// the call before any parks it (a parked call must not keep the others
// from counting the calls made meanwhile), and the first to fail it
// gives its answer.
func heldCalls(hs ...*heldCall) func(string) uint {
	return func(op string) uint {
		var hits []*heldCall
		for _, h := range hs {
			if h.counts(op) {
				hits = append(hits, h)
			}
		}
		var rv uint
		for _, h := range hits {
			if r := h.park(); rv == 0 {
				rv = r
			}
		}
		return rv
	}
}

func (h *heldCall) wait(t *testing.T, who string) {
	t.Helper()
	select {
	case <-h.in:
	case <-time.After(10 * time.Second):
		t.Fatalf("waited 10s for %s to reach %s", who, h.op)
	}
}

// otherPINEnv names the PIN of the second token of sharedTokens.
const otherPINEnv = "SIGIL_TEST_PKCS11_OTHER_PIN"

// sharedTokens is one module with two tokens (two partitions of an HSM,
// each with its own PIN), each holding an ECDSA key labelled "release":
// the set-up of the tests in which one provider's reload voids another's
// sessions and handles. pinEnv names own's PIN, otherPINEnv the other's.
type sharedTokens struct {
	tok, other       *softhsmtest.Token
	ownKey, otherKey softhsmtest.Key
}

func newSharedTokens(t *testing.T, otherPIN string) sharedTokens {
	t.Helper()
	tok := softhsmtest.New(t, "own")
	other := tok.AddToken(t, "other", otherPIN)
	st := sharedTokens{
		tok: tok, other: other,
		ownKey:   tok.GenerateKey(t, providers.KeyECDSAP256, "release", []byte{1}),
		otherKey: other.GenerateKey(t, providers.KeyECDSAP256, "release", []byte{1}),
	}
	t.Setenv(pinEnv, tok.PIN)
	t.Setenv(otherPINEnv, other.PIN)
	return st
}

// openSharer opens "sharer", a provider of the other token's key on the
// same module. Its fault hook answers from faults first, then from held
// (nil: none). It is closed when the test ends, after the test's own
// deferred calls, which release what they held first.
func (st sharedTokens) openSharer(t *testing.T, sessions int, faults *faultSwitch, held *heldCall) *Provider {
	t.Helper()
	sharer, err := Open(context.Background(), Config{ID: "sharer", Module: st.tok.Module, PINEnv: otherPINEnv,
		Keys: []KeyConfig{{Name: "release", URI: st.otherKey.URI}}, Sessions: sessions, Backoff: 20 * time.Millisecond,
		FaultHook: func(op string) uint {
			if rv := faults.hook(op); rv != 0 || held == nil {
				return rv
			}
			return held.hook(op)
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sharer.Close(); err != nil {
			t.Errorf("sharer Close: %v", err)
		}
	})
	return sharer
}

// Two providers serve two tokens of one module (two partitions of an HSM,
// each with its own PIN and a key of the same name), so a reload by one
// voids the other's sessions, and SoftHSM2 numbers sessions from 1 again:
// a session number from before the reload now names one of the sharer's
// sessions, on the other token. Each case holds one of own's calls on a
// session opened before the sharer reloads and lets it go after: the
// call must not reach the module on that number. Before, a re-login's
// C_Login presented own's PIN to the other token (which counted a wrong
// PIN, and own stopped for good with PIN_INCORRECT); a re-login's key
// search found the other token's key of the same name and reported own's
// key replaced; a key generation ran on the sharer's read-only session
// and then closed it.
func TestSessionCallsAfterASharersReload(t *testing.T) {
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	for _, tc := range []struct {
		name       string
		op         string // own's call held across the sharer's reload
		sharerHeld string // the sharer's repair call held when own's goes on ("": none)
	}{
		{"a re-login's C_Login", "login", "login"},
		{"a re-login's key search", "find", ""},
		{"a key generation", "generate", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newSharedTokens(t, "other-pin-5")
			core, logs := observer.New(zap.DebugLevel)
			held := newHeldCall(tc.op)
			defer held.release()
			own := open(t, st.tok, []KeyConfig{{Name: "release", URI: st.ownKey.URI}}, func(c *Config) {
				c.ID, c.Sessions, c.Logger, c.FaultHook = "own", 1, zap.New(core), held.hook
			})
			ownInfo := keyInfo(t, own, "release")

			// own's call takes its session and is held.
			held.armed.Store(true)
			type result struct {
				sig  []byte
				info providers.KeyInfo
				err  error
			}
			done := make(chan result, 1)
			digest := digestOf(crypto.SHA256, []byte("own"))
			if tc.op == "generate" {
				go func() {
					info, err := own.GenerateKey(context.Background(), "rotated", providers.KeyECDSAP256, "", []byte{9})
					done <- result{info: info, err: err}
				}()
			} else {
				logoutInside(t, own) // own's next Sign asks for a re-login
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					sig, err := own.Sign(ctx, "release", alg, digest)
					done <- result{sig: sig, err: err}
				}()
			}
			held.wait(t, "own")

			// The sharer opens on the other token and reloads the module.
			faults := newFaultSwitch()
			sharerHeld := newHeldCall(tc.sharerHeld)
			defer sharerHeld.release()
			sharer := st.openSharer(t, 8, faults, sharerHeld)
			genBefore := sharer.mod.gen.Load()
			sharerHeld.armed.Store(tc.sharerHeld != "")
			faults.set(map[string]uint{"sign": p11.CKR_DEVICE_REMOVED})
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			sharer.Sign(ctx, "release", alg, digestOf(crypto.SHA256, []byte("gone")))
			cancel()
			faults.set(nil)
			if tc.sharerHeld != "" {
				sharerHeld.wait(t, "the sharer's repair")
			} else {
				waitHealthy(t, sharer, 5*time.Second)
			}
			if sharer.mod.gen.Load() == genBefore {
				t.Fatal("the sharer did not reload the module")
			}

			held.release()
			var r result
			select {
			case r = <-done:
			case <-time.After(15 * time.Second):
				t.Fatal("own's call did not return")
			}
			sharerHeld.release()
			waitHealthy(t, sharer, 5*time.Second)

			if tc.op == "generate" {
				// It fails cleanly (the session is gone), or works on own's token.
				if r.err != nil && (!errors.Is(r.err, providers.ErrUnavailable) || strings.Contains(r.err.Error(), "CKR_")) {
					t.Errorf("GenerateKey across the sharer's reload: %v, want a clean ErrUnavailable", r.err)
				}
				if r.err == nil {
					signAndVerify(t, own, "rotated", alg, []byte("generated across the reload"))
				}
			} else if r.err != nil {
				t.Errorf("own's Sign across the sharer's reload: %v", r.err)
			} else if err := providers.Verify(ownInfo.Public, alg, digest, r.sig); err != nil {
				t.Errorf("own's signature: %v", err)
			}
			for _, msg := range []string{
				"pkcs11 key object replaced: its public key is not the served key's; not signing with it",
				"pkcs11 key object missing after re-login",
				"pkcs11 login refused; provider stopped retrying",
			} {
				if n := logs.FilterMessage(msg).Len(); n != 0 {
					t.Errorf("own logged %q", msg)
				}
			}
			sharer.mod.pause(func() {
				for n := len(sharer.idle); n > 0; n-- {
					s := <-sharer.idle
					if _, err := sharer.mod.ctx.GetSessionInfo(s.h); err != nil {
						t.Errorf("a session of the sharer's pool was closed under it: %v", err)
					}
					sharer.idle <- s
				}
			})

			waitHealthy(t, own, 5*time.Second)
			signAndVerify(t, own, "release", alg, []byte("after"))
			signAndVerify(t, sharer, "release", alg, []byte("after"))
			if tc.op == "generate" {
				if _, err := own.GenerateKey(context.Background(), "rotated-again", providers.KeyECDSAP256, "", []byte{10}); err != nil {
					t.Fatalf("GenerateKey after the repair: %v", err)
				}
				signAndVerify(t, own, "rotated-again", alg, []byte("new key"))
			}
		})
	}
}

// An open's PIN goes only to the slot it looked up in the module's current
// generation: a sharer's reload that lands between the open's slot lookup
// and its first session (SoftHSM2 keeps slot ids, a module that renumbers
// its slots at C_Initialize would not) makes the open look again, not
// present the PIN on a slot number from before the reload.
func TestOpenLogsInOnlyOnTheSlotOfItsGeneration(t *testing.T) {
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	st := newSharedTokens(t, "other-pin-7")
	faults := newFaultSwitch()
	sharer := st.openSharer(t, 2, faults, nil)
	modGen := func() uint64 {
		modules.mu.Lock()
		defer modules.mu.Unlock()
		return modules.m[filepath.Clean(st.tok.Module)].gen.Load()
	}
	var mu sync.Mutex
	var slotGen uint64
	var bad []string
	held := newHeldCall("open-session")
	held.armed.Store(true)
	defer held.release()
	opened := make(chan error, 1)
	var own *Provider
	go func() {
		var err error
		own, err = Open(context.Background(), Config{ID: "own", Module: st.tok.Module, PINEnv: pinEnv,
			Keys: []KeyConfig{{Name: "release", URI: st.ownKey.URI}}, Sessions: 2, Backoff: 20 * time.Millisecond,
			FaultHook: func(op string) uint {
				mu.Lock()
				switch op {
				case "slot":
					slotGen = modGen()
				case "login":
					if g := modGen(); g != slotGen {
						bad = append(bad, fmt.Sprintf("C_Login in generation %d, the slot looked up in generation %d", g, slotGen))
					}
				}
				mu.Unlock()
				return held.hook(op)
			}})
		opened <- err
	}()
	held.wait(t, "own's open")
	faults.set(map[string]uint{"sign": p11.CKR_DEVICE_REMOVED})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	sharer.Sign(ctx, "release", alg, digestOf(crypto.SHA256, []byte("gone")))
	cancel()
	faults.set(nil)
	waitHealthy(t, sharer, 5*time.Second)
	held.release()
	if err := <-opened; err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer own.Close()
	mu.Lock()
	defer mu.Unlock()
	for _, b := range bad {
		t.Errorf("PIN presented on a slot number from an earlier generation: %s", b)
	}
}

// A provider opens (at the agent's start) while another provider on the
// same module, serving another token, reloads it. The open waits for the
// reload and succeeds; it used to fail at once with the module's raw
// CKR_CRYPTOKI_NOT_INITIALIZED (the gate closed by the reload), or, with
// the reload landing between its steps, go on with a session the reload
// had voided. When the sharer's reload fails and leaves the module down,
// the open fails with a clean UNAVAILABLE.
func TestOpenDuringASharersReload(t *testing.T) {
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	for _, tc := range []struct {
		name        string
		sharerHeld  string // the sharer's reload held there while own opens
		ownHeld     string // own's open held there while the sharer reloads
		reloadFails bool   // the sharer's C_Initialize fails until the end
	}{
		{"the reload holds the module's gate", "initialize", "", false},
		{"a reload between the open's steps", "", "login", false},
		{"the reload leaves the module down", "", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newSharedTokens(t, "other-pin-6")
			faults := newFaultSwitch()
			sharerHeld := newHeldCall(tc.sharerHeld)
			defer sharerHeld.release() // before the sharer's Close: it waits for the repair
			sharer := st.openSharer(t, 2, faults, sharerHeld)
			reload := func() {
				t.Helper()
				if tc.reloadFails {
					faults.set(map[string]uint{"sign": p11.CKR_DEVICE_REMOVED, "initialize": p11.CKR_DEVICE_REMOVED})
				} else {
					faults.set(map[string]uint{"sign": p11.CKR_DEVICE_REMOVED})
				}
				ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
				sharer.Sign(ctx, "release", alg, digestOf(crypto.SHA256, []byte("gone")))
				cancel()
				if !tc.reloadFails {
					faults.set(nil)
				}
			}

			ownHeld := newHeldCall(tc.ownHeld)
			defer ownHeld.release()
			ownHeld.armed.Store(tc.ownHeld != "")
			reachedSlot := make(chan struct{}, 1)
			opened := make(chan error, 1)
			var own *Provider
			openOwn := func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				var err error
				own, err = Open(ctx, Config{ID: "own", Module: st.tok.Module, PINEnv: pinEnv,
					Keys: []KeyConfig{{Name: "release", URI: st.ownKey.URI}}, Sessions: 2, Backoff: 20 * time.Millisecond,
					FaultHook: func(op string) uint {
						if op == "slot" {
							select {
							case reachedSlot <- struct{}{}:
							default:
							}
						}
						return ownHeld.hook(op)
					}})
				opened <- err
			}
			genBefore := sharer.mod.gen.Load()
			switch {
			case tc.sharerHeld != "":
				sharerHeld.armed.Store(true)
				reload()
				sharerHeld.wait(t, "the sharer's reload")
				go openOwn()
				<-reachedSlot
				select {
				case err := <-opened:
					t.Fatalf("Open returned during the sharer's reload: %v", err)
				case <-time.After(200 * time.Millisecond):
				}
				sharerHeld.release()
			case tc.ownHeld != "":
				go openOwn()
				ownHeld.wait(t, "own's open")
				reload()
				waitHealthy(t, sharer, 5*time.Second)
				ownHeld.release()
			default:
				reload()
				waitFor(t, "the sharer's reload to fail", func() bool { return faults.count("initialize") > 0 })
				go openOwn()
			}
			var openErr error
			select {
			case openErr = <-opened:
			case <-time.After(15 * time.Second):
				t.Fatal("Open did not return")
			}
			if own != nil {
				defer own.Close()
			}
			if sharer.mod.gen.Load() == genBefore {
				t.Fatal("the sharer did not reload the module")
			}
			if tc.reloadFails {
				if openErr == nil {
					t.Fatal("Open on a module left down succeeded")
				}
				if !errors.Is(openErr, providers.ErrUnavailable) || strings.Contains(openErr.Error(), "CKR_") {
					t.Errorf("Open on a module left down: %v, want a clean ErrUnavailable", openErr)
				}
				faults.set(nil) // the device is back
				waitHealthy(t, sharer, 5*time.Second)
				go openOwn()
				openErr = <-opened
				if own != nil {
					defer own.Close()
				}
			}
			if openErr != nil {
				t.Fatalf("Open during the sharer's reload: %v", openErr)
			}
			signAndVerify(t, own, "release", alg, []byte("opened during a reload"))
			waitHealthy(t, sharer, 5*time.Second)
			signAndVerify(t, sharer, "release", alg, []byte("after"))
		})
	}
}

// An open that meets another provider's reload which fails before the
// module's generation moves (its drain times out with a call still inside
// the module, or C_Finalize fails) gets the closed gate's
// CKR_CRYPTOKI_NOT_INITIALIZED from a call. When that reload had already
// given up by the time the open looked, nothing said a reload had been met,
// and the open failed with the module's raw code: 3 of 99 opens here. It
// must succeed once the gate is open, or fail with a clean UNAVAILABLE.
// The sharer's reloads fail over and over, each holding the gate for a
// millisecond; opens are made until one fails with a raw code, or 400.
func TestOpenAcrossASharersFailedReloads(t *testing.T) {
	st := newSharedTokens(t, "other-pin-8")
	sharer := st.openSharer(t, 1, newFaultSwitch(), nil)
	m := sharer.mod
	drainTimeout := reloadDrainTimeout
	reloadDrainTimeout = time.Millisecond
	defer func() { reloadDrainTimeout = drainTimeout }()
	inside, leave := make(chan struct{}), make(chan struct{})
	go m.do(func(*p11.Ctx) error { // what each reload's drain waits for in vain
		close(inside)
		<-leave
		return nil
	})
	<-inside
	var stop atomic.Bool
	reloads := make(chan error, 1)
	go func() {
		for !stop.Load() {
			gen, _, err := m.reload(m.gen.Load(), nil)
			if err == nil || gen != m.gen.Load() {
				reloads <- fmt.Errorf("a reload did not fail in its drain: %v", err)
				return
			}
			time.Sleep(time.Millisecond)
		}
		reloads <- nil
	}()
	defer func() {
		stop.Store(true)
		if err := <-reloads; err != nil {
			t.Error(err)
		}
		close(leave)
	}()
	opened := 0
	for range 400 {
		own, err := Open(context.Background(), Config{ID: "own", Module: st.tok.Module, PINEnv: pinEnv,
			Keys: []KeyConfig{{Name: "release", URI: st.ownKey.URI}}, Sessions: 1, Backoff: 20 * time.Millisecond})
		if err != nil {
			if !errors.Is(err, providers.ErrUnavailable) || strings.Contains(err.Error(), "CKR_") {
				t.Fatalf("Open across a sharer's failed reloads: %v, want success or a clean ErrUnavailable", err)
			}
			continue
		}
		opened++
		if err := own.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	if opened == 0 {
		t.Error("no open succeeded between the failed reloads")
	}
}

// replaceKeyPair destroys the objects labelled label and generates a new
// pair under the same label and id.
func replaceKeyPair(t *testing.T, tok *softhsmtest.Token, label string, id []byte) {
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			t.Fatalf("C_OpenSession: %v", err)
		}
		defer c.CloseSession(s)
		objs, err := findObjects(c, s, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, label)}, 4)
		if err != nil || len(objs) != 2 {
			t.Fatalf("find the key pair: %d objects, %v", len(objs), err)
		}
		for _, o := range objs {
			if err := c.DestroyObject(s, o); err != nil {
				t.Fatalf("C_DestroyObject: %v", err)
			}
		}
	})
	tok.GenerateKey(t, providers.KeyECDSAP256, label, id)
}

// replacePrivateKeyAlone destroys the private key labelled label and puts
// another private key in its place, under its label and id, as an import
// would: the old public key object stays on the token.
func replacePrivateKeyAlone(t *testing.T, tok *softhsmtest.Token, label string, id []byte) {
	tok.GenerateKey(t, providers.KeyECDSAP256, label+"-new", []byte("new"))
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			t.Fatalf("C_OpenSession: %v", err)
		}
		defer c.CloseSession(s)
		if err := c.Login(s, p11.CKU_USER, tok.PIN); err != nil && rvOf(err) != p11.CKR_USER_ALREADY_LOGGED_IN {
			t.Fatalf("C_Login: %v", err)
		}
		find := func(class uint, label string) p11.ObjectHandle {
			objs, err := findObjects(c, s, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, class), p11.NewAttribute(p11.CKA_LABEL, label)}, 2)
			if err != nil || len(objs) != 1 {
				t.Fatalf("find %s: %d objects, %v", label, len(objs), err)
			}
			return objs[0]
		}
		for _, o := range []p11.ObjectHandle{find(p11.CKO_PRIVATE_KEY, label), find(p11.CKO_PUBLIC_KEY, label+"-new")} {
			if err := c.DestroyObject(s, o); err != nil {
				t.Fatalf("C_DestroyObject: %v", err)
			}
		}
		if err := c.SetAttributeValue(s, find(p11.CKO_PRIVATE_KEY, label+"-new"), []*p11.Attribute{
			p11.NewAttribute(p11.CKA_LABEL, label), p11.NewAttribute(p11.CKA_ID, id),
		}); err != nil {
			t.Fatalf("C_SetAttributeValue: %v", err)
		}
	})
}

// A served key is replaced under its label and id, then the login goes:
// the re-login finds an object by those names, but it is not the served
// key, so the provider refuses to sign with it rather than hand out
// signatures under a kid that did not make them. Either the pair is
// re-created, or the private key alone is replaced and the old public
// object left behind, which a check of the public object alone misses: a
// test signature shows the halves do not match.
func TestReplacedKeyObjectIsNotServed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		replace func(t *testing.T, tok *softhsmtest.Token, label string, id []byte)
	}{
		{"the pair re-created", replaceKeyPair},
		{"the private key replaced alone", replacePrivateKeyAlone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := softhsmtest.New(t, "replaced")
			k := tok.GenerateKey(t, providers.KeyECDSAP256, "swap", []byte{7})
			core, logs := observer.New(zap.DebugLevel)
			p := open(t, tok, []KeyConfig{{Name: "swap", URI: k.URI}}, func(c *Config) { c.Logger = zap.New(core) })
			alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
			signAndVerify(t, p, "swap", alg, []byte("the original key"))

			tc.replace(t, tok, "swap", []byte{7})
			tok.Logout(t)

			digest := digestOf(crypto.SHA256, []byte("after the swap"))
			for i := 0; i < 3; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				sig, err := p.Sign(ctx, "swap", alg, digest)
				cancel()
				if err == nil {
					verr := providers.Verify(keyInfo(t, p, "swap").Public, alg, digest, sig)
					t.Fatalf("Sign with the key object replaced succeeded (verifies under the served key: %v)", verr)
				}
				if !errors.Is(err, providers.ErrUnavailable) {
					t.Fatalf("Sign with the key object replaced: %v, want ErrUnavailable", err)
				}
			}
			if logs.FilterMessage("pkcs11 key object replaced: its public key is not the served key's; not signing with it").Len() == 0 {
				t.Error("the replaced key object was not logged")
			}
		})
	}
}

// A private key whose public key object (found by its id) is another key's
// is not opened: the provider would publish a public key that verifies
// none of its signatures.
func TestMismatchedKeyPairIsNotOpened(t *testing.T) {
	tok := softhsmtest.New(t, "mismatch")
	k := tok.GenerateKey(t, providers.KeyECDSAP256, "release", []byte{1})
	replacePrivateKeyAlone(t, tok, "release", []byte{1})
	_, err := tryOpen(t, tok, []KeyConfig{{Name: "release", URI: k.URI}}, nil)
	if !errors.Is(err, errKeyPairMismatch) {
		t.Fatalf("Open: %v, want the mismatch refused", err)
	}
}

// The token is deleted and a new one initialized under the same label, then
// the device fails: the reload finds a token by the configured label, but its
// serial is not the one the provider logged in to, so the PIN is not
// presented to it and signing stays unavailable.
func TestReloadRefusesAnotherTokenUnderTheSameLabel(t *testing.T) {
	tok := softhsmtest.New(t, "reinit")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	faults := newFaultSwitch()
	core, logs := observer.New(zap.DebugLevel)
	p := open(t, tok, keyConfigs(keys), func(c *Config) { c.FaultHook = faults.hook; c.Logger = zap.New(core) })
	name := string(providers.KeyECDSAP256)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	signAndVerify(t, p, name, alg, []byte("the original token"))
	oldSerial := tok.Serial

	tok.Reinitialize(t)
	if tok.Serial == oldSerial {
		t.Fatal("the new token has the old serial")
	}
	logins := faults.count("login")
	faults.set(map[string]uint{"sign": p11.CKR_DEVICE_REMOVED})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err := p.Sign(ctx, name, alg, digestOf(crypto.SHA256, []byte("gone")))
	cancel()
	if !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("Sign with the device gone: %v, want ErrUnavailable", err)
	}
	faults.set(nil)

	deadline := time.Now().Add(2 * time.Second)
	for logs.FilterMessage("pkcs11 repair failed; backing off").Len() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("no failed repair logged")
		}
		time.Sleep(10 * time.Millisecond)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err = p.Sign(ctx, name, alg, digestOf(crypto.SHA256, []byte("another token")))
	cancel()
	if !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("Sign with another token under the label: %v, want ErrUnavailable", err)
	}
	if n := faults.count("login"); n != logins {
		t.Errorf("%d logins after the token was replaced, want none", n-logins)
	}
	found := false
	for _, e := range logs.FilterMessage("pkcs11 repair failed; backing off").All() {
		if strings.Contains(toString(e.ContextMap()["error"]), tok.Serial) {
			found = true
		}
	}
	if !found {
		t.Error("the failed repair does not name the other token's serial")
	}
	assertNoSecret(t, logs, tok.PIN)
}

// A readiness probe (Healthy) racing Close: Close waits for it as for a
// Sign, so the probe neither calls into a finalized module (the process
// would crash) nor hands its session back to a closed pool (the session
// would stay open on the token). A second provider keeps the module loaded
// here, so that the probe's late C_GetSessionInfo cannot crash the test.
func TestHealthyRacingClose(t *testing.T) {
	tok := softhsmtest.New(t, "hclose")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	open(t, tok, keyConfigs(keys), func(c *Config) { c.ID = "keeper" })
	var armed atomic.Bool
	inHook, resume := make(chan struct{}), make(chan struct{})
	p, err := Open(context.Background(), Config{ID: "probed", Module: tok.Module, PINEnv: pinEnv, Keys: keyConfigs(keys),
		Backoff: 20 * time.Millisecond, Sessions: 1,
		FaultHook: func(op string) uint {
			if op == "session-info" && armed.CompareAndSwap(true, false) {
				close(inHook)
				<-resume
			}
			return 0
		}})
	if err != nil {
		t.Fatal(err)
	}
	armed.Store(true)
	probed := make(chan error, 1)
	go func() { probed <- p.Healthy() }()
	<-inHook
	closed := make(chan error, 1)
	go func() { closed <- p.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while the probe was inside the module", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(resume)
	<-probed
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if live, idle := p.live.Load(), len(p.idle); live != 0 || idle != 0 {
		t.Fatalf("after Close: %d sessions still open (%d idle in the closed pool)", live, idle)
	}
}

// logoutInside logs the token out through the provider's own module
// instance while no call is inside it.
func logoutInside(t *testing.T, p *Provider) {
	err := p.mod.pause(func() {
		s, err := p.mod.ctx.OpenSession(uint(p.slot.Load()), p11.CKF_SERIAL_SESSION)
		if err != nil {
			t.Logf("logoutInside: C_OpenSession: %v", err) // mid-repair: nothing to log out
			return
		}
		if err := p.mod.ctx.Logout(s); err != nil {
			t.Errorf("C_Logout: %v", err)
		}
		_ = p.mod.ctx.CloseSession(s)
	})
	if err != nil {
		t.Error(err)
	}
}

// Two providers share a token (the same token opened twice, as
// TestKIDStableAcrossURIForms does). The token drops the login; p logs in
// again, and the login drops once more while p's re-login is searching for
// its key objects. A logged-out search sees no private objects, so findKeys
// takes p's key for deleted (handle 0) and the repair counts as a success.
// The other provider then logs in again, as its own repair does, so p's
// sessions are logged in and nothing tells p anything is wrong: every Sign
// of a key that never left the token fails with ErrUnavailable at once,
// no repair is ever asked for, and Healthy says p is fine. Now a search
// that finds keys missing checks that its session is still logged in, and
// the repair is tried again when it is not.
func TestLogoutDuringTheKeySearchDoesNotStrandTheKey(t *testing.T) {
	tok := softhsmtest.New(t, "strand")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	other := open(t, tok, keyConfigs(keys), func(c *Config) { c.ID = "other"; c.Sessions = 1 })
	var armedFind, armedInfo atomic.Bool
	var p *Provider
	p = open(t, tok, keyConfigs(keys), func(c *Config) {
		c.Sessions = 2
		c.FaultHook = func(op string) uint {
			switch {
			case op == "find" && armedFind.CompareAndSwap(true, false):
				logoutInside(t, p) // the login goes again just before p's search
				armedInfo.Store(true)
			case op == "session-info" && armedInfo.CompareAndSwap(true, false):
				// The other provider notices the logout and logs in again.
				deadline := time.Now().Add(2 * time.Second)
				for other.Healthy() != nil && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
			}
			return 0
		}
	})
	name := string(providers.KeyECDSAP256)
	signAndVerify(t, p, name, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, []byte("before"))

	armedFind.Store(true)
	logoutInside(t, p) // the first logout: p's next Sign asks for a re-login
	sign := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := p.Sign(ctx, name, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, digestOf(crypto.SHA256, []byte("after")))
		return err
	}
	_ = sign() // straddles the two logouts: may rightly fail
	if armedFind.Load() {
		t.Fatal("setup: the re-login did not search for the key")
	}

	// The faults are over, the token is logged in and the key object never
	// left it: Signs must work again within a few seconds.
	deadline := time.Now().Add(3 * time.Second)
	var err error
	fails := 0
	for time.Now().Before(deadline) {
		if err = sign(); err == nil {
			break
		}
		fails++
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		k, _ := p.keys.Get(name)
		t.Fatalf("3s after the faults ended, %d Signs failed, last: %v; Healthy() = %v; key handle %+v",
			fails, err, p.Healthy(), k.handle.Load())
	}
	signAndVerify(t, other, name, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, []byte("other"))
}

// The token is logged out again while a re-login runs, after its C_Login:
// a signer that took its session before the first logout meets the second
// one (a new fault: its one retry is owed), and the re-login's key search
// meets it too. The signer's request is the running re-login's to answer
// (a straggler of the first logout could not be told apart), but the
// re-login failed on that very logout and backed off, and every signer
// waiting for it got UNAVAILABLE at once: the logout that sank the repair
// is no token failure to back off from, and the repair is run again at
// once. Each case holds the re-login at its key search, logs the token out
// there, and lets the signers go.
func TestLogoutDuringAReloginIsRepairedAtOnce(t *testing.T) {
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	for _, tc := range []struct {
		name      string
		straggler bool // a signer holding a session from before meets the second logout
	}{
		{"a signer meets the second logout", true},
		{"only the re-login meets it", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tok := softhsmtest.New(t, "relogout")
			keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
			name := string(providers.KeyECDSAP256)
			straggler, search := newHeldCall("sign"), newHeldCall("find")
			defer straggler.release()
			defer search.release()
			p := open(t, tok, keyConfigs(keys), func(c *Config) {
				c.Sessions = 2
				c.FaultHook = heldCalls(straggler, search)
			})
			info := keyInfo(t, p, name)
			signers := newSigners(p, name, alg)
			started := 1
			if tc.straggler {
				started++
				straggler.armed.Store(true)
				go signers.sign("straggler")
				straggler.wait(t, "the straggler") // a pool session of the healthy provider in hand
			}
			logoutInside(t, p)
			search.armed.Store(true)
			go signers.sign("first") // meets the logout and asks for the re-login
			search.wait(t, "the re-login")
			logoutInside(t, p) // after the re-login's C_Login
			if tc.straggler {
				straggler.release()
			}
			search.release()
			signers.verify(t, started, info)
			waitHealthy(t, p, 5*time.Second)
			signAndVerify(t, p, name, alg, []byte("after"))
		})
	}
}

// Close is bounded when the supervisor's repair hangs in the module (a
// C_Login on a wedged network HSM): it leaves the module loaded and says
// so, as it does for a hung C_Sign. It used to wait for the repair without
// a bound, and the agent's Shutdown with it.
func TestCloseDuringAWedgedRepairIsBounded(t *testing.T) {
	tok := softhsmtest.New(t, "wedged")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	var armed atomic.Bool
	wedged, unwedge := make(chan struct{}), make(chan struct{})
	var p *Provider
	defer func() {
		// The repair returns at last: finish what Close left, so that the
		// module is finalized and the next test finds its own token.
		close(unwedge)
		<-p.done
		if p.mod.releaseLogin(p.serial) {
			p.logout()
		}
		p.closeSessions()
		p.mod.release()
		p.closeErr = nil
	}()
	p, err := tryOpen(t, tok, keyConfigs(keys), func(c *Config) {
		c.FaultHook = func(op string) uint {
			if op == "login" && armed.CompareAndSwap(true, false) {
				close(wedged)
				<-unwedge
			}
			return 0
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	armed.Store(true)
	logoutInside(t, p)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	p.Sign(ctx, string(providers.KeyECDSAP256), alg, digestOf(crypto.SHA256, []byte("x"))) // asks for the re-login
	cancel()
	select {
	case <-wedged:
	case <-time.After(5 * time.Second):
		t.Fatal("no re-login")
	}
	closed := make(chan error, 1)
	go func() { closed <- p.Close() }()
	select {
	case err := <-closed:
		if err == nil {
			t.Error("Close under a wedged repair reported no error")
		}
	case <-time.After(closeDrainTimeout + 3*time.Second):
		t.Fatal("Close still waited for the wedged repair")
	}
}

// A second Close waits for the first: it used to return at once, while a
// Sign was still inside the module, and its signature came out after.
func TestSecondCloseWaitsForTheFirst(t *testing.T) {
	tok := softhsmtest.New(t, "close2")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	inSign := make(chan struct{}, 1)
	p := open(t, tok, keyConfigs(keys), func(c *Config) {
		c.FaultHook = func(op string) uint {
			if op == "sign" {
				select {
				case inSign <- struct{}{}:
				default:
				}
				time.Sleep(300 * time.Millisecond) // a slow token
			}
			return 0
		}
	})
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	signed := make(chan time.Time, 1)
	go func() {
		if sig, err := p.Sign(context.Background(), string(providers.KeyECDSAP256), alg, digestOf(crypto.SHA256, []byte("slow"))); err == nil && sig != nil {
			signed <- time.Now()
		}
		close(signed)
	}()
	<-inSign
	first := make(chan error, 1)
	go func() { first <- p.Close() }()
	time.Sleep(20 * time.Millisecond) // the first Close waits for the Sign
	p.Close()
	second := time.Now()
	// Close waits for the call to leave the module, not for Sign to return:
	// the signature's encoding and the goroutine's clock read come after,
	// microseconds on an idle machine. The bug left the second Close
	// almost the whole slow call (280 ms) ahead of the signature.
	const encodingSlack = 100 * time.Millisecond
	if at, ok := <-signed; ok && at.Sub(second) > encodingSlack {
		t.Errorf("a signature came out %v after the second Close returned", at.Sub(second))
	}
	<-first
}

// Two providers share a token. p's re-login searches for its key while the
// token is logged out (the object is not found), and the other provider
// logs in again before p's search checks its session: the session looks
// logged in, so a logout during the search went unseen. The key was
// marked missing although its object never left the token, the repair
// counted as a success, and every Sign of the key then failed with
// UNAVAILABLE without asking for a repair: nothing would find it again on
// a quiet token. Now a search that finds a key missing is trusted only if
// no login was made on the module since it began, and the repair is run
// again otherwise. The test holds p's key search (where the token is
// logged out) and the check after it (where the other provider logs in).
func TestLoginDuringTheKeySearchDoesNotStrandTheKey(t *testing.T) {
	tok := softhsmtest.New(t, "loginsearch")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	name := string(providers.KeyECDSAP256)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	other := open(t, tok, keyConfigs(keys), func(c *Config) { c.ID = "other"; c.Sessions = 1 })
	search, check := newHeldCall("find"), newHeldCall("session info")
	defer search.release()
	defer check.release()
	p := open(t, tok, keyConfigs(keys), func(c *Config) {
		c.Sessions = 2
		c.FaultHook = heldCalls(search, check)
	})
	info := keyInfo(t, p, name)
	signAndVerify(t, p, name, alg, []byte("before"))

	type result struct {
		sig []byte
		err error
	}
	first := make(chan result, 1)
	digest := digestOf(crypto.SHA256, []byte("first"))
	logoutInside(t, p) // p's next Sign meets it and asks for a re-login
	search.armed.Store(true)
	check.armed.Store(true)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		sig, err := p.Sign(ctx, name, alg, digest)
		first <- result{sig, err}
	}()
	search.wait(t, "the re-login's key search")
	logoutInside(t, p) // after the re-login's C_Login: the search sees no private object
	search.release()
	check.wait(t, "the check after the key search")
	// The other provider notices the logout and logs in again.
	waitFor(t, "the other provider to log in again", func() bool { return other.Healthy() == nil })
	check.release()

	r := <-first
	if r.err == nil {
		r.err = providers.Verify(info.Public, alg, digest, r.sig)
	}
	if r.err != nil {
		k, _ := p.keys.Get(name)
		t.Errorf("the signer waiting for the re-login: %v (key handle %+v)", r.err, k.handle.Load())
	}
	waitHealthy(t, p, 5*time.Second)
	repairs := p.repairs.Load()
	for i := range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		d := digestOf(crypto.SHA256, []byte{byte(i)})
		sig, err := p.Sign(ctx, name, alg, d)
		cancel()
		if err == nil {
			err = providers.Verify(info.Public, alg, d, sig)
		}
		if err != nil {
			t.Errorf("Sign %d after the faults: %v; repairs since: %d, repair pending: %s",
				i, err, p.repairs.Load()-repairs, pendingRepair(p))
		}
	}
	signAndVerify(t, other, name, alg, []byte("other"))
}
