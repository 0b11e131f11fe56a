package pkcs11

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"strings"
	"time"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
	"go.uber.org/zap"
)

// supervise runs the repairs callers ask for, one at a time, in the
// background: callers never log in or reload themselves, so a token outage
// costs one repair attempt per backoff period, not one per request.
func (p *Provider) supervise() {
	defer close(p.done)
	backoff := p.backoff
	// Whether a repair lost to a logout has been run again at once since
	// the last repair that worked: once, so a token logged out over and
	// over still costs one attempt per backoff period.
	rerun := false
	for {
		select {
		case <-p.wake:
		case <-p.stop:
			return
		}
		for {
			p.stateMu.Lock()
			level := p.wanted
			p.wanted = repairNone
			p.running = level
			p.stateMu.Unlock()
			if level == repairNone {
				break
			}
			start := time.Now()
			done, err := p.repair(level)
			p.stateMu.Lock()
			p.running = repairNone
			if err == nil {
				p.repairs.Add(1)
				if p.wanted < repairLogin {
					// A sweep changes no handle: no new epoch unless something
					// above a sweep was done or callers were kept waiting.
					st := p.state.Load()
					if done >= repairLogin || st.kind != stateHealthy {
						p.setStateLocked(stateHealthy, nil, true)
					}
				}
				p.stateMu.Unlock()
				if done >= repairLogin {
					p.log.Info("pkcs11 token recovered", zap.Stringer("repair", done), zap.Duration("took", time.Since(start)))
				}
				backoff, rerun = p.backoff, false
				continue
			}
			if errors.Is(err, providers.ErrPINIncorrect) || errors.Is(err, providers.ErrTokenLocked) {
				// Never try the PIN again: a token counts failures and
				// locks itself (or wipes, on some HSMs).
				p.setStateLocked(stateFailed, fmt.Errorf("pkcs11 provider %s: %w", p.id, err), false)
				p.stateMu.Unlock()
				p.log.Error("pkcs11 login refused; provider stopped retrying", zap.Stringer("repair", done), zap.Error(err))
				return
			}
			if done > p.wanted {
				p.wanted = done
			}
			if errors.Is(err, errLoggedOutMidRepair) && !rerun {
				// The login the repair made was taken away after it (another
				// provider's logout of the shared token): a new event, not a
				// token failing. Backing off would fail every caller waiting
				// for the repair, signers that met only this logout among
				// them, whose report the running repair had taken on.
				rerun = true
				p.stateMu.Unlock()
				p.log.Info("pkcs11 token logged out during the repair; repairing again", zap.Stringer("repair", done), zap.Error(err))
				continue
			}
			p.setStateLocked(stateDegraded, err, false)
			p.stateMu.Unlock()
			p.log.Warn("pkcs11 repair failed; backing off", zap.Stringer("repair", done), zap.Duration("backoff", backoff), zap.Error(err))
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-p.stop:
				t.Stop()
				return
			}
			backoff = min(2*backoff, MaxBackoff)
			p.stateMu.Lock()
			p.setStateLocked(stateRepairing, nil, false)
			p.stateMu.Unlock()
		}
	}
}

// escalation is a repair step's finding that a bigger repair is needed.
type escalation struct {
	level repairLevel
	cause error
}

func (e *escalation) Error() string { return fmt.Sprintf("needs %s: %v", e.level, e.cause) }
func (e *escalation) Unwrap() error { return e.cause }

// escalateFor turns a module error met during a repair into an escalation
// when it calls for a bigger repair than the one under way.
func escalateFor(err error, current repairLevel) error {
	if err == nil {
		return nil
	}
	lvl := classify(rvOf(err)).repair()
	if errors.Is(err, errStale) {
		// Another provider reloaded the module under the repair: the
		// slot and the keys are found again. The supervisor's sessions
		// are opened in the provider's generation, so the module has
		// moved past it and reload only takes that on (module.reload).
		lvl = repairReload
	}
	if lvl > current {
		return &escalation{level: lvl, cause: err}
	}
	return err
}

// repair performs level, escalating as the token demands. It returns the
// level it ended at.
func (p *Provider) repair(level repairLevel) (repairLevel, error) {
	for {
		if level >= repairLogin {
			p.stateMu.Lock()
			if st := p.state.Load(); st.kind == stateHealthy {
				p.setStateLocked(stateRepairing, nil, false)
			}
			p.stateMu.Unlock()
		}
		var err error
		switch level {
		case repairSweep:
			err = p.sweep()
		case repairLogin:
			err = p.relogin()
		case repairReload:
			err = p.reload()
		}
		var esc *escalation
		if errors.As(err, &esc) && esc.level > level {
			p.log.Info("pkcs11 repair escalated", zap.Stringer("from", level), zap.Stringer("to", esc.level), zap.Error(esc.cause))
			level = esc.level
			p.stateMu.Lock()
			p.running = level
			// What callers asked for meanwhile, up to this level, the
			// bigger repair does from its start: a device fault they
			// reported while a re-login found it too is one reload.
			if p.wanted <= level {
				p.wanted = repairNone
			}
			p.stateMu.Unlock()
			continue
		}
		return level, err
	}
}

// sweep checks every idle session, replaces the dead, and fills the pool to
// its size. It escalates to a login when sessions are found logged out.
func (p *Provider) sweep() error {
	gen := p.mod.gen.Load()
	var keep []*session
	defer func() {
		for _, s := range keep {
			p.release(s)
		}
	}()
	loggedOut := false
	for n := len(p.idle); n > 0; n-- {
		var s *session
		select {
		case s = <-p.idle:
		default:
		}
		if s == nil {
			break
		}
		if s.gen != gen {
			p.drop(s, false)
			continue
		}
		info, err := p.sessionInfo(s)
		if errors.Is(err, errStale) {
			p.drop(s, false)
			return escalateFor(err, repairSweep)
		}
		if err != nil {
			cls := classify(rvOf(err))
			p.drop(s, cls != faultSessionGone && cls != faultDevice)
			if cls == faultDevice {
				return escalateFor(err, repairSweep)
			}
			continue
		}
		if !isUserState(info.State) {
			loggedOut = true
		}
		keep = append(keep, s)
	}
	for p.live.Load() < int32(p.size) {
		s, err := p.openSession(false)
		if errors.Is(err, errPoolFull) {
			break
		}
		if err != nil {
			return escalateFor(fmt.Errorf("open session: %w", err), repairSweep)
		}
		keep = append(keep, s)
	}
	if loggedOut {
		return &escalation{level: repairLogin, cause: errors.New("sessions are logged out")}
	}
	return nil
}

// relogin logs in if the token says the login is gone (never when it says
// otherwise: each C_Login with a wrong PIN counts towards a lockout), then
// finds every key object again, since handles change across a login.
func (p *Provider) relogin() error {
	if err := p.sweep(); err != nil {
		var esc *escalation
		if !errors.As(err, &esc) || esc.level != repairLogin {
			return err
		}
	}
	// A session of our own to log in on and search with. It joins the pool
	// when there is room; otherwise the pool's own sessions stay open, so
	// closing it does not end the login.
	s, err := p.openSession(true)
	if err != nil {
		return escalateFor(fmt.Errorf("open session: %w", err), repairLogin)
	}
	defer p.release(s)
	if s.gen != p.gen.Load() {
		// The module was reloaded since the provider last found its slot
		// (by another provider): the PIN goes only to the token whose
		// serial a reload has checked.
		return &escalation{level: repairReload, cause: errStale}
	}
	info, err := p.sessionInfo(s)
	if err != nil {
		return escalateFor(fmt.Errorf("session info: %w", err), repairLogin)
	}
	if !isUserState(info.State) {
		p.log.Info("pkcs11 logging in again", zap.String("token", p.tokenLabel))
		if err := p.login(s); err != nil {
			return escalateFor(err, repairLogin)
		}
	}
	return escalateFor(p.findKeys(s), repairLogin)
}

// login performs C_Login with the PIN; an already logged-in token is success.
// Errors never carry the PIN.
//
// A token counts wrong PINs and locks at its limit. Once it has refused
// the PIN to one module instance, no instance presents it again: N
// instances each trying once after a PIN change would spend N of the
// token's tries.
func (p *Provider) login(s *session) error {
	if p.pinRefused.Load() {
		return fmt.Errorf("login to token %s: %w: the token refused this PIN to another module instance; not presented again", p.tokenLabel, providers.ErrPINIncorrect)
	}
	if s.gen != p.gen.Load() {
		// The slot was looked up in another generation: after a reload a
		// module may number its slots anew, and the PIN must go only to
		// the token whose serial the lookup checked. onSession then keeps
		// the module's generation from moving under the call.
		return errStale
	}
	err := p.onSession(context.Background(), "login", s.gen, func(c *p11.Ctx) error {
		p.tokenFiles.Lock()
		defer p.tokenFiles.Unlock()
		defer p.mod.loginCalls.Add(1)
		return c.Login(s.h, p11.CKU_USER, p.pin)
	})
	switch {
	case err == nil, isRV(err, p11.CKR_USER_ALREADY_LOGGED_IN):
		return nil
	}
	switch classify(rvOf(err)) {
	case faultPIN:
		p.pinRefused.Store(true)
		return fmt.Errorf("login to token %s: %w: %w", p.tokenLabel, providers.ErrPINIncorrect, err)
	case faultLocked:
		p.pinRefused.Store(true)
		return fmt.Errorf("login to token %s: %w: %w", p.tokenLabel, providers.ErrTokenLocked, err)
	}
	return fmt.Errorf("login to token %s: %w", p.tokenLabel, err)
}

// errLoggedOutMidRepair: the token was logged out while a repair searched
// for its keys, after the repair's own login check.
var errLoggedOutMidRepair = fmt.Errorf("the session was logged out during the key search: %w", providers.ErrUnavailable)

// errLoginDuringSearch: a login was made on the module while a repair
// searched for its keys, so a logout before it may have hidden them.
var errLoginDuringSearch = fmt.Errorf("a login was made during the key search: %w", errLoggedOutMidRepair)

// findKeys finds every served key's private key object again. A key whose
// object has gone is kept without a handle: it signs with ErrUnavailable until a
// later repair finds it.
//
// The object is found by its label and id, which a new key can take over
// (the pair destroyed and generated again under the same names), so its
// public key is read and compared with the one served under the key's kid:
// signing with another key would hand out signatures that verify under no
// key the caller knows, all journaled under the wrong kid.
func (p *Provider) findKeys(s *session) error {
	logins := p.mod.loginCalls.Load()
	missing := false
	for _, k := range p.keys.All() {
		var h p11.ObjectHandle
		var pub crypto.PublicKey
		var readErr error
		err := p.onSession(context.Background(), "find", s.gen, func(c *p11.Ctx) error {
			var err error
			if h, err = findPrivateKey(c, s.h, k.obj); err != nil {
				return err
			}
			pub, readErr = readPublicKey(c, s.h, h)
			if rvOf(readErr) != 0 {
				return readErr // the module failed, not the key
			}
			if readErr == nil {
				// The private half may have been replaced alone.
				readErr = checkPair(c, s.h, h, pub)
				if rvOf(readErr) != 0 {
					return readErr
				}
			}
			return nil
		})
		if errors.Is(err, errObjectMissing) {
			k.handle.Store(nil)
			missing = true
			p.log.Warn("pkcs11 key object missing after re-login", zap.String("key", k.info.Name), zap.Stringer("object", k.obj))
			continue
		}
		if isRV(err, p11.CKR_USER_NOT_LOGGED_IN) {
			// Found, then logged out before its test signature.
			return fmt.Errorf("find key %s: %w: %w", k.info.Name, errLoggedOutMidRepair, err)
		}
		if err != nil {
			return fmt.Errorf("find key %s: %w", k.info.Name, err)
		}
		if readErr != nil || !sameKey(k.info.Public, pub) {
			k.handle.Store(nil)
			p.log.Error("pkcs11 key object replaced: its public key is not the served key's; not signing with it",
				zap.String("key", k.info.Name), zap.String("kid", k.info.KID), zap.Stringer("object", k.obj), zap.NamedError("read", readErr))
			continue
		}
		k.setHandle(h, s.gen)
	}
	if missing {
		// A session logged out meanwhile (another provider's logout on
		// the shared token) sees no private object at all: the keys are
		// there, the login is not. The repair is not done, and is tried
		// again; marked missing for good, the keys would never come back
		// while the sessions look healthy. A logout followed by another
		// provider's login shows a logged-in session: so no login may have
		// been made since the search began. Under the lock C_Login is made
		// and counted under, a login the session shows is counted.
		var state uint
		var loginsAfter uint64
		err := p.onSession(context.Background(), "session info", s.gen, func(c *p11.Ctx) error {
			p.tokenFiles.Lock()
			defer p.tokenFiles.Unlock()
			info, err := c.GetSessionInfo(s.h)
			state, loginsAfter = info.State, p.mod.loginCalls.Load()
			return err
		})
		if errors.Is(err, errStale) {
			return fmt.Errorf("after the key search: %w", err)
		}
		if err != nil {
			return fmt.Errorf("session info after the key search (%v): %w", err, providers.ErrUnavailable)
		}
		if !isUserState(state) {
			return errLoggedOutMidRepair
		}
		if loginsAfter != logins {
			return errLoginDuringSearch
		}
	}
	return nil
}

func sameKey(served, found crypto.PublicKey) bool {
	e, ok := served.(interface{ Equal(crypto.PublicKey) bool })
	return ok && found != nil && e.Equal(found)
}

// reload finalizes and re-initializes the module (unless another provider on
// it did since this one last found its keys), finds the token's slot again,
// logs in and finds the keys.
func (p *Provider) reload() error {
	gen, reloaded, err := p.mod.reload(p.gen.Load(), p.inject)
	if err != nil {
		return fmt.Errorf("reload module: %w", err)
	}
	if reloaded {
		p.log.Warn("pkcs11 module reloaded", zap.String("module", p.modulePath), zap.String("token", p.tokenLabel))
	} else {
		p.log.Info("pkcs11 module reloaded by another provider; finding the token and keys again", zap.String("module", p.modulePath), zap.String("token", p.tokenLabel))
	}
	p.gen.Store(gen)
	slot, ti, err := p.findSlot()
	if err != nil {
		return err
	}
	if serial := trimPadded(ti.SerialNumber); serial != p.serial {
		// The selector (often a label alone) matched another token, e.g.
		// one initialized again under the same label: never present the
		// PIN to it. Retried with backoff in case the original comes back.
		return fmt.Errorf("token %s now has serial %q, not %q: another token; not logging in to it: %w",
			p.tokenLabel, serial, p.serial, providers.ErrUnavailable)
	}
	p.slot.Store(uint64(slot))
	if err := p.relogin(); err != nil {
		var esc *escalation
		if errors.As(err, &esc) && esc.level == repairReload {
			// The token vanished again between slot lookup and login: report
			// it as this reload's failure, retried after backoff.
			return esc.cause
		}
		return err
	}
	return nil
}

// findSlot finds the one slot whose token matches the selector.
func (p *Provider) findSlot() (uint, p11.TokenInfo, error) {
	if rv := hook(p.inject, "slot"); rv != 0 {
		return 0, p11.TokenInfo{}, fmt.Errorf("find token %s: %w", p.tokenSel, p11.Error(rv))
	}
	var found []uint
	var infos []p11.TokenInfo
	err := p.mod.do(func(c *p11.Ctx) error {
		p.tokenFiles.Lock() // C_GetTokenInfo reads the token file
		defer p.tokenFiles.Unlock()
		slots, err := c.GetSlotList(true)
		if err != nil {
			return err
		}
		for _, slot := range slots {
			if p.tokenSel.slot != nil && *p.tokenSel.slot != slot {
				continue
			}
			ti, err := c.GetTokenInfo(slot)
			if err != nil {
				continue // removed between the two calls
			}
			if p.tokenSel.matches(ti) {
				found = append(found, slot)
				infos = append(infos, ti)
			}
		}
		return nil
	})
	if err != nil {
		return 0, p11.TokenInfo{}, fmt.Errorf("list slots: %w", err)
	}
	switch len(found) {
	case 0:
		return 0, p11.TokenInfo{}, fmt.Errorf("no token %s present: %w", p.tokenSel, p11.Error(p11.CKR_TOKEN_NOT_PRESENT))
	case 1:
		return found[0], infos[0], nil
	}
	return 0, p11.TokenInfo{}, fmt.Errorf("%d tokens match %s: name the token by serial", len(found), p.tokenSel)
}

func (t tokenSelector) matches(ti p11.TokenInfo) bool {
	trim := func(s string) string { return strings.TrimRight(s, " \x00") }
	return (t.label == "" || trim(ti.Label) == t.label) &&
		(t.serial == "" || trim(ti.SerialNumber) == t.serial) &&
		(t.manufacturer == "" || trim(ti.ManufacturerID) == t.manufacturer) &&
		(t.model == "" || trim(ti.Model) == t.model)
}

// call runs a module call through the fault hook and the reload gate.
func (p *Provider) call(op string, fn func(*p11.Ctx) error) error {
	if rv := hook(p.inject, op); rv != 0 {
		return p11.Error(rv)
	}
	return p.mod.do(fn)
}
