package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
	config := filepath.Join(dir, "sigil.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf(`
data_dir: %s
default_key: ed
providers:
  - id: soft
    type: software
    keys: [{name: ed, type: ed25519}]
`, filepath.Join(dir, "state"))), 0o600)
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
