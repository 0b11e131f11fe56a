package journal

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"
)

// olderAgentJournal is testdata/journal-3f3bd58-killed: the journal an
// agent built from commit 3f3bd58 (before runs and the "m/format" entry)
// left when it was killed while signing: 43 records, the first 31 in
// Pebble one per key, the last 12 only in its tail log (cut to the
// frames it held). testdata/README.md says how it was made.
const (
	olderAgentJournal  = "testdata/journal-3f3bd58-killed"
	olderAgentRecords  = 43
	olderAgentInPebble = 31
	olderAgentHead     = "99bd4a1dccd1fd1621a4ac115c9baada692f9b01f2a3577791a568a3a468a15b"
)

// copyFixture copies a journal directory from testdata to a temporary
// one, private as the agent makes it, since opening it writes.
func copyFixture(t *testing.T, src string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "journal")
	if err := os.CopyFS(dir, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		mode := os.FileMode(0o600)
		if d.IsDir() {
			mode = 0o700
		}
		return os.Chmod(path, mode)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// storedFormat reads the "m/format" entry of a closed journal's directory
// straight from Pebble (0: none).
func storedFormat(t *testing.T, dir string) byte {
	t.Helper()
	db, err := pebble.Open(dir, &pebble.Options{ReadOnly: true, Logger: quietPebble})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	v, closer, err := db.Get([]byte(formatKey))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	if len(v) != 1 {
		t.Fatalf("%s is %d bytes", formatKey, len(v))
	}
	return v[0]
}

// An upgrade: the journal an older agent left, killed, is read by every
// reader of this build (read-only, the tail log's records included), and
// a writer replays the tail, verifies and chains its records onto the
// older agent's last one. The format entry is stored by the writer only.
func TestJournalOfAnOlderAgentOpens(t *testing.T) {
	dir := copyFixture(t, olderAgentJournal)
	ctx := context.Background()

	ro := openReadOnly(t, dir)
	rep, err := ro.Verify(ctx)
	if err != nil || rep.Break != nil || rep.Records != olderAgentRecords || hex.EncodeToString(rep.HeadHash[:]) != olderAgentHead {
		t.Fatalf("read-only Verify: %+v, %v; want %d records, head %s", rep, err, olderAgentRecords, olderAgentHead)
	}
	var ops []string
	if err := ro.Scan(ctx, Filter{}, func(r *Record) error {
		ops = append(ops, r.Op)
		return nil
	}); err != nil || len(ops) != olderAgentRecords || ops[0] != "enroll" || ops[olderAgentRecords-1] != "sign" {
		t.Fatalf("read-only Scan: %d records (%v), first and last ops %v; want %d, enroll … sign", len(ops), err, ops, olderAgentRecords)
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}
	if f := storedFormat(t, dir); f != 0 {
		t.Fatalf("a read-only open stored format %d", f)
	}

	j := openTest(t, dir, WAL)
	if s := j.Stats(); s.Replayed != olderAgentRecords-olderAgentInPebble {
		t.Fatalf("replayed %d records from the older agent's tail log, want %d", s.Replayed, olderAgentRecords-olderAgentInPebble)
	}
	appendN(t, j, "acme", 3)
	var prev [32]byte
	if err := j.Scan(ctx, Filter{FromSeq: olderAgentRecords + 1}, func(r *Record) error {
		if r.Seq == olderAgentRecords+1 {
			prev = r.PrevHash
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if hex.EncodeToString(prev[:]) != olderAgentHead {
		t.Fatalf("record %d chains onto %x, want the older agent's head %s", olderAgentRecords+1, prev, olderAgentHead)
	}
	if rep := verifyOK(t, j); rep.Records != olderAgentRecords+3 {
		t.Fatalf("Verify after appending: %d records, want %d", rep.Records, olderAgentRecords+3)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if f := storedFormat(t, dir); f != journalFormat {
		t.Fatalf("after a writer's open: format %d stored, want %d", f, journalFormat)
	}
	verifyOK(t, openTest(t, dir, WAL))
}

// A rollback onto a journal a newer build wrote: one whose format entry
// is newer than this build's is refused by a writer and by a reader alike,
// saying so, and left as it is (no tail replayed, no record appended, the
// entry not overwritten), instead of read as if it were of this format.
func TestNewerJournalFormatIsRefused(t *testing.T) {
	for _, newer := range []byte{journalFormat + 1, 255} {
		dir := t.TempDir()
		j := openTest(t, dir, WAL)
		appendN(t, j, "acme", 2)
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		db, err := pebble.Open(dir, &pebble.Options{Logger: quietPebble})
		if err != nil {
			t.Fatal(err)
		}
		if err := db.Set([]byte(formatKey), []byte{newer}, pebble.Sync); err != nil {
			t.Fatal(err)
		}
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
		for _, readOnly := range []bool{false, true} {
			_, err := Open(Options{Dir: dir, ReadOnly: readOnly, Logger: testLogger(t)})
			if !errors.Is(err, ErrNewerFormat) {
				t.Fatalf("format %d, read-only %v: Open: %v, want ErrNewerFormat", newer, readOnly, err)
			}
			for _, want := range []string{"newer sigil", dir, "journal format " + strconv.Itoa(int(newer)), "format " + strconv.Itoa(journalFormat) + " at most"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("format %d: %q does not say %q", newer, err, want)
				}
			}
		}
		if f := storedFormat(t, dir); f != newer {
			t.Fatalf("the refused journal's format entry is now %d, want %d", f, newer)
		}
	}
}

// quietPebble keeps Pebble's info lines out of a test's output.
var quietPebble = pebbleLogger{z: zap.NewNop().Sugar()}

// setStoredFormat writes a format entry into a closed journal, as a newer
// build would have.
func setStoredFormat(t *testing.T, dir string, f byte) {
	t.Helper()
	db, err := pebble.Open(dir, &pebble.Options{Logger: quietPebble})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Set([]byte(formatKey), []byte{f}, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}

// auditKeys counts the audit keys Pebble holds in dir.
func auditKeys(t *testing.T, dir string) int {
	t.Helper()
	db, err := pebble.Open(dir, &pebble.Options{ReadOnly: true, Logger: quietPebble})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte(auditPrefix), UpperBound: prefixEnd([]byte(auditPrefix))})
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	n := 0
	for it.First(); it.Valid(); it.Next() {
		n++
	}
	return n
}

// A newer sigil's journal left by a kill, its newest records only in the
// tail log: the refused writable Open replays none of them into Pebble
// and leaves the tail log as it was (reviewer CJ: a check moved after the
// replay passed every other test).
func TestNewerJournalFormatKilledIsNotReplayed(t *testing.T) {
	dir := killedWithTail(t)
	setStoredFormat(t, dir, journalFormat+1)
	tailBefore, err := os.ReadFile(filepath.Join(dir, tailName))
	if err != nil {
		t.Fatal(err)
	}
	before := auditKeys(t, dir)
	if _, err := Open(Options{Dir: dir, Durability: WAL, Logger: testLogger(t)}); !errors.Is(err, ErrNewerFormat) {
		t.Fatalf("Open: %v, want ErrNewerFormat", err)
	}
	if tailAfter, err := os.ReadFile(filepath.Join(dir, tailName)); err != nil || !bytes.Equal(tailBefore, tailAfter) {
		t.Fatalf("the tail log changed (%v)", err)
	}
	if after := auditKeys(t, dir); after != before {
		t.Fatalf("audit keys in Pebble: %d before, %d after a refused Open", before, after)
	}
}

// A newer sigil whose head file is of a later encoding too: the refusal
// is ErrNewerFormat (exit 78), not a head file "not written by the
// journal" (exit 1, restarted by systemd).
func TestNewerJournalFormatWithANewerHeadFile(t *testing.T) {
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	appendN(t, j, "acme", 2)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	setStoredFormat(t, dir, journalFormat+1)
	hp := filepath.Join(dir, headFileName)
	v, err := os.ReadFile(hp)
	if err != nil {
		t.Fatal(err)
	}
	v[0] = headFormatV1 + 1
	if err := os.WriteFile(hp, v, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, readOnly := range []bool{false, true} {
		if _, err := Open(Options{Dir: dir, ReadOnly: readOnly, Durability: WAL, Logger: testLogger(t)}); !errors.Is(err, ErrNewerFormat) {
			t.Errorf("read-only %v: Open: %v, want ErrNewerFormat", readOnly, err)
		}
	}
}

// A store a newer Pebble wrote (its format-version marker beyond what this
// build's Pebble knows) is a newer sigil's too.
func TestNewerPebbleFormatIsANewerJournal(t *testing.T) {
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	appendN(t, j, "acme", 2)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	renamed := false
	for _, e := range ents {
		if n := e.Name(); strings.HasPrefix(n, "marker.format-version.") {
			if err := os.Rename(filepath.Join(dir, n), filepath.Join(dir, "marker.format-version.000099.099")); err != nil {
				t.Fatal(err)
			}
			renamed = true
		}
	}
	if !renamed {
		t.Fatal("no format-version marker")
	}
	for _, readOnly := range []bool{false, true} {
		if _, err := Open(Options{Dir: dir, ReadOnly: readOnly, Durability: WAL, Logger: testLogger(t)}); !errors.Is(err, ErrNewerFormat) {
			t.Errorf("read-only %v: Open: %v, want ErrNewerFormat", readOnly, err)
		}
	}
}
