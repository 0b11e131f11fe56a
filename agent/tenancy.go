package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
)

// Without a policy file the agent is single-tenant: whoever can open its
// socket (0600, so its owner and root) may use every key, and requests name
// keys. With one, every peer must map to a tenant, requests name that
// tenant's key slots, and each Sign passes the slot's policy first.

// target is what a request's key name or kid resolved to.
type target struct {
	key  *keyEntry
	slot *policy.Slot // nil in single-tenant mode
	// version is the slot's key version key is, with rotation on (0: none
	// recorded, as without rotation).
	version int
}

// name is what replies call the key: the slot's name within its tenant, or
// the key's name in single-tenant mode.
func (t target) name() string {
	if t.slot != nil {
		return t.slot.Name
	}
	return t.key.info.Name
}

func (c *conn) identity() policy.Identity {
	if c.peer.unix {
		return policy.UnixIdentity(c.peer.uid, c.peer.gid)
	}
	return policy.MTLSIdentity(c.peer.name)
}

var errUnknownPeer = &proto.Error{Code: proto.Unauthenticated, Msg: "this peer is not mapped to any tenant"}

// tenant is the peer's tenant under the policy in force now, so a mapping
// removed by a reload takes effect on the next request.
func (c *conn) tenant() (string, error) {
	if c.a.policy == nil {
		return "", nil
	}
	t, ok := c.a.policy.Set().TenantOf(c.identity())
	if !ok {
		return "", errUnknownPeer
	}
	return t, nil
}

// resolve finds the key a request names. A tenant sees only its own slots:
// another tenant's slot is NOT_FOUND with the same message as a missing one.
// With rotation, a slot's active version signs; for verify, a kid may also
// name an accepted version before its T1 (after it: KEY_RETIRED).
func (c *conn) resolve(name, kid string, verify bool) (target, string, error) {
	if c.a.policy == nil {
		e, err := c.a.keys.lookup(name, kid)
		return target{key: e}, "", err
	}
	tenant, err := c.tenant()
	if err != nil {
		return target{}, "", err
	}
	set := c.a.policy.Set()
	name = strings.TrimPrefix(name, tenant+"/")
	var slot *policy.Slot
	switch {
	case name != "":
		s, ok := set.Slot(tenant, name)
		if !ok {
			return target{}, tenant, &proto.Error{Code: proto.NotFound, Msg: "no key slot named " + quoteShort(name)}
		}
		slot = s
	case kid != "":
		var also []string // other slots with the kid
		for _, s := range set.Slots(tenant) {
			if _, _, err := c.slotKey(s, kid, true); err == nil || codeOf(err) == proto.KeyRetired {
				if slot == nil {
					slot = s
				} else {
					also = append(also, s.Name)
				}
				if verify {
					break // the same public key whichever slot: no policy applies
				}
			}
		}
		if slot == nil {
			return target{}, tenant, &proto.Error{Code: proto.NotFound, Msg: "no key slot with kid " + quoteShort(kid)}
		}
		if len(also) > 0 {
			// Two slots may share a key under different policies: a kid
			// alone cannot say whose policy applies, so it must not pick.
			return target{}, tenant, &proto.Error{Code: proto.BadRequest, Msg: fmt.Sprintf(
				"kid %s is the key of %d key slots (%s, %s): name the slot", quoteShort(kid), len(also)+1, slot.Name, strings.Join(also, ", "))}
		}
	default:
		return target{}, tenant, &proto.Error{Code: proto.NotFound, Msg: "name a key slot: there is no default slot"}
	}
	e, version, err := c.slotKey(slot, kid, verify)
	if err != nil {
		// The slot is known (a retired kid, an unserved version): the
		// refusal's audit record names it.
		return target{slot: slot}, tenant, err
	}
	return target{key: e, slot: slot, version: version}, tenant, nil
}

// slotKey is the key of slot that the request may use: without rotation
// the configured key; with it, the active version (or, to verify, the
// version with kid while it is not retired).
func (c *conn) slotKey(slot *policy.Slot, kid string, verify bool) (*keyEntry, int, error) {
	keyName := slot.Key
	wantKID := "" // with rotation: the kid the version was recorded with
	version := 0
	if c.a.rot != nil {
		store := c.a.rot.Store()
		v, err := store.Resolve(slot.FullName())
		if err != nil {
			return nil, 0, err
		}
		if kid != "" && v.KID != kid {
			if !verify {
				// The request may have named the slot as well as the kid
				// (a Go client's Signer does): the kid is what to drop.
				switch _, verr := store.VersionForVerify(slot.FullName(), kid, time.Now()); {
				case verr == nil:
					return nil, 0, &proto.Error{Code: proto.KeyRetired, Msg: "that key version verifies only: the slot signs with another version now; name the slot and no kid to sign with that one"}
				case errors.Is(verr, rotation.ErrKeyRetired):
					// A version of the slot still, as Verify answers: not
					// NOT_FOUND, which would say the slot has no such kid.
					return nil, 0, &proto.Error{Code: proto.KeyRetired, Msg: "that key version is retired: it neither signs nor verifies; name the slot and no kid to sign with the slot's current version"}
				}
				return nil, 0, rotationError(rotation.ErrNotFound)
			}
			if v, err = store.VersionForVerify(slot.FullName(), kid, time.Now()); err != nil {
				return nil, 0, rotationError(err)
			}
		}
		keyName, wantKID, version = v.Key, v.KID, v.Number
	} else if kid != "" {
		if e := c.a.keys.entry(keyName); e == nil || e.info.KID != kid {
			return nil, 0, &proto.Error{Code: proto.NotFound, Msg: "no key slot with kid " + quoteShort(kid)}
		}
	}
	e := c.a.keys.entry(keyName)
	if e == nil {
		// Load, reload and restart refuse such a state; reaching here is a bug.
		return nil, 0, fmt.Errorf("slot %s names key %q, which no provider serves", slot.FullName(), keyName)
	}
	if wantKID != "" && e.info.KID != wantKID {
		// The key name now resolves to other material, e.g. a cloud key
		// configured as "latest" or by alias, which a rotation moved on:
		// signing with it would sign as another version (setupRotation
		// logged it at start). Fail closed.
		return nil, 0, &proto.Error{Code: proto.Unavailable, Msg: "this key version is not served: its key name now resolves to another key (see the agent's log)"}
	}
	return e, version, nil
}

// listKeys is the ListKeys reply: the tenant's slots whose clients admit
// the caller, or every key.
func (c *conn) listKeys() ([]proto.KeyEntry, error) {
	if c.a.policy == nil {
		return c.a.keys.listWithCerts(), nil
	}
	tenant, err := c.tenant()
	if err != nil {
		return nil, err
	}
	slots := c.a.policy.Set().Slots(tenant)
	out := make([]proto.KeyEntry, 0, len(slots))
	id := c.identity()
	for _, s := range slots {
		if !s.Admits(id) {
			// Not a key this caller may use: the ssh-agent socket and
			// the PKCS#11 module would offer it, and every Sign with
			// it be PERMISSION_DENIED.
			continue
		}
		if e, _, err := c.slotKey(s, "", false); err == nil {
			cert := c.a.keys.cert(e.info.Name)
			out = append(out, proto.KeyEntry{Name: s.Name, KID: e.info.KID, Provider: e.info.Provider, KeyType: string(e.info.Type),
				Pub: e.info.SPKI, Cert: cert.leaf, Chain: cert.chain})
		}
	}
	return out, nil
}

// reasonCode maps a policy denial to its wire code; the names are the same.
func reasonCode(r policy.Reason) proto.Code {
	if code, ok := proto.ParseCode(r.String()); ok {
		return code
	}
	return proto.PermissionDenied
}

// isAdmin: the admin socket serves the policy's admins, or without a policy
// the agent's own user and root.
func (c *conn) isAdmin() bool {
	if c.a.policy != nil {
		return c.a.policy.Set().IsAdmin(c.identity())
	}
	return c.peer.unix && (c.peer.uid == 0 || int(c.peer.uid) == os.Getuid())
}

// checkSlotKeys refuses a policy whose slots name keys no provider serves.
func checkSlotKeys(set *policy.Set, kr *keyring) error {
	return slotKeysError(set, kr.serves)
}

// slotKeysError names each key that a slot of set names (its key, each
// listed version's) and served says no provider serves, each once per
// slot. The start and a reload ask the keyring; `sigil agent --check`,
// without one, the config's keys, which are what the start's keyring
// holds, so that --check refuses what the start would, in its words.
func slotKeysError(set *policy.Set, served func(name string) bool) error {
	var errs []error
	for _, s := range set.AllSlots() {
		named := map[string]bool{}
		keys := []string{s.Key}
		for _, v := range s.Versions {
			keys = append(keys, v.Key)
		}
		for _, k := range keys {
			if k != "" && !named[k] && !served(k) {
				errs = append(errs, fmt.Errorf("slot %s: key %q is not served by any provider", s.FullName(), k))
			}
			named[k] = true
		}
	}
	return errors.Join(errs...)
}

// ReloadPolicy re-reads the policy file (the config's, as of the last Reload,
// which reads the config again). A policy that fails validation is
// refused and the one in force stays; the error says why.
func (a *Agent) ReloadPolicy() error {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	return a.reloadPolicy("")
}

// reloadPolicy is ReloadPolicy with reloadMu held; by is who asked (reload).
func (a *Agent) reloadPolicy(by string) error {
	if by != "" {
		by = ", by " + by
	}
	if a.policy == nil {
		return errors.New("the agent runs without a policy file (single-tenant mode)")
	}
	set, err := policy.Load(a.policyFile)
	if err != nil {
		err = fmt.Errorf("policy: %w", err)
	} else {
		err = checkSlotKeys(set, a.keys)
	}
	if err == nil {
		// As at start: a reload that dropped or renamed a slot ssh_keys
		// names would leave the ssh-agent socket offering less, silently.
		err = sshKeysError(a.cfg, set, a.keys.serves)
	}
	if err == nil && a.rot != nil {
		// A slot new to the agent gets its version 1 before it is in force:
		// with rotation on, a slot the store does not know cannot sign.
		err = a.enrollSlots(context.Background(), a.rot.Store(), set)
	}
	if err == nil {
		// The stored pauses' read, the drills' check and the swap are one
		// step under pauseMu, which pauses, resumes and drills take: a
		// pause made between the read and the swap was lost in memory, and
		// a drill begun between the check and the swap found its slot
		// paused by the file it then unpaused (reviewer BT).
		a.pauseMu.Lock()
		err = a.swapPolicyLocked(set)
		a.pauseMu.Unlock()
	}
	if err != nil {
		a.log.Warn("policy reload refused; the current policy stays in force", zap.Error(err))
		a.journalEvent("reload-policy", "", proto.BadRequest, "refused"+by+": "+firstLine(err.Error()))
		return err
	}
	a.log.Info("policy reloaded", zap.String("hash", set.HashHex()))
	a.journalEvent("reload-policy", "", proto.OK, "policy "+set.HashHex()+by)
	if a.journal != nil {
		// A slot this reload dropped keeps its day's count only in memory
		// until the next snapshot; a crash before it would give the count
		// back when a later reload restores the slot.
		ctx, cancel := context.WithTimeout(context.Background(), journalAppendTimeout)
		if err := a.storeQuotas(ctx, nil); err != nil {
			a.log.Warn("daily quota counts not stored after the reload", zap.Error(err))
		}
		cancel()
	}
	return nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " …"
	}
	return s
}

// eventRecord is the audit record of an operator action.
func (a *Agent) eventRecord(op, slot string, code proto.Code, detail string) journal.Record {
	return journal.Record{Op: op, Slot: slot, Code: uint16(code), CodeName: code.String(), Detail: detail, Peer: "agent"}
}

// journalEvent records an operator action. Failing to record one is logged;
// the action itself has happened.
func (a *Agent) journalEvent(op, slot string, code proto.Code, detail string) {
	if a.journal == nil {
		return
	}
	r := a.eventRecord(op, slot, code, detail)
	if err := a.commitWithRecord(&r); err != nil {
		a.log.Warn("audit journal append failed", zap.String("op", op), zap.Error(err))
	}
}

// admitted decides at Hello whether this peer may use this listener.
func (c *conn) admitted() error {
	if c.admin {
		if !c.isAdmin() {
			return &proto.Error{Code: proto.Unauthenticated, Msg: "this peer does not hold the admin role"}
		}
		return nil
	}
	_, err := c.tenant()
	if err != nil && c.tlsAdmin() {
		return nil // an mTLS admin of no tenant: admin operations only
	}
	return err
}

// tlsAdmin reports whether an mTLS peer holds the admin role now. Over
// mTLS one connection serves both roles an identity holds, as the policy's
// admins may overlap tenants' identities and no second listener exists.
func (c *conn) tlsAdmin() bool { return !c.admin && !c.peer.unix && c.isAdmin() }

// admin answers the operator operations, on the admin socket only.
func (c *conn) adminOp(req *proto.Request, resp *proto.Response) error {
	if !c.admin {
		if !c.tlsAdmin() {
			// A peer whose mapping a reload removed learns that, not
			// merely that this op is not its to ask.
			if err := c.admitted(); err != nil {
				return err
			}
			return &proto.Error{Code: proto.PermissionDenied, Msg: req.Op.String() + " needs the admin role (the admin socket, or an mTLS identity in the policy's admins)"}
		}
	} else if !c.isAdmin() {
		// Checked again on every request, as tenant mappings are: a reload
		// that revokes the role ends it on open connections too.
		return &proto.Error{Code: proto.Unauthenticated, Msg: "this peer no longer holds the admin role"}
	}
	switch req.Op {
	case proto.OpRotate, proto.OpRollback, proto.OpIncidentDrill:
		return c.rotationOp(req, resp)
	case proto.OpExportREP:
		return c.exportREP(req, resp)
	case proto.OpPause, proto.OpResume:
		if c.a.policy == nil {
			return &proto.Error{Code: proto.BadRequest, Msg: "pausing needs a policy file: slots are defined there"}
		}
		tenant, slot, ok := strings.Cut(req.Key, "/")
		if !ok || tenant == "" || slot == "" {
			return &proto.Error{Code: proto.BadRequest, Msg: "name the slot as tenant/slot"}
		}
		var err error
		op := "pause"
		p := pauser{a: c.a, by: c.peer.String()}
		rec := c.a.eventRecord(op, req.Key, proto.OK, "by "+c.peer.String())
		if req.Op == proto.OpPause {
			err = p.Pause(tenant, slot, &rec)
		} else {
			op = "resume"
			rec.Op = op
			if c.a.policy.PausedInFile(tenant, slot) {
				rec.Detail = "run-time pause lifted; the policy file still pauses the slot"
			}
			err = p.Resume(tenant, slot, &rec)
		}
		switch {
		case errors.Is(err, policy.ErrSlotNotFound):
			return &proto.Error{Code: proto.NotFound, Msg: "no key slot " + quoteShort(req.Key)}
		case errors.Is(err, errPauseNotStored):
			c.a.journalEvent(op, req.Key, proto.JournalUnavailable, "by "+c.peer.String()+"; in force until a restart: the pause could not be stored")
			return &proto.Error{Code: proto.JournalUnavailable, Msg: "the slot is paused, but the pause could not be stored in the journal: it lasts until the agent restarts"}
		case errors.Is(err, policy.ErrPausedInFile):
			resp.Msg = "the policy file itself pauses this slot: it stays paused until the file says paused: false and is reloaded"
			return nil
		case err != nil:
			return err
		}
		c.log.Info("slot "+op+"d by an admin", zap.String("slot", req.Key))
		return nil
	case proto.OpAuditVerify:
		return c.a.auditVerify(c.ctx, resp)
	case proto.OpAuditPrune:
		return c.a.auditPrune(c.ctx, req.At, c.peer.String(), resp)
	case proto.OpAuditTail:
		recs, err := c.a.auditTail(c.ctx, req.Key, req.FromSeq, int(req.Limit))
		if err != nil {
			return err
		}
		resp.Records = recs
		return nil
	case proto.OpReloadPolicy:
		// What SIGHUP reloads: TLS certificates, keys' certificates, policy.
		if err := c.a.reload(c.peer.String()); err != nil {
			return &proto.Error{Code: proto.BadRequest, Msg: "reload " + err.Error()}
		}
		resp.Msg = "reloaded"
		if c.a.policy != nil {
			resp.Msg = "reloaded; policy " + c.a.policy.Set().HashHex() + " in force"
		}
		return nil
	}
	return &proto.Error{Code: proto.BadRequest, Msg: req.Op.String() + " is not supported by this agent version"}
}

// auditVerifyTimeout bounds a live chain check: it reads every record
// (about a million a second here), while signing goes on.
const auditVerifyTimeout = 10 * time.Minute

// auditVerify recomputes the running agent's chain for `sigil audit verify`
// while the agent serves: the journal's directory is locked by the agent, so
// the offline check cannot read it. ok in the reply says whether the chain is
// intact; msg summarises, or names the first break.
func (a *Agent) auditVerify(ctx context.Context, resp *proto.Response) error {
	if a.journal == nil {
		return &proto.Error{Code: proto.JournalUnavailable, Msg: "the audit journal is off"}
	}
	ctx, cancel := context.WithTimeout(ctx, auditVerifyTimeout)
	defer cancel()
	rep, err := a.journal.Verify(ctx)
	if err != nil {
		a.log.Warn("audit verify failed", zap.Error(err))
		return &proto.Error{Code: proto.Unavailable, Msg: "the audit chain could not be read; see the agent's log"}
	}
	resp.Valid = rep.OK()
	if !rep.OK() {
		resp.Msg = fmt.Sprintf("%d records read; %v", rep.Records, rep.Break)
		return nil
	}
	resp.Msg = journal.Summary(&rep)
	return nil
}

// lastRequestTime is the last second of the year 9999, in Unix seconds.
// The agent's times end there (the rotation state and the journal write
// them as RFC 3339), and past it time.Unix wraps around before
// proto.AtOutOfRange: read as a time, such an at lies in the past.
const lastRequestTime = 253402300799

// requestTime reads a request's at for what ("rotate payments/release",
// "audit prune"). A number past lastRequestTime, proto.AtOutOfRange
// included, is refused as out of range, not for what it would wrap onto;
// a negative one as before 1970, early saying what that means for the
// operation.
func requestTime(what string, at int64, early string) (time.Time, error) {
	switch {
	case at > lastRequestTime:
		return time.Time{}, &proto.Error{Code: proto.BadRequest, Msg: what + ": at is out of range (Unix seconds after the year 9999)"}
	case at < 0:
		return time.Time{}, &proto.Error{Code: proto.BadRequest, Msg: what + ": at is before 1970, " + early}
	}
	return time.Unix(at, 0), nil
}

// auditPrune deletes the records older than the Unix time at, for `sigil
// audit prune`; the prune record names the admin who asked.
func (a *Agent) auditPrune(ctx context.Context, at int64, by string, resp *proto.Response) error {
	if a.journal == nil {
		return &proto.Error{Code: proto.JournalUnavailable, Msg: "the audit journal is off"}
	}
	if at == 0 {
		return &proto.Error{Code: proto.BadRequest, Msg: "audit prune needs a cut-off time"}
	}
	before, err := requestTime("audit prune", at, "older than any record")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, auditVerifyTimeout)
	defer cancel()
	res, err := a.pruneJournal(ctx, before, "admin "+by)
	switch {
	case errors.Is(err, journal.ErrPruneRefused):
		return &proto.Error{Code: proto.Internal, Msg: strings.TrimPrefix(err.Error(), "journal: ")}
	case err != nil:
		a.log.Warn("audit prune failed", zap.Error(err))
		return &proto.Error{Code: proto.JournalUnavailable, Msg: "the audit journal could not be pruned; see the agent's log"}
	}
	resp.Msg = res.String()
	return nil
}

// maxTailRecords caps one AuditTail reply's records, and maxTailBytes their
// JSON: a reply must fit the client's 64 KiB frame, and a record's size is
// partly the client's (a refused request's key name, up to 64 bytes, each
// '<' six in JSON), so 100 records can outgrow it.
const (
	maxTailRecords = 100
	maxTailBytes   = proto.DefaultMaxFrame - 4<<10 // room for the reply's own fields and framing
)

// auditTail reads the running agent's journal for `sigil audit tail`: the
// last n records, or up to n from seq on; fewer when they would not fit a
// reply (maxTailBytes), so a reader pages until a reply is empty.
func (a *Agent) auditTail(ctx context.Context, tenant string, from uint64, n int) ([][]byte, error) {
	if a.journal == nil {
		return nil, &proto.Error{Code: proto.JournalUnavailable, Msg: "the audit journal is off"}
	}
	if n <= 0 || n > maxTailRecords {
		n = maxTailRecords
	}
	var recs []journal.Record
	if from == 0 {
		var err error
		if recs, err = a.journal.Last(ctx, n, tenant); err != nil {
			return nil, err
		}
	} else {
		err := a.journal.Scan(ctx, journal.Filter{FromSeq: from, Tenant: tenant}, func(r *journal.Record) error {
			recs = append(recs, *r)
			if len(recs) >= n {
				return errStopScan
			}
			return nil
		})
		if err != nil && !errors.Is(err, errStopScan) {
			return nil, err
		}
	}
	out := make([][]byte, len(recs))
	size := 0
	// From the newest for a tail (from 0), the oldest when paging on: past
	// maxTailBytes the rest is left out, the oldest of a tail, the newest
	// of a page (the next page starts there).
	for k := range recs {
		i := k
		if from == 0 {
			i = len(recs) - 1 - k
		}
		b, err := recs[i].MarshalJSON()
		if err != nil {
			return nil, err
		}
		if size += len(b) + 8; size > maxTailBytes && k > 0 {
			if from == 0 {
				return out[i+1:], nil
			}
			return out[:i], nil
		}
		out[i] = b
	}
	return out, nil
}

var errStopScan = errors.New("enough records")
