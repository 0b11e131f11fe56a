package agent_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"go.uber.org/zap/zapcore"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// Every signature a client receives has its audit record, refusals are
// recorded too, the chain verifies, and no record holds the digest.
func TestEverySignatureIsJournaled(t *testing.T) {
	cfg := softwareConfig(t)
	a, c := serveForShutdown(t, cfg, nil)
	signed := map[[32]byte]bool{}
	for i := 0; i < 50; i++ {
		d := sha256.Sum256([]byte{byte(i)})
		if _, err := c.Sign(context.Background(), client.ByName("default"), client.Algorithm{}, d[:]); err != nil {
			t.Fatal(err)
		}
		signed[journal.HashDigest(d[:])] = true
	}
	// An unknown key's name is the client's: the record keeps a bounded
	// prefix of it, not up to a frame's worth of whatever was sent.
	c.Sign(context.Background(), client.ByName(strings.Repeat("nope", 2000)), client.Algorithm{}, make([]byte, 32))
	c.Sign(context.Background(), client.ByName("default"), client.Algorithm{}, make([]byte, 31))
	c.Close()
	j := journalOfStopped(t, a, cfg)
	rep, err := j.Verify(context.Background())
	if err != nil || !rep.OK() {
		t.Fatalf("chain: %v %+v", err, rep.Break)
	}
	codes := map[string]int{}
	err = j.Scan(context.Background(), journal.Filter{}, func(r *journal.Record) error {
		codes[r.CodeName]++
		if len(r.Slot) > 64+len("…") {
			t.Errorf("record %d: a %d-byte slot name", r.Seq, len(r.Slot))
		}
		if r.CodeName == "OK" {
			if !signed[r.DigestHash] {
				t.Errorf("record %d: a signature nobody asked for", r.Seq)
			}
			delete(signed, r.DigestHash)
			if r.KID == "" || r.Slot != "default" || r.Peer == "" {
				t.Errorf("record %d incomplete: %+v", r.Seq, r)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(signed) != 0 {
		t.Fatalf("%d released signatures have no audit record", len(signed))
	}
	if codes["NOT_FOUND"] != 1 || codes["BAD_REQUEST"] != 1 {
		t.Fatalf("refusals not journaled: %v", codes)
	}
}

// Fail closed: while the journal cannot write, no signature is released
// (JOURNAL_UNAVAILABLE); when the fault clears, signing resumes.
func TestJournalFaultWithholdsSignatures(t *testing.T) {
	toggle := writeFaults()
	cfg := softwareConfig(t)
	r := startAgent(t, cfg, agent.WithJournalFS(errorfs.Wrap(vfs.Default, toggle)))
	c := r.dial(t)
	d := sha256.Sum256([]byte("x"))
	if _, err := c.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, d[:]); err != nil {
		t.Fatal(err)
	}
	readyz := func() (int, string) {
		rec := httptest.NewRecorder()
		r.agent.AdminHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := readyz(); code != http.StatusOK {
		t.Fatalf("/readyz before the fault: %d %s", code, body)
	}
	toggle.On()
	for i := 0; i < 3; i++ {
		sig, err := c.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, d[:])
		if client.Code(err) != proto.JournalUnavailable || sig.Sig != nil {
			t.Fatalf("with the disk failing: %v, signature %x", err, sig.Sig)
		}
	}
	// An orchestrator stops routing signers here: the agent is not ready.
	if code, body := readyz(); code != http.StatusServiceUnavailable || !strings.Contains(body, "audit journal") {
		t.Fatalf("/readyz with the journal failing: %d %q", code, body)
	}
	toggle.Off()
	// Ready again without any signature arriving to drive the recovery.
	readyBy := time.Now().Add(10 * time.Second)
	for {
		code, _ := readyz()
		if code == http.StatusOK {
			break
		}
		if time.Now().After(readyBy) {
			t.Fatalf("/readyz did not recover after the fault cleared: %d", code)
		}
		time.Sleep(50 * time.Millisecond)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, d[:])
		if err == nil {
			break
		}
		if client.Code(err) != proto.JournalUnavailable || time.Now().After(deadline) {
			t.Fatalf("signing did not resume after the fault cleared: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// `sigil audit verify` against a running agent: the admin operation
// recomputes the chain while the agent serves; the client socket refuses it.
func TestAuditVerifyLive(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		d := sha256.Sum256([]byte("live verify"))
		for i := 0; i < 5; i++ {
			if _, err := c.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, d[:]); err != nil {
				t.Fatal(err)
			}
		}
		ok, summary, err := admin.AuditVerify(context.Background())
		if err != nil || !ok || !strings.Contains(summary, "5 records") {
			t.Fatalf("AuditVerify = %v %q %v, want an intact chain of 5 records", ok, summary, err)
		}
		if _, _, err := c.AuditVerify(context.Background()); client.Code(err) != proto.PermissionDenied {
			t.Fatalf("AuditVerify on the client socket: %v, want PERMISSION_DENIED", err)
		}
	})
}

// appendOldRecords writes n signing records of tenant "old", two minutes
// old, to the journal in dir while no agent has it open.
func appendOldRecords(t *testing.T, dir string, n int) {
	t.Helper()
	j, err := journal.Open(journal.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		r := journal.Record{Time: time.Now().Add(-2 * time.Minute), Op: "sign", Tenant: "old", CodeName: "OK"}
		if err := j.Append(context.Background(), &r); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}

// Retention: the agent prunes on start and then on its schedule; `sigil
// audit prune` does it on demand over the admin socket. The chain verifies
// after each, and the client socket cannot prune.
func TestJournalRetention(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Journal.Retention = time.Minute
	// Ten records from before the retention, written while the agent was
	// stopped.
	appendOldRecords(t, filepath.Join(cfg.DataDir, "journal"), 10)
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		verify := func() string {
			t.Helper()
			ok, summary, err := admin.AuditVerify(context.Background())
			if err != nil || !ok {
				t.Fatalf("AuditVerify = %v %q %v", ok, summary, err)
			}
			return summary
		}
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(verify(), "1 records, seq 11..11 (seq 1..10 pruned)") {
			if time.Now().After(deadline) {
				t.Fatalf("retention did not prune on start: %s", verify())
			}
			time.Sleep(20 * time.Millisecond)
		}
		d := sha256.Sum256([]byte("after retention"))
		if _, err := c.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, d[:]); err != nil {
			t.Fatal(err)
		}
		if s := verify(); !strings.Contains(s, "2 records, seq 11..12") {
			t.Fatalf("after a signature: %s", s)
		}

		summary, err := admin.AuditPrune(context.Background(), time.Now().Add(time.Second))
		if err != nil || !strings.Contains(summary, "deleted 2 records (seq 11..12)") {
			t.Fatalf("AuditPrune = %q %v", summary, err)
		}
		if s := verify(); !strings.Contains(s, "1 records, seq 13..13 (seq 1..12 pruned)") {
			t.Fatalf("after audit prune: %s", s)
		}
		recs, err := admin.AuditTail(context.Background(), "", 0, 1)
		if err != nil || len(recs) != 1 || !strings.Contains(string(recs[0]), journal.PruneOp) ||
			!strings.Contains(string(recs[0]), "admin uid:") {
			t.Fatalf("the prune record: %q %v", recs, err)
		}

		if _, err := admin.AuditPrune(context.Background(), time.Time{}); client.Code(err) != proto.BadRequest {
			t.Fatalf("AuditPrune without a time: %v, want BAD_REQUEST", err)
		}
		if _, err := c.AuditPrune(context.Background(), time.Now()); client.Code(err) != proto.PermissionDenied {
			t.Fatalf("AuditPrune on the client socket: %v, want PERMISSION_DENIED", err)
		}
	})
}

// A prune over a broken chain would erase the evidence of the tampering, so
// the admin operation refuses it with INTERNAL, names the break, and
// deletes nothing.
func TestAuditPruneRefusedOverABrokenChain(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	dir := filepath.Join(cfg.DataDir, "journal")
	appendOldRecords(t, dir, 5)
	// Edit record 3 behind the journal's back: its tenant "old" becomes
	// "odd". A stored value holds one record or a run of them, in seq
	// order, so record 3's tenant is the third length-prefixed "old".
	db, err := pebble.Open(dir, &pebble.Options{})
	if err != nil {
		t.Fatal(err)
	}
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte("a/"), UpperBound: []byte("a0")})
	if err != nil {
		t.Fatal(err)
	}
	tenant := []byte("\x00\x03old")
	var key, edited []byte
	for ok, seen := it.First(), 0; ok && key == nil; ok = it.Next() {
		v := it.Value()
		for off := 0; ; {
			i := bytes.Index(v[off:], tenant)
			if i < 0 {
				break
			}
			if seen++; seen == 3 {
				key, edited = bytes.Clone(it.Key()), bytes.Clone(v)
				copy(edited[off+i+2:], "odd")
				break
			}
			off += i + len(tenant)
		}
	}
	if err := it.Close(); err != nil {
		t.Fatal(err)
	}
	if key == nil {
		t.Fatal("no third record with the tenant name")
	}
	if err := db.Set(key, edited, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	agentLifetime(t, cfg, func(c, admin *client.Client) {
		_, err := admin.AuditPrune(context.Background(), time.Now())
		if client.Code(err) != proto.Internal || !strings.Contains(err.Error(), "broken at seq 3") {
			t.Fatalf("AuditPrune over a broken chain: %v, want INTERNAL naming seq 3", err)
		}
		ok, summary, err := admin.AuditVerify(context.Background())
		if err != nil || ok || !strings.Contains(summary, "seq 3") {
			t.Fatalf("AuditVerify after the refused prune = %v %q %v, want the break at seq 3 still there", ok, summary, err)
		}
		recs, err := admin.AuditTail(context.Background(), "", 0, 10)
		if err != nil || len(recs) != 5 {
			t.Fatalf("records after the refused prune: %d, %v; want all 5", len(recs), err)
		}
	})
}

// With the journal off there is nothing to prune: JOURNAL_UNAVAILABLE.
func TestAuditPruneWithoutJournal(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Journal.Mode = "off"
	agentLifetime(t, cfg, func(_, admin *client.Client) {
		if _, err := admin.AuditPrune(context.Background(), time.Now()); client.Code(err) != proto.JournalUnavailable {
			t.Fatalf("AuditPrune with the journal off: %v, want JOURNAL_UNAVAILABLE", err)
		}
	})
}

// stubbornProvider signs after delay whatever ctx says, as a PKCS#11 C_Sign
// in progress does.
type stubbornProvider struct {
	providers.Provider
	delay time.Duration
}

func (s *stubbornProvider) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	time.Sleep(s.delay)
	return s.Provider.Sign(ctx, key, alg, digest)
}

// A signature that comes back from a provider after the request's deadline
// is withheld as DEADLINE_EXCEEDED, not JOURNAL_UNAVAILABLE (the journal is
// fine), and the refusal is journaled: the policy allowed it and the token
// signed, so the decision is in the audit trail.
func TestLateSignatureIsWithheldAndJournaled(t *testing.T) {
	cfg := softwareConfig(t)
	soft, err := software.Open(software.Config{ID: "late", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "late", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Limits.RequestTimeout = 100 * time.Millisecond
	r := startAgent(t, cfg, agent.WithProviders(&stubbornProvider{Provider: soft, delay: 300 * time.Millisecond}))
	rc := r.raw(t)
	rc.hello()
	d := sha256.Sum256([]byte("late"))
	rc.send(&proto.Request{ID: 2, Op: proto.OpSign, Key: "late", Digest: d[:]})
	resp, err := rc.recv()
	if err != nil {
		t.Fatal(err)
	}
	if resp.Code != proto.DeadlineExceeded || len(resp.Sig) != 0 {
		t.Fatalf("late signature: code %s, %d signature bytes; want DEADLINE_EXCEEDED and none", resp.Code, len(resp.Sig))
	}
	j := journalOfStopped(t, r.agent, cfg)
	var found []string
	err = j.Scan(context.Background(), journal.Filter{}, func(r *journal.Record) error {
		if r.DigestHash == journal.HashDigest(d[:]) {
			found = append(found, r.CodeName)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0] != "DEADLINE_EXCEEDED" {
		t.Fatalf("records of the late request: %v, want one DEADLINE_EXCEEDED", found)
	}
}

// leakyProvider fails every Sign with an error whose text names the
// agent's own things, as cloud SDK errors do (a key ARN, and in it the
// account).
type leakyProvider struct{ providers.Provider }

const leakyDetail = "awskms sign arn:aws:kms:eu-west-1:123456789012:key/1234abcd: throttled"

func (leakyProvider) Sign(context.Context, string, providers.Algorithm, []byte) ([]byte, error) {
	return nil, fmt.Errorf("%s: %w", leakyDetail, providers.ErrUnavailable)
}

// A provider's error reaches the client as its code and a fixed text; its
// own text, which may name key ARNs, accounts or vaults, goes to the log.
func TestProviderErrorTextStaysInTheLog(t *testing.T) {
	cfg := softwareConfig(t)
	soft, err := software.Open(software.Config{ID: "leaky", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "leaky", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	r, logs := startAgentObserved(t, cfg, agent.WithProviders(leakyProvider{soft}))
	c := r.dial(t)
	d := sha256.Sum256([]byte("x"))
	_, err = c.Sign(context.Background(), client.ByName("leaky"), client.Algorithm{}, d[:])
	if client.Code(err) != proto.Unavailable {
		t.Fatalf("sign: %v, want UNAVAILABLE", err)
	}
	if strings.Contains(err.Error(), "123456789012") || strings.Contains(err.Error(), "arn:") {
		t.Fatalf("the client was told the provider's text: %v", err)
	}
	found := false
	for _, e := range logs.All() {
		for _, f := range e.Context {
			if f.Type == zapcore.ErrorType && strings.Contains(fmt.Sprint(f.Interface), leakyDetail) {
				found = true
			}
		}
	}
	if !found {
		t.Fatal("the provider's error is not in the log")
	}
}

// A signature's record committed by the signer's own goroutine (nobody else
// was committing) cannot be interrupted; when it lands after the request's
// deadline, the signature is withheld as when a queued commit outlives it:
// JOURNAL_UNAVAILABLE, nothing released, the OK record standing.
func TestRecordPastTheDeadlineWithholdsTheSignature(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.RequestTimeout = 200 * time.Millisecond
	slow := slowWrites(700 * time.Millisecond)
	r := startAgent(t, cfg, agent.WithJournalFS(errorfs.Wrap(vfs.Default, slow)))
	rc := r.raw(t)
	rc.hello()
	warm := sha256.Sum256([]byte("warm"))
	rc.send(&proto.Request{ID: 2, Op: proto.OpSign, Digest: warm[:]})
	if resp, err := rc.recv(); err != nil || resp.Code != proto.OK {
		t.Fatalf("warm-up: %v %+v", err, resp)
	}
	time.Sleep(150 * time.Millisecond) // past the checkpoint interval: the next commit waits for the disk
	slow.On()
	d := sha256.Sum256([]byte("slow journal"))
	rc.send(&proto.Request{ID: 3, Op: proto.OpSign, Digest: d[:], TimeoutMillis: 100})
	resp, err := rc.recv()
	slow.Off()
	if err != nil {
		t.Fatal(err)
	}
	if resp.Code != proto.JournalUnavailable || len(resp.Sig) != 0 {
		t.Fatalf("a record committed past the deadline: %s with %d signature bytes, want JOURNAL_UNAVAILABLE and none", resp.Code, len(resp.Sig))
	}
}

// lowSpaceFS reports a settable amount of free space on the journal's
// filesystem.
type lowSpaceFS struct {
	vfs.FS
	avail atomic.Uint64
}

func (fs *lowSpaceFS) GetDiskUsage(string) (vfs.DiskUsage, error) {
	a := fs.avail.Load()
	return vfs.DiskUsage{AvailBytes: a, TotalBytes: 100 << 30, UsedBytes: 100<<30 - a}, nil
}

// A prune is how a full journal gets its space back (docs/audit.md,
// "Retention"), and an agent with a policy stores the day's quota counts
// with it. Those counts used to be stored by a commit of their own first,
// which a full journal refused like any other write: the prune was refused
// with it, on exactly the journal that needed it.
func TestAuditPruneOnAFullJournalWithAPolicy(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	if err := os.WriteFile(cfg.Policy, []byte(releasePolicy("default", "daily_quota: 100")), 0o600); err != nil {
		t.Fatal(err)
	}
	fs := &lowSpaceFS{FS: vfs.Default}
	fs.avail.Store(10 << 30)
	r := startAgent(t, cfg, agent.WithJournalFS(fs))
	admin := r.serveAdmin(t, cfg.AdminSocket)
	c := r.dial(t)
	for i := 0; i < 5; i++ {
		d := sha256.Sum256([]byte{byte(i)})
		if _, err := c.Sign(context.Background(), client.ByName("payments/release"), client.Algorithm{}, d[:]); err != nil {
			t.Fatal(err)
		}
	}
	defer fs.avail.Store(10 << 30) // the agent's shutdown stores the counts again
	fs.avail.Store(32 << 20)       // under the 64 MiB reserve, over the prune's 16 MiB floor
	d := sha256.Sum256([]byte("full"))
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := c.Sign(context.Background(), client.ByName("payments/release"), client.Algorithm{}, d[:])
		if client.Code(err) == proto.JournalUnavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Sign on a full journal: %v, want JOURNAL_UNAVAILABLE", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	summary, err := admin.AuditPrune(context.Background(), time.Now().Add(time.Second))
	if err != nil || !strings.Contains(summary, "deleted ") {
		t.Fatalf("AuditPrune on a full journal = %q, %v", summary, err)
	}
	fs.avail.Store(10 << 30)
	if ok, s, err := admin.AuditVerify(context.Background()); err != nil || !ok {
		t.Fatalf("AuditVerify after the prune = %v %q %v", ok, s, err)
	}
}

// A client that hangs up with signatures in flight gets none of them, and
// each signature the provider made has its record all the same. The first
// reply's failed write cancels the connection, and a signature whose
// record was about to be appended then was neither released nor journaled.
// The agent's signed hook holds two Signs in that window: the test hangs
// up, lets one go (its reply's write fails and ends the connection), and
// the other appends its record only once the connection has ended.
func TestPeerGoneMidRequestLeavesEverySignatureJournaled(t *testing.T) {
	cfg := softwareConfig(t)
	soft, err := software.Open(software.Config{ID: "hsm", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "hsm", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	prov := &countingSigner{Provider: soft}
	var entered atomic.Int32
	inWindow := make(chan struct{}, 2)
	hungUp := make(chan struct{})
	hook := func(request context.Context) {
		first := entered.Add(1) == 1
		inWindow <- struct{}{}
		<-hungUp
		if !first {
			return // its reply's write fails: the agent sees the hang-up
		}
		select {
		case <-request.Done():
		case <-time.After(5 * time.Second):
			t.Errorf("the connection did not end after the client hung up")
		}
	}
	r := startAgent(t, cfg, agent.WithProviders(prov), agent.WithSignedHook(hook))
	rc := r.raw(t)
	rc.hello()
	sent := map[[32]byte]bool{}
	for i := range 2 {
		d := sha256.Sum256([]byte{byte(i)})
		sent[journal.HashDigest(d[:])] = true
		rc.send(&proto.Request{ID: uint64(2 + i), Op: proto.OpSign, Key: "hsm", Digest: d[:]})
	}
	for range 2 {
		select {
		case <-inWindow:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of 2 Signs reached the window between signature and record", entered.Load())
		}
	}
	rc.nc.Close()
	close(hungUp)
	j := journalOfStopped(t, r.agent, cfg)
	codes := map[string]int{}
	recorded := 0
	err = j.Scan(context.Background(), journal.Filter{}, func(r *journal.Record) error {
		if sent[r.DigestHash] {
			recorded++
			codes[r.CodeName]++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if made := int(prov.signed.Load()); made != 2 || recorded != made {
		t.Fatalf("%d signatures made, %d records (%v), want 2 and 2", made, recorded, codes)
	}
}

// countingSigner counts the signatures its provider made; the agent takes
// it for a remote provider, so its signatures run on workers, side by side.
type countingSigner struct {
	providers.Provider
	signed atomic.Int64
}

func (c *countingSigner) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	sig, err := c.Provider.Sign(ctx, key, alg, digest)
	if err == nil {
		c.signed.Add(1)
	}
	return sig, err
}

func (c *countingSigner) Remote() bool { return true }

// edgeProvider fails every Sign at a point swept across the last few
// microseconds before the request's deadline: the refusal reaches its
// audit record at the deadline's edge.
type edgeProvider struct {
	providers.Provider
	n atomic.Int64
}

func (e *edgeProvider) Sign(ctx context.Context, _ string, _ providers.Algorithm, _ []byte) ([]byte, error) {
	deadline, _ := ctx.Deadline()
	// 0 to 40 µs before the deadline, in steps of 100 ns.
	at := deadline.Add(-time.Duration(e.n.Add(1)%400) * 100 * time.Nanosecond)
	for time.Now().Before(at) {
	}
	return nil, fmt.Errorf("edge: %w", providers.ErrUnavailable)
}

// Every refusal the client gets has its record, however near the request's
// deadline it was decided: a refusal's record is written on the journal's
// own bound, not the request's.
func TestRefusalAtTheDeadlineIsJournaled(t *testing.T) {
	cfg := softwareConfig(t)
	soft, err := software.Open(software.Config{ID: "edge", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "edge", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Limits.RequestTimeout = 2 * time.Millisecond
	r := startAgent(t, cfg, agent.WithProviders(&edgeProvider{Provider: soft}))
	rc := r.raw(t)
	rc.hello()
	const n = 800
	refused := map[[32]byte]bool{}
	for i := range n {
		d := sha256.Sum256([]byte(fmt.Sprint("edge ", i)))
		rc.send(&proto.Request{ID: uint64(2 + i), Op: proto.OpSign, Key: "edge", Digest: d[:]})
		resp, err := rc.recv()
		if err != nil {
			t.Fatal(err)
		}
		if resp.Code == proto.OK || len(resp.Sig) != 0 {
			t.Fatalf("request %d: %s with %d signature bytes, want a refusal", i, resp.Code, len(resp.Sig))
		}
		refused[journal.HashDigest(d[:])] = true
	}
	j := journalOfStopped(t, r.agent, cfg)
	codes := map[string]int{}
	recorded := 0
	err = j.Scan(context.Background(), journal.Filter{}, func(r *journal.Record) error {
		if refused[r.DigestHash] {
			recorded++
			codes[r.CodeName]++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if recorded != len(refused) {
		t.Fatalf("%d refusals, %d records (%v)", len(refused), recorded, codes)
	}
}
