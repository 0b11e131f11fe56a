package policy

import (
	"slices"
	"testing"
	"time"
)

func TestMinuteOfWeek(t *testing.T) {
	for _, tc := range []struct {
		t    time.Time
		want int
	}{
		{monday, 0},
		{monday.Add(-time.Minute), minutesPerWeek - 1},
		{utc(1970, 1, 1, 0, 0, 0), 3 * minutesPerDay},
		{utc(1969, 12, 31, 23, 59, 59), 3*minutesPerDay - 1},
		{utc(2024, 6, 9, 23, 59, 59), minutesPerWeek - 1},
		{time.Date(2024, 6, 3, 2, 0, 0, 0, time.FixedZone("UTC+2", 7200)), 0}, // the zone does not matter
	} {
		if got := minuteOfWeek(tc.t); got != tc.want {
			t.Errorf("minuteOfWeek(%v) = %d, want %d", tc.t, got, tc.want)
		}
	}
}

func TestWindowCanonical(t *testing.T) {
	for _, tc := range []struct {
		windows []string
		want    []string
	}{
		{[]string{"Mon 08:00-18:00"}, []string{"Mon 08:00-Mon 18:00"}},
		{[]string{"Mon 08:00-12:00", "mon 12:00-18:00", "MON 09:00-10:00"}, []string{"Mon 08:00-Mon 18:00"}},
		{[]string{"Fri 22:00-02:00"}, []string{"Fri 22:00-Sat 02:00"}},
		{[]string{"Sun 22:00-02:00"}, []string{"Sun 22:00-Mon 02:00"}},
		{[]string{"Sun 22:00-24:00", "Mon 00:00-02:00"}, []string{"Sun 22:00-Mon 02:00"}},
		{[]string{"Sat-Sun 00:00-24:00"}, []string{"Sat 00:00-Mon 00:00"}},
		{[]string{"Fri-Mon 10:00-11:00"}, []string{"Mon 10:00-Mon 11:00", "Fri 10:00-Fri 11:00", "Sat 10:00-Sat 11:00", "Sun 10:00-Sun 11:00"}},
		{[]string{"Mon,Wed 10:00-11:00", "Tue 10:00-11:00"}, []string{"Mon 10:00-Mon 11:00", "Tue 10:00-Tue 11:00", "Wed 10:00-Wed 11:00"}},
		{[]string{"daily 00:00-24:00"}, nil},
		{[]string{"Mon-Sun 12:00-12:01", "daily 12:01-12:00"}, nil},
		{[]string{"daily 9:00-9:30"}, []string{"Mon 09:00-Mon 09:30", "Tue 09:00-Tue 09:30", "Wed 09:00-Wed 09:30",
			"Thu 09:00-Thu 09:30", "Fri 09:00-Fri 09:30", "Sat 09:00-Sat 09:30", "Sun 09:00-Sun 09:30"}},
	} {
		var m weekMask
		for _, w := range tc.windows {
			if err := m.addWindow(w); err != nil {
				t.Fatalf("%q: %v", w, err)
			}
		}
		if got := m.canonical(); !slices.Equal(got, tc.want) {
			t.Errorf("%q: canonical %q, want %q", tc.windows, got, tc.want)
		}
	}
}

func TestWindowSyntaxErrors(t *testing.T) {
	for _, w := range []string{
		"", "Mon", "08:00-18:00", "Mon 08:00", "Mon 08:00-", "Mon 0800-1800", "Monday 08:00-18:00",
		"Mon-Fri-Sat 08:00-09:00", "Mon 24:00-24:00", "Mon 08:60-09:00", "Mon 08:00-18:00 extra",
		"Mon +8:00-09:00", "Mon 8:0-09:00", "Mon 123:00-09:00", "Mon, 08:00-09:00", "Mon 10:00-10:00",
	} {
		var m weekMask
		if err := m.addWindow(w); err == nil {
			t.Errorf("addWindow(%q) accepted", w)
		}
	}
}

func TestWindowUntilNext(t *testing.T) {
	var m weekMask
	if m.untilNext(5) != -1 {
		t.Error("empty mask")
	}
	if err := m.addWindow("Sun 23:59-24:00"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ at, want int }{
		{minutesPerWeek - 1, 0},
		{0, minutesPerWeek - 1},
		{minutesPerWeek - 2, 1},
		{63, minutesPerWeek - 64},
	} {
		if got := m.untilNext(tc.at); got != tc.want {
			t.Errorf("untilNext(%d) = %d, want %d", tc.at, got, tc.want)
		}
	}
	m = weekMask{}
	_ = m.addWindow("Mon 00:00-00:01")
	if got := m.untilNext(1); got != minutesPerWeek-1 {
		t.Errorf("wrap to Monday: %d", got)
	}
}
