package agent_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// A run-time pause outlives the agent: after a restart the slot still
// refuses with PAUSED until an admin resumes it, and a resume outlives it
// too. A policy reload that drops the slot and brings it back keeps it
// paused.
func TestRunTimePauseSurvivesRestart(t *testing.T) {
	cfg := pauseConfig(t)
	withSlot, withoutSlot := pausePolicy(true), pausePolicy(false)
	if err := os.WriteFile(cfg.Policy, []byte(withSlot), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sign := releaseSigner("pause")

	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if err := sign(c); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.Pause(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		if err := sign(c); client.Code(err) != proto.Paused {
			t.Fatalf("after pause: %v, want PAUSED", err)
		}
	})
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if err := sign(c); client.Code(err) != proto.Paused {
			t.Fatalf("after a restart: %v, want PAUSED", err)
		}
		if _, err := c.Sign(ctx, client.ByName("other"), client.Algorithm{}, []byte("m")); err != nil {
			t.Fatalf("the other slot: %v", err)
		}
		// The slot leaves the policy and comes back: still paused.
		os.WriteFile(cfg.Policy, []byte(withoutSlot), 0o600)
		if _, err := admin.ReloadPolicy(ctx); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(cfg.Policy, []byte(withSlot), 0o600)
		if _, err := admin.ReloadPolicy(ctx); err != nil {
			t.Fatal(err)
		}
		if err := sign(c); client.Code(err) != proto.Paused {
			t.Fatalf("after the slot came back: %v, want PAUSED", err)
		}
		if _, err := admin.Resume(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		if err := sign(c); err != nil {
			t.Fatalf("after resume: %v", err)
		}
	})
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if err := sign(c); err != nil {
			t.Fatalf("a resume did not outlive the restart: %v", err)
		}
	})
}

// A pause and a resume of one slot at the same time (two admins, or a
// drill and an admin) leave the slot as one of them left it, in memory and
// in the journal alike: never signing in memory while the journal says
// paused (a Pause that returned OK on a slot that signs). Dropping the slot
// from the policy and bringing it back re-reads the stored pause.
func TestConcurrentPauseAndResumeAgree(t *testing.T) {
	cfg := pauseConfig(t)
	withSlot, withoutSlot := pausePolicy(true), pausePolicy(false)
	if err := os.WriteFile(cfg.Policy, []byte(withSlot), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sign := releaseSigner("pause race")
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		admin2, err := client.Dial(ctx, cfg.AdminSocket)
		if err != nil {
			t.Fatal(err)
		}
		defer admin2.Close()
		for i := range 40 {
			var wg sync.WaitGroup
			wg.Go(func() { admin.Pause(ctx, "payments/release") })
			wg.Go(func() { admin2.Resume(ctx, "payments/release") })
			wg.Wait()
			inMemory := client.Code(sign(c))
			os.WriteFile(cfg.Policy, []byte(withoutSlot), 0o600)
			if _, err := admin.ReloadPolicy(ctx); err != nil {
				t.Fatal(err)
			}
			os.WriteFile(cfg.Policy, []byte(withSlot), 0o600)
			if _, err := admin.ReloadPolicy(ctx); err != nil {
				t.Fatal(err)
			}
			if stored := client.Code(sign(c)); stored != inMemory {
				t.Fatalf("round %d: the slot answered %s before the reload and %s after it, from the stored pauses", i, inMemory, stored)
			}
			admin.Resume(ctx, "payments/release")
		}
	})
}

// A reload that takes this uid out of the admins ends its admin role on the
// admin connection already open, not only for new ones.
func TestRevokedAdminLosesTheRoleOnOpenConnections(t *testing.T) {
	cfg := pauseConfig(t)
	if err := os.WriteFile(cfg.Policy, []byte(pausePolicy(true)), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if _, err := admin.Pause(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		revoked := strings.Replace(pausePolicy(true), fmt.Sprintf("admins: {unix_uids: [%d]}", os.Getuid()),
			fmt.Sprintf("admins: {unix_uids: [%d]}", os.Getuid()+1), 1)
		if revoked == pausePolicy(true) {
			t.Fatal("the policy names no admin to revoke")
		}
		if err := os.WriteFile(cfg.Policy, []byte(revoked), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.ReloadPolicy(ctx); err != nil {
			t.Fatal(err)
		}
		for name, op := range map[string]func() error{
			"resume": func() error { _, err := admin.Resume(ctx, "payments/release"); return err },
			"pause":  func() error { _, err := admin.Pause(ctx, "payments/other"); return err },
			"reload": func() error { _, err := admin.ReloadPolicy(ctx); return err },
		} {
			if err := op(); client.Code(err) != proto.Unauthenticated {
				t.Errorf("%s by a revoked admin: %v, want UNAUTHENTICATED", name, err)
			}
		}
		if err := releaseSigner("still paused")(c); client.Code(err) != proto.Paused {
			t.Errorf("the slot after the revoked admin's resume: %v, want PAUSED", err)
		}
	})
}

// A slot that a reload adds signs at once, and is listed, with rotation on
// (a policy file and the journal): it is enrolled before the policy naming
// it is in force.
func TestSlotAddedByReloadSigns(t *testing.T) {
	cfg := pauseConfig(t)
	if err := os.WriteFile(cfg.Policy, []byte(pausePolicy(false)), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sign := releaseSigner("a new slot")
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if err := sign(c); client.Code(err) != proto.NotFound {
			t.Fatalf("before the reload: %v, want NOT_FOUND", err)
		}
		if err := os.WriteFile(cfg.Policy, []byte(pausePolicy(true)), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.ReloadPolicy(ctx); err != nil {
			t.Fatal(err)
		}
		if err := sign(c); err != nil {
			t.Fatalf("the slot the reload added: %v", err)
		}
		keys, err := c.ListKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, k := range keys {
			names = append(names, k.Name)
		}
		if !slices.Contains(names, "release") {
			t.Fatalf("ListKeys after the reload: %v, want release among them", names)
		}
	})
}

// releaseSigner returns a Sign of a digest of text with the slot
// "release", as pausePolicy's tenant.
func releaseSigner(text string) func(c *client.Client) error {
	d := sha256.Sum256([]byte(text))
	return func(c *client.Client) error {
		_, err := c.Sign(context.Background(), client.ByName("release"), client.Algorithm{}, d[:])
		return err
	}
}

// pauseConfig is softwareConfig with an admin socket and a policy file
// (written by the caller).
func pauseConfig(t *testing.T) agent.Config {
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	return cfg
}

// pausePolicy: tenant payments (this uid) with slots release (unless
// dropped) and other; this uid is the admin.
func pausePolicy(withRelease bool) string {
	release := "      - {name: release, key: default}\n"
	if !withRelease {
		release = ""
	}
	return fmt.Sprintf(`
admins: {unix_uids: [%d]}
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
%s      - {name: other, key: ed}
`, os.Getuid(), os.Getuid(), release)
}

// With the journal failing, a pause still takes effect (and says it will
// not outlive a restart), and a resume does not.
func TestPauseFailsClosedWhenTheJournalFails(t *testing.T) {
	toggle := writeFaults()
	cfg := pauseConfig(t)
	if err := os.WriteFile(cfg.Policy, []byte(pausePolicy(true)), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, cfg, agent.WithJournalFS(errorfs.Wrap(vfs.Default, toggle)))
	aln, err := agent.ListenUnix(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	go r.agent.ServeAdmin(aln)
	ctx := context.Background()
	admin, err := client.Dial(ctx, cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	c := r.dial(t)
	signRelease := releaseSigner("pause")
	sign := func() error { return signRelease(c) }
	// retry repeats op until the journal has recovered from the fault.
	retry := func(what string, op func() error) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := op()
			if err == nil {
				return
			}
			if client.Code(err) != proto.JournalUnavailable || time.Now().After(deadline) {
				t.Fatalf("%s after the fault cleared: %v", what, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	toggle.On()
	_, err = admin.Pause(ctx, "payments/release")
	if client.Code(err) != proto.JournalUnavailable || !strings.Contains(err.Error(), "lasts until the agent restarts") {
		t.Fatalf("pause with the journal failing: %v", err)
	}
	if err := sign(); client.Code(err) != proto.Paused {
		t.Fatalf("a pause that could not be stored did not take effect: %v", err)
	}
	toggle.Off()
	retry("pause", func() error { _, err := admin.Pause(ctx, "payments/release"); return err })

	toggle.On()
	if _, err := admin.Resume(ctx, "payments/release"); client.Code(err) != proto.JournalUnavailable {
		t.Fatalf("resume with the journal failing: %v", err)
	}
	if err := sign(); client.Code(err) != proto.Paused {
		t.Fatalf("a resume that could not be stored took effect: %v", err)
	}
	toggle.Off()
	retry("resume", func() error { _, err := admin.Resume(ctx, "payments/release"); return err })
	retry("sign", sign)
}

// The day's quota outlives the agent: counts stored at shutdown, counted
// again from the day's records when none are stored (a crash before the
// first store), and stored counts plus the records after them.
func TestDailyQuotaSurvivesRestart(t *testing.T) {
	cfg := pauseConfig(t)
	policyText := strings.Replace(pausePolicy(true), "{name: release, key: default}",
		"{name: release, key: default, policy: {daily_quota: 3}}", 1)
	if err := os.WriteFile(cfg.Policy, []byte(policyText), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sign := releaseSigner("quota")
	journalDir := filepath.Join(cfg.DataDir, "journal")
	// withJournal edits the stopped agent's journal.
	withJournal := func(f func(j *journal.Journal)) {
		j, err := journal.Open(journal.Options{Dir: journalDir})
		if err != nil {
			t.Fatal(err)
		}
		f(j)
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
	expectExhausted := func(step string) {
		t.Helper()
		agentLifetime(t, cfg, func(c, _ *client.Client) {
			if err := sign(c); client.Code(err) != proto.QuotaExceeded {
				t.Fatalf("%s: %v, want QUOTA_EXCEEDED", step, err)
			}
		})
	}

	// expectOneLeft: a restarted agent signs once more, then refuses.
	expectOneLeft := func(step string) {
		t.Helper()
		agentLifetime(t, cfg, func(c, _ *client.Client) {
			if err := sign(c); err != nil {
				t.Fatalf("%s: the quota's last signature: %v", step, err)
			}
			if err := sign(c); client.Code(err) != proto.QuotaExceeded {
				t.Fatalf("%s: past the quota: %v, want QUOTA_EXCEEDED", step, err)
			}
		})
	}

	agentLifetime(t, cfg, func(c, _ *client.Client) {
		for i := 0; i < 2; i++ {
			if err := sign(c); err != nil {
				t.Fatal(err)
			}
		}
	})
	expectOneLeft("the 3rd signature after a restart")
	expectExhausted("stored counts")

	withJournal(func(j *journal.Journal) {
		if err := j.Delete(ctx, "quota/counts"); err != nil {
			t.Fatal(err)
		}
	})
	expectExhausted("no stored counts: today's records")

	// Counts stored after the first signature, the next two journaled
	// after them (as when the agent is killed between two stores).
	withJournal(func(j *journal.Journal) {
		first, err := j.FirstSeqAt(time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		stale := fmt.Sprintf(`{"day":%d,"seq":%d,"counts":{"payments/release":1}}`, time.Now().Unix()/86400, first)
		if err := j.Put(ctx, "quota/counts", []byte(stale)); err != nil {
			t.Fatal(err)
		}
	})
	expectExhausted("stored counts and the records after them")

	// The policy counts what it allows, signed or not: after a restart a
	// request it allowed and the provider failed still counts, and one it
	// refused does not.
	withJournal(func(j *journal.Journal) {
		if err := j.Delete(ctx, "quota/counts"); err != nil {
			t.Fatal(err)
		}
	})
	policyText = strings.Replace(policyText, "daily_quota: 3", "daily_quota: 6", 1)
	if err := os.WriteFile(cfg.Policy, []byte(policyText), 0o600); err != nil {
		t.Fatal(err)
	}
	withJournal(func(j *journal.Journal) {
		for _, code := range []proto.Code{proto.Unavailable, proto.DeadlineExceeded, proto.RateLimited, proto.Paused} {
			r := journal.Record{Op: "sign", Tenant: "payments", Slot: "payments/release", Code: uint16(code),
				CodeName: code.String(), PolicyHash: journal.HashDigest([]byte("policy"))}
			if err := j.Append(ctx, &r); err != nil {
				t.Fatal(err)
			}
		}
	})
	// 3 released + 2 allowed and failed = 5 of 6: one more, then none.
	expectOneLeft("failed requests counted, refusals not")
}

// failOnceProvider fails its next Sign with err, if set, and then signs.
type failOnceProvider struct {
	providers.Provider
	mu  sync.Mutex
	err error
}

func (f *failOnceProvider) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	f.mu.Lock()
	err := f.err
	f.err = nil
	f.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("injected: %w", err)
	}
	return f.Provider.Sign(ctx, key, alg, digest)
}

// A request the policy allowed and its provider then failed counts against
// the day's quota after a restart too, whatever code the provider's error
// has: a key service's throttling (RATE_LIMITED) or its refusal of the
// request (BAD_REQUEST, UNSUPPORTED_ALGORITHM) shares its code with a
// policy refusal, and a restart without stored counts used to read such a
// record as one, handing the unit back.
func TestProviderFailuresCountAfterRestart(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		code proto.Code
	}{
		{"throttled by the key service", providers.ErrRateLimited, proto.RateLimited},
		{"refused by the key service", providers.ErrBadRequest, proto.BadRequest},
		{"algorithm refused by the key service", providers.ErrUnsupportedAlgorithm, proto.UnsupportedAlgorithm},
		{"key service unavailable", providers.ErrUnavailable, proto.Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := pauseConfig(t)
			policyText := strings.Replace(pausePolicy(true), "{name: release, key: default}",
				"{name: release, key: flaky, policy: {daily_quota: 2}}", 1)
			if err := os.WriteFile(cfg.Policy, []byte(policyText), 0o600); err != nil {
				t.Fatal(err)
			}
			keyDir := t.TempDir()
			flaky := func(err error) *failOnceProvider {
				soft, oerr := software.Open(software.Config{ID: "flaky", DataDir: keyDir,
					Keys: []software.KeyConfig{{Name: "flaky", Type: providers.KeyECDSAP256}}})
				if oerr != nil {
					t.Fatal(oerr)
				}
				return &failOnceProvider{Provider: soft, err: err}
			}
			sign := releaseSigner("provider failure")
			agentLifetime(t, cfg, func(c, _ *client.Client) {
				if err := sign(c); client.Code(err) != tc.code {
					t.Fatalf("the provider's failure: %v, want %s", err, tc.code)
				}
				if err := sign(c); err != nil {
					t.Fatalf("the quota's second unit: %v", err)
				}
				if err := sign(c); client.Code(err) != proto.QuotaExceeded {
					t.Fatalf("past the quota: %v, want QUOTA_EXCEEDED", err)
				}
			}, agent.WithProviders(flaky(tc.err)))
			// A crash before the first store of the counts: the restart
			// counts today's records.
			j, err := journal.Open(journal.Options{Dir: filepath.Join(cfg.DataDir, "journal")})
			if err != nil {
				t.Fatal(err)
			}
			if err := j.Delete(context.Background(), "quota/counts"); err != nil {
				t.Fatal(err)
			}
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			agentLifetime(t, cfg, func(c, _ *client.Client) {
				if err := sign(c); client.Code(err) != proto.QuotaExceeded {
					t.Fatalf("after a restart: %v, want QUOTA_EXCEEDED (the failed request counted)", err)
				}
			}, agent.WithProviders(flaky(nil)))
		})
	}
}

// A request the provider refuses before signing (a scheme the slot's key
// cannot make, which a policy allowing every algorithm lets through) takes
// no quota unit and no rate token: no signature was made. It used to take
// both, in memory only (a restart read its UNSUPPORTED_ALGORITHM record as
// a refusal), so a client asking for the wrong scheme used up the slot's
// day without a signature.
func TestRequestTheKeyCannotSignTakesNoQuota(t *testing.T) {
	cfg := pauseConfig(t)
	policyText := strings.Replace(pausePolicy(true), "{name: release, key: default}",
		"{name: release, key: default, policy: {daily_quota: 2, rate: {per_second: 0.001, burst: 3}}}", 1)
	if err := os.WriteFile(cfg.Policy, []byte(policyText), 0o600); err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("wrong scheme"))
	agentLifetime(t, cfg, func(c, _ *client.Client) {
		ctx := context.Background()
		// The slot's key is ECDSA P-256.
		for _, alg := range []client.Algorithm{
			{Scheme: client.SchemePSS, Hash: crypto.SHA256},
			{Scheme: client.SchemePKCS1v15, Hash: crypto.SHA256},
			{Scheme: client.SchemeEd25519},
		} {
			_, err := c.Sign(ctx, client.ByName("release"), alg, d[:])
			if client.Code(err) != proto.UnsupportedAlgorithm {
				t.Fatalf("Sign with scheme %d on an ECDSA key: %v, want UNSUPPORTED_ALGORITHM", alg.Scheme, err)
			}
		}
		sign := releaseSigner("quota")
		for i := range 2 {
			if err := sign(c); err != nil {
				t.Fatalf("signature %d of the quota of 2: %v", i+1, err)
			}
		}
		if err := sign(c); client.Code(err) != proto.QuotaExceeded {
			t.Fatalf("past the quota: %v, want QUOTA_EXCEEDED", err)
		}
	})
}

// Fail closed at start: an agent that cannot read its stored pauses, or
// the counts behind today's quotas, does not start, since it could not
// tell which slots may sign or how much. The reads fail once the journal
// is open (the disk failing under the agent's state, not under Pebble's
// own start-up).
func TestAgentRefusesToStartWithoutItsState(t *testing.T) {
	cases := []struct {
		name    string
		policy  string
		prepare func(c, admin *client.Client) error
		// minTable: only tables of at least this size fail. The journal
		// keeps state keys in small tables of their own and records in
		// large ones (its span policy), so 64 KiB fails the records only.
		minTable int64
		want     string
		// after: what the next signature gets once the disk reads again.
		after proto.Code
	}{
		{"stored pauses", pausePolicy(true), func(_, admin *client.Client) error {
			_, err := admin.Pause(context.Background(), "payments/release")
			return err
		}, 0, "stored pauses", proto.Paused},
		{"today's records", strings.Replace(pausePolicy(true), "{name: release, key: default}",
			"{name: release, key: default, policy: {daily_quota: 3}}", 1), func(c, _ *client.Client) error {
			return releaseSigner("quota")(c)
		}, 64 << 10, "daily quotas", proto.OK},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := pauseConfig(t)
			if err := os.WriteFile(cfg.Policy, []byte(tc.policy), 0o600); err != nil {
				t.Fatal(err)
			}
			agentLifetime(t, cfg, func(c, admin *client.Client) {
				if err := tc.prepare(c, admin); err != nil {
					t.Fatal(err)
				}
			})

			flushJournalState(t, filepath.Join(cfg.DataDir, "journal"))

			faults := sstableReadFaults(tc.minTable)
			log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel), zaptest.WrapOptions(zap.Hooks(func(e zapcore.Entry) error {
				if e.Message == "audit journal open" {
					faults.On()
				}
				return nil
			})))
			a, err := agent.New(context.Background(), cfg, log, agent.WithJournalFS(errorfs.Wrap(vfs.Default, faults)))
			if err == nil {
				_ = a.Shutdown(context.Background())
				t.Fatal("the agent started without reading its state")
			}
			if !strings.Contains(err.Error(), tc.want) || !errors.Is(err, errorfs.ErrInjected) {
				t.Fatalf("agent.New: %v, want a refusal naming %q caused by the read fault", err, tc.want)
			}

			// The state is still there for an agent whose disk reads again.
			agentLifetime(t, cfg, func(c, _ *client.Client) {
				if err := releaseSigner("quota")(c); client.Code(err) != tc.after {
					t.Fatalf("after the fault: %v, want %v", err, tc.after)
				}
			})
		})
	}
}

// sstableReadFaults fails every read of a Pebble table of at least
// minSize bytes while it is on.
func sstableReadFaults(minSize int64) *errorfs.Toggle {
	return faultsWhere(func(op errorfs.Op) bool {
		if op.Kind.ReadOrWrite() != errorfs.OpIsRead || !strings.HasSuffix(op.Path, ".sst") {
			return false
		}
		fi, err := os.Stat(op.Path)
		return err == nil && fi.Size() >= minSize
	})
}

// flushJournalState appends records of another tenant to the stopped
// agent's journal through a small memtable until what the agent stored is
// in Pebble's tables, where reads reach the disk (the last memtable's
// writes are replayed into memory at open and never read from a file).
//
// It first stores 8 KiB of state under keys that sort between the
// journal's chain-head checkpoint ("m/head") and the agent's state. The
// journal reads the checkpoint when it opens, before the test's faults
// are on, and once a compaction has put the agent's state in the same
// table, a data block shared with the checkpoint would be in Pebble's
// block cache when the agent reads its state: the agent then started
// without the read failing, in about one run of seven.
func flushJournalState(t *testing.T, dir string) {
	t.Helper()
	j, err := journal.Open(journal.Options{Dir: dir, MemTableSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		if err := j.Put(context.Background(), fmt.Sprintf("0-block-apart-%d", i), bytes.Repeat([]byte{'x'}, 1024)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 8000; i++ {
		r := journal.Record{Tenant: "filler", Slot: "filler/k", Op: "sign", Peer: "test"}
		if err := j.Append(context.Background(), &r); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if tables, _ := filepath.Glob(filepath.Join(dir, "*.sst")); len(tables) == 0 {
		t.Fatal("no Pebble table after filling the memtable")
	}
}

// Two slots of a tenant share a key under different policies. A request by
// kid alone cannot say whose policy applies, so a Sign by kid is refused; by
// name (and kid) the named slot's policy applies, for a Signer too.
func TestSlotsSharingAKeyKeepTheirOwnPolicies(t *testing.T) {
	cfg := pauseConfig(t)
	os.WriteFile(cfg.Policy, []byte(fmt.Sprintf(`
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: open, key: default}
      - {name: frozen, key: default, policy: {paused: true}}
`, os.Getuid())), 0o600)
	r := startAgent(t, cfg)
	c := r.dial(t)
	ctx := context.Background()
	d := sha256.Sum256([]byte("shared key"))
	open, err := c.PublicKey(ctx, client.ByName("open"))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		ref  client.KeyRef
		want proto.Code
	}{
		{"by the open slot's name", client.ByName("open"), proto.OK},
		{"by the frozen slot's name", client.ByName("frozen"), proto.Paused},
		{"by name and kid", client.KeyRef{Name: "frozen", KID: open.KID}, proto.Paused},
		{"by kid alone", client.ByKID(open.KID), proto.BadRequest},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Sign(ctx, tc.ref, client.Algorithm{}, d[:])
			if got := client.Code(err); got != tc.want {
				t.Fatalf("Sign: %v, want %s", err, tc.want)
			}
		})
	}
	frozen, err := c.Signer(ctx, client.ByName("frozen"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := frozen.Sign(nil, d[:], crypto.SHA256); client.Code(err) != proto.Paused {
		t.Fatalf("a Signer of the frozen slot: %v, want PAUSED", err)
	}
	opener, err := c.Signer(ctx, client.ByName("open"))
	if err != nil {
		t.Fatal(err)
	}
	sig, err := opener.Sign(nil, d[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(open.Public.(*ecdsa.PublicKey), d[:], sig) {
		t.Fatal("the open slot's signature does not verify")
	}
}

// An operator who pauses a slot while an incident drill runs on it finds
// it paused after the drill, and after a restart: the drill lifts only the
// pause it made, as it leaves a pause made before it began. Its resume used
// to lift the operator's pause too, in memory and in the journal.
func TestDrillKeepsAPauseMadeDuringIt(t *testing.T) {
	cfg := pauseConfig(t)
	if err := os.WriteFile(cfg.Policy, []byte(pausePolicy(true)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Rotation.Canaries = 3000 // a drill that lasts long enough to pause during it
	sign := releaseSigner("drill")
	ctx := context.Background()
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		drillAdmin, err := client.Dial(ctx, cfg.AdminSocket)
		if err != nil {
			t.Fatal(err)
		}
		defer drillAdmin.Close()
		drilled := make(chan error, 1)
		go func() {
			_, err := drillAdmin.IncidentDrill(ctx, "payments/release")
			drilled <- err
		}()
		for deadline := time.Now().Add(10 * time.Second); client.Code(sign(c)) != proto.Paused; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the drill never paused the slot")
			}
		}
		if _, err := admin.Pause(ctx, "payments/release"); err != nil {
			t.Fatalf("the operator's pause: %v", err)
		}
		if err := <-drilled; err != nil {
			t.Fatalf("drill: %v", err)
		}
		if err := sign(c); client.Code(err) != proto.Paused {
			t.Fatalf("after the drill: %v, want PAUSED (the operator's pause)", err)
		}
	})
	agentLifetime(t, cfg, func(c, _ *client.Client) {
		if err := sign(c); client.Code(err) != proto.Paused {
			t.Fatalf("after a restart: %v, want PAUSED", err)
		}
	})
}

// holdOneSign sends one Sign of release that the provider holds, and
// returns once the policy has allowed it and it waits in the provider.
func holdOneSign(t *testing.T, h *heldProvider, r *running) (done <-chan error) {
	t.Helper()
	c := r.dial(t)
	h.hold.Store(true)
	errc := make(chan error, 1)
	go func() {
		d := sha256.Sum256([]byte("in flight"))
		_, err := c.Sign(context.Background(), client.ByName("release"), client.Algorithm{}, d[:])
		errc <- err
	}()
	select {
	case <-h.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the Sign did not reach the provider")
	}
	return errc
}

// A Pause is a fence: the signature of a request the policy allowed just
// before it is released before the pause is acknowledged, never after.
// Before, the operator's ack could be followed by a signature of the
// paused slot.
func TestPauseWaitsForTheSignaturesInFlight(t *testing.T) {
	h, _, r, admin := heldAgent(t)
	signed := holdOneSign(t, h, r)
	acked := make(chan error, 1)
	go func() { _, err := admin.Pause(context.Background(), "payments/release"); acked <- err }()
	select {
	case err := <-acked:
		t.Fatalf("the pause was acknowledged (%v) with a signature of the slot still in flight", err)
	case <-time.After(300 * time.Millisecond):
	}
	h.release()
	if err := <-acked; err != nil {
		t.Fatal(err)
	}
	// The agent wrote the reply before the ack (the client may read it a
	// moment later): the signature came out, and was not withheld.
	if err := <-signed; err != nil {
		t.Fatalf("the Sign allowed before the pause: %v", err)
	}
}

// An incident drill pauses first, and its pause waits out the signatures
// in flight: none made by the old key comes out after the drill retired
// it. Before, a signature by the retired key reached its client after the
// drill had answered, its record after the `retire` record.
func TestDrillReleasesNoSignatureOfTheKeyItRetired(t *testing.T) {
	h, _, r, admin := heldAgent(t)
	signed := holdOneSign(t, h, r)
	drilled := make(chan error, 1)
	go func() { _, err := admin.IncidentDrill(context.Background(), "payments/release"); drilled <- err }()
	time.Sleep(300 * time.Millisecond)
	h.release()
	if err := <-drilled; err != nil {
		t.Fatal(err)
	}
	if err := <-signed; err != nil {
		t.Fatalf("the Sign allowed before the drill: %v", err)
	}
	recs, err := admin.AuditTail(context.Background(), "payments", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	retired := false
	for _, raw := range recs {
		var rec struct {
			Op       string
			CodeName string `json:"code_name"`
		}
		json.Unmarshal(raw, &rec)
		switch {
		case rec.Op == "retire":
			retired = true
		case rec.Op == "sign" && rec.CodeName == "OK" && retired:
			t.Fatalf("a signature was journaled OK after the drill retired its key:\n%s", raw)
		}
	}
}

// A reload that pauses the slot in its file while a drill runs leaves it
// paused, and the drill succeeds, saying so. Before, the drill's resume
// met the file's pause and reported the drill failed (INTERNAL,
// drill.failed) although its rotation was done: a retried drill would
// rotate again.
func TestDrillLeavesAFilePauseMadeDuringIt(t *testing.T) {
	h, cfg, r, admin := heldAgent(t)
	h.hold.Store(true) // the drill's first signature (its CSR) waits
	drilled := make(chan error, 1)
	var msg string
	go func() {
		var err error
		msg, err = admin.IncidentDrill(context.Background(), "payments/release")
		drilled <- err
	}()
	select {
	case <-h.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the drill did not reach the provider")
	}
	if err := os.WriteFile(cfg.Policy, []byte(heldPolicy("paused: true")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.agent.ReloadPolicy(); err != nil {
		t.Fatal(err)
	}
	h.release()
	if err := <-drilled; err != nil {
		t.Fatalf("drill: %v", err)
	}
	if !strings.Contains(msg, "left paused") {
		t.Errorf("the drill's reply does not say the slot was left paused: %s", msg)
	}
	d := sha256.Sum256([]byte("after"))
	if _, err := r.dial(t).Sign(context.Background(), client.ByName("release"), client.Algorithm{}, d[:]); client.Code(err) != proto.Paused {
		t.Fatalf("after the drill: %v, want PAUSED (the file's pause)", err)
	}
}

// A Pause is acknowledged only once every signature it let through has
// left the agent, also when its replies wait behind a client that does not
// read. Two ways that failed: the fence ended when a reply was queued, so
// signatures queued behind another reply's blocked write did not hold the
// ack; and the ack gave up waiting after request_timeout + 1 s, while a
// blocked write may wait write_timeout. A client reading only after the ack
// then received signatures of the paused slot written after it.
func TestPauseAckComesAfterQueuedRepliesLeave(t *testing.T) {
	for _, tc := range []struct {
		name          string
		verifiesFirst int // requests whose replies fill the client's socket before the Signs
		request       time.Duration
		write         time.Duration
	}{
		{"signatures queued behind another reply", 2000, 5 * time.Second, 2 * time.Second},
		{"a write slower than the request timeout", 0, time.Second, 4 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.DefaultKey = ""
			cfg.Limits.RequestTimeout = tc.request
			cfg.Limits.WriteTimeout = tc.write
			cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
			cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
			os.WriteFile(cfg.Policy, []byte(releasePolicy("default", "")), 0o600)
			r := startAgent(t, cfg)
			admin := r.serveAdmin(t, cfg.AdminSocket)

			rc := r.raw(t)
			rc.nc.SetDeadline(time.Now().Add(30 * time.Second))
			rc.hello()
			d := sha256.Sum256([]byte("pipelined"))
			codec := proto.NewCodec()
			var frames []byte
			id := uint64(2)
			for ; id < uint64(2+tc.verifiesFirst); id++ {
				frames, _ = codec.AppendRequestFrame(frames, &proto.Request{ID: id, Op: proto.OpVerify, Key: "release", Digest: d[:], Sig: []byte{1}})
			}
			for end := id + 2000; id < end; id++ {
				frames, _ = codec.AppendRequestFrame(frames, &proto.Request{ID: id, Op: proto.OpSign, Key: "release", Digest: d[:]})
			}
			go rc.nc.Write(frames)  // blocks once the agent stops reading; fails when it drops the connection
			time.Sleep(time.Second) // the agent's replies fill the client's socket

			pauseWritesNothingAfterItsAck(t, admin, "payments/release", rc.nc, rc.br)
		})
	}
}

// pauseWritesNothingAfterItsAck pauses slot while nc's client has not read
// its replies, then reads them all: every byte must have been in the
// client's socket (or br) when the pause was acknowledged.
func pauseWritesNothingAfterItsAck(t *testing.T, admin *client.Client, slot string, nc net.Conn, br *bufio.Reader) {
	t.Helper()
	if _, err := admin.Pause(context.Background(), slot); err != nil {
		t.Fatal(err)
	}
	delivered := br.Buffered() + unreadBytes(t, nc)
	var read int
	buf := make([]byte, 64<<10)
	for {
		n, err := br.Read(buf)
		read += n
		if err != nil {
			break
		}
	}
	if read != delivered {
		t.Fatalf("%d reply bytes were in the client's socket at the pause's ack, %d came in all: the rest were written after it", delivered, read)
	}
}

// unreadBytes is how many bytes wait in nc's receive queue.
func unreadBytes(t *testing.T, nc net.Conn) int {
	t.Helper()
	raw, err := nc.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var errno syscall.Errno
	raw.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCINQ, uintptr(unsafe.Pointer(&n)))
	})
	if errno != 0 {
		t.Fatal(errno)
	}
	return n
}

// The policy's order holds for a hash the agent does not know: a paused
// slot answers PAUSED and a caller outside the slot's clients
// PERMISSION_DENIED, before the algorithm is looked at. The agent used to
// answer UNSUPPORTED_ALGORITHM first.
func TestPolicyOrderHoldsForAnUnknownHash(t *testing.T) {
	for _, tc := range []struct {
		policy string
		want   proto.Code
	}{
		{"paused: true", proto.Paused},
		{fmt.Sprintf(`clients: ["uid:%d"]`, os.Getuid()+1), proto.PermissionDenied},
		{"", proto.UnsupportedAlgorithm},
	} {
		t.Run(tc.want.String(), func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.DefaultKey = ""
			cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
			pol := releasePolicy("default", tc.policy)
			// The tenant's second uid, for a clients list the caller is not in.
			pol = strings.Replace(pol, fmt.Sprintf("identities: {unix_uids: [%d]}", os.Getuid()), fmt.Sprintf("identities: {unix_uids: [%d, %d]}", os.Getuid(), os.Getuid()+1), 1)
			os.WriteFile(cfg.Policy, []byte(pol), 0o600)
			r := startAgent(t, cfg)
			rc := r.raw(t)
			rc.hello()
			rc.send(&proto.Request{ID: 2, Op: proto.OpSign, Key: "release", Hash: 99, Digest: make([]byte, 32)})
			resp, err := rc.recv()
			if err != nil || resp.Code != tc.want {
				t.Fatalf("Sign with hash 99: %v %+v, want %v", err, resp, tc.want)
			}
		})
	}
}

// A pause or a resume is stored in the same commit as its audit record.
// They were two commits: a resume stored, then its record refused (here
// the journal's tail log failing, as an agent killed between the two
// would leave it), answered OK and the slot signed on, while the journal's
// last word on the slot was its pause; killed the other way round, an
// agent restarted paused with no record of the pause.
func TestPauseAndResumeAreStoredWithTheirRecords(t *testing.T) {
	cfg := pauseConfig(t)
	if err := os.WriteFile(cfg.Policy, []byte(pausePolicy(true)), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sign := releaseSigner("pause and record")
	tailFaults := faultsWhere(func(op errorfs.Op) bool {
		return op.Kind.ReadOrWrite() == errorfs.OpIsWrite && filepath.Base(op.Path) == "journal.tail"
	})
	for _, op := range []string{"pause", "resume"} {
		t.Run(op, func(t *testing.T) {
			var opErr, signErr error
			agentLifetime(t, cfg, func(c, admin *client.Client) {
				if op == "resume" {
					if _, err := admin.Pause(ctx, "payments/release"); err != nil {
						t.Fatal(err)
					}
				} else if _, err := admin.Resume(ctx, "payments/release"); err != nil {
					t.Fatal(err)
				}
				tailFaults.On()
				if op == "pause" {
					_, opErr = admin.Pause(ctx, "payments/release")
				} else {
					_, opErr = admin.Resume(ctx, "payments/release")
				}
				tailFaults.Off()
				deadline := time.Now().Add(10 * time.Second)
				for signErr = sign(c); client.Code(signErr) == proto.JournalUnavailable && time.Now().Before(deadline); signErr = sign(c) {
					time.Sleep(20 * time.Millisecond)
				}
			}, agent.WithJournalFS(errorfs.Wrap(vfs.Default, tailFaults)))
			if signErr != nil && client.Code(signErr) != proto.Paused {
				t.Fatalf("after the %s: %v", op, signErr)
			}
			signs := signErr == nil

			j, err := journal.Open(journal.Options{Dir: filepath.Join(cfg.DataDir, "journal")})
			if err != nil {
				t.Fatal(err)
			}
			defer j.Close()
			last := ""
			j.Scan(ctx, journal.Filter{}, func(r *journal.Record) error {
				if (r.Op == "pause" || r.Op == "resume") && r.Slot == "payments/release" && r.CodeName == proto.OK.String() {
					last = r.Op
				}
				return nil
			})
			_, err = j.Get("pause/payments/release")
			stored := err == nil
			t.Logf("%s answered %v; the slot signs: %v; pause stored: %v; last record: %s", op, opErr, signs, stored, last)
			if signs == stored {
				t.Errorf("the slot signs: %v, and a pause is stored: %v", signs, stored)
			}
			if want := map[bool]string{true: "resume", false: "pause"}[signs]; last != want {
				t.Errorf("the slot signs: %v, but the journal's last pause or resume of it is %q", signs, last)
			}
			if opErr == nil && signs != (op == "resume") {
				t.Errorf("%s answered OK, and the slot signs: %v", op, signs)
			}
		})
	}
}
