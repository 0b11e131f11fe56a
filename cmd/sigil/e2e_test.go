package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
	sshagent "golang.org/x/crypto/ssh/agent"
)

// buildSigil compiles the binary once per test run.
func buildSigil(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "sigil")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// writeEd25519Config writes dir/sigil.yaml: one software Ed25519 key "ed"
// (the default), state in dir/state, then the extra top-level YAML.
func writeEd25519Config(t *testing.T, dir string, extra ...string) string {
	t.Helper()
	config := filepath.Join(dir, "sigil.yaml")
	err := os.WriteFile(config, []byte(fmt.Sprintf(`
data_dir: %s
default_key: ed
providers:
  - id: soft
    type: software
    keys: [{name: ed, type: ed25519}]
`, filepath.Join(dir, "state"))+strings.Join(extra, "")), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	return config
}

type agentProcess struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	socket string
}

func startAgentProcess(t *testing.T, bin, config, socket string) *agentProcess {
	t.Helper()
	return startAgentProcessEnv(t, bin, config, socket, nil)
}

// startAgentProcessEnv starts the agent with env as its whole environment
// (nil: this process's).
func startAgentProcessEnv(t *testing.T, bin, config, socket string, env []string) *agentProcess {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "agent", "--config", config, "--socket", socket)
	cmd.Env = env
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &agentProcess{cmd: cmd, stderr: &stderr, socket: socket}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return p
}

func (p *agentProcess) waitReady(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", p.socket); err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Read stderr only once exec has stopped writing to it: after Wait.
	p.cmd.Process.Kill()
	p.cmd.Wait()
	t.Fatalf("agent did not start:\n%s", p.stderr.String())
}

// waitExit waits for an agent that is expected to fail its start and
// returns its exit status and what it wrote to stderr.
func (p *agentProcess) waitExit(t *testing.T) (int, string) {
	t.Helper()
	waited := make(chan error, 1)
	go func() { waited <- p.cmd.Wait() }()
	var err error
	select {
	case err = <-waited:
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-waited // stderr is whole, and no longer written, after Wait
		t.Fatalf("the agent did not exit:\n%s", p.stderr)
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, p.stderr.String()
}

func runBin(t *testing.T, bin string, args ...string) (string, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

// The agent as its own process on a SoftHSM2 token, used from the shell the
// way an operator would: keys info, sign, verify, a killed agent, a restart
// over its stale socket, SIGTERM, and a wrong PIN at start-up.
func TestAgentProcessOnSoftHSM(t *testing.T) {
	tok := softhsmtest.New(t, "e2e")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256, providers.KeyEd25519)
	bin := buildSigil(t)
	dir := t.TempDir()
	pinFile := tok.PINFile(t)
	config := filepath.Join(dir, "sigil.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf(`
data_dir: %s
default_key: release
providers:
  - id: hsm
    type: pkcs11
    module: %s
    token_label: %s
    pin_file: %s
    keys:
      - {name: release, uri: %q}
      - {name: ssh, uri: %q}
`, filepath.Join(dir, "state"), tok.Module, tok.Label, pinFile, keys[providers.KeyECDSAP256].URI, keys[providers.KeyEd25519].IDURI)), 0o600)
	sockDir, _ := os.MkdirTemp("", "sigil-e2e")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "agent.sock")

	agent := startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)

	out, stderr, code := runBin(t, bin, "--socket", socket, "keys", "info")
	if code != 0 || !strings.Contains(out, "release") || !strings.Contains(out, "ssh") {
		t.Fatalf("keys info: %d %s %s", code, out, stderr)
	}
	in := filepath.Join(dir, "artifact")
	os.WriteFile(in, bytes.Repeat([]byte("artifact "), 5000), 0o644)
	sig := filepath.Join(dir, "artifact.sig")
	_, stderr, code = runBin(t, bin, "--socket", socket, "keys", "sign", "--in", in, "--out", sig)
	if code != 0 {
		t.Fatalf("sign: %d %s", code, stderr)
	}
	kid := strings.Fields(strings.SplitAfter(stderr, "(kid ")[1])[0]
	kid = strings.TrimSuffix(kid, ",")
	out, stderr, code = runBin(t, bin, "--socket", socket, "verify-signature", "--in", in, "--sig", sig, "--kid", kid)
	if code != 0 || !strings.Contains(out, "signature OK") {
		t.Fatalf("verify: %d %s %s", code, out, stderr)
	}
	// The environment variable works as the socket.
	cmd := exec.Command(bin, "keys", "sign", "--in", in, "--key", "ssh")
	cmd.Env = append(os.Environ(), "SIGIL_SOCK="+socket)
	os.WriteFile(in, []byte("small enough for pure Ed25519"), 0o644)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sign via SIGIL_SOCK: %v %s", err, out)
	}

	// A killed agent: the shell gets "unreachable", not a hang.
	agent.cmd.Process.Kill()
	agent.cmd.Wait()
	_, stderr, code = runBin(t, bin, "--socket", socket, "keys", "info")
	if code != exitUnreachable {
		t.Fatalf("with the agent killed: exit %d %s", code, stderr)
	}
	// A new agent replaces the stale socket, and stops cleanly on SIGTERM.
	agent = startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)
	if _, stderr, code := runBin(t, bin, "--socket", socket, "keys", "info"); code != 0 {
		t.Fatalf("after restart: %s", stderr)
	}
	agent.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- agent.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("agent exit after SIGTERM: %v\n%s", err, agent.stderr)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("agent ignored SIGTERM")
	}
	if _, err := os.Stat(socket); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after a clean stop: %v", err)
	}

	// A wrong PIN: the agent refuses to start, says PIN_INCORRECT, shows no PIN.
	os.WriteFile(pinFile, []byte("0000-wrong\n"), 0o600)
	agent = startAgentProcess(t, bin, config, socket)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	go func() { <-ctx.Done(); agent.cmd.Process.Kill() }()
	err := agent.cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != exitConfig { // not restarted by sigil.service
		t.Fatalf("agent with a wrong PIN: %v\n%s", err, agent.stderr)
	}
	log := agent.stderr.String()
	if !strings.Contains(log, "PIN_INCORRECT") {
		t.Fatalf("start-up failure does not say PIN_INCORRECT:\n%s", log)
	}
	if strings.Contains(log, "0000-wrong") || strings.Contains(log, tok.PIN) {
		t.Fatalf("a PIN is in the log:\n%s", log)
	}
}

// A start that cannot succeed until an operator changes something (a PIN
// source that gives no PIN, a config or policy that fails its checks)
// exits 78, on which sigil.service does not restart, and calls itself a
// configuration failure naming the source: it used to exit 1 saying
// INTERNAL, as for a bug, and systemd restarted it every two seconds.
func TestAgentStartRefusedOnItsConfiguration(t *testing.T) {
	tok := softhsmtest.New(t, "cfgfault")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	bin := buildSigil(t)
	dir := t.TempDir()
	pinFile := func(name string, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		return path
	}
	pinDir := filepath.Join(dir, "pin-dir") // as root, the one PIN file a read fails on
	if err := os.Mkdir(pinDir, 0o700); err != nil {
		t.Fatal(err)
	}
	goodPIN := tok.PINFile(t)
	policy := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policy, []byte(fmt.Sprintf("tenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: nosuchkey}\n", os.Getuid())), 0o600); err != nil {
		t.Fatal(err)
	}
	const pinVar = "SIGIL_E2E_PIN"
	hsm := func(pinSource string, extra ...string) string {
		return fmt.Sprintf("data_dir: %s\ndefault_key: release\nproviders:\n  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: %s\n    %s\n    keys:\n      - {name: release, uri: %q}\n%s",
			filepath.Join(dir, "state"), tok.Module, tok.Label, pinSource, keys[providers.KeyECDSAP256].URI, strings.Join(extra, ""))
	}
	for _, tc := range []struct {
		name   string
		config string
		env    []string // added to this process's environment
		names  string   // what the message must name
		secret string   // never in the output, besides the token's PIN
	}{
		{"pin_file missing", hsm("pin_file: " + filepath.Join(dir, "no-such-pin")), nil, filepath.Join(dir, "no-such-pin"), ""},
		{"pin_file others may read", hsm("pin_file: " + pinFile("pin-644", "1234-open\n", 0o644)), nil, filepath.Join(dir, "pin-644"), "1234-open"},
		{"pin_file its group may write", hsm("pin_file: " + pinFile("pin-660", "1234-group\n", 0o660)), nil, filepath.Join(dir, "pin-660"), "1234-group"},
		{"pin_file empty", hsm("pin_file: " + pinFile("pin-empty", "\n", 0o600)), nil, filepath.Join(dir, "pin-empty"), ""},
		{"pin_file unreadable", hsm("pin_file: " + pinDir), nil, pinDir, ""},
		{"pin_env unset", hsm("pin_env: " + pinVar), nil, pinVar, ""},
		{"pin_env empty", hsm("pin_env: " + pinVar), []string{pinVar + "="}, pinVar, ""},
		{"a policy slot naming a key no provider serves", hsm("pin_file: "+goodPIN, "policy: "+policy+"\n"), nil, `key "nosuchkey" is not served`, ""},
		{"a config that fails validation", hsm("pin_file: "+goodPIN, "default_ky: release\n"), nil, "default_ky", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			config := filepath.Join(t.TempDir(), "sigil.yaml")
			if err := os.WriteFile(config, []byte(tc.config), 0o600); err != nil {
				t.Fatal(err)
			}
			var env []string
			for _, kv := range os.Environ() {
				if !strings.HasPrefix(kv, pinVar+"=") {
					env = append(env, kv)
				}
			}
			agent := startAgentProcessEnv(t, bin, config, filepath.Join(shortSocketDir(t), "agent.sock"), append(env, tc.env...))
			code, out := agent.waitExit(t)
			if code != exitConfig {
				t.Fatalf("exit %d, want %d:\n%s", code, exitConfig, out)
			}
			if !strings.Contains(out, "agent failed to start (configuration)") || strings.Contains(out, "INTERNAL") {
				t.Errorf("not called a configuration failure, or called INTERNAL:\n%s", out)
			}
			if !strings.Contains(out, tc.names) {
				t.Errorf("does not name %q:\n%s", tc.names, out)
			}
			if strings.Contains(out, tok.PIN) || (tc.secret != "" && strings.Contains(out, tc.secret)) {
				t.Errorf("a PIN is in the output:\n%s", out)
			}
		})
	}
}

// A module path that gives no PKCS#11 library (no file there, a file that
// is not a shared object, a shared object without C_GetFunctionList) is
// the operator's to fix: the start exits 78, on which sigil.service does
// not restart, and calls it a configuration failure naming the path; it
// exited 1, and systemd restarted it every two seconds for ever. A module
// that loads and whose C_Initialize fails (a device error: a network HSM
// out of reach) still exits 1, and is restarted: the device may come back.
func TestAgentStartOnAModuleThatDoesNotLoad(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	notELF := filepath.Join(dir, "libnotes.so")
	if err := os.WriteFile(notELF, []byte("not a shared object\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	const pinVar = "SIGIL_E2E_MODULE_PIN"
	for _, tc := range []struct {
		name   string
		module func(t *testing.T) string
		env    []string // added to this process's environment
		code   int
		says   string // besides the module's path
	}{
		{"no file there", func(*testing.T) string { return filepath.Join(dir, "libabsent.so") }, nil, exitConfig, "No such file"},
		{"not a shared object", func(*testing.T) string { return notELF }, nil, exitConfig, "not a loadable PKCS#11 module"},
		{"no C_GetFunctionList", func(t *testing.T) string { return buildCModule(t, "nofunctionlist.c") }, nil, exitConfig, "exports no C_GetFunctionList"},
		{"C_Initialize fails with CKR_DEVICE_ERROR", func(t *testing.T) string { return buildCModule(t, "initfails.c") }, nil, exitFailure, "CKR_DEVICE_ERROR"},
		{"SoftHSM2's C_Initialize fails without its configuration", func(t *testing.T) string {
			module := softhsmtest.FindModule()
			if module == "" {
				t.Skip("SoftHSM2 not installed")
			}
			return module
		}, []string{"SOFTHSM2_CONF=" + filepath.Join(dir, "absent.conf")}, exitFailure, "initialize module"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			module := tc.module(t)
			config := filepath.Join(t.TempDir(), "sigil.yaml")
			yaml := fmt.Sprintf("data_dir: %s\ndefault_key: release\nproviders:\n  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: prod\n    pin_env: %s\n    keys:\n      - {name: release, uri: \"pkcs11:object=release\"}\n",
				filepath.Join(dir, "state"), module, pinVar)
			if err := os.WriteFile(config, []byte(yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			env := append(os.Environ(), pinVar+"=1234")
			agent := startAgentProcessEnv(t, bin, config, filepath.Join(shortSocketDir(t), "agent.sock"), append(env, tc.env...))
			code, out := agent.waitExit(t)
			if code != tc.code {
				t.Fatalf("exit %d, want %d:\n%s", code, tc.code, out)
			}
			if got := strings.Contains(out, "agent failed to start (configuration)"); got != (tc.code == exitConfig) {
				t.Errorf("called a configuration failure: %v, want %v:\n%s", got, tc.code == exitConfig, out)
			}
			if !strings.Contains(out, module) || !strings.Contains(out, tc.says) {
				t.Errorf("does not name %s and say %q:\n%s", module, tc.says, out)
			}
		})
	}
}

// buildCModule compiles providers/pkcs11/testdata/src into a shared
// object and returns its path.
func buildCModule(t *testing.T, src string) string {
	t.Helper()
	if _, err := exec.LookPath("cc"); err != nil {
		t.Skip("no C compiler")
	}
	so := filepath.Join(t.TempDir(), "libmodule.so")
	if out, err := exec.Command("cc", "-shared", "-fPIC", "-Wall", "-o", so, filepath.Join("../../providers/pkcs11/testdata", src)).CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	return so
}

// Started under umask 000, the agent still creates nothing others can read
// or write: its journal's files, its sockets, its keys.
func TestAgentCreatesFilesForItsUserAlone(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	config := writeEd25519Config(t, dir, "journal:\n  dir: "+filepath.Join(dir, "journal")+"\n")
	if err := os.Mkdir(filepath.Join(dir, "journal"), 0o755); err != nil { // made beforehand, e.g. by packaging
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("", "sigil-t")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "agent.sock")
	var stderr bytes.Buffer
	cmd := exec.Command("sh", "-c", `umask 000 && exec "$0" agent --config "$1" --socket "$2"`, bin, config, socket)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	p := &agentProcess{cmd: cmd, stderr: &stderr, socket: socket}
	p.waitReady(t)
	if _, _, code := runBin(t, bin, "--socket", socket, "keys", "info"); code != 0 {
		t.Fatalf("keys info: exit %d", code)
	}
	var seen int
	for _, root := range []string{dir, sockDir} {
		err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if path == root || path == filepath.Join(dir, "sigil.yaml") {
				return nil
			}
			fi, err := os.Lstat(path)
			if err != nil {
				return err
			}
			seen++
			if fi.Mode().Perm()&0o077 != 0 {
				t.Errorf("%s: mode %v, open to group or others", path, fi.Mode().Perm())
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if seen < 8 {
		t.Fatalf("only %d files looked at", seen)
	}
}

// With `log: {format: json}` every line the agent writes is JSON, also what
// a library writes to Go's standard logger: x/crypto's ssh-agent server
// logs each refused request there ("agent 17: ..."), and those lines went
// to stderr as plain text in the middle of the JSON stream.
func TestAgentLogIsJSONThroughout(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	sshSock := filepath.Join(dir, "ssh.sock")
	config := writeEd25519Config(t, dir, fmt.Sprintf("ssh_agent_socket: %q\nlog: {format: json}\n", sshSock))
	p := startAgentProcess(t, bin, config, filepath.Join(dir, "agent.sock"))
	p.waitReady(t)
	nc, err := net.Dial("unix", sshSock)
	if err != nil {
		t.Fatal(err)
	}
	_, key, _ := ed25519.GenerateKey(nil)
	if err := sshagent.NewClient(nc).Add(sshagent.AddedKey{PrivateKey: key}); err == nil {
		t.Fatal("the ssh-agent socket took a key")
	}
	nc.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code, _ := p.waitExit(t); code != 0 {
		t.Fatalf("exit %d:\n%s", code, p.stderr)
	}
	refusal := false
	for _, line := range strings.Split(strings.TrimSpace(p.stderr.String()), "\n") {
		var entry map[string]any
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Errorf("not a JSON line: %q", line)
			continue
		}
		if msg, _ := entry["msg"].(string); strings.HasPrefix(msg, "agent 17:") {
			refusal = true
		}
	}
	if !refusal {
		t.Errorf("the ssh-agent server's refusal is not in the log:\n%s", p.stderr)
	}
}
