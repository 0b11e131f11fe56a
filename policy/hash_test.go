package policy

import (
	"encoding/hex"
	"strings"
	"testing"
)

const hashBase = `# base policy
admins:
  unix_uids: [0]
tenants:
  - name: payments
    identities:
      unix_uids: [1001]
      mtls: ["spiffe://example.org/payments/*"]
    slots:
      - name: release
        key: hsm-release
        policy:
          algorithms: [ecdsa-sha256, ed25519]
          rate: {per_second: 10, burst: 20}
          daily_quota: 1000
          windows: ["Mon-Fri 08:00-18:00"]
          clients: ["uid:1001"]
  - name: shop
    identities:
      unix_uids: [1002]
    slots:
      - name: release
        key: shop-release
`

func TestHashIgnoresPresentation(t *testing.T) {
	base := mustParse(t, hashBase)
	for name, src := range map[string]string{
		"comments and blank lines": strings.ReplaceAll(hashBase, "\n  - name: shop", "\n\n  # the shop\n  - name: shop # trailing"),
		"flow style, other key order, quotes, other indentation": `tenants:
- name: 'shop'
  slots: [{key: shop-release, name: release}]
  identities: {unix_uids: [1002]}
- slots:
  - policy:
      clients: ["uid:1001", "uid:1001"]
      windows: ["mon,tue,wed,thu,fri 08:00-12:00", "Mon-Fri 12:00-18:00"]
      daily_quota: 1000
      rate: {burst: 20, per_second: 10.0}
      algorithms: [ed25519, ecdsa-sha256, ed25519]
    key: "hsm-release"
    name: release
  identities: {mtls: ["spiffe://example.org/payments/*"], unix_uids: [1001, 1001]}
  name: payments
admins: {unix_uids: [0]}
`,
		"key as versions":   strings.Replace(hashBase, "        key: hsm-release\n", "        versions: [{version: 1, key: hsm-release}]\n", 1),
		"explicit defaults": strings.Replace(hashBase, "        key: shop-release\n", "        key: shop-release\n        policy: {paused: false, algorithms: [ecdsa-sha256, ecdsa-sha384, ecdsa-sha512, rsa-pkcs1v15-sha256, rsa-pkcs1v15-sha384, rsa-pkcs1v15-sha512, rsa-pss-sha256, rsa-pss-sha384, rsa-pss-sha512, ed25519], windows: [\"daily 00:00-24:00\"]}\n", 1),
		"null is absent":    strings.Replace(hashBase, "        key: shop-release\n", "        key: shop-release\n        policy: {rate: null, daily_quota: ~, clients: null}\n", 1),
	} {
		s := mustParse(t, src)
		if s.Hash() != base.Hash() {
			t.Errorf("%s: hash differs\nbase %s\ngot  %s", name, base.Canonical(), s.Canonical())
		}
		for _, tn := range base.Tenants() {
			a, _ := base.TenantHash(tn)
			b, _ := s.TenantHash(tn)
			if a != b {
				t.Errorf("%s: tenant %s hash differs", name, tn)
			}
		}
	}
}

func TestHashSeesMeaning(t *testing.T) {
	base := mustParse(t, hashBase)
	seen := map[[32]byte]string{base.Hash(): "base"}
	for name, edit := range map[string][2]string{
		"admin":            {"unix_uids: [0]", "unix_uids: [0, 5]"},
		"tenant name":      {"name: shop", "name: shop2"},
		"identity":         {"unix_uids: [1002]", "unix_uids: [1003]"},
		"mtls":             {"payments/*", "payments/ci"},
		"slot name":        {"name: release\n        key: shop", "name: release2\n        key: shop"},
		"key":              {"key: hsm-release", "key: hsm-release2"},
		"version number":   {"key: hsm-release", "versions: [{version: 2, key: hsm-release}]"},
		"algorithm":        {"[ecdsa-sha256, ed25519]", "[ecdsa-sha384, ed25519]"},
		"rate":             {"per_second: 10,", "per_second: 10.5,"},
		"burst":            {"burst: 20", "burst: 21"},
		"no rate":          {"rate: {per_second: 10, burst: 20}", "rate: null"},
		"quota":            {"daily_quota: 1000", "daily_quota: 1001"},
		"window":           {"Mon-Fri 08:00-18:00", "Mon-Fri 08:00-18:01"},
		"window days":      {"Mon-Fri 08:00-18:00", "Mon-Sat 08:00-18:00"},
		"clients":          {`["uid:1001"]`, `["uid:1001", "spiffe://example.org/payments/ci"]`},
		"paused":           {"daily_quota: 1000", "daily_quota: 1000\n          paused: true"},
		"no window":        {"          windows: [\"Mon-Fri 08:00-18:00\"]\n", ""},
		"tenant slot swap": {"name: release\n        key: shop-release", "name: release\n        key: hsm-release"},
	} {
		if !strings.Contains(hashBase, edit[0]) {
			t.Fatalf("%s: %q not in base", name, edit[0])
		}
		s, err := Parse("policy.yaml", []byte(strings.Replace(hashBase, edit[0], edit[1], 1)))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if prev, dup := seen[s.Hash()]; dup {
			t.Errorf("%s: same hash as %s\n%s", name, prev, s.Canonical())
		}
		seen[s.Hash()] = name
	}
}

// TestHashVector pins the canonical form and hash of a small policy. If this
// fails, every deployed policy hash has changed: that needs a new "format".
func TestHashVector(t *testing.T) {
	s := mustParse(t, `
tenants:
  - name: payments
    identities: {unix_uids: [1001]}
    slots:
      - name: release
        key: hsm-release
        policy:
          algorithms: [ecdsa-sha256]
          rate: {per_second: 100}
          daily_quota: 100000
          windows: ["Mon-Fri 08:00-18:00"]
`)
	const wantCanonical = `{"format":"sigil-policy/1","admins":{"unix_uids":[],"unix_gids":[],"mtls":[]},"tenants":[{"name":"payments","identities":{"unix_uids":[1001],"unix_gids":[],"mtls":[]},"slots":[{"name":"release","versions":[{"version":1,"key":"hsm-release"}],"policy":{"algorithms":["ecdsa-sha256"],"rate":{"per_second":100,"burst":100},"daily_quota":100000,"windows":["Mon 08:00-Mon 18:00","Tue 08:00-Tue 18:00","Wed 08:00-Wed 18:00","Thu 08:00-Thu 18:00","Fri 08:00-Fri 18:00"],"clients":null,"paused":false}}]}]}`
	if got := string(s.Canonical()); got != wantCanonical {
		t.Errorf("canonical:\n got %s\nwant %s", got, wantCanonical)
	}
	const wantHash = "f9a386c3ebd96dd4f92b95c6b9d3d3e36eb79f76d0bb95ed6cc5b4dac954871e"
	const wantTenantHash = "350d4b26677ea95738ab9712f6291820b4ea489ef1323a33d3e5b13badce9dde"
	if got := s.HashHex(); got != wantHash {
		t.Errorf("HashHex = %s, want %s", got, wantHash)
	}
	tn, _ := s.Tenant("payments")
	if got := tn.HashHex(); got != wantTenantHash {
		t.Errorf("tenant hash = %s, want %s", got, wantTenantHash)
	}
	h := s.Hash()
	if hex.EncodeToString(h[:]) != s.HashHex() {
		t.Error("Hash and HashHex disagree")
	}
}

func TestHashFile(t *testing.T) {
	h, err := HashFile("testdata/example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s, _ := Load("testdata/example.yaml")
	if h != s.HashHex() || len(h) != 64 {
		t.Errorf("HashFile = %s", h)
	}
	if err := Validate("testdata/example.yaml"); err != nil {
		t.Error(err)
	}
}
