package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap/zaptest"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// The data dir an agent built from commit 3f3bd58 left at a clean stop
// (testdata/datadir-3f3bd58; testdata/README.md says how it was made):
// slots pay/rel (rotated to v2), pay/ed (rotated to v3, rolled back to
// v2) and pay/hold (paused by an admin), 30 records stored one per key,
// quota counts and the pause in the journal's state, no "m/format" entry.
const (
	olderDataDir  = "testdata/datadir-3f3bd58"
	olderRecords  = 30
	olderHead     = "513550848673a07a473f35ec1b70810d506f3bdd1ab994e898574a88d1ee3b93"
	olderRelV2KID = "ac970f66ccdf0b1fd6398964b2287ebe"
	olderEdV1KID  = "d12627919039622e4252c9d1b203d103"
	olderEdV2KID  = "86d8e3be0f359c3a8089146131108ddd"
)

// olderAgentConfig is the config the older agent ran with, on a private
// copy of its data dir; the policy maps this test's uid where the older
// agent's mapped root.
func olderAgentConfig(t *testing.T) agent.Config {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	if err := os.CopyFS(dir, os.DirFS(olderDataDir)); err != nil {
		t.Fatal(err)
	}
	// As the agent made them: git keeps no modes.
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		mode := os.FileMode(0o600)
		if d.IsDir() {
			mode = 0o700
		}
		return os.Chmod(path, mode)
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := agent.ParseConfig([]byte(`
journal: {mode: wal}
rotation: {overlap: 876000h, canaries: 2}
providers:
  - id: soft
    type: software
    keys:
      - {name: soft-rel, type: ecdsa-p256}
      - {name: soft-ed, type: ed25519}
      - {name: soft-hold, type: ed25519}
`))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = dir
	cfg.Socket = shortSocketPath(t)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	policy := fmt.Sprintf(`
admins: {unix_uids: [%d]}
tenants:
  - name: pay
    identities: {unix_uids: [%d]}
    slots:
      - {name: rel, key: soft-rel, policy: {daily_quota: 1000}}
      - {name: ed, key: soft-ed}
      - {name: hold, key: soft-hold}
`, os.Getuid(), os.Getuid())
	if err := os.WriteFile(cfg.Policy, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// An upgrade in place: this build starts on the data dir and config of an
// agent from before runs, the format entry and the rollback's Replaced
// record, and carries on where it stopped. The active versions, the
// run-time pause and the audit chain are as the older agent left them,
// its records read back, new ones chained onto its last, and a rotation
// and a rollback work on the slots it rotated (docs/audit.md, "Upgrades
// and rollbacks").
func TestDataDirOfAnOlderAgentStarts(t *testing.T) {
	cfg := olderAgentConfig(t)
	ctx := context.Background()
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		keys, err := c.ListKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, k := range keys {
			got[k.Name] = k.KID
		}
		if got["rel"] != olderRelV2KID || got["ed"] != olderEdV2KID {
			t.Fatalf("active versions after the upgrade: %v, want rel %s and ed %s", got, olderRelV2KID, olderEdV2KID)
		}

		d := sha256.Sum256([]byte("after the upgrade"))
		sig, err := c.Sign(ctx, client.ByName("rel"), client.Algorithm{}, d[:])
		if err != nil || sig.KID != olderRelV2KID {
			t.Fatalf("sign with rel: %+v, %v; want its v2 %s", sig, err, olderRelV2KID)
		}
		pub, err := c.PublicKey(ctx, client.ByKID(olderRelV2KID))
		if err != nil {
			t.Fatal(err)
		}
		if !ecdsa.VerifyASN1(pub.Public.(*ecdsa.PublicKey), d[:], sig.Sig) {
			t.Fatal("rel's signature does not verify with its v2 public key")
		}
		msg := []byte("ed after the upgrade")
		sig, err = c.Sign(ctx, client.ByName("ed"), client.Algorithm{}, msg)
		if err != nil || sig.KID != olderEdV2KID {
			t.Fatalf("sign with ed: %+v, %v; want its v2 %s", sig, err, olderEdV2KID)
		}
		if pub, err = c.PublicKey(ctx, client.ByKID(olderEdV2KID)); err != nil || !ed25519.Verify(pub.Public.(ed25519.PublicKey), msg, sig.Sig) {
			t.Fatalf("ed's signature does not verify with its v2 public key (%v)", err)
		}
		if _, err := c.Sign(ctx, client.ByName("hold"), client.Algorithm{}, msg); client.Code(err) != proto.Paused {
			t.Fatalf("sign with hold, which the older agent paused: %v, want PAUSED", err)
		}

		ok, summary, err := admin.AuditVerify(ctx)
		if err != nil || !ok || !strings.Contains(summary, fmt.Sprintf("seq 1..%d", olderRecords+3)) {
			t.Fatalf("audit verify: %v %q %v; want the older agent's %d records and this one's 3", ok, summary, err, olderRecords)
		}
		lines, err := admin.AuditTail(ctx, "", 1, olderRecords+3)
		if err != nil || len(lines) != olderRecords+3 {
			t.Fatalf("audit tail from seq 1: %d records, %v; want %d", len(lines), err, olderRecords+3)
		}
		var first, next struct {
			Seq      uint64 `json:"seq"`
			Op       string `json:"op"`
			Hash     string `json:"hash"`
			PrevHash string `json:"prev_hash"`
		}
		if err := json.Unmarshal(lines[0], &first); err != nil || first.Seq != 1 || first.Op != "enroll" {
			t.Fatalf("the older agent's first record reads as %+v (%v)", first, err)
		}
		if err := json.Unmarshal(lines[olderRecords], &next); err != nil || next.Seq != olderRecords+1 || next.PrevHash != olderHead {
			t.Fatalf("this build's first record %+v (%v) does not chain onto the older agent's head %s", next, err, olderHead)
		}

		// The older agent stored no Replaced with its versions: a rollback
		// goes to the highest version below the active one (docs/rotation.md).
		if _, err := admin.Rollback(ctx, "pay/ed"); err != nil {
			t.Fatal(err)
		}
		if k, err := c.PublicKey(ctx, client.ByName("ed")); err != nil || k.KID != olderEdV1KID {
			t.Fatalf("ed after a rollback: %+v, %v; want v1 %s", k, err, olderEdV1KID)
		}
		if _, err := admin.RotateSlot(ctx, "pay/rel"); err != nil {
			t.Fatal(err)
		}
		if k, err := c.PublicKey(ctx, client.ByName("rel")); err != nil || k.KID == olderRelV2KID {
			t.Fatalf("rel after a rotation: %+v, %v; want a v3", k, err)
		}
		if _, _, err := admin.ExportREP(ctx, "pay/ed", 3); err != nil {
			t.Fatalf("the older agent's evidence pack: %v", err)
		}
	})
	// And again, on what this build wrote.
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if ok, summary, err := admin.AuditVerify(ctx); err != nil || !ok {
			t.Fatalf("audit verify after a restart: %v %q %v", ok, summary, err)
		}
		if k, err := c.PublicKey(ctx, client.ByName("ed")); err != nil || k.KID != olderEdV1KID {
			t.Fatalf("ed after a restart: %+v, %v; want v1 %s", k, err, olderEdV1KID)
		}
	})
}

// A rollback onto a data dir a newer sigil wrote: its journal's format is
// newer than this build's, and the agent does not start, saying so, as a
// fault only an operator can cure (exit 78, no restart by systemd),
// instead of reading and extending a journal it does not know.
func TestAgentRefusesAJournalOfANewerSigil(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	agentLifetime(t, cfg, func(c, admin *client.Client) {})
	dir := filepath.Join(cfg.DataDir, "journal")
	db, err := pebble.Open(dir, &pebble.Options{Logger: quietPebbleLogger{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Set([]byte("m/format"), []byte{200}, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(context.Background(), cfg, zaptest.NewLogger(t))
	if err == nil {
		a.Shutdown(context.Background())
		t.Fatal("the agent started on a journal of a newer format")
	}
	if !errors.Is(err, journal.ErrNewerFormat) || !agent.IsConfigError(err) {
		t.Fatalf("New: %v; want ErrNewerFormat, a config error", err)
	}
	for _, want := range []string{dir, "format 200", "newer sigil"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
}

// quietPebbleLogger keeps Pebble's info lines out of the test's output.
type quietPebbleLogger struct{}

func (quietPebbleLogger) Infof(string, ...any)  {}
func (quietPebbleLogger) Errorf(string, ...any) {}
func (quietPebbleLogger) Fatalf(format string, args ...any) {
	panic(fmt.Sprintf(format, args...))
}
