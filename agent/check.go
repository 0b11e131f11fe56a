package agent

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/policy"
)

// CheckFiles checks what a reload reads, the way the agent reads it, without
// an agent: the config (already parsed and validated by LoadConfig), the
// policy it names, the TLS listener's certificate, key and client CAs, and
// each key certificate's file. It is `sigil agent --check`, which the
// systemd unit runs before it signals a reload, so that `systemctl reload`
// fails on a file the agent would refuse.
//
// What needs the agent's keys is left to the agent: that a certificate
// certifies its key, and that each slot's key is served.
func CheckFiles(cfg Config) error {
	var errs []error
	if cfg.Policy != "" {
		set, err := policy.Load(cfg.Policy)
		if err != nil {
			errs = append(errs, fmt.Errorf("policy: %w", err))
		} else {
			errs = append(errs, calendarSlotErrors(set, cfg.Rotation.Calendars)...)
		}
	} else if len(cfg.Rotation.Calendars) > 0 {
		errs = append(errs, errors.New("rotation.calendars: rotation needs a policy file, and the config names none"))
	}
	if cfg.TCP.Listen != "" {
		if _, err := newTLSMaterial(cfg.TCP); err != nil {
			errs = append(errs, err)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.Certificates)) {
		if _, _, err := readCertificateChain(cfg.Certificates[name]); err != nil {
			errs = append(errs, fmt.Errorf("certificates[%s]: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// calendarSlotErrors names each calendar whose slot the policy set lacks:
// a mistyped slot ("payments/relase") would never rotate, silently.
func calendarSlotErrors(set *policy.Set, cals map[string]rotation.CalendarConfig) []error {
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(cals)) {
		tenant, slot, err := rotation.SplitSlot(name)
		if err != nil {
			continue // Validate names it
		}
		if _, ok := set.Slot(tenant, slot); !ok {
			errs = append(errs, fmt.Errorf("rotation.calendars[%s]: the policy has no such slot, so it would never rotate", name))
		}
	}
	return errs
}
