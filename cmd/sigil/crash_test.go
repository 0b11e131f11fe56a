package main

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// The agent is SIGKILLed while clients sign concurrently: after a restart
// every signature a client received has its audit record and the chain
// verifies, from the shell and through the package.
func TestKilledAgentLosesNoAuditRecord(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	config := writeEd25519Config(t, dir)
	sockDir, _ := os.MkdirTemp("", "sigil-crash")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "agent.sock")

	agent := startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)

	var mu sync.Mutex
	received := map[[32]byte]bool{}
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			c, err := client.Dial(context.Background(), socket)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			for i := 0; ; i++ {
				msg := []byte(fmt.Sprintf("%d/%d", g, i))
				if _, err := c.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, msg); err != nil {
					return // the agent is gone
				}
				mu.Lock()
				received[journal.HashDigest(msg)] = true
				mu.Unlock()
			}
		}(g)
	}
	time.Sleep(500 * time.Millisecond)
	agent.cmd.Process.Kill()
	agent.cmd.Wait()
	wg.Wait()
	if len(received) < 10 {
		t.Fatalf("only %d signatures before the kill", len(received))
	}

	// Reading the killed agent's journal offline writes nothing to it: the
	// tail log stays for the agent to replay, and no file is added that a
	// root-run CLI would own.
	journalDir := filepath.Join(dir, "state", "journal")
	before := fileHashes(t, journalDir)
	out, stderr, code := runBin(t, bin, "audit", "verify", "--config", config)
	if code != 0 || !strings.Contains(out, "audit chain OK") {
		t.Fatalf("audit verify after the kill: exit %d %s %s", code, out, stderr)
	}
	for _, args := range [][]string{{"tail", "-n", "5"}, {"export", "--format", "jsonl"}} {
		if _, stderr, code := runBin(t, bin, append(append([]string{"audit"}, args...), "--config", config)...); code != 0 {
			t.Fatalf("audit %s after the kill: exit %d %s", args[0], code, stderr)
		}
	}
	if after := fileHashes(t, journalDir); !maps.Equal(before, after) {
		t.Fatalf("reading the journal offline changed it:\nbefore %v\nafter  %v", before, after)
	}
	j, err := journal.Open(journal.Options{Dir: journalDir})
	if err != nil {
		t.Fatal(err)
	}
	j.Scan(context.Background(), journal.Filter{}, func(r *journal.Record) error {
		delete(received, r.DigestHash)
		return nil
	})
	j.Close()
	if len(received) != 0 {
		t.Fatalf("%d signatures a client received have no audit record", len(received))
	}

	// The restarted agent continues the chain.
	agent = startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)
	if _, stderr, code := runBin(t, bin, "--socket", socket, "keys", "sign", "--in", config); code != 0 {
		t.Fatalf("sign after restart: %s", stderr)
	}
	// The running agent's chain, verified over its admin socket while it
	// serves (its directory is locked).
	out, stderr, code = runBin(t, bin, "audit", "verify", "--admin-socket", filepath.Join(sockDir, "admin.sock"))
	if code != 0 || !strings.Contains(out, "audit chain OK (running agent)") {
		t.Fatalf("audit verify of the running agent: %d\n%s%s", code, out, stderr)
	}
	// The running agent's journal, read over its admin socket.
	out, stderr, code = runBin(t, bin, "audit", "tail", "-n", "3", "--admin-socket", filepath.Join(sockDir, "admin.sock"))
	if code != 0 || strings.Count(out, " sign ") < 1 || !strings.Contains(out, "OK") {
		t.Fatalf("audit tail from the running agent: %d\n%s%s", code, out, stderr)
	}
	agent.cmd.Process.Kill()
	agent.cmd.Wait()
	out, stderr, code = runBin(t, bin, "audit", "verify", "--config", config)
	if code != 0 {
		t.Fatalf("audit verify after restart: %s %s", out, stderr)
	}
	out, _, code = runBin(t, bin, "audit", "export", "--config", config, "--format", "jsonl")
	if code != 0 || strings.Count(out, "\n") < 10 {
		t.Fatalf("export: %d lines", strings.Count(out, "\n"))
	}
}

// The agent is SIGKILLed at points spread over a rotation (key generation,
// CSR, cut-over, canary re-signing): each restart comes up with exactly one
// active version that signs, old or new, never neither, and the audit chain
// verifies.
func TestKilledMidRotationRestartsConsistent(t *testing.T) {
	bin := buildSigil(t)
	// RSA-2048 keys and 200 canaries stretch a rotation over a few
	// hundred milliseconds, so the kills land in different steps.
	r := newRotationSetup(t, "rsa-2048", 200)
	config, socket, adminSocket := r.config, r.socket, r.admin

	signsAndVerifies := func() string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := client.Dial(ctx, socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		key, err := c.PublicKey(ctx, client.ByName("release"))
		if err != nil {
			t.Fatalf("no active version after the restart: %v", err)
		}
		msg := []byte("after the kill")
		sig, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, digestSHA256(msg))
		if err != nil {
			t.Fatalf("the active version does not sign after the restart: %v", err)
		}
		if err := verifyRSA(key.Public, digestSHA256(msg), sig.Sig); err != nil {
			t.Fatalf("signature by %s does not verify against its public key: %v", key.KID, err)
		}
		return key.KID
	}

	// One whole rotation first, timed, so the kills below land at fixed
	// fractions of it whatever the machine's speed.
	agent := startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)
	first := signsAndVerifies()
	start := time.Now()
	if out, stderr, code := runBin(t, bin, "rotate", "payments/release", "--admin-socket", adminSocket); code != 0 {
		t.Fatalf("rotate: %d %s %s", code, out, stderr)
	}
	whole := time.Since(start)
	if signsAndVerifies() == first {
		t.Fatal("the uninterrupted rotation did not change the active version")
	}
	agent.cmd.Process.Signal(syscall.SIGTERM)
	agent.cmd.Wait()

	changed := 0
	for i, fraction := range []float64{0.05, 0.25, 0.5, 0.75, 0.95} {
		delay := time.Duration(fraction * float64(whole))
		agent = startAgentProcess(t, bin, config, socket)
		agent.waitReady(t)
		before := signsAndVerifies()
		rotated := make(chan struct{})
		go func() {
			defer close(rotated)
			exec.Command(bin, "rotate", "payments/release", "--admin-socket", adminSocket).Run()
		}()
		time.Sleep(delay)
		agent.cmd.Process.Kill()
		agent.cmd.Wait()
		<-rotated

		out, stderr, code := runBin(t, bin, "audit", "verify", "--config", config)
		if code != 0 || !strings.Contains(out, "audit chain OK") {
			t.Fatalf("kill %d (%v into a rotation): audit verify exit %d\n%s%s", i, delay, code, out, stderr)
		}
		agent = startAgentProcess(t, bin, config, socket)
		agent.waitReady(t)
		after := signsAndVerifies()
		if after != before {
			changed++
		}
		agent.cmd.Process.Signal(syscall.SIGTERM)
		agent.cmd.Wait()
		t.Logf("kill %v (%.0f%% of a %v rotation): active %s before, %s after", delay, 100*fraction, whole, before[:8], after[:8])
	}
	t.Logf("%d of 5 kills came after the cut-over", changed)
}

// fileHashes is every file of dir with a hash of its contents.
func fileHashes(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][32]byte{}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = sha256.Sum256(data)
	}
	return out
}

func digestSHA256(msg []byte) []byte {
	d := sha256.Sum256(msg)
	return d[:]
}

func verifyRSA(pub crypto.PublicKey, digest, sig []byte) error {
	k, ok := pub.(*rsa.PublicKey)
	if !ok {
		return errors.New("not an RSA key")
	}
	return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig)
}

// quotaAgent is an agent process with a policy: tenant payments (this uid,
// also the admin) with slot release (daily_quota quota) and slot other.
type quotaAgent struct {
	bin, config, policy, socket, admin string
	proc                               *agentProcess
}

func newQuotaAgent(t *testing.T, quota int) *quotaAgent {
	t.Helper()
	q := &quotaAgent{bin: buildSigil(t)}
	dir := t.TempDir()
	q.policy = filepath.Join(dir, "policy.yaml")
	q.writePolicy(t, quota, true)
	q.config = writeEd25519Config(t, dir, "policy: "+q.policy+"\n")
	sockDir := shortSocketDir(t)
	q.socket, q.admin = filepath.Join(sockDir, "agent.sock"), filepath.Join(sockDir, "admin.sock")
	return q
}

// writePolicy writes the policy, with the slot release or without it.
func (q *quotaAgent) writePolicy(t *testing.T, quota int, withRelease bool) {
	t.Helper()
	slots := "      - {name: other, key: ed}\n"
	if withRelease {
		slots = fmt.Sprintf("      - {name: release, key: ed, policy: {daily_quota: %d}}\n", quota) + slots
	}
	text := fmt.Sprintf("admins: {unix_uids: [%d]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n%s", os.Getuid(), os.Getuid(), slots)
	if err := os.WriteFile(q.policy, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

func (q *quotaAgent) start(t *testing.T) {
	t.Helper()
	q.proc = startAgentProcess(t, q.bin, q.config, q.socket)
	q.proc.waitReady(t)
}

// kill ends the agent with SIGKILL: nothing is stored on the way out.
func (q *quotaAgent) kill() {
	q.proc.cmd.Process.Kill()
	q.proc.cmd.Wait()
}

// sign signs with release up to n times and returns how many went through.
func (q *quotaAgent) sign(t *testing.T, n int) int {
	t.Helper()
	c, err := client.Dial(context.Background(), q.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range n {
		if _, err := c.Sign(context.Background(), client.ByName("release"), client.Algorithm{}, []byte(fmt.Sprint(i))); err != nil {
			if client.Code(err) != proto.QuotaExceeded {
				t.Fatalf("sign %d: %v", i, err)
			}
			return i
		}
	}
	return n
}

// A daily quota holds across a SIGKILL after what would have lost its
// count before the next stored snapshot:
//   - an audit prune of today's records: the restart rebuilt the count
//     from the records after the last stored counts, which the prune had
//     deleted;
//   - a reload dropping the slot: the restart restored no stored counts
//     when no slot in force had a quota, so the dropped slot's count was
//     gone when a later reload brought it back.
//
// Each time the quota used to be handed out a second time.
func TestDailyQuotaSurvivesAKillAfterPruneOrDrop(t *testing.T) {
	const quota = 30
	for _, tc := range []struct {
		name   string
		before func(t *testing.T, q *quotaAgent)
		killed func(t *testing.T, q *quotaAgent) // while it is down; may be nil
		after  func(t *testing.T, q *quotaAgent) // once restarted
	}{
		{"prune of today's records", func(t *testing.T, q *quotaAgent) {
			cut := time.Now().Truncate(time.Second).Add(time.Second)
			time.Sleep(time.Until(cut) + 20*time.Millisecond)
			if out, stderr, code := runBin(t, q.bin, "audit", "prune", "--before", cut.UTC().Format(time.RFC3339), "--admin-socket", q.admin); code != 0 {
				t.Fatalf("audit prune: %d %s %s", code, out, stderr)
			}
		}, nil, func(*testing.T, *quotaAgent) {}},
		// The offline prune cannot store the counts first (it has no
		// policy engine): it keeps today's records instead.
		{"an offline prune after the kill", func(*testing.T, *quotaAgent) {}, func(t *testing.T, q *quotaAgent) {
			out, stderr, code := runBin(t, q.bin, "audit", "prune", "--before", time.Now().Add(time.Minute).UTC().Format(time.RFC3339), "--config", q.config)
			if code != 0 || !strings.Contains(out, "today's records were kept") {
				t.Fatalf("offline audit prune: %d %s %s", code, out, stderr)
			}
		}, func(*testing.T, *quotaAgent) {}},
		{"the slot dropped by a reload", func(t *testing.T, q *quotaAgent) {
			q.writePolicy(t, quota, false)
			if out, stderr, code := runBin(t, q.bin, "admin", "reload", "--admin-socket", q.admin); code != 0 {
				t.Fatalf("reload: %d %s %s", code, out, stderr)
			}
		}, nil, func(t *testing.T, q *quotaAgent) {
			q.writePolicy(t, quota, true) // back the same day
			if out, stderr, code := runBin(t, q.bin, "admin", "reload", "--admin-socket", q.admin); code != 0 {
				t.Fatalf("reload: %d %s %s", code, out, stderr)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := newQuotaAgent(t, quota)
			q.start(t)
			first := q.sign(t, 20)
			tc.before(t, q)
			q.kill()
			if tc.killed != nil {
				tc.killed(t, q)
			}
			q.start(t)
			defer q.kill()
			tc.after(t, q)
			if second := q.sign(t, quota+1); first+second != quota {
				t.Fatalf("daily_quota %d: %d signatures before the kill and %d after", quota, first, second)
			}
		})
	}
}
