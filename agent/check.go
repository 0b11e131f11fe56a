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
// The keys a policy's slots name, and a rotation slot's next_key, must be
// keys of the config's providers: the start serves those and no others
// (an embedder's providers aside, which it does not know), refuses a slot
// naming another, and every rotation of a slot whose next_key names none
// would fail. What needs the keys themselves is left to the agent: that
// a certificate certifies its key.
func CheckFiles(cfg Config) error {
	var errs []error
	configured := map[string]bool{}
	for _, p := range cfg.Providers {
		for _, k := range p.Keys {
			configured[k.Name] = true
		}
	}
	isConfigured := func(name string) bool { return configured[name] }
	if cfg.Policy != "" {
		set, err := policy.Load(cfg.Policy)
		if err != nil {
			errs = append(errs, fmt.Errorf("policy: %w", err))
		} else {
			if err := slotKeysError(set, isConfigured); err != nil {
				errs = append(errs, fmt.Errorf("policy: %w", err))
			}
			errs = append(errs, calendarSlotErrors(set, cfg.Rotation.Calendars)...)
			errs = append(errs, slotSettingErrors(set, cfg.Rotation.Slots)...)
			errs = append(errs, sshKeysError(cfg, set, isConfigured))
		}
	} else {
		errs = append(errs, sshKeysError(cfg, nil, isConfigured))
	}
	errs = append(errs, nextKeyErrors(cfg.Rotation.Slots, isConfigured)...)
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
	return unknownSlotErrors(set, "rotation.calendars", slices.Sorted(maps.Keys(cals)), "so it would never rotate")
}

// slotSettingErrors names each rotation.slots entry whose slot the policy
// set lacks: its subject and next_key would never apply, silently.
func slotSettingErrors(set *policy.Set, slots map[string]SlotRotation) []error {
	return unknownSlotErrors(set, "rotation.slots", slices.Sorted(maps.Keys(slots)), "so its settings would never apply")
}

// unknownSlotErrors names each of slots (named in setting) that the policy
// set lacks, saying what follows.
func unknownSlotErrors(set *policy.Set, setting string, slots []string, consequence string) []error {
	var errs []error
	for _, name := range slots {
		tenant, slot, err := rotation.SplitSlot(name)
		if err != nil {
			continue // Validate names it
		}
		if _, ok := set.Slot(tenant, slot); !ok {
			errs = append(errs, fmt.Errorf("%s[%s]: the policy has no such slot, %s", setting, name, consequence))
		}
	}
	return errs
}

// nextKeyErrors names each rotation slot whose next_key names no key that
// served reports: every rotation of that slot would fail.
func nextKeyErrors(slots map[string]SlotRotation, served func(name string) bool) []error {
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(slots)) {
		if k := slots[name].NextKey; k != "" && !served(k) {
			errs = append(errs, fmt.Errorf("rotation.slots[%s].next_key %q: no provider serves a key by that name, so every rotation of the slot would fail", name, k))
		}
	}
	return errs
}

// sshKeysError names each ssh_keys entry that matches nothing the ssh-agent
// socket could offer (slot names with a policy set, else keys that served
// reports): a typo would leave the socket offering no key, silently.
// Checked with or without ssh_agent_socket: an embedder serves the
// protocol on a listener of its own (ServeSSHAgent).
func sshKeysError(cfg Config, set *policy.Set, served func(name string) bool) error {
	slots := map[string]bool{}
	if set != nil {
		for _, s := range set.AllSlots() {
			slots[s.Name] = true
		}
	}
	var errs []error
	for _, name := range cfg.SSHKeys {
		switch {
		case set != nil && !slots[name]:
			errs = append(errs, fmt.Errorf("ssh_keys: no slot named %q in the policy, so the ssh-agent socket would never offer it", name))
		case set == nil && !served(name):
			errs = append(errs, fmt.Errorf("ssh_keys: no key named %q, so the ssh-agent socket would never offer it", name))
		}
	}
	return errors.Join(errs...)
}
