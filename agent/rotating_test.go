package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
	"github.com/sigil-agent/sigil/providers/software"
)

// Rotation through the agent: rotate, old and new both verify while the old
// is accepted, the old no longer signs, rollback brings it back, the
// evidence pack verifies, and a restart serves the generated version again.
func TestAgentRotation(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	dir := t.TempDir()
	cfg.Policy = filepath.Join(dir, "policy.yaml")
	os.WriteFile(cfg.Policy, []byte(twoTenants(os.Getuid(), "spiffe://example.org/billing")), 0o600)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Rotation.Canaries = 10
	// The first rotation moves to a pre-provisioned key ("p384" is served by
	// the software provider); later ones generate keys.
	cfg.Rotation.Slots = map[string]agent.SlotRotation{"payments/release": {NextKey: "p384",
		Subject: agent.SubjectConfig{CommonName: "release.payments.example", Organization: []string{"Example"}}}}
	ctx := context.Background()

	start := func() (*agent.Agent, *client.Client, *client.Client) {
		a, err := agent.New(ctx, cfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
		if err != nil {
			t.Fatal(err)
		}
		ln, err := agent.ListenUnix(cfg.Socket)
		if err != nil {
			t.Fatal(err)
		}
		aln, err := agent.ListenUnix(cfg.AdminSocket)
		if err != nil {
			t.Fatal(err)
		}
		go a.Serve(ln)
		go a.ServeAdmin(aln)
		c, err := client.Dial(ctx, cfg.Socket)
		if err != nil {
			t.Fatal(err)
		}
		admin, err := client.Dial(ctx, cfg.AdminSocket)
		if err != nil {
			t.Fatal(err)
		}
		return a, c, admin
	}
	a, c, admin := start()
	d := sha256.Sum256([]byte("release 1.0"))
	es256 := client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA256}
	sign := func() client.Signature {
		t.Helper()
		s, err := c.Sign(ctx, client.ByName("release"), es256, d[:])
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	verify := func(s client.Signature) (bool, error) {
		return c.Verify(ctx, client.ByKID(s.KID), es256, d[:], s.Sig)
	}
	v1 := sign()
	if err := admin.Rotate(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	v2 := sign()
	if v2.KID == v1.KID {
		t.Fatal("the slot signs with the same key after a rotation")
	}
	// Each signature's audit record names the version that made it.
	recs, err := admin.AuditTail(ctx, "payments", 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	versions := map[string]int{}
	for _, raw := range recs {
		var r struct {
			Op, KID string
			Version int
		}
		if err := json.Unmarshal(raw, &r); err != nil {
			t.Fatal(err)
		}
		if r.Op == "sign" {
			versions[r.KID] = r.Version
		}
	}
	if versions[v1.KID] != 1 || versions[v2.KID] != 2 {
		t.Fatalf("sign records' versions by kid: %v, want v1's kid 1 and v2's kid 2", versions)
	}
	if k, _ := c.PublicKey(ctx, client.ByName("release")); k.Type != "ecdsa-p384" {
		t.Fatalf("the rotation did not move to the pre-provisioned key: %s", k.Type)
	}
	for _, s := range []client.Signature{v1, v2} {
		if ok, err := verify(s); !ok || err != nil {
			t.Fatalf("before T1, kid %s: %v %v", s.KID, ok, err)
		}
	}
	if _, err := c.Sign(ctx, client.ByKID(v1.KID), es256, d[:]); client.Code(err) != proto.KeyRetired {
		t.Fatalf("the accepted version signed: %v", err)
	}
	// The refusal is in the slot's audit trail, with the kid asked for.
	last, err := admin.AuditTail(ctx, "payments", 0, 1)
	if err != nil || len(last) != 1 {
		t.Fatalf("audit tail: %d records, %v", len(last), err)
	}
	var refused struct {
		Slot, KID string
		CodeName  string `json:"code_name"`
	}
	if err := json.Unmarshal(last[0], &refused); err != nil {
		t.Fatal(err)
	}
	if refused.Slot != "payments/release" || refused.KID != v1.KID || refused.CodeName != "KEY_RETIRED" {
		t.Fatalf("the KEY_RETIRED record: %s; want slot payments/release and kid %s", last[0], v1.KID)
	}
	if err := admin.Rotate(ctx, "billing/nope"); client.Code(err) != proto.NotFound {
		t.Fatalf("rotate a missing slot: %v", err)
	}

	// The evidence pack of rotation 2 verifies with the agent's evidence key.
	evDir := filepath.Join(cfg.DataDir, "evidence")
	manifest, sigFile, _, _ := rotation.REPPaths(evDir, "payments/release", 2)
	m, _ := os.ReadFile(manifest)
	sig, _ := os.ReadFile(sigFile)
	pubPEM, _ := os.ReadFile(filepath.Join(cfg.DataDir, "evidence.pub"))
	pub, err := rotation.ParseEvidencePublicKey(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := rotation.VerifyREP(m, sig, pub)
	if err != nil {
		t.Fatalf("evidence pack: %v", err)
	}
	if !strings.Contains(rep.CSR.Subject, "release.payments.example") {
		t.Fatalf("CSR subject %q is not the configured one", rep.CSR.Subject)
	}

	if _, err := admin.Rollback(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	if s := sign(); s.KID != v1.KID {
		t.Fatalf("after rollback the slot signs with %s, want %s", s.KID, v1.KID)
	}
	if err := admin.Rotate(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	v3 := sign()

	// Restart: the same versions, the generated key served again.
	c.Close()
	admin.Close()
	if err := a.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	a, c, admin = start()
	defer func() { c.Close(); admin.Close(); a.Shutdown(ctx) }()
	if s := sign(); s.KID != v3.KID {
		t.Fatalf("after a restart the slot signs with %s, want %s", s.KID, v3.KID)
	}
	if ok, err := verify(v3); !ok || err != nil {
		t.Fatalf("after restart: %v %v", ok, err)
	}

	// Incident drill: emergency rotation, the old version stops verifying.
	if _, err := c.IncidentDrill(ctx, "payments/release"); client.Code(err) != proto.PermissionDenied {
		t.Fatalf("a tenant ran a drill: %v", err)
	}
	msg, err := admin.IncidentDrill(ctx, "payments/release")
	if err != nil {
		t.Fatal(err)
	}
	v4 := sign()
	if v4.KID == v3.KID {
		t.Fatalf("the drill did not rotate: %s", msg)
	}
	if _, err := verify(v3); client.Code(err) != proto.KeyRetired {
		t.Fatalf("after an emergency rotation the old version: %v", err)
	}

	// An operator pauses the slot, then drills it (the incident
	// playbook): the drill rotates and leaves the slot paused.
	if _, err := admin.Pause(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	if msg, err = admin.IncidentDrill(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Sign(ctx, client.ByName("release"), es256, d[:]); client.Code(err) != proto.Paused {
		t.Fatalf("after a drill of a slot an operator had paused: %v, want PAUSED (%s)", err, msg)
	}
}

// The same on a SoftHSM2 token: the new version is generated in the token,
// and after a restart the agent finds it again by the URI the rotation
// recorded.
func TestAgentRotationOnSoftHSM(t *testing.T) {
	tok := softhsmtest.New(t, "rotate")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	cfg := hsmConfig(t, tok, keys)
	dir := t.TempDir()
	cfg.Policy = filepath.Join(dir, "policy.yaml")
	os.WriteFile(cfg.Policy, []byte(releasePolicy("hsm-ecdsa-p256", "")), 0o600)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Rotation.Canaries = 10
	ctx := context.Background()
	d := sha256.Sum256([]byte("firmware"))

	var v2 string
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if err := admin.Rotate(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		s, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil {
			t.Fatal(err)
		}
		v2 = s.KID
	})
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		s, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil || s.KID != v2 {
			t.Fatalf("after restart: kid %s (want %s), %v", s.KID, v2, err)
		}
		k, _ := c.PublicKey(ctx, client.ByKID(v2))
		if err := providers.Verify(k.Public, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d[:], s.Sig); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.IncidentDrill(ctx, "payments/release"); err != nil {
			t.Fatalf("drill on SoftHSM2: %v", err)
		}
	})
}

// A rollback to a version whose key the agent cannot serve (its generated
// key was lost; the agent logged that at start) is refused: every
// signature would fail, and the next start would refuse the agent for an
// active version it cannot serve.
func TestRollbackToAnUnservableVersionIsRefused(t *testing.T) {
	cfg := smallRotationConfig(t)
	ctx := context.Background()
	d := sha256.Sum256([]byte("rollback"))
	es256 := client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA256}
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		for range 2 { // v2 and v3 generated; v2 accepted
			if err := admin.Rotate(ctx, "payments/release"); err != nil {
				t.Fatal(err)
			}
		}
	})
	lost, _ := filepath.Glob(filepath.Join(cfg.DataDir, "keys", "*", "*v2*"))
	if len(lost) != 1 {
		t.Fatalf("v2's key file: %v", lost)
	}
	if err := os.Remove(lost[0]); err != nil {
		t.Fatal(err)
	}
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if _, err := admin.Rollback(ctx, "payments/release"); client.Code(err) != proto.Unavailable {
			t.Fatalf("rollback to a version whose key is gone: %v, want UNAVAILABLE", err)
		}
		if _, err := c.Sign(ctx, client.ByName("release"), es256, d[:]); err != nil {
			t.Fatalf("the slot after the refused rollback: %v", err)
		}
	})
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if _, err := c.Sign(ctx, client.ByName("release"), es256, d[:]); err != nil {
			t.Fatalf("after a restart: %v", err)
		}
	})
}

// A rotation the calendar makes says so, and when it was due, in its
// journal records and evidence pack: "scheduled, due <time>".
func TestScheduledRotationNamesItsDueTime(t *testing.T) {
	cfg := smallRotationConfig(t)
	due := time.Now().Add(3 * time.Second).UTC().Truncate(time.Second) // after the slot is enrolled at start
	cfg.Rotation.Calendars = map[string]rotation.CalendarConfig{"payments/release": {Dates: []string{due.Format(time.RFC3339)}}}
	ctx := context.Background()
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		want := "scheduled, due " + due.Format(time.RFC3339)
		for deadline := time.Now().Add(10 * time.Second); ; {
			recs, err := admin.AuditTail(ctx, "payments", 0, 1000)
			if err != nil {
				t.Fatal(err)
			}
			for _, raw := range recs {
				var r struct{ Op, Detail string }
				json.Unmarshal(raw, &r)
				if r.Op == "rotate.start" {
					if !strings.Contains(r.Detail, want) {
						t.Fatalf("the scheduled rotation's start record: %q, want it to say %q", r.Detail, want)
					}
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatal("the calendar's rotation did not start")
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

// smallRotationConfig is softwareConfig with the two-tenant policy, an
// admin socket and rotation on with a canary set of 2.
func smallRotationConfig(t *testing.T) agent.Config {
	t.Helper()
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(cfg.Policy, []byte(twoTenants(os.Getuid(), "spiffe://example.org/billing")), 0o600)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Rotation.Canaries = 2
	return cfg
}

// A reload puts the config file's calendars in force: calendars reach the
// agent from the fleet's configuration system, like the rest of its config.
// A calendar added by a reload used to be dropped while the reload reported
// success, so the slot never rotated until a restart.
func TestReloadPutsCalendarsInForce(t *testing.T) {
	base := smallRotationConfig(t)
	configPath := filepath.Join(t.TempDir(), "sigil.yaml")
	writeConfig := func(calendars string) {
		t.Helper()
		y := fmt.Sprintf("socket: %s\ndata_dir: %s\nadmin_socket: %s\npolicy: %s\nrotation:\n  canaries: 2\n%s"+
			"providers:\n  - id: soft\n    type: software\n    keys:\n      - {name: default, type: ecdsa-p256}\n      - {name: ed, type: ed25519}\n",
			base.Socket, base.DataDir, base.AdminSocket, base.Policy, calendars)
		if err := os.WriteFile(configPath, []byte(y), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig("")
	cfg, err := agent.LoadConfig(configPath)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	agentLifetime(t, cfg, func(_, admin *client.Client) {
		// A calendar for a slot the policy lacks is put in force with the
		// others, and the reload says it will never rotate.
		writeConfig("  calendars:\n    payments/relase: {period: 720h}\n")
		if _, err := admin.ReloadPolicy(ctx); err == nil || !strings.Contains(err.Error(), "payments/relase") {
			t.Fatalf("reload with a calendar for no slot: %v, want it named", err)
		}
		due := time.Now().Add(time.Second).UTC().Truncate(time.Second).Add(time.Second)
		writeConfig(fmt.Sprintf("  calendars:\n    payments/release: {dates: [%q]}\n", due.Format(time.RFC3339)))
		if _, err := admin.ReloadPolicy(ctx); err != nil {
			t.Fatalf("reload: %v", err)
		}
		for deadline := due.Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			recs, err := admin.AuditTail(ctx, "payments", 0, 100)
			if err != nil {
				t.Fatal(err)
			}
			for _, raw := range recs {
				var r struct{ Op, Detail string }
				if json.Unmarshal(raw, &r) == nil && r.Op == "rotate.start" {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("no rotation by %s for the calendar date %s a reload put in force", deadline.Format(time.RFC3339), due.Format(time.RFC3339))
			}
		}
	})
}

// An admin's rotation request that is refused for what it asks is answered
// with a code for that and the reason in the message. A one-off time in
// the past, past what the rotation state can hold (after 9999), or an
// evidence pack of a slot not named tenant/slot used to be INTERNAL,
// "internal error; see the agent's log", which docs/protocol.md defines as
// a bug, while the reason was only in the agent's log.
func TestRotationRefusalsSayWhy(t *testing.T) {
	cfg := smallRotationConfig(t)
	ctx := context.Background()
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		for _, tc := range []struct {
			name   string
			call   func() error
			code   proto.Code
			reason string
		}{
			{"schedule a rotation in the past", func() error {
				_, err := admin.ScheduleRotation(ctx, "payments/release", time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC))
				return err
			}, proto.BadRequest, "not in the future"},
			{"schedule a rotation after 9999", func() error {
				_, err := admin.ScheduleRotation(ctx, "payments/release", time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC))
				return err
			}, proto.BadRequest, "9999"},
			{"export the newest pack of a slot not named tenant/slot", func() error {
				_, _, err := admin.ExportREP(ctx, "release", 0)
				return err
			}, proto.BadRequest, "tenant/slot"},
			{"export pack 2 of a slot with an invalid name", func() error {
				_, _, err := admin.ExportREP(ctx, "payments/Release", 2)
				return err
			}, proto.BadRequest, "allowed are a-z"},
			{"roll back a slot that has only v1", func() error {
				_, err := admin.Rollback(ctx, "payments/release")
				return err
			}, proto.NotFound, "no version before v1"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				err := tc.call()
				if client.Code(err) != tc.code || !strings.Contains(fmt.Sprint(err), tc.reason) {
					t.Fatalf("%v (%v), want %v naming %q", err, client.Code(err), tc.code, tc.reason)
				}
			})
		}
		// The slot still rotates: nothing was scheduled or changed.
		if err := admin.Rotate(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
	})
}

// signOnlyProvider serves its keys but cannot generate one (an embedder's
// provider): the agent cannot make a rotation of a slot whose key it holds.
type signOnlyProvider struct{ providers.Provider }

// A rotation the agent cannot make with its configuration (here the slot's
// provider cannot generate keys) fails at its start step, journaled
// (rotate.failed, UNAVAILABLE) like any failed rotation, whether an
// operator or the calendar asked, and the operator is told why: such
// failures used to leave no record, and a rotation by hand got INTERNAL,
// "internal error; see the agent's log", which docs/protocol.md defines as
// a bug. The slot keeps signing with its key, unpaused.
func TestRotationOptionFailuresAreJournaled(t *testing.T) {
	cfg := smallRotationConfig(t)
	os.WriteFile(cfg.Policy, []byte(releasePolicy("fixed", "")), 0o600)
	soft, err := software.Open(software.Config{ID: "fixed", DataDir: t.TempDir(),
		Keys: []software.KeyConfig{{Name: "fixed", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const slot = "payments/release"
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		failures := func(t *testing.T) []map[string]any { return auditOps(t, admin, "payments", "rotate.failed") }
		for _, tc := range []struct {
			name      string
			ask       func() error
			scheduled bool // the scheduler rotates, later
		}{
			{"rotate", func() error { return admin.Rotate(ctx, slot) }, false},
			{"incident drill", func() error { _, err := admin.IncidentDrill(ctx, slot); return err }, false},
			{"a one-off time", func() error {
				_, err := admin.ScheduleRotation(ctx, slot, time.Now().Add(2*time.Second))
				return err
			}, true},
		} {
			t.Run(tc.name, func(t *testing.T) {
				before := len(failures(t))
				err := tc.ask()
				switch {
				case tc.scheduled && err != nil:
					t.Fatal(err)
				case !tc.scheduled && (client.Code(err) != proto.Unavailable || !strings.Contains(err.Error(), "step start failed") ||
					!strings.Contains(err.Error(), "cannot generate keys")):
					t.Fatalf("%v (%v), want UNAVAILABLE naming the step and the reason", err, client.Code(err))
				}
				var got []map[string]any
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
					if got = failures(t); len(got) > before || time.Now().After(deadline) {
						break
					}
				}
				if len(got) != before+1 {
					t.Fatalf("%d rotate.failed records, want %d", len(got), before+1)
				}
				r := got[len(got)-1]
				detail, _ := r["detail"].(string)
				if !strings.Contains(detail, "step start failed") || !strings.Contains(detail, "cannot generate keys") || r["code_name"] != "UNAVAILABLE" {
					t.Fatalf("failure record %v, want the step, the reason and UNAVAILABLE", r)
				}
				if scheduler := r["peer"] == "scheduler"; scheduler != tc.scheduled {
					t.Fatalf("failure record's peer %v", r["peer"])
				}
				if _, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, make([]byte, 32)); err != nil {
					t.Fatalf("the slot after the failure: %v", err)
				}
			})
		}
	}, agent.WithProviders(signOnlyProvider{soft}))
}

// The CSR of a rotation carries every subject field the slot's rotation
// settings set, with CN=<tenant>/<slot> when common_name is not one of
// them. A subject of only organizational_unit and country used to be
// dropped whole (the CSR said CN=payments/release and nothing else), and
// one of only organization had no CN.
func TestRotationCSRHasTheConfiguredSubject(t *testing.T) {
	const slot = "payments/release"
	ou, country, org := []string{"Signing"}, []string{"US"}, []string{"Example Corp"}
	for _, tc := range []struct {
		name    string
		subject agent.SubjectConfig
		want    pkix.Name
	}{
		{"none", agent.SubjectConfig{}, pkix.Name{CommonName: slot}},
		{"organizational unit and country", agent.SubjectConfig{OrganizationalUnit: ou, Country: country},
			pkix.Name{CommonName: slot, OrganizationalUnit: ou, Country: country}},
		{"organization", agent.SubjectConfig{Organization: org}, pkix.Name{CommonName: slot, Organization: org}},
		{"every field", agent.SubjectConfig{CommonName: "release.payments.example", Organization: org, OrganizationalUnit: ou, Country: country},
			pkix.Name{CommonName: "release.payments.example", Organization: org, OrganizationalUnit: ou, Country: country}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := smallRotationConfig(t)
			cfg.Rotation.Slots = map[string]agent.SlotRotation{slot: {Subject: tc.subject}}
			ctx := context.Background()
			agentLifetime(t, cfg, func(_, admin *client.Client) {
				if err := admin.Rotate(ctx, slot); err != nil {
					t.Fatal(err)
				}
				manifest, _, err := admin.ExportREP(ctx, slot, 0)
				if err != nil {
					t.Fatal(err)
				}
				var m rotation.Manifest
				if err := json.Unmarshal(manifest, &m); err != nil {
					t.Fatal(err)
				}
				block, _ := pem.Decode([]byte(m.CSR.PEM))
				if block == nil {
					t.Fatalf("the pack's CSR is not PEM: %q", m.CSR.PEM)
				}
				csr, err := x509.ParseCertificateRequest(block.Bytes)
				if err != nil {
					t.Fatal(err)
				}
				got := pkix.Name{CommonName: csr.Subject.CommonName, Organization: csr.Subject.Organization,
					OrganizationalUnit: csr.Subject.OrganizationalUnit, Country: csr.Subject.Country}
				if !reflect.DeepEqual(got, tc.want) {
					t.Fatalf("CSR subject %q (manifest %q), want %q", got, m.CSR.Subject, tc.want)
				}
			})
		})
	}
}

// The evidence key file lost while its packs are kept (a backup restored
// without DATA_DIR/evidence.key, an operator's mistake): the agent used to
// make a new key at the next start, silently, and write its public half
// over evidence-key.pub.pem and evidence.pub, so every pack kept pointed at
// a key file that no longer verified it, and the old public key was gone
// from the host. The start is refused now, naming the key the packs need
// and the two ways on; moving the public key aside under its fingerprint
// begins a new key, and the old packs still verify with the file kept.
func TestLostEvidenceKeyIsNotReplacedSilently(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		disturb func(t *testing.T, evDir, oldID string) // after evidence.key is removed
		refused bool
	}{
		{"the public key and the packs kept", func(*testing.T, string, string) {}, true},
		{"the public key lost too, the packs kept", func(t *testing.T, evDir, _ string) {
			if err := os.Remove(filepath.Join(evDir, "evidence-key.pub.pem")); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"the public key moved aside under another name", func(t *testing.T, evDir, _ string) {
			if err := os.Rename(filepath.Join(evDir, "evidence-key.pub.pem"), filepath.Join(evDir, "old.pem")); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"the public key moved aside under its fingerprint", func(t *testing.T, evDir, oldID string) {
			if err := os.Rename(filepath.Join(evDir, "evidence-key.pub.pem"), filepath.Join(evDir, "evidence-key-"+oldID+".pub.pem")); err != nil {
				t.Fatal(err)
			}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := smallRotationConfig(t)
			agentLifetime(t, cfg, func(_, admin *client.Client) {
				if err := admin.Rotate(ctx, "payments/release"); err != nil {
					t.Fatal(err)
				}
			})
			evDir := filepath.Join(cfg.DataDir, "evidence")
			pubFile := filepath.Join(evDir, "evidence-key.pub.pem")
			oldPEM, err := os.ReadFile(pubFile)
			if err != nil {
				t.Fatal(err)
			}
			oldPub, err := rotation.ParseEvidencePublicKey(oldPEM)
			if err != nil {
				t.Fatal(err)
			}
			oldID := rotation.EvidenceKeyID(oldPub)
			pack, _, _, _ := rotation.REPPaths(evDir, "payments/release", 2)
			if _, err := rotation.VerifyREPFile(pack, oldPub); err != nil {
				t.Fatalf("the pack before the key was lost: %v", err)
			}
			if err := os.Remove(filepath.Join(cfg.DataDir, "evidence.key")); err != nil {
				t.Fatal(err)
			}
			tc.disturb(t, evDir, oldID)

			a, err := agent.New(ctx, cfg, zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)))
			if a != nil {
				defer a.Shutdown(ctx)
			}
			if !tc.refused {
				if err != nil {
					t.Fatalf("the start after the old public key was kept aside: %v", err)
				}
				kept, err := os.ReadFile(filepath.Join(evDir, "evidence-key-"+oldID+".pub.pem"))
				if err != nil || !bytes.Equal(kept, oldPEM) {
					t.Fatalf("the old public key kept aside: %v", err)
				}
				newPEM, _ := os.ReadFile(pubFile)
				if newPub, err := rotation.ParseEvidencePublicKey(newPEM); err != nil || rotation.EvidenceKeyID(newPub) == oldID {
					t.Fatalf("evidence-key.pub.pem after a new key began: %v, the old key %v", err, rotation.EvidenceKeyID(newPub) == oldID)
				}
				if _, err := rotation.VerifyREPFile(pack, oldPub); err != nil {
					t.Fatalf("the old pack with the key kept aside: %v", err)
				}
				return
			}
			if err == nil {
				besidePEM, _ := os.ReadFile(pubFile)
				beside, _ := rotation.ParseEvidencePublicKey(besidePEM)
				_, verr := rotation.VerifyREPFile(pack, beside)
				t.Fatalf("the agent started with a new evidence key; evidence-key.pub.pem replaced: %v; the old pack with the key beside it: %v",
					!bytes.Equal(besidePEM, oldPEM), verr)
			}
			t.Logf("refused: %v", err)
			if !agent.IsConfigError(err) {
				t.Errorf("refused as %v (code %s), want a configuration error (exit 78: a restart does not cure it)", err, agent.Code(err))
			}
			for _, want := range []string{oldID, "evidence.key", "evidence-key-" + oldID + ".pub.pem"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("the refusal %q does not name %q", err, want)
				}
			}
			if _, serr := os.Stat(filepath.Join(cfg.DataDir, "evidence.key")); !os.IsNotExist(serr) {
				t.Errorf("a refused start left an evidence key: %v", serr)
			}
			if after, _ := os.ReadFile(filepath.Join(cfg.DataDir, "evidence.pub")); !bytes.Equal(after, oldPEM) {
				t.Error("a refused start replaced DATA_DIR/evidence.pub")
			}
			if _, err := rotation.VerifyREPFile(pack, oldPub); err != nil {
				t.Errorf("the old pack after a refused start: %v", err)
			}
		})
	}
}

// DATA_DIR/evidence.pub, the operator's copy of the evidence public key
// (the way back when evidence.key is lost), used to be written in place at
// every start: an agent killed during that write left it cut short. It is
// replaced whole now, through a temporary file and a rename, so a link to
// the old file (here standing for a reader holding the old one) keeps the
// old bytes, and the new file holds the key.
func TestEvidencePublicKeyIsReplacedWhole(t *testing.T) {
	cfg := smallRotationConfig(t)
	agentLifetime(t, cfg, func(_, _ *client.Client) {})
	pubFile := filepath.Join(cfg.DataDir, "evidence.pub")
	want, err := os.ReadFile(pubFile)
	if err != nil {
		t.Fatal(err)
	}
	witness := filepath.Join(t.TempDir(), "witness")
	if err := os.WriteFile(witness, []byte("the old file\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(pubFile); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(witness, pubFile); err != nil {
		t.Skipf("no hard links here: %v", err)
	}
	agentLifetime(t, cfg, func(_, _ *client.Client) {})
	if got, _ := os.ReadFile(witness); string(got) != "the old file\n" {
		t.Fatalf("evidence.pub was written in place: the old file now holds %q", got)
	}
	if got, _ := os.ReadFile(pubFile); !bytes.Equal(got, want) {
		t.Fatalf("evidence.pub after the start: %q, want the evidence public key %q", got, want)
	}
}
