package policy

import (
	"crypto"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/providers"
)

func mustParse(t testing.TB, src string) *Set {
	t.Helper()
	s, err := Parse("policy.yaml", []byte(src))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return s
}

func TestLoadExample(t *testing.T) {
	s, err := Load("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Tenants(); !slices.Equal(got, []string{"payments", "shop"}) {
		t.Fatalf("Tenants = %v", got)
	}
	sl, ok := s.Slot("payments", "release")
	if !ok {
		t.Fatal("payments/release not found")
	}
	if sl.FullName() != "payments/release" || sl.Key != "hsm-release" || sl.Tenant != "payments" {
		t.Errorf("slot = %q key %q tenant %q", sl.FullName(), sl.Key, sl.Tenant)
	}
	p := sl.Policy
	wantAlgs := []providers.Algorithm{
		{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256},
		{Scheme: providers.SchemePSS, Hash: crypto.SHA256},
		{Scheme: providers.SchemeEd25519},
	}
	if !slices.Equal(p.Algorithms, wantAlgs) {
		t.Errorf("Algorithms = %v", p.Algorithms)
	}
	if p.Rate == nil || *p.Rate != (Rate{PerSecond: 100, Burst: 200}) || p.DailyQuota != 100000 {
		t.Errorf("Rate = %v, DailyQuota = %d", p.Rate, p.DailyQuota)
	}
	wantWin := []string{"Mon 08:00-Mon 18:00", "Tue 08:00-Tue 18:00", "Wed 08:00-Wed 18:00",
		"Thu 08:00-Thu 18:00", "Fri 08:00-Fri 18:00", "Sat 10:00-Sat 12:00"}
	if !slices.Equal(p.Windows, wantWin) {
		t.Errorf("Windows = %q", p.Windows)
	}
	if want := []string{"mtls:spiffe://example.org/payments/ci", "uid:1001"}; !slices.Equal(p.Clients, want) {
		t.Errorf("Clients = %q", p.Clients)
	}
	canary, _ := s.Slot("payments", "canary")
	if canary.Key != "soft-canary-v2" || len(canary.Versions) != 2 || !canary.Policy.Paused {
		t.Errorf("canary = %+v", canary)
	}
	if len(canary.Policy.Algorithms) != len(AlgorithmNames()) || canary.Policy.Rate != nil || canary.Policy.Windows != nil {
		t.Errorf("canary policy defaults = %+v", canary.Policy)
	}
	if _, ok := s.Slot("payments", "nope"); ok {
		t.Error("found a slot that does not exist")
	}
	if _, ok := s.Slot("shop", "canary"); ok {
		t.Error("shop sees payments/canary")
	}
	var all []string
	for _, sl := range s.AllSlots() {
		all = append(all, sl.FullName())
	}
	if want := []string{"payments/canary", "payments/release", "shop/release"}; !slices.Equal(all, want) {
		t.Errorf("AllSlots = %q", all)
	}
	if got := len(s.Slots("payments")); got != 2 {
		t.Errorf("Slots(payments) = %d slots", got)
	}
	if s.Slots("nobody") != nil {
		t.Error("Slots of an unknown tenant")
	}
}

func TestTenantOfAndAdmin(t *testing.T) {
	s, err := Load("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		id     Identity
		tenant string
		admin  bool
	}{
		{UnixIdentity(1001, 9), "payments", false},
		{UnixIdentity(9, 2001), "payments", false},
		{UnixIdentity(1002, 2001), "shop", false}, // uid before gid
		{UnixIdentity(0, 0), "", true},
		{UnixIdentity(5, 5), "", false},
		{MTLSIdentity("payments-client"), "payments", false},
		{MTLSIdentity("spiffe://example.org/payments/ci"), "payments", false},
		{MTLSIdentity("spiffe://example.org/payments/"), "", false}, // a prefix matches longer names only
		{MTLSIdentity("spiffe://example.org/payments"), "", false},
		{MTLSIdentity("spiffe://example.org/paymentsX/a"), "", false},
		{MTLSIdentity("spiffe://example.org/ops"), "", true},
		{MTLSIdentity(""), "", false},
		{Identity{}, "", false},
	} {
		got, ok := s.TenantOf(tc.id)
		if got != tc.tenant || ok != (tc.tenant != "") {
			t.Errorf("TenantOf(%v) = %q, %v; want %q", tc.id, got, ok, tc.tenant)
		}
		if a := s.IsAdmin(tc.id); a != tc.admin {
			t.Errorf("IsAdmin(%v) = %v", tc.id, a)
		}
	}
}

func TestLoadDirectory(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("10-payments.yaml", "admins: {unix_uids: [0]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [1001]}\n    slots: [{name: release, key: k1}]\n")
	write("20-shop.yml", "admins: {unix_uids: [7]}\ntenants:\n  - name: shop\n    identities: {unix_uids: [1002]}\n")
	write("README.md", "not a policy")
	write(".hidden.yaml", "garbage: [")
	s, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(s.Tenants(), []string{"payments", "shop"}) || !slices.Equal(s.Admins.UnixUIDs, []uint32{0, 7}) {
		t.Fatalf("tenants %v admins %v", s.Tenants(), s.Admins)
	}
	// The same content in one file hashes the same.
	one := mustParse(t, "admins: {unix_uids: [7, 0]}\ntenants:\n  - name: shop\n    identities: {unix_uids: [1002]}\n  - name: payments\n    identities: {unix_uids: [1001]}\n    slots: [{name: release, key: k1}]\n")
	if one.Hash() != s.Hash() {
		t.Errorf("directory and single file hash differently:\n%s\n%s", s.Canonical(), one.Canonical())
	}

	// Errors across files name each file.
	write("30-dup.yaml", "tenants:\n  - name: payments\n    identities: {unix_uids: [1001]}\n")
	_, err = Load(dir)
	want := filepath.Join(dir, "30-dup.yaml") + `:2: tenants[0].name: tenant "payments" is already defined at ` + filepath.Join(dir, "10-payments.yaml") + ":3"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("err = %v\nwant %s", err, want)
	}
	if err := Validate(dir); err == nil {
		t.Error("Validate accepted a duplicate tenant")
	}

	empty := t.TempDir()
	if _, err := Load(empty); err == nil {
		t.Error("an empty directory loaded")
	}
	if _, err := Load(filepath.Join(empty, "missing.yaml")); err == nil {
		t.Error("a missing file loaded")
	}
}

func TestParseErrors(t *testing.T) {
	const head = "tenants:\n  - name: payments\n    identities: {unix_uids: [1001]}\n    slots:\n"
	for _, tc := range []struct {
		name string
		src  string
		want []string // each must appear in the error
	}{
		{"yaml syntax", "tenants: [\n", []string{"policy.yaml:1: YAML: did not find expected node content"}},
		{"not a mapping", "- a\n", []string{"policy.yaml:1: want a mapping of admins, tenants"}},
		{"unknown top-level field", "tenant: []\n", []string{"policy.yaml:1: tenant: unknown field (want admins, tenants)"}},
		{"unknown slot field", head + "      - name: release\n        key: k\n        polcy: {}\n",
			[]string{"policy.yaml:7: tenants[0].slots[0].polcy: unknown field (want name, key, versions, policy)"}},
		{"unknown policy field", head + "      - name: release\n        key: k\n        policy:\n          paused: false\n          rates: {}\n",
			[]string{"policy.yaml:9: tenants[0].slots[0].policy.rates: unknown field"}},
		{"repeated field", head + "      - name: release\n        key: k\n        key: j\n",
			[]string{"policy.yaml:7: tenants[0].slots[0].key: repeated field"}},
		{"rate per_second zero", head + "      - name: release\n        key: k\n        policy:\n          rate:\n            per_second: 0\n",
			[]string{"policy.yaml:9: tenants[0].slots[0].policy.rate.per_second: must be > 0"}},
		{"rate per_second not a number", head + "      - name: release\n        key: k\n        policy:\n          rate: {per_second: fast}\n",
			[]string{`policy.yaml:8: tenants[0].slots[0].policy.rate.per_second: want a number, got "fast"`}},
		{"rate burst zero", head + "      - name: release\n        key: k\n        policy:\n          rate: {per_second: 1, burst: 0}\n",
			[]string{"policy.yaml:8: tenants[0].slots[0].policy.rate.burst: must be between 1 and 1000000"}},
		{"rate without per_second", head + "      - name: release\n        key: k\n        policy:\n          rate: {burst: 5}\n",
			[]string{"policy.yaml:8: tenants[0].slots[0].policy.rate.per_second: required"}},
		{"rate too slow to refill", head + "      - name: release\n        key: k\n        policy:\n          rate: {per_second: 0.00001, burst: 1000}\n",
			[]string{"policy.yaml:8: tenants[0].slots[0].policy.rate: burst 1000 at 1e-05 per second takes longer than a year"}},
		{"quota zero", head + "      - name: release\n        key: k\n        policy:\n          daily_quota: 0\n",
			[]string{"policy.yaml:8: tenants[0].slots[0].policy.daily_quota: must be between 1 and"}},
		{"the overflow uid", "tenants:\n  - name: a\n    identities: {unix_uids: [65534]}\n    slots: [{name: s, key: k}]\n",
			[]string{`policy.yaml:3: tenants[0].identities.unix_uids[0]: 65534 is the kernel's overflow id (nobody)`}},
		{"the overflow gid of an admin", "admins: {unix_gids: [65534]}\ntenants:\n  - name: a\n    identities: {unix_uids: [1001]}\n    slots: [{name: s, key: k}]\n",
			[]string{`policy.yaml:1: admins.unix_gids[0]: 65534 is the kernel's overflow id (nobody)`}},
		{"uid -1 as unsigned", "tenants:\n  - name: a\n    identities: {unix_uids: [4294967295]}\n    slots: [{name: s, key: k}]\n",
			[]string{`policy.yaml:3: tenants[0].identities.unix_uids[0]: 4294967295 is (uid_t)-1, which names no user`}},
		{"uid with a leading zero", "tenants:\n  - name: a\n    identities: {unix_uids: [01001]}\n    slots: [{name: s, key: k}]\n",
			[]string{`policy.yaml:3: tenants[0].identities.unix_uids[0]: write "01001" in plain decimal digits`}},
		{"quota in octal", head + "      - name: release\n        key: k\n        policy:\n          daily_quota: 0o10000\n",
			[]string{`policy.yaml:8: tenants[0].slots[0].policy.daily_quota: write "0o10000" in plain decimal digits`}},
		{"burst in hex", head + "      - name: release\n        key: k\n        policy:\n          rate: {per_second: 1, burst: 0x10}\n",
			[]string{`tenants[0].slots[0].policy.rate.burst: write "0x10" in plain decimal digits`}},
		{"per_second with a leading zero", head + "      - name: release\n        key: k\n        policy:\n          rate: {per_second: 010}\n",
			[]string{`tenants[0].slots[0].policy.rate.per_second: write "010" in plain decimal digits`}},
		{"quota string", head + "      - name: release\n        key: k\n        policy:\n          daily_quota: \"100\"\n",
			[]string{`policy.yaml:8: tenants[0].slots[0].policy.daily_quota: want an integer, got "100"`}},
		{"bad window syntax", head + "      - name: release\n        key: k\n        policy:\n          windows:\n            - Mon-Fri 08:00-18:00\n            - Mon-Fri 8-18\n",
			[]string{`policy.yaml:10: tenants[0].slots[0].policy.windows[1]: "Mon-Fri 8-18": start "8": want HH:MM`}},
		{"bad window day", head + "      - name: release\n        key: k\n        policy:\n          windows: [\"Mon-Fry 08:00-18:00\"]\n",
			[]string{`policy.yaml:8: tenants[0].slots[0].policy.windows[0]: "Mon-Fry 08:00-18:00": unknown day "Fry"`}},
		{"bad window hour", head + "      - name: release\n        key: k\n        policy:\n          windows: [\"Mon 08:00-25:00\"]\n",
			[]string{`policy.yaml:8: tenants[0].slots[0].policy.windows[0]: "Mon 08:00-25:00": end "25:00": out of range`}},
		{"empty window", head + "      - name: release\n        key: k\n        policy:\n          windows: [\"Mon 08:00-08:00\"]\n",
			[]string{`start and end are equal`}},
		{"empty windows list", head + "      - name: release\n        key: k\n        policy:\n          windows: []\n",
			[]string{"policy.yaml:8: tenants[0].slots[0].policy.windows: lists no window"}},
		{"duplicate slot", head + "      - name: release\n        key: k\n      - name: other\n        key: k\n      - name: release\n        key: j\n",
			[]string{`policy.yaml:9: tenants[0].slots[2].name: slot "release" is already defined in this tenant at policy.yaml:5`}},
		{"duplicate tenant", head + "      - {name: release, key: k}\n  - name: payments\n    identities: {unix_uids: [1002]}\n",
			[]string{`policy.yaml:6: tenants[1].name: tenant "payments" is already defined at policy.yaml:2`}},
		{"uid in two tenants", head + "      - {name: release, key: k}\n  - name: shop\n    identities:\n      unix_uids: [1001]\n",
			[]string{`policy.yaml:8: tenants[1].identities.unix_uids[0]: uid 1001 already belongs to tenant "payments" at policy.yaml:3`}},
		{"gid in two tenants", "tenants:\n  - {name: a, identities: {unix_gids: [5]}}\n  - {name: b, identities: {unix_gids: [6, 5]}}\n",
			[]string{`policy.yaml:3: tenants[1].identities.unix_gids[1]: gid 5 already belongs to tenant "a" at policy.yaml:2`}},
		{"mtls name in two tenants", "tenants:\n  - {name: a, identities: {mtls: [x]}}\n  - {name: b, identities: {mtls: [x]}}\n",
			[]string{`policy.yaml:3: tenants[1].identities.mtls[0]: mTLS name "x" overlaps mTLS name "x" of tenant "a" at policy.yaml:2`}},
		{"mtls prefix overlaps", "tenants:\n  - {name: a, identities: {mtls: [\"spiffe://x/a/*\"]}}\n  - {name: b, identities: {mtls: [\"spiffe://x/a/b\"]}}\n",
			[]string{`policy.yaml:3: tenants[1].identities.mtls[0]: mTLS name "spiffe://x/a/b" overlaps mTLS prefix "spiffe://x/a/*" of tenant "a"`}},
		{"mtls prefix covers an earlier name", "tenants:\n  - {name: a, identities: {mtls: [\"spiffe://x/a/b\"]}}\n  - {name: b, identities: {mtls: [\"spiffe://x/a/*\"]}}\n",
			[]string{`policy.yaml:3: tenants[1].identities.mtls[0]: mTLS prefix "spiffe://x/a/*" overlaps mTLS name "spiffe://x/a/b" of tenant "a"`}},
		{"mtls prefixes overlap", "tenants:\n  - {name: a, identities: {mtls: [\"spiffe://x/a/*\"]}}\n  - {name: b, identities: {mtls: [\"spiffe://x/a/b/*\"]}}\n",
			[]string{`policy.yaml:3: tenants[1].identities.mtls[0]: mTLS prefix "spiffe://x/a/b/*" overlaps mTLS prefix "spiffe://x/a/*" of tenant "a"`}},
		{"bad mtls pattern", "tenants:\n  - {name: a, identities: {mtls: [\"CN=a*\"]}}\n",
			[]string{`policy.yaml:2: tenants[0].identities.mtls[0]: "CN=a*": "*" is only allowed`}},
		{"unknown algorithm", head + "      - name: release\n        key: k\n        policy:\n          algorithms: [ecdsa-sha256, ecdsa-md5]\n",
			[]string{`policy.yaml:8: tenants[0].slots[0].policy.algorithms[1]: unknown algorithm "ecdsa-md5" (want one of ecdsa-sha256,`}},
		{"empty algorithms", head + "      - name: release\n        key: k\n        policy: {algorithms: []}\n",
			[]string{`policy.yaml:7: tenants[0].slots[0].policy.algorithms: lists no algorithm`}},
		{"bad tenant name", "tenants:\n  - name: Payments\n    identities: {unix_uids: [1]}\n",
			[]string{`policy.yaml:2: tenants[0].name: name "Payments" character 'P' not allowed`}},
		{"bad slot name", head + "      - name: rel/ease\n        key: k\n",
			[]string{`policy.yaml:5: tenants[0].slots[0].name: name "rel/ease" character '/' not allowed`}},
		{"slot name starts with dot", head + "      - name: .release\n        key: k\n",
			[]string{`policy.yaml:5: tenants[0].slots[0].name: name ".release" must start with a letter or digit`}},
		{"missing name and identities", "tenants:\n  - slots: []\n",
			[]string{"policy.yaml:2: tenants[0].name: required", "policy.yaml:2: tenants[0].identities: required"}},
		{"missing key", head + "      - name: release\n",
			[]string{"policy.yaml:5: tenants[0].slots[0].key: required"}},
		{"key and versions", head + "      - name: release\n        key: k\n        versions: [{version: 1, key: k}]\n",
			[]string{"policy.yaml:5: tenants[0].slots[0].versions: give key or versions, not both"}},
		{"duplicate version", head + "      - name: release\n        versions:\n          - {version: 1, key: a}\n          - {version: 1, key: b}\n",
			[]string{"policy.yaml:8: tenants[0].slots[0].versions[1].version: version 1 is already listed at policy.yaml:7"}},
		{"unknown version field", head + "      - name: release\n        versions:\n          - {version: 1, key: a, state: active}\n",
			[]string{"policy.yaml:7: tenants[0].slots[0].versions[0].state: unknown field (want version, key)"}},
		{"client of another tenant", head + "      - name: release\n        key: k\n        policy: {clients: [\"uid:1002\"]}\n  - name: shop\n    identities: {unix_uids: [1002]}\n",
			[]string{`policy.yaml:7: tenants[0].slots[0].policy.clients[0]: uid 1002 belongs to tenant "shop" (policy.yaml:9); it can never use a slot of "payments"`}},
		{"client not in tenant", head + "      - name: release\n        key: k\n        policy:\n          clients: [spiffe://example.org/payments]\n",
			[]string{`policy.yaml:8: tenants[0].slots[0].policy.clients[0]: mTLS name "spiffe://example.org/payments" is not an identity of tenant "payments"`}},
		{"bad client", head + "      - name: release\n        key: k\n        policy:\n          clients: [\"uid:root\"]\n",
			[]string{`policy.yaml:8: tenants[0].slots[0].policy.clients[0]: "uid:root": want uid:N`}},
		// A null required field is missing, not of the wrong type.
		{"slot name null", head + "      - name:\n        key: k\n",
			[]string{"policy.yaml:5: tenants[0].slots[0].name: required"}},
		{"per_second null", head + "      - name: release\n        key: k\n        policy:\n          rate: {per_second: ~, burst: 5}\n",
			[]string{"policy.yaml:8: tenants[0].slots[0].policy.rate.per_second: required"}},
		{"version null", head + "      - name: release\n        versions:\n          - {version: null, key: a}\n",
			[]string{"policy.yaml:7: tenants[0].slots[0].versions[0].version: required"}},
		{"versions null without key", head + "      - name: release\n        versions:\n",
			[]string{"policy.yaml:5: tenants[0].slots[0].key: required"}},
		{"paused not a bool", head + "      - name: release\n        key: k\n        policy: {paused: \"yes\"}\n",
			[]string{`policy.yaml:7: tenants[0].slots[0].policy.paused: want true or false, got "yes"`}},
		{"uid out of range", "tenants:\n  - {name: a, identities: {unix_uids: [-1]}}\n",
			[]string{`policy.yaml:2: tenants[0].identities.unix_uids[0]: -1 is out of range for a Unix id`}},
		{"alias bomb", aliasBomb(),
			[]string{"the policy is too large once aliases are expanded"}},
		{"two documents", "tenants: []\n---\ntenants: []\n",
			[]string{"policy.yaml:2: a policy file holds one YAML document"}},
		{"errors are all collected", head + "      - name: release\n        key: k\n        bogus: 1\n        policy:\n          rate: {per_second: -1}\n          windows: [\"Someday 10:00-11:00\"]\n",
			[]string{"policy.yaml:7: tenants[0].slots[0].bogus", "policy.yaml:9: tenants[0].slots[0].policy.rate.per_second", "policy.yaml:10: tenants[0].slots[0].policy.windows[0]"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("policy.yaml", []byte(tc.src))
			if err == nil {
				t.Fatalf("parsed; want errors %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error:\n%v\nwant it to contain:\n%s", err, w)
				}
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Errorf("error is not a *FieldError: %T", err)
			}
		})
	}
}

func TestParseAccepts(t *testing.T) {
	for _, src := range []string{
		"",
		"# only a comment\n",
		"admins: {unix_uids: [0]}\n",
		"tenants: []\n",
		// null values are absent
		"tenants:\n  - name: a\n    identities: {unix_uids: [1]}\n    slots:\n      - name: s\n        key: k\n        policy:\n          rate:\n          windows:\n          clients:\n",
		// anchors
		"admins: &ids {unix_uids: [1]}\ntenants:\n  - {name: a, identities: *ids}\n",
		// a client prefix that covers the whole of the tenant's prefix
		"tenants:\n  - name: a\n    identities: {mtls: [\"spiffe://x/a/team/*\"]}\n    slots: [{name: s, key: k, policy: {clients: [\"spiffe://x/a/*\"]}}]\n",
		// an mTLS client under a prefix of the tenant; uid client via gid membership
		"tenants:\n  - name: a\n    identities: {unix_gids: [10], mtls: [\"spiffe://x/a/*\"]}\n    slots: [{name: s, key: k, policy: {clients: [\"spiffe://x/a/ci\", \"spiffe://x/a/ci/*\", \"uid:55\", \"gid:10\"]}}]\n",
	} {
		if _, err := Parse("policy.yaml", []byte(src)); err != nil {
			t.Errorf("Parse(%q): %v", src, err)
		}
	}
}

// aliasBomb is a "billion laughs" policy: 200 tenants of 200 slots of 200
// versions, written in 600 aliases.
func aliasBomb() string {
	more := func(name string) string { return strings.Repeat(", *"+name, 199) }
	return "tenants: [&T {name: a, identities: {unix_uids: [1]}, slots: [&S {name: s, versions: [&V {version: 1, key: k}" +
		more("V") + "]}" + more("S") + "]}" + more("T") + "]\n"
}

// A field set to null or left empty is the same as an absent field
// (docs/policy.md), whatever its type: each case parses to the policy its
// counterpart without the field parses to.
func TestNullIsAbsent(t *testing.T) {
	const head = "tenants:\n  - name: a\n    identities: {unix_uids: [1]}\n    slots:\n      - name: s\n"
	for _, tc := range []struct {
		name      string
		src, bare string
	}{
		{"paused empty", head + "        key: k\n        policy:\n          paused:\n", head + "        key: k\n"},
		{"paused ~", head + "        key: k\n        policy: {paused: ~}\n", head + "        key: k\n"},
		{"burst empty", head + "        key: k\n        policy:\n          rate:\n            per_second: 10\n            burst:\n", head + "        key: k\n        policy: {rate: {per_second: 10}}\n"},
		{"burst null", head + "        key: k\n        policy: {rate: {per_second: 0.5, burst: null}}\n", head + "        key: k\n        policy: {rate: {per_second: 0.5}}\n"},
		{"daily_quota and rate null", head + "        key: k\n        policy: {rate: null, daily_quota: ~}\n", head + "        key: k\n"},
		{"key null beside versions", head + "        key:\n        versions: [{version: 2, key: k}]\n", head + "        versions: [{version: 2, key: k}]\n"},
		{"versions null beside key", head + "        key: k\n        versions:\n", head + "        key: k\n"},
		{"policy null", head + "        key: k\n        policy:\n", head + "        key: k\n"},
		{"mtls null", "tenants:\n  - {name: a, identities: {unix_uids: [1], mtls: ~}}\n", "tenants:\n  - {name: a, identities: {unix_uids: [1]}}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, want := mustParse(t, tc.src), mustParse(t, tc.bare)
			if got.Hash() != want.Hash() {
				t.Errorf("parses as\n%s\nwant\n%s", got.Canonical(), want.Canonical())
			}
		})
	}
}
