package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// dispatch answers one request into resp. arrived is when a Sign was read:
// its deadline runs from then (zero: from now). fence receives an allowed
// Sign's policy decision: the caller calls its Done once the reply is out,
// which is what a Pause waits for (policy.Engine.WaitIdle).
func (c *conn) dispatch(req *proto.Request, resp *proto.Response, arrived time.Time, fence *policy.Decision) {
	m := c.a.metrics
	m.inFlight.Add(1)
	var meta reqMeta
	var err error
	switch req.Op {
	case proto.OpHello:
		// The first Hello's peer was admitted by the reader, which closes
		// the connection otherwise; a later one is asked again.
		if c.helloDone {
			err = c.admitted()
		}
		if err == nil {
			err = c.hello(req, resp)
		}
	case proto.OpPing:
		// A peer whose mapping a reload removed is told so on its next
		// request, whatever it is: a Ping kept answering OK.
		err = c.admitted()
	case proto.OpRotate, proto.OpRollback, proto.OpPause, proto.OpResume,
		proto.OpReloadPolicy, proto.OpAuditTail, proto.OpExportREP, proto.OpIncidentDrill, proto.OpAuditVerify,
		proto.OpAuditPrune:
		err = c.adminOp(req, resp)
	case proto.OpListKeys, proto.OpPublicKey, proto.OpSign, proto.OpVerify:
		if c.admin {
			// An admin a reload revoked is told that first, as on every op.
			if err = c.admitted(); err == nil {
				err = &proto.Error{Code: proto.PermissionDenied, Msg: "the admin socket serves admin operations only"}
			}
			break
		}
		err = c.keyOp(req, resp, &meta, arrived, fence)
	case proto.OpOutOfRange:
		if err = c.admitted(); err == nil {
			err = &proto.Error{Code: proto.BadRequest, Msg: fmt.Sprintf("unknown operation (%d or more)", req.Op)}
		}
	default:
		if err = c.admitted(); err == nil {
			err = &proto.Error{Code: proto.BadRequest, Msg: fmt.Sprintf("unknown operation %d", req.Op)}
		}
	}
	m.inFlight.Add(-1)
	if err == nil {
		m.request(req.Op, proto.OK, &meta)
		return
	}
	code := codeOf(err)
	m.request(req.Op, code, &meta)
	resp.Code = code
	resp.Msg = clientMessage(code, err)
	c.logFailure(req, code, err)
}

func (c *conn) keyOp(req *proto.Request, resp *proto.Response, meta *reqMeta, arrived time.Time, fence *policy.Decision) (err error) {
	switch req.Op {
	case proto.OpListKeys:
		resp.Keys, err = c.listKeys()
	case proto.OpPublicKey:
		err = c.publicKey(req, resp, meta)
	case proto.OpSign:
		err = c.sign(req, resp, meta, arrived, fence)
	case proto.OpVerify:
		err = c.verify(req, resp, meta)
	}
	return err
}

// logFailure records a refused or failed request: what and why, never the
// digest or message bytes.
func (c *conn) logFailure(req *proto.Request, code proto.Code, err error) {
	fields := []zap.Field{
		zap.Stringer("op", req.Op), zap.Stringer("code", code), zap.Error(err),
	}
	if req.Key != "" {
		fields = append(fields, zap.String("key", shortName(req.Key)))
	}
	if req.KID != "" {
		fields = append(fields, zap.String("kid", shortName(req.KID)))
	}
	switch code {
	case proto.Internal, proto.PINIncorrect, proto.TokenLocked, proto.Unavailable, proto.DeadlineExceeded:
		c.log.Warn("request failed", fields...)
	default:
		c.log.Info("request refused", fields...)
	}
}

// shortName is a client's name for the records and messages: valid UTF-8
// (a record's JSON export must carry the bytes its hash covers, and JSON
// replaces invalid ones), at most 64 bytes.
func shortName(s string) string {
	const max = 64
	s = strings.ToValidUTF8(s, "\uFFFD") // s itself, unallocated, when valid
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut-- // never split a character: records and messages stay valid UTF-8
	}
	return s[:cut] + "…"
}

func (c *conn) hello(req *proto.Request, resp *proto.Response) error {
	resp.Version = proto.Version
	resp.Features = proto.FeaturePipelining
	switch {
	case req.Version == 0:
		// Absent or 0 alike: not a version the agent speaks, and the
		// reply's ver tells the client which one to say Hello with.
		return &proto.Error{Code: proto.UnsupportedVersion,
			Msg: fmt.Sprintf("client announced no version (0); this agent speaks %d", proto.Version)}
	case req.Version == proto.VersionOutOfRange:
		return &proto.Error{Code: proto.UnsupportedVersion,
			Msg: fmt.Sprintf("client speaks version %d or later; this agent speaks %d", req.Version, proto.Version)}
	case req.Version != proto.Version:
		// The connection stays open: a newer client may say Hello again with
		// the version the reply names.
		return &proto.Error{Code: proto.UnsupportedVersion,
			Msg: fmt.Sprintf("client speaks version %d; this agent speaks %d", req.Version, proto.Version)}
	}
	c.helloDone = true
	return nil
}

func (c *conn) publicKey(req *proto.Request, resp *proto.Response, meta *reqMeta) error {
	t, tenant, err := c.resolve(req.Key, req.KID, true)
	meta.set(tenant, t)
	if err != nil {
		return err
	}
	e := t.key
	resp.Key, resp.KID, resp.KeyType, resp.Pub = t.name(), e.info.KID, string(e.info.Type), e.info.SPKI
	return nil
}

func (c *conn) sign(req *proto.Request, resp *proto.Response, meta *reqMeta, arrived time.Time, fence *policy.Decision) error {
	if arrived.IsZero() {
		arrived = time.Now()
	}
	d := signDecision{start: arrived, keyName: req.Key, kid: req.KID, digest: req.Digest}
	if d.keyName == "" {
		d.keyName = req.KID
	}
	// One deadline for the decision, the signature and its audit record: a
	// record that cannot be written in time withholds the signature.
	ctxs := newSignContexts(c.ctx, d.start.Add(c.requestTimeout(req)))
	defer ctxs.release()
	sig, err := c.decideAndSign(&ctxs.request, req, &d, fence)
	if c.a.signedHook != nil && err == nil {
		c.a.signedHook(&ctxs.request)
	}
	meta.set(d.tenant, d.target)
	d.code = codeOf(err)
	if rerr := c.record(&ctxs.record, &d); rerr != nil {
		return rerr
	}
	if err != nil {
		return err
	}
	c.a.metrics.signed(d.target.key, time.Since(d.start))
	resp.Key, resp.KID, resp.Sig = d.target.name(), d.target.key.info.KID, sig
	if d.policyHash != ([32]byte{}) {
		// A copy, not d.policyHash[:]: a slice of d would move the whole
		// decision to the heap on every request, policy or not.
		resp.PolicyHash = append([]byte(nil), d.policyHash[:]...)
	}
	return nil
}

// decideAndSign checks the request and signs; every outcome, including a
// refusal, is journaled by the caller.
func (c *conn) decideAndSign(ctx context.Context, req *proto.Request, d *signDecision, fence *policy.Decision) ([]byte, error) {
	t, tenant, err := c.resolve(req.Key, req.KID, false)
	d.tenant, d.target = tenant, t
	if err != nil {
		return nil, err
	}
	return c.decideResolved(ctx, req, d, fence)
}

// decideResolved is decideAndSign once the request's key is resolved
// (d.target): the checks, the policy's count and the signature.
func (c *conn) decideResolved(ctx context.Context, req *proto.Request, d *signDecision, fence *policy.Decision) ([]byte, error) {
	t := d.target
	e := t.key
	alg, err := e.algorithmFor(req.Scheme, req.Hash)
	if err != nil {
		return nil, c.refuseBeforePolicy(req, d, err)
	}
	d.alg = alg
	// The key's own checks before the policy's: a request the key cannot
	// sign (PSS with an ECDSA key, which a policy allowing every algorithm
	// lets through) must not take a quota unit and a rate token for a
	// signature never made.
	if err := providers.CheckRequest(e.info.Type, alg, req.Digest); err != nil {
		return nil, c.refuseBeforePolicy(req, d, err)
	}
	if t.slot != nil {
		*fence = c.a.policy.Check(d.tenant, t.slot.Name, c.identity(), alg, len(req.Digest))
		d.policyHash = fence.PolicyHash
		if !fence.Allowed() {
			c.a.metrics.denied(fence.Reason)
			return nil, &proto.Error{Code: reasonCode(fence.Reason), Msg: fence.Message()}
		}
		d.allowed = true
		if err := c.stillActive(t, fence.Slot, req.KID); err != nil {
			return nil, err
		}
	}
	sig, err := c.providerSign(ctx, e, alg, req.Digest)
	if err == nil {
		// A provider that cannot be interrupted (a PKCS#11 C_Sign) may
		// return after the request's deadline or its client's departure.
		// The signature is withheld then, and the journal records the
		// refusal (with a time of its own); an append sharing the spent
		// deadline would fail at once, leave no record, and answer
		// JOURNAL_UNAVAILABLE of a healthy journal.
		if err = ctx.Err(); err == nil {
			err = c.notRetiredMeanwhile(t)
		}
		if err == nil {
			return sig, nil
		}
	} else {
		err = &providerFailure{servedKeyLost(err)}
	}
	if errors.Is(err, context.Canceled) && c.ctx.Err() != nil {
		return nil, fmt.Errorf("client went away: %w", err)
	}
	return nil, err
}

// providerSign is the provider's Sign, with a panic in it (a bug in the
// provider or a library under it) turned into this request's failure: the
// agent serves its other keys and clients on, and the caller journals the
// failure (INTERNAL) as any provider error's. The deferred recover costs
// no allocation on the hot path.
func (c *conn) providerSign(ctx context.Context, e *keyEntry, alg providers.Algorithm, digest []byte) (sig []byte, err error) {
	defer func() {
		if v := recover(); v != nil {
			err = logProviderPanic(c.log, providers.Recovered(v, e.provider.ID(), "sign", e.info.Name))
		}
	}()
	return e.provider.Sign(ctx, e.info.Name, alg, digest)
}

// logProviderPanic logs a provider's panic once, at error level, with its
// stack (a bug report's substance), and returns it. Not its value: see
// providers.PanicError.
func logProviderPanic(log *zap.Logger, pe *providers.PanicError) error {
	log.Error("provider panicked; the call failed, the agent serves on",
		zap.String("provider", pe.Provider), zap.String("op", pe.Op), zap.String("key", shortName(pe.Key)),
		zap.String("panic", pe.Value), zap.ByteString("stack", pe.Stack))
	return pe
}

// stillActive confirms, once the policy counts the request among its
// slot's signatures in flight, that the version resolved before the check
// is still the slot's active one. An incident drill pauses the slot and
// waits out the signatures in flight before it retires the key; a request
// that resolved the key before that pause and was checked after the
// drill's resume is not among them, and would sign with the retired key.
// One it refuses has used its quota unit, as a provider's failure does.
//
// checked is the slot as the policy that allowed the request has it: a
// reload between the resolve and the check may have given the slot
// another key (without rotation the file's key signs), and the request,
// checked under the new policy, must not sign with the old one's key,
// which that policy may give to another tenant.
func (c *conn) stillActive(t target, checked *policy.Slot, kid string) error {
	if checked != t.slot {
		if e, _, err := c.slotKey(checked, kid, false); err != nil || e != t.key {
			return &proto.Error{Code: proto.Unavailable, Msg: "the key slot changed while this request was checked; retry"}
		}
	}
	if c.a.rot == nil || t.version == 0 {
		return nil
	}
	v, err := c.a.rot.Store().Resolve(t.slot.FullName())
	if err != nil {
		return err
	}
	if v.Number != t.version {
		return &proto.Error{Code: proto.Unavailable, Msg: "the key slot rotated while this request was checked; retry"}
	}
	return nil
}

// notRetiredMeanwhile withholds a signature whose version was retired
// while its provider signed: an emergency rotation (an incident drill)
// retires the old version at its cut-over, and a failed rotation's revert
// the new one. A drill's pause waits out the signatures in flight, and
// while it runs an operator's resume and a reload lifting the slot's file
// pause are refused (pause.go, drillUnderWay); this is the last fence,
// for a failed rotation's revert and any way round those. A
// version replaced by an ordinary rotation or a rollback is accepted and
// still verifies: its signature goes out. The common case, the slot still
// on the version that signed, costs one atomic load and no clock read.
func (c *conn) notRetiredMeanwhile(t target) error {
	if c.a.rot == nil || t.version == 0 {
		return nil
	}
	store := c.a.rot.Store()
	slot := t.slot.FullName()
	if v, err := store.Resolve(slot); err == nil && v.Number == t.version {
		return nil
	}
	if _, err := store.VersionForVerify(slot, t.key.info.KID, time.Now()); err != nil {
		return &proto.Error{Code: proto.Unavailable, Msg: "the key version that signed was retired meanwhile (an incident drill, or a failed rotation); retry"}
	}
	return nil
}

// refuseBeforePolicy answers a request refused for its algorithm or digest
// before the policy's full check, which would count it. The policy's rules
// before the algorithm's (the slot's clients, its pause) still decide
// first, as docs/policy.md orders them: a caller outside clients learns
// nothing of the key. That check allows nothing (no algorithm), so it
// takes no quota unit or token.
func (c *conn) refuseBeforePolicy(req *proto.Request, d *signDecision, err error) error {
	if d.target.slot == nil {
		return err
	}
	early := c.a.policy.Check(d.tenant, d.target.slot.Name, c.identity(), providers.Algorithm{}, len(req.Digest))
	early.Done()
	if r := early.Reason; r == policy.PermissionDenied || r == policy.Paused {
		d.policyHash = early.PolicyHash
		c.a.metrics.denied(r)
		return &proto.Error{Code: reasonCode(r), Msg: early.Message()}
	}
	return err
}

// servedKeyLost turns a provider's "no such key" for a key the agent
// serves into UNAVAILABLE. The caller named a slot that exists; the key
// behind it was deleted in its HSM or key service. The wire's NOT_FOUND
// means the caller has no such key, and a PKCS#11 object deleted from its
// token, a destroyed GCP version and an AWS key pending deletion already
// answered UNAVAILABLE, while an AWS key or Azure key deleted outright
// answered NOT_FOUND.
func servedKeyLost(err error) error {
	if errors.Is(err, providers.ErrNotFound) {
		return fmt.Errorf("%w: the provider no longer has this served key (deleted in the backend?): %v", providers.ErrUnavailable, err)
	}
	return err
}

func (c *conn) verify(req *proto.Request, resp *proto.Response, meta *reqMeta) error {
	t, tenant, err := c.resolve(req.Key, req.KID, true)
	meta.set(tenant, t)
	if err != nil {
		return err
	}
	e := t.key
	alg, err := e.algorithmFor(req.Scheme, req.Hash)
	if err != nil {
		return err
	}
	err = providers.Verify(e.info.Public, alg, req.Digest, req.Sig)
	switch {
	case err == nil:
		resp.Valid = true
	case errors.Is(err, providers.ErrInvalidSignature):
		resp.Valid = false
	default:
		return err
	}
	resp.Key, resp.KID = t.name(), e.info.KID
	return nil
}

// requestTimeout is the tighter of the client's deadline and the agent's
// limit. A tmo of proto.TimeoutOutOfRange stands for 2^32-1 ms or more: a
// deadline that does not tighten the limit, however long the limit is.
func (c *conn) requestTimeout(req *proto.Request) time.Duration {
	limit := c.a.cfg.Limits.RequestTimeout
	if req.TimeoutMillis > 0 && req.TimeoutMillis != proto.TimeoutOutOfRange {
		if d := time.Duration(req.TimeoutMillis) * time.Millisecond; d < limit {
			return d
		}
	}
	return limit
}
