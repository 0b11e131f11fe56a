package journal

import (
	"cmp"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// tabledJournal writes a journal whose records are in several Pebble
// tables, and closes it.
func tabledJournal(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	j, err := Open(Options{Dir: dir, MemTableSize: 256 << 10, Durability: WAL})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		appendN(t, j, "payments", 1500)
		db, err := j.writableAuditDB()
		if err != nil {
			t.Fatal(err)
		}
		err = db.Flush()
		j.dbMu.RUnlock()
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

// corruptTables changes one byte in tables of dir that Open does not read
// but Pebble's compactions do: the tables of audit records but the newest
// (Open reads the chain head from it), and the tables of m/ entries that
// hold only the chain-head checkpoint, but the newest (Open reads the
// checkpoint from it; the one with the format entry, which every Open
// reads, is left whole). Tables of records alone, which overlap nothing,
// may be moved down the levels without being read; the checkpoint's
// tables overlap each other and are rewritten.
func corruptTables(t *testing.T, dir string) {
	t.Helper()
	db, err := pebble.Open(dir, &pebble.Options{ReadOnly: true, Logger: quietPebble})
	if err != nil {
		t.Fatal(err)
	}
	levels, err := db.SSTables()
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	type table struct {
		path string
		num  uint64
	}
	var records, heads []table
	for _, level := range levels {
		for _, ti := range level {
			tb := table{filepath.Join(dir, ti.FileNum.String()+".sst"), uint64(ti.FileNum)}
			switch {
			case strings.HasPrefix(string(ti.Largest.UserKey), auditPrefix):
				records = append(records, tb)
			case string(ti.Smallest.UserKey) > formatKey:
				heads = append(heads, tb)
			}
		}
	}
	byNum := func(a, b table) int { return cmp.Compare(a.num, b.num) }
	slices.SortFunc(records, byNum)
	slices.SortFunc(heads, byNum)
	var damage []table
	if len(records) > 1 {
		damage = append(damage, records[:len(records)-1]...)
	}
	if len(heads) > 1 {
		damage = append(damage, heads[:len(heads)-1]...)
	}
	if len(damage) == 0 {
		t.Fatalf("no table to damage: %d of records, %d of checkpoints", len(records), len(heads))
	}
	for _, tb := range damage {
		b, err := os.ReadFile(tb.path)
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)/4] ^= 0xff
		if err := os.WriteFile(tb.path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// One byte changed in a Pebble table made a running journal's log flood:
// Pebble retried the compaction that read it in a tight loop, and each
// failure logged two multi-line errors with stack traces (7,000 lines and
// 30 MB in 6 s, at 80% CPU, with no end), ending in a stray
// "<corruption detail carrier>" line; a full disk then made the journal
// refuse signatures. The corruption is reported once in full, repeats
// are counted, Pebble's compactions back off, and the journal refuses
// appends (fail closed) while verify names the damaged table.
func TestCorruptTableDoesNotFloodTheLog(t *testing.T) {
	dir := tabledJournal(t)
	corruptTables(t, dir)
	core, logs := observer.New(zap.InfoLevel)
	j := openTest(t, dir, WAL, func(o *Options) {
		o.Logger = zap.New(core)
		o.MemTableSize = 256 << 10
	})
	// More tables in L0 until Pebble compacts them, with the damaged one.
	for range 4 {
		if err := appendSome(j, 1500); err != nil {
			break
		}
		if db, err := j.writableAuditDB(); err == nil {
			_ = db.Flush()
			j.dbMu.RUnlock()
		}
	}
	// Pebble's compaction meets the damaged table when it gets to it;
	// then it retried at once, forever. Pebble may move a table of
	// records down the levels without reading it, so a read of every
	// record (Verify) meets it when no compaction has in a few seconds:
	// reads report a corrupt table as compactions do.
	read := time.Now().Add(3 * time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for j.corrupt.Load() == nil {
		if time.Now().After(deadline) {
			t.Fatal("neither a compaction nor a read met the damaged table")
		}
		if time.Now().After(read) {
			_, _ = j.Verify(context.Background())
			read = deadline
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	var errorsLogged, lines, bytes int
	for _, e := range logs.All() {
		if e.Level < zapcore.ErrorLevel {
			continue
		}
		errorsLogged++
		for _, f := range e.Context {
			s := f.String
			if f.Interface != nil {
				if err, ok := f.Interface.(error); ok {
					s = err.Error()
				}
			}
			lines += strings.Count(s, "\n")
			bytes += len(s)
			if strings.Contains(s, "<corruption detail carrier>") {
				t.Errorf("a log line carries Pebble's internal marker: %q", s)
			}
			if f.Key == "errorVerbose" || strings.Contains(s, "goroutine ") || strings.Contains(s, ".go:") {
				t.Errorf("a log line carries a stack trace: %s=%.200q", f.Key, s)
			}
		}
	}
	t.Logf("%d error lines, %d embedded line breaks, %d bytes in 2s", errorsLogged, lines, bytes)
	if errorsLogged == 0 {
		t.Fatal("the corruption was not reported")
	}
	if errorsLogged > 10 {
		t.Errorf("%d error lines in 2s about one damaged table, want it reported once and repeats counted", errorsLogged)
	}

	// Fail closed: no more records on a store that reported corruption,
	// and the readiness check says why.
	if err := j.Append(context.Background(), signRecord("after", 0)); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "store corrupt") {
		t.Errorf("Append after the corruption: %v, want ErrUnavailable (store corrupt)", err)
	}
	if err := j.Healthy(context.Background()); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), ".sst") {
		t.Errorf("Healthy after the corruption: %v, want ErrUnavailable naming the table", err)
	}
	// Verify still reports it, naming the table.
	if _, err := j.Verify(context.Background()); err == nil || !strings.Contains(err.Error(), "checksum mismatch") || strings.Contains(err.Error(), "\n") {
		t.Errorf("Verify: %v, want the checksum mismatch", err)
	} else {
		t.Logf("Verify: %q", err)
	}
}

// appendSome appends n records, stopping at the first error.
func appendSome(j *Journal, n int) error {
	for i := range n {
		if err := j.Append(context.Background(), signRecord("after", i)); err != nil {
			return err
		}
	}
	return nil
}
