package journal

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"

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
// So in `wal` mode the committer first writes the commit group, framed,
// to the tail log with one write(2) of its own, then commits it to Pebble
// with pebble.NoSync. Once write(2) returns the kernel has the group, and
// a killed agent loses nothing: Open replays the tail's groups that Pebble
// lacks. Pebble's WAL still receives every batch, in order, a moment
// later. Each commit that waits for Pebble's WAL anyway (the once-a-second
// head checkpoint, state changes, prunes, Close) has by then made every
// earlier batch durable in it too, so the tail starts over empty after it.
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
// Integers are big-endian. A frame that runs past the end of the file, or
// whose CRC fails as the file's last frame, is a write the kill cut short:
// its Append had not returned, so it is dropped. Anything else that does
// not parse, or a frame that does not continue the chain where Pebble's
// records end, means records confirmed to a caller are missing, and Open
// refuses to start rather than build on a gap.

// tailName is the tail log's file in the journal directory; Pebble ignores
// files whose names it does not know.
const tailName = "journal.tail"

const (
	tailMagic     = "SGT1"
	tailHeaderLen = 88
	tailCRCLen    = 4
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// tailLog is the open tail file. Only the goroutine holding busy (or Open
// and Close, when no one can) uses it.
type tailLog struct {
	fs   vfs.FS
	path string
	f    vfs.File
	size int64  // bytes written since the tail last started over
	buf  []byte // frame scratch
}

// createTail creates (or empties) the tail log.
func createTail(fs vfs.FS, path string) (*tailLog, error) {
	f, err := fs.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return nil, fmt.Errorf("journal: create tail log: %w", err)
	}
	return &tailLog{fs: fs, path: path, f: f}, nil
}

// append writes one commit group as a frame. On error the frame may be
// partly in the file; the caller takes Pebble out of service, and the
// recovery that follows replays the tail (dropping the cut-short frame)
// and starts it over.
func (t *tailLog) append(batch []byte, firstSeq, lastSeq uint64, prev, last [32]byte) error {
	n := tailHeaderLen + len(batch) + tailCRCLen
	if cap(t.buf) < n {
		t.buf = make([]byte, n, n+n/2)
	}
	frame := t.buf[:n]
	copy(frame, tailMagic)
	binary.BigEndian.PutUint32(frame[4:], uint32(len(batch)))
	binary.BigEndian.PutUint64(frame[8:], firstSeq)
	binary.BigEndian.PutUint64(frame[16:], lastSeq)
	copy(frame[24:], prev[:])
	copy(frame[56:], last[:])
	copy(frame[tailHeaderLen:], batch)
	binary.BigEndian.PutUint32(frame[n-tailCRCLen:], crc32.Checksum(frame[:n-tailCRCLen], crc32c))
	if _, err := t.f.Write(frame); err != nil {
		return fmt.Errorf("journal: write tail log: %w", err)
	}
	t.size += int64(n)
	return nil
}

// startOver empties the tail after Pebble's WAL was written up to the
// commit just confirmed. If the file cannot be recreated the tail keeps
// growing on the old handle: its frames are all in Pebble, and replay
// skips them.
func (t *tailLog) startOver(log *zap.Logger) {
	if t.size == 0 {
		return
	}
	f, err := t.fs.Create(t.path, vfs.WriteCategoryUnspecified)
	if err != nil {
		log.Warn("journal tail log not emptied; it keeps growing until the next try", zap.Error(err))
		return
	}
	_ = t.f.Close()
	t.f, t.size = f, 0
}

func (t *tailLog) close() error {
	if t == nil || t.f == nil {
		return nil
	}
	err := t.f.Close()
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

// parseTail splits the tail log into frames. torn is the number of bytes
// at the end that belong to a frame a kill cut short.
func parseTail(data []byte) (frames []tailFrame, torn int, err error) {
	for off := 0; off < len(data); {
		rest := data[off:]
		if len(rest) < tailHeaderLen {
			return frames, len(rest), nil
		}
		if !bytes.Equal(rest[:4], []byte(tailMagic)) {
			return frames, 0, fmt.Errorf("%w: no frame at byte %d", errTailCorrupt, off)
		}
		n := tailHeaderLen + int(binary.BigEndian.Uint32(rest[4:])) + tailCRCLen
		if n > len(rest) {
			return frames, len(rest), nil
		}
		sum := binary.BigEndian.Uint32(rest[n-tailCRCLen:])
		if crc32.Checksum(rest[:n-tailCRCLen], crc32c) != sum {
			if n == len(rest) {
				return frames, n, nil // the last frame, cut short
			}
			return frames, 0, fmt.Errorf("%w: frame at byte %d fails its checksum", errTailCorrupt, off)
		}
		fr := tailFrame{
			firstSeq: binary.BigEndian.Uint64(rest[8:]),
			lastSeq:  binary.BigEndian.Uint64(rest[16:]),
			payload:  rest[tailHeaderLen : n-tailCRCLen],
		}
		copy(fr.prev[:], rest[24:56])
		copy(fr.last[:], rest[56:88])
		if fr.firstSeq == 0 || fr.lastSeq < fr.firstSeq {
			return frames, 0, fmt.Errorf("%w: frame at byte %d names seqs %d-%d", errTailCorrupt, off, fr.firstSeq, fr.lastSeq)
		}
		frames = append(frames, fr)
		off += n
	}
	return frames, 0, nil
}

// replayTail commits to db the tail log's groups that it lacks, after the
// chain head (seq, hash) read from db, and returns the new head and how
// many records it added. A missing tail log is an empty one.
func replayTail(fs vfs.FS, path string, db *pebble.DB, seq uint64, hash [32]byte, log *zap.Logger) (uint64, [32]byte, uint64, error) {
	data, err := readAll(fs, path)
	if errors.Is(err, os.ErrNotExist) {
		return seq, hash, 0, nil
	}
	if err != nil {
		return seq, hash, 0, fmt.Errorf("journal: read tail log: %w", err)
	}
	frames, torn, err := parseTail(data)
	if err != nil {
		return seq, hash, 0, fmt.Errorf("%w (%s); records confirmed to signers may be missing: run `sigil audit verify`, and move the file aside to start without it", err, path)
	}
	if torn > 0 {
		log.Info("journal tail log ends in a write cut short; dropping it (its append never returned)", zap.Int("bytes", torn))
	}
	var added uint64
	for _, fr := range frames {
		switch {
		case fr.lastSeq <= seq:
			// Pebble's WAL had it. A record that differs means the store
			// changed under the journal; Verify reports where.
			if stored, ok := storedHash(db, fr.lastSeq); !ok || stored != fr.last {
				log.Error("journal tail log holds a record the store lacks or holds differently; run audit verify",
					zap.Uint64("seq", fr.lastSeq))
			}
		case fr.firstSeq == seq+1 && fr.prev == hash:
			b := db.NewBatch()
			if err := b.SetRepr(append([]byte(nil), fr.payload...)); err != nil {
				return seq, hash, added, fmt.Errorf("journal: tail log frame for seqs %d-%d: %w", fr.firstSeq, fr.lastSeq, err)
			}
			if err := apply(db, b, pebble.NoSync); err != nil {
				return seq, hash, added, fmt.Errorf("journal: replay tail log: %w", err)
			}
			added += fr.lastSeq - fr.firstSeq + 1
			seq, hash = fr.lastSeq, fr.last
		default:
			return seq, hash, added, fmt.Errorf("%w: its records %d-%d do not continue the chain at seq %d; records confirmed to signers are missing: run `sigil audit verify`",
				errTailCorrupt, fr.firstSeq, fr.lastSeq, seq)
		}
	}
	if added > 0 {
		// Through Pebble's WAL (in `fsync` mode also to the disk) before
		// the tail is emptied.
		if err := syncWAL(db); err != nil {
			return seq, hash, added, fmt.Errorf("journal: replay tail log: %w", err)
		}
		log.Info("journal replayed records from its tail log", zap.Uint64("records", added), zap.Uint64("head_seq", seq))
	}
	return seq, hash, added, nil
}

// storedHash returns the Hash stored with record seq.
func storedHash(db *pebble.DB, seq uint64) ([32]byte, bool) {
	v, closer, err := db.Get(auditKeyFor(seq))
	if err != nil {
		return [32]byte{}, false
	}
	defer closer.Close()
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
// file (and synced, in `fsync` mode; see walFS).
func syncWAL(db *pebble.DB) error {
	b := db.NewBatch()
	_ = b.LogData([]byte("sigil: tail log replayed"), nil)
	return apply(db, b, pebble.Sync)
}
