package pkcs11

import (
	"context"
	"errors"
	"fmt"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
	"go.uber.org/zap"
)

// stateKind is the provider's condition as callers see it.
type stateKind uint8

const (
	// stateHealthy: sessions are handed out.
	stateHealthy stateKind = iota
	// stateRepairing: the supervisor is logging in again or reloading the
	// module. Callers wait for it, bounded by their context.
	stateRepairing
	// stateDegraded: the last repair failed and the supervisor is backing
	// off. Callers get ErrUnavailable at once rather than wait out a backoff
	// that may exceed their deadline.
	stateDegraded
	// stateFailed: the token refused the PIN or is locked. Permanent.
	stateFailed
	// stateClosed: Close was called. Permanent.
	stateClosed
)

func (k stateKind) String() string {
	switch k {
	case stateHealthy:
		return "healthy"
	case stateRepairing:
		return "repairing"
	case stateDegraded:
		return "degraded"
	case stateFailed:
		return "failed"
	case stateClosed:
		return "closed"
	}
	return "unknown"
}

// state is immutable; a transition publishes a new one and closes the old
// one's changed channel, which wakes every waiter at once.
type state struct {
	kind stateKind
	// epoch counts completed login-level repairs. A caller remembers the
	// epoch it signed under; a fault seen under an older epoch has already
	// been repaired and needs no new repair.
	epoch   uint64
	err     error
	changed chan struct{}
}

// session is one open PKCS#11 session of the pool.
type session struct {
	h   p11.SessionHandle
	gen uint64 // module generation it was opened in
}

var errClosed = fmt.Errorf("provider closed: %w", providers.ErrUnavailable)

// setStateLocked publishes a new state; p.stateMu must be held. Closed and
// failed are terminal (failed only gives way to closed).
func (p *Provider) setStateLocked(kind stateKind, err error, bumpEpoch bool) {
	old := p.state.Load()
	if old.kind == stateClosed || (old.kind == stateFailed && kind != stateClosed) {
		return
	}
	ns := &state{kind: kind, epoch: old.epoch, err: err, changed: make(chan struct{})}
	if bumpEpoch {
		ns.epoch++
	}
	p.state.Store(ns)
	close(old.changed)
	if old.kind != kind {
		fields := []zap.Field{zap.Stringer("from", old.kind), zap.Stringer("to", kind)}
		if err != nil {
			fields = append(fields, zap.Error(err))
		}
		p.log.Info("pkcs11 provider state", fields...)
	}
}

// stateError is what a caller gets from a provider that is not healthy.
func stateError(st *state) error {
	switch st.kind {
	case stateDegraded:
		return fmt.Errorf("token recovering (%v): %w", st.err, providers.ErrUnavailable)
	case stateFailed:
		return st.err
	case stateClosed:
		return errClosed
	case stateRepairing:
		return fmt.Errorf("token recovering: %w", providers.ErrUnavailable)
	}
	return nil
}

// acquire takes a session for the caller, waiting no longer than ctx allows.
// It returns the epoch the session is good for.
func (p *Provider) acquire(ctx context.Context) (*session, uint64, error) {
	for {
		st := p.state.Load()
		switch st.kind {
		case stateHealthy:
		case stateRepairing:
			select {
			case <-st.changed:
				continue
			case <-ctx.Done():
				return nil, 0, fmt.Errorf("no working session before the deadline (%v): %w", ctx.Err(), providers.ErrUnavailable)
			}
		default:
			return nil, 0, stateError(st)
		}
		if p.gen.Load() != p.mod.gen.Load() {
			// Another provider on this module reloaded it: our key handles
			// are void, and their numbers may now name its objects. The
			// supervisor finds the slot and the keys again first: the
			// request puts the provider in repair, which the loop waits out.
			p.requestRepair(repairReload, st.epoch)
			continue
		}
		var s *session
		select {
		case s = <-p.idle:
		default:
			select {
			case s = <-p.idle:
			case <-st.changed:
				continue
			case <-ctx.Done():
				return nil, 0, fmt.Errorf("waiting for a free session: %w", ctx.Err())
			}
		}
		if s.gen == p.mod.gen.Load() {
			return s, st.epoch, nil
		}
		// Opened before a module reload (perhaps by another provider on the
		// same module): void, and its number may belong to a new session.
		p.drop(s, false)
		ns, err := p.openSession(false)
		if err != nil {
			p.requestRepair(classify(rvOf(err)).repair(), st.epoch)
			continue
		}
		return ns, st.epoch, nil
	}
}

// acquireFresh gets a newly opened session, checked to be logged in, for the
// one retry after a signature failed: an idle session could be another
// victim of the same event (C_CloseAllSessions kills them all at once). It
// first waits out any repair the failure asked for.
func (p *Provider) acquireFresh(ctx context.Context) (*session, uint64, error) {
	var last error
	for range 3 {
		if err := p.awaitRepair(ctx); err != nil {
			return nil, 0, err
		}
		cur := p.state.Load().epoch
		s, err := p.openSessionCtx(ctx, true)
		if ctx.Err() != nil && err != nil {
			// A key generation's pause outlasted the caller's deadline.
			return nil, 0, fmt.Errorf("no session for the retry before the deadline: %w", err)
		}
		if err != nil {
			last = err
			p.requestRepair(classify(rvOf(err)).repair(), cur)
			continue
		}
		info, err := p.sessionInfoCtx(ctx, s)
		if ctx.Err() != nil && err != nil && rvOf(err) == 0 {
			p.release(s)
			return nil, 0, fmt.Errorf("no session for the retry before the deadline: %w", err)
		}
		if errors.Is(err, errStale) {
			last = err
			p.release(s)
			p.afterStale(cur)
			continue
		}
		if err != nil {
			last = err
			p.afterFault(s, classify(rvOf(err)), rvOf(err), cur, "C_GetSessionInfo")
			continue
		}
		st := p.state.Load()
		if isUserState(info.State) && st.kind == stateHealthy {
			return s, st.epoch, nil
		}
		// Not logged in (closing a token's last session logs it out), or a
		// repair started and object handles are about to change.
		p.release(s)
		if !isUserState(info.State) {
			last = errors.New("session not logged in")
			p.requestRepair(repairLogin, st.epoch)
		}
	}
	return nil, 0, fmt.Errorf("no working session for the retry (%v): %w", last, providers.ErrUnavailable)
}

func isUserState(s uint) bool {
	return s == p11.CKS_RO_USER_FUNCTIONS || s == p11.CKS_RW_USER_FUNCTIONS
}

// awaitRepair waits until no repair is running: nil when the provider is
// healthy, the state's error otherwise, ErrUnavailable at ctx's deadline.
func (p *Provider) awaitRepair(ctx context.Context) error {
	for {
		st := p.state.Load()
		switch st.kind {
		case stateHealthy:
			return nil
		case stateRepairing:
			select {
			case <-st.changed:
			case <-ctx.Done():
				return fmt.Errorf("no working session before the deadline (%v): %w", ctx.Err(), providers.ErrUnavailable)
			}
		default:
			return stateError(st)
		}
	}
}

// release returns a working session to the pool.
func (p *Provider) release(s *session) {
	if s.gen != p.mod.gen.Load() {
		p.drop(s, false)
		return
	}
	if p.live.Load() > int32(p.size) {
		// A retry opened a session over the pool size; the pool has others
		// open, so closing this one cannot log the token out.
		p.drop(s, true)
		return
	}
	select {
	case p.idle <- s:
	default:
		p.drop(s, true)
	}
}

// drop removes a session from the pool. closeIt is false when the session is
// already gone: its handle may have been reissued to a new session (ours or
// another provider's), which C_CloseSession would kill. A session of an
// earlier generation is never closed, for the same reason.
func (p *Provider) drop(s *session, closeIt bool) {
	p.live.Add(-1)
	if closeIt {
		_ = p.onSession(context.Background(), "", s.gen, func(c *p11.Ctx) error { return c.CloseSession(s.h) })
	}
}

// errStale is a call's answer when the module was reloaded (by this
// provider or another on the module) since its session was opened, or
// since the provider found its token's slot: nothing was sent to the
// module.
var errStale = fmt.Errorf("module reloaded meanwhile: %w", providers.ErrUnavailable)

// onSession runs fn, a call on a session of module generation gen, inside
// the module's gate, and only while gen is the module's: after a reload
// the session's number may name another provider's session, on another
// token, which a login, a key search or a C_CloseSession would act on.
// Checked before entering, a reload could land between the check and the
// call. op names the call for the fault hook ("": none).
func (p *Provider) onSession(ctx context.Context, op string, gen uint64, fn func(*p11.Ctx) error) error {
	if op != "" {
		if rv := hook(p.inject, op); rv != 0 {
			return p11.Error(rv)
		}
	}
	return p.mod.doCtx(ctx, func(c *p11.Ctx) error {
		if p.mod.gen.Load() != gen {
			return errStale
		}
		return fn(c)
	})
}

// afterStale asks the supervisor to find the slot and the keys again when
// another provider's reload is why a call met errStale. When this provider
// has found them since, nothing is asked: a reload then would finalize the
// module a second time.
func (p *Provider) afterStale(epoch uint64) {
	if p.gen.Load() != p.mod.gen.Load() {
		p.requestRepair(repairReload, epoch)
	}
}

var errPoolFull = errors.New("session pool full")

// openSession opens a read-only session on the token's slot. Unless force,
// it refuses to grow the pool past its size.
func (p *Provider) openSession(force bool) (*session, error) {
	return p.openSessionCtx(context.Background(), force)
}

// openSessionCtx is openSession for a caller with a deadline (doCtx).
func (p *Provider) openSessionCtx(ctx context.Context, force bool) (*session, error) {
	if n := p.live.Add(1); n > int32(p.size) && !force {
		p.live.Add(-1)
		return nil, errPoolFull
	}
	if rv := hook(p.inject, "open-session"); rv != 0 {
		p.live.Add(-1)
		return nil, p11.Error(rv)
	}
	s := &session{}
	err := p.mod.doCtx(ctx, func(c *p11.Ctx) error {
		s.gen = p.mod.gen.Load() // inside the gate: no reload can interleave
		h, err := c.OpenSession(uint(p.slot.Load()), p11.CKF_SERIAL_SESSION)
		s.h = h
		return err
	})
	if err != nil {
		p.live.Add(-1)
		return nil, err
	}
	return s, nil
}

func (p *Provider) sessionInfo(s *session) (p11.SessionInfo, error) {
	return p.sessionInfoCtx(context.Background(), s)
}

// sessionInfoCtx is sessionInfo for a caller with a deadline (doCtx).
func (p *Provider) sessionInfoCtx(ctx context.Context, s *session) (p11.SessionInfo, error) {
	var info p11.SessionInfo
	err := p.onSession(ctx, "session-info", s.gen, func(c *p11.Ctx) error {
		var err error
		info, err = c.GetSessionInfo(s.h)
		return err
	})
	return info, err
}

// afterFault disposes of the session a call failed on and asks the
// supervisor for the repair the failure calls for.
func (p *Provider) afterFault(s *session, cls faultClass, rv uint, epoch uint64, call string) {
	switch cls {
	case faultSessionGone, faultDevice:
		p.drop(s, false)
		p.log.Warn("pkcs11 session evicted", zap.String("call", call), zap.String("ckr", ckrName(rv)), zap.Stringer("class", cls))
	case faultSessionBroken:
		p.drop(s, true)
		p.log.Warn("pkcs11 session evicted", zap.String("call", call), zap.String("ckr", ckrName(rv)), zap.Stringer("class", cls))
	default:
		p.release(s)
	}
	if lvl := cls.repair(); lvl != repairNone {
		p.requestRepair(lvl, epoch)
	}
}

// requestRepair asks the supervisor for a repair of at least level. A login
// or reload request is dropped when its epoch has since been repaired, and
// when a repair of its level or above is under way for its epoch: the
// caller saw the fault that repair answers (or its consequences: a session
// voided, the gate closed by the reload), and queuing it behind would
// finalize the module a second time for one fault.
func (p *Provider) requestRepair(level repairLevel, epoch uint64) {
	if level == repairNone {
		return
	}
	p.stateMu.Lock()
	st := p.state.Load()
	switch {
	case st.kind == stateFailed || st.kind == stateClosed:
		p.stateMu.Unlock()
		return
	case level >= repairLogin && st.epoch != epoch:
		p.stateMu.Unlock()
		return
	case level >= repairLogin && level <= p.running:
		p.stateMu.Unlock()
		return
	}
	if level > p.wanted {
		p.wanted = level
	}
	if level >= repairLogin && st.kind == stateHealthy {
		p.setStateLocked(stateRepairing, nil, false)
	}
	p.stateMu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func ckrName(rv uint) string {
	s := p11.Error(rv).Error()
	// miekg formats "pkcs11: 0x%X: CKR_NAME"; keep the name.
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == ' ' {
			return s[i+1:]
		}
	}
	return s
}
