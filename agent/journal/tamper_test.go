package journal

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"go.uber.org/zap"
)

// forgeFrame returns a tail frame for the records first..last, chaining
// from prev to lastHash in its header, whose batch is what build puts in
// it: a frame as someone who can write the data dir would write it, with a
// checksum that holds.
func forgeFrame(t *testing.T, first, last uint64, prev, lastHash [32]byte, build func(b *pebble.Batch)) []byte {
	t.Helper()
	db, err := pebble.Open("", &pebble.Options{FS: vfs.NewMem(), Logger: pebbleLogger{z: zap.NewNop().Sugar()}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	b := db.NewBatch()
	defer b.Close()
	build(b)
	repr := b.Repr()
	frame := make([]byte, tailHeaderLen+len(repr)+tailCRCLen)
	putFrame(frame, repr, first, last, prev, lastHash)
	return frame
}

// A tail log frame is replayed at start into the store, so what a frame
// may hold is what the journal writes there: the records its header names,
// each under its own seq, chaining from the header's prev hash to its last
// one. Its checksum (CRC-32C) is no seal: a frame forged with a checksum
// that holds used to be applied whatever its batch held (a state key, an
// older record overwritten, records deleted, an edited record, a head hash
// its records do not reach), and the agent started and signed on. Open
// must refuse it, and a read-only verify report it, as it does a damaged
// frame.
func TestForgedTailFrameIsRefused(t *testing.T) {
	cases := []struct {
		name string
		// forge returns the frame that replaces the one of record 30, the
		// tail's last, given that record's encoding and record 29's hash.
		forge func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte
	}{
		{"record edited, checksum recomputed", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			rec := append([]byte(nil), rec30...)
			rec[recordFixedLen+2] ^= 1 // first byte of the tenant
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) { _ = b.Set(auditKey(30), rec, nil) })
		}},
		{"header's last hash not its record's", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			return forgeFrame(t, 30, 30, hash29, [32]byte{1}, func(b *pebble.Batch) { _ = b.Set(auditKey(30), rec30, nil) })
		}},
		{"a state key besides the record", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) {
				_ = b.Set(auditKey(30), rec30, nil)
				_ = b.Set(stateKey("forged"), []byte("x"), nil)
			})
		}},
		{"an older record overwritten", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) {
				_ = b.Set(auditKey(30), rec30, nil)
				_ = b.Set(auditKey(1), []byte("not a record"), nil)
			})
		}},
		{"older records deleted", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) {
				_ = b.Set(auditKey(30), rec30, nil)
				_ = b.DeleteRange(auditKey(1), auditKey(10), nil)
			})
		}},
		{"the record under another key", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) { _ = b.Set(auditKey(31), rec30, nil) })
		}},
		{"no record at all", func(t *testing.T, _ []byte, hash29 [32]byte) []byte {
			return forgeFrame(t, 30, 30, hash29, [32]byte{2}, func(b *pebble.Batch) { _ = b.Set(stateKey("forged"), []byte("x"), nil) })
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := killedWithTail(t) // the store holds record 1, the tail 2-30, one a frame
			data, offs := tailOf(t, dir)
			last := data[offs[28]:]
			fr, _, ok := frameAt(last)
			if !ok || fr.firstSeq != 30 || fr.lastSeq != 30 {
				t.Fatalf("the tail's last frame holds %d-%d", fr.firstSeq, fr.lastSeq)
			}
			var b pebble.Batch
			if err := b.SetRepr(append([]byte(nil), fr.payload...)); err != nil {
				t.Fatal(err)
			}
			r := b.Reader()
			_, _, rec30, ok, err := r.Next()
			if !ok || err != nil {
				t.Fatalf("record 30's frame: %v", err)
			}
			forged := append(append([]byte(nil), data[:offs[28]]...), tc.forge(t, rec30, fr.prev)...)
			if err := os.WriteFile(filepath.Join(dir, tailName), forged, 0o600); err != nil {
				t.Fatal(err)
			}

			ro, err := Open(Options{Dir: dir, ReadOnly: true, Logger: testLogger(t)})
			if err != nil {
				t.Fatalf("read-only Open: %v", err)
			}
			expectBreak(t, ro, 30, BreakTailLog)
			if err := ro.Close(); err != nil {
				t.Fatal(err)
			}
			j, err := Open(Options{Dir: dir, Durability: WAL, Logger: testLogger(t)})
			if err == nil {
				_ = j.Close()
				t.Fatal("Open replayed a forged tail log frame")
			}
			if !errors.Is(err, errTailCorrupt) {
				t.Fatalf("Open: %v, want errTailCorrupt", err)
			}
		})
	}
}
