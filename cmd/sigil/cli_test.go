package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

func startTestAgent(t *testing.T) string {
	t.Helper()
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	_, socket := serveTestAgent(t, cfg, "agent.sock")
	return socket
}

// serveTestAgent runs an agent on cfg with its socket named name in a
// short temporary directory.
func serveTestAgent(t *testing.T, cfg agent.Config, name string) (*agent.Agent, string) {
	t.Helper()
	dir, _ := os.MkdirTemp("", "sigil-cli")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, name)
	a, err := agent.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := agent.ListenUnix(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	go a.Serve(ln)
	t.Cleanup(func() { a.Shutdown(context.Background()) })
	return a, cfg.Socket
}

// serveTestAgentWithAdmin is serveTestAgent with the admin operations
// served on admin.sock beside the socket, whose path it returns too.
func serveTestAgentWithAdmin(t *testing.T, cfg agent.Config) (a *agent.Agent, socket, admin string) {
	t.Helper()
	a, socket = serveTestAgent(t, cfg, "agent.sock")
	admin = filepath.Join(filepath.Dir(socket), "admin.sock")
	ln, err := agent.ListenUnix(admin)
	if err != nil {
		t.Fatal(err)
	}
	go a.ServeAdmin(ln)
	return a, socket, admin
}

// `sigil keys info` shows the certificate the agent serves with a key.
func TestKeysInfoShowsCertificates(t *testing.T) {
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	first, socket := serveTestAgent(t, cfg, "first.sock")
	c, err := client.Dial(context.Background(), socket)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := c.ListKeys(context.Background())
	c.Close()
	first.Shutdown(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ca, err := devcerts.NewCA("release CA")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.Name != "default" {
			continue
		}
		der, err := ca.Certify(k.Public, devcerts.Leaf{CommonName: "release-signer"})
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "default.crt")
		os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
		cfg.Certificates = map[string]string{"default": path}
	}
	_, socket = serveTestAgent(t, cfg, "second.sock")

	out, _, code := run(t, "--socket", socket, "keys", "info")
	if code != exitOK || !strings.Contains(out, "CERTIFICATE") {
		t.Fatalf("keys info: exit %d\n%s", code, out)
	}
	for _, line := range strings.Split(out, "\n") {
		fields := strings.Fields(line)
		switch {
		case len(fields) == 0 || fields[0] == "NAME":
		case fields[0] == "default" && !strings.Contains(line, "CN=release-signer until "):
			t.Errorf("the default key's certificate is not shown: %q", line)
		case fields[0] != "default" && fields[len(fields)-1] != "-":
			t.Errorf("a key without a certificate shows one: %q", line)
		}
	}
	out, _, _ = run(t, "--socket", socket, "keys", "info", "--json")
	var rows []struct {
		Name        string
		Certificate *struct{ Subject, Issuer string }
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if (r.Name == "default") != (r.Certificate != nil) || r.Certificate != nil && r.Certificate.Issuer != "CN=release CA" {
			t.Errorf("keys info --json: %s certificate %+v", r.Name, r.Certificate)
		}
	}
}

// run executes the CLI in-process and returns stdout, stderr and the exit code.
func run(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	root := newRootCommand()
	var stdout, stderr bytes.Buffer
	root.SetOut(&stdout)
	root.SetErr(&stderr)
	root.SetArgs(args)
	err := root.Execute()
	code := exitOK
	if err != nil {
		code = exitUsage
		var ee *exitError
		if errors.As(err, &ee) {
			code = ee.code
		}
		stderr.WriteString(err.Error())
	}
	return stdout.String(), stderr.String(), code
}

func TestSignAndVerifyFromTheShell(t *testing.T) {
	sock := startTestAgent(t)
	dir := t.TempDir()
	in := filepath.Join(dir, "release.tar")
	os.WriteFile(in, bytes.Repeat([]byte("release bytes "), 10000), 0o644)

	out, _, code := run(t, "--socket", sock, "keys", "info", "--json")
	if code != exitOK {
		t.Fatalf("keys info exit %d", code)
	}
	var keys []struct{ Name, KID, Provider, Type string }
	if err := json.Unmarshal([]byte(out), &keys); err != nil || len(keys) != 4 {
		t.Fatalf("keys info: %v %q", err, out)
	}

	for _, k := range keys {
		t.Run(k.Name, func(t *testing.T) {
			file := in
			if k.Type == "ed25519" {
				file = filepath.Join(dir, "small.txt") // pure Ed25519 signs the file itself
				os.WriteFile(file, []byte("small message"), 0o644)
			}
			sig := filepath.Join(dir, k.Name+".sig")
			_, stderr, code := run(t, "--socket", sock, "keys", "sign", "--in", file, "--key", k.Name, "--out", sig)
			if code != exitOK {
				t.Fatalf("sign exit %d: %s", code, stderr)
			}
			if !strings.Contains(stderr, k.KID) {
				t.Fatalf("sign did not say which kid signed: %q", stderr)
			}
			stdout, stderr, code := run(t, "--socket", sock, "verify-signature", "--in", file, "--sig", sig, "--kid", k.KID)
			if code != exitOK || !strings.Contains(stdout, "signature OK") {
				t.Fatalf("verify exit %d: %s %s", code, stdout, stderr)
			}
			// Another file: the signature must not verify.
			other := filepath.Join(dir, "other")
			os.WriteFile(other, []byte("not what was signed"), 0o644)
			_, stderr, code = run(t, "--socket", sock, "verify-signature", "--in", other, "--sig", sig, "--kid", k.KID)
			if code != exitFailure || !strings.Contains(stderr, "INVALID") {
				t.Fatalf("verify of another file: exit %d %s", code, stderr)
			}
		})
	}

	// Base64 on stdout, read back by verify-signature.
	stdout, _, code := run(t, "--socket", sock, "keys", "sign", "--in", in)
	if code != exitOK {
		t.Fatal("sign to stdout")
	}
	b64 := filepath.Join(dir, "sig.b64")
	os.WriteFile(b64, []byte(stdout), 0o644)
	_, stderr, code := run(t, "--socket", sock, "verify-signature", "--in", in, "--sig", b64, "--key", "default")
	if code != exitOK {
		t.Fatalf("verify base64 signature: %s", stderr)
	}

	// --out -: the raw signature on the command's output, as the rest it
	// prints (it went to the process's stdout, past a caller's writer).
	stdout, _, code = run(t, "--socket", sock, "keys", "sign", "--in", in, "--out", "-")
	if code != exitOK || stdout == "" {
		t.Fatalf("sign --out -: exit %d, %d bytes out", code, len(stdout))
	}
	raw := filepath.Join(dir, "sig.raw")
	os.WriteFile(raw, []byte(stdout), 0o644)
	if _, stderr, code := run(t, "--socket", sock, "verify-signature", "--in", in, "--sig", raw, "--key", "default"); code != exitOK {
		t.Fatalf("verify the raw signature from --out -: exit %d %s", code, stderr)
	}

	stdout, _, code = run(t, "--socket", sock, "keys", "pubkey", "--kid", keys[0].KID)
	if code != exitOK || !strings.HasPrefix(stdout, "-----BEGIN PUBLIC KEY-----") {
		t.Fatalf("pubkey: %d %q", code, stdout)
	}
}

// An agent that refuses the connection (here: at max_conns) is an agent
// that said no (exit 4, its code), not "no agent" (exit 3).
func TestRefusedConnectionIsNotNoAgent(t *testing.T) {
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Limits.MaxConns = 1
	_, sock := serveTestAgent(t, cfg, "agent.sock")
	held, err := client.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if _, stderr, code := run(t, "--socket", sock, "keys", "info"); code != exitRefused || !strings.Contains(stderr, "UNAVAILABLE") {
		t.Fatalf("exit %d, stderr %q; want %d and UNAVAILABLE", code, stderr, exitRefused)
	}
}

func TestShellErrors(t *testing.T) {
	sock := startTestAgent(t)
	dir := t.TempDir()
	in := filepath.Join(dir, "f")
	os.WriteFile(in, []byte("x"), 0o644)
	big := filepath.Join(dir, "big")
	os.WriteFile(big, make([]byte, 100<<10), 0o644)
	cases := []struct {
		name string
		args []string
		code int
		says string
	}{
		{"unknown key", []string{"--socket", sock, "keys", "sign", "--in", in, "--key", "nope"}, exitRefused, "NOT_FOUND"},
		{"no agent", []string{"--socket", filepath.Join(dir, "none.sock"), "keys", "info"}, exitUnreachable, "no agent"},
		{"missing --in", []string{"--socket", sock, "keys", "sign"}, exitUsage, "--in"},
		{"bad --alg", []string{"--socket", sock, "keys", "sign", "--in", in, "--alg", "md5"}, exitUsage, "unknown algorithm"},
		{"wrong alg for key", []string{"--socket", sock, "keys", "sign", "--in", in, "--alg", "rsa-pss-sha256"}, exitRefused, "UNSUPPORTED_ALGORITHM"},
		{"ed25519 file too big", []string{"--socket", sock, "keys", "sign", "--in", big, "--key", "ed25519"}, exitFailure, "ECDSA or RSA"},
		// The flag whose file is missing is named: it said only
		// "stat PATH: no such file or directory".
		{"missing file", []string{"--socket", sock, "keys", "sign", "--in", filepath.Join(dir, "nope")}, exitFailure, "--in " + filepath.Join(dir, "nope") + ": cannot read it: no such file or directory"},
		// Input mistakes are told as such even with no agent to ask.
		{"bad --alg, no agent", []string{"--socket", filepath.Join(dir, "none.sock"), "keys", "sign", "--in", in, "--alg", "bogus"}, exitUsage, "unknown algorithm"},
		{"missing file, no agent", []string{"--socket", filepath.Join(dir, "none.sock"), "keys", "sign", "--in", filepath.Join(dir, "nope")}, exitFailure, "--in " + filepath.Join(dir, "nope") + ": cannot read it: no such file"},
		{"verify: missing file, no agent", []string{"--socket", filepath.Join(dir, "none.sock"), "verify-signature", "--kid", "k", "--in", filepath.Join(dir, "nope"), "--sig", in}, exitFailure, "--in " + filepath.Join(dir, "nope") + ": cannot read it: no such file"},
		{"verify: missing --sig file, no agent", []string{"--socket", filepath.Join(dir, "none.sock"), "verify-signature", "--kid", "k", "--in", in, "--sig", filepath.Join(dir, "nope")}, exitFailure, "--sig " + filepath.Join(dir, "nope") + ": cannot read it: no such file"},
		{"verify needs a key", []string{"--socket", sock, "verify-signature", "--in", in, "--sig", in}, exitUsage, "--kid"},
		// A --sig longer than any signature (the wrong file) is invalid,
		// told here: the client's frame limit refused it, and the
		// command said "agent refused: BAD_REQUEST", exit 4.
		{"verify: --sig longer than any signature", []string{"--socket", sock, "verify-signature", "--in", in, "--sig", big, "--key", "default"}, exitFailure, "signature INVALID: " + big + " holds 102400 bytes"},
		{"verify: --sig longer than any signature, no agent", []string{"--socket", filepath.Join(dir, "none.sock"), "verify-signature", "--in", in, "--sig", big, "--key", "default"}, exitFailure, "signature INVALID"},
		// The usage and the inputs come before the signature's length.
		{"verify: a long --sig and a bad --alg", []string{"--socket", sock, "verify-signature", "--in", in, "--sig", big, "--key", "default", "--alg", "bogus"}, exitUsage, "unknown algorithm"},
		{"verify: a long --sig and a missing --in", []string{"--socket", sock, "verify-signature", "--in", filepath.Join(dir, "nope"), "--sig", big, "--key", "default"}, exitFailure, "no such file"},
		// -2160h "ago" is 90 days ahead: everything would go.
		{"prune before a negative duration", []string{"--socket", sock, "audit", "prune", "--before", "-2160h"}, exitUsage, "cannot be negative"},
		{"both --key and --kid", []string{"--socket", sock, "keys", "pubkey", "--key", "a", "--kid", "b"}, exitUsage, "none of the others"},
		// A mistyped subcommand of a group used to print the group's help
		// and exit 0, having done nothing.
		{"mistyped admin subcommand", []string{"--socket", sock, "admin", "pasue", "payments/release"}, exitUsage, `unknown command "pasue" for "sigil admin"`},
		{"mistyped audit subcommand", []string{"audit", "verfy"}, exitUsage, `unknown command "verfy"`},
		{"mistyped keys subcommand", []string{"--socket", sock, "keys", "lsit"}, exitUsage, `unknown command "lsit"`},
		// No request can be answered in no time: that is the flag's
		// mistake, not an agent that "did not answer" (exit 3).
		{"zero --timeout", []string{"--socket", sock, "--timeout", "0s", "keys", "info"}, exitUsage, "--timeout must be positive"},
		{"negative --timeout", []string{"--socket", sock, "--timeout", "-1s", "keys", "sign", "--in", in}, exitUsage, "--timeout must be positive"},
		// Told before the agent is asked, and said once: it read
		// "read DIR: read DIR: is a directory", after the dial.
		{"--in a directory", []string{"--socket", sock, "keys", "sign", "--in", dir}, exitFailure, dir + " is a directory, not a file"},
		{"--in a directory, no agent", []string{"--socket", filepath.Join(dir, "none.sock"), "keys", "sign", "--in", dir}, exitFailure, "is a directory"},
		{"verify: --in a directory", []string{"--socket", sock, "verify-signature", "--in", dir, "--sig", in, "--key", "default"}, exitFailure, "is a directory"},
		// An --out that cannot be written is told before the agent signs:
		// after, the signature was journaled, counted against the slot's
		// quota, and lost.
		{"--out in a missing directory, no agent", []string{"--socket", filepath.Join(dir, "none.sock"), "keys", "sign", "--in", in, "--out", filepath.Join(dir, "nope", "f.sig")}, exitFailure, "no such file or directory"},
		{"--out a directory", []string{"--socket", sock, "keys", "sign", "--in", in, "--out", dir}, exitFailure, "is a directory"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, code := run(t, tc.args...)
			if code != tc.code || !strings.Contains(stderr, tc.says) {
				t.Fatalf("exit %d (want %d), stderr %q (want %q)", code, tc.code, stderr, tc.says)
			}
		})
	}
}

// Why no agent answered is told as it is: a socket that accepts and never
// says Hello, or a default socket dir the user cannot trust, is not "no
// agent, start one".
func TestUnreachableAgentSaysWhy(t *testing.T) {
	dir, err := os.MkdirTemp("", "sigil-t")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	silent := filepath.Join(dir, "silent.sock")
	ln, err := net.Listen("unix", silent)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // held open, never answered
		}
	}()
	_, stderr, code := run(t, "--socket", silent, "--timeout", "300ms", "keys", "info")
	if code != exitUnreachable || !strings.Contains(stderr, "did not answer within --timeout") || strings.Contains(stderr, "start one") {
		t.Errorf("silent agent: exit %d, stderr %q", code, stderr)
	}

	t.Setenv("XDG_RUNTIME_DIR", "")
	t.Setenv("TMPDIR", dir)
	t.Setenv(proto.SocketEnv, "")
	open := filepath.Dir(proto.DefaultSocketPath())
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(open, 0o777)
	_, stderr, code = run(t, "keys", "info")
	if code != exitUnreachable || !strings.Contains(stderr, "refusing to trust an agent") || strings.Contains(stderr, "%!") {
		t.Errorf("untrusted default socket dir: exit %d, stderr %q", code, stderr)
	}
}

// `keys sign --key SLOT` applies that slot's policy even when another slot
// of the tenant has the same key: a paused slot refuses, the open one signs.
func TestKeysSignAppliesTheNamedSlotsPolicy(t *testing.T) {
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.DefaultKey = ""
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(cfg.Policy, []byte(fmt.Sprintf(`
tenants:
  - name: ops
    identities: {unix_uids: [%d]}
    slots:
      - {name: aaa, key: default}
      - {name: zzz, key: default, policy: {paused: true}}
`, os.Getuid())), 0o600)
	_, sock := serveTestAgent(t, cfg, "agent.sock")
	in := filepath.Join(t.TempDir(), "f")
	os.WriteFile(in, []byte("release"), 0o644)
	if _, stderr, code := run(t, "--socket", sock, "keys", "sign", "--in", in, "--key", "zzz"); code != exitRefused || !strings.Contains(stderr, "PAUSED") {
		t.Fatalf("sign with the paused slot: exit %d, stderr %q; want refused, PAUSED", code, stderr)
	}
	if _, stderr, code := run(t, "--socket", sock, "keys", "sign", "--in", in, "--key", "aaa"); code != exitOK {
		t.Fatalf("sign with the open slot: exit %d, stderr %q", code, stderr)
	}
}

// A request the client refuses before sending any of it (too large for one
// frame, a rotation at the epoch) never reached the agent: every command
// says so and exits 1, a local failure, as verify-signature does for a
// --sig longer than any signature. They said "agent refused: BAD_REQUEST",
// exit 4, which sends an operator to the agent's log for nothing.
func TestRequestRefusedHereIsNotTheAgents(t *testing.T) {
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	_, sock, admin := serveTestAgentWithAdmin(t, cfg)
	dir := t.TempDir()
	msg := filepath.Join(dir, "msg") // as long as pure Ed25519 signs here
	os.WriteFile(msg, bytes.Repeat([]byte{'m'}, maxMessage), 0o644)
	sig := filepath.Join(dir, "sig") // as long as a signature may be; not base64
	os.WriteFile(sig, bytes.Repeat([]byte{0xff}, maxSignature), 0o644)
	huge := strings.Repeat("x", proto.DefaultMaxFrame)
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"keys pubkey", []string{"--socket", sock, "keys", "pubkey", "--kid", huge}},
		{"keys sign", []string{"--socket", sock, "keys", "sign", "--in", msg, "--kid", huge}},
		// The message and the signature each fit, together they do not.
		{"verify-signature", []string{"--socket", sock, "verify-signature", "--in", msg, "--sig", sig, "--key", "ed25519"}},
		{"admin pause", []string{"admin", "pause", huge, "--admin-socket", admin}},
		{"rotate --at the epoch", []string{"rotate", "a/b", "--at", "1970-01-01T00:00:00Z", "--admin-socket", admin}},
		{"rep export", []string{"rep", "export", huge, "--out", dir, "--admin-socket", admin}},
		{"audit tail", []string{"audit", "tail", "--tenant", huge, "--admin-socket", admin}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, code := run(t, tc.args...)
			stderr = strings.ReplaceAll(stderr, huge, "HUGE")
			if code != exitFailure || !strings.Contains(stderr, "refused by the client, not sent") || strings.Contains(stderr, "agent refused") {
				t.Fatalf("exit %d (want %d), stderr %q: want a request not sent, not the agent's refusal", code, exitFailure, stderr)
			}
		})
	}
}

// The admin and rotation commands print their answer through the
// command's writer, as every other command does: output captured there
// (a test, a program embedding the command) sees it. They printed to the
// process's standard output instead.
func TestAdminAnswersGoToTheCommandsOutput(t *testing.T) {
	r := newRotationSetup(t, "ecdsa-p256", 2)
	cfg, err := agent.LoadConfig(r.config)
	if err != nil {
		t.Fatal(err)
	}
	_, _, admin := serveTestAgentWithAdmin(t, cfg)
	later := time.Now().Add(48 * time.Hour).UTC().Format(time.RFC3339)
	for _, tc := range []struct {
		args []string // then --admin-socket
		says string
	}{
		{[]string{"admin", "pause", "payments/release"}, "pause payments/release: "},
		{[]string{"admin", "resume", "payments/release"}, "resume payments/release: "},
		{[]string{"admin", "reload"}, "reload: "},
		{[]string{"rotate", "payments/release"}, "rotate payments/release: "},
		{[]string{"admin", "rotate", "payments/release", "--at", later}, "rotate payments/release: "},
		{[]string{"rollback", "payments/release"}, "rollback payments/release: "},
		{[]string{"incident", "drill", "payments/release"}, "incident drill payments/release: "},
		{[]string{"rep", "export", "payments/release", "--out", t.TempDir()}, "rep export payments/release: wrote "},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, stderr, code := run(t, append(tc.args, "--admin-socket", admin)...)
			if code != exitOK || !strings.HasPrefix(out, tc.says) {
				t.Fatalf("exit %d, stdout %q, stderr %q; want exit 0 and stdout starting %q", code, out, stderr, tc.says)
			}
		})
	}
}

// Output that cannot be written (a full disk, here /dev/full) fails the
// command: a script must not take a signature it never got for one written.
func TestUnwritableOutputFails(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Skip("no /dev/full")
	}
	defer full.Close()
	bin := buildSigil(t)
	sock := startTestAgent(t)
	in := filepath.Join(t.TempDir(), "f")
	os.WriteFile(in, []byte("release"), 0o644)
	for _, args := range [][]string{
		{"version"},
		{"--socket", sock, "keys", "sign", "--in", in},
		{"--socket", sock, "keys", "pubkey"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			cmd := exec.Command(bin, args...)
			cmd.Stdout = full
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != exitFailure || !strings.Contains(stderr.String(), "write to standard output") {
				t.Fatalf("exit %v, stderr %q; want exit %d naming the write", err, stderr.String(), exitFailure)
			}
		})
	}
}

// An --out that cannot be written is refused before the agent is asked:
// the signature used to be made, journaled and counted against the slot's
// quota, and then lost. A --out that can be written gets the signature.
func TestUnwritableOutSignsNothing(t *testing.T) {
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	_, sock, admin := serveTestAgentWithAdmin(t, cfg)
	ac, err := client.Dial(context.Background(), admin)
	if err != nil {
		t.Fatal(err)
	}
	defer ac.Close()
	records := func() int {
		t.Helper()
		recs, err := ac.AuditTail(context.Background(), "", 0, 1000)
		if err != nil {
			t.Fatal(err)
		}
		return len(recs)
	}
	dir := t.TempDir()
	in := filepath.Join(dir, "f")
	os.WriteFile(in, []byte("release"), 0o644)
	for _, tc := range []struct {
		name, out, says string
		code, records   int
	}{
		{"a missing directory", filepath.Join(dir, "nope", "f.sig"), "no such file or directory", exitFailure, 0},
		{"a directory", dir, "is a directory", exitFailure, 0},
		{"a new file", filepath.Join(dir, "f.sig"), "", exitOK, 1},
		{"an existing file", filepath.Join(dir, "f.sig"), "", exitOK, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := records()
			_, stderr, code := run(t, "--socket", sock, "keys", "sign", "--in", in, "--out", tc.out)
			if code != tc.code || !strings.Contains(stderr, tc.says) {
				t.Fatalf("exit %d, stderr %q; want exit %d saying %q", code, stderr, tc.code, tc.says)
			}
			if got := records() - before; got != tc.records {
				t.Fatalf("%d audit records, want %d", got, tc.records)
			}
			if tc.code == exitOK {
				if _, stderr, code := run(t, "--socket", sock, "verify-signature", "--in", in, "--sig", tc.out, "--key", "default"); code != exitOK {
					t.Fatalf("verify the signature in --out: exit %d %s", code, stderr)
				}
			}
		})
	}
}

// --timeout bounds each request to the agent, not the reading of the input:
// a file that trickles in over longer than the timeout still gets signed.
func TestTimeoutIsPerRequestNotForTheInput(t *testing.T) {
	sock := startTestAgent(t)
	fifo := filepath.Join(t.TempDir(), "slow")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	go func() {
		f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err != nil {
			return
		}
		defer f.Close()
		f.Write([]byte("a slow "))
		time.Sleep(1500 * time.Millisecond)
		f.Write([]byte("pipe"))
	}()
	stdout, stderr, code := run(t, "--socket", sock, "--timeout", "1s", "keys", "sign", "--in", fifo)
	if code != exitOK || stdout == "" {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
}

// eval "$(sigil ssh-agent-env --config FILE)" sets SSH_AUTH_SOCK to the configured path,
// whatever it holds, and runs nothing else: the path used to be printed
// unquoted, so a space split it and a ";" or "$(" ran the rest.
func TestSSHAgentEnvIsShellSafe(t *testing.T) {
	for _, name := range []string{"my keys", "a;touch PWNED", "$(touch PWNED)", "it's"} {
		dir := t.TempDir()
		sock := filepath.Join(dir, name, "ssh.sock")
		config := writeEd25519Config(t, dir, fmt.Sprintf("ssh_agent_socket: %q\n", sock))
		out, stderr, code := run(t, "ssh-agent-env", "--config", config)
		if code != exitOK {
			t.Fatalf("%q: exit %d: %s", name, code, stderr)
		}
		sh := exec.Command("sh", "-c", out+`printf %s "$SSH_AUTH_SOCK"`)
		sh.Dir = dir
		got, err := sh.CombinedOutput()
		if err != nil || string(got) != sock {
			t.Errorf("eval of %q: SSH_AUTH_SOCK=%q (%v), want %q", out, got, err, sock)
		}
		if _, err := os.Stat(filepath.Join(dir, "PWNED")); err == nil {
			t.Errorf("eval of %q ran a command", out)
		}
	}
}

// `keys sign --in FIFO`: the input is checked before the agent is asked,
// without opening a named pipe (which would lose what its writer sent and
// leave the real read waiting).
func TestSignFromANamedPipe(t *testing.T) {
	sock := startTestAgent(t)
	fifo := filepath.Join(t.TempDir(), "in")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	go func() {
		f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err != nil {
			return
		}
		f.Write([]byte("release v1.2.3"))
		f.Close()
	}()
	done := make(chan int, 1)
	go func() {
		_, _, code := run(t, "--socket", sock, "keys", "sign", "--in", fifo)
		done <- code
	}()
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("keys sign --in FIFO: exit %d", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("keys sign --in FIFO hung")
	}
}

// The help says what the commands do: verify-signature has no default key
// (without --kid or --key it is a usage error), and ssh-agent-env needs the
// configuration that sets ssh_agent_socket (the embedded default sets
// none). Both helps used to promise otherwise.
func TestHelpMatchesBehaviour(t *testing.T) {
	for _, tc := range []struct {
		name        string
		args        []string
		code        int
		says, never string
	}{
		{"verify-signature --key", []string{"verify-signature", "--help"}, exitOK, "--kid is required", "default: the agent's default key"},
		{"verify-signature without a key", []string{"verify-signature", "--in", "f", "--sig", "s"}, exitUsage, "--kid KID (or --key NAME)", ""},
		{"verify-signature exit status", []string{"verify-signature", "--help"}, exitOK, "2 usage; 3 no agent reachable; 4 the agent refused", ""},
		// The exit statuses README.md lists, in the help of the commands
		// that did not say them.
		{"sigil --help: exit status", []string{"--help"}, exitOK, "5 audit verify could not check; 78 the agent did not start", ""},
		{"rep export --help: exit status", []string{"rep", "export", "--help"}, exitOK, "1 the files could not be written", ""},
		{"keys sign --key", []string{"keys", "sign", "--help"}, exitOK, "default: the agent's default key", ""},
		{"sigil help: ssh-agent-env", []string{"help"}, exitOK, `eval "$(sigil ssh-agent-env --config FILE)"`, "$(sigil ssh-agent-env)"},
		{"ssh-agent-env --help", []string{"ssh-agent-env", "--help"}, exitOK, "sigil ssh-agent-env --config FILE", "$(sigil ssh-agent-env)"},
		{"ssh-agent-env without --config", []string{"ssh-agent-env"}, exitFailure, "--config FILE", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := run(t, tc.args...)
			if code != tc.code || !strings.Contains(out+stderr, tc.says) || tc.never != "" && strings.Contains(out+stderr, tc.never) {
				t.Fatalf("exit %d (want %d), want %q and not %q in\n%s%s", code, tc.code, tc.says, tc.never, out, stderr)
			}
		})
	}
}

// listenUnix serves path with fn on each accepted connection until the test
// ends.
func listenUnix(t *testing.T, path string, fn func(net.Conn)) {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fn(c)
		}
	}()
}

// clientPrefix matches the client package's own leads, which after the
// command's words repeat what main's one "sigil: " and the command said:
// "sigil: ", a code's name ("UNAVAILABLE: connect to the agent: ..."), and
// the nested wrapping they replaced ("sigil: connect to agent at ...",
// "sigil Hello: ..."); "'sigil agent'" in a hint is not one.
var clientPrefix = regexp.MustCompile(`sigil( [A-Za-z]+)?:|UNAVAILABLE:|DEADLINE_EXCEEDED:`)

// A connection error says what happened once: "no agent answered at X:
// sigil: connect to agent at X: ..." said the prefix and the address twice,
// and the --timeout path "sigil: hello: sigil Hello: ..." after its own
// words.
func TestConnectionErrorsSayItOnce(t *testing.T) {
	dir := shortSocketDir(t)
	dead := filepath.Join(dir, "dead.sock")
	silent := filepath.Join(dir, "silent.sock")
	var held []net.Conn
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	listenUnix(t, silent, func(c net.Conn) { held = append(held, c) }) // never says Hello
	closing := filepath.Join(dir, "closing.sock")
	listenUnix(t, closing, func(c net.Conn) { c.Close() })
	untrusted := t.TempDir()

	for _, tc := range []struct {
		name string
		env  string // TMPDIR, for a default socket dir
		args []string
		code int
		says string
	}{
		{"keys: no agent", "", []string{"--socket", dead, "keys", "info"}, exitUnreachable, "no agent at " + dead + " (start one"},
		{"keys: silent agent", "", []string{"--socket", silent, "--timeout", "300ms", "keys", "info"}, exitUnreachable, "did not answer within --timeout (300ms)"},
		{"keys: closed at once", "", []string{"--socket", closing, "keys", "info"}, exitUnreachable, "no agent at " + closing},
		{"keys: untrusted socket dir", untrusted, []string{"keys", "info"}, exitUnreachable, "refusing to trust an agent in the default socket dir: "},
		{"audit verify: no agent", "", []string{"audit", "verify", "--admin-socket", dead}, exitUnreachable, "no agent answered at " + dead + ": "},
		{"audit verify: closed at once", "", []string{"audit", "verify", "--admin-socket", closing}, exitUnreachable, "no agent answered at " + closing + ": "},
		{"audit tail: no agent", "", []string{"audit", "tail", "--admin-socket", dead}, exitUnreachable, "no agent answered at " + dead + ": "},
		{"audit tail -f: no agent", "", []string{"audit", "tail", "-f", "--admin-socket", dead}, exitUnreachable, "none answered at " + dead + ": "},
		{"audit export: no agent", "", []string{"audit", "export", "--admin-socket", dead}, exitUnreachable, "no agent answered at " + dead + ": "},
		{"audit prune: no agent", "", []string{"audit", "prune", "--before", "24h", "--admin-socket", dead}, exitUnreachable, "no agent answered at " + dead + ": "},
		{"admin: no agent", "", []string{"admin", "pause", "a/b", "--admin-socket", dead}, exitUnreachable, "no agent admin socket at " + dead + ": "},
		{"admin: closed at once", "", []string{"admin", "reload", "--admin-socket", closing}, exitUnreachable, "no agent admin socket at " + closing + ": "},
		{"rep export: no agent", "", []string{"rep", "export", "a/b", "--admin-socket", dead}, exitUnreachable, "no agent admin socket at " + dead + ": "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("XDG_RUNTIME_DIR", "")
				t.Setenv("TMPDIR", tc.env)
				t.Setenv(proto.SocketEnv, "")
				open := filepath.Dir(proto.DefaultSocketPath())
				os.Mkdir(open, 0o777)
				os.Chmod(open, 0o777)
			}
			_, stderr, code := run(t, tc.args...)
			if code != tc.code || !strings.Contains(stderr, tc.says) || clientPrefix.MatchString(stderr) {
				t.Fatalf("exit %d (want %d), want %q said once:\n%s", code, tc.code, tc.says, stderr)
			}
		})
	}

	// An agent that stops under 'audit tail -f': the next poll's redial
	// finds none ("audit tail: sigil AuditTail: reconnect: sigil: connect
	// to agent at ..." before).
	t.Run("audit tail -f: the agent stops", func(t *testing.T) {
		cfg := agent.DefaultConfig()
		cfg.DataDir = t.TempDir()
		a, _, admin := serveTestAgentWithAdmin(t, cfg)
		type result struct {
			stderr string
			code   int
		}
		done := make(chan result, 1)
		go func() {
			_, stderr, code := run(t, "audit", "tail", "-f", "--admin-socket", admin)
			done <- result{stderr, code}
		}()
		time.Sleep(700 * time.Millisecond) // a poll or two
		a.Shutdown(context.Background())
		select {
		case r := <-done:
			if r.code != exitUnreachable || !strings.Contains(r.stderr, "audit tail: connection to the agent failed: ") || clientPrefix.MatchString(r.stderr) {
				t.Fatalf("exit %d (want %d), stderr %q", r.code, exitUnreachable, r.stderr)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("audit tail -f went on after the agent stopped")
		}
	})
}

// A reply the client cannot read came from something at the socket: it
// is not "no agent reachable" (exit 3) but an answer of no use, exit 4,
// with the client's INTERNAL.
func TestUnreadableReplyIsExit4(t *testing.T) {
	socket := filepath.Join(shortSocketDir(t), "garbled.sock")
	listenUnix(t, socket, func(nc net.Conn) {
		go fakeAgent(nc, func(req *proto.Request) *proto.Response {
			// A public key that does not parse.
			return &proto.Response{Code: proto.OK, Key: "default", KID: "k1", KeyType: "ecdsa-p256", Pub: []byte("not a key")}
		})
	})
	_, stderr, code := run(t, "--socket", socket, "keys", "pubkey", "--key", "default")
	if code != exitRefused || !strings.Contains(stderr, "INTERNAL") {
		t.Fatalf("exit %d (want %d) and INTERNAL, stderr:\n%s", code, exitRefused, stderr)
	}
}

// answerHelloOnly is an agent that says Hello and then answers nothing:
// a wedged agent.
func answerHelloOnly(nc net.Conn) { fakeAgent(nc, nil) }

// fakeAgent says Hello on nc, then answers each request with answer's
// reply (its ID set here); a nil answer, or a nil reply, answers nothing.
func fakeAgent(nc net.Conn, answer func(*proto.Request) *proto.Response) {
	br := bufio.NewReaderSize(nc, proto.DefaultMaxFrame+proto.FrameHeaderLen)
	codec := proto.NewCodec()
	for {
		payload, err := proto.ReadFrame(br, nil, proto.DefaultMaxFrame)
		if err != nil {
			return
		}
		var req proto.Request
		if codec.DecodeRequest(payload, &req) != nil {
			return
		}
		var resp *proto.Response
		switch {
		case req.Op == proto.OpHello:
			resp = &proto.Response{Code: proto.OK, Version: proto.Version, Features: proto.FeaturePipelining}
		case answer != nil:
			resp = answer(&req)
		}
		if resp == nil {
			continue
		}
		resp.ID = req.ID
		frame, err := codec.AppendResponseFrame(nil, resp)
		if err != nil {
			return
		}
		if _, err := nc.Write(frame); err != nil {
			return
		}
	}
}

// Every command that talks to the agent gives up on one that does not
// answer, and says so. A socket that accepts and never says Hello (a
// wedged agent, a listener that is not an agent) is given --timeout and is
// exit 3, as for 'keys sign'; an agent that said Hello and then does not
// answer a request is exit 4, DEADLINE_EXCEEDED, after --timeout, or after
// the longer wait of the requests the agent gives more time (state
// changes, audit verify and prune; shortened here). The audit commands
// used to dial with no deadline at all, so 'audit verify --admin-socket S'
// hung for good, and the admin commands gave a silent socket 3 minutes.
func TestEveryCommandGivesUpOnASilentAgent(t *testing.T) {
	defer func(a, b time.Duration) { adminChangeWait, auditLongWait = a, b }(adminChangeWait, auditLongWait)
	adminChangeWait, auditLongWait = 700*time.Millisecond, 900*time.Millisecond
	const timeout = 300 * time.Millisecond

	dir := shortSocketDir(t)
	var mu sync.Mutex
	var held []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	hold := func(c net.Conn) {
		mu.Lock()
		held = append(held, c)
		mu.Unlock()
	}
	silent := filepath.Join(dir, "silent.sock")
	listenUnix(t, silent, hold)
	wedged := filepath.Join(dir, "wedged.sock")
	listenUnix(t, wedged, func(c net.Conn) { hold(c); go answerHelloOnly(c) })
	in := filepath.Join(t.TempDir(), "f")
	os.WriteFile(in, []byte("release"), 0o644)
	later := time.Now().Add(48 * time.Hour).UTC().Format(time.RFC3339)

	for _, tc := range []struct {
		args []string // then --socket or --admin-socket
		wait time.Duration
	}{
		{[]string{"keys", "info"}, timeout},
		{[]string{"keys", "pubkey"}, timeout},
		{[]string{"keys", "sign", "--in", in}, timeout},
		{[]string{"verify-signature", "--in", in, "--sig", in, "--kid", "k"}, timeout},
		{[]string{"audit", "verify"}, auditLongWait},
		{[]string{"audit", "tail"}, timeout},
		{[]string{"audit", "tail", "-f"}, timeout},
		{[]string{"audit", "export"}, timeout},
		{[]string{"audit", "prune", "--before", "24h"}, auditLongWait},
		{[]string{"admin", "pause", "a/b"}, adminChangeWait},
		{[]string{"admin", "resume", "a/b"}, adminChangeWait},
		{[]string{"admin", "reload"}, adminChangeWait},
		{[]string{"admin", "rotate", "a/b"}, adminChangeWait},
		{[]string{"admin", "rollback", "a/b"}, adminChangeWait},
		{[]string{"admin", "drill", "a/b"}, adminChangeWait},
		{[]string{"rotate", "a/b"}, adminChangeWait},
		{[]string{"rotate", "a/b", "--at", later}, adminChangeWait},
		{[]string{"rollback", "a/b"}, adminChangeWait},
		{[]string{"incident", "drill", "a/b"}, adminChangeWait},
		{[]string{"rep", "export", "a/b", "--out", t.TempDir()}, timeout},
	} {
		for _, agent := range []struct {
			name, socket string
			code         int
			says         string
			wait         time.Duration
		}{
			{"silent", silent, exitUnreachable, "the agent at " + silent + " did not answer within --timeout (300ms)", timeout},
			{"wedged", wedged, exitRefused, "DEADLINE_EXCEEDED: no answer within ", tc.wait},
		} {
			args := append([]string{"--timeout", timeout.String()}, tc.args...)
			if tc.args[0] == "keys" || tc.args[0] == "verify-signature" {
				args = append(args, "--socket", agent.socket)
			} else {
				args = append(args, "--admin-socket", agent.socket)
			}
			t.Run(agent.name+" "+strings.Join(tc.args, " "), func(t *testing.T) {
				type result struct {
					stderr string
					code   int
				}
				done := make(chan result, 1)
				start := time.Now()
				go func() {
					_, stderr, code := run(t, args...)
					done <- result{stderr, code}
				}()
				select {
				case r := <-done:
					took := time.Since(start)
					says := agent.says
					if agent.code == exitRefused {
						says += agent.wait.String()
						if agent.wait == timeout {
							says = agent.says + "the --timeout"
						}
					}
					if r.code != agent.code || !strings.Contains(r.stderr, says) {
						t.Fatalf("exit %d (want %d), stderr %q, want %q", r.code, agent.code, r.stderr, says)
					}
					if took < agent.wait || took > agent.wait+2*time.Second {
						t.Fatalf("gave up after %v, want about %v", took, agent.wait)
					}
				case <-time.After(agent.wait + 5*time.Second):
					t.Fatalf("still waiting after %v", agent.wait+5*time.Second)
				}
			})
		}
	}

	// bench --addr measures an agent already running: it must find one
	// there first. Its workers' requests are the harness's own: a wedged
	// agent fails its scenario Options.Drain after a phase (package
	// bench's TestRunFailsAScenarioThatStopsAnswering).
	t.Run("silent bench --addr", func(t *testing.T) {
		done := make(chan int, 1)
		var stderr string
		go func() {
			var code int
			_, stderr, code = run(t, "--timeout", timeout.String(), "bench", "--addr", silent, "--key", "default", "--quick")
			done <- code
		}()
		select {
		case code := <-done:
			if code != exitUnreachable || !strings.Contains(stderr, "did not answer within --timeout (300ms)") {
				t.Fatalf("exit %d (want %d), stderr %q", code, exitUnreachable, stderr)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("bench --addr still waiting on a silent socket after 10s")
		}
	})
	// Its flags are checked before it dials: a usage error is one, not
	// "no agent" after --timeout.
	for name, args := range map[string][]string{
		"a bad --conns": {"bench", "--addr", silent, "--key", "default", "--conns", "abc"},
		"no --key":      {"bench", "--addr", silent},
	} {
		t.Run(name, func(t *testing.T) {
			if _, stderr, code := run(t, append([]string{"--timeout", timeout.String()}, args...)...); code != exitUsage {
				t.Fatalf("exit %d (want %d), stderr %q", code, exitUsage, stderr)
			}
		})
	}
}

// maxSignature, past which verify-signature calls a signature invalid
// unasked, is the longest signature of the key types the agent serves: a
// new type (RSA-8192, say) must raise it, or its signatures would be.
func TestMaxSignatureCoversEveryKeyType(t *testing.T) {
	longest := map[providers.KeyType]int{
		providers.KeyECDSAP256: 72, providers.KeyECDSAP384: 104, // ASN.1 DER, at most
		providers.KeyRSA2048: 256, providers.KeyRSA3072: 384, providers.KeyRSA4096: 512,
		providers.KeyEd25519: 64,
	}
	for _, kt := range providers.KeyTypes {
		n, ok := longest[kt]
		if !ok {
			t.Errorf("key type %s: how long are its signatures? maxSignature is %d", kt, maxSignature)
		} else if n > maxSignature {
			t.Errorf("key type %s signs with up to %d bytes, more than maxSignature (%d)", kt, n, maxSignature)
		}
	}
}

// `sigil --help` and `sigil agent --help` list the same causes of exit 78
// (README.md: "`sigil --help` says the same"). The root's lacked "the
// evidence key lost while its packs are kept", which the agent's had.
func TestExit78CausesAgreeInEveryHelp(t *testing.T) {
	causes := func(args []string, lead string) []string {
		t.Helper()
		out, stderr, code := run(t, args...)
		text := strings.Join(strings.Fields(out), " ")
		_, list, ok := strings.Cut(text, lead)
		list, _, closed := strings.Cut(list, ")")
		if code != exitOK || !ok || !closed {
			t.Fatalf("%v: exit %d, no list after %q\n%s%s", args, code, lead, out, stderr)
		}
		c := strings.Split(list, ", ")
		slices.Sort(c)
		return c
	}
	root := causes([]string{"--help"}, "78 the agent did not start and will not until an operator acts (")
	agent := causes([]string{"agent", "--help"}, "A start that cannot succeed until an operator acts (")
	if !slices.Equal(root, agent) {
		t.Fatalf("exit 78 causes differ:\nsigil --help:       %q\nsigil agent --help: %q", root, agent)
	}
}

// A reload an admin asks for is journaled with who asked, as a pause is
// ("by uid:N gid:G"), taken or refused: its reload-policy record said
// only "policy HASH" or "refused: …", peer "agent", so the journal could
// not tell an admin's reload from a SIGHUP.
func TestAdminReloadIsJournaledWithWhoAsked(t *testing.T) {
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	good := fmt.Sprintf("admins: {unix_uids: [%d]}\ntenants:\n  - name: ops\n    identities: {unix_uids: [%d]}\n    slots: [{name: release, key: default}]\n", os.Getuid(), os.Getuid())
	os.WriteFile(cfg.Policy, []byte(good), 0o600)
	_, _, admin := serveTestAgentWithAdmin(t, cfg)

	if _, stderr, code := run(t, "admin", "reload", "--admin-socket", admin); code != exitOK {
		t.Fatalf("reload: exit %d %s", code, stderr)
	}
	os.WriteFile(cfg.Policy, []byte(good+"    pasued: true\n"), 0o600)
	if _, stderr, code := run(t, "admin", "reload", "--admin-socket", admin); code != exitRefused || !strings.Contains(stderr, "pasued") {
		t.Fatalf("reload of a broken policy: exit %d %s, want %d naming the field", code, stderr, exitRefused)
	}
	out, stderr, code := run(t, "audit", "export", "--admin-socket", admin)
	if code != exitOK {
		t.Fatalf("export: exit %d %s", code, stderr)
	}
	by := fmt.Sprintf("by uid:%d gid:%d", os.Getuid(), os.Getgid())
	var details []string
	for line := range strings.Lines(out) {
		var r struct {
			Op       string `json:"op"`
			CodeName string `json:"code_name"`
			Detail   string `json:"detail"`
		}
		json.Unmarshal([]byte(line), &r)
		if r.Op == "reload-policy" {
			details = append(details, r.CodeName+" "+r.Detail)
		}
	}
	if len(details) != 2 || !strings.HasPrefix(details[0], "OK ") || !strings.HasPrefix(details[1], "BAD_REQUEST ") ||
		!strings.Contains(details[0], by) || !strings.Contains(details[1], by) {
		t.Fatalf("reload-policy records %q, want an OK and a BAD_REQUEST, each saying %q", details, by)
	}
}
