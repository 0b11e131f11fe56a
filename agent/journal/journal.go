package journal

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"go.uber.org/zap"
)

// Durability says when Append may return.
type Durability int

const (
	// WAL: the record was copied into the journal's tail log, a shared
	// memory mapping of a file (tail.go), or, for commits that carry
	// state, written to Pebble's write-ahead log; either way without
	// fsync. It survives a killed process (the kernel has the bytes), not
	// a power cut or kernel crash. The default.
	WAL Durability = iota
	// Fsync: the record's WAL write was also fsynced. Concurrent appends
	// share one commit and so one fsync (group commit).
	Fsync
)

// String returns the configuration name of the mode: "wal" or "fsync".
func (d Durability) String() string {
	switch d {
	case WAL:
		return "wal"
	case Fsync:
		return "fsync"
	default:
		return fmt.Sprintf("Durability(%d)", int(d))
	}
}

// ParseDurability parses a configuration name: "wal" or "fsync".
func ParseDurability(s string) (Durability, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "wal", "":
		return WAL, nil
	case "fsync":
		return Fsync, nil
	default:
		return 0, fmt.Errorf("journal: unknown durability %q (want \"wal\" or \"fsync\")", s)
	}
}

// MarshalText implements encoding.TextMarshaler for configuration files.
func (d Durability) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler for configuration files.
func (d *Durability) UnmarshalText(b []byte) error {
	v, err := ParseDurability(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// Options configure a Journal. The zero value of every field except Dir is
// usable; EnsureDefaults fills them in.
type Options struct {
	// Dir is the Pebble directory. Required; created if missing.
	Dir string
	// Durability is when Append returns. Default WAL.
	Durability Durability
	// Logger receives the journal's and Pebble's log lines. Default: a
	// no-op logger.
	Logger *zap.Logger
	// FS is the filesystem Pebble uses; tests inject faults through it.
	// Default vfs.Default.
	FS vfs.FS
	// Clock stamps records whose Time is zero; it is called from the
	// appending goroutines, concurrently. Default time.Now.
	Clock func() time.Time
	// RecoveryInterval is the least time between two attempts to reopen
	// Pebble after a write failure; appends in between fail at once with
	// ErrUnavailable instead of each paying for an Open. Default 100ms.
	RecoveryInterval time.Duration
	// MemTableSize is Pebble's memtable size. Default 16 MiB: about 50k
	// records between flushes.
	MemTableSize uint64
	// ApplyDelay is how long, in `wal` mode, confirmed records gather in
	// the tail log before the journal commits them to Pebble as one batch
	// (commit.go, "Deferred apply"), and how long after such a commit,
	// when no more records come, it has Pebble's WAL file written with
	// them (applyLoop). Readers never wait for it. Default 2ms.
	ApplyDelay time.Duration
	// MinFreeBytes is the free space the journal keeps on its filesystem:
	// below it, appends fail with ErrUnavailable ("journal full") before
	// Pebble ever meets ENOSPC, because Pebble cannot survive every
	// ENOSPC (one that hits a WAL rotation aborts the process; doc.go,
	// "Failures"). The headroom also lets Pebble flush and compact.
	// Checked at most every 100ms while there is room, on every commit
	// while there is not. Default 64 MiB; negative disables the check.
	MinFreeBytes int64
	// AcceptTailLoss opens a journal whose tail log lacks records it once
	// held (a frame damaged, and no other continuing the chain: records
	// confirmed to signers are lost), which Open otherwise refuses: what
	// can be replayed is, a copy of the tail is kept beside it as
	// journal.tail.lost-<unix ns>, and a journal.lost record naming the
	// lost range is committed after the highest seq the tail shows, so
	// the chain goes on after it and no seq of a released signature is
	// reused. `sigil audit recover`. A tail that disagrees with the store
	// is still refused, and so is a loss larger than the tail file could
	// have held (a forged frame header: maxTailRecords).
	AcceptTailLoss bool
	// ReadOnly opens an existing journal to read it, as `sigil audit
	// verify`, `tail` and `export` do without an agent: Pebble read-only,
	// and nothing written (no tail log started or removed, no checkpoint,
	// no files that another user would own). The tail log's records that
	// Pebble lacks (a killed agent's) are read into memory over it. What
	// a writable Open refuses (a tail log with a gap, or that disagrees
	// with the store; a checkpoint the records disagree with) is taken as
	// far as it can be and reported by Verify. Writes fail with
	// ErrReadOnly.
	ReadOnly bool
}

// ErrInUse is returned by Open when another Journal (an agent, another
// process) has the directory open.
var ErrInUse = errors.New("journal: in use by another process")

// ErrNewerFormat is returned by Open when the directory's journal format
// (the "m/format" entry) is newer than this build reads: a newer sigil
// wrote it, and an older one rolled back onto it would misread its records
// or state. Open returns it before it reads a record or replays the tail
// log: nothing the journal holds is appended, replayed or rewritten.
var ErrNewerFormat = errors.New("journal: written by a newer sigil")

// lockHeld tells a lock another holder has from a lock that could not be
// tried (the LOCK file unreadable, say): fcntl's refusal is a bare errno,
// the file's open a *fs.PathError.
func lockHeld(err error) bool {
	var pathErr *fs.PathError
	if errors.As(err, &pathErr) {
		return false
	}
	return errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EACCES) ||
		strings.Contains(err.Error(), "lock held by current process") // pebble's own, within one process
}

// ErrReadOnly is returned for writes to a journal opened ReadOnly.
var ErrReadOnly = errors.New("journal: opened read-only")

// EnsureDefaults fills in the zero-valued fields with their defaults.
func (o *Options) EnsureDefaults() {
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.FS == nil {
		o.FS = vfs.Default
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.RecoveryInterval <= 0 {
		o.RecoveryInterval = 100 * time.Millisecond
	}
	if o.ApplyDelay <= 0 {
		o.ApplyDelay = 2 * time.Millisecond
	}
	if o.MemTableSize == 0 {
		o.MemTableSize = 16 << 20
	}
	if o.MinFreeBytes == 0 {
		o.MinFreeBytes = 64 << 20
	}
}

var (
	// ErrUnavailable is wrapped by every error that means "the journal
	// could not confirm the write": a Pebble write or sync failure, a full
	// disk, a closed journal, a caller's deadline passing while the commit
	// was pending. The agent maps it to JOURNAL_UNAVAILABLE and releases no
	// signature.
	ErrUnavailable = errors.New("journal unavailable")
	// ErrClosed is returned after Close. It wraps ErrUnavailable.
	ErrClosed = fmt.Errorf("%w: closed", ErrUnavailable)
	// ErrNotFound is returned by Get for a missing state key.
	ErrNotFound = errors.New("journal: state key not found")
)

// Key layout (see doc.go).
const (
	auditPrefix = "a/"
	statePrefix = "s/"
	headKey     = "m/head" // chain-head checkpoint
	formatKey   = "m/format"
	auditKeyLen = len(auditPrefix) + 8
)

// Journal is the hash-chained audit journal and the agent's state store.
// All methods are safe for concurrent use.
type Journal struct {
	opts Options
	log  *zap.Logger
	fs   *walFS
	lock *pebble.Lock // held from Open to Close, across reopens

	// dbMu guards db against a recovery swapping it. Readers hold it
	// shared while they iterate (so a recovery, and Close, wait for a long
	// export to finish); the goroutine holding busy is the only one that
	// writes db, and it reads db without the lock.
	dbMu sync.RWMutex
	db   *pebble.DB // nil while unavailable (after a failure) and after Close

	// mu guards who commits (commit.go, "Who commits"), the queue of
	// appends and state writes waiting, and closing.
	mu      sync.Mutex
	wake    *sync.Cond // wakes the committer goroutine
	busy    bool       // a goroutine is committing; implies it will drain pending
	handoff bool       // busy was handed to the committer goroutine
	pending []*request
	spare   []*request
	closing bool
	done    chan struct{} // closed when the committer goroutine has exited
	stalled atomic.Bool   // Pebble reported a write stall: no inline commits

	// headMu guards the confirmed chain head: the last record of a
	// successful commit. It only moves forward on a successful commit.
	headMu   sync.Mutex
	headSeq  uint64
	headHash [32]byte

	pruneMu sync.Mutex // one Prune at a time

	// nextFullProbe is Healthy's next free-space probe while full, in ns
	// since opened, by the monotonic clock: a wall clock stepped back must
	// not hold the probe off for as long as the step.
	nextFullProbe atomic.Int64
	opened        time.Time // at Open, with its monotonic reading

	// Deferred apply (`wal` mode; commit.go, "Deferred apply"). applyMu
	// serializes applying staged groups to Pebble with every other Pebble
	// write and with every change of db: whoever holds it may use db.
	// stageMu guards the staged batch, which the holder of busy appends to
	// and the applier swaps out. Lock order: applyMu, then stageMu or dbMu.
	applyMu       sync.Mutex
	stageMu       sync.Mutex
	staged        *pebble.Batch // runs of records in the tail log that Pebble lacks yet; nil while db is
	openRun       stagedRun     // the run being staged, which the next apply closes into staged
	stagedRecords int           // records in staged and openRun
	spareStaged   *pebble.Batch // the other staged batch, empty; guarded by applyMu
	applyFailed   atomic.Bool   // applying staged groups failed: db is out of service
	applyKick     chan struct{} // buffered 1: staged went from empty to not
	applyStop     chan struct{} // closed by Close
	applyDone     chan struct{} // closed when the applier goroutine has exited
	// walBuffered: records were applied with NoSync since Pebble's WAL
	// was last written by a commit that waited for it, so its writer may
	// hold them in its buffer, and the tail log is their one copy a kill
	// leaves. The applier has the WAL written once it is idle (applyLoop).
	// Guarded by applyMu.
	walBuffered bool

	// tailID: the mapped tail log's identity (nil without one, and while
	// the committer starts the tail over), which the applier compares with
	// the file at its path. tailMoved: the identity of the tail whose path
	// the applier found holding another file or none; while that is the
	// tail, commits wait for Pebble's WAL, and the next one starts the
	// tail over (tail.go, Journal.tailMovedAway).
	tailID    atomic.Pointer[fileID]
	tailMoved atomic.Pointer[fileID]

	// ReadOnly: the tail log's records Pebble lacks, over db (an indexed
	// batch, never committed), and what Open found in doubt, for Verify.
	overlay   *pebble.Batch
	tailDoubt *ChainBreak

	// headCopy is the head file (headFileName) as Open found it: the
	// checkpoint the last Close wrote beside the store. Set before
	// Pebble is opened and not changed after, so readers need no lock.
	// headCopyErr: the file is there but is not a checkpoint (a
	// ReadOnly journal reports it; a writable Open refuses).
	headCopy    checkpoint
	headCopyErr error

	// Owned by whichever goroutine holds busy (an inline Append or the
	// committer goroutine).
	batch          *pebble.Batch
	tail           *tailLog // `wal` mode only (tail.go); nil while Pebble is closed
	nextReopen     time.Time
	unconfirmed    [2]uint64   // seq range written by a failed commit, to note after recovery
	lost           [2]uint64   // seq range confirmed but not in the store after a reopen, to note
	nextSpace      time.Time   // next free-space check
	nextCheckpoint time.Time   // next "m/head" checkpoint
	full           bool        // the last free-space check found less than MinFreeBytes
	availBytes     uint64      // what the last free-space check found (committer's)
	fullNow        atomic.Bool // full, for Healthy (full belongs to the committer)

	stats struct {
		records, commits, failures, recoveries, full, replayed atomic.Uint64
	}

	// corrupt is the path of the first file Pebble reported corrupt: from
	// then on commits that carry work are refused and Healthy fails.
	corrupt atomic.Pointer[string]
	// bgErrors and corruptions count Pebble's repeated reports.
	bgErrors, corruptions repeatLog
}

// repeatLog logs each text of a message that may repeat many times a
// second once in full, then, at most once per repeatLogEvery, again with
// how often it came since. It keeps up to repeatLogTexts texts; others
// are counted together and logged with the next text that is due. The
// monotonic clock measures the interval.
type repeatLog struct {
	mu      sync.Mutex
	texts   map[string]*repeated
	dropped int // texts past repeatLogTexts, since the last line
}

type repeated struct {
	last    time.Time
	repeats int
}

const (
	// repeatLogEvery is how often a repeating Pebble error is logged again.
	repeatLogEvery = time.Minute
	repeatLogTexts = 16
)

func (r *repeatLog) log(l *zap.Logger, msg, text string) {
	r.mu.Lock()
	now := time.Now()
	e := r.texts[text]
	switch {
	case e == nil && len(r.texts) >= repeatLogTexts:
		r.dropped++
		r.mu.Unlock()
		return
	case e == nil:
		if r.texts == nil {
			r.texts = map[string]*repeated{}
		}
		e = &repeated{}
		r.texts[text] = e
	case now.Sub(e.last) < repeatLogEvery:
		e.repeats++
		r.mu.Unlock()
		return
	}
	repeats, others := e.repeats, r.dropped
	e.last, e.repeats, r.dropped = now, 0, 0
	r.mu.Unlock()
	fields := []zap.Field{zap.String("error", text)}
	if repeats > 0 {
		fields = append(fields, zap.Int("repeats_since_last_logged", repeats))
	}
	if others > 0 {
		fields = append(fields, zap.Int("other_errors_not_logged", others))
	}
	l.Error(msg, fields...)
}

// oneLine is err with errorText's message, and err underneath it for
// errors.Is and As (pebble.IsCorruptionError, ExtractDataCorruptionInfo).
func oneLine(err error) error {
	if err == nil {
		return nil
	}
	return &oneLineError{err}
}

type oneLineError struct{ err error }

func (e *oneLineError) Error() string { return errorText(e.err) }
func (e *oneLineError) Unwrap() error { return e.err }

// errorText is err's message on one line, without the stack traces that
// zap.Error adds for Pebble's errors and without the "<corruption detail
// carrier>" that Pebble joins to a corruption error.
func errorText(err error) string {
	if err == nil {
		return ""
	}
	s := strings.ReplaceAll(err.Error(), "\n<corruption detail carrier>", "")
	return strings.ReplaceAll(s, "\n", "; ")
}

// Open opens (creating if needed) the journal in opts.Dir and reads the
// chain head, so that appends continue the chain after a restart.
func Open(opts Options) (*Journal, error) {
	if opts.Dir == "" {
		return nil, errors.New("journal: Options.Dir is required")
	}
	opts.EnsureDefaults()
	if opts.Durability != WAL && opts.Durability != Fsync {
		return nil, fmt.Errorf("journal: unknown durability %d", int(opts.Durability))
	}
	j := &Journal{
		opts:   opts,
		log:    opts.Logger.Named("journal"),
		opened: time.Now(),
		fs:     &walFS{FS: opts.FS, readOnly: opts.ReadOnly},
		done:   make(chan struct{}),

		applyKick: make(chan struct{}, 1),
		applyStop: make(chan struct{}),
		applyDone: make(chan struct{}),
	}
	j.fs.skipWALSync.Store(opts.Durability == WAL)
	j.wake = sync.NewCond(&j.mu)
	if opts.ReadOnly {
		if _, err := j.fs.Stat(opts.Dir); err != nil {
			return nil, fmt.Errorf("journal: %w", err)
		}
	} else if err := j.fs.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: create %s: %w", opts.Dir, err)
	}
	// The directory lock is taken once and handed to every pebble.Open, so
	// a recovery that reopens Pebble never races another process for it.
	lock, err := pebble.LockDirectory(opts.Dir, j.fs)
	if err != nil {
		if lockHeld(err) {
			return nil, fmt.Errorf("%w: %s", ErrInUse, opts.Dir)
		}
		return nil, fmt.Errorf("journal: lock %s: %w", opts.Dir, err)
	}
	j.lock = lock
	// A head file that is no checkpoint refuses a writable Open, but only
	// once openDB has found the format one this build reads: a newer
	// sigil's head file may be of another encoding (ErrNewerFormat).
	j.headCopy, j.headCopyErr = readHeadFile(j.fs, j.headFilePath())
	if opts.ReadOnly {
		if err := j.openReadOnly(); err != nil {
			_ = lock.Close()
			return nil, err
		}
		close(j.done)
		close(j.applyDone)
		return j, nil
	}
	if err := j.openDB(); err != nil {
		_ = lock.Close()
		return nil, err
	}
	j.log.Info("journal open", zap.String("dir", opts.Dir),
		zap.Stringer("durability", opts.Durability), zap.Uint64("head_seq", j.headSeq))
	go j.commitLoop()
	go j.applyLoop()
	return j, nil
}

func (j *Journal) pebbleOptions() *pebble.Options {
	plog := pebbleLogger{z: j.log.Named("pebble").WithOptions(zap.AddCallerSkip(1)).Sugar()}
	o := &pebble.Options{
		FS:                 j.fs,
		Comparer:           pebble.DefaultComparer,
		Lock:               j.lock,
		Logger:             plog,
		MemTableSize:       j.opts.MemTableSize,
		FormatMajorVersion: pebbleFormat,
		EventListener: &pebble.EventListener{
			// Pebble retries a compaction that failed at once, with no
			// back-off (v2.1.7, handleCompactFailure): one damaged table
			// under an L0 compaction repeated the same two errors
			// thousands of times a second. Each is logged once in full
			// and then counted (repeatLog), as one line without Pebble's
			// stack traces.
			BackgroundError: func(err error) {
				j.bgErrors.log(j.log, "pebble background error", errorText(err))
			},
			// Pebble's default here is Fatalf. A corrupt sstable is
			// reported by Verify and by the reads that hit it; the agent
			// keeps running so that an operator can look, but takes no
			// more records (fail closed): the store that lost one table's
			// data is where the records of new signatures would go, and
			// compactions cannot get past the table.
			DataCorruption: func(info pebble.DataCorruptionInfo) {
				if j.corrupt.CompareAndSwap(nil, &info.Path) {
					j.log.Error("journal store corrupt: refusing appends; run `sigil audit verify`, and keep this directory as evidence (move it aside to start a new journal)",
						zap.String("path", info.Path))
				}
				j.corruptions.log(j.log, "pebble data corruption", info.Path+": "+errorText(info.Details))
			},
			WriteStallBegin: func(info pebble.WriteStallBeginInfo) {
				j.stalled.Store(true)
				j.log.Warn("pebble write stall", zap.String("reason", info.Reason))
			},
			WriteStallEnd: func() {
				j.stalled.Store(false)
				j.log.Info("pebble write stall ended")
			},
			DiskSlow: func(info pebble.DiskSlowInfo) {
				j.log.Warn("pebble disk slow", zap.String("info", info.String()))
			},
		},
	}
	// Audit keys only ever grow, so sstables holding only audit keys never
	// overlap one another and move down the LSM without being rewritten.
	// One "m/" or "s/" key in the same sstable would stretch its range over
	// all newer audit keys, and every level would then rewrite all data
	// passing through it (measured: +0.5 µs of compaction CPU per record).
	// Ending every flush and compaction output at the audit range's edges
	// keeps the other keys in sstables of their own.
	o.Experimental.SpanPolicyFunc = pebble.MakeStaticSpanPolicyFunc(pebble.DefaultComparer.Compare,
		pebble.KeyRange{Start: []byte(auditPrefix), End: prefixEnd([]byte(auditPrefix))}, pebble.SpanPolicy{})
	return o
}

// openDB opens Pebble and loads the chain head from it. Called by Open
// and by the committer when it recovers from a failure.
func (j *Journal) openDB() error {
	j.fs.walFailed.Store(false)
	db, err := pebble.Open(j.opts.Dir, j.pebbleOptions())
	if err != nil {
		return pebbleOpenError(j.opts.Dir, "", err)
	}
	// Before the tail log's replay writes anything into a store whose
	// layout this build may not know.
	if err := claimFormat(db, j.opts.Dir); err != nil {
		_ = closeDB(db)
		return err
	}
	if j.headCopyErr != nil {
		_ = closeDB(db)
		return j.headCopyErr
	}
	seq, hash, err := readHead(db, j.headCopy, j.log)
	if err == nil {
		var added uint64
		seq, hash, added, err = replayTail(j.fs, j.tailPath(), db, seq, hash, j.log)
		j.stats.replayed.Add(added)
		if err != nil && errors.Is(err, errTailGap) && j.opts.AcceptTailLoss {
			seq, hash, err = j.acceptTailLoss(db, seq, hash, err)
		}
	}
	if err == nil {
		err = j.startTail()
	}
	if err != nil {
		_ = closeDB(db)
		return err
	}
	j.headMu.Lock()
	j.headSeq, j.headHash = seq, hash
	j.headMu.Unlock()
	j.batch = db.NewBatch()
	j.applyMu.Lock()
	j.stageMu.Lock()
	j.staged = db.NewBatch()
	j.stageMu.Unlock()
	j.spareStaged = db.NewBatch()
	j.walBuffered = false // Open wrote Pebble's WAL after any replay
	j.applyFailed.Store(false)
	j.dbMu.Lock()
	j.db = db
	j.dbMu.Unlock()
	j.applyMu.Unlock()
	return nil
}

func (j *Journal) tailPath() string { return j.fs.PathJoin(j.opts.Dir, tailName) }

// acceptTailLoss takes the loss a damaged tail log shows (cause): records
// after seq, the head replay reached, up to the highest seq any valid frame
// holds, were confirmed and are gone. Before the tail is emptied, a copy is
// kept beside it as evidence, and a journal.lost record naming the range
// is committed (synced) after it, with the head checkpoint: so the chain
// goes on after the lost seqs, and a kill at any point reuses none of them
// (a kill after the commit finds the record at the head, and replay takes
// the old tail's frames in its range as accounted: lostAtHead).
func (j *Journal) acceptTailLoss(db *pebble.DB, seq uint64, hash [32]byte, cause error) (uint64, [32]byte, error) {
	data, err := readAll(j.fs, j.tailPath())
	if err != nil {
		return seq, hash, fmt.Errorf("journal: read tail log: %w", err)
	}
	hw, hwHash := tailHighWater(data)
	if hw <= seq {
		return seq, hash, cause
	}
	// The lost records were all in the tail (Pebble has every record from
	// before it last started over): a loss the file could not have held
	// would have the chain jump over seqs no signer was ever given
	// (TestRecoverRefusesALossTheTailCouldNotHold). Replay refuses it
	// without errTailGap already; this stays the last word before a write.
	if err := impossibleLoss(j.tailPath(), hw, seq, len(data)); err != nil {
		return seq, hash, err
	}
	aside := fmt.Sprintf("%s.lost-%d", j.tailPath(), time.Now().UnixNano())
	if err := writeSynced(j.fs, aside, data); err != nil {
		return seq, hash, fmt.Errorf("journal: keep the damaged tail log as %s: %w", aside, err)
	}
	note := Record{
		Seq: hw + 1, Time: j.opts.Clock().Round(0).UTC(), Op: LostOp, PrevHash: hwHash,
		Detail: fmt.Sprintf(lostRange+" were confirmed to signers, and are lost with the damaged tail log kept as %s; their signatures may have been released",
			seq+1, hw, j.fs.PathBase(aside)),
	}
	b := db.NewBatch()
	var key [auditKeyLen]byte
	copy(key[:], auditPrefix)
	putRecord(b, &key, &note)
	var v [headLen]byte
	encodeHead(v[:], note.Seq, note.Hash)
	_ = b.Set([]byte(headKey), v[:], nil)
	if err := apply(db, b, pebble.Sync); err != nil {
		return seq, hash, fmt.Errorf("journal: record the lost records: %w", err)
	}
	j.log.Error("journal tail log damaged: its lost records are recorded as lost, and the chain goes on after them",
		zap.Uint64("lost_from", seq+1), zap.Uint64("lost_to", hw), zap.Uint64("lost_record_seq", note.Seq),
		zap.String("kept_as", aside), zap.NamedError("damage", cause))
	return note.Seq, note.Hash, nil
}

// writeSynced writes data to a new file path, synced.
func writeSynced(fs vfs.FS, path string, data []byte) error {
	f, err := fs.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// openReadOnly is openDB for a ReadOnly journal: the tail log's groups that
// Pebble lacks go into an overlay, and what a writable Open would refuse is
// kept in tailDoubt instead.
func (j *Journal) openReadOnly() error {
	o := j.pebbleOptions()
	o.ReadOnly = true
	db, err := pebble.Open(j.opts.Dir, o)
	if err != nil {
		return pebbleOpenError(j.opts.Dir, " read-only", err)
	}
	if _, err := readFormat(db, j.opts.Dir); err != nil {
		_ = closeDB(db)
		return err
	}
	seq, hash, err := readHead(db, j.headCopy, j.log)
	if errors.Is(err, errHeadDoubt) {
		err = nil // Verify reports where
	}
	var overlay *pebble.Batch
	if err == nil {
		overlay = db.NewIndexedBatch()
		var doubt error
		seq, hash, _, doubt = replayTailInto(j.fs, j.tailPath(), db, overlay, seq, hash, j.log)
		if doubt != nil {
			j.tailDoubt = &ChainBreak{Seq: seq + 1, Reason: BreakTailLog, Detail: doubt.Error()}
		}
		if overlay.Empty() {
			_ = overlay.Close()
			overlay = nil
		}
	}
	if err != nil {
		_ = closeDB(db)
		return err
	}
	j.headSeq, j.headHash = seq, hash
	j.db, j.overlay = db, overlay
	return nil
}

// startTail gives a freshly opened (and replayed) Pebble an empty tail log
// in `wal` mode, and removes any left from `wal` mode in `fsync` mode.
func (j *Journal) startTail() error {
	if j.opts.Durability != WAL {
		if err := j.fs.Remove(j.tailPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("journal: remove tail log: %w", err)
		}
		return nil
	}
	t, err := createTail(j.fs, j.tailPath(), j.opts.FS == vfs.Default, j.log)
	if err != nil {
		return err
	}
	j.tail = t
	j.publishTail()
	return nil
}

// readHead returns the chain head: the last record's seq and stored hash.
// The checkpoint entry ("m/head", see checkpointInterval) and its copy in
// the head file (copied, written by the last Close) are compared with it:
// a checkpoint beyond the last record means records were deleted from the
// end while the journal was closed, or lost with a damaged Pebble WAL
// (Pebble replays its newest WAL up to a damaged record and drops the
// rest, m/head included, without an error). The checkpoint then wins, so
// new records keep the evidence (Verify reports the gap) instead of
// reusing the missing seqs.
func readHead(db pebble.Reader, copied checkpoint, log *zap.Logger) (uint64, [32]byte, error) {
	last, lastHash, _, err := lastRecordHead(db)
	if err != nil {
		return 0, lastHash, err
	}
	var stored checkpoint
	stored.seq, stored.hash, stored.found, err = readCheckpoint(db)
	if err != nil {
		return 0, lastHash, err
	}
	anchor, _, _, err := readMeta(db, anchorKey)
	if err != nil {
		return 0, lastHash, err
	}
	seq, hash := last, lastHash
	for _, cp := range [...]struct {
		name string
		checkpoint
	}{{"checkpoint", stored}, {"head file " + headFileName, copied}} {
		switch {
		case !cp.found:
		case cp.seq > last:
			log.Error("journal "+cp.name+" is beyond the last record: records were removed, or lost with a damaged pebble WAL; run audit verify",
				zap.Uint64("checkpoint_seq", cp.seq), zap.Uint64("last_record_seq", last))
			if cp.seq > seq {
				seq, hash = cp.seq, cp.hash
			}
		case cp.seq > anchor:
			// Every record up to a checkpoint is in Pebble before it (a
			// checkpoint is a waited commit, which applies the staged
			// groups first), so the record at its seq has its hash,
			// unless a prune deleted it since. Otherwise the history was
			// rewritten while the journal was closed, and a writer would
			// overwrite the one entry that shows it at its next
			// checkpoint.
			if h, ok := storedHash(db, cp.seq); !ok || h != cp.hash {
				return last, lastHash, fmt.Errorf("%w: the chain-head %s names record %d with another hash than the store holds: records were changed while the journal was closed; run `sigil audit verify`, and keep this directory as evidence (move it aside to start a new journal)",
					errHeadDoubt, cp.name, cp.seq)
			}
		}
	}
	return seq, hash, nil
}

// errHeadDoubt marks a store whose records disagree with its chain-head
// checkpoint: a writable Open refuses it, a ReadOnly one reads on.
var errHeadDoubt = errors.New("journal: chain in doubt")

// readCheckpoint reads the "m/head" checkpoint entry.
func readCheckpoint(r pebble.Reader) (seq uint64, hash [32]byte, found bool, err error) {
	return readMeta(r, headKey)
}

// readMeta reads a seq-and-hash entry: the head checkpoint or the anchor.
func readMeta(r pebble.Reader, key string) (seq uint64, hash [32]byte, found bool, err error) {
	v, closer, err := r.Get([]byte(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, hash, false, nil
	}
	if err != nil {
		return 0, hash, false, fmt.Errorf("journal: read %s: %w", key, err)
	}
	defer closer.Close()
	seq, hash, err = decodeHead(v)
	return seq, hash, err == nil, err
}

// lastRecordHead returns the seq of the last stored record and the Hash
// stored with it (the last run's last 32 bytes, read without decoding,
// so even an undecodable record yields a hash to chain from). A run whose
// end cannot be split into records counts that end as one record, as
// Verify does.
func lastRecordHead(db pebble.Reader) (uint64, [32]byte, bool, error) {
	var hash [32]byte
	it, err := db.NewIter(auditIterOptions(0))
	if err != nil {
		return 0, hash, false, fmt.Errorf("journal: read last record: %w", err)
	}
	defer it.Close()
	if !it.Last() {
		return 0, hash, false, it.Error()
	}
	seq, ok := seqFromKey(it.Key())
	if !ok {
		return 0, hash, false, fmt.Errorf("journal: malformed audit key %x", it.Key())
	}
	n, err := runLen(it.Value())
	if err != nil {
		n++
	}
	hash, _ = valueHash(it.Value())
	return seq + max(n, 1) - 1, hash, true, nil
}

// valueHash is the Hash stored in a record's value: its last 32 bytes, read
// without decoding the rest, so even an undecodable value has one.
func valueHash(v []byte) (h [32]byte, ok bool) {
	if len(v) < 32 {
		return h, false
	}
	copy(h[:], v[len(v)-32:])
	return h, true
}

// journalFormat is the layout this build writes and reads, stored as one
// byte under "m/format" (see doc.go, "Formats"). A journal without the
// entry was written by an agent from before it, whose layouts (a record
// per key, or runs) this build reads. Raise it with any change an older
// build would misread, so that the older build refuses the directory
// (ErrNewerFormat) instead of misreading it.
const journalFormat = 1

// pebbleFormat is the Pebble format major version the journal opens a
// store at, pinned rather than pebble.FormatNewest: Pebble raises an older
// store's format at a writable Open, before m/format is read, and a build
// on an older Pebble then cannot open it at all. Raise it deliberately,
// with journalFormat.
const pebbleFormat = pebble.FormatValueSeparation

// pebbleOpenError wraps pebble.Open's error; a store of a Pebble format
// this build's Pebble does not know was written by a newer sigil
// (ErrNewerFormat). Pebble says so only in its message (v2.1.7,
// format_major_version.go).
func pebbleOpenError(dir, how string, err error) error {
	if strings.Contains(err.Error(), "written in unknown format major version") {
		return fmt.Errorf("%w: %s was written by a Pebble this sigil does not know (%v); run the sigil that wrote it, or a later one", ErrNewerFormat, dir, err)
	}
	return fmt.Errorf("journal: open pebble in %s%s: %w", dir, how, err)
}

// readFormat returns the stored journal format (0: none stored), and
// ErrNewerFormat for one newer than journalFormat.
func readFormat(r pebble.Reader, dir string) (byte, error) {
	v, closer, err := r.Get([]byte(formatKey))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("journal: read %s: %w", formatKey, err)
	}
	defer closer.Close()
	if len(v) != 1 || v[0] == 0 {
		return 0, fmt.Errorf("journal: %s in %s is malformed (%d bytes)", formatKey, dir, len(v))
	}
	if v[0] > journalFormat {
		return v[0], fmt.Errorf("%w: %s holds journal format %d, and this sigil reads format %d at most; run the sigil that wrote it, or a later one (a journal is never converted back to an older format)",
			ErrNewerFormat, dir, v[0], journalFormat)
	}
	return v[0], nil
}

// claimFormat refuses a journal of a newer format, and stores this
// build's format in one without it (an older agent's), so that the
// directory says which layout it holds from the first write on.
func claimFormat(db *pebble.DB, dir string) error {
	f, err := readFormat(db, dir)
	if err != nil || f == journalFormat {
		return err
	}
	b := db.NewBatch()
	_ = b.Set([]byte(formatKey), []byte{journalFormat}, nil)
	if err := apply(db, b, pebble.Sync); err != nil {
		return fmt.Errorf("journal: store %s: %w", formatKey, err)
	}
	return nil
}

const headFormatV1 = 1

func encodeHead(buf []byte, seq uint64, hash [32]byte) {
	buf[0] = headFormatV1
	putUint64(buf[1:], seq)
	copy(buf[9:], hash[:])
}

const headLen = 1 + 8 + 32

func decodeHead(v []byte) (uint64, [32]byte, error) {
	var hash [32]byte
	if len(v) != headLen || v[0] != headFormatV1 {
		return 0, hash, fmt.Errorf("journal: chain-head entry malformed (%d bytes)", len(v))
	}
	copy(hash[:], v[9:])
	return getUint64(v[1:]), hash, nil
}

// checkpoint is a chain head as a checkpoint names it.
type checkpoint struct {
	seq   uint64
	hash  [32]byte
	found bool
}

// headFileName is the head file: a copy of the chain-head checkpoint that
// Close writes beside Pebble's files, in the same encoding as m/head.
// Pebble keeps a stopped journal's newest records, and the m/head entry
// Close wrote after them, in its newest WAL file, and on Open replays that
// file up to the first record that fails its checksum, taking the damage
// for a write a crash cut short (v2.1.7, open.go replayWAL: a damaged
// chunk in the WAL's last 32 KiB block is never told from a torn write).
// One byte changed there dropped every record after it, and the
// checkpoint with them, with no error: a shorter chain that verified, and
// an agent that gave the lost seqs to new signatures
// (TestDamagedWALIsNotACleanShorterChain). The head file is outside the
// WAL, so the cut shows. It is no better protected than the store: it
// tells a damaged WAL or a careless edit from a sound journal, not a
// deliberate rewrite (docs/audit.md, "What verify cannot see").
const headFileName = "journal.head"

func (j *Journal) headFilePath() string { return j.fs.PathJoin(j.opts.Dir, headFileName) }

// readHeadFile reads the head file; a missing one (a journal never closed
// cleanly, or closed before the file existed) is no checkpoint.
func readHeadFile(fs vfs.FS, path string) (checkpoint, error) {
	v, err := readAll(fs, path)
	if errors.Is(err, os.ErrNotExist) {
		return checkpoint{}, nil
	}
	if err != nil {
		return checkpoint{}, fmt.Errorf("journal: read head file: %w", err)
	}
	seq, hash, err := decodeHead(v)
	if err != nil {
		return checkpoint{}, fmt.Errorf("%w: the head file %s is not a chain-head checkpoint (%d bytes): it was not written by the journal; run `sigil audit verify`, and keep this directory as evidence",
			errHeadDoubt, path, len(v))
	}
	return checkpoint{seq: seq, hash: hash, found: true}, nil
}

// writeHeadFile replaces the head file with (seq, hash), synced, through a
// rename, so that a crash leaves the old file or the new one.
func (j *Journal) writeHeadFile(seq uint64, hash [32]byte) error {
	var v [headLen]byte
	encodeHead(v[:], seq, hash)
	tmp := j.headFilePath() + ".tmp"
	if err := writeSynced(j.fs, tmp, v[:]); err != nil {
		return fmt.Errorf("journal: write head file: %w", err)
	}
	if err := j.fs.Rename(tmp, j.headFilePath()); err != nil {
		return fmt.Errorf("journal: write head file: %w", err)
	}
	return nil
}

// Head returns the last confirmed record's seq and hash (0 and zeros for
// an empty journal). A REP quotes these as the audit-chain head.
func (j *Journal) Head() (seq uint64, hash [32]byte) {
	j.headMu.Lock()
	defer j.headMu.Unlock()
	return j.headSeq, j.headHash
}

// Stats are running counters for metrics. WALSyncs counts fsyncs of the
// WAL actually issued (zero in `wal` mode until Close); Records/WALSyncs
// is the group-commit factor in `fsync` mode.
type Stats struct {
	Records    uint64 // records confirmed by Append
	Commits    uint64 // commit groups (in `fsync` mode, one Pebble commit each)
	WALSyncs   uint64 // WAL fsyncs issued
	Failures   uint64 // commits, or applies of staged records, that failed and made the journal reopen Pebble
	Recoveries uint64 // successful reopens after a failure
	Full       uint64 // commit groups refused for lack of free space (Healthy's empty probes not counted)
	Replayed   uint64 // records put back from the tail log (tail.go) at Open or a reopen
}

// Healthy reports whether an append can succeed now: nil, or an error
// wrapping ErrUnavailable while the journal cannot reopen Pebble after a
// write failure, refuses appends for lack of free space, or is closed. It
// is what the agent's readiness check asks, so that an orchestrator stops
// sending signers to an agent that would answer JOURNAL_UNAVAILABLE. A
// journal waiting to reopen is given the chance to (recovery otherwise
// happens only when an append arrives, and a not-ready agent gets none):
// Healthy commits an empty group, which reopens Pebble if the fault has
// cleared, at most once per RecoveryInterval. So does a full journal:
// only a commit's free-space check clears "journal full", and the empty
// group checks free space first.
func (j *Journal) Healthy(ctx context.Context) error {
	j.mu.Lock()
	closing := j.closing
	j.mu.Unlock()
	if closing {
		return ErrClosed
	}
	j.dbMu.RLock()
	// A failed write to Pebble's own WAL (its log writer, in the
	// background) fails the next append too: not open.
	open := j.db != nil && !j.applyFailed.Load() && !j.fs.walFailed.Load()
	j.dbMu.RUnlock()
	if !open {
		if err := j.commitState(ctx, nil); err != nil {
			return fmt.Errorf("%w: recovering from a write failure", ErrUnavailable)
		}
	} else if j.fullNow.Load() && j.fullProbeDue(time.Since(j.opened)) {
		// The error is the free-space check's; fullNow says the same.
		_ = j.commitState(ctx, nil)
	}
	if j.fullNow.Load() {
		return fmt.Errorf("%w: journal full", ErrUnavailable)
	}
	if err := j.corruptErr(); err != nil {
		return err
	}
	if j.stalled.Load() {
		// Pebble stopped taking writes (its flushes fail, or cannot keep
		// up): appends wait out their deadlines meanwhile.
		return fmt.Errorf("%w: pebble write stall", ErrUnavailable)
	}
	return nil
}

// corruptErr is the error of every commit after Pebble reported a
// corrupt file, nil before.
func (j *Journal) corruptErr() error {
	if p := j.corrupt.Load(); p != nil {
		return fmt.Errorf("%w: store corrupt (%s): run `sigil audit verify`", ErrUnavailable, *p)
	}
	return nil
}

// fullProbeDue reports whether Healthy may probe a full journal now, at
// most once per RecoveryInterval: while full, every commit calls statfs,
// and readiness checks may come often and from several probers.
// now is the time since Open.
func (j *Journal) fullProbeDue(now time.Duration) bool {
	next := j.nextFullProbe.Load()
	if int64(now) < next {
		return false
	}
	return j.nextFullProbe.CompareAndSwap(next, int64(now+j.opts.RecoveryInterval))
}

// Stats returns the journal's counters since Open.
func (j *Journal) Stats() Stats {
	return Stats{
		Records:    j.stats.records.Load(),
		Commits:    j.stats.commits.Load(),
		WALSyncs:   j.fs.walSyncs.Load(),
		Failures:   j.stats.failures.Load(),
		Recoveries: j.stats.recoveries.Load(),
		Full:       j.stats.full.Load(),
		Replayed:   j.stats.replayed.Load(),
	}
}

// Close waits for queued appends to be committed, syncs the WAL (in both
// modes: a clean shutdown is durable against a power cut) and closes
// Pebble. Calls after the first return ErrClosed.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.closing {
		j.mu.Unlock()
		return ErrClosed
	}
	j.closing = true
	j.wake.Signal()
	j.mu.Unlock()
	if j.opts.ReadOnly {
		return j.closeReadOnly()
	}
	<-j.done // queued and inline commits are finished
	close(j.applyStop)
	<-j.applyDone // and every staged group was applied, or applying failed

	db := j.takeDB()
	var err error
	if j.applyFailed.Load() {
		// Pebble lacks records that the tail log has: keep the tail for
		// the next Open to replay.
		err = fmt.Errorf("journal: apply staged records: %w", errApplyFailed)
	}
	if db != nil {
		if err == nil {
			j.fs.skipWALSync.Store(false)
			err = j.writeCheckpoint(db)
		}
		if cerr := closeDB(db); err == nil {
			err = cerr
		}
	}
	if terr := j.tail.close(); err == nil && terr != nil {
		err = fmt.Errorf("journal: close tail log: %w", terr)
	}
	if err == nil && j.tail != nil {
		// Pebble's WAL is synced: the tail has nothing Pebble lacks.
		if rerr := j.fs.Remove(j.tailPath()); rerr != nil {
			j.log.Warn("removing the tail log", zap.Error(rerr))
		}
	}
	j.tail = nil
	if lerr := j.lock.Close(); err == nil && lerr != nil {
		err = fmt.Errorf("journal: release lock: %w", lerr)
	}
	j.log.Info("journal closed", zap.Uint64("head_seq", j.headSeq), zap.Error(err))
	return err
}

// closeReadOnly closes a ReadOnly journal, writing nothing.
func (j *Journal) closeReadOnly() error {
	j.dbMu.Lock()
	db, overlay := j.db, j.overlay
	j.db, j.overlay = nil, nil
	j.dbMu.Unlock()
	var err error
	if overlay != nil {
		err = overlay.Close()
	}
	if cerr := closeDB(db); err == nil {
		err = cerr
	}
	if lerr := j.lock.Close(); err == nil && lerr != nil {
		err = fmt.Errorf("journal: release lock: %w", lerr)
	}
	return err
}

// writeCheckpoint records the confirmed head at a clean shutdown, so that
// records removed from the end while the agent is stopped are detected.
func (j *Journal) writeCheckpoint(db *pebble.DB) error {
	seq, hash := j.Head()
	if seq == 0 {
		return nil
	}
	if j.fs.walFailed.Load() {
		return fmt.Errorf("journal: write checkpoint: %w", errWALWriteFailed)
	}
	var v [headLen]byte
	encodeHead(v[:], seq, hash)
	b := db.NewBatch()
	_ = b.Set([]byte(headKey), v[:], nil)
	// Through apply: after a WAL write failure that no commit has waited
	// for yet (tail.go), this is where Pebble reports it, with Fatalf.
	if err := apply(db, b, pebble.Sync); err != nil {
		return fmt.Errorf("journal: write checkpoint: %w", err)
	}
	// After the synced commit, so the file never names a head the store
	// may lack. The store has the records: a head file that cannot be
	// written costs only its check at the next Open.
	if err := j.writeHeadFile(seq, hash); err != nil {
		j.log.Warn("journal head file not written", zap.Error(err))
	}
	return nil
}

// consistentView returns r as one point in time for a long walk: a
// snapshot of an open DB, which commits may change under the walk, or r
// itself (a ReadOnly journal's overlay, which nothing changes).
func consistentView(r pebble.Reader) (pebble.Reader, func()) {
	if db, ok := r.(*pebble.DB); ok {
		snap := db.NewSnapshot()
		return snap, func() { _ = snap.Close() }
	}
	return r, func() {}
}

// closeDB closes Pebble, turning a Fatalf panic into an error.
func closeDB(db *pebble.DB) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("journal: close pebble: %v", p)
		}
	}()
	if cerr := db.Close(); cerr != nil {
		return fmt.Errorf("journal: close pebble: %w", cerr)
	}
	return nil
}

// readAuditDB is readDB for readers of audit records: it first applies
// the staged groups, so the reader sees every record confirmed before the
// call.
func (j *Journal) readAuditDB() (pebble.Reader, error) {
	if err := j.applyStaged(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return j.readDB()
}

// readDB returns the open DB (in a ReadOnly journal with the tail log's
// records over it) with dbMu held shared; release it with j.dbMu.RUnlock.
// It fails with ErrClosed after Close and ErrUnavailable while a failure
// has Pebble closed.
func (j *Journal) readDB() (pebble.Reader, error) {
	j.dbMu.RLock()
	if j.overlay != nil {
		return j.overlay, nil
	}
	if j.db != nil {
		return j.db, nil
	}
	j.dbMu.RUnlock()
	j.mu.Lock()
	closing := j.closing
	j.mu.Unlock()
	if closing {
		return nil, ErrClosed
	}
	return nil, fmt.Errorf("%w: recovering from a write failure", ErrUnavailable)
}
