package agent

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
)

// Retention deletes by age against a clock that has not jumped ahead of
// the time measured since it started: a forward step, of a minute or a
// year, deletes nothing the measured time would keep.
func TestRetentionTimeIsNeverAheadOfTheMeasuredTime(t *testing.T) {
	start := time.Date(2026, 12, 7, 3, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name    string
		elapsed time.Duration
		now     time.Time
		want    time.Time
	}{
		{"clock and measure agree", time.Hour, start.Add(time.Hour), start.Add(time.Hour)},
		{"a little drift ahead", time.Hour, start.Add(time.Hour + time.Second), start.Add(time.Hour)},
		{"stepped a year ahead", time.Hour, start.Add(365*24*time.Hour + time.Hour), start.Add(time.Hour)},
		{"stepped back", time.Hour, start.Add(time.Hour - 10*time.Minute), start.Add(time.Hour - 10*time.Minute)},
	} {
		if got := notAhead(start, tc.elapsed, tc.now); !got.Equal(tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// Retention's first round runs as the agent starts, before there is any
// time measured to check the clock against: with the clock a year ahead
// (NTP not done yet) it deleted almost every record. It prunes by the
// newest record's time when that is earlier than now, so only records
// older than the retention before the newest one go.
func TestRetentionAtStartWithTheClockFarAhead(t *testing.T) {
	ctx := context.Background()
	const keep = 90 * 24 * time.Hour
	cfg := Config{DataDir: t.TempDir(), Journal: JournalConfig{Mode: "wal"}}
	base := time.Now().Round(0).UTC()
	var stamp atomic.Int64
	j, err := journal.Open(journal.Options{Dir: filepath.Join(cfg.DataDir, "journal"),
		Clock: func() time.Time { return time.Unix(0, stamp.Load()).UTC() }})
	if err != nil {
		t.Fatal(err)
	}
	ages := []time.Duration{200 * 24 * time.Hour, 100 * 24 * time.Hour, 60 * 24 * time.Hour, 24 * time.Hour, time.Minute}
	for _, age := range ages {
		stamp.Store(base.Add(-age).UnixNano())
		if err := j.Append(ctx, &journal.Record{Op: "sign", Tenant: "t", CodeName: "OK"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	a, err := New(ctx, cfg, zap.NewNop()) // no retention yet: nothing pruned by New
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Shutdown(context.Background()) })
	a.cfg.Journal.Retention = keep
	for _, tc := range []struct {
		name string
		now  time.Time
		want time.Time
	}{
		{"clock a year ahead", base.Add(365 * 24 * time.Hour), base.Add(-time.Minute)},
		{"clock right", base, base.Add(-time.Minute)},
		{"clock behind the newest record", base.Add(-time.Hour), base.Add(-time.Hour)},
	} {
		got, ok := a.retentionTime(tc.now, tc.now, true)
		if !ok || !got.Equal(tc.want) {
			t.Errorf("%s: retentionTime at start = %v %v, want %v", tc.name, got, ok, tc.want)
		}
	}
	now, ok := a.retentionTime(base.Add(365*24*time.Hour), base.Add(365*24*time.Hour), true)
	if !ok {
		t.Fatal("the first round prunes nothing")
	}
	a.pruneExpired(ctx, now)
	recs, err := a.journal.Last(ctx, 10, "")
	if err != nil {
		t.Fatal(err)
	}
	var kept int
	for _, r := range recs {
		if r.Op == "sign" {
			kept++
		}
	}
	// 200 and 100 days old go; 60 days, a day and a minute old stay.
	if kept != 3 {
		t.Fatalf("records kept after the first round with the clock a year ahead: %d of %d, want 3: %+v", kept, len(ages), recs)
	}
}
