package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// JournalConfig configures the audit journal.
type JournalConfig struct {
	// Dir is the journal's Pebble directory (default DataDir/journal).
	Dir string `yaml:"dir"`
	// Mode: "wal" (default: every record written to the kernel, in the
	// journal's tail log and then Pebble, before its signature is
	// released; survives a killed agent), "fsync" (Pebble's WAL also
	// synced to disk, concurrent signers sharing each sync; survives a power
	// cut) or "off" (no audit: for benchmarks only, logged loudly).
	Mode string `yaml:"mode"`
	// Retention deletes records older than this, checked every hour (or
	// every tenth of the retention, if shorter); 0, the default, keeps
	// every record. The chain stays verifiable (docs/audit.md, Retention).
	Retention time.Duration `yaml:"retention"`
}

// minRetention guards against a unit slip ("90" read as 90ns) deleting
// the audit trail as fast as it is written.
const minRetention = time.Minute

func (j *JournalConfig) validate() error {
	switch j.Mode {
	case "", "wal", "fsync", "off":
	default:
		return fmt.Errorf("journal.mode %q: want wal, fsync or off", j.Mode)
	}
	if j.Retention != 0 && j.Retention < minRetention {
		return fmt.Errorf("journal.retention %v: want 0 (keep every record) or at least %v", j.Retention, minRetention)
	}
	return nil
}

func openJournal(cfg *Config, log *zap.Logger, fs vfs.FS) (*journal.Journal, error) {
	if cfg.Journal.Mode == "off" {
		log.Warn("audit journal is OFF: signatures are released without audit records, and daily quota counts and run-time pauses do not outlive a restart (benchmarks only)")
		return nil, nil
	}
	d, err := journal.ParseDurability(cfg.Journal.Mode)
	if err != nil {
		return nil, err
	}
	dir := cfg.Journal.Dir
	if dir == "" {
		dir = filepath.Join(cfg.DataDir, "journal")
	}
	// Records name tenants, peers and keys, and a writer could cut them.
	if err := software.PrivateDir(dir); err != nil {
		return nil, fmt.Errorf("audit journal: %w", err)
	}
	j, err := journal.Open(journal.Options{Dir: dir, Durability: d, Logger: log.Named("journal"), FS: fs})
	if errors.Is(err, journal.ErrInUse) {
		// Most likely a second agent on one data dir: the operator's to
		// settle. The journal's own words would name dir a second time.
		return nil, &journalInUseError{dir}
	}
	if errors.Is(err, journal.ErrNewerFormat) {
		// A rollback onto a journal a newer sigil wrote: no restart cures
		// it, so a supervisor should not retry (IsConfigError). The
		// journal's words name dir.
		return nil, &configError{fmt.Errorf("audit journal: %w", err)}
	}
	if err != nil {
		return nil, fmt.Errorf("audit journal %s: %w", dir, err)
	}
	seq, _ := j.Head()
	log.Info("audit journal open", zap.String("dir", dir), zap.Stringer("mode", d), zap.Uint64("head_seq", seq))
	return j, nil
}

// journalInUseError is a start refused because another process holds the
// journal's lock.
type journalInUseError struct{ dir string }

func (e *journalInUseError) Error() string {
	return "audit journal " + e.dir + " is in use by another process: is another agent running on this data dir? Stop it, or give this one a data_dir of its own"
}

func (e *journalInUseError) Unwrap() error { return journal.ErrInUse }

// startRetention runs the journal's retention in the background when
// journal.retention is set; Shutdown stops it before closing the journal.
func (a *Agent) startRetention() {
	keep := a.cfg.Journal.Retention
	if a.journal == nil || keep <= 0 {
		return
	}
	every := min(time.Hour, keep/10)
	a.log.Info("audit journal retention on", zap.Duration("retention", keep), zap.Duration("every", every))
	started := time.Now()
	first := true
	a.every(every, true, func(ctx context.Context) {
		now, ok := a.retentionTime(time.Now(), started, first)
		first = false
		if ok {
			a.pruneExpired(ctx, now)
		}
	})
}

// retentionTime is the time a retention round at now prunes by (records
// older than it less the retention go), and false when the round must
// prune nothing. started is when retention started; atStart says this is
// the round run then.
//
// At start the time measured since then is nothing to go by, so a clock
// far ahead (an agent started before NTP corrected it) would delete
// almost every record: the first round prunes by the earlier of now and
// the newest record's time when the journal opened, so no record newer
// than the retention before that record goes. Where that time could not
// be read, it prunes nothing; the next round, by the measured time, does.
// Later rounds prune by no later than the start time plus the time
// measured since (notAhead).
func (a *Agent) retentionTime(now, started time.Time, atStart bool) (time.Time, bool) {
	if atStart {
		if !a.retentionFloorOK {
			return now, false
		}
		if floor := a.retentionFloor; !floor.IsZero() && floor.Before(now) {
			return floor, true
		}
		return now, true
	}
	if measured := notAhead(started.Round(0), now.Sub(started), now.Round(0)); measured.Before(now) {
		if ahead := now.Sub(measured); ahead > time.Minute {
			a.log.Warn("the wall clock is ahead of the time measured since retention started (a clock step, or a resumed VM); records are pruned by the measured time",
				zap.Duration("ahead", ahead))
		}
		return measured, true
	}
	return now, true
}

// newestRecordTime reads the time of the journal's newest record (zero for
// an empty journal, or without one), for retention's first round.
func newestRecordTime(ctx context.Context, j *journal.Journal, log *zap.Logger) (time.Time, bool) {
	if j == nil {
		return time.Time{}, true
	}
	last, err := j.Last(ctx, 1, "")
	if err != nil {
		log.Warn("the newest audit record could not be read; retention prunes nothing at start", zap.Error(err))
		return time.Time{}, false
	}
	if len(last) == 0 {
		return time.Time{}, true
	}
	return last[0].Time, true
}

// notAhead returns now, or startWall plus the time measured since then
// (monotonic) when that is earlier. A deletion by age must not trust a
// wall clock that jumped forward: one round with the clock a year ahead
// would delete a year of records, every one written minutes before. The
// bias keeps records: after a VM suspend the measured time lags and fewer
// are deleted until the agent restarts.
func notAhead(startWall time.Time, elapsed time.Duration, now time.Time) time.Time {
	if measured := startWall.Add(elapsed); measured.Before(now) {
		return measured
	}
	return now
}

// pruneExpired deletes the records older than the retention at now.
func (a *Agent) pruneExpired(ctx context.Context, now time.Time) {
	keep := a.cfg.Journal.Retention
	res, err := a.pruneJournal(ctx, now.Add(-keep), "agent (journal.retention "+keep.String()+")")
	switch {
	case err != nil && ctx.Err() != nil:
	case err != nil:
		a.log.Error("audit journal retention failed; records are kept", zap.Error(err))
	case res.Deleted > 0:
		a.log.Info("audit journal retention deleted old records", zap.Uint64("records", res.Deleted),
			zap.Uint64("from_seq", res.FromSeq), zap.Uint64("to_seq", res.ToSeq), zap.Uint64("record_seq", res.RecordSeq))
	}
}

// pruneJournal deletes the records older than before (see journal.Prune)
// and counts them in the metrics.
//
// The day's quota counts are stored with the deletion, in its commit (and
// again after): a restart rebuilds them from the stored counts and the
// records after them, and a prune may delete records the last stored
// counts do not cover, whose signatures a restart would then hand out
// again. In the prune's own commit they pass where it does, on a full
// journal; stored by a commit before it, they were refused there, and the
// prune with them.
func (a *Agent) pruneJournal(ctx context.Context, before time.Time, by string) (journal.PruneResult, error) {
	var counts []journal.StateChange
	if a.policy != nil {
		_, change, err := a.quotaChange()
		if err != nil {
			return journal.PruneResult{}, fmt.Errorf("nothing pruned: the daily quota counts could not be stored: %w", err)
		}
		counts = append(counts, change)
	}
	res, err := a.journal.Prune(ctx, before, by, counts...)
	if err == nil {
		a.metrics.journalPruned.Add(float64(res.Deleted))
		if a.policy != nil {
			if serr := a.storeQuotas(ctx, nil); serr != nil {
				a.log.Warn("daily quota counts not stored after the prune", zap.Error(serr))
			}
		}
	}
	return res, err
}

// signDecision is what the journal records about one Sign request.
type signDecision struct {
	start      time.Time
	target     target // zero when the key was not found
	tenant     string
	policyHash [32]byte
	keyName    string // as requested, when the key was not found
	kid        string // as requested
	alg        providers.Algorithm
	digest     []byte
	code       proto.Code
	// allowed: the policy allowed the request, and so counted it against
	// the slot's daily quota, whatever happened after.
	allowed bool
}

// allowedThenFailed is the detail of a sign record whose request the
// policy allowed and that then failed (the provider, the deadline). A
// key service's throttling (RATE_LIMITED) or refusal (BAD_REQUEST,
// UNSUPPORTED_ALGORITHM) has the code of a policy refusal; the detail
// tells a restart counting the day's quota that the policy counted it.
const allowedThenFailed = "allowed by the policy, then failed"

// record journals a signing decision. For an allowed signature it returns
// the error that must stop the signature's release; a denial whose record
// cannot be written stays a denial (and is logged). ctx ends at the
// request's deadline, not with the connection: a signature made is
// journaled whether or not its client is still there to take it.
func (c *conn) record(ctx context.Context, d *signDecision) error {
	j := c.a.journal
	if j == nil {
		return nil
	}
	// One clock read serves the record's time, its latency and the
	// append's duration: on these VMs a read costs about 50 ns, and the
	// record path made eight.
	now := time.Now()
	r := journal.Record{
		Time:          now,
		Tenant:        d.tenant,
		Slot:          shortName(d.keyName), // the client's own text when the key is unknown
		PolicyHash:    d.policyHash,
		Op:            "sign",
		Algorithm:     d.alg.String(),
		DigestHash:    journal.HashDigest(d.digest),
		Code:          uint16(d.code),
		CodeName:      d.code.String(),
		LatencyMicros: uint32(min(now.Sub(d.start).Microseconds(), 1<<32-1)),
		Peer:          c.peerName,
	}
	if d.allowed && d.code != proto.OK {
		r.Detail = allowedThenFailed
	}
	switch {
	case d.target.slot != nil && d.target.key == nil:
		// Refused before a key was chosen (KEY_RETIRED, say): the slot,
		// and the kid the client asked for.
		r.Slot, r.KID = d.target.slot.FullName(), shortName(d.kid)
	case d.target.slot != nil:
		r.Slot, r.KID, r.Version = d.target.slot.FullName(), d.target.key.info.KID, uint32(d.target.version)
	case d.target.key != nil:
		r.Slot, r.KID = d.target.key.info.Name, d.target.key.info.KID
	}
	// An allowed signature's record shares the request's deadline, and past
	// it the signature is withheld. A refusal's has the journal's own bound,
	// whatever is left of the request's: a deadline is the usual cause of a
	// refusal, and one that ran out between a check here and the journal's
	// own (a refusal decided microseconds before it) failed the append and
	// left the refusal unrecorded. No timer unless the append has to wait.
	if d.code != proto.OK {
		own := newRequestContext(context.Background(), now.Add(journalAppendTimeout))
		defer own.release()
		ctx = own
	}
	err := j.Append(ctx, &r)
	c.a.metrics.journalAppended(time.Since(now), err)
	if err == nil && d.code == proto.OK && ctx.Err() != nil {
		// Committed by this goroutine (nobody else was committing), which
		// nothing interrupts: the record landed after the request's
		// deadline. Withheld then, as when a queued commit outlives it.
		err = fmt.Errorf("the record was committed after the request's deadline: %w", ctx.Err())
	}
	if err != nil {
		c.log.Warn("audit journal append failed", zap.Stringer("decision", d.code), zap.Error(err))
		if d.code == proto.OK {
			return &proto.Error{Code: proto.JournalUnavailable, Msg: "the audit journal could not record this signature, so it was not released"}
		}
	}
	return nil
}

// journalAppendTimeout bounds one audit write; past it the signature is
// withheld with JOURNAL_UNAVAILABLE.
const journalAppendTimeout = 5 * time.Second

// String names the peer in records and logs, as valid UTF-8 (a CN may not
// be; see shortName).
func (p peer) String() string {
	if p.unix {
		return "uid:" + strconv.FormatUint(uint64(p.uid), 10) + " gid:" + strconv.FormatUint(uint64(p.gid), 10)
	}
	if p.name != "" {
		return strings.ToValidUTF8(p.name, "\uFFFD")
	}
	if p.cert != "" {
		return p.cert
	}
	return p.addr
}
