package policy

import (
	"encoding/hex"
	"slices"
	"strings"

	"github.com/sigil-agent/sigil/providers"
)

// Set is a loaded and validated policy: the admins, the tenants, their key
// slots and each slot's signing policy. A Set is immutable once returned by
// Load or Parse and safe for concurrent use; its exported fields and the
// values they point to must not be modified.
type Set struct {
	// Admins are the identities holding the admin role.
	Admins Identities

	admins  identitySet
	tenants []*Tenant // sorted by name
	byName  map[string]*Tenant

	// Identity → tenant. A uid, gid or exact mTLS name belongs to one tenant;
	// mTLS prefixes of different tenants never overlap (checked on load).
	byUID    map[uint32]*Tenant
	byGID    map[uint32]*Tenant
	byMTLS   map[string]*Tenant
	prefixes []tenantPrefix

	slotCount int
	canonical []byte
	hash      [32]byte
	sources   []string
}

type tenantPrefix struct {
	prefix string
	tenant *Tenant
}

// Identities lists identities as the policy file writes them.
type Identities struct {
	UnixUIDs []uint32 // sorted, unique
	UnixGIDs []uint32 // sorted, unique
	MTLS     []string // exact names and "…/*" URI prefixes, sorted, unique
}

// Tenant is one tenant: who it is and the key slots it owns.
type Tenant struct {
	Name       string
	Identities Identities
	Slots      []*Slot // sorted by name

	ids   identitySet
	slots map[string]*Slot
	hash  [32]byte
}

// Hash is the BLAKE3-256 hash of the tenant's canonical form (see "Canonical
// form and hash" in the package documentation). It is the policy hash stamped
// on the tenant's signature replies and audit records.
func (t *Tenant) Hash() [32]byte { return t.hash }

// HashHex is Hash in lower-case hex.
func (t *Tenant) HashHex() string { return hex.EncodeToString(t.hash[:]) }

// Slot is a tenant-scoped key slot, "tenant/name", backed by agent keys.
type Slot struct {
	Tenant string // owning tenant's name
	Name   string // the slot's name within the tenant
	// Key is the agent key name that signs for the slot: the newest
	// version's key.
	Key string
	// Versions are the slot's key versions, sorted by number. A file that
	// names only `key:` has one version, number 1.
	Versions []Version
	Policy   Policy

	fullName string
	index    int // the slot's runtime state in an Engine
	tenant   *Tenant
}

// FullName is "tenant/slot".
func (s *Slot) FullName() string { return s.fullName }

// Admits reports whether id, an identity of the slot's tenant, is among
// the slot's clients (any identity of the tenant when it names none): who
// may sign with it, and so who is shown it in a key listing.
func (s *Slot) Admits(id Identity) bool {
	return s.Policy.clients == nil || s.Policy.clients.matches(id)
}

// Version is one key version of a slot.
type Version struct {
	Number int    // 1, 2, …
	Key    string // the agent key name
}

// Policy is a slot's signing policy, with every default filled in.
type Policy struct {
	// Algorithms are the allowed algorithms, in canonical order; all of
	// AlgorithmNames when the file names none.
	Algorithms []providers.Algorithm
	// Rate is the token bucket; nil is unlimited.
	Rate *Rate
	// DailyQuota is the most signatures per UTC day; 0 is unlimited.
	DailyQuota int64
	// Windows are the allowed UTC windows in canonical form ("Mon 08:00-Mon
	// 18:00", end exclusive); nil is always.
	Windows []string
	// Clients are the allowed client identities in canonical form
	// ("uid:1001", "gid:2001", "mtls:NAME"); nil is any identity of the tenant.
	Clients []string
	// Paused is the file's paused flag. Engine.Pause adds a run-time pause.
	Paused bool

	algs    algSet
	window  *weekMask    // nil: always
	clients *identitySet // nil: any identity of the tenant
	// Token bucket as GCRA: a request costs interval ns of credit; the bucket
	// holds tolerance ns (burst × interval).
	interval, tolerance int64
}

// Rate is a token bucket: PerSecond tokens refill each second, up to Burst.
type Rate struct {
	PerSecond float64
	Burst     int64
}

// Hash is the BLAKE3-256 hash of the set's canonical form (Canonical).
func (s *Set) Hash() [32]byte { return s.hash }

// HashHex is Hash in lower-case hex.
func (s *Set) HashHex() string { return hex.EncodeToString(s.hash[:]) }

// Canonical is the canonical form the hash is computed over: compact JSON,
// described in the package documentation. The caller must not modify it.
func (s *Set) Canonical() []byte { return s.canonical }

// Sources are the files the set was read from, in reading order.
func (s *Set) Sources() []string { return slices.Clone(s.sources) }

// Tenants lists the tenant names, sorted.
func (s *Set) Tenants() []string {
	out := make([]string, len(s.tenants))
	for i, t := range s.tenants {
		out[i] = t.Name
	}
	return out
}

// Tenant returns the named tenant.
func (s *Set) Tenant(name string) (*Tenant, bool) {
	t, ok := s.byName[name]
	return t, ok
}

// TenantHash is the named tenant's policy hash (Tenant.Hash).
func (s *Set) TenantHash(name string) ([32]byte, bool) {
	t, ok := s.byName[name]
	if !ok {
		return [32]byte{}, false
	}
	return t.hash, true
}

// TenantOf maps an authenticated peer to its tenant. A Unix peer is matched by
// uid first, then by gid; an mTLS peer by exact name, then by URI prefix.
// Peers of no tenant are refused by the caller (UNAUTHENTICATED).
func (s *Set) TenantOf(id Identity) (tenant string, ok bool) {
	if t := s.tenantOf(id); t != nil {
		return t.Name, true
	}
	return "", false
}

func (s *Set) tenantOf(id Identity) *Tenant {
	switch id.Kind {
	case IdentityUnix:
		if t, ok := s.byUID[id.UID]; ok {
			return t
		}
		return s.byGID[id.GID]
	case IdentityMTLS:
		if id.Name == "" {
			return nil
		}
		if t, ok := s.byMTLS[id.Name]; ok {
			return t
		}
		for _, p := range s.prefixes {
			if len(id.Name) > len(p.prefix) && strings.HasPrefix(id.Name, p.prefix) {
				return p.tenant
			}
		}
	}
	return nil
}

// IsAdmin reports whether the peer holds the admin role (policy `admins`).
func (s *Set) IsAdmin(id Identity) bool { return s.admins.matches(id) }

// Slot returns tenant's slot. Another tenant's slot is not found, exactly
// like a slot that does not exist.
func (s *Set) Slot(tenant, slot string) (*Slot, bool) {
	t, ok := s.byName[tenant]
	if !ok {
		return nil, false
	}
	sl, ok := t.slots[slot]
	return sl, ok
}

// AllSlots lists every slot of every tenant, sorted by full name, for the
// agent to check that each slot's keys exist. Never show it to a tenant.
func (s *Set) AllSlots() []*Slot {
	out := make([]*Slot, 0, s.slotCount)
	for _, t := range s.tenants {
		out = append(out, t.Slots...)
	}
	return out
}

// Slots lists tenant's slots, sorted by name; nil for an unknown tenant.
func (s *Set) Slots(tenant string) []*Slot {
	t, ok := s.byName[tenant]
	if !ok {
		return nil
	}
	return slices.Clone(t.Slots)
}
