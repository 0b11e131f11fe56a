package agent

import (
	"cmp"
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11"
	"github.com/sigil-agent/sigil/providers/software"
)

// RotationConfig configures key rotation (docs/rotation.md). Rotation needs a
// policy file (slots are defined there) and the journal (state lives there).
type RotationConfig struct {
	// Calendars by slot, e.g. "payments/release": {period: 720h}.
	Calendars map[string]rotation.CalendarConfig `yaml:"calendars"`
	// Overlap: how long an old version still verifies after a rotation
	// (default 24h).
	Overlap time.Duration `yaml:"overlap"`
	// Canaries signed and verified with each new key (default 100).
	Canaries int `yaml:"canaries"`
	// RetryAfter: how long after a failed scheduled rotation the scheduler
	// tries the slot again (default 1h, at least 1m).
	RetryAfter time.Duration `yaml:"retry_after"`
	// Slots: per-slot settings, e.g. "payments/release".
	Slots map[string]SlotRotation `yaml:"slots"`
}

// parseCalendars parses the config's calendars for the scheduler.
func parseCalendars(cfg map[string]rotation.CalendarConfig) (map[string]rotation.Calendar, error) {
	cals := make(map[string]rotation.Calendar, len(cfg))
	for slot, cc := range cfg {
		cal, err := cc.Parse()
		if err != nil {
			return nil, fmt.Errorf("rotation.calendars[%s]: %w", slot, err)
		}
		cals[slot] = cal
	}
	return cals, nil
}

// SlotRotation is one slot's rotation settings.
type SlotRotation struct {
	// Subject of the CSR issued for each new key: the fields set, and
	// CN=tenant/slot unless common_name is set.
	Subject SubjectConfig `yaml:"subject"`
	// NextKey names a pre-provisioned key (served by a provider in this
	// config) that the next rotation moves to instead of generating one;
	// once used, later rotations generate keys again.
	NextKey string `yaml:"next_key"`
}

// SubjectConfig is a CSR subject. Each field set is in the CSR; the
// common name is "<tenant>/<slot>" unless set.
type SubjectConfig struct {
	CommonName         string   `yaml:"common_name"`
	Organization       []string `yaml:"organization"`
	OrganizationalUnit []string `yaml:"organizational_unit"`
	Country            []string `yaml:"country"`
}

// name is the subject of slot's CSRs.
func (s SubjectConfig) name(slot string) pkix.Name {
	return pkix.Name{CommonName: cmp.Or(s.CommonName, slot), Organization: s.Organization,
		OrganizationalUnit: s.OrganizationalUnit, Country: s.Country}
}

// rotationTimeout bounds an operator's rotation, as the scheduler bounds
// its own: key generation on an HSM, a CSR and the canary set.
const rotationTimeout = rotation.DefaultTimeout

// setupRotation opens the rotation state, serves again the key versions a
// rotation made before a restart, enrolls the policy's slots (v1 = the
// configured key) and starts the calendar.
func (a *Agent) setupRotation(ctx context.Context) error {
	// Every rotation of such a slot would fail: refused as --check
	// refuses it, here with the keys of providers an embedder added.
	if errs := nextKeyErrors(a.cfg.Rotation.Slots, a.keys.serves); len(errs) > 0 {
		return errors.Join(errs...)
	}
	store, err := rotation.OpenStore(ctx, a.journal, rotation.StoreOptions{Logger: a.log.Named("rotation")})
	if err != nil {
		return err
	}
	for _, sl := range store.Slots() {
		for _, v := range sl.Versions {
			if v.StateAt(time.Now()) == rotation.StateRetired {
				continue
			}
			if e := a.keys.entry(v.Key); e != nil {
				if e.info.KID != v.KID {
					// slotKey refuses this version (UNAVAILABLE): the slot's
					// other versions, and other slots, go on.
					a.log.Error("a key version's key name now resolves to another key; that version is not served (name the configured key by a fixed version, ARN or key id: docs/cloudkms.md)",
						zap.String("slot", sl.FullName()), zap.Int("version", v.Number), zap.String("key", v.Key),
						zap.String("recorded_kid", v.KID), zap.String("served_kid", e.info.KID))
				}
				continue
			}
			if err := a.adopt(ctx, v); err != nil {
				if v.Number == sl.Active {
					// Fail closed: the version that must sign cannot be served.
					return fmt.Errorf("slot %s: active version %d: %w", sl.FullName(), v.Number, err)
				}
				a.log.Warn("an accepted key version cannot be served; its signatures cannot be verified here",
					zap.String("slot", sl.FullName()), zap.Int("version", v.Number), zap.Error(err))
			}
		}
	}
	if err := a.enrollSlots(ctx, store, a.policy.Set()); err != nil {
		return err
	}
	evidenceDir := filepath.Join(a.cfg.DataDir, "evidence")
	evKey, err := rotation.OpenEvidenceKey(ctx, filepath.Join(a.cfg.DataDir, "evidence.key"), evidenceDir, store)
	if err != nil {
		return evidenceKeyError(err)
	}
	host, _ := os.Hostname()
	rot, err := rotation.NewRotator(store, rotation.Options{
		EvidenceKey:     evKey,
		EvidenceDir:     evidenceDir,
		Host:            host,
		DefaultOverlap:  a.cfg.Rotation.Overlap,
		DefaultCanaries: a.cfg.Rotation.Canaries,
		Code:            codeOf,
		Logger:          a.log.Named("rotation"),
	})
	if err != nil {
		return evidenceKeyError(err)
	}
	a.rot = rot
	cals, err := parseCalendars(a.cfg.Rotation.Calendars)
	if err != nil {
		return err
	}
	for _, err := range calendarSlotErrors(a.policy.Set(), a.cfg.Rotation.Calendars) {
		a.log.Warn("a rotation calendar names no slot of the policy", zap.Error(err))
	}
	for _, err := range slotSettingErrors(a.policy.Set(), a.cfg.Rotation.Slots) {
		a.log.Warn("rotation settings name no slot of the policy", zap.Error(err))
	}
	sched, err := rotation.NewScheduler(rot, rotation.SchedulerOptions{
		Calendars:  cals,
		RetryAfter: a.cfg.Rotation.RetryAfter,
		Timeout:    rotationTimeout,
		Options: func(slot string) (rotation.RotateOptions, error) {
			// No reason: the scheduler writes "scheduled, due <time>".
			return a.rotateOptions(slot, "", "scheduler")
		},
	})
	if err != nil {
		return err
	}
	a.sched = sched // started by startScheduler, once New can no longer fail
	if err := rotation.CopyEvidencePublicKey(a.cfg.DataDir, "evidence.pub", rot.EvidencePublicKey()); err != nil {
		a.log.Warn("could not write the evidence public key", zap.Error(err))
	}
	return nil
}

// startScheduler runs the rotation calendar's scheduler until Shutdown.
func (a *Agent) startScheduler() {
	if a.sched == nil {
		return
	}
	sched := a.sched
	a.goUntilShutdown(func(ctx context.Context) {
		if err := sched.Run(ctx); err != nil && ctx.Err() == nil {
			a.log.Error("rotation scheduler stopped", zap.Error(err))
		}
	})
}

// evidenceKeyError marks a lost evidence key, or a public key file of
// another key, as the operator's to resolve (IsConfigError): every start
// fails the same way until the key is restored or the old public key is
// moved aside, so a supervisor should not restart the agent on it.
func evidenceKeyError(err error) error {
	if errors.Is(err, rotation.ErrEvidenceKeyLost) || errors.Is(err, rotation.ErrEvidenceKeyMismatch) {
		return &configError{err}
	}
	return err
}

// servable reports whether v's key signs here now: served, under v's kid.
// An accepted version whose key was lost (adopt logs it at start) is not.
func (a *Agent) servable(v rotation.Version) error {
	e := a.keys.entry(v.Key)
	switch {
	case e == nil:
		return fmt.Errorf("key %s is not served (see the agent's log at start): %w", v.Key, providers.ErrUnavailable)
	case e.info.KID != v.KID:
		return fmt.Errorf("key %s now has kid %s, the version was recorded with %s: %w", v.Key, e.info.KID, v.KID, providers.ErrUnavailable)
	}
	return nil
}

// adopt serves again a key version generated before a restart.
func (a *Agent) adopt(ctx context.Context, v rotation.Version) error {
	for _, p := range a.keys.providers {
		if p.ID() != v.Provider {
			continue
		}
		var info providers.KeyInfo
		var err error
		switch pp := p.(type) {
		case *software.Provider:
			info, err = pp.Adopt(v.Key, v.KeyType)
		case *pkcs11.Provider:
			info, err = pp.AddKey(ctx, pkcs11.KeyConfig{Name: v.Key, URI: v.URI})
		case versionedKeys:
			info, err = pp.AddKey(ctx, v.Key, v.URI)
		default:
			return fmt.Errorf("provider %s cannot serve generated keys again", p.ID())
		}
		if err != nil {
			return err
		}
		if info.KID != v.KID {
			return fmt.Errorf("key %s has kid %s, the rotation recorded %s", v.Key, info.KID, v.KID)
		}
		_, err = a.keys.add(info, p)
		return err
	}
	return fmt.Errorf("no provider %q in the configuration", v.Provider)
}

// enrollSlots records each slot of set that the rotation store does not
// know yet, with its configured key as version 1; a slot it knows keeps its
// stored versions.
func (a *Agent) enrollSlots(ctx context.Context, store *rotation.Store, set *policy.Set) error {
	for _, s := range set.AllSlots() {
		e := a.keys.entry(s.Key)
		if e == nil {
			continue // checkSlotKeys refused this already
		}
		if _, err := store.Enroll(ctx, s.FullName(), e.info, "config"); err != nil {
			if errors.Is(err, rotation.ErrSlotExists) {
				a.log.Info("slot has rotated since its configured key; the stored versions decide", zap.String("slot", s.FullName()))
				continue
			}
			return fmt.Errorf("enroll slot %s: %w", s.FullName(), err)
		}
	}
	return nil
}

// keyMaker adapts providers that can generate keys to rotation.KeyMaker; the
// PKCS#11 one also tells the rotation the new key's URI (for restarts).
type pkcs11Maker struct{ *pkcs11.Provider }

func (m pkcs11Maker) GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	return m.Provider.GenerateKey(ctx, name, kt, name, nil)
}

// versionedKeys is a cloud provider: a rotation makes a new version of the
// key behind the active one (GCP CreateCryptoKeyVersion, Azure CreateKey on
// the same name) or a new key behind its alias (AWS); URI and AddKey let a
// restart serve it again.
type versionedKeys interface {
	NewVersion(ctx context.Context, base, name string) (providers.KeyInfo, error)
	URI(name string) (string, error)
	AddKey(ctx context.Context, name, locator string) (providers.KeyInfo, error)
}

// cloudMaker makes the next version of the key that base names.
type cloudMaker struct {
	p    versionedKeys
	base string
}

func (m cloudMaker) GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	info, err := m.p.NewVersion(ctx, m.base, name)
	if err == nil && info.Type != kt {
		return info, fmt.Errorf("the key service made a %s key, the slot uses %s", info.Type, kt)
	}
	return info, err
}

// rotateOptions are the options of a rotation of slot: the new version is
// the slot's next_key, or is made by the provider of the active one. An
// error is a fault of the configuration or of the agent's state, not of
// the request: UNAVAILABLE, the reason in its text. The options returned
// with it carry the reason, peer and policy hash, for the failure's record
// (Rotator.FailStart).
func (a *Agent) rotateOptions(slot, reason, peer string) (rotation.RotateOptions, error) {
	o := rotation.RotateOptions{Reason: reason, Peer: peer, Canaries: a.cfg.Rotation.Canaries}
	if tenant, _, err := rotation.SplitSlot(slot); err == nil && a.policy != nil {
		o.PolicyHash, _ = a.policy.Set().TenantHash(tenant)
	}
	v, err := a.rot.Store().Resolve(slot)
	if err != nil {
		return o, err
	}
	e := a.keys.entry(v.Key)
	if e == nil {
		return o, fmt.Errorf("active key %s is not served: %w", v.Key, providers.ErrUnavailable)
	}
	o.Signer = e.provider
	switch pp := e.provider.(type) {
	case *software.Provider:
		o.Maker = &destroyingMaker{servingMaker{a: a, p: pp, gen: pp}, pp}
	case *pkcs11.Provider:
		o.Maker = &locatingDestroyingMaker{destroyingMaker{servingMaker{a: a, p: pp, gen: pkcs11Maker{pp}}, pp}, pp}
	case versionedKeys:
		serving := servingMaker{a: a, p: e.provider, gen: cloudMaker{pp, v.Key}}
		if d, ok := pp.(rotation.KeyDestroyer); ok {
			// The cloud providers: a failed attempt's key or version is
			// scheduled for deletion (AWS), destroyed (GCP) or disabled
			// (Azure), not left enabled, billed and counted against quotas.
			o.Maker = &locatingDestroyingMaker{destroyingMaker{serving, d}, pp}
		} else {
			o.Maker = &locatingMaker{serving, pp}
		}
	}
	sc := a.cfg.Rotation.Slots[slot]
	o.Subject = sc.Subject.name(slot)
	if sc.NextKey != "" {
		next := a.keys.entry(sc.NextKey)
		if next == nil {
			// The start refuses this (nextKeyErrors); the keys served do
			// not change while the agent runs.
			return o, fmt.Errorf("rotation.slots[%s].next_key %q is not served by any provider: %w", slot, sc.NextKey, providers.ErrUnavailable)
		}
		used := false
		if sl, ok := a.rot.Store().Get(slot); ok {
			for _, v := range sl.Versions {
				used = used || v.KID == next.info.KID
			}
		}
		if !used {
			info := next.info
			o.NextKey, o.Maker = &info, nil
			o.Signer = next.provider
		}
	}
	if o.NextKey == nil && o.Maker == nil {
		// A pre-provisioned next key needs no generation; anything else does.
		return o, fmt.Errorf("provider %s cannot generate keys: %w", e.provider.ID(), providers.ErrUnavailable)
	}
	return o, nil
}

// servingMaker generates a key and at once serves it, so the canaries (and
// then clients) can sign with it through the agent's keyring.
type servingMaker struct {
	a   *Agent
	p   providers.Provider
	gen rotation.KeyMaker
}

func (m *servingMaker) GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	info, err := m.gen.GenerateKey(ctx, name, kt)
	if err != nil {
		return info, err
	}
	_, err = m.a.keys.add(info, m.p)
	return info, err
}

// locatingMaker is a servingMaker whose provider names keys by URI
// (rotation.KeyLocator), so a restart can find the key again.
type locatingMaker struct {
	servingMaker
	loc rotation.KeyLocator
}

func (m *locatingMaker) URI(name string) (string, error) { return m.loc.URI(name) }

// destroyingMaker is a servingMaker whose provider can destroy a key it
// generated (rotation.KeyDestroyer): the key of a rotation attempt that
// failed before its cut-over.
type destroyingMaker struct {
	servingMaker
	d rotation.KeyDestroyer
}

// DestroyKey keeps a key the agent serves for anything but the attempt's
// key name (a configured key, a version), then stops serving it and
// destroys it.
func (m *destroyingMaker) DestroyKey(ctx context.Context, name string, check func(providers.KeyInfo) error) error {
	return m.d.DestroyKey(ctx, name, func(info providers.KeyInfo) error {
		// By public key, not by kid: a kid hashes the key's name too, so
		// the same key adopted under another name has another kid.
		if other := m.a.keys.servingAs(info.SPKI, name); other != "" {
			return fmt.Errorf("%w: the agent serves it as %s", rotation.ErrKeyInUse, other)
		}
		if e := m.a.keys.entry(name); e != nil && e.info.KID != info.KID {
			return fmt.Errorf("%w: the agent serves another key under its name", rotation.ErrKeyInUse)
		}
		if err := check(info); err != nil {
			return err
		}
		m.a.keys.remove(name, info.KID)
		return nil
	})
}

// locatingDestroyingMaker is a destroyingMaker whose provider names keys
// by URI (PKCS#11, the cloud providers).
type locatingDestroyingMaker struct {
	destroyingMaker
	loc rotation.KeyLocator
}

func (m *locatingDestroyingMaker) URI(name string) (string, error) { return m.loc.URI(name) }

// rotationOp answers the Rotate and Rollback admin operations.
func (c *conn) rotationOp(req *proto.Request, resp *proto.Response) error {
	if c.a.rot == nil {
		return &proto.Error{Code: proto.BadRequest, Msg: "rotation needs a policy file and the audit journal"}
	}
	slot := req.Key
	if _, _, err := rotation.SplitSlot(slot); err != nil {
		return &proto.Error{Code: proto.BadRequest, Msg: "name the slot as tenant/slot"}
	}
	ctx, cancel := context.WithTimeout(c.ctx, rotationTimeout)
	defer cancel()
	peer := c.peer.String()
	if req.Op == proto.OpRollback {
		o := rotation.RollbackOptions{Reason: "manual", Peer: peer, Servable: c.a.servable}
		if tenant, _, _ := rotation.SplitSlot(slot); c.a.policy != nil {
			o.PolicyHash, _ = c.a.policy.Set().TenantHash(tenant)
		}
		v, err := c.a.rot.Rollback(ctx, slot, o)
		if err != nil {
			return rotationError(err)
		}
		resp.KID = v.KID
		resp.Msg = fmt.Sprintf("%s rolled back: version %d (kid %s) active", slot, v.Number, v.KID)
		return nil
	}
	if req.Op == proto.OpRotate && req.At != 0 {
		at, err := requestTime("rotate "+slot, req.At, "not in the future")
		if err != nil {
			return err
		}
		if err := c.a.sched.RotateAt(ctx, slot, at, peer); err != nil {
			return rotationError(err)
		}
		resp.Msg = fmt.Sprintf("%s: rotation scheduled for %s", slot, at.UTC().Format(time.RFC3339))
		return nil
	}
	reason := "manual"
	if req.Op == proto.OpIncidentDrill {
		reason = "incident drill"
	}
	o, err := c.a.rotateOptions(slot, reason, peer)
	if err != nil {
		// Journaled like any failed rotation, and the caller told why.
		return rotationError(c.a.rot.FailStart(ctx, slot, o, err))
	}
	if req.Op == proto.OpIncidentDrill {
		o.Emergency = true
		defer c.a.drillUnderWay(slot)()
		rep, err := c.a.rot.Drill(ctx, slot, pauser{a: c.a, by: "incident drill by " + c.peer.String(), own: new(uint64)}, o)
		if err != nil {
			return rotationError(err)
		}
		resp.KID = rep.Rotation.New.KID
		ending := "resumed"
		switch {
		case rep.WasPaused:
			ending = "left paused, as it was before the drill"
		case rep.PausedMeanwhile:
			ending = "left paused: it was paused again during the drill"
		}
		resp.Msg = fmt.Sprintf("%s drilled: paused, rotated to version %d (kid %s), canaries verified, %s; journal records %d..%d; statement %s",
			slot, rep.Rotation.New.Number, rep.Rotation.New.KID, ending, rep.FirstSeq, rep.LastSeq, rep.StatementFile)
		return nil
	}
	res, err := c.a.rot.Rotate(ctx, slot, o)
	if err != nil {
		return rotationError(err)
	}
	resp.KID = res.New.KID
	resp.Msg = fmt.Sprintf("%s rotated: version %d (kid %s) active, version %d accepted until %s; evidence pack %d",
		slot, res.New.Number, res.New.KID, res.Old.Number, res.Old.T1.UTC().Format(time.RFC3339), res.REP)
	return nil
}

// rotationError gives a rotation's refusal its code and the reason as the
// reply's text. What it does not name gets its code from codeOf
// (rotation.WireCode): a request refused for what it asks
// (rotation.ErrBadRequest) is BAD_REQUEST and its text the reply's, while
// faults (the journal, a provider) keep theirs.
func rotationError(err error) error {
	switch {
	case errors.Is(err, rotation.ErrNotFound):
		return &proto.Error{Code: proto.NotFound, Msg: err.Error()}
	case errors.Is(err, rotation.ErrKeyRetired):
		return &proto.Error{Code: proto.KeyRetired, Msg: err.Error()}
	case errors.Is(err, policy.ErrSlotNotFound):
		// A drill's pause of a slot the rotation state keeps and the
		// policy no longer has (a reload dropped it).
		return &proto.Error{Code: proto.NotFound, Msg: err.Error() + " (the policy in force has no such slot)"}
	}
	return err
}

// exportREP returns a stored evidence pack: its manifest and signature.
func (c *conn) exportREP(req *proto.Request, resp *proto.Response) error {
	if c.a.rot == nil {
		return &proto.Error{Code: proto.BadRequest, Msg: "rotation needs a policy file and the audit journal"}
	}
	store := c.a.rot.Store()
	n := int(req.Limit)
	if req.Limit == proto.LimitOutOfRange {
		// Every number from 2^32-1 up reads so; no pack is numbered that high.
		return &proto.Error{Code: proto.NotFound, Msg: fmt.Sprintf("no evidence pack numbered %d or more", req.Limit)}
	}
	if n == 0 {
		nums, err := store.REPNumbers(c.ctx, req.Key)
		if err != nil {
			return rotationError(err)
		}
		if len(nums) == 0 {
			return &proto.Error{Code: proto.NotFound, Msg: "no evidence pack for " + quoteShort(req.Key)}
		}
		n = nums[len(nums)-1]
	}
	manifest, sig, err := store.REP(req.Key, n)
	if err != nil {
		return rotationError(err)
	}
	// The evidence public key with every reply: rep export writes it
	// where the statements' verify command looks for it. Clients that
	// predate it ignore the field.
	resp.Pub, err = x509.MarshalPKIXPublicKey(c.a.rot.EvidencePublicKey())
	if err != nil {
		return err
	}
	off := req.FromSeq
	if off == 0 && len(manifest) <= repChunk {
		resp.Records = [][]byte{manifest, sig}
		return nil
	}
	// A manifest past one reply (an RSA-4096 slot's 100 canaries are 73
	// KiB) goes in parts: from byte off, with "LENGTH NUMBER" beside it so
	// the client asks on for the same pack.
	if off >= uint64(len(manifest)) {
		return &proto.Error{Code: proto.BadRequest, Msg: fmt.Sprintf("offset %d is past the manifest's %d bytes", off, len(manifest))}
	}
	end := min(off+repChunk, uint64(len(manifest)))
	resp.Records = [][]byte{manifest[off:end], sig, []byte(fmt.Sprintf("%d %d", len(manifest), n))}
	return nil
}

// repChunk is the most of a manifest one ExportREP reply carries: the
// client's frame is 64 KiB.
const repChunk = proto.DefaultMaxFrame - 4<<10
