package agent_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// The admin storm: while clients sign on several connections, admins
// rotate, roll back, drill, pause and resume, reload the policy
// (alternating two files, the second of which forbids what the clients
// ask of two slots), reload the config (moving the calendars' dates so
// the scheduler rotates too), schedule one-off rotations, prune, tail and
// verify the journal and export evidence packs, all at once, on the same
// slot and its neighbours. A watchdog dumps every goroutine if nothing
// completes for a while. Afterwards: every signature a client received
// verifies with Go crypto against the key its record names and has
// exactly one OK record, with the policy hash the client was told, of a
// policy that allowed it; no OK record of a slot falls between its pause
// and its resume; the rotation state loads (one active version a slot);
// every rotation and rollback reported done is in the state and the
// journal; the chain verifies; no goroutine or descriptor is left.
// SIGIL_STORM_SECONDS runs it longer (default 3).
func TestAdminStorm(t *testing.T) {
	for _, tc := range []struct {
		name      string
		providers func(t *testing.T) string // keys default (ecdsa-p256), ed, p384
	}{
		{"software", func(*testing.T) string {
			return "  - id: soft\n    type: software\n    keys:\n      - {name: default, type: ecdsa-p256}\n" +
				"      - {name: ed, type: ed25519}\n      - {name: p384, type: ecdsa-p384}\n      - {name: spare, type: ed25519}\n"
		}},
		{"softhsm", func(t *testing.T) string {
			tok := softhsmtest.New(t, "storm")
			keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
			t.Setenv("SIGIL_TEST_PIN", tok.PIN)
			return fmt.Sprintf("  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: %s\n    pin_env: SIGIL_TEST_PIN\n"+
				"    keys: [{name: default, uri: %q}]\n"+
				"  - id: soft\n    type: software\n    keys:\n      - {name: ed, type: ed25519}\n      - {name: p384, type: ecdsa-p384}\n      - {name: spare, type: ed25519}\n",
				tok.Module, tok.Label, keys[providers.KeyECDSAP256].URI)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { adminStorm(t, tc.providers(t)) })
	}
}

// stormPolicy: tenant payments (this uid, also the admin) with slots
// release (ES256 only), build and other. The second file allows release
// only ES384 and pauses build in the file: no ES256 signature of release
// and no signature of build may carry its hash, and drops spare.
func stormPolicy(second bool) string {
	releaseAlgs, buildPaused, spare := "ecdsa-sha256", "false", "      - {name: spare, key: spare}\n"
	if second {
		releaseAlgs, buildPaused, spare = "ecdsa-sha384", "true", ""
	}
	return fmt.Sprintf(`
admins: {unix_uids: [%d]}
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: default, policy: {algorithms: [%s]}}
      - {name: build, key: ed, policy: {paused: %s}}
      - {name: other, key: p384}
%s`, os.Getuid(), os.Getuid(), releaseAlgs, buildPaused, spare)
}

// stormSlots are the slots signed and operated on; "payments/" + name.
var stormSlots = []string{"release", "build", "other", "spare"}

// writeAtomic replaces path's content in one rename, as a fleet's
// configuration system does: a reload never reads half a file.
func writeAtomic(t *testing.T, path, content string) {
	tmp := path + ".tmp" + strconv.Itoa(rand.IntN(1<<30))
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Error(err)
		return
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Error(err)
	}
}

// stormSig is a signature a client received.
type stormSig struct {
	slot   string
	digest []byte // what was sent: a digest, or the message for Ed25519
	sig    client.Signature
}

// stormOutcome is an admin operation's reported success.
type stormOutcome struct {
	op, slot, kid string
}

func stormDuration(t *testing.T) time.Duration {
	if s := os.Getenv("SIGIL_STORM_SECONDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatal(err)
		}
		return time.Duration(n) * time.Second
	}
	return 3 * time.Second
}

func countFDs() int {
	ents, _ := os.ReadDir("/proc/self/fd")
	return len(ents)
}

func adminStorm(t *testing.T, providersYAML string) {
	dir := t.TempDir()
	socket := shortSocketPath(t)
	adminSocket := filepath.Join(filepath.Dir(socket), "admin.sock")
	policyPath := filepath.Join(dir, "policy.yaml")
	configPath := filepath.Join(dir, "sigil.yaml")
	dataDir := filepath.Join(dir, "state")
	writeAtomic(t, policyPath, stormPolicy(false))
	writeConfig := func(calendars string) {
		writeAtomic(t, configPath, fmt.Sprintf("socket: %s\ndata_dir: %s\nadmin_socket: %s\npolicy: %s\n"+
			"limits: {request_timeout: 10s}\nrotation:\n  canaries: 2\n%sproviders:\n%s",
			socket, dataDir, adminSocket, policyPath, calendars, providersYAML))
	}
	writeConfig("")
	hashOf := func(second bool) [32]byte {
		p := filepath.Join(dir, fmt.Sprintf("hash-%v.yaml", second))
		os.WriteFile(p, []byte(stormPolicy(second)), 0o600)
		set, err := policy.Load(p)
		if err != nil {
			t.Fatal(err)
		}
		h, _ := set.TenantHash("payments")
		return h
	}
	hashA, hashB := hashOf(false), hashOf(true)

	goroutines0, fds0 := runtime.NumGoroutine(), countFDs()
	cfg, err := agent.LoadConfig(configPath)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	a, err := agent.New(ctx, cfg, zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)))
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
	served := make(chan error, 2)
	go func() { served <- a.Serve(ln) }()
	go func() { served <- a.ServeAdmin(aln) }()
	stormStart := time.Now()

	// The watchdog: a stall (a deadlock) dumps every goroutine and ends the
	// test binary, which a hung test would otherwise do only at -timeout.
	var progress atomic.Int64
	watchdogDone := make(chan struct{})
	go func() {
		last, since := progress.Load(), time.Now()
		for {
			select {
			case <-watchdogDone:
				return
			case <-time.After(500 * time.Millisecond):
			}
			if n := progress.Load(); n != last {
				last, since = n, time.Now()
				continue
			}
			if time.Since(since) > 45*time.Second {
				buf := make([]byte, 8<<20)
				buf = buf[:runtime.Stack(buf, true)]
				fmt.Fprintf(os.Stderr, "admin storm: no operation completed for %v; goroutines:\n%s\n", time.Since(since), buf)
				panic("admin storm stalled: a deadlock?")
			}
		}
	}()
	defer close(watchdogDone)

	var (
		mu        sync.Mutex
		received  = map[[32]byte]stormSig{}
		outcomes  []stormOutcome
		opErrs    = map[string]int{} // op: code → count, for the log
		unexpectd []string
	)
	note := func(op string, err error, ok ...proto.Code) {
		progress.Add(1)
		code := client.Code(err)
		if err == nil {
			code = proto.OK
		}
		mu.Lock()
		defer mu.Unlock()
		opErrs[op+": "+code.String()]++
		if err == nil {
			return
		}
		for _, c := range ok {
			if c == code {
				return
			}
		}
		if len(unexpectd) < 20 {
			unexpectd = append(unexpectd, fmt.Sprintf("%s: %v", op, err))
		}
	}

	deadline := time.Now().Add(stormDuration(t))
	var wg sync.WaitGroup
	loop := func(name string, f func(rng *rand.Rand, c *client.Client)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := client.Dial(ctx, name)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			rng := rand.New(rand.NewPCG(rand.Uint64(), 0))
			for time.Now().Before(deadline) {
				f(rng, c)
			}
		}()
	}
	opCtx := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(ctx, 40*time.Second)
	}
	slotOf := func(rng *rand.Rand) string {
		// The same slot most of the time, its neighbours the rest.
		if rng.IntN(3) > 0 {
			return "payments/release"
		}
		return "payments/" + stormSlots[1+rng.IntN(len(stormSlots)-1)]
	}

	// Signers: four connections, each signing every slot in turn.
	var seq atomic.Uint64
	for range 4 {
		loop(socket, func(rng *rand.Rand, c *client.Client) {
			name := stormSlots[rng.IntN(len(stormSlots))]
			msg := fmt.Appendf(nil, "storm %d", seq.Add(1))
			var digest []byte
			var alg client.Algorithm
			switch name {
			case "release":
				d := sha256.Sum256(msg)
				digest, alg = d[:], client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA256}
			case "build", "spare":
				digest = msg
			case "other":
				d := sha512.Sum384(msg)
				digest = d[:]
			}
			cctx, cancel := opCtx()
			sig, err := c.Sign(cctx, client.ByName(name), alg, digest)
			cancel()
			note("sign", err, proto.Paused, proto.Unavailable, proto.UnsupportedAlgorithm, proto.NotFound)
			if err == nil {
				mu.Lock()
				received[journal.HashDigest(digest)] = stormSig{slot: "payments/" + name, digest: digest, sig: sig}
				mu.Unlock()
			}
		})
	}
	// Rotations, rollbacks and drills on the same slot and its neighbours.
	for _, op := range []string{"rotate", "rotate", "rollback", "drill"} {
		loop(adminSocket, func(rng *rand.Rand, admin *client.Client) {
			slot := slotOf(rng)
			cctx, cancel := opCtx()
			defer cancel()
			var msg string
			var err error
			switch op {
			case "rotate":
				msg, err = admin.RotateSlot(cctx, slot)
				note(op, err, proto.Unavailable)
			case "rollback":
				msg, err = admin.Rollback(cctx, slot)
				note(op, err, proto.Unavailable, proto.KeyRetired, proto.NotFound)
			case "drill":
				msg, err = admin.IncidentDrill(cctx, slot)
				// spare is not found while the second policy is in force.
				note(op, err, proto.Unavailable, proto.NotFound)
			}
			if err == nil {
				// "... (kid <kid>) ..."
				_, kid, _ := strings.Cut(msg, "(kid ")
				kid, _, _ = strings.Cut(kid, ")")
				mu.Lock()
				outcomes = append(outcomes, stormOutcome{op, slot, kid})
				mu.Unlock()
			}
			time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
		})
	}
	// Pauses and resumes.
	loop(adminSocket, func(rng *rand.Rand, admin *client.Client) {
		slot := slotOf(rng)
		cctx, cancel := opCtx()
		defer cancel()
		// spare is not found while the second policy is in force.
		_, err := admin.Pause(cctx, slot)
		note("pause", err, proto.NotFound)
		time.Sleep(time.Duration(rng.IntN(10)) * time.Millisecond)
		_, err = admin.Resume(cctx, slot)
		// UNAVAILABLE: a drill of the slot is under way.
		note("resume", err, proto.NotFound, proto.Unavailable)
		time.Sleep(time.Duration(rng.IntN(10)) * time.Millisecond)
	})
	// Policy reloads, alternating the two files, through the admin op.
	loop(adminSocket, func(rng *rand.Rand, admin *client.Client) {
		writeAtomic(t, policyPath, stormPolicy(rng.IntN(2) == 0))
		cctx, cancel := opCtx()
		defer cancel()
		_, err := admin.ReloadPolicy(cctx)
		note("reload-policy", drillUnderWayIsNoFault(err))
		time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
	})
	// Config reloads (Agent.Reload): calendars whose dates fall due within
	// the storm, so the scheduler rotates too; and one-off rotations.
	loop(adminSocket, func(rng *rand.Rand, admin *client.Client) {
		at := time.Now().Add(time.Duration(500+rng.IntN(1500)) * time.Millisecond).UTC().Truncate(time.Second).Add(time.Second)
		// Not spare: a calendar for a slot the second policy drops is
		// refused with the reload, rightly.
		writeConfig(fmt.Sprintf("  calendars:\n    payments/%s: {dates: [%q]}\n", stormSlots[rng.IntN(3)], at.Format(time.RFC3339)))
		note("reload", drillUnderWayIsNoFault(a.Reload()))
		cctx, cancel := opCtx()
		defer cancel()
		_, err := admin.ScheduleRotation(cctx, slotOf(rng), time.Now().Add(time.Duration(1+rng.IntN(2))*time.Second))
		// A time not after the slot's last activation is refused.
		note("rotate --at", err, proto.BadRequest)
		time.Sleep(time.Duration(200+rng.IntN(300)) * time.Millisecond)
	})
	// Readers of the journal and the evidence, and prunes of what came
	// before the storm.
	loop(adminSocket, func(rng *rand.Rand, admin *client.Client) {
		cctx, cancel := opCtx()
		defer cancel()
		switch rng.IntN(4) {
		case 0:
			_, err := admin.AuditTail(cctx, "payments", 0, 100)
			note("audit tail", err)
			_, err = admin.AuditTail(cctx, "", uint64(1+rng.IntN(50)), 100)
			note("audit tail --from", err)
		case 1:
			ok, summary, err := admin.AuditVerify(cctx)
			note("audit verify", err)
			if err == nil && !ok {
				t.Errorf("audit verify during the storm: %s", summary)
			}
		case 2:
			_, err := admin.AuditPrune(cctx, stormStart)
			note("audit prune", err)
		case 3:
			slot := slotOf(rng)
			pack, err := admin.ExportREPPack(cctx, slot, 0, 10*time.Second)
			note("rep export", err, proto.NotFound)
			if err == nil {
				if _, err := rotation.VerifyREP(pack.Manifest, pack.Sig, pack.EvidenceKey); err != nil {
					t.Errorf("rep export %s during the storm: %v", slot, err)
				}
			}
		}
		time.Sleep(time.Duration(rng.IntN(50)) * time.Millisecond)
	})
	wg.Wait()

	// After the storm every slot signs again once resumed under the first
	// policy: nothing is left stuck (a state not settled, a pause).
	admin, err := client.Dial(ctx, adminSocket)
	if err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, policyPath, stormPolicy(false))
	writeConfig("")
	if err := a.Reload(); err != nil {
		t.Errorf("reload after the storm: %v", err)
	}
	c, err := client.Dial(ctx, socket)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range stormSlots {
		if _, err := admin.Resume(ctx, "payments/"+name); err != nil {
			t.Errorf("resume %s after the storm: %v", name, err)
		}
		if _, err := c.PublicKey(ctx, client.ByName(name)); err != nil {
			t.Errorf("%s after the storm: %v", name, err)
		}
	}
	c.Close()
	admin.Close()

	mu.Lock()
	t.Logf("%d signatures received, %d rotations/rollbacks/drills reported done; outcomes: %v", len(received), len(outcomes), opErrs)
	for _, u := range unexpectd {
		t.Errorf("unexpected failure: %s", u)
	}
	mu.Unlock()

	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := a.Shutdown(sctx); err != nil {
		t.Errorf("shutdown: %v", err)
	}
	for range 2 {
		if err := <-served; !errors.Is(err, agent.ErrClosed) {
			t.Errorf("serve: %v", err)
		}
	}
	// Nothing left running, nothing left open.
	for wait := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		g, f := runtime.NumGoroutine(), countFDs()
		if g <= goroutines0+2 && f <= fds0+2 {
			break
		}
		if time.Now().After(wait) {
			buf := make([]byte, 1<<20)
			t.Errorf("after the storm and Shutdown: %d goroutines (%d before), %d descriptors (%d before)\n%s",
				g, goroutines0, f, fds0, buf[:runtime.Stack(buf, true)])
			break
		}
	}

	checkStormJournal(t, filepath.Join(dataDir, "journal"), received, outcomes, hashA, hashB)
}

// checkStormJournal checks what the storm left in the journal against
// what the clients and admins were told.
func checkStormJournal(t *testing.T, dir string, received map[[32]byte]stormSig, outcomes []stormOutcome, hashA, hashB [32]byte) {
	t.Helper()
	ctx := context.Background()
	j, err := journal.Open(journal.Options{Dir: dir, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if rep, err := j.Verify(ctx); err != nil || !rep.OK() {
		t.Errorf("audit chain after the storm: %v %v", err, rep.Break)
	}
	// OpenStore validates every slot: exactly one active version.
	store, err := rotation.OpenStore(ctx, j, rotation.StoreOptions{})
	if err != nil {
		t.Fatalf("rotation state after the storm: %v", err)
	}
	versions := map[string]rotation.Version{} // by kid
	for _, sl := range store.Slots() {
		for _, v := range sl.Versions {
			versions[v.KID] = v
		}
	}

	type okRec struct {
		rec   journal.Record
		count int
	}
	signed := map[[32]byte]*okRec{}
	paused := map[string]string{} // slot → the pause record in force
	okOps := map[stormOutcome]bool{}
	active := map[string]string{} // slot → the kid its records made active
	dead := map[string]string{}   // kid → the record that retired it
	err = j.Scan(ctx, journal.Filter{}, func(r *journal.Record) error {
		if r.CodeName != "OK" {
			return nil
		}
		switch r.Op {
		case "enroll", "rollback":
			active[r.Slot] = r.KID
		case "rotate.failed":
			if strings.Contains(r.Detail, "reverted") {
				// The failed version is retired, the old one signs again.
				dead[active[r.Slot]] = fmt.Sprintf("seq %d (reverted)", r.Seq)
				delete(dead, r.KID)
				active[r.Slot] = r.KID
			}
		case "retire":
			if r.Peer == "scheduler" {
				dead[r.KID] = fmt.Sprintf("seq %d (T1)", r.Seq)
			}
		}
		switch r.Op {
		case "pause":
			if strings.Contains(r.Detail, "stays paused after the drill") {
				// A drill noting a pause in force (an operator's, or the
				// file's, which a reload may lift): it changes nothing.
				return nil
			}
			paused[r.Slot] = fmt.Sprintf("seq %d by %s (%s)", r.Seq, r.Peer, r.Detail)
		case "resume":
			delete(paused, r.Slot)
		case "rotate":
			okOps[stormOutcome{"rotate", r.Slot, r.KID}] = true
			if strings.Contains(r.Detail, "(emergency)") {
				// The old version stops verifying at the cut-over.
				dead[active[r.Slot]] = fmt.Sprintf("seq %d (emergency cut-over)", r.Seq)
			}
			active[r.Slot] = r.KID
		case "rollback":
			okOps[stormOutcome{"rollback", r.Slot, r.KID}] = true
		case "sign":
			if p, ok := paused[r.Slot]; ok {
				t.Errorf("seq %d: %s signed with kid %s while paused by the record at %s", r.Seq, r.Slot, r.KID, p)
			}
			switch {
			case r.Slot == "payments/release" && r.PolicyHash != hashA,
				r.Slot == "payments/build" && r.PolicyHash != hashA:
				t.Errorf("seq %d: %s signed under policy %x, which forbids it (want %x)", r.Seq, r.Slot, r.PolicyHash[:8], hashA[:8])
			case r.PolicyHash != hashA && r.PolicyHash != hashB:
				t.Errorf("seq %d: %s signed under policy %x, neither of the storm's", r.Seq, r.Slot, r.PolicyHash[:8])
			}
			if d, ok := dead[r.KID]; ok {
				// Nothing lets a drill's slot sign while it runs (an
				// operator's resume and a reload lifting the file's pause
				// are refused until it ends), so no signature by the old
				// key may have a record after the emergency cut-over's.
				t.Errorf("seq %d: %s signed with kid %s, retired by the record at %s", r.Seq, r.Slot, r.KID, d)
			}
			v, ok := versions[r.KID]
			switch {
			case !ok:
				t.Errorf("seq %d: %s signed with kid %s, no version of any slot", r.Seq, r.Slot, r.KID)
			case int(r.Version) != v.Number:
				t.Errorf("seq %d: %s record says v%d, kid %s is v%d", r.Seq, r.Slot, r.Version, r.KID, v.Number)
			case !v.Retired.IsZero() && !r.Time.Before(v.Retired):
				t.Errorf("seq %d: %s signed at %s with v%d, retired at %s", r.Seq, r.Slot, r.Time.Format(time.RFC3339Nano), v.Number, v.Retired.Format(time.RFC3339Nano))
			}
			if o := signed[r.DigestHash]; o != nil {
				o.count++
			} else {
				signed[r.DigestHash] = &okRec{rec: *r, count: 1}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for h, s := range received {
		o := signed[h]
		if o == nil || o.count != 1 {
			n := 0
			if o != nil {
				n = o.count
			}
			t.Errorf("a signature of %s by %s has %d OK records", s.slot, s.sig.KID, n)
			continue
		}
		r := o.rec
		if r.KID != s.sig.KID || r.Slot != s.slot {
			t.Errorf("seq %d: a signature of %s by %s recorded as %s by %s", r.Seq, s.slot, s.sig.KID, r.Slot, r.KID)
		}
		if string(s.sig.PolicyHash) != string(r.PolicyHash[:]) {
			t.Errorf("seq %d: the client was told policy %x, the record says %x", r.Seq, s.sig.PolicyHash, r.PolicyHash[:8])
		}
		v, ok := versions[s.sig.KID]
		if !ok {
			continue // reported above
		}
		var valid bool
		switch pub := v.Public.(type) {
		case *ecdsa.PublicKey:
			valid = ecdsa.VerifyASN1(pub, s.digest, s.sig.Sig)
		case ed25519.PublicKey:
			valid = ed25519.Verify(pub, s.digest, s.sig.Sig)
		}
		if !valid {
			t.Errorf("seq %d: a signature of %s does not verify with v%d (kid %s)", r.Seq, s.slot, v.Number, v.KID)
		}
	}
	for _, o := range outcomes {
		if o.kid == "" {
			t.Errorf("%s %s reported done without a kid", o.op, o.slot)
			continue
		}
		op := o.op
		if op == "drill" {
			op = "rotate"
		}
		if !okOps[stormOutcome{op, o.slot, o.kid}] {
			t.Errorf("%s %s reported kid %s active, the journal has no %s record of it", o.op, o.slot, o.kid, op)
		}
		if v, ok := versions[o.kid]; !ok || v.Failed {
			t.Errorf("%s %s reported kid %s active, the state has it as %+v", o.op, o.slot, o.kid, v)
		}
	}
}

// drillUnderWayIsNoFault drops a reload's refusal to lift the file pause of
// a slot whose drill is under way: the rule, not a failure.
func drillUnderWayIsNoFault(err error) error {
	if err != nil && strings.Contains(err.Error(), "an incident drill of it is under way") {
		return nil
	}
	return err
}
