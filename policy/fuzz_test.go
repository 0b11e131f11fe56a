package policy

import (
	"crypto"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/sigil-agent/sigil/providers"
)

// FuzzParse feeds arbitrary files to the policy loader. It must return a Set
// or errors, never panic. A policy that loads must load again to the same
// canonical form and hash (the hash is stamped on every signature and audit
// record, so it may depend on nothing but the file), must render back to a
// file that loads to the same hash (the canonical form loses nothing the
// engine uses), and must serve Check on every slot. A policy that is refused
// must be refused with the same report every time.
//
// Seeds: testdata/fuzz/FuzzParse (the examples of docs/policy.md) and
// testdata/example.yaml.
func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile("testdata/example.yaml"); err == nil {
		f.Add(data)
	}
	f.Add([]byte(hashBase))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := Parse("policy.yaml", data)
		again, errAgain := Parse("policy.yaml", data)
		if err != nil {
			if errAgain == nil || errAgain.Error() != err.Error() {
				t.Fatalf("refused, then %v on the same input:\n%v", errAgain, err)
			}
			if err.Error() == "" {
				t.Fatal("refused with an empty report")
			}
			return
		}
		if errAgain != nil {
			t.Fatalf("loaded, then refused on the same input: %v", errAgain)
		}
		if s.Hash() != again.Hash() || string(s.Canonical()) != string(again.Canonical()) {
			t.Fatalf("two loads of one input hash differently:\n%s\n%s", s.Canonical(), again.Canonical())
		}
		for _, name := range s.Tenants() {
			h1, _ := s.TenantHash(name)
			h2, ok := again.TenantHash(name)
			if !ok || h1 != h2 {
				t.Fatalf("tenant %q hashes differently across two loads", name)
			}
		}

		rendered := renderPolicy(t, s)
		back, err := Parse("rendered.yaml", []byte(rendered))
		if err != nil {
			t.Fatalf("the policy rendered from a loaded one does not load: %v\n%s", err, rendered)
		}
		if back.Hash() != s.Hash() {
			t.Fatalf("rendered policy hashes differently:\n%s\n%s\nrendered:\n%s", s.Canonical(), back.Canonical(), rendered)
		}

		checkEverySlot(s)
	})
}

// checkEverySlot runs the engine over every slot with each identity the
// policy names, at a fixed time: whatever it decides, it must not panic.
func checkEverySlot(s *Set) {
	clock := time.Date(2026, 3, 2, 9, 30, 0, 0, time.UTC) // a Monday inside office hours
	e := NewEngine(s, func() time.Time { return clock })
	for _, sl := range s.AllSlots() {
		t, _ := s.Tenant(sl.Tenant)
		ids := []Identity{UnixIdentity(0, 0)}
		for _, u := range t.Identities.UnixUIDs {
			ids = append(ids, UnixIdentity(u, u))
		}
		for _, g := range t.Identities.UnixGIDs {
			ids = append(ids, UnixIdentity(1<<31, g))
		}
		for _, n := range t.Identities.MTLS {
			ids = append(ids, MTLSIdentity(strings.TrimSuffix(n, "*")+"x"))
		}
		for _, id := range ids {
			s.TenantOf(id)
			s.IsAdmin(id)
			for _, alg := range append(sl.Policy.Algorithms, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}) {
				n := digestSize(alg)
				if n < 0 {
					n = 64 // a pure Ed25519 message
				}
				e.Check(sl.Tenant, sl.Name, id, alg, n)
			}
		}
	}
}

// renderPolicy writes a Set back as a policy file from its exported fields,
// every string double-quoted with YAML escapes.
func renderPolicy(t *testing.T, s *Set) string {
	var b strings.Builder
	b.WriteString("admins:\n")
	renderIdentities(&b, "  ", s.Admins)
	b.WriteString("tenants:\n")
	for _, name := range s.Tenants() {
		tn, _ := s.Tenant(name)
		fmt.Fprintf(&b, "  - name: %s\n    identities:\n", yamlQuote(tn.Name))
		renderIdentities(&b, "      ", tn.Identities)
		if len(tn.Slots) == 0 {
			continue
		}
		b.WriteString("    slots:\n")
		for _, sl := range tn.Slots {
			fmt.Fprintf(&b, "      - name: %s\n        versions:\n", yamlQuote(sl.Name))
			for _, v := range sl.Versions {
				fmt.Fprintf(&b, "          - {version: %d, key: %s}\n", v.Number, yamlQuote(v.Key))
			}
			p := sl.Policy
			fmt.Fprintf(&b, "        policy:\n          paused: %t\n          algorithms: [%s]\n", p.Paused, strings.Join(p.algs.names(), ", "))
			if p.Rate != nil {
				fmt.Fprintf(&b, "          rate: {per_second: %s, burst: %d}\n", strconv.FormatFloat(p.Rate.PerSecond, 'g', -1, 64), p.Rate.Burst)
			}
			if p.DailyQuota != 0 {
				fmt.Fprintf(&b, "          daily_quota: %d\n", p.DailyQuota)
			}
			if len(p.Windows) > 0 {
				b.WriteString("          windows:\n")
				for _, w := range p.Windows {
					for _, day := range dailyWindows(t, w) {
						fmt.Fprintf(&b, "            - %s\n", yamlQuote(day))
					}
				}
			}
			if len(p.Clients) > 0 {
				b.WriteString("          clients:\n")
				for _, c := range p.Clients {
					fmt.Fprintf(&b, "            - %s\n", yamlQuote(c))
				}
			}
		}
	}
	return b.String()
}

func renderIdentities(b *strings.Builder, indent string, ids Identities) {
	list := func(name string, items []string) {
		fmt.Fprintf(b, "%s%s: [%s]\n", indent, name, strings.Join(items, ", "))
	}
	var uids, gids, names []string
	for _, u := range ids.UnixUIDs {
		uids = append(uids, strconv.FormatUint(uint64(u), 10))
	}
	for _, g := range ids.UnixGIDs {
		gids = append(gids, strconv.FormatUint(uint64(g), 10))
	}
	for _, n := range ids.MTLS {
		names = append(names, yamlQuote(n))
	}
	list("unix_uids", uids)
	list("unix_gids", gids)
	list("mtls", names)
}

// dailyWindows turns one canonical run, "Ddd HH:MM-Ddd HH:MM" (which may
// span days), into the file syntax: one "Ddd HH:MM-HH:MM" per day touched.
func dailyWindows(t *testing.T, run string) []string {
	minute := func(s string) int {
		day, clock, ok := strings.Cut(s, " ")
		d, dok := dayIndex(day)
		m, err := parseClock(clock, false)
		if !ok || !dok || err != nil {
			t.Fatalf("canonical window %q: bad bound %q", run, s)
		}
		return d*minutesPerDay + m
	}
	a, b, ok := strings.Cut(run, "-")
	if !ok {
		t.Fatalf("canonical window %q has no '-'", run)
	}
	from, to := minute(a), minute(b)
	if to <= from {
		to += minutesPerWeek
	}
	var out []string
	for cur := from; cur < to; {
		dayEnd := (cur/minutesPerDay + 1) * minutesPerDay
		end := min(to, dayEnd)
		endClock := fmt.Sprintf("%02d:%02d", (end-cur/minutesPerDay*minutesPerDay)/60, end%60)
		out = append(out, fmt.Sprintf("%s %02d:%02d-%s", dayNames[cur/minutesPerDay%7], cur%minutesPerDay/60, cur%60, endClock))
		cur = end
	}
	return out
}

// yamlQuote writes s as a YAML double-quoted scalar that escapes everything
// but printable ASCII, so no byte of s can be read as YAML syntax.
func yamlQuote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r >= 0x20 && r < 0x7f:
			b.WriteRune(r)
		case r == utf8.RuneError:
			b.WriteString(`\uFFFD`)
		case r <= 0xffff:
			fmt.Fprintf(&b, `\u%04X`, r)
		default:
			fmt.Fprintf(&b, `\U%08X`, r)
		}
	}
	b.WriteByte('"')
	return b.String()
}
