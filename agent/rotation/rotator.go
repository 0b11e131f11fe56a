package rotation

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/zeebo/blake3"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// Defaults.
const (
	// DefaultOverlap is how long an old version keeps verifying after a
	// rotation or rollback (its T1 = cutover + overlap).
	DefaultOverlap = 24 * time.Hour
	// DefaultCanaries is the size of the canary set.
	DefaultCanaries = 100
	// MaxCanaries bounds the canary set: every signature is kept in the REP.
	MaxCanaries = 10000
	// maxDetail bounds a record's Detail.
	maxDetail = 300
)

// Options configure a Rotator.
type Options struct {
	// EvidenceKey signs every Rotation Evidence Pack and incident statement
	// record: an Ed25519 key held by the agent (LoadOrCreateEvidenceKey).
	// Required.
	EvidenceKey crypto.Signer
	// EvidenceDir is where REP files and incident statements are written,
	// under <EvidenceDir>/<tenant>/<slot>/. Empty: they are kept in the
	// journal only (Store.REP, ExportREP).
	EvidenceDir string
	// Host names this agent in evidence (for example the host name or the
	// agent's SPIFFE ID). Optional.
	Host string
	// DefaultOverlap is used when RotateOptions.Overlap or
	// RollbackOptions.Overlap is zero. Default DefaultOverlap (24h).
	DefaultOverlap time.Duration
	// DefaultCanaries is used when RotateOptions.Canaries is zero. Default
	// DefaultCanaries (100).
	DefaultCanaries int
	// Code maps an error to the wire code written into a failure record.
	// Default: a mapping of the provider, journal and rotation errors; the
	// agent passes agent.Code so codes are mapped in one place.
	Code func(error) proto.Code
	// Logger. Default: the store's.
	Logger *zap.Logger
}

// EnsureDefaults fills in the zero-valued fields that have defaults.
func (o *Options) EnsureDefaults() {
	if o.DefaultOverlap <= 0 {
		o.DefaultOverlap = DefaultOverlap
	}
	if o.DefaultCanaries <= 0 {
		o.DefaultCanaries = DefaultCanaries
	}
	if o.Code == nil {
		o.Code = WireCode
	}
}

// Rotator rotates, rolls back and retires key versions of the slots in a
// Store, and writes the evidence.
type Rotator struct {
	store       *Store
	opts        Options
	evidencePub ed25519.PublicKey
	log         *zap.Logger

	// hook, set by tests only, runs after each rotation step and can fail it.
	hook func(step string) error
}

// NewRotator returns a Rotator over store. When EvidenceDir is set it
// writes the evidence public key there as evidence-key.pub.pem, for
// verifiers; they should pin it by its fingerprint (EvidenceKeyID). A file
// there that holds another key, or does not parse, is not replaced: the
// error wraps ErrEvidenceKeyMismatch.
func NewRotator(store *Store, opts Options) (*Rotator, error) {
	if store == nil {
		return nil, errors.New("rotation: a store is required")
	}
	opts.EnsureDefaults()
	if opts.EvidenceKey == nil {
		return nil, errors.New("rotation: an evidence key is required")
	}
	pub, ok := opts.EvidenceKey.Public().(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("rotation: the evidence key must be Ed25519, not %T", opts.EvidenceKey.Public())
	}
	if opts.Logger == nil {
		opts.Logger = store.log
	}
	r := &Rotator{store: store, opts: opts, evidencePub: pub, log: opts.Logger}
	if opts.EvidenceDir != "" {
		if _, err := WriteEvidencePublicKey(opts.EvidenceDir, pub); err != nil {
			return nil, err // it names the file and the keys; the agent adds "rotation:"
		}
	}
	return r, nil
}

// Store is the rotator's store.
func (r *Rotator) Store() *Store { return r.store }

// EvidencePublicKey is the public half of the evidence key.
func (r *Rotator) EvidencePublicKey() ed25519.PublicKey { return r.evidencePub }

func (r *Rotator) now() time.Time { return r.store.clock() }

// RotateOptions describe one rotation.
type RotateOptions struct {
	// Maker generates the new key. Not needed when NextKey is set.
	Maker KeyMaker
	// Signer signs with the new key (the CSR and the canaries): the
	// provider that holds it. Required.
	Signer Signer
	// NextKey is a pre-provisioned key to rotate to instead of generating
	// one. Signer must serve it.
	NextKey *providers.KeyInfo
	// KeyType of the new key. Default: the active version's type.
	KeyType providers.KeyType
	// KeyName of the new key. Default "<tenant>/<slot>/v<n>", with
	// "-a<k>" appended for the k-th attempt at the same version (k ≥ 2).
	KeyName string
	// Subject of the CSR. Default: CommonName "<tenant>/<slot>".
	Subject pkix.Name
	// Overlap: the old version is accepted until cutover + Overlap. Zero
	// means Options.DefaultOverlap. Ignored when Emergency is set.
	Overlap time.Duration
	// Emergency: the old version stops verifying at the cutover (T1 = cutover
	// time); once the canaries verified, it and every older version still
	// accepted are retired. Incident drills rotate this way.
	Emergency bool
	// Canaries is the size of the canary set. Zero: Options.DefaultCanaries.
	Canaries int
	// PolicyHash is stamped on the records and quoted in the REP.
	PolicyHash [32]byte
	// Reason is why ("scheduled", "manual", "incident drill"); in the
	// journal and the REP.
	Reason string
	// Peer is who asked, for the journal ("scheduler", an admin identity).
	Peer string
}

// Result is a successful rotation.
type Result struct {
	Slot      string
	Old, New  Version // as they are after the rotation
	REP       int     // the evidence pack's number (= New.Number)
	Manifest  []byte  // canonical manifest JSON
	Signature []byte  // Ed25519 signature over Manifest
	Files     []string
	FirstSeq  uint64 // the rotation's journal records
	LastSeq   uint64
}

// Rotate rotates the slot to a new key version:
//
//  1. start: journal the start (and reserve a fresh key name);
//  2. keygen: generate the new key (or take opts.NextKey);
//  3. csr: a CSR signed by the new key through its crypto.Signer, and
//     checked — the pre-flight proof that the key signs and matches;
//  4. cutover: the new version active, the old one accepted until T1;
//  5. canary: the canary set signed with the slot's now-active key and
//     every signature verified against the new public key;
//  6. retire (emergency only): the old version retired;
//  7. evidence: the Rotation Evidence Pack signed, written, stored.
//
// Each step is journaled; the cutover (and a revert) is one atomic commit
// of a record and the slot's state. A failed step returns a *StepError and
// leaves the old version active: a step after the cutover is undone (the
// new version is retired and marked failed).
func (r *Rotator) Rotate(ctx context.Context, slot string, opts RotateOptions) (*Result, error) {
	if _, _, err := SplitSlot(slot); err != nil {
		return nil, err
	}
	return r.rotateIfDue(ctx, slot, opts, nil)
}

// errNotDue: a scheduled rotation found, once it held the slot, that the
// slot is no longer due (another rotation or a drill ran meanwhile).
var errNotDue = errors.New("no longer due")

// rotateIfDue is Rotate that, once it holds the slot, asks due (if not
// nil), with the slot as it is then, whether to rotate at all. The
// scheduler decides from a snapshot of every slot taken before it rotates
// them one by one; a manual rotation or a drill of a later slot meanwhile
// must not be followed at once by a second one. Only the scheduler passes
// a due: its attempt is stamped on the slot (Slot.ScheduledAttempt).
func (r *Rotator) rotateIfDue(ctx context.Context, slot string, opts RotateOptions, due func(Slot) bool) (*Result, error) {
	release, err := r.holdIfDue(ctx, slot, due)
	if err != nil {
		return nil, err
	}
	defer release()
	return r.rotateLocked(ctx, slot, opts, due != nil)
}

// holdIfDue holds the slot for a rotation (ErrBusy if another holds it)
// and, if due is not nil, asks it whether the slot, as it is now, is still
// due (errNotDue if not). The caller calls release.
func (r *Rotator) holdIfDue(ctx context.Context, slot string, due func(Slot) bool) (release func(), err error) {
	release, err = r.store.acquire(ctx, slot)
	if err != nil {
		return nil, err
	}
	if due != nil {
		if cur, ok := r.store.Get(slot); !ok || !due(cur) {
			release()
			return nil, errNotDue
		}
	}
	return release, nil
}

// FailStart journals a rotation of slot that could not start because its
// options could not be made (the agent's: the slot's next_key or active
// key not served, a provider that cannot generate keys): a failed start
// step ("rotate.failed", with cause's code), as Rotate journals one, and
// the *StepError, which wraps cause. opts is what is known of the
// rotation: its peer and policy hash go on the record. Like Rotate it
// holds the slot meanwhile; a slot the store does not know (ErrNotFound)
// or that another rotation holds (ErrBusy) is not journaled, as Rotate
// journals neither.
func (r *Rotator) FailStart(ctx context.Context, slot string, opts RotateOptions, cause error) error {
	if _, _, err := SplitSlot(slot); err != nil {
		return err
	}
	return r.failStartIfDue(ctx, slot, opts, cause, nil)
}

// failStartIfDue is FailStart that, once it holds the slot, asks due (if
// not nil) whether the rotation would have run at all, as rotateIfDue does.
func (r *Rotator) failStartIfDue(ctx context.Context, slot string, opts RotateOptions, cause error, due func(Slot) bool) error {
	release, err := r.holdIfDue(ctx, slot, due)
	if err != nil {
		return err
	}
	defer release()
	cur, ok := r.store.Get(slot)
	if !ok {
		return fmt.Errorf("%s: %w", slot, ErrNotFound)
	}
	return r.newRotation(slot, cur, opts, due != nil).fail(ctx, StepStart, cause)
}

// rotation is one Rotate in progress.
type rotation struct {
	r              *Rotator
	slot           string
	tenant, name   string
	opts           RotateOptions
	old            Version
	n              int
	keyType        providers.KeyType
	newKey         providers.KeyInfo
	newURI         string
	attestation    *Attestation
	csrDER         []byte
	canary         canaryResult
	started        time.Time
	cutoverAt      time.Time
	t1             time.Time
	cutover        bool        // the new version is, or may be, active: a failure must revert it
	served         []time.Time // one-off times the cut-over dropped; a revert puts them back
	scheduled      bool        // the scheduler's attempt: stamped as Slot.ScheduledAttempt
	attemptBefore  time.Time   // the ScheduledAttempt the cut-over cleared; a revert puts it back
	firstSeq       uint64
	lastSeq        uint64
	lastHash       [32]byte
	generatedLeft  string     // a generated key's name, for the failure record
	generatedKID   string     // its kid, when the maker told it
	attemptKey     AttemptKey // the key this attempt generates, as its start record names it
	mayHaveCutOver bool       // a cut-over was, or may have been, committed: the new key may have signed
	afterStepsHook func(step string) error
}

func (r *Rotator) rotateLocked(ctx context.Context, slot string, opts RotateOptions, scheduled bool) (*Result, error) {
	cur, ok := r.store.Get(slot)
	if !ok {
		return nil, fmt.Errorf("%s: %w", slot, ErrNotFound)
	}
	u := r.newRotation(slot, cur, opts, scheduled)
	if err := ctx.Err(); err != nil {
		return nil, &StepError{Slot: slot, Step: StepStart, Err: err}
	}
	if err := u.resolveOptions(); err != nil {
		return nil, u.fail(ctx, StepStart, err)
	}

	// A key an earlier attempt generated and never cut over (it died
	// before it could destroy it) goes first: the start below names the
	// next one in its place.
	if cur.AttemptKey.Name != "" {
		u.destroyAttemptKey(ctx, cur.AttemptKey, cur.AttemptKey.KID, "left by an earlier attempt that did not cut over")
	}

	// start: the record names the key the rotation will make (or use), so
	// that a key generated and then orphaned by a crash before the keygen
	// record can still be traced from the journal.
	rec := u.rec("rotate.start", u.old.Number, u.old.KID, "")
	keyName := u.opts.KeyName
	_, destroyable := u.opts.Maker.(KeyDestroyer)
	destroyable = destroyable && u.opts.NextKey == nil
	_, err := r.store.mutate(ctx, slot, rec, func(sl *Slot, rec *journal.Record) error {
		sl.Attempt++
		if u.scheduled {
			// Before the key is made: an agent that dies making it must
			// wait too when it starts again.
			sl.ScheduledAttempt = u.started
		}
		if keyName == "" {
			keyName = fmt.Sprintf("%s/v%d", slot, u.n)
			if sl.Attempt > 1 {
				keyName += fmt.Sprintf("-a%d", sl.Attempt)
			}
		}
		key := "key " + keyName
		// Committed before the key exists, so that a crash after its
		// generation still leaves its name for the next attempt.
		sl.AttemptKey = AttemptKey{}
		if destroyable {
			sl.AttemptKey = AttemptKey{Name: keyName, Provider: u.old.Provider}
		}
		u.attemptKey = sl.AttemptKey
		if u.opts.NextKey != nil {
			key = "pre-provisioned key " + u.opts.NextKey.Name
		}
		rec.Detail = truncate(fmt.Sprintf("v%d -> v%d (%s), %s; reason: %s", u.old.Number, u.n, u.keyType, key, u.opts.Reason))
		return nil
	})
	if err != nil {
		return nil, &StepError{Slot: slot, Step: StepStart, Err: err}
	}
	u.note(rec)
	if err := u.hook(StepStart); err != nil {
		return nil, u.fail(ctx, StepStart, err)
	}

	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{StepKeygen, func(ctx context.Context) error { return u.keygen(ctx, keyName, cur) }},
		{StepCSR, u.csr},
		{StepCutover, u.doCutover},
		{StepCanary, u.canaries},
		{StepRetire, u.retireOld},
	}
	for _, s := range steps {
		if err := s.fn(ctx); err != nil {
			return nil, u.fail(ctx, s.name, err)
		}
		if err := u.hook(s.name); err != nil {
			return nil, u.fail(ctx, s.name, err)
		}
	}
	res, err := u.evidence(ctx)
	if err == nil {
		err = u.hook(StepEvidence)
	}
	if err != nil {
		return nil, u.fail(ctx, StepEvidence, err)
	}
	r.log.Info("slot rotated", zap.String("slot", slot), zap.Int("old", u.old.Number), zap.Int("new", u.n),
		zap.String("kid", u.newKey.KID), zap.String("reason", u.opts.Reason), zap.Bool("emergency", u.opts.Emergency))
	return res, nil
}

// newRotation is a rotation of the slot, whose state is cur, from its
// active version; scheduled if the scheduler asked for it.
func (r *Rotator) newRotation(slot string, cur Slot, opts RotateOptions, scheduled bool) *rotation {
	return &rotation{r: r, slot: slot, tenant: cur.Tenant, name: cur.Name, opts: opts, scheduled: scheduled,
		old: cur.ActiveVersion(), n: cur.nextNumber(), started: r.now(), afterStepsHook: r.hook}
}

func (u *rotation) hook(step string) error {
	if u.afterStepsHook == nil {
		return nil
	}
	return u.afterStepsHook(step)
}

func (u *rotation) resolveOptions() error {
	o := &u.opts
	if o.Signer == nil {
		return errors.New("no signer for the new key")
	}
	if o.NextKey == nil && o.Maker == nil {
		return errors.New("no key maker and no pre-provisioned next key")
	}
	if o.KeyType == "" {
		o.KeyType = u.old.KeyType
		if o.NextKey != nil {
			o.KeyType = o.NextKey.Type
		}
	}
	u.keyType = o.KeyType
	if !slices.Contains(providers.KeyTypes, u.keyType) {
		return fmt.Errorf("key type %q: %w", u.keyType, providers.ErrUnsupportedAlgorithm)
	}
	switch {
	case o.Overlap < 0:
		return fmt.Errorf("negative overlap %v", o.Overlap)
	case o.Emergency:
		o.Overlap = 0
	case o.Overlap == 0:
		o.Overlap = u.r.opts.DefaultOverlap
	}
	if o.Canaries == 0 {
		o.Canaries = u.r.opts.DefaultCanaries
	}
	if o.Canaries < 1 || o.Canaries > MaxCanaries {
		return fmt.Errorf("canary set of %d (want 1 to %d)", o.Canaries, MaxCanaries)
	}
	if o.Subject.CommonName == "" && len(o.Subject.Names) == 0 && len(o.Subject.ExtraNames) == 0 && len(o.Subject.Organization) == 0 {
		o.Subject.CommonName = u.slot
	}
	if o.Reason == "" {
		o.Reason = "manual"
	}
	if o.Emergency {
		o.Reason += " (emergency)"
	}
	return nil
}

func (u *rotation) rec(op string, version int, kid, detail string) *journal.Record {
	return &journal.Record{
		Time: u.r.now(), Tenant: u.tenant, Slot: u.slot, Version: uint32(version), KID: kid,
		Op: op, PolicyHash: u.opts.PolicyHash, CodeName: proto.OK.String(), Peer: u.opts.Peer,
		Detail: truncate(detail),
	}
}

func (u *rotation) note(r *journal.Record) {
	if u.firstSeq == 0 {
		u.firstSeq = r.Seq
	}
	u.lastSeq, u.lastHash = r.Seq, r.Hash
}

// append journals a step record that changes no state.
func (u *rotation) append(ctx context.Context, rec *journal.Record, changes ...journal.StateChange) error {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	defer cancel()
	if err := u.r.store.j.AppendWithState(cctx, rec, changes...); err != nil {
		return fmt.Errorf("journal %s: %w", rec.Op, err)
	}
	u.note(rec)
	return nil
}

func (u *rotation) keygen(ctx context.Context, keyName string, cur Slot) error {
	start := time.Now()
	var info providers.KeyInfo
	how := "generated"
	if u.opts.NextKey != nil {
		info, how = *u.opts.NextKey, "pre-provisioned"
	} else {
		err := u.r.callProvider(u.old.Provider, "generate key", keyName, func() (err error) {
			info, err = u.opts.Maker.GenerateKey(ctx, keyName, u.keyType)
			return err
		})
		if info.Name != "" {
			// Made, even if the maker then failed: the failure record
			// must name it.
			u.generatedLeft, u.generatedKID = info.Name, info.KID
		}
		if err != nil {
			return err
		}
	}
	if info.Type != u.keyType {
		return fmt.Errorf("key %s is %s, want %s", info.Name, info.Type, u.keyType)
	}
	if info.Public == nil || len(info.SPKI) == 0 || info.KID == "" {
		return fmt.Errorf("key %s: incomplete key info", info.Name)
	}
	for _, v := range cur.Versions {
		if v.KID == info.KID {
			return fmt.Errorf("key %s is already v%d of this slot", info.Name, v.Number)
		}
	}
	if loc, ok := u.opts.Maker.(KeyLocator); ok && u.opts.NextKey == nil {
		var uri string
		err := u.r.callProvider(u.old.Provider, "locate key", info.Name, func() (err error) {
			uri, err = loc.URI(info.Name)
			return err
		})
		if err != nil {
			return fmt.Errorf("locate key %s: %w", info.Name, err)
		}
		u.newURI = uri
	}
	if at, ok := u.opts.Maker.(Attester); ok {
		var a Attestation
		err := u.r.callProvider(u.old.Provider, "attest key", info.Name, func() (err error) {
			a, err = at.Attest(ctx, info)
			return err
		})
		if err != nil {
			return fmt.Errorf("attest key %s: %w", info.Name, err)
		}
		u.attestation = &a
	}
	u.newKey = info
	rec := u.rec("rotate.keygen", u.n, info.KID, fmt.Sprintf("%s key %s (%s) on %s", how, info.Name, info.Type, info.Provider))
	rec.LatencyMicros = micros(time.Since(start))
	if u.attemptKey.Name == "" {
		return u.append(ctx, rec)
	}
	// The attempt's key gets its kid in the record's commit: a later
	// attempt destroys a crashed one's key only by that kid, as a key
	// found under the name alone might be another's. (mutate bounds the
	// commit by commitTimeout and names the record in its error.)
	_, err := u.r.store.mutate(ctx, u.slot, rec, func(sl *Slot, _ *journal.Record) error {
		if sl.AttemptKey == u.attemptKey && info.Name == u.attemptKey.Name {
			sl.AttemptKey.KID = info.KID
		}
		return nil
	})
	if err != nil {
		return err
	}
	if info.Name == u.attemptKey.Name {
		u.attemptKey.KID = info.KID
	}
	u.note(rec)
	return nil
}

func (u *rotation) csr(ctx context.Context) error {
	start := time.Now()
	tmpl := &x509.CertificateRequest{Subject: u.opts.Subject}
	var der []byte
	err := u.r.callProvider(u.newKey.Provider, "sign (CSR)", u.newKey.Name, func() (err error) {
		der, err = x509.CreateCertificateRequest(rand.Reader, tmpl, NewCryptoSigner(ctx, u.opts.Signer, u.newKey))
		return err
	})
	if err != nil {
		return fmt.Errorf("create CSR: %w", err)
	}
	if err := checkCSR(der, u.newKey.SPKI); err != nil {
		return err
	}
	u.csrDER = der
	sum := blake3.Sum256(der)
	rec := u.rec("rotate.csr", u.n, u.newKey.KID, fmt.Sprintf("CSR for %q, blake3 %x", u.opts.Subject.String(), sum[:8]))
	rec.LatencyMicros = micros(time.Since(start))
	return u.append(ctx, rec)
}

// checkCSR parses a CSR, checks its self-signature and that it is for the
// key with the given SPKI.
func checkCSR(der, spki []byte) error {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return fmt.Errorf("parse CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return fmt.Errorf("CSR signature does not verify with the new key: %w", err)
	}
	if string(csr.RawSubjectPublicKeyInfo) != string(spki) {
		return errors.New("CSR is for another public key")
	}
	return nil
}

func (u *rotation) doCutover(ctx context.Context) error {
	now := u.r.now()
	t1 := now.Add(u.opts.Overlap)
	nv := versionFromKey(u.n, u.newKey, now)
	nv.URI, nv.State, nv.Activated, nv.Replaced = u.newURI, StateActive, now, u.old.Number
	detail := fmt.Sprintf("v%d active; v%d accepted until %s", u.n, u.old.Number, t1.UTC().Format(time.RFC3339))
	if u.opts.Emergency {
		detail = fmt.Sprintf("v%d active; v%d stops verifying now (emergency)", u.n, u.old.Number)
	}
	rec := u.rec("rotate", u.n, u.newKey.KID, detail)
	_, err := u.r.store.mutate(ctx, u.slot, rec, func(sl *Slot, _ *journal.Record) error {
		i, ok := sl.index(u.old.Number)
		if !ok || sl.Versions[i].State != StateActive {
			return errors.New("the active version changed during the rotation")
		}
		sl.Versions[i].State, sl.Versions[i].T1 = StateAccepted, t1
		sl.Versions = append(sl.Versions, nv)
		sl.Active, sl.Attempt = u.n, 0
		// From this commit on the new key may sign: never destroyed.
		sl.AttemptKey = AttemptKey{}
		u.attemptBefore, sl.ScheduledAttempt = sl.ScheduledAttempt, time.Time{}
		u.served = nil
		sl.Scheduled = slices.DeleteFunc(sl.Scheduled, func(t time.Time) bool {
			if t.After(now) {
				return false
			}
			u.served = append(u.served, t)
			return true
		})
		return nil
	})
	if err != nil {
		// The journal did not confirm the commit, but it may have landed
		// (journal doc.go, "Failures"): the store has read the slot back,
		// or could not. If the new version is, or may be, active, fail
		// must undo the cut-over.
		if sl, _ := u.r.store.Get(u.slot); sl.Active == u.n || errors.Is(err, ErrStateUnknown) {
			u.cutover, u.cutoverAt, u.t1 = true, now, t1
			u.mayHaveCutOver = true
		}
		return err
	}
	u.cutover, u.cutoverAt, u.t1 = true, now, t1
	u.mayHaveCutOver = true
	u.note(rec)
	return nil
}

type canaryResult struct {
	alg        providers.Algorithm
	count      int
	verified   int
	sigs       [][]byte
	sigsHash   [32]byte
	signingKID string
}

// canaries re-signs the canary set with the key the slot now resolves to,
// as the signing path would, and verifies each signature against the new
// version's public key.
func (u *rotation) canaries(ctx context.Context) error {
	start := time.Now()
	active, err := u.r.store.Resolve(u.slot)
	if err != nil {
		return err
	}
	if active.KID != u.newKey.KID {
		return fmt.Errorf("slot resolves to kid %s, not the new version's %s", active.KID, u.newKey.KID)
	}
	c := canaryResult{alg: u.keyType.DefaultAlgorithm(), count: u.opts.Canaries, signingKID: active.KID}
	c.sigs = make([][]byte, 0, c.count)
	var firstErr error
	for i := 0; i < c.count; i++ {
		in := canaryInput(c.alg, CanaryPayload(u.slot, u.n, i))
		var sig []byte
		err := u.r.callProvider(active.Provider, "sign (canary)", active.Key, func() (err error) {
			sig, err = u.opts.Signer.Sign(ctx, active.Key, c.alg, in)
			return err
		})
		if err != nil {
			return fmt.Errorf("canary %d: sign: %w", i, err)
		}
		if err := providers.Verify(u.newKey.Public, c.alg, in, sig); err != nil {
			firstErr = cmpErr(firstErr, fmt.Errorf("canary %d: %w", i, err))
		} else {
			c.verified++
		}
		c.sigs = append(c.sigs, sig)
	}
	c.sigsHash = canarySignaturesHash(c.sigs)
	u.canary = c
	detail := fmt.Sprintf("%d/%d verified with %s; signatures blake3 %x", c.verified, c.count, c.alg, c.sigsHash[:8])
	if firstErr != nil {
		return fmt.Errorf("%d of %d canary signatures did not verify (first: %w)", c.count-c.verified, c.count, firstErr)
	}
	rec := u.rec("canary", u.n, u.newKey.KID, detail)
	rec.Algorithm = c.alg.String()
	rec.LatencyMicros = micros(time.Since(start))
	return u.append(ctx, rec)
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

func (u *rotation) retireOld(ctx context.Context) error {
	if !u.opts.Emergency {
		return nil
	}
	now := u.r.now()
	rec := u.rec("retire", u.old.Number, u.old.KID, "")
	_, err := u.r.store.mutate(ctx, u.slot, rec, func(sl *Slot, rec *journal.Record) error {
		// Every older version that still verifies goes, not only the one
		// rotated from: after an incident only the new key may verify.
		var retired []string
		for i := range sl.Versions {
			v := &sl.Versions[i]
			if v.Number != u.n && v.State != StateRetired {
				v.State, v.Retired = StateRetired, now
				retired = append(retired, fmt.Sprintf("v%d", v.Number))
			}
		}
		rec.Detail = truncate(fmt.Sprintf("emergency rotation: %s retired", strings.Join(retired, ", ")))
		return nil
	})
	if err != nil {
		return err
	}
	u.note(rec)
	return nil
}

// fail journals a failed step, undoes a cutover, and returns the StepError.
func (u *rotation) fail(ctx context.Context, step string, cause error) error {
	se := &StepError{Slot: u.slot, Step: step, Err: cause}
	code := u.r.opts.Code(cause)
	detail := fmt.Sprintf("step %s failed: %v", step, cause)
	if u.generatedLeft != "" {
		detail = fmt.Sprintf("%s; generated key %s is not in use", detail, u.generatedLeft)
	}
	if u.cutover {
		now := u.r.now()
		rec := u.rec("rotate.failed", u.old.Number, u.old.KID,
			fmt.Sprintf("%s; reverted: v%d active again, v%d retired", detail, u.old.Number, u.n))
		rec.Code, rec.CodeName = uint16(code), code.String()
		// The store keeps a revert the journal does not confirm and commits
		// it later; the slot does not sign meanwhile.
		err := u.r.store.revert(ctx, u.slot, rec, func(sl *Slot, _ *journal.Record) error {
			oi, ok1 := sl.index(u.old.Number)
			ni, ok2 := sl.index(u.n)
			if !ok2 || sl.Active != u.n {
				return errNoRevert // the cut-over did not land, or is undone already
			}
			if !ok1 {
				return errors.New("versions of the rotation not found")
			}
			o, n := &sl.Versions[oi], &sl.Versions[ni]
			o.State, o.T1, o.Retired = StateActive, time.Time{}, time.Time{}
			n.State, n.T1, n.Retired, n.Failed = StateRetired, time.Time{}, now, true
			sl.Active = u.old.Number
			sl.ScheduledAttempt = u.attemptBefore
			// The one-off times the cut-over served are due again: the
			// rotation they asked for did not happen.
			sl.Scheduled = append(sl.Scheduled, u.served...)
			slices.SortFunc(sl.Scheduled, time.Time.Compare)
			sl.Scheduled = slices.CompactFunc(sl.Scheduled, time.Time.Equal)
			return nil
		})
		sl, _ := u.r.store.Get(u.slot)
		nv, _ := sl.Version(u.n)
		switch {
		case err != nil:
			se.RevertErr = err
		case nv.Failed:
			se.Reverted = true
		default:
			u.cutover = false // it never landed: journal the failure alone
		}
	}
	// The attempt's key is destroyed below only if it never cut over and
	// the maker named it as made; otherwise the slot stops naming it as
	// an attempt's key, with the failure record, so that no later start
	// destroys it: a key that may have been active is kept.
	ak := u.attemptKey
	destroy := ak.Name != "" && !u.mayHaveCutOver && u.generatedLeft == ak.Name
	sl, _ := u.r.store.Get(u.slot)
	forget := ak.Name != "" && !destroy && sl.AttemptKey == ak
	if !u.cutover {
		version, kid := u.old.Number, u.old.KID
		rec := u.rec("rotate.failed", version, kid, detail)
		rec.Code, rec.CodeName = uint16(code), code.String()
		var err error
		if stamp := u.scheduled && u.firstSeq == 0; stamp || forget {
			// A scheduled attempt that failed before its start record (its
			// options could not be made) is stamped with its failure, so
			// that a restart waits before writing the same failure again.
			_, err = u.r.store.mutate(ctx, u.slot, rec, func(sl *Slot, _ *journal.Record) error {
				if stamp {
					sl.ScheduledAttempt = u.started
				}
				if forget && sl.AttemptKey == ak {
					sl.AttemptKey = AttemptKey{}
				}
				return nil
			})
			if err == nil {
				u.note(rec)
			}
		} else {
			err = u.append(ctx, rec)
		}
		if err != nil {
			u.r.log.Error("rotation failure not journaled", zap.String("slot", u.slot), zap.Error(err))
		}
	}
	if destroy {
		u.destroyAttemptKey(ctx, ak, u.generatedKID, "of an attempt that failed at step "+step)
	}
	u.r.log.Error("rotation failed", zap.String("slot", u.slot), zap.String("step", step),
		zap.Bool("reverted", se.Reverted), zap.Error(se))
	return se
}

// destroyTimeout bounds destroying an attempt's unused key. The rotation's
// own context may have ended: a timeout is one way an attempt fails.
var destroyTimeout = 30 * time.Second

// destroyAttemptKey destroys ak, the key of an attempt that never cut over
// (the slot's AttemptKey names it, which the cut-over clears in its own
// commit), through the rotation's key maker, and journals the outcome
// ("rotate.destroy"). kid, if known, is the kid the attempt generated.
// Fail closed: the key is kept when the slot is not settled, no longer
// names it, or when it is a version of any slot or the maker finds it
// in use. A key that is not destroyed never fails the rotation; the
// record names it, and a destroy that failed is tried again at the next
// attempt's start.
func (u *rotation) destroyAttemptKey(ctx context.Context, ak AttemptKey, kid, why string) {
	d, ok := u.opts.Maker.(KeyDestroyer)
	if !ok || u.opts.NextKey != nil || ak.Provider != u.old.Provider {
		// Another provider made it (the active version moved since), or
		// this maker cannot destroy: the record of its start names it.
		u.r.log.Warn("an unused key of a failed rotation attempt is left in its provider",
			zap.String("slot", u.slot), zap.String("key", ak.Name), zap.String("provider", ak.Provider))
		return
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), destroyTimeout)
	defer cancel()
	var found providers.KeyInfo
	check := func(info providers.KeyInfo) error {
		found = info
		if kid == "" {
			// The attempt died before its key generation was journaled:
			// a key under the name may not be the one it made (an
			// operator's, say). Kept, and named by the record.
			return fmt.Errorf("%w: its generation was not journaled, so it cannot be told from another key under the name", ErrKeyNotProvenUnused)
		}
		if info.KID != kid {
			return fmt.Errorf("%w: it has kid %s, the attempt generated %s", ErrKeyInUse, info.KID, kid)
		}
		if _, err := u.r.store.Resolve(u.slot); err != nil {
			return fmt.Errorf("%w: the slot's state is not settled: %w", ErrKeyInUse, err)
		}
		if sl, ok := u.r.store.Get(u.slot); !ok || sl.AttemptKey != ak {
			return fmt.Errorf("%w: the slot no longer names it as an unused attempt's key", ErrKeyInUse)
		}
		for _, sl := range u.r.store.Slots() {
			for _, v := range sl.Versions {
				// By public key as well as kid: a kid hashes the key's name
				// too, so the same key enrolled under another name (adopted
				// by URI as another slot's) has another kid.
				if v.KID == info.KID || bytes.Equal(v.SPKI, info.SPKI) || v.Key == ak.Name && v.Provider == ak.Provider {
					return fmt.Errorf("%w: it is v%d of %s", ErrKeyInUse, v.Number, sl.FullName())
				}
			}
		}
		return nil
	}
	err := u.r.callProvider(ak.Provider, "destroy key", ak.Name, func() error { return d.DestroyKey(dctx, ak.Name, check) })
	if found.KID != "" {
		kid = found.KID
	}
	rec := u.rec("rotate.destroy", u.n, kid, "")
	forget := true // the slot stops naming the key
	switch {
	case err == nil:
		rec.Detail = truncate(fmt.Sprintf("unused key %s %s destroyed in %s", ak.Name, why, ak.Provider))
		u.r.log.Info("unused key of a failed rotation attempt destroyed", zap.String("slot", u.slot), zap.String("key", ak.Name))
	case errors.Is(err, providers.ErrNotFound):
		// Never made (the attempt died before), or destroyed already.
		rec.Detail = truncate(fmt.Sprintf("unused key %s %s: not in %s", ak.Name, why, ak.Provider))
	default:
		code := u.r.opts.Code(err)
		rec.Code, rec.CodeName = uint16(code), code.String()
		rec.Detail = truncate(fmt.Sprintf("unused key %s %s kept in %s: %v", ak.Name, why, ak.Provider, err))
		// A key found in use is never tried again; a destroy that failed
		// is, at the next attempt's start.
		forget = errors.Is(err, ErrKeyInUse) || errors.Is(err, ErrKeyNotProvenUnused)
		u.r.log.Error("unused key of a failed rotation attempt not destroyed; it stays in its provider",
			zap.String("slot", u.slot), zap.String("key", ak.Name), zap.String("provider", ak.Provider), zap.Error(err))
	}
	if forget {
		_, err = u.r.store.mutate(ctx, u.slot, rec, func(sl *Slot, _ *journal.Record) error {
			if sl.AttemptKey == ak {
				sl.AttemptKey = AttemptKey{}
			}
			return nil
		})
	} else {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
		defer cancel()
		err = u.r.store.j.Append(cctx, rec)
	}
	if err != nil {
		u.r.log.Error("destroying a failed attempt's unused key not journaled", zap.String("slot", u.slot), zap.String("key", ak.Name), zap.Error(err))
	}
}

// RollbackOptions describe one rollback.
type RollbackOptions struct {
	// Overlap: the version rolled back from is accepted until now + Overlap.
	// Zero: Options.DefaultOverlap.
	Overlap    time.Duration
	PolicyHash [32]byte
	Reason     string
	Peer       string
	// Servable, if set, says whether the version rolled back to can sign
	// now (its key is served, under its kid). A rollback to one that
	// cannot is refused: every signature would fail, and the next start
	// would refuse an active version it cannot serve.
	Servable func(Version) error
}

// Rollback makes the slot's previous version active again: the
// highest-numbered version below the active one that did not fail its
// rotation. The version rolled back from becomes accepted until now +
// overlap. It fails with ErrKeyRetired when that previous version is
// retired (or accepted past its T1), with ErrNotFound when there is none;
// refusals are journaled too.
func (r *Rotator) Rollback(ctx context.Context, slot string, opts RollbackOptions) (Version, error) {
	tenant, _, err := SplitSlot(slot)
	if err != nil {
		return Version{}, err
	}
	if opts.Overlap < 0 {
		return Version{}, fmt.Errorf("rollback %s: negative overlap %v", slot, opts.Overlap)
	}
	if opts.Overlap == 0 {
		opts.Overlap = r.opts.DefaultOverlap
	}
	release, err := r.store.acquire(ctx, slot)
	if err != nil {
		return Version{}, err
	}
	defer release()
	now := r.now()
	rec := &journal.Record{Time: now, Tenant: tenant, Slot: slot, Op: "rollback", PolicyHash: opts.PolicyHash,
		CodeName: proto.OK.String(), Peer: opts.Peer}
	var refused error
	var from, to Version
	sl, err := r.store.mutate(ctx, slot, rec, func(sl *Slot, rec *journal.Record) error {
		ci, _ := sl.index(sl.Active)
		cur := &sl.Versions[ci]
		rec.Version, rec.KID = uint32(cur.Number), cur.KID
		// The version the active one replaced; without that record, the
		// highest-numbered one below it. Not simply the highest below: after
		// v1→v2, a rollback to v1 and a rotation to v3, rolling back v3
		// must give v1, not v2, a key someone backed out of.
		ti := -1
		if pi, ok := sl.index(cur.Replaced); ok && cur.Replaced != 0 && !sl.Versions[pi].Failed {
			ti = pi
		}
		for i := ci - 1; ti < 0 && i >= 0; i-- {
			if !sl.Versions[i].Failed {
				ti = i
			}
		}
		if ti < 0 {
			refused = fmt.Errorf("rollback %s: no version before v%d: %w", slot, cur.Number, ErrNotFound)
			return refused
		}
		t := &sl.Versions[ti]
		if t.StateAt(now) == StateRetired {
			refused = fmt.Errorf("rollback %s to v%d: %w", slot, t.Number, ErrKeyRetired)
			return refused
		}
		if opts.Servable != nil {
			if err := opts.Servable(*t); err != nil {
				refused = fmt.Errorf("rollback %s to v%d: its key cannot sign: %w", slot, t.Number, err)
				return refused
			}
		}
		from = *cur
		t.State, t.T1, t.Retired, t.Activated = StateActive, time.Time{}, time.Time{}, now
		cur.State, cur.T1 = StateAccepted, now.Add(opts.Overlap)
		sl.Active = t.Number
		to = *t
		rec.Version, rec.KID = uint32(t.Number), t.KID
		rec.Detail = truncate(fmt.Sprintf("v%d -> v%d; v%d accepted until %s; reason: %s",
			cur.Number, t.Number, cur.Number, cur.T1.UTC().Format(time.RFC3339), opts.Reason))
		return nil
	})
	if refused != nil {
		code := r.opts.Code(refused)
		rec.Code, rec.CodeName, rec.Detail = uint16(code), code.String(), truncate("refused: "+refused.Error())
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
		defer cancel()
		if jerr := r.store.j.Append(cctx, rec); jerr != nil {
			r.log.Error("rollback refusal not journaled", zap.String("slot", slot), zap.Error(jerr))
		}
		return Version{}, refused
	}
	if err != nil {
		// The journal did not confirm the commit, but it may have landed;
		// the store has read the slot back. Report what the journal holds:
		// told that a rollback which happened failed, an operator would
		// roll back again, one version further.
		if cur, _ := r.store.Get(slot); to.Number == 0 || cur.Active != to.Number || errors.Is(err, ErrStateUnknown) {
			return Version{}, fmt.Errorf("rollback %s: %w", slot, err)
		}
		r.log.Warn("rollback committed although the journal reported a failure", zap.String("slot", slot), zap.Error(err))
		sl, _ = r.store.Get(slot)
	}
	r.log.Info("slot rolled back", zap.String("slot", slot), zap.Int("from", from.Number), zap.Int("to", to.Number))
	return sl.ActiveVersion(), nil
}

// Retirement is one version RetireDue retired.
type Retirement struct {
	Slot    string
	Version int
	KID     string
	T1      time.Time
}

// errSkip: RetireDue leaves a slot alone while a rotation holds it.
var errSkip = errors.New("skip")

// RetireDue moves every accepted version whose T1 has come (T1 ≤ now) to
// retired, one journal record ("retire") per version. Slots with a
// rotation in progress are left for the next call. Verification does not
// wait for it: VersionForVerify refuses an accepted version from its T1 on.
func (r *Rotator) RetireDue(ctx context.Context, now time.Time) ([]Retirement, error) {
	var out []Retirement
	var errs []error
	for _, sl := range r.store.Slots() {
		for _, v := range sl.Versions {
			if v.State != StateAccepted || now.Before(v.T1) {
				continue
			}
			slot := sl.FullName()
			rec := &journal.Record{Time: r.now(), Tenant: sl.Tenant, Slot: slot, Version: uint32(v.Number), KID: v.KID,
				Op: "retire", CodeName: proto.OK.String(), Peer: "scheduler",
				Detail: fmt.Sprintf("v%d reached its T1 %s", v.Number, v.T1.UTC().Format(time.RFC3339))}
			_, err := r.store.mutate(ctx, slot, rec, func(cur *Slot, _ *journal.Record) error {
				// r.store.mu is held while fn runs.
				if r.store.busy[slot] {
					return errSkip
				}
				i, ok := cur.index(v.Number)
				if !ok || cur.Versions[i].State != StateAccepted || now.Before(cur.Versions[i].T1) {
					return errSkip
				}
				cur.Versions[i].State, cur.Versions[i].Retired = StateRetired, now
				return nil
			})
			switch {
			case errors.Is(err, errSkip):
			case err != nil:
				errs = append(errs, fmt.Errorf("retire %s v%d: %w", slot, v.Number, err))
			default:
				out = append(out, Retirement{Slot: slot, Version: v.Number, KID: v.KID, T1: v.T1})
				r.log.Info("key version retired", zap.String("slot", slot), zap.Int("version", v.Number))
			}
		}
	}
	return out, errors.Join(errs...)
}

func truncate(s string) string {
	if len(s) <= maxDetail {
		return s
	}
	return strings.ToValidUTF8(s[:maxDetail-3], "") + "..."
}

func micros(d time.Duration) uint32 { return uint32(min(d.Microseconds(), 1<<32-1)) }

func hexHash(h [32]byte) string { return hex.EncodeToString(h[:]) }
