package policy

import (
	"slices"
	"strconv"
	"strings"
)

// IdentityKind says how a peer was authenticated.
type IdentityKind uint8

const (
	// IdentityUnix is a Unix socket peer, known by SO_PEERCRED uid and gid.
	IdentityUnix IdentityKind = 1
	// IdentityMTLS is a TCP peer known by its verified client certificate:
	// the URI SAN (such as a SPIFFE ID), else the subject CN.
	IdentityMTLS IdentityKind = 2
)

// Identity is an authenticated peer. The agent builds it from the connection;
// the policy maps it to a tenant (Set.TenantOf) and to the admin role
// (Set.IsAdmin).
type Identity struct {
	Kind IdentityKind
	UID  uint32 // IdentityUnix only
	GID  uint32 // IdentityUnix only
	Name string // IdentityMTLS only: URI SAN, else subject CN
}

// UnixIdentity is a Unix socket peer.
func UnixIdentity(uid, gid uint32) Identity { return Identity{Kind: IdentityUnix, UID: uid, GID: gid} }

// MTLSIdentity is an mTLS peer named by its certificate's URI SAN or CN.
func MTLSIdentity(name string) Identity { return Identity{Kind: IdentityMTLS, Name: name} }

// String renders the identity for logs: "uid:1001,gid:2001" or
// "mtls:spiffe://example.org/payments". It holds nothing secret.
func (id Identity) String() string {
	switch id.Kind {
	case IdentityUnix:
		return "uid:" + strconv.FormatUint(uint64(id.UID), 10) + ",gid:" + strconv.FormatUint(uint64(id.GID), 10)
	case IdentityMTLS:
		return "mtls:" + id.Name
	}
	return "unauthenticated"
}

// identitySet is a compiled list of identities: a tenant's, the admins', or a
// slot's allowed clients. Lists are short, sorted and searched linearly or by
// binary search; matching never allocates.
type identitySet struct {
	uids     []uint32 // sorted, unique
	gids     []uint32 // sorted, unique
	names    []string // exact mTLS names, sorted, unique
	prefixes []string // mTLS URI prefixes, the "*" of "…/*" removed; sorted, unique
}

// matches reports whether id is in the set: for a Unix peer its uid or its
// gid, for an mTLS peer its exact name or a prefix of it.
func (s *identitySet) matches(id Identity) bool {
	switch id.Kind {
	case IdentityUnix:
		if _, ok := slices.BinarySearch(s.uids, id.UID); ok {
			return true
		}
		_, ok := slices.BinarySearch(s.gids, id.GID)
		return ok
	case IdentityMTLS:
		if id.Name == "" {
			return false
		}
		if _, ok := slices.BinarySearch(s.names, id.Name); ok {
			return true
		}
		for _, p := range s.prefixes {
			if len(id.Name) > len(p) && strings.HasPrefix(id.Name, p) {
				return true
			}
		}
	}
	return false
}

func (s *identitySet) normalize() {
	s.uids = sortUnique(s.uids)
	s.gids = sortUnique(s.gids)
	s.names = sortUnique(s.names)
	s.prefixes = sortUnique(s.prefixes)
}

func sortUnique[T uint32 | string](v []T) []T {
	slices.Sort(v)
	return slices.Compact(v)
}

// mtlsPattern splits an mTLS entry into an exact name or a prefix. A prefix
// is written as a URI ending in "/*" and matches every name that starts with
// the text before the "*" and is longer than it.
func mtlsPattern(s string) (name string, prefix bool, problem string) {
	if s == "" {
		return "", false, "must not be empty"
	}
	if len(s) > 2048 {
		return "", false, "longer than 2048 bytes"
	}
	for _, r := range s {
		if r <= ' ' || r == 0x7f {
			return "", false, "must not contain spaces or control characters"
		}
	}
	star := strings.IndexByte(s, '*')
	if star < 0 {
		return s, false, ""
	}
	if star != len(s)-1 || !strings.HasSuffix(s, "/*") || !strings.Contains(s, "://") {
		return "", false, `"*" is only allowed as the last path segment of a URI, as in "spiffe://example.org/payments/*"`
	}
	return s[:len(s)-1], true, ""
}

// overlaps reports whether two mTLS patterns can match the same name.
func overlaps(a string, aPrefix bool, b string, bPrefix bool) bool {
	switch {
	case aPrefix && bPrefix:
		return strings.HasPrefix(a, b) || strings.HasPrefix(b, a)
	case aPrefix:
		return len(b) > len(a) && strings.HasPrefix(b, a)
	case bPrefix:
		return len(a) > len(b) && strings.HasPrefix(a, b)
	}
	return a == b
}
