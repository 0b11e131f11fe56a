package policy

import (
	"fmt"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"time"
)

const (
	minutesPerDay  = 24 * 60
	minutesPerWeek = 7 * minutesPerDay
)

// weekMask is a set of UTC minutes of the week, Monday 00:00 = 0. The allowed
// windows of a slot compile to one mask (1,260 bytes), so the hot path tests a
// window with one shift and AND whatever the number of windows.
type weekMask [(minutesPerWeek + 63) / 64]uint64

var dayNames = [7]string{"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}

// minuteOfWeek is t's UTC minute of the week, Monday 00:00 = 0. It works on
// Unix seconds (1970-01-01 was a Thursday) so it neither allocates nor
// consults a time zone.
func minuteOfWeek(t time.Time) int {
	m := floorDiv(t.Unix(), 60) + 3*minutesPerDay
	m %= minutesPerWeek
	if m < 0 {
		m += minutesPerWeek
	}
	return int(m)
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

func (m *weekMask) has(minute int) bool { return m[minute>>6]&(1<<(minute&63)) != 0 }

// add sets [from, to) in minutes of the week; to may pass the end of the week
// and wraps to Monday.
func (m *weekMask) add(from, to int) {
	for i := from; i < to; i++ {
		j := i % minutesPerWeek
		m[j>>6] |= 1 << (j & 63)
	}
}

func (m *weekMask) full() bool {
	for i := 0; i < minutesPerWeek; i++ {
		if !m.has(i) {
			return false
		}
	}
	return true
}

// untilNext is the number of minutes from minute until the next minute in
// the mask (0 if minute is in it), or -1 for an empty mask.
func (m *weekMask) untilNext(minute int) int {
	for d := 0; d < minutesPerWeek; {
		i := (minute + d) % minutesPerWeek
		w := m[i>>6] >> (i & 63)
		if w != 0 {
			tz := bits.TrailingZeros64(w)
			if i+tz < minutesPerWeek {
				return d + tz
			}
		}
		// Skip to the next word, or to the week's end if this word holds it.
		step := 64 - i&63
		if i+step > minutesPerWeek {
			step = minutesPerWeek - i
		}
		d += step
	}
	return -1
}

// canonical renders the mask as its maximal runs, each "Ddd HH:MM-Ddd HH:MM"
// (start inclusive, end exclusive, end day named even when it is the same
// day), sorted by start, a run across Sunday midnight kept whole. Any two
// window lists that allow the same minutes render the same. A full week
// renders nil: the same as no windows.
func (m *weekMask) canonical() []string {
	if m.full() {
		return nil
	}
	start := 0
	for m.has(start) {
		start++
	}
	type run struct{ from, to int }
	var runs []run
	for d := 0; d < minutesPerWeek; d++ {
		i := (start + d) % minutesPerWeek
		if !m.has(i) {
			continue
		}
		n := 0
		for m.has((i + n) % minutesPerWeek) {
			n++
		}
		runs = append(runs, run{i, (i + n) % minutesPerWeek})
		d += n - 1
	}
	slices.SortFunc(runs, func(a, b run) int { return a.from - b.from })
	out := make([]string, len(runs))
	for i, r := range runs {
		out[i] = formatMinute(r.from) + "-" + formatMinute(r.to)
	}
	return out
}

func formatMinute(m int) string {
	d, rest := m/minutesPerDay, m%minutesPerDay
	return fmt.Sprintf("%s %02d:%02d", dayNames[d], rest/60, rest%60)
}

// addWindow parses one window, "DAYS HH:MM-HH:MM" in UTC, into the mask.
// DAYS is "daily", a day ("Mon"), a range ("Mon-Fri", may wrap: "Fri-Mon") or
// a comma list of those ("Mon,Wed,Fri-Sat"); day names are case-insensitive.
// The end time is exclusive and may be 24:00; an end before the start runs
// past midnight into the next day ("Fri 22:00-02:00" ends Saturday 02:00).
func (m *weekMask) addWindow(s string) error {
	const want = `want "DAYS HH:MM-HH:MM" in UTC, e.g. "Mon-Fri 08:00-18:00"`
	f := strings.Fields(s)
	if len(f) != 2 {
		return fmt.Errorf("%q: %s", s, want)
	}
	days, err := parseDays(f[0])
	if err != nil {
		return fmt.Errorf("%q: %v; %s", s, err, want)
	}
	a, b, ok := strings.Cut(f[1], "-")
	if !ok {
		return fmt.Errorf("%q: %s", s, want)
	}
	from, err := parseClock(a, false)
	if err != nil {
		return fmt.Errorf("%q: start %v", s, err)
	}
	to, err := parseClock(b, true)
	if err != nil {
		return fmt.Errorf("%q: end %v", s, err)
	}
	if from == to {
		return fmt.Errorf("%q: start and end are equal (use 00:00-24:00 for a whole day)", s)
	}
	for d := range 7 {
		if days&(1<<d) == 0 {
			continue
		}
		base := d * minutesPerDay
		if to > from {
			m.add(base+from, base+to)
		} else {
			m.add(base+from, base+minutesPerDay+to)
		}
	}
	return nil
}

func parseDays(s string) (uint8, error) {
	if strings.EqualFold(s, "daily") {
		return 0x7f, nil
	}
	var set uint8
	for part := range strings.SplitSeq(s, ",") {
		a, b, isRange := strings.Cut(part, "-")
		from, ok := dayIndex(a)
		if !ok {
			return 0, fmt.Errorf("unknown day %q", a)
		}
		to := from
		if isRange {
			if to, ok = dayIndex(b); !ok {
				return 0, fmt.Errorf("unknown day %q", b)
			}
		}
		for d := from; ; d = (d + 1) % 7 {
			set |= 1 << d
			if d == to {
				break
			}
		}
	}
	return set, nil
}

func dayIndex(s string) (int, bool) {
	for i, n := range dayNames {
		if strings.EqualFold(s, n) {
			return i, true
		}
	}
	return 0, false
}

// parseClock reads H:MM or HH:MM; 24:00 only as an end.
func parseClock(s string, end bool) (int, error) {
	h, mm, ok := strings.Cut(s, ":")
	if !ok || len(h) < 1 || len(h) > 2 || len(mm) != 2 {
		return 0, fmt.Errorf("%q: want HH:MM", s)
	}
	hour, err1 := strconv.Atoi(h)
	minute, err2 := strconv.Atoi(mm)
	if err1 != nil || err2 != nil || h[0] == '+' || h[0] == '-' || mm[0] == '+' || mm[0] == '-' {
		return 0, fmt.Errorf("%q: want HH:MM", s)
	}
	if end && hour == 24 && minute == 0 {
		return minutesPerDay, nil
	}
	if hour > 23 || minute > 59 {
		return 0, fmt.Errorf("%q: out of range (00:00-23:59, or 24:00 as an end)", s)
	}
	return hour*60 + minute, nil
}
