package policy

import (
	"bytes"
	"encoding/json"
	"slices"
	"strconv"
	"strings"

	"github.com/zeebo/blake3"
)

// canonicalFormat names the canonical form's version. It changes only if the
// form changes incompatibly; fields added later are omitted while they hold
// their default, so an unchanged file keeps its hash across Sigil upgrades.
const canonicalFormat = "sigil-policy/1"

// The canonical form: JSON objects with keys in the order declared here,
// lists sorted, every default filled in. See doc.go for the definition.
type (
	canonSet struct {
		Format  string        `json:"format"`
		Admins  canonIDs      `json:"admins"`
		Tenants []canonTenant `json:"tenants"`
	}
	canonTenantDoc struct {
		Format string      `json:"format"`
		Tenant canonTenant `json:"tenant"`
	}
	canonIDs struct {
		UnixUIDs []uint32 `json:"unix_uids"`
		UnixGIDs []uint32 `json:"unix_gids"`
		MTLS     []string `json:"mtls"`
	}
	canonTenant struct {
		Name       string      `json:"name"`
		Identities canonIDs    `json:"identities"`
		Slots      []canonSlot `json:"slots"`
	}
	canonSlot struct {
		Name     string         `json:"name"`
		Versions []canonVersion `json:"versions"`
		Policy   canonPolicy    `json:"policy"`
	}
	canonVersion struct {
		Version int    `json:"version"`
		Key     string `json:"key"`
	}
	canonPolicy struct {
		Algorithms []string   `json:"algorithms"`
		Rate       *canonRate `json:"rate"`
		DailyQuota *int64     `json:"daily_quota"`
		Windows    []string   `json:"windows"`
		Clients    []string   `json:"clients"`
		Paused     bool       `json:"paused"`
	}
	canonRate struct {
		PerSecond float64 `json:"per_second"`
		Burst     int64   `json:"burst"`
	}
)

func canonicalIdentities(ids Identities) canonIDs {
	return canonIDs{
		UnixUIDs: nonNil(ids.UnixUIDs),
		UnixGIDs: nonNil(ids.UnixGIDs),
		MTLS:     nonNil(ids.MTLS),
	}
}

func nonNil[T any](v []T) []T {
	if v == nil {
		return []T{}
	}
	return v
}

func canonicalTenant(t *Tenant) canonTenant {
	ct := canonTenant{Name: t.Name, Identities: canonicalIdentities(t.Identities), Slots: []canonSlot{}}
	for _, s := range t.Slots {
		cs := canonSlot{Name: s.Name, Versions: []canonVersion{}}
		for _, v := range s.Versions {
			cs.Versions = append(cs.Versions, canonVersion{v.Number, v.Key})
		}
		pol := &s.Policy
		cs.Policy = canonPolicy{
			Algorithms: pol.algs.names(),
			Windows:    pol.Windows,
			Clients:    pol.Clients,
			Paused:     pol.Paused,
		}
		if pol.Rate != nil {
			cs.Policy.Rate = &canonRate{pol.Rate.PerSecond, pol.Rate.Burst}
		}
		if pol.DailyQuota > 0 {
			q := pol.DailyQuota
			cs.Policy.DailyQuota = &q
		}
		ct.Slots = append(ct.Slots, cs)
	}
	return ct
}

// marshalCanonical is encoding/json with HTML escaping off and no trailing
// newline. encoding/json writes struct fields in declaration order, floats in
// their shortest round-trip form, and escapes only '"', '\\', control
// characters, U+2028 and U+2029.
func marshalCanonical(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic("policy: canonical form does not encode: " + err.Error()) // only plain types; cannot happen
	}
	return bytes.TrimSuffix(b.Bytes(), []byte{'\n'})
}

// build turns a checked parse into a Set: sorted, indexed, hashed.
func (p *parser) build() *Set {
	s := &Set{
		byName:  map[string]*Tenant{},
		byUID:   map[uint32]*Tenant{},
		byGID:   map[uint32]*Tenant{},
		byMTLS:  map[string]*Tenant{},
		sources: p.files,
	}
	fillIdentitySet(&s.admins, p.admins)
	s.Admins = identitiesOf(&s.admins)

	for _, rt := range p.tenants {
		t := rt.t
		fillIdentitySet(&t.ids, rt.ids)
		t.Identities = identitiesOf(&t.ids)
		t.slots = map[string]*Slot{}
		for _, rs := range rt.slots {
			sl := rs.s
			sl.Tenant = t.Name
			sl.fullName = t.Name + "/" + sl.Name
			sl.tenant = t
			sl.Key = sl.Versions[len(sl.Versions)-1].Key
			pol := &sl.Policy
			pol.Algorithms = pol.algs.algorithms()
			if pol.window != nil {
				pol.Windows = pol.window.canonical()
			}
			if len(rs.clients) > 0 {
				pol.clients = &identitySet{}
				fillIdentitySet(pol.clients, rs.clients)
				pol.Clients = clientStrings(pol.clients)
			}
			t.Slots = append(t.Slots, sl)
			t.slots[sl.Name] = sl
		}
		slices.SortFunc(t.Slots, func(a, b *Slot) int { return strings.Compare(a.Name, b.Name) })
		s.tenants = append(s.tenants, t)
		s.byName[t.Name] = t
		for _, u := range t.ids.uids {
			s.byUID[u] = t
		}
		for _, g := range t.ids.gids {
			s.byGID[g] = t
		}
		for _, n := range t.ids.names {
			s.byMTLS[n] = t
		}
		for _, pr := range t.ids.prefixes {
			s.prefixes = append(s.prefixes, tenantPrefix{pr, t})
		}
	}
	slices.SortFunc(s.tenants, func(a, b *Tenant) int { return strings.Compare(a.Name, b.Name) })

	cs := canonSet{Format: canonicalFormat, Admins: canonicalIdentities(s.Admins), Tenants: []canonTenant{}}
	for _, t := range s.tenants {
		for _, sl := range t.Slots {
			sl.index = s.slotCount
			s.slotCount++
		}
		ct := canonicalTenant(t)
		t.hash = blake3.Sum256(marshalCanonical(canonTenantDoc{Format: canonicalFormat, Tenant: ct}))
		cs.Tenants = append(cs.Tenants, ct)
	}
	s.canonical = marshalCanonical(cs)
	s.hash = blake3.Sum256(s.canonical)
	return s
}

func identitiesOf(s *identitySet) Identities {
	ids := Identities{
		UnixUIDs: slices.Clone(s.uids),
		UnixGIDs: slices.Clone(s.gids),
		MTLS:     slices.Clone(s.names),
	}
	for _, pr := range s.prefixes {
		ids.MTLS = append(ids.MTLS, pr+"*")
	}
	slices.Sort(ids.MTLS)
	return ids
}

// clientStrings renders a slot's clients canonically: "gid:N", "mtls:NAME"
// and "uid:N", sorted as strings.
func clientStrings(s *identitySet) []string {
	var out []string
	for _, u := range s.uids {
		out = append(out, "uid:"+strconv.FormatUint(uint64(u), 10))
	}
	for _, g := range s.gids {
		out = append(out, "gid:"+strconv.FormatUint(uint64(g), 10))
	}
	for _, n := range s.names {
		out = append(out, "mtls:"+n)
	}
	for _, pr := range s.prefixes {
		out = append(out, "mtls:"+pr+"*")
	}
	slices.Sort(out)
	return out
}
