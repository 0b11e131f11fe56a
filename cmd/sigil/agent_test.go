package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
)

func TestSetGCPercent(t *testing.T) {
	cases := []struct {
		name       string
		configured int
		gogc       string
		wantSet    int // 0: set must not be called
		wantValue  string
		wantFrom   string
	}{
		{"config applies", 400, "", 400, "400", "runtime.gc_percent"},
		{"GOGC wins", 400, "150", 0, "150", "GOGC"},
		{"GOGC off wins", 400, "off", 0, "off", "GOGC"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := 0
			value, from := setGCPercent(tc.configured, tc.gogc, func(p int) int { got = p; return 100 })
			if got != tc.wantSet || value != tc.wantValue || from != tc.wantFrom {
				t.Fatalf("set %d, (%q, %q); want set %d, (%q, %q)", got, value, from, tc.wantSet, tc.wantValue, tc.wantFrom)
			}
		})
	}
}

// The agent binary runs its collector at runtime.gc_percent, and an
// operator's GOGC wins: what the Go runtime reports on /metrics.
func TestAgentGCPercentInForce(t *testing.T) {
	bin := buildSigil(t)
	cases := []struct {
		name   string
		config string
		env    []string
		want   string
	}{
		{"no runtime section", "", nil, "go_gc_gogc_percent 400"},
		{"from the config", "runtime: {gc_percent: 250}\n", nil, "go_gc_gogc_percent 250"},
		{"GOGC wins", "runtime: {gc_percent: 250}\n", []string{"GOGC=150"}, "go_gc_gogc_percent 150"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			addr := freeLoopbackAddr(t)
			config := writeEd25519Config(t, t.TempDir(), fmt.Sprintf("admin_http: {listen: %q}\n", addr), tc.config)
			sockDir, _ := os.MkdirTemp("", "sigil-gc")
			t.Cleanup(func() { os.RemoveAll(sockDir) })
			env := append(withoutEnv(os.Environ(), "GOGC"), tc.env...)
			agent := startAgentProcessEnv(t, bin, config, filepath.Join(sockDir, "agent.sock"), env)
			agent.waitReady(t)
			body := getOnceUp(t, "http://"+addr+"/metrics")
			if !strings.Contains(string(body), "\n"+tc.want+"\n") {
				t.Fatalf("/metrics lacks %q; the agent logged:\n%s", tc.want, agent.stderr.String())
			}
		})
	}
}

func TestAgentGCTargetInBenchDoc(t *testing.T) {
	for gogc, want := range map[string]string{
		"":    "400 (runtime.gc_percent, the default)",
		"100": "GOGC=100 from the environment",
	} {
		if got := agentGCTarget(gogc); got != want {
			t.Errorf("agentGCTarget(%q) = %q, want %q", gogc, got, want)
		}
	}
}

// getOnceUp GETs url, retrying while nothing listens there yet: the agent
// opens its admin HTTP listener after its socket, so a ready socket does
// not mean /metrics answers.
func getOnceUp(t *testing.T, url string) []byte {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			return body
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// withoutEnv is env less the variables names.
func withoutEnv(env []string, names ...string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !slices.Contains(names, strings.SplitN(kv, "=", 2)[0]) {
			out = append(out, kv)
		}
	}
	return out
}

// A SIGHUP that arrives while the agent starts (a config management run
// right after a start) is taken as a reload, not as the signal's default
// action, which would end the process.
func TestSIGHUPDuringStartIsNotFatal(t *testing.T) {
	bin := buildSigil(t)
	config := writeEd25519Config(t, t.TempDir())
	sockDir, _ := os.MkdirTemp("", "sigil-hup")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cmd := exec.Command(bin, "agent", "--config", config, "--socket", filepath.Join(sockDir, "agent.sock"))
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(stderr)
	var seen []string
	waitFor := func(text string) {
		t.Helper()
		for lines.Scan() {
			seen = append(seen, lines.Text())
			if strings.Contains(lines.Text(), text) {
				return
			}
		}
		t.Fatalf("the agent ended before %q:\n%s", text, strings.Join(seen, "\n"))
	}
	waitFor("garbage collector") // logged before the providers open
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor("sigil agent ready")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, stderr)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the agent exited with %v after a SIGHUP during its start", err)
	}
}

func TestAgentSocketChoice(t *testing.T) {
	for _, tc := range []struct {
		name, flag, configured, env, want string
		wantErr                           bool
	}{
		{name: "nothing set: the default", want: ""},
		{name: "SIGIL_SOCK", env: "/run/x/agent.sock", want: "/run/x/agent.sock"},
		{name: "SIGIL_SOCK as unix:", env: "unix:/run/x/agent.sock", want: "/run/x/agent.sock"},
		{name: "SIGIL_SOCK naming a TLS agent is a client's", env: "tls://127.0.0.1:7443", want: ""},
		{name: "the config beats SIGIL_SOCK", configured: "/etc/a.sock", env: "/run/x/agent.sock", want: "/etc/a.sock"},
		{name: "the flag beats both", flag: "/f.sock", configured: "/etc/a.sock", env: "/run/x/agent.sock", want: "/f.sock"},
		{name: "flag as unix:", flag: "unix:/f.sock", want: "/f.sock"},
		{name: "flag naming TLS", flag: "tls://127.0.0.1:7443", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := agentSocket(tc.flag, tc.configured, tc.env)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Fatalf("agentSocket(%q, %q, %q) = %q, %v; want %q, error %v", tc.flag, tc.configured, tc.env, got, err, tc.want, tc.wantErr)
			}
		})
	}
}

// An agent started in a shell that has $SIGIL_SOCK set listens there, so
// the shell's `sigil keys` finds it, as its help promises.
func TestAgentListensAtSIGIL_SOCK(t *testing.T) {
	bin := buildSigil(t)
	config := writeEd25519Config(t, t.TempDir())
	sockDir, _ := os.MkdirTemp("", "sigil-env")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	socket := filepath.Join(sockDir, "agent.sock")
	env := append(os.Environ(), "SIGIL_SOCK="+socket)
	cmd := exec.Command(bin, "agent", "--config", config)
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	p := &agentProcess{cmd: cmd, stderr: &stderr, socket: socket}
	p.waitReady(t)
	keys := exec.Command(bin, "keys", "info")
	keys.Env = env
	out, err := keys.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "ed") {
		t.Fatalf("sigil keys info with the same SIGIL_SOCK: %v\n%s", err, out)
	}
}

// The ready line scripts wait for comes once every listener is up: an
// agent that cannot open one (here its admin socket's path holds a file)
// exits 1 without having announced itself ready.
func TestReadyLineOnlyOnceEveryListenerIsUp(t *testing.T) {
	bin := buildSigil(t)
	sockDir, _ := os.MkdirTemp("", "sigil-rdy")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	if err := os.WriteFile(filepath.Join(sockDir, "admin.sock"), []byte("not a socket"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "agent", "--config", writeEd25519Config(t, t.TempDir()), "--socket", filepath.Join(sockDir, "agent.sock"))
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil {
		t.Fatalf("the agent started with a file at its admin socket's path:\n%s", stderr.String())
	}
	if strings.Contains(stderr.String(), "sigil agent ready") {
		t.Fatalf("the agent printed its ready line, then failed to start:\n%s", stderr.String())
	}
}

// A stopping agent removes its socket only while it is still its own: one
// a successor made at the same path during the drain stays (though the file
// system may give it the same inode number).
func TestOwnSocketRemoverSparesASuccessorsSocket(t *testing.T) {
	dir, _ := os.MkdirTemp("", "sigil-rm")
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "agent.sock")
	ln, err := agent.ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	remove := ownSocketRemover(path)
	ln.Close() // Shutdown's close unlinks it
	successor, err := agent.ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	defer successor.Close()
	remove()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the successor's socket was removed: %v", err)
	}
	// Its own socket, left in place by its listener, it removes.
	own := filepath.Join(dir, "own.sock")
	oln, err := agent.ListenUnix(own)
	if err != nil {
		t.Fatal(err)
	}
	removeOwn := ownSocketRemover(own)
	oln.(*net.UnixListener).SetUnlinkOnClose(false)
	oln.Close()
	removeOwn()
	if _, err := os.Stat(own); !os.IsNotExist(err) {
		t.Fatalf("its own socket after the remover: %v", err)
	}
}

// A second SIGTERM (or Ctrl-C) while the agent drains ends it at once, by
// the signal's default action: an operator who asks twice means now, and
// the journal loses nothing to a kill. Before, the agent took no notice
// and drained for the whole grace period.
func TestSecondSignalEndsTheAgentAtOnce(t *testing.T) {
	bin := buildSigil(t)
	r := newRotationSetup(t, "rsa-2048", 10000) // a rotation of many seconds
	f, err := os.OpenFile(r.config, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "limits: {shutdown_grace: 2m}\n")
	f.Close()
	a := startAgentProcess(t, bin, r.config, r.socket)
	a.waitReady(t)
	exited := make(chan error, 1)
	go func() { exited <- a.cmd.Wait() }()
	rotate := exec.Command(bin, "rotate", "payments/release", "--admin-socket", r.admin)
	if err := rotate.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { rotate.Process.Kill(); rotate.Wait() }()
	time.Sleep(500 * time.Millisecond) // the rotation signs its canaries
	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		t.Fatalf("the agent exited on the first SIGTERM (%v) while a rotation ran: the test shows nothing\n%s", err, a.stderr.String())
	case <-time.After(500 * time.Millisecond):
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
			t.Fatalf("the agent ended with %v, want killed by SIGTERM", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the agent still drained 5 s after a second SIGTERM\n%s", a.stderr.String())
	}
}

// A second SIGTERM ends the agent at once even while the first waits for
// a reload to finish: a reload stuck reading a file (a hung network mount,
// here a FIFO nobody writes) used to hold the signal loop, and the second
// SIGTERM went to a channel nobody read, so only SIGKILL ended the agent.
func TestSecondSignalEndsTheAgentDuringAStuckReload(t *testing.T) {
	bin := buildSigil(t)
	r := newRotationSetup(t, "ecdsa-p256", 1)
	a := startAgentProcess(t, bin, r.config, r.socket)
	a.waitReady(t)
	exited := make(chan error, 1)
	go func() { exited <- a.cmd.Wait() }()
	policyFile := filepath.Join(r.dir, "policy.yaml")
	if err := os.Remove(policyFile); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(policyFile, 0o600); err != nil {
		t.Fatal(err)
	}
	a.cmd.Process.Signal(syscall.SIGHUP)
	time.Sleep(500 * time.Millisecond) // the reload blocks opening the FIFO
	for range 2 {
		a.cmd.Process.Signal(syscall.SIGTERM)
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
			t.Fatalf("the agent ended with %v, want killed by SIGTERM\n%s", err, a.stderr.String())
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the agent still ran 5 s after a second SIGTERM during a stuck reload\n%s", a.stderr.String())
	}
}

// A pkcs11 provider setting the agent refuses at start is refused by
// `sigil agent --check` too (exit 1), and a start on it fails as a config
// error naming the setting (exit 78, which sigil.service does not restart
// on), not as "agent failed to start (INTERNAL)". --check used to call
// these configs valid. Neither output echoes what may be a PIN.
func TestCheckRefusesWhatTheStartRefuses(t *testing.T) {
	bin := buildSigil(t)
	for _, tc := range []struct {
		name, settings, uri string
		want, secret        string
	}{
		{"relative pin_file", "pin_file: s3cr3t-pin", "pkcs11:token=prod;object=release", "pin_file is not an absolute path", "s3cr3t-pin"},
		{"pin_env not a variable name", `pin_env: "12-34!56"`, "pkcs11:token=prod;object=release", "pin_env is not an environment variable name", "12-34!56"},
		{"pin-value in a key's uri", "pin_env: SIGIL_PIN", "pkcs11:token=prod;object=release?pin-value=s3cr3t-pin", `key "release": uri carries pin-value`, "s3cr3t-pin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			config := writeEd25519Config(t, dir, fmt.Sprintf("  - id: hsm\n    type: pkcs11\n    module: /usr/lib/softhsm/libsofthsm2.so\n    %s\n    keys: [{name: release, uri: %q}]\n", tc.settings, tc.uri))
			out, stderr, code := runBin(t, bin, "agent", "--check", "--config", config)
			if code != exitFailure || !strings.Contains(stderr, tc.want) || strings.Contains(out+stderr, tc.secret) {
				t.Errorf("agent --check: exit %d, stdout %q, stderr %q; want %d naming %q, without %q", code, out, stderr, exitFailure, tc.want, tc.secret)
			}
			sock := filepath.Join(dir, "agent.sock")
			out, stderr, code = runBin(t, bin, "agent", "--config", config, "--socket", sock)
			if code != exitConfig || !strings.Contains(stderr, config+": providers[1]: "+tc.want) || strings.Contains(stderr, "INTERNAL") || strings.Contains(out+stderr, tc.secret) {
				t.Errorf("agent: exit %d, stderr %q; want %d, a config error naming %q, without %q", code, stderr, exitConfig, tc.want, tc.secret)
			}
		})
	}
}

// A second agent started on the data dir of one that runs (--socket
// elsewhere) finds the journal locked. It used to say "agent failed to
// start (INTERNAL): audit journal DIR: journal: in use by another process:
// DIR": a fault of ours by its code, the directory twice, and nothing of
// what to do. It says another process holds the data dir's journal, and
// how to go on; the first agent signs on. On the same socket (the same
// config) it is refused at the socket, before it opens anything.
func TestSecondAgentOnADataDirSaysSo(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	first := filepath.Join(shortSocketDir(t), "agent.sock")
	config := writeEd25519Config(t, dir)
	startAgentProcess(t, bin, config, first).waitReady(t)

	journal := filepath.Join(dir, "state", "journal")
	for _, tc := range []struct {
		socket string
		want   []string
		count  int // how often the journal's path is named
	}{
		{first, []string{"socket " + first + ": another agent is listening there"}, 0},
		// Its own directory: the admin socket beside it is its own too.
		{filepath.Join(shortSocketDir(t), "second.sock"), []string{"in use by another process", "another agent"}, 2},
	} {
		socket := tc.socket
		code, stderr := startAgentProcess(t, bin, config, socket).waitExit(t)
		ok := code == exitFailure && !strings.Contains(stderr, "INTERNAL") && strings.Count(stderr, journal) == tc.count
		for _, w := range tc.want {
			ok = ok && strings.Contains(stderr, w)
		}
		if !ok {
			t.Errorf("second agent at %s: exit %d, want %d saying %q, naming the journal %d times\n%s", socket, code, exitFailure, tc.want, tc.count, stderr)
		}
		if _, stderr, code := runBin(t, bin, "--socket", first, "keys", "sign", "--in", config); code != 0 {
			t.Fatalf("the first agent after the second's try: exit %d %s", code, stderr)
		}
	}
}

// A second agent with a data dir of its own on the socket a running agent
// holds is refused before it makes anything: it used to open its
// providers and journal first, leaving keys and a journal in a data dir
// no agent serves, and only then find the socket taken.
func TestSecondAgentOnASocketMakesNoState(t *testing.T) {
	bin := buildSigil(t)
	socket := filepath.Join(shortSocketDir(t), "agent.sock")
	startAgentProcess(t, bin, writeEd25519Config(t, t.TempDir()), socket).waitReady(t)

	dir := t.TempDir()
	code, stderr := startAgentProcess(t, bin, writeEd25519Config(t, dir), socket).waitExit(t)
	if code != exitFailure || !strings.Contains(stderr, "another agent is listening there") {
		t.Errorf("second agent at %s: exit %d, want %d saying another agent listens there\n%s", socket, code, exitFailure, stderr)
	}
	if _, err := os.Lstat(filepath.Join(dir, "state")); !errors.Is(err, fs.ErrNotExist) {
		made, _ := filepath.Glob(filepath.Join(dir, "state", "*"))
		t.Errorf("the refused agent made its data dir (%v): %v", err, made)
	}
}

// A start refused for a reason no wire code names (a data_dir that is a
// file) said "agent failed to start (INTERNAL): …", a fault of ours by
// its label, for a path the operator got wrong. The label is the code of
// an error that carries one (a PIN refused: PIN_INCORRECT); others have
// none.
func TestAgentStartFailureWithoutACodeHasNoCodeLabel(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	config := writeEd25519Config(t, dir)
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	_, stderr, code := runBin(t, bin, "agent", "--config", config, "--data-dir", file, "--socket", filepath.Join(shortSocketDir(t), "a.sock"))
	if code != exitFailure || strings.Contains(stderr, "(INTERNAL)") || !strings.Contains(stderr, "sigil: agent failed to start: data_dir: "+file+" is not a directory") {
		t.Fatalf("exit %d, want %d, no INTERNAL, naming %s\n%s", code, exitFailure, file, stderr)
	}
}

// An agent whose tcp.listen or admin_http.listen address another process
// holds is refused before it makes anything: it used to open its
// providers and journal first, leaving keys and a journal in a fresh data
// dir that no agent serves, and only then find the port taken. An address
// the config's checks refuse (admin_http beyond loopback) stays the
// config's fault, exit 78, though this host cannot bind it either: the
// bind is tried only on a config that passed them.
func TestAgentOnATakenPortMakesNoState(t *testing.T) {
	bin := buildSigil(t)
	tlsDir := t.TempDir()
	ca, err := devcerts.NewCA("taken port")
	if err != nil {
		t.Fatal(err)
	}
	caFile, _ := ca.WriteCert(tlsDir, "ca")
	server, _ := ca.Issue(devcerts.Leaf{CommonName: "agent", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	serverCert, serverKey, _ := server.Write(tlsDir, "server")
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	addr := taken.Addr().String()
	const remote = "192.0.2.1:9464" // TEST-NET-1: on no host
	for _, tc := range []struct {
		name, section string
		code          int
		want          []string
	}{
		{"tcp.listen", fmt.Sprintf("tcp: {listen: %q, cert_file: %s, key_file: %s, client_ca_file: %s}\n", addr, serverCert, serverKey, caFile),
			exitFailure, []string{"tcp.listen: listen tcp " + addr, "address already in use"}},
		{"admin_http.listen", fmt.Sprintf("admin_http: {listen: %q}\n", addr),
			exitFailure, []string{"admin_http.listen: listen tcp " + addr, "address already in use"}},
		{"admin_http.listen beyond loopback", fmt.Sprintf("admin_http: {listen: %q}\n", remote),
			exitConfig, []string{"agent failed to start (configuration)", remote, "not a loopback address"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			socket := filepath.Join(shortSocketDir(t), "agent.sock")
			code, stderr := startAgentProcess(t, bin, writeEd25519Config(t, dir, tc.section), socket).waitExit(t)
			ok := code == tc.code
			for _, w := range tc.want {
				ok = ok && strings.Contains(stderr, w)
			}
			if !ok {
				t.Errorf("exit %d, want %d saying %q\n%s", code, tc.code, tc.want, stderr)
			}
			if _, err := os.Lstat(filepath.Join(dir, "state")); !errors.Is(err, fs.ErrNotExist) {
				made, _ := filepath.Glob(filepath.Join(dir, "state", "*"))
				t.Errorf("the refused agent made its data dir (%v): %v", err, made)
			}
			if _, err := os.Lstat(socket); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the refused agent left its socket: %v", err)
			}
		})
	}
}
