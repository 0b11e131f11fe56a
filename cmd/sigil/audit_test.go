package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// `sigil audit export` then `sigil audit prune` from the shell, as the
// docs advise: over the running agent's admin socket, then on the directory
// of the stopped agent; the chain verifies after each prune and says where
// it now starts.
func TestAuditPruneFromTheShell(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	config := writeEd25519Config(t, dir)
	sockDir, _ := os.MkdirTemp("", "sigil-prune")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "agent.sock")
	adminSocket := filepath.Join(sockDir, "admin.sock")

	agent := startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)
	for i := 0; i < 3; i++ {
		if _, stderr, code := runBin(t, bin, "--socket", socket, "keys", "sign", "--in", config); code != 0 {
			t.Fatalf("sign: %s", stderr)
		}
	}
	// Export first, from the running agent: the three records as JSON lines.
	out, stderr, code := runBin(t, bin, "audit", "export", "--since", "1h", "--admin-socket", adminSocket)
	if code != 0 || strings.Count(out, "\n") != 3 || strings.Count(out, `"op":"sign"`) != 3 {
		t.Fatalf("export from the running agent: exit %d\n%s%s", code, out, stderr)
	}
	if _, stderr, code := runBin(t, bin, "audit", "prune", "--admin-socket", adminSocket); code != exitUsage || !strings.Contains(stderr, "--before") {
		t.Fatalf("prune without --before: exit %d %s", code, stderr)
	}
	// The wire carries whole seconds: a cut-off just ahead of now takes
	// the records signed this second.
	soon := time.Now().Add(2 * time.Second).Format(time.RFC3339)
	out, stderr, code = runBin(t, bin, "audit", "prune", "--before", soon, "--admin-socket", adminSocket)
	if code != 0 || !strings.Contains(out, "running agent: deleted 3 records (seq 1..3)") {
		t.Fatalf("prune over the admin socket: exit %d\n%s%s", code, out, stderr)
	}
	out, stderr, code = runBin(t, bin, "audit", "verify", "--admin-socket", adminSocket)
	if code != 0 || !strings.Contains(out, "seq 4..4 (seq 1..3 pruned)") {
		t.Fatalf("verify after prune: exit %d\n%s%s", code, out, stderr)
	}
	agent.cmd.Process.Kill()
	agent.cmd.Wait()

	out, stderr, code = runBin(t, bin, "audit", "prune", "--before", soon, "--config", config)
	if code != 0 || !strings.Contains(out, "deleted 1 records (seq 4..4)") {
		t.Fatalf("prune of the stopped agent's journal: exit %d\n%s%s", code, out, stderr)
	}
	out, stderr, code = runBin(t, bin, "audit", "verify", "--config", config)
	if code != 0 || !strings.Contains(out, "audit chain OK: 1 records, seq 5..5 (seq 1..4 pruned)") {
		t.Fatalf("verify of the pruned directory: exit %d\n%s%s", code, out, stderr)
	}
}

// With --config, the audit commands ask the running agent of that config
// over the admin socket the config implies, as they do by default; a
// config that names no socket leaves only its journal directory to read.
func TestAuditWithConfigAsksItsRunningAgent(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	sockDir, _ := os.MkdirTemp("", "sigil-acfg")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "agent.sock")
	config := writeEd25519Config(t, dir, "socket: "+socket+"\n")
	agent := startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)
	for range 2 {
		if _, stderr, code := runBin(t, bin, "--socket", socket, "keys", "sign", "--in", config); code != 0 {
			t.Fatalf("sign: %s", stderr)
		}
	}
	out, stderr, code := runBin(t, bin, "audit", "verify", "--config", config)
	if code != 0 || !strings.Contains(out, "(running agent)") {
		t.Fatalf("verify --config with its agent running: exit %d\n%s%s", code, out, stderr)
	}
	out, stderr, code = runBin(t, bin, "audit", "export", "--since", "1h", "--config", config)
	if code != 0 || strings.Count(out, `"op":"sign"`) != 2 {
		t.Fatalf("export --config with its agent running: exit %d\n%s%s", code, out, stderr)
	}
	out, stderr, code = runBin(t, bin, "audit", "tail", "-n", "5", "--config", config)
	if code != 0 || strings.Count(out, "sign") < 2 {
		t.Fatalf("tail --config with its agent running: exit %d\n%s%s", code, out, stderr)
	}

	// The same journal through a config that names no socket: the default
	// admin socket may be another agent's, so the directory is read, and
	// it is in use.
	bare := filepath.Join(dir, "bare.yaml")
	raw, _ := os.ReadFile(config)
	os.WriteFile(bare, []byte(strings.Replace(string(raw), "socket: "+socket+"\n", "", 1)), 0o600)
	if _, stderr, code := runBin(t, bin, "audit", "verify", "--config", bare); code != exitUnchecked || !strings.Contains(stderr, "in use") {
		t.Fatalf("verify --config naming no socket: exit %d, stderr %q; want the directory, in use", code, stderr)
	}
	if _, stderr, code := runBin(t, bin, "audit", "tail", "--follow", "--config", bare); code != exitUsage || !strings.Contains(stderr, "--admin-socket") {
		t.Fatalf("tail --follow --config naming no socket: exit %d, stderr %q", code, stderr)
	}
}

// shortSocketDir is a directory for an agent's sockets, under the 108-byte
// sun_path limit t.TempDir's names can exceed.
func shortSocketDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sigil-s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// The admin and audit commands find the admin socket beside the agent
// socket the global --socket names, as the client commands use it; they
// used to look beside $SIGIL_SOCK whatever --socket said, and so reached
// another agent or none. An --admin-socket named where no agent answers is
// exit 3 for every audit command: tail used to print the default data
// dir's journal instead, as if it were the named agent's.
func TestAdminSocketBesideTheSocketFlag(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	sockDir := shortSocketDir(t)
	socket := filepath.Join(sockDir, "agent.sock")
	config := writeEd25519Config(t, dir, "socket: "+socket+"\n")
	agent := startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)
	elsewhere := t.TempDir()
	t.Setenv("SIGIL_SOCK", filepath.Join(elsewhere, "agent.sock"))
	t.Setenv("XDG_RUNTIME_DIR", elsewhere)
	t.Setenv("XDG_STATE_HOME", elsewhere)

	if _, stderr, code := runBin(t, bin, "--socket", socket, "keys", "sign", "--in", config); code != 0 {
		t.Fatalf("sign: %s", stderr)
	}
	if out, stderr, code := runBin(t, bin, "--socket", socket, "admin", "reload"); code != 0 {
		t.Fatalf("admin reload --socket: exit %d\n%s%s", code, out, stderr)
	}
	if out, stderr, code := runBin(t, bin, "--socket", socket, "audit", "verify"); code != 0 || !strings.Contains(out, "(running agent)") {
		t.Fatalf("audit verify --socket: exit %d\n%s%s", code, out, stderr)
	}
	if out, stderr, code := runBin(t, bin, "--socket", socket, "audit", "tail"); code != 0 || !strings.Contains(out, "sign") {
		t.Fatalf("audit tail --socket: exit %d\n%s%s", code, out, stderr)
	}

	nobody := filepath.Join(elsewhere, "admin.sock")
	for _, sub := range []string{"tail", "verify"} {
		if out, stderr, code := runBin(t, bin, "audit", sub, "--admin-socket", nobody); code != exitUnreachable {
			t.Errorf("audit %s --admin-socket where no agent answers: exit %d, want %d\n%s%s", sub, code, exitUnreachable, out, stderr)
		}
	}
}

// refuseKeyNames has the agent at socket refuse one Sign per name (no such
// key): each refusal's audit record carries the client's name.
func refuseKeyNames(t *testing.T, socket string, names ...string) {
	t.Helper()
	c, err := client.Dial(context.Background(), socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d := sha256.Sum256([]byte("x"))
	for _, name := range names {
		if _, err := c.Sign(context.Background(), client.ByName(name), client.Algorithm{}, d[:]); client.Code(err) != proto.NotFound {
			t.Fatalf("Sign with key %q: %v, want NOT_FOUND", name, err)
		}
	}
}

// A client's key name lands in a refused request's audit record; whatever
// it holds, the audit commands stay correct:
//   - records swollen by it (a '<' is six bytes of JSON) are exported whole:
//     100 of them used to outgrow the reply frame and fail the export;
//   - bytes that are not UTF-8 are recorded as U+FFFD, so the export (JSON)
//     carries what the hash covers;
//   - a tab or line break in it does not draw table rows of its own in
//     `audit tail`.
func TestAuditRecordsOfHostileKeyNames(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	sockDir := shortSocketDir(t)
	socket, admin := filepath.Join(sockDir, "agent.sock"), filepath.Join(sockDir, "admin.sock")
	startAgentProcess(t, bin, writeEd25519Config(t, dir), socket).waitReady(t)

	wide := make([]string, 150)
	for i := range wide {
		wide[i] = strings.Repeat("<", 64)
	}
	refuseKeyNames(t, socket, wide...)
	refuseKeyNames(t, socket, "rel\xffease", "x\n999\t2026-01-01T00:00:00Z\tacme\tacme/prod\tkid\tsign\ted\tOK")

	out, stderr, code := runBin(t, bin, "audit", "export", "--format", "jsonl", "--admin-socket", admin)
	if code != 0 {
		t.Fatalf("audit export: exit %d: %s", code, stderr)
	}
	if n := strings.Count(out, `"code_name":"NOT_FOUND"`); n != 152 {
		t.Fatalf("audit export: %d refusals, want 152", n)
	}
	if !utf8.ValidString(out) || !strings.Contains(out, `"slot":"rel`+"\uFFFD"+`ease"`) {
		t.Fatalf("the non-UTF-8 key name is not recorded as U+FFFD:\n%s", out[strings.Index(out, `"slot":"rel`):][:40])
	}
	if out, stderr, code := runBin(t, bin, "audit", "verify", "--admin-socket", admin); code != 0 {
		t.Fatalf("audit verify: exit %d\n%s%s", code, out, stderr)
	}
	out, stderr, code = runBin(t, bin, "audit", "tail", "-n", "100", "--admin-socket", admin)
	if code != 0 {
		t.Fatalf("audit tail: exit %d: %s", code, stderr)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "999 ") {
			t.Fatalf("audit tail drew a row from a key name:\n%s", out)
		}
	}
}

// The admin and audit commands reach an agent over mTLS as the client
// commands do: with --socket tls://host:port the admin operations go to
// that listener, where an mTLS identity in the policy's admins is served
// them. They used to fall back to the local admin socket beside
// $SIGIL_SOCK, acting on another agent.
func TestAdminCommandsOverMutualTLS(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	ca, err := devcerts.NewCA("admin over mTLS")
	if err != nil {
		t.Fatal(err)
	}
	caFile, _ := ca.WriteCert(dir, "ca")
	server, _ := ca.Issue(devcerts.Leaf{CommonName: "agent", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	serverCert, serverKey, _ := server.Write(dir, "server")
	ops, _ := ca.Issue(devcerts.Leaf{CommonName: "ops", URIs: []string{"spiffe://example.org/ops"}})
	opsCert, opsKey, _ := ops.Write(dir, "ops")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	policyFile := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policyFile, []byte(fmt.Sprintf("admins: {mtls: [\"spiffe://example.org/ops\"]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [%d], mtls: [\"spiffe://example.org/ops\"]}\n    slots: [{name: release, key: ed}]\n", os.Getuid())), 0o600)
	config := writeEd25519Config(t, dir, fmt.Sprintf("policy: %s\ntcp: {listen: %q, cert_file: %s, key_file: %s, client_ca_file: %s}\n", policyFile, addr, serverCert, serverKey, caFile))
	sockDir := shortSocketDir(t)
	socket := filepath.Join(sockDir, "agent.sock")
	startAgentProcess(t, bin, config, socket).waitReady(t)
	// Another agent's place, where the commands used to go.
	t.Setenv("SIGIL_SOCK", filepath.Join(t.TempDir(), "agent.sock"))

	tlsFlags := []string{"--socket", "tls://" + addr, "--tls-cert", opsCert, "--tls-key", opsKey, "--tls-ca", caFile}
	if out, stderr, code := runBin(t, bin, append(tlsFlags, "admin", "pause", "payments/release")...); code != 0 {
		t.Fatalf("admin pause over mTLS: exit %d\n%s%s", code, out, stderr)
	}
	if _, stderr, code := runBin(t, bin, "--socket", socket, "keys", "sign", "--in", config, "--key", "release"); code != exitRefused || !strings.Contains(stderr, "PAUSED") {
		t.Fatalf("sign after the pause over mTLS: exit %d %s", code, stderr)
	}
	if out, stderr, code := runBin(t, bin, append(tlsFlags, "audit", "verify")...); code != 0 || !strings.Contains(out, "(running agent)") {
		t.Fatalf("audit verify over mTLS: exit %d\n%s%s", code, out, stderr)
	}
	if _, stderr, code := runBin(t, bin, "--socket", "tls://"+addr, "admin", "resume", "payments/release"); code != exitUsage {
		t.Fatalf("admin over tls:// without the TLS files: exit %d %s, want a usage error", code, stderr)
	}

	// $SIGIL_SOCK is --socket's default, a tls:// address included (the
	// agent takes one there for a client's, not its own): the commands
	// used to dial it as a Unix path, "dial unix tls://…", exit 3.
	t.Setenv("SIGIL_SOCK", "tls://"+addr)
	tlsFiles := tlsFlags[2:]
	for _, args := range [][]string{
		{"admin", "resume", "payments/release"},
		{"audit", "verify"},
		{"keys", "info"},
	} {
		if out, stderr, code := runBin(t, bin, append(tlsFiles, args...)...); code != 0 {
			t.Errorf("SIGIL_SOCK=tls://… %s: exit %d\n%s%s", strings.Join(args, " "), code, out, stderr)
		}
	}
}

// An export from a running agent pages through its journal; records pruned
// between two pages (retention runs hourly) must fail the export, not
// leave a silent gap in it.
func TestExportNoticesRecordsPrunedUnderIt(t *testing.T) {
	lost := "records 7-30 were confirmed to signers, and are lost with the damaged tail log kept as journal.tail.lost-1"
	for _, tc := range []struct {
		from, seq  uint64
		tenant     string
		op, detail string
		ok         bool
	}{
		{1, 1, "", "sign", "", true},
		{1, 4201, "", "sign", "", true}, // the first page starts where the chain starts
		{101, 101, "", "sign", "", true},
		{4201, 28089, "", "sign", "", false},
		{4201, 28089, "payments", "sign", "", true}, // a tenant's records skip seqs anyway
		{7, 31, "", journal.LostOp, lost, true},     // the gap a journal.lost record names
		{7, 32, "", journal.LostOp, lost, false},    // ... and no other
		{8, 31, "", journal.LostOp, lost, false},
	} {
		err := continuesExport(tc.from, tc.seq, tc.tenant, tc.op, tc.detail)
		if (err == nil) != tc.ok {
			t.Errorf("from %d, record %d, tenant %q: %v", tc.from, tc.seq, tc.tenant, err)
		}
	}
}

// `audit recover` on a journal with nothing lost opens it, says so, and
// leaves the chain as it was (the damaged case: journal's
// TestAcceptTailLossRecordsTheLoss).
func TestAuditRecoverWithNothingLost(t *testing.T) {
	dir := t.TempDir()
	oneRecordJournal(t, dir)
	out, stderr, code := run(t, "audit", "recover", "--journal", dir)
	if code != 0 || !strings.Contains(out, "nothing to recover") {
		t.Fatalf("recover: exit %d\n%s%s", code, out, stderr)
	}
	out, stderr, code = run(t, "audit", "verify", "--journal", dir)
	if code != 0 || !strings.Contains(out, "audit chain OK: 1 records") {
		t.Fatalf("verify after recover: exit %d\n%s%s", code, out, stderr)
	}
}

// audit verify's exit status tells a monitor a broken chain (1) from a
// check that could not be made (5): both used to be 1.
func TestAuditVerifyExitStatus(t *testing.T) {
	dir := t.TempDir()
	sound := filepath.Join(dir, "sound")
	oneRecordJournal(t, sound)
	held := filepath.Join(dir, "held")
	hj, err := journal.Open(journal.Options{Dir: held})
	if err != nil {
		t.Fatal(err)
	}
	defer hj.Close()
	notDir := filepath.Join(dir, "file")
	os.WriteFile(notDir, []byte("not a journal"), 0o600)
	export, edited := filepath.Join(dir, "export.jsonl"), filepath.Join(dir, "edited.jsonl")
	{
		ej, err := journal.Open(journal.Options{Dir: filepath.Join(dir, "exported")})
		if err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			if err := ej.Append(context.Background(), &journal.Record{Tenant: "acme", Op: "sign", CodeName: "OK", Slot: fmt.Sprint(i)}); err != nil {
				t.Fatal(err)
			}
		}
		var buf bytes.Buffer
		if err := ej.WriteJSONL(context.Background(), &buf, journal.Filter{}); err != nil {
			t.Fatal(err)
		}
		ej.Close()
		os.WriteFile(export, buf.Bytes(), 0o600)
		os.WriteFile(edited, bytes.Replace(buf.Bytes(), []byte(`"slot":"1"`), []byte(`"slot":"9"`), 1), 0o600)
	}

	for _, tc := range []struct {
		name string
		args []string
		code int
		say  string
	}{
		{"sound chain", []string{"--journal", sound}, exitOK, "audit chain OK"},
		{"no journal", []string{"--journal", filepath.Join(dir, "none")}, exitUnchecked, "no journal"},
		{"journal in use", []string{"--journal", held}, exitUnchecked, "in use"},
		{"not a journal", []string{"--journal", notDir}, exitUnchecked, "journal"},
		{"named agent silent", []string{"--admin-socket", filepath.Join(dir, "none.sock")}, exitUnreachable, "no agent answered"},
		{"sound export", []string{"--export", export}, exitOK, "export chain OK: 3 records"},
		{"edited export", []string{"--export", edited}, exitFailure, "seq 2: hash mismatch"},
		{"no export", []string{"--export", filepath.Join(dir, "none.jsonl")}, exitUnchecked, "no such file"},
		{"not an export", []string{"--export", notDir}, exitFailure, "undecodable record"},
		{"export and a journal", []string{"--export", export, "--journal", sound}, exitUsage, "--export checks a file alone"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := run(t, append([]string{"audit", "verify"}, tc.args...)...)
			if code != tc.code || !strings.Contains(out+stderr, tc.say) {
				t.Fatalf("exit %d, want %d saying %q\n%s%s", code, tc.code, tc.say, out, stderr)
			}
		})
	}
}

// damagedJournal returns the directory of a killed agent's journal whose
// tail log lost records between frames: 10 records, each its own frame,
// none yet applied to Pebble, and record 6's frame damaged: 6-10 are lost.
func damagedJournal(t *testing.T) string {
	t.Helper()
	live := t.TempDir()
	j, err := journal.Open(journal.Options{Dir: live, ApplyDelay: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if err := j.Append(context.Background(), &journal.Record{Tenant: "acme", Op: "sign", CodeName: "OK", Slot: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	// The kill: the directory as it is now, the journal still open.
	dir := t.TempDir()
	entries, err := os.ReadDir(live)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(live, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if e.Name() == "journal.tail" {
			var frames []int
			for off := 0; ; off++ {
				i := bytes.Index(data[off:], []byte("SGT1"))
				if i < 0 {
					break
				}
				off += i
				frames = append(frames, off)
			}
			// The first commit may have gone to Pebble's WAL itself.
			if len(frames) < 5 {
				t.Fatalf("the tail log holds %d frames, want 9 or 10", len(frames))
			}
			off := frames[len(frames)-5] + 88
			data[off] ^= 1 // the payload of record 6's frame
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	j.Close()
	return dir
}

// The audit commands that write to a stopped agent's journal directory
// create their files (Pebble's, and recover's journal.tail.lost-<ns>, which
// holds records) for the agent's user alone, as the agent does, whatever
// the caller's umask: under umask 022 they were world-readable.
func TestAuditWritesJournalFilesOwnerOnly(t *testing.T) {
	old := func(t *testing.T) string {
		dir := t.TempDir()
		j, err := journal.Open(journal.Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			r := &journal.Record{Time: time.Now().Add(-48 * time.Hour), Op: "sign", CodeName: "OK"}
			if err := j.Append(context.Background(), r); err != nil {
				t.Fatal(err)
			}
		}
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	for _, tc := range []struct {
		name    string
		journal func(*testing.T) string
		args    []string
		say     string
	}{
		{"prune", old, []string{"audit", "prune", "--before", "24h"}, "deleted 3 records"},
		{"recover, nothing lost", old, []string{"audit", "recover"}, "nothing to recover"},
		{"recover, records lost", damagedJournal, []string{"audit", "recover"}, "records 6-10"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.journal(t)
			// What was there before is the agent's, 0600: each file
			// left readable by others below is the command's.
			files, _ := os.ReadDir(dir)
			for _, f := range files {
				os.Chmod(filepath.Join(dir, f.Name()), 0o600)
			}
			prev := syscall.Umask(0o022)
			t.Cleanup(func() { syscall.Umask(prev) })
			out, stderr, code := run(t, append(tc.args, "--journal", dir)...)
			if code != exitOK || !strings.Contains(out, tc.say) {
				t.Fatalf("exit %d, want 0 saying %q\n%s%s", code, tc.say, out, stderr)
			}
			files, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				info, err := f.Info()
				if err != nil {
					t.Fatal(err)
				}
				if info.Mode().Perm()&0o077 != 0 {
					t.Errorf("%s is %v: readable by others", f.Name(), info.Mode().Perm())
				}
			}
		})
	}
}

// `audit tail -n` takes a count of at least one record: 0 or a negative
// count is a usage error naming the flag, on both paths. It used to be
// taken: the running agent reads a count below 1 as its default (100
// records printed) and the directory as none.
func TestAuditTailRefusesCountBelowOne(t *testing.T) {
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	_, socket, admin := serveTestAgentWithAdmin(t, cfg)
	refuseKeyNames(t, socket, "a", "b", "c")
	stopped := t.TempDir()
	j, err := journal.Open(journal.Options{Dir: stopped})
	if err != nil {
		t.Fatal(err)
	}
	j.Append(context.Background(), &journal.Record{Tenant: "acme", Op: "sign", CodeName: "OK"})
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	for _, where := range [][]string{{"--admin-socket", admin}, {"--journal", stopped}} {
		for _, n := range []string{"0", "-5"} {
			t.Run(where[0]+" -n "+n, func(t *testing.T) {
				out, stderr, code := run(t, append([]string{"audit", "tail", "-n", n}, where...)...)
				if code != exitUsage || !strings.Contains(stderr, "-n/--lines") || strings.Contains(out, "NOT_FOUND") {
					t.Fatalf("exit %d, want %d naming -n/--lines\n%s%s", code, exitUsage, out, stderr)
				}
			})
		}
		t.Run(where[0]+" -n 1", func(t *testing.T) {
			out, stderr, code := run(t, append([]string{"audit", "tail", "-n", "1"}, where...)...)
			if code != exitOK || strings.Count(out, "\n") != 2 {
				t.Fatalf("exit %d, want one record\n%s%s", code, out, stderr)
			}
		})
	}
}

// A journal in use (the agent running) is refused by every audit command
// that reads the directory, each saying what would work: the readers can
// ask the agent over --admin-socket, while recover, which has no such flag
// and writes to the journal, needs the agent stopped. recover used to give
// the readers' advice. The directory is named once: "journal X is in use
// (...): journal: in use by another process: X" said it twice.
func TestAuditJournalInUseSaysWhatToDo(t *testing.T) {
	held := t.TempDir()
	j, err := journal.Open(journal.Options{Dir: held})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	for _, tc := range []struct {
		sub         string
		code        int
		says, never string
	}{
		{"verify", exitUnchecked, "ask it with --admin-socket PATH", ""},
		{"tail", exitFailure, "ask it with --admin-socket PATH", ""},
		{"export", exitFailure, "ask it with --admin-socket PATH", ""},
		{"prune", exitFailure, "ask it with --admin-socket PATH", ""},
		{"recover", exitFailure, "stop the agent first", "--admin-socket"},
	} {
		t.Run(tc.sub, func(t *testing.T) {
			args := []string{"audit", tc.sub, "--journal", held}
			if tc.sub == "prune" {
				args = append(args, "--before", "24h")
			}
			out, stderr, code := run(t, args...)
			if code != tc.code || !strings.Contains(stderr, "in use by another process") || !strings.Contains(stderr, tc.says) || tc.never != "" && strings.Contains(stderr, tc.never) {
				t.Fatalf("exit %d (want %d), want %q and not %q\n%s%s", code, tc.code, tc.says, tc.never, out, stderr)
			}
			if n := strings.Count(stderr, held); n != 1 || strings.Count(stderr, "in use") != 1 {
				t.Fatalf("the directory named %d times, \"in use\" said %d times, want once each: %s", n, strings.Count(stderr, "in use"), stderr)
			}
		})
	}
}

// `audit export` from a running agent fails here, exit 1, when what it
// got cannot be exported: records pruned between two pages (a gap the
// output would hide), a record that is not JSON, an output that cannot be
// written. All three went out through the connection's error path, exit 3
// (no agent reachable), from an agent that had answered every request.
func TestAuditExportLocalFailuresAreNotNoAgent(t *testing.T) {
	record := func(seq uint64) []byte {
		return []byte(fmt.Sprintf(`{"seq":%d,"time":"2026-12-01T09:00:00Z","op":"sign"}`, seq))
	}
	dir := shortSocketDir(t)
	for _, tc := range []struct {
		name  string
		pages map[uint64][][]byte // by the page's first seq
		says  string
	}{
		{"records pruned under it", map[uint64][][]byte{1: {record(1), record(2)}, 3: {record(40)}}, "records 3-39 were pruned while the export ran"},
		{"a record not JSON", map[uint64][][]byte{1: {record(1), []byte("not JSON")}}, "record after seq 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".sock")
			listenUnix(t, sock, func(c net.Conn) {
				go fakeAgent(c, func(req *proto.Request) *proto.Response {
					return &proto.Response{Code: proto.OK, Records: tc.pages[req.FromSeq]}
				})
			})
			_, stderr, code := run(t, "audit", "export", "--admin-socket", sock)
			if code != exitFailure || !strings.Contains(stderr, tc.says) {
				t.Fatalf("exit %d (want %d), stderr %q, want %q", code, exitFailure, stderr, tc.says)
			}
		})
	}

	t.Run("output not written", func(t *testing.T) {
		full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
		if err != nil {
			t.Skip("no /dev/full")
		}
		defer full.Close()
		sock := filepath.Join(dir, "full.sock")
		listenUnix(t, sock, func(c net.Conn) {
			go fakeAgent(c, func(req *proto.Request) *proto.Response {
				if req.FromSeq == 1 {
					return &proto.Response{Code: proto.OK, Records: [][]byte{record(1)}}
				}
				return &proto.Response{Code: proto.OK}
			})
		})
		cmd := exec.Command(buildSigil(t), "audit", "export", "--admin-socket", sock)
		cmd.Stdout = full
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err = cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != exitFailure || !strings.Contains(stderr.String(), "no space left on device") {
			t.Fatalf("exit %v, stderr %q; want exit %d naming the write", err, stderr.String(), exitFailure)
		}
	})
}

// An audit command whose --config cannot be read or does not parse fails
// as a local failure, as 'sigil agent --config' and 'ssh-agent-env
// --config' do (exit 1; verify's 5, as it could check nothing): it used to
// be exit 2, a usage error, for a command line that was right.
func TestAuditConfigThatDoesNotLoad(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.yaml")
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("no_such_field: 1\n"), 0o600)
	for _, config := range []string{missing, bad} {
		for _, tc := range []struct {
			args []string
			code int
		}{
			{[]string{"audit", "verify"}, exitUnchecked},
			{[]string{"audit", "tail"}, exitFailure},
			{[]string{"audit", "export"}, exitFailure},
			{[]string{"audit", "prune", "--before", "24h"}, exitFailure},
			{[]string{"audit", "recover"}, exitFailure},
		} {
			t.Run(filepath.Base(config)+" "+tc.args[1], func(t *testing.T) {
				_, stderr, code := run(t, append(tc.args, "--config", config)...)
				if code != tc.code || !strings.Contains(stderr, "config") {
					t.Fatalf("exit %d (want %d), stderr %q", code, tc.code, stderr)
				}
			})
		}
	}
}

// oneRecordJournal makes a closed journal in dir holding one sign record.
func oneRecordJournal(t *testing.T, dir string) {
	t.Helper()
	j, err := journal.Open(journal.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Append(context.Background(), &journal.Record{Tenant: "acme", Op: "sign", CodeName: "OK"}); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}

// `audit tail -n N` prints the last N records from a running agent as it
// does from the directory. The agent answers at most 100 records a call,
// and fewer when they would not fit a reply; tail printed what one call
// gave, so -n 250 printed 100, and -n 100 of wide records some 60.
func TestAuditTailOnlinePrintsAllItWasAskedFor(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	sockDir := shortSocketDir(t)
	socket, admin := filepath.Join(sockDir, "agent.sock"), filepath.Join(sockDir, "admin.sock")
	startAgentProcess(t, bin, writeEd25519Config(t, dir), socket).waitReady(t)
	wide := make([]string, 300)
	for i := range wide {
		wide[i] = strings.Repeat("<", 64) // six bytes of JSON each
	}
	refuseKeyNames(t, socket, wide...)

	for _, n := range []int{1, 100, 250, 1000} {
		out, stderr, code := runBin(t, bin, "audit", "tail", "-n", strconv.Itoa(n), "--admin-socket", admin)
		if code != 0 {
			t.Fatalf("audit tail -n %d: exit %d: %s", n, code, stderr)
		}
		var seqs []uint64
		for _, line := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
			seq, err := strconv.ParseUint(strings.Fields(line)[0], 10, 64)
			if err != nil {
				t.Fatalf("row %q", line)
			}
			seqs = append(seqs, seq)
		}
		want := min(n, 300)
		if len(seqs) != want {
			t.Fatalf("audit tail -n %d printed %d records, want %d", n, len(seqs), want)
		}
		for i, s := range seqs {
			if s != seqs[len(seqs)-1]-uint64(len(seqs)-1-i) {
				t.Fatalf("audit tail -n %d: seqs %v are not the last ones in order", n, seqs)
			}
		}
	}
}

// With no agent answering, the audit commands read a journal directory;
// without --config or --journal, the default data dir's. That is the
// default agent's journal, not the one of an agent named by --socket or
// $SIGIL_SOCK at another path: a stopped systemd agent (SIGIL_SOCK=
// /run/sigil/agent.sock) had `audit verify` report the caller's own
// default journal "audit chain OK", exit 0, and prune would have deleted
// its records. For such an agent they exit 3 and say how to name its
// journal; the default agent's stopped journal is still read.
func TestAuditOfAStoppedNamedAgentReadsNoOtherJournal(t *testing.T) {
	state := t.TempDir()
	t.Setenv("XDG_STATE_HOME", state)
	t.Setenv("XDG_RUNTIME_DIR", shortSocketDir(t))
	defaultJournal := filepath.Join(state, "sigil", "journal")
	if err := os.MkdirAll(filepath.Dir(defaultJournal), 0o700); err != nil {
		t.Fatal(err)
	}
	oneRecordJournal(t, defaultJournal)
	stopped := filepath.Join(shortSocketDir(t), "agent.sock")

	commands := [][]string{
		{"audit", "verify"},
		{"audit", "tail"},
		{"audit", "export"},
		{"audit", "prune", "--before", "1ns"},
	}
	for _, named := range []struct {
		name string
		env  string
		args []string
	}{
		{"SIGIL_SOCK", stopped, nil},
		{"--socket", "", []string{"--socket", stopped}},
	} {
		for _, args := range commands {
			t.Run(named.name+" "+args[1], func(t *testing.T) {
				t.Setenv("SIGIL_SOCK", named.env)
				out, stderr, code := run(t, append(append([]string{}, named.args...), args...)...)
				if code != exitUnreachable || !strings.Contains(stderr, "--journal") || strings.Contains(out, "acme") || strings.Contains(out, "OK") {
					t.Fatalf("exit %d, want %d naming --journal, and no record of the default journal\n%s%s", code, exitUnreachable, out, stderr)
				}
			})
		}
	}
	t.Run("the default agent", func(t *testing.T) {
		t.Setenv("SIGIL_SOCK", proto.DefaultSocketPath())
		out, stderr, code := run(t, "audit", "verify")
		if code != exitOK || !strings.Contains(out, "audit chain OK: 1 records") {
			t.Fatalf("exit %d, want its stopped journal read\n%s%s", code, out, stderr)
		}
	})
}

// --since and --before take an RFC 3339 time or a duration ago; a value
// that is neither says both forms. It said only Go's time layout error,
// `parsing time "5d" as "2006-01-02T15:04:05Z07:00": cannot parse "5d" as
// "2006"`, which names neither, for a duration written as days.
func TestSinceThatIsNeitherSaysBothForms(t *testing.T) {
	j := filepath.Join(t.TempDir(), "journal")
	oneRecordJournal(t, j)
	for _, args := range [][]string{
		{"audit", "export", "--since", "5d"},
		{"audit", "export", "--since", "yesterday"},
		{"audit", "prune", "--before", "90d"},
	} {
		t.Run(strings.Join(args[1:], " "), func(t *testing.T) {
			_, stderr, code := run(t, append(args, "--journal", j)...)
			if code != exitUsage || !strings.Contains(stderr, "RFC 3339") || !strings.Contains(stderr, "duration") || strings.Contains(stderr, "2006") {
				t.Fatalf("exit %d, stderr %q; want %d naming both forms, not Go's layout", code, stderr, exitUsage)
			}
		})
	}
}
