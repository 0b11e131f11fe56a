package agent_test

import (
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// A policy refusal that passes once time does (a rate limit, a daily
// quota, a time window) tells the caller when to retry: docs/policy.md and
// docs/pkcs11-module.md say the agent's msg says when. The engine computed
// the time and the reply dropped it, so "retry later" was all a client had.
func TestPolicyRefusalSaysWhenToRetry(t *testing.T) {
	tomorrow := time.Now().UTC().Add(24 * time.Hour).Weekday().String()[:3]
	untilMidnight := time.Until(time.Now().UTC().Truncate(24 * time.Hour).Add(24 * time.Hour))
	cases := []struct {
		name   string
		policy string
		code   proto.Code
		// the retry time the message gives must lie in (min, max]
		min, max time.Duration
	}{
		{"rate", "{rate: {per_second: 0.001, burst: 1}}", proto.RateLimited, 900 * time.Second, 1000 * time.Second},
		{"quota", "{daily_quota: 1}", proto.QuotaExceeded, 0, untilMidnight + time.Second},
		{"window", "{windows: [\"" + tomorrow + " 00:00-24:00\"]}", proto.OutsideWindow, 0, 24*time.Hour + time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := pauseConfig(t)
			policyText := strings.Replace(pausePolicy(true), "{name: release, key: default}",
				"{name: release, key: default, policy: "+tc.policy+"}", 1)
			if err := os.WriteFile(cfg.Policy, []byte(policyText), 0o600); err != nil {
				t.Fatal(err)
			}
			agentLifetime(t, cfg, func(c, _ *client.Client) {
				sign := releaseSigner(tc.name)
				if tc.code != proto.OutsideWindow {
					if err := sign(c); err != nil {
						t.Fatalf("first signature: %v", err)
					}
				}
				err := sign(c)
				var pe *proto.Error
				if client.Code(err) != tc.code || !errors.As(err, &pe) {
					t.Fatalf("Sign = %v, want %v from the agent", err, tc.code)
				}
				_, after, ok := strings.Cut(pe.Msg, "; retry in ")
				if !ok {
					t.Fatalf("message %q does not say when to retry", pe.Msg)
				}
				d, err := time.ParseDuration(after)
				if err != nil || d <= tc.min || d > tc.max {
					t.Fatalf("message %q: retry in %v (%v), want in (%v, %v]", pe.Msg, d, err, tc.min, tc.max)
				}
			})
		})
	}
}
