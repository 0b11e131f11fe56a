package rotation

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/sigil-agent/sigil/providers"
)

// State is a key version's state.
type State string

const (
	// StateActive: the version signs. Exactly one version of a slot is active.
	StateActive State = "active"
	// StateAccepted: the version no longer signs; its signatures verify until
	// its T1, after which it counts as retired.
	StateAccepted State = "accepted"
	// StateRetired: neither signs nor verifies (KEY_RETIRED).
	StateRetired State = "retired"
)

// Version is one key version of a slot. Values returned by the Store are
// copies; SPKI and Public are shared and must not be modified.
type Version struct {
	Number   int               `json:"number"` // 1, 2, … in creation order; never reused
	State    State             `json:"state"`
	Provider string            `json:"provider"` // provider id
	Key      string            `json:"key"`      // the key's name in the agent (and its provider)
	URI      string            `json:"uri,omitempty"`
	KID      string            `json:"kid"`
	KeyType  providers.KeyType `json:"key_type"`
	SPKI     []byte            `json:"spki"` // DER SubjectPublicKeyInfo

	Created   time.Time `json:"created"`
	Activated time.Time `json:"activated,omitzero"` // the last time it became active
	T1        time.Time `json:"t1,omitzero"`        // accepted: verifies until (exclusive)
	Retired   time.Time `json:"retired,omitzero"`
	// Failed marks a version whose rotation failed after the cutover and
	// was undone; Rollback skips it.
	Failed bool `json:"failed,omitempty"`
	// Replaced is the version that was active when a rotation made this
	// one active (0: none recorded, as for versions stored before it was):
	// the one a rollback from this version goes back to.
	Replaced int `json:"replaced,omitempty"`

	// Public is SPKI parsed.
	Public crypto.PublicKey `json:"-"`
}

// StateAt is the version's effective state at now: an accepted version
// whose T1 has come is retired, whether or not RetireDue has recorded it.
func (v *Version) StateAt(now time.Time) State {
	if v.State == StateAccepted && !now.Before(v.T1) {
		return StateRetired
	}
	return v.State
}

// Slot is the rotation state of one key slot.
type Slot struct {
	Format int    `json:"format"` // slotFormat
	Tenant string `json:"tenant"`
	Name   string `json:"name"`   // the slot's name within the tenant
	Active int    `json:"active"` // the active version's number
	// Versions, sorted by number.
	Versions []Version `json:"versions"`
	// Attempt counts the rotation attempts started since the last
	// successful cutover; it makes every attempt's new key name unique, so
	// a retry never collides with a key that a failed or crashed attempt
	// left in the provider.
	Attempt int `json:"attempt,omitempty"`
	// Scheduled are one-off rotation times (`sigil rotate SLOT --at TIME`),
	// sorted; a cutover drops those it has served.
	Scheduled []time.Time `json:"scheduled,omitempty"`
	// ScheduledAttempt is when the scheduler began its last rotation of
	// the slot that has not cut over (zero once one has, or once a one-off
	// time was set). The wait after a failed scheduled rotation
	// (SchedulerOptions.RetryAfter) counts from it, so that it holds across
	// a restart: an agent in a crash loop would otherwise make a key at
	// every start. It is committed with the attempt's first record.
	ScheduledAttempt time.Time `json:"scheduled_attempt,omitzero"`
	// AttemptKey names the key the rotation attempt in progress generates,
	// committed with its start record (so before the key exists) and
	// cleared by its cut-over in the same commit. Set, it is a key that
	// never cut over, so never signed a request: the attempt's failure, or
	// the next attempt's start after a crash, destroys it (KeyDestroyer).
	// Only set when the key maker can destroy keys.
	AttemptKey AttemptKey `json:"attempt_key,omitzero"`
}

// AttemptKey is a key a rotation attempt generates: its name and the
// provider it is made in.
type AttemptKey struct {
	Name     string `json:"name"`
	Provider string `json:"provider"`
	// KID is the generated key's, set with the keygen record: only a key
	// with this kid is destroyed, and none when it is not set.
	KID string `json:"kid,omitempty"`
}

const slotFormat = 1

// FullName is "tenant/slot".
func (s *Slot) FullName() string { return s.Tenant + "/" + s.Name }

// ActiveVersion returns the active version.
func (s *Slot) ActiveVersion() Version {
	v, _ := s.Version(s.Active)
	return v
}

// Version returns version n.
func (s *Slot) Version(n int) (Version, bool) {
	i, ok := s.index(n)
	if !ok {
		return Version{}, false
	}
	return s.Versions[i], true
}

func (s *Slot) index(n int) (int, bool) {
	return slices.BinarySearchFunc(s.Versions, n, func(v Version, n int) int { return v.Number - n })
}

// LastActivation is when the active version became active: what a
// period-based calendar counts from.
func (s *Slot) LastActivation() time.Time { return s.ActiveVersion().Activated }

func (s *Slot) nextNumber() int {
	if len(s.Versions) == 0 {
		return 1
	}
	return s.Versions[len(s.Versions)-1].Number + 1
}

func (s *Slot) clone() Slot {
	c := *s
	c.Versions = slices.Clone(s.Versions)
	c.Scheduled = slices.Clone(s.Scheduled)
	return c
}

// check validates a slot and fills in each version's Public. The state on
// disk is only ever written after passing it, so a failure on load means
// the store was edited or corrupted.
func (s *Slot) check() error {
	if s.Format != slotFormat {
		return fmt.Errorf("slot state format %d (want %d)", s.Format, slotFormat)
	}
	if err := checkName(s.Tenant); err != nil {
		return fmt.Errorf("tenant: %w", err)
	}
	if err := checkName(s.Name); err != nil {
		return fmt.Errorf("slot: %w", err)
	}
	if len(s.Versions) == 0 {
		return errors.New("no versions")
	}
	active := 0
	kids := make(map[string]bool, len(s.Versions))
	for i := range s.Versions {
		v := &s.Versions[i]
		if v.Number < 1 || (i > 0 && v.Number <= s.Versions[i-1].Number) {
			return fmt.Errorf("version numbers not increasing at v%d", v.Number)
		}
		if kids[v.KID] {
			return fmt.Errorf("v%d: kid %s used by two versions", v.Number, v.KID)
		}
		kids[v.KID] = true
		switch v.State {
		case StateActive:
			active++
			if v.Number != s.Active {
				return fmt.Errorf("v%d is active but the slot names v%d", v.Number, s.Active)
			}
		case StateAccepted:
			if v.T1.IsZero() {
				return fmt.Errorf("v%d accepted without a T1", v.Number)
			}
		case StateRetired:
		default:
			return fmt.Errorf("v%d: unknown state %q", v.Number, v.State)
		}
		if v.Public == nil || !bytes.Equal(mustSPKI(v.Public), v.SPKI) {
			pub, err := x509.ParsePKIXPublicKey(v.SPKI)
			if err != nil {
				return fmt.Errorf("v%d: public key: %w", v.Number, err)
			}
			v.Public = pub
		}
		if kt, err := providers.KeyTypeOf(v.Public); err != nil || kt != v.KeyType {
			return fmt.Errorf("v%d: public key is not a %s key", v.Number, v.KeyType)
		}
		if providers.ComputeKID(v.SPKI, v.Provider, v.Key) != v.KID {
			return fmt.Errorf("v%d: kid %s does not match its key", v.Number, v.KID)
		}
	}
	if active != 1 {
		return fmt.Errorf("%d active versions (want exactly 1)", active)
	}
	return nil
}

func mustSPKI(pub crypto.PublicKey) []byte {
	b, _ := x509.MarshalPKIXPublicKey(pub)
	return b
}

// SplitSlot splits "tenant/slot" and checks both names. A name that fails
// is ErrBadRequest: slot names come from callers and config files.
func SplitSlot(slot string) (tenant, name string, err error) {
	tenant, name, ok := strings.Cut(slot, "/")
	if !ok {
		return "", "", refuse("slot %q: want tenant/slot", slot)
	}
	if err := checkName(tenant); err != nil {
		return "", "", refuse("slot %q: tenant: %w", slot, err)
	}
	if err := checkName(name); err != nil {
		return "", "", refuse("slot %q: %w", slot, err)
	}
	return tenant, name, nil
}

// checkName is the policy package's tenant and slot name rule: 1 to 63 of
// [a-z0-9._-], starting with a letter or digit. Rotation relies on it
// because the names become directory names of evidence packs.
func checkName(s string) error {
	if s == "" || len(s) > 63 {
		return fmt.Errorf("name %q must be 1 to 63 characters", s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '_' && c != '-') {
			return fmt.Errorf("name %q: allowed are a-z 0-9 . _ -, starting with a letter or digit", s)
		}
	}
	return nil
}
