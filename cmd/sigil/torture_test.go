package main

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// The agent is SIGKILLed again and again at a random moment while 8
// clients sign and an operator rotates, rolls back, drills, pauses and
// resumes, reloads (SIGHUP) or prunes, and killed again while starting,
// then restarted on the same data directory.
// After every kill: the chain verifies, every signature a client received
// verifies with Go crypto and has exactly one OK record with its kid, and
// the active version the restarted agent signs with is the one the
// journal's records made active, and the stored pause agrees with the
// slot's last pause or resume record. On software keys and on a SoftHSM2
// token (where a rotation's key is made in the token). SIGIL_KILL_ROUNDS
// runs more rounds, SIGIL_KILL_SEED repeats a run.
func TestKillLoopKeepsJournalAndRotationConsistent(t *testing.T) {
	for _, tc := range []struct {
		name     string
		provider func(t *testing.T) string // the providers: YAML, with key release-v1
	}{
		{"software", func(*testing.T) string {
			return "  - id: soft\n    type: software\n    keys: [{name: release-v1, type: ed25519}]\n"
		}},
		{"softhsm", func(t *testing.T) string {
			if os.Getenv("SIGIL_KILL_ROUNDS") == "" {
				// SoftHSM2's file store is not itself safe against a kill:
				// once in 50 rounds its token was gone at the restart
				// (CKR_TOKEN_NOT_PRESENT), which the agent refuses to start on:
				// a kill inside C_Login leaves token.object empty
				// (docs/pkcs11.md, "SoftHSM2's file store and a killed agent").
				t.Skip("by hand only: SIGIL_KILL_ROUNDS=N")
			}
			tok := softhsmtest.New(t, "kill")
			key := tok.GenerateKey(t, providers.KeyEd25519, "release-v1", []byte{1})
			return fmt.Sprintf("  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: %s\n    pin_file: %s\n    keys: [{name: release-v1, uri: %q}]\n",
				tok.Module, tok.Label, tok.PINFile(t), key.URI)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { killLoop(t, tc.provider(t)) })
	}
}

func killLoop(t *testing.T, providersYAML string) {
	rounds := 4
	if s := os.Getenv("SIGIL_KILL_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatal(err)
		}
		rounds = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SIGIL_KILL_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))

	bin := buildSigil(t)
	r := newRotationSetup(t, "ed25519", 100)
	config, err := os.ReadFile(r.config)
	if err != nil {
		t.Fatal(err)
	}
	head, _, _ := strings.Cut(string(config), "providers:\n")
	if err := os.WriteFile(r.config, []byte(head+"providers:\n"+providersYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	journalDir := filepath.Join(r.state, "journal")
	actions := []string{"none", "rotate", "rotate", "rollback", "drill", "sighup", "prune", "pause"}

	var active string // the kid the journal's records made active
	// Every kid a record named, kept across rounds: a prune deletes
	// records, not what they said.
	named := map[string]bool{}
	for round := range rounds {
		agent := startAgentProcess(t, bin, r.config, r.socket)
		agent.waitReady(t)
		admin := dialAdmin(t, r.admin)
		// A drill killed before its resume leaves the slot paused (by
		// design, docs/rotation.md); the next round needs it signing.
		admin.Resume(context.Background(), "payments/release")
		roundStart := time.Now()

		received := map[[32]byte]receivedSig{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := client.Dial(context.Background(), r.socket)
				if err != nil {
					return
				}
				defer c.Close()
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					msg := fmt.Appendf(nil, "round %d client %d sign %d", round, g, i)
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					sig, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, msg)
					cancel()
					if err != nil {
						if code := client.Code(err); code == proto.Paused || code == proto.Unavailable || code == proto.KeyRetired {
							continue
						}
						return // the agent is gone
					}
					mu.Lock()
					received[journal.HashDigest(msg)] = receivedSig{msg, sig}
					mu.Unlock()
				}
			}()
		}

		action := actions[rng.IntN(len(actions))]
		// Half the kills land within a few ms of the action, inside it.
		delay := time.Duration(rng.IntN(600)) * time.Millisecond
		if rng.IntN(2) == 0 {
			delay = time.Duration(rng.IntN(20000)) * time.Microsecond
		}
		time.Sleep(time.Duration(rng.IntN(200)) * time.Millisecond)
		result := make(chan string, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var out string
			var err error
			switch action {
			case "rotate":
				out, err = admin.RotateSlot(ctx, "payments/release")
			case "rollback":
				out, err = admin.Rollback(ctx, "payments/release")
			case "drill":
				out, err = admin.IncidentDrill(ctx, "payments/release")
			case "sighup":
				err = agent.cmd.Process.Signal(syscall.SIGHUP)
			case "pause":
				for k := 0; err == nil; k++ {
					if k%2 == 0 {
						out, err = admin.Pause(ctx, "payments/release")
					} else {
						out, err = admin.Resume(ctx, "payments/release")
					}
				}
			case "prune":
				// The records of earlier rounds, checked already.
				out, err = admin.AuditPrune(ctx, roundStart)
			}
			if err != nil {
				out = err.Error()
			}
			result <- out
		}()
		time.Sleep(delay)
		agent.cmd.Process.Kill()
		agent.cmd.Wait()
		close(stop)
		wg.Wait()
		admin.Close()
		t.Logf("round %d: %s (%.60q), killed %v later, %d signatures received", round, action, <-result, delay, len(received))

		// Killed again while starting (replaying its tail log, enrolling,
		// opening its keys), before it is ready.
		for range rng.IntN(3) {
			early := startAgentProcess(t, bin, r.config, r.socket)
			time.Sleep(time.Duration(rng.IntN(150)) * time.Millisecond)
			early.cmd.Process.Kill()
			early.cmd.Wait()
		}

		out, stderr, code := runBin(t, bin, "audit", "verify", "--config", r.config)
		if code != 0 || !strings.Contains(out, "audit chain OK") {
			t.Fatalf("round %d (%s): audit verify after the kill: exit %d\n%s%s", round, action, code, out, stderr)
		}
		active = checkJournalAfterKill(t, journalDir, received, active, named)

		agent = startAgentProcess(t, bin, r.config, r.socket)
		agent.waitReady(t)
		c, err := client.Dial(context.Background(), r.socket)
		if err != nil {
			t.Fatal(err)
		}
		key, err := c.PublicKey(context.Background(), client.ByName("release"))
		if err != nil {
			t.Fatalf("round %d (%s): no active version after the restart: %v", round, action, err)
		}
		if key.KID != active {
			t.Fatalf("round %d (%s): the restarted agent's active kid %s, the journal's %s", round, action, key.KID, active)
		}
		if !named[key.KID] {
			t.Fatalf("round %d (%s): the agent signs with kid %s, which no journal record names", round, action, key.KID)
		}
		c.Close()
		agent.cmd.Process.Signal(syscall.SIGTERM)
		agent.cmd.Wait()
	}
}

// dialAdmin dials the admin socket, which the agent may open a moment
// after its signing socket.
func dialAdmin(t *testing.T, socket string) *client.Client {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := client.Dial(context.Background(), socket)
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkJournalAfterKill reads the killed agent's journal and checks the
// received signatures against it. It returns the kid the journal's
// records left active for payments/release (active if none changed it),
// and adds every kid a record names to named.
// receivedSig is a signature a client received, with what it signed.
type receivedSig struct {
	msg []byte
	sig client.Signature
}

func checkJournalAfterKill(t *testing.T, dir string, received map[[32]byte]receivedSig, active string, named map[string]bool) string {
	t.Helper()
	ctx := context.Background()
	j, err := journal.Open(journal.Options{Dir: dir, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	store, err := rotation.OpenStore(ctx, j, rotation.StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sl, ok := store.Get("payments/release")
	if !ok {
		t.Fatal("no rotation state for payments/release")
	}
	stateKIDs := map[string]ed25519.PublicKey{}
	for _, v := range sl.Versions {
		stateKIDs[v.KID] = v.Public.(ed25519.PublicKey)
	}

	signed := map[[32]byte]int{}
	lastPause, lastPauseRec := "", ""
	var prev uint64
	err = j.Scan(ctx, journal.Filter{}, func(rec *journal.Record) error {
		if prev != 0 && rec.Seq != prev+1 {
			t.Errorf("seq %d follows %d", rec.Seq, prev)
		}
		prev = rec.Seq
		if rec.KID != "" {
			named[rec.KID] = true
		}
		// An operator's pause or resume names the slot in full, with no
		// tenant; a drill's and a rotation's name the tenant too.
		if rec.Slot != "payments/release" && (rec.Tenant != "payments" || rec.Slot != "release") {
			return nil
		}
		switch {
		case rec.Op == "sign" && rec.CodeName == "OK":
			signed[rec.DigestHash]++
			if s, ok := received[rec.DigestHash]; ok && s.sig.KID != rec.KID {
				t.Errorf("seq %d: a signature by %s recorded as by %s", rec.Seq, s.sig.KID, rec.KID)
			}
		case rec.CodeName != "OK":
		case rec.Op == "enroll", rec.Op == "rotate", rec.Op == "rollback":
			active = rec.KID
		case rec.Op == "rotate.failed" && strings.Contains(rec.Detail, "reverted"):
			active = rec.KID
		case rec.Op == "pause", rec.Op == "resume":
			lastPause, lastPauseRec = rec.Op, fmt.Sprintf("seq %d %s %q", rec.Seq, rec.Peer, rec.Detail)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for h, s := range received {
		if n := signed[h]; n != 1 {
			t.Errorf("a received signature by %s has %d OK records", s.sig.KID, n)
		}
		pub, ok := stateKIDs[s.sig.KID]
		if !ok {
			t.Errorf("a received signature by %s, a kid the rotation state lacks", s.sig.KID)
			continue
		}
		if !ed25519.Verify(pub, s.msg, s.sig.Sig) {
			t.Errorf("a received signature by %s does not verify", s.sig.KID)
		}
	}
	for h, n := range signed {
		if n > 1 {
			t.Errorf("digest hash %x has %d OK sign records", h[:8], n)
		}
	}
	_, err = j.Get("pause/payments/release")
	if stored := map[bool]string{true: "pause", false: "resume"}[err == nil]; lastPause != "" && lastPause != stored {
		t.Errorf("the slot's stored state is %sd, its last record a %s (%s)", stored, lastPause, lastPauseRec)
	}
	if got := sl.ActiveVersion().KID; got != active {
		t.Errorf("the rotation state's active kid %s, the journal records' %s", got, active)
	}
	return active
}
