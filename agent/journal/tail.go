package journal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"runtime/debug"
	"slices"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"go.uber.org/zap"
)

// The tail log makes a `wal`-mode commit kill-safe without waiting for
// Pebble's WAL writer.
//
// Pebble writes its WAL from a goroutine of its own, so a commit that waits
// for the write (pebble.Sync) pays two goroutine hand-offs, and on the
// 2-vCPU VMs this runs on each hand-off wakes a sleeping thread. Measured
// in the agent at one connection (software ECDSA P-256): a journal append
// took 20 µs on average that way and 9 µs with the tail log, and the
// signature's p50 went from 30 µs above the journal-off agent's to within
// its noise. A commit that does not wait (pebble.NoSync) leaves the batch
// in Pebble's in-process buffer, which a SIGKILL loses.
//
// So in `wal` mode the committer puts the commit group, framed, in the
// tail log (a copy into its mapping, or one write(2) of its own; see
// below), and the group is confirmed. Pebble receives it within 2 ms, with
// the groups staged around it in one pebble.NoSync commit (commit.go,
// "Deferred apply"). From the copy on, the kernel has the group, and a
// killed agent loses nothing: Open replays the tail's groups that Pebble
// lacks. Pebble's WAL still receives every batch, in order, a moment
// later. Each commit that waits for Pebble's WAL anyway
// (the head checkpoint every 100 ms, state changes, prunes, Close) has by
// then made every earlier batch durable in it too, so the tail starts over
// after it.
//
// On the OS filesystem the tail file is mapped into memory (MAP_SHARED)
// and a frame is a copy into the mapping: the page cache has it once the
// copy ends, which a killed process leaves behind just as it leaves a
// write(2). On these VMs write(2) costs about 2 µs per frame and the copy
// 0.3 µs (measured, 420-byte frames). The file is allocated at its full
// size (tailMapSize) and its pages touched once when it is created, so no
// append takes a page fault or a disk-full error. Starting over reuses the
// mapping from its first byte, leaving the older frames after the newest
// ones; they all hold records Pebble's WAL has. A group that would not fit
// commits waiting for Pebble's WAL instead, and the tail starts over
// after it. Through any other vfs.FS (tests inject faults through one) the
// tail is written with write(2).
//
// A frame is one commit group:
//
//	off   size  field
//	0     4     magic "SGT1"
//	4     4     payload length n
//	8     8     seq of the group's first record
//	16    8     seq of its last record
//	24    32    PrevHash of the first record (the chain head it continues)
//	56    32    Hash of the last record (the head after it)
//	88    n     payload: the Pebble batch (its Repr)
//	88+n  4     CRC-32C of bytes [0, 88+n)
//
// Integers are big-endian. Open takes every valid frame in the file,
// wherever it lies (scanFrames): besides the frames since the tail last
// started over there may be a write the kill cut short (its Append had not
// returned; it fails its checksum and is dropped), frames from before the
// mapped tail last started over (records Pebble has), or zeros. Frames at
// or below Pebble's head must hold what Pebble holds; from the head the
// chain goes on through the frame that continues it (replayTailInto). A
// valid frame left beyond where the chain stops means a frame in between
// is damaged or missing: records confirmed to a caller are missing, and
// Open refuses to start rather than build on a gap (`sigil audit recover`
// records the loss: Options.AcceptTailLoss).

// tailName is the tail log's file in the journal directory; Pebble ignores
// files whose names it does not know.
const tailName = "journal.tail"

const (
	tailMagic     = "SGT1"
	tailHeaderLen = 88
	tailCRCLen    = 4
)

// tailMapSize is the mapped tail file's size. The tail starts over at
// least every 100 ms under load (the checkpoint; commit.go) and holds
// about 420 bytes per record, so 16 MiB lasts about 400k records/s before
// a group has to wait for Pebble's WAL. Its pages stay resident: 16 MiB of
// page cache.
const tailMapSize = 16 << 20

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// tailLog is the open tail file. Only the goroutine holding busy (or Open
// and Close, when no one can) uses it.
type tailLog struct {
	fs     vfs.FS
	path   string
	f      vfs.File
	size   int64  // bytes written since the tail last started over
	buf    []byte // frame scratch (written tail)
	mapped []byte // the file's mapping; nil when the tail is written
	// stale: a written tail could not start over. Its frames are all in
	// Pebble's WAL, but the commit that made them so did not go through
	// the tail, so a frame appended now would not continue the chain of
	// the frames before it, and Open would take the gap for lost records.
	// Until it starts over, every commit waits for Pebble's WAL (fits).
	stale bool
	// id: the mapped file's device and inode, which the applier compares
	// with the file at path (Journal.tailMovedAway); nil when written.
	id *fileID
}

// createTail creates (or empties) the tail log, mapped when mapIt is set
// and the platform allows, written otherwise.
func createTail(fs vfs.FS, path string, mapIt bool, log *zap.Logger) (*tailLog, error) {
	f, err := fs.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return nil, fmt.Errorf("journal: create tail log: %w", err)
	}
	t := &tailLog{fs: fs, path: path, f: f}
	if mapIt {
		m, err := mapTail(f.Fd(), tailMapSize)
		if err != nil {
			log.Warn("journal tail log is written, not mapped", zap.Error(err))
		}
		t.mapped = m
	}
	if t.mapped != nil {
		if id, err := fdID(f.Fd()); err == nil {
			t.id = &id
		}
	}
	return t, nil
}

// fits reports whether a frame for a batch of n bytes fits in the tail.
func (t *tailLog) fits(n int) bool {
	if t.stale {
		return false
	}
	return t.mapped == nil || t.size+int64(tailHeaderLen+n+tailCRCLen) <= int64(len(t.mapped))
}

// append writes one commit group as a frame; in a mapped tail the caller
// has checked that it fits. On error the frame may be partly in the
// file; the caller takes Pebble out of service, and the recovery that
// follows replays the tail (dropping the cut-short frame) and starts it
// over.
func (t *tailLog) append(batch []byte, firstSeq, lastSeq uint64, prev, last [32]byte) error {
	n := tailHeaderLen + len(batch) + tailCRCLen
	if t.mapped != nil {
		if err := copyFrame(t.mapped[t.size:t.size+int64(n)], batch, firstSeq, lastSeq, prev, last); err != nil {
			return fmt.Errorf("journal: write tail log (mapped): %w", err)
		}
		t.size += int64(n)
		return nil
	}
	if cap(t.buf) < n {
		t.buf = make([]byte, n, n+n/2)
	}
	putFrame(t.buf[:n], batch, firstSeq, lastSeq, prev, last)
	if _, err := t.f.Write(t.buf[:n]); err != nil {
		return fmt.Errorf("journal: write tail log: %w", err)
	}
	t.size += int64(n)
	return nil
}

// putFrame encodes a frame into frame, which is exactly its length. The
// checksum goes last, so a mapped frame a kill cut short fails it.
func putFrame(frame, batch []byte, firstSeq, lastSeq uint64, prev, last [32]byte) {
	n := len(frame)
	copy(frame, tailMagic)
	binary.BigEndian.PutUint32(frame[4:], uint32(len(batch)))
	binary.BigEndian.PutUint64(frame[8:], firstSeq)
	binary.BigEndian.PutUint64(frame[16:], lastSeq)
	copy(frame[24:], prev[:])
	copy(frame[56:], last[:])
	copy(frame[tailHeaderLen:], batch)
	binary.BigEndian.PutUint32(frame[n-tailCRCLen:], crc32.Checksum(frame[:n-tailCRCLen], crc32c))
}

// copyFrame puts a frame into the mapping.
func copyFrame(dst, batch []byte, firstSeq, lastSeq uint64, prev, last [32]byte) error {
	return faultsAsErrors(func() { putFrame(dst, batch, firstSeq, lastSeq, prev, last) })
}

// faultsAsErrors runs f, which touches the tail's mapping. A fault there
// (the file truncated behind the journal's back, an I/O error reading a
// page in) is a SIGBUS, which would end the process; here it is an error.
func faultsAsErrors(f func()) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			fault, ok := p.(interface {
				error
				Addr() uintptr // a memory fault's panic (debug.SetPanicOnFault)
			})
			if !ok {
				panic(p)
			}
			err = fault
		}
	}()
	f()
	return nil
}

// startOver empties the tail after Pebble's WAL was written up to the
// commit just confirmed. A mapped tail goes back to its first byte, unless
// its file was deleted or moved away: frames written there would be lost
// to the next start, so it is recreated at its path, as a written one
// always is. If that fails the tail is stale: it keeps its frames (all in
// Pebble, which replay skips) and takes no more until a later try
// succeeds, so commits wait for Pebble's WAL meanwhile.
func (t *tailLog) startOver(log *zap.Logger) {
	switch {
	case t.mapped != nil && !t.stale:
		if at, err := t.atPath(); err == nil && at {
			t.size = 0
			return
		} else if err != nil {
			log.Warn("journal tail log: cannot tell whether it is still at its path; recreating it", zap.Error(err))
		} else {
			log.Warn("journal tail log was deleted or moved away; recreating it")
		}
	case t.mapped == nil && t.size == 0:
		t.stale = false
		return
	}
	nt, err := createTail(t.fs, t.path, t.mapped != nil, log)
	if err != nil {
		if !t.stale {
			log.Warn("journal tail log not emptied; commits wait for pebble's WAL until it is", zap.Error(err))
		}
		t.stale = true
		return
	}
	if err := t.close(); err != nil {
		log.Warn("closing the old tail log", zap.Error(err))
	}
	*t = *nt
}

// publishTail tells the applier which file the tail log is now (after it
// was created, started over or closed), and clears what the applier found
// about the one before. A look that ends after this marks only the file
// it began with, so it counts only if that is still the tail (started
// over in place: at its path after all), and costs one waited commit,
// which publishes it again. Only the holder of busy calls it.
func (j *Journal) publishTail() {
	var id *fileID
	if j.tail != nil {
		id = j.tail.id
	}
	j.tailMoved.Store(nil)
	j.tailID.Store(id)
}

// tailMovedAway reports whether the mapped tail log's file is no longer
// at its path (deleted, renamed, or another file renamed over it), which
// the applier asks before each apply: one stat(2) per 2 ms of records,
// off the appends' path. startOver notices too, but only after a commit
// that waits for Pebble's WAL, which under load comes with the checkpoint
// (100 ms) and when the agent is idle not until its next append; until
// then the groups went to a file no restart finds, and their records
// were kill-safe nowhere, since Pebble's WAL writer keeps what a NoSync
// commit gives it in its buffer until the buffer fills (32 KiB) or a
// commit waits. Once this has said yes, applies wait for Pebble's WAL and
// the next commit waits too and starts the tail over (publishing another
// tail ends it). A stat that fails otherwise than with ENOENT says
// nothing here: startOver looks again at the next waited commit. found,
// set by the call that finds it, says what is at the path: "nothing" or
// "another file". Only the applier calls it.
//
// While the committer starts the tail over, which may create a new file
// at the path, tailID is nil, so a look then says nothing; a look that
// began before finds tailID changed when it is done, and says nothing
// either. (It used to take the committer's new file for another one put
// there: a warning of a move that was none, and a waited commit.)
func (j *Journal) tailMovedAway() (moved bool, found string) {
	id := j.tailID.Load()
	if id == nil {
		return false, ""
	}
	if j.tailMoved.Load() == id {
		return true, ""
	}
	named, err := pathID(j.tailPath())
	if err == nil && named == *id || err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, ""
	}
	if j.tailID.Load() != id {
		return false, ""
	}
	j.tailMoved.Store(id)
	if err != nil {
		return true, "nothing"
	}
	return true, "another file"
}

// atPath reports whether the open (mapped) tail file is still the one at
// its path.
func (t *tailLog) atPath() (bool, error) { return fdAtPath(t.f.Fd(), t.path) }

func (t *tailLog) close() error {
	if t == nil || t.f == nil {
		return nil
	}
	var err error
	if t.mapped != nil {
		err = unmapTail(t.mapped)
		t.mapped = nil
	}
	if cerr := t.f.Close(); err == nil {
		err = cerr
	}
	t.f = nil
	return err
}

// tailFrame is one parsed frame; payload aliases the file's bytes.
type tailFrame struct {
	firstSeq, lastSeq uint64
	prev, last        [32]byte
	payload           []byte
}

// errTailCorrupt marks a tail log that cannot be read to its end.
var errTailCorrupt = errors.New("journal: tail log corrupt")

// errTailGap marks, with errTailCorrupt, a tail log that lacks records it
// once held (a frame damaged or missing between others, or between the
// store and the tail): records confirmed to signers are lost. Options.
// AcceptTailLoss records that loss instead of refusing to open.
var errTailGap = errors.New("records lost")

// minFrameRecordLen is the least a record takes in a frame: its entry in
// the frame's Pebble batch (kind, key length, key, value length, value),
// the shortest record encoding as the value.
const minFrameRecordLen = 1 + 1 + auditKeyLen + 2 + minRecordEncoded

// maxTailRecords is how many records a tail log of size bytes could hold.
func maxTailRecords(size int) uint64 { return uint64(size / minFrameRecordLen) }

// impossibleLoss is the error for a tail log of size bytes at path whose
// frame names record high while the chain stops at seq, or nil if the file
// could have held the records between. The seq comes from a frame header
// anyone who can write the file can forge with a checksum that holds: a
// larger loss is no loss but a frame the journal did not write, and
// recover refuses to record it (acceptTailLoss), so no message may send
// the operator there.
func impossibleLoss(path string, high, seq uint64, size int) error {
	limit := maxTailRecords(size)
	if high-seq <= limit {
		return nil
	}
	return fmt.Errorf("%w (%s): a frame names record %d, but the chain stops at %d and a tail log of %d bytes holds at most %d records: that frame was not written by the journal, and `sigil audit recover` will not record it as a loss; run `sigil audit verify`, and keep this directory as evidence",
		errTailCorrupt, path, high, seq, size, limit)
}

// tailHighWater returns the highest seq a valid frame anywhere in the tail
// log holds, and that record's hash: the head a killed agent had confirmed,
// past any damage.
func tailHighWater(data []byte) (seq uint64, hash [32]byte) {
	frames, _ := scanFrames(data)
	for _, fr := range frames {
		if fr.lastSeq > seq {
			seq, hash = fr.lastSeq, fr.last
		}
	}
	return seq, hash
}

// frameAt parses the frame at the start of data; ok is false when there
// is none there (no magic, cut short, a failed checksum, bad seqs).
func frameAt(data []byte) (fr tailFrame, n int, ok bool) {
	if len(data) < tailHeaderLen || !bytes.Equal(data[:4], []byte(tailMagic)) {
		return fr, 0, false
	}
	n = tailHeaderLen + int(binary.BigEndian.Uint32(data[4:])) + tailCRCLen
	if n > len(data) || crc32.Checksum(data[:n-tailCRCLen], crc32c) != binary.BigEndian.Uint32(data[n-tailCRCLen:]) {
		return fr, 0, false
	}
	fr = tailFrame{
		firstSeq: binary.BigEndian.Uint64(data[8:]),
		lastSeq:  binary.BigEndian.Uint64(data[16:]),
		payload:  data[tailHeaderLen : n-tailCRCLen],
	}
	copy(fr.prev[:], data[24:56])
	copy(fr.last[:], data[56:88])
	if fr.firstSeq == 0 || fr.lastSeq < fr.firstSeq {
		return fr, 0, false
	}
	return fr, n, true
}

// replayTail commits to db the tail log's groups that it lacks, after the
// chain head (seq, hash) read from db, and returns the new head and how
// many records it added. A missing tail log is an empty one.
func replayTail(fs vfs.FS, path string, db *pebble.DB, seq uint64, hash [32]byte, log *zap.Logger) (uint64, [32]byte, uint64, error) {
	return replayTailInto(fs, path, db, nil, seq, hash, log)
}

// replayTailInto is replayTail that, given an indexed batch into (a
// read-only journal), puts the groups there instead of committing them to
// db, and on a tail it cannot take as it is, keeps the groups it could and
// returns the error with the head they reach.
//
// Every valid frame in the file counts, wherever it is: a damaged frame
// hides only its own records. Frames at or below db's head must hold what
// db holds (else the store changed under the journal, or the tail is
// another journal's: errTailCorrupt). From the head the chain goes on
// through the frame that continues it, as long as there is one; a valid
// frame left beyond that point holds confirmed records db cannot have
// (errTailCorrupt and errTailGap: records lost), unless it names more than
// the file could hold (impossibleLoss: errTailCorrupt alone).
func replayTailInto(fs vfs.FS, path string, db *pebble.DB, into *pebble.Batch, seq uint64, hash [32]byte, log *zap.Logger) (uint64, [32]byte, uint64, error) {
	data, err := readAll(fs, path)
	if errors.Is(err, os.ErrNotExist) {
		return seq, hash, 0, nil
	}
	if err != nil {
		return seq, hash, 0, fmt.Errorf("journal: read tail log: %w", err)
	}
	frames, complete := scanFrames(data)
	// Records up to the prune anchor were deleted on purpose; the tail
	// may still hold them (a kill before it started over). Records a
	// journal.lost record at the head names are gone too (a recovery
	// killed before it emptied the tail: acceptTailLoss).
	pruned, _, _, err := readMeta(db, anchorKey)
	if err != nil {
		return seq, hash, 0, err
	}
	lostFrom, lostTo := lostAtHead(db)
	accounted := func(fr tailFrame) bool {
		return fr.lastSeq <= pruned || (fr.firstSeq >= lostFrom && fr.lastSeq <= lostTo)
	}
	byFirst := map[uint64][]tailFrame{}
	for _, fr := range frames {
		switch {
		case accounted(fr):
		case fr.lastSeq <= seq:
			// Pebble's WAL had it. A record that differs means the store
			// changed under the journal, or the tail is another journal's:
			// the chain is in doubt, and signing on would extend it.
			if stored, ok := storedHash(db, fr.lastSeq); !ok || stored != fr.last {
				return seq, hash, 0, fmt.Errorf("%w (%s): its record %d is one the store lacks or holds differently: the store changed under the journal, or the tail is another journal's; run `sigil audit verify`, and keep this directory as evidence",
					errTailCorrupt, path, fr.lastSeq)
			}
		case fr.firstSeq <= seq:
			return seq, hash, 0, fmt.Errorf("%w (%s): its records %d-%d straddle the store's last record %d; run `sigil audit verify`, and keep this directory as evidence",
				errTailCorrupt, path, fr.firstSeq, fr.lastSeq, seq)
		default:
			byFirst[fr.firstSeq] = append(byFirst[fr.firstSeq], fr)
		}
	}
	var added uint64
	for {
		next := byFirst[seq+1]
		if len(next) == 0 {
			break
		}
		i := slices.IndexFunc(next, func(fr tailFrame) bool { return fr.prev == hash })
		if i < 0 {
			return seq, hash, added, fmt.Errorf("%w (%s): its records from %d do not link to record %d as stored: the store changed under the journal, or the tail is another journal's; run `sigil audit verify`, and keep this directory as evidence",
				errTailCorrupt, path, seq+1, seq)
		}
		fr := next[i]
		if err := applyFrame(db, into, fr); err != nil {
			log.Warn("journal tail log frame that cannot be applied", zap.Uint64("first_seq", fr.firstSeq), zap.Uint64("last_seq", fr.lastSeq), zap.Error(err))
			break // as if damaged: its records, and those after, count as lost below
		}
		added += fr.lastSeq - fr.firstSeq + 1
		seq, hash = fr.lastSeq, fr.last
	}
	if added > 0 && into == nil {
		// Through Pebble's WAL (in `fsync` mode also to the disk) before
		// the tail is emptied.
		if err := syncWAL(db, "sigil: tail log replayed"); err != nil {
			return seq, hash, added, fmt.Errorf("journal: replay tail log: %w", err)
		}
		log.Info("journal replayed records from its tail log", zap.Uint64("records", added), zap.Uint64("head_seq", seq))
	}
	var high uint64
	for _, fr := range frames {
		if !accounted(fr) {
			high = max(high, fr.lastSeq)
		}
	}
	switch {
	case high > seq:
		if err := impossibleLoss(path, high, seq, len(data)); err != nil {
			return seq, hash, added, err
		}
		return seq, hash, added, fmt.Errorf("%w (%w, %s): it holds records up to %d, but the chain it continues stops at %d (a frame damaged or missing); records confirmed to signers are missing: run `sigil audit verify`, then `sigil audit recover` to record their loss in the chain and start again",
			errTailCorrupt, errTailGap, path, high, seq)
	case !complete:
		return seq, hash, added, fmt.Errorf("%w (%s): too much of it is unreadable to scan (%d bytes); run `sigil audit verify`, and keep this directory as evidence",
			errTailCorrupt, path, len(data))
	}
	return seq, hash, added, nil
}

// applyFrame puts a frame's batch into into, or commits it to db. A frame
// whose checksum holds but whose batch does not decode (written by
// something else) is an error, not a panic in Pebble's decoder.
func applyFrame(db *pebble.DB, into *pebble.Batch, fr tailFrame) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("journal: tail log frame for seqs %d-%d does not decode: %v", fr.firstSeq, fr.lastSeq, p)
		}
	}()
	b := db.NewBatch()
	if err := b.SetRepr(append([]byte(nil), fr.payload...)); err != nil {
		return fmt.Errorf("journal: tail log frame for seqs %d-%d: %w", fr.firstSeq, fr.lastSeq, err)
	}
	if err := checkFrame(b, fr); err != nil {
		return fmt.Errorf("journal: tail log frame for seqs %d-%d: %w", fr.firstSeq, fr.lastSeq, err)
	}
	if into != nil {
		return into.Apply(b, nil)
	}
	if err := apply(db, b, pebble.NoSync); err != nil {
		return fmt.Errorf("journal: replay tail log: %w", err)
	}
	return nil
}

// checkFrame checks that a frame's batch holds what the journal writes in
// a frame, and nothing else: the records firstSeq..lastSeq in order, each
// set under its own seq, each hashing to its stored hash and linking to
// the one before, from the header's prev hash to its last one. Only
// commits of records go through the tail (state changes, prunes and the
// checkpoint wait for Pebble's WAL instead), so a state key, a deletion,
// another seq's record or a chain the header does not describe was not
// written by the journal. The checksum is no seal (anyone who can write
// the file can recompute it), and a frame is applied to the store as it
// is: unchecked, a forged frame put whatever it held there at the next
// start (TestForgedTailFrameIsRefused).
func checkFrame(b *pebble.Batch, fr tailFrame) error {
	r := b.Reader()
	seq, prev := fr.firstSeq, fr.prev
	var rec Record
	for {
		kind, k, v, ok, err := r.Next()
		if err != nil {
			return err
		}
		if !ok {
			break
		}
		keySeq, isAudit := seqFromKey(k)
		if kind != pebble.InternalKeyKindSet || !isAudit || keySeq != seq || seq > fr.lastSeq {
			return fmt.Errorf("it holds an entry (kind %s) the journal does not write in a frame at seq %d", kind, seq)
		}
		if brk, _ := checkRecord(v, seq, prev, &rec); brk != nil {
			return fmt.Errorf("its record %d: %s: %s", seq, brk.Reason, brk.Detail)
		}
		prev = rec.Hash
		seq++
	}
	if seq != fr.lastSeq+1 || prev != fr.last {
		return fmt.Errorf("its records end at seq %d, not at the seq and hash its header names", seq-1)
	}
	return nil
}

// scanFrames returns every valid frame in data, in file order, and whether
// the scan got through it: a file of garbage that looks like frame headers
// could make it checksum most of the file at every offset, so it stops
// once it has checksummed several times the file's size.
func scanFrames(data []byte) ([]tailFrame, bool) {
	var frames []tailFrame
	budget := 4*len(data) + 1<<20
	for off := 0; off < len(data); {
		i := bytes.Index(data[off:], []byte(tailMagic))
		if i < 0 {
			break
		}
		off += i
		if len(data)-off >= 8 {
			budget -= min(tailHeaderLen+int(binary.BigEndian.Uint32(data[off+4:]))+tailCRCLen, len(data)-off)
		}
		if budget < 0 {
			return frames, false
		}
		if fr, n, ok := frameAt(data[off:]); ok {
			frames = append(frames, fr)
			off += n
			continue
		}
		off++
	}
	return frames, true
}

// lostAtHead returns the range a journal.lost record at the head of db
// names, or an empty range (from > to).
func lostAtHead(db pebble.Reader) (from, to uint64) {
	last, _, found, err := lastRecordHead(db)
	if err != nil || !found {
		return 1, 0
	}
	v, err := storedRecord(db, last)
	if err != nil {
		return 1, 0
	}
	var r Record
	if decodeRecord(v, &r) != nil || r.Op != LostOp {
		return 1, 0
	}
	if _, err := fmt.Sscanf(r.Detail, lostRange, &from, &to); err != nil || from > to {
		return 1, 0
	}
	return from, to
}

// storedHash returns the Hash stored with record seq.
func storedHash(db pebble.Reader, seq uint64) ([32]byte, bool) {
	v, err := storedRecord(db, seq)
	if err != nil {
		return [32]byte{}, false
	}
	return valueHash(v)
}

func readAll(fs vfs.FS, path string) ([]byte, error) {
	f, err := fs.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// syncWAL waits until everything committed so far is in Pebble's WAL
// file (and synced, in `fsync` mode; see walFS), with a commit of note
// alone, which Pebble writes to its WAL and applies to nothing.
func syncWAL(db *pebble.DB, note string) error {
	b := db.NewBatch()
	_ = b.LogData([]byte(note), nil)
	return apply(db, b, pebble.Sync)
}
