package agent

import (
	"testing"
	"time"
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
