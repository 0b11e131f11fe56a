package main

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
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

	out, stderr, code := runBin(t, bin, "audit", "verify", "--config", config)
	_ = stderr
	if code != 0 || !strings.Contains(out, "audit chain OK") {
		t.Fatalf("audit verify after the kill: exit %d %s %s", code, out, stderr)
	}
	j, err := journal.Open(journal.Options{Dir: filepath.Join(dir, "state", "journal")})
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
