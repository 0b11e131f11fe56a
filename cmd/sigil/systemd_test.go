package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
)

// TestSystemdSocketActivation runs the agent the way systemd runs
// sigil.service behind sigil.socket: the client and admin sockets passed as
// fds 3 and 4 (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), NOTIFY_SOCKET and
// WATCHDOG_USEC set. It checks READY=1, a keep-alive, serving on the
// inherited socket, STOPPING=1 on SIGTERM, a clean exit, and that the socket
// files (systemd's) are left in place.
func TestSystemdSocketActivation(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the agent binary")
	}
	bin := buildSigil(t)
	// Socket paths are limited to ~108 bytes: keep them short.
	sockDir, err := os.MkdirTemp("", "sigil-sd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	clientPath := filepath.Join(sockDir, "agent.sock")
	adminPath := filepath.Join(sockDir, "admin.sock")
	notifyPath := filepath.Join(sockDir, "notify")
	unusedPath := filepath.Join(sockDir, "own", "agent.sock") // --socket: must not be created

	listen := func(path string) *os.File {
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		f, err := ln.File()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	clientFile, adminFile := listen(clientPath), listen(adminPath)

	msgs := listenNotify(t, notifyPath)

	env := withoutEnv(os.Environ(), "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "SIGIL_SOCK")
	env = append(env, "LISTEN_FDS=2", "LISTEN_FDNAMES=client:admin",
		"NOTIFY_SOCKET="+notifyPath, "WATCHDOG_USEC=400000")
	// LISTEN_PID must be the agent's own pid, known only once it runs: the
	// shell sets it to its pid, then execs the agent in the same process.
	var stderr bytes.Buffer
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$@"`, "sh",
		bin, "agent", "--data-dir", t.TempDir(), "--socket", unusedPath)
	cmd.Env = env
	cmd.ExtraFiles = []*os.File{clientFile, adminFile} // fds 3 and 4
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
	})

	await := func(state string, within time.Duration) {
		t.Helper()
		awaitNotify(t, msgs, exited, &stderr, func(line string) bool { return line == state }, state, within)
	}
	await("READY=1", 60*time.Second)
	// The keep-alive follows a successful Ping through the inherited socket.
	await("WATCHDOG=1", 10*time.Second)

	out, err := exec.Command(bin, "keys", "info", "--socket", clientPath, "--json").CombinedOutput()
	if err != nil {
		t.Fatalf("keys info through the inherited socket: %v\n%s\nagent stderr:\n%s", err, out, stderr.String())
	}
	if !strings.Contains(string(out), "ecdsa-p256") && !strings.Contains(string(out), "default") {
		t.Fatalf("keys info: unexpected output %s", out)
	}
	if _, err := os.Stat(unusedPath); err == nil {
		t.Fatalf("agent created its own socket %s though systemd passed one", unusedPath)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	await("STOPPING=1", 30*time.Second)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("agent exit: %v; stderr:\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("agent did not exit after SIGTERM; stderr:\n%s", stderr.String())
	}
	for _, p := range []string{clientPath, adminPath} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("the agent removed systemd's socket %s: %v", p, err)
		}
	}
}

// A TCP socket passed under the name "client" (or "admin") is refused at
// start: those sockets' peers are identified by their Unix credentials, and a
// plain TCP peer has none. The exit status is one systemd does not restart
// on: the socket units decide what is passed, and a restart changes nothing.
func TestSystemdTCPSocketNamedClientIsRefused(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the agent binary")
	}
	bin := buildSigil(t)
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := withoutEnv(os.Environ(), "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "SIGIL_SOCK")
	env = append(env, "LISTEN_FDS=1", "LISTEN_FDNAMES=client")
	var stderr bytes.Buffer
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$@"`, "sh",
		bin, "agent", "--data-dir", t.TempDir(), "--socket", filepath.Join(t.TempDir(), "agent.sock"))
	cmd.Env = env
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = &stderr
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the agent started on a TCP socket named client")
		}
		// Every restart would fail the same way until the unit changes.
		if code := cmd.ProcessState.ExitCode(); code != exitConfig {
			t.Errorf("exit status %d, want %d (no restart)", code, exitConfig)
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatal("the agent is still running on a TCP socket named client")
	}
	if !strings.Contains(stderr.String(), `"client" must be a Unix socket`) {
		t.Errorf("stderr does not say why:\n%s", stderr.String())
	}
}

// The watchdog's self-ping counts any answer from the agent, a refusal at
// max_conns included (a busy agent must not be restarted for being busy),
// and only a socket nobody answers on as a failure.
func TestPingSelf(t *testing.T) {
	cfg := agent.DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Limits.MaxConns = 1
	_, sock := serveTestAgent(t, cfg, "agent.sock")
	if err := pingSelf(context.Background(), sock, 2*time.Second); err != nil {
		t.Fatalf("ping of an idle agent: %v", err)
	}
	// The ping's own connection is let go of asynchronously: wait for its
	// place to free up.
	var held *client.Client
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if held, err = client.Dial(context.Background(), sock); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	defer held.Close()
	if err := pingSelf(context.Background(), sock, 2*time.Second); err != nil {
		t.Fatalf("ping of an agent at max_conns: %v", err)
	}
	if err := pingSelf(context.Background(), filepath.Join(t.TempDir(), "none.sock"), 2*time.Second); err == nil {
		t.Fatal("ping of a socket nobody listens on succeeded")
	}
}

// listenNotify listens on a NOTIFY_SOCKET at path and returns the messages
// sent to it.
func listenNotify(t *testing.T, path string) <-chan string {
	t.Helper()
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { notify.Close() })
	msgs := make(chan string, 64)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	return msgs
}

// awaitNotify waits for a notify message with a line that match accepts,
// failing the test if the agent exits first or within passes. It returns
// the line.
func awaitNotify(t *testing.T, msgs <-chan string, exited <-chan error, stderr *bytes.Buffer, match func(string) bool, what string, within time.Duration) string {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatalf("notify socket closed before %s", what)
			}
			for _, line := range strings.Split(m, "\n") {
				if match(line) {
					return line
				}
			}
		case err := <-exited:
			t.Fatalf("agent exited (%v) before %s; stderr:\n%s", err, what, stderr.String())
		case <-deadline:
			t.Fatalf("no %s within %s; stderr:\n%s", what, within, stderr.String())
		}
	}
}

// systemctl reload runs `sigil agent --check` and then signals the agent
// (sigil.service's ExecReload): a config or policy the agent would refuse
// fails the reload before the signal. What only the running agent can
// refuse (a slot naming a key no provider serves) shows in the STATUS
// line of `systemctl status`, as does a reload that went through.
func TestReloadOutcomeForSystemd(t *testing.T) {
	bin := buildSigil(t)
	dir := t.TempDir()
	policyFile := filepath.Join(dir, "policy.yaml")
	writePolicy := func(key string) {
		t.Helper()
		err := os.WriteFile(policyFile, []byte(fmt.Sprintf(`
tenants:
  - name: ops
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: %s}
`, os.Getuid(), key)), 0o600)
		if err != nil {
			t.Fatal(err)
		}
	}
	writePolicy("ed")
	config := writeEd25519Config(t, dir, "policy: "+policyFile+"\n")

	if out, stderr, code := runBin(t, bin, "agent", "--check", "--config", config); code != 0 || !strings.Contains(out, "valid") {
		t.Fatalf("agent --check on a good config: exit %d\n%s%s", code, out, stderr)
	}
	os.WriteFile(policyFile, []byte("tenants:\n  - name: ops\n    identities: {unix_uids: [1]}\n    slots: [{name: release, key: ed, policy: {rate: {per_second: -1}}}]\n"), 0o600)
	if _, stderr, code := runBin(t, bin, "agent", "--check", "--config", config); code != exitFailure || !strings.Contains(stderr, policyFile) || !strings.Contains(stderr, "per_second") {
		t.Fatalf("agent --check on a bad policy: exit %d, stderr %q; want %d naming the file and the field", code, stderr, exitFailure)
	}
	badTLS := writeEd25519Config(t, t.TempDir(), "tcp: {listen: 127.0.0.1:0, cert_file: /nonexistent/c.pem, key_file: /nonexistent/k.pem, client_ca_file: /nonexistent/ca.pem}\n")
	if _, stderr, code := runBin(t, bin, "agent", "--check", "--config", badTLS); code != exitFailure || !strings.Contains(stderr, "/nonexistent/c.pem") {
		t.Fatalf("agent --check with missing TLS files: exit %d, stderr %q", code, stderr)
	}
	notPEM := filepath.Join(t.TempDir(), "ed.pem")
	os.WriteFile(notPEM, []byte("not a certificate"), 0o600)
	badCert := writeEd25519Config(t, t.TempDir(), "certificates: {ed: "+notPEM+"}\n")
	if _, stderr, code := runBin(t, bin, "agent", "--check", "--config", badCert); code != exitFailure || !strings.Contains(stderr, "certificates[ed]") {
		t.Fatalf("agent --check with a key certificate that is not PEM: exit %d, stderr %q", code, stderr)
	}

	writePolicy("ed")
	sockDir, _ := os.MkdirTemp("", "sigil-rl")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	notifyPath := filepath.Join(sockDir, "notify")
	msgs := listenNotify(t, notifyPath)
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "agent", "--config", config, "--socket", filepath.Join(sockDir, "agent.sock"))
	cmd.Env = append(withoutEnv(os.Environ(), "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC"), "NOTIFY_SOCKET="+notifyPath)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	awaitNotify(t, msgs, exited, &stderr, func(l string) bool { return l == "READY=1" }, "READY=1", 60*time.Second)

	// The reload protocol of sd_notify(3): RELOADING=1 with the
	// monotonic clock's time (systemd 253+ matches it to its own signal),
	// then READY=1 once the reload is done, refused or not (the agent
	// serves on), with the outcome in STATUS.
	reload := func(what string) string {
		t.Helper()
		var sent unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &sent); err != nil {
			t.Fatal(err)
		}
		cmd.Process.Signal(syscall.SIGHUP)
		msg := awaitNotifyMessage(t, msgs, exited, &stderr, "RELOADING=1", what+": RELOADING=1")
		fields := notifyFields(msg)
		usec, err := strconv.ParseInt(fields["MONOTONIC_USEC"], 10, 64)
		if err != nil || usec < sent.Nano()/1000 {
			t.Fatalf("%s: RELOADING=1 with MONOTONIC_USEC=%q, want a time after the signal (%d)", what, fields["MONOTONIC_USEC"], sent.Nano()/1000)
		}
		msg = awaitNotifyMessage(t, msgs, exited, &stderr, "READY=1", what+": READY=1")
		return notifyFields(msg)["STATUS"]
	}
	writePolicy("no-such-key") // valid on its own; only the agent knows its keys
	if got := reload("the refused reload"); !strings.Contains(got, "was refused") || !strings.Contains(got, "no-such-key") {
		t.Fatalf("after a refused reload: STATUS=%q", got)
	}
	writePolicy("ed")
	if got := reload("the good reload"); !strings.Contains(got, "reloaded at") {
		t.Fatalf("after a good reload: STATUS=%q", got)
	}
}

// awaitNotifyMessage waits for a notify message with the line want and
// returns the whole message.
func awaitNotifyMessage(t *testing.T, msgs <-chan string, exited <-chan error, stderr *bytes.Buffer, want, what string) string {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatalf("notify socket closed before %s", what)
			}
			if slices.Contains(strings.Split(m, "\n"), want) {
				return m
			}
		case err := <-exited:
			t.Fatalf("agent exited (%v) before %s; stderr:\n%s", err, what, stderr.String())
		case <-deadline:
			t.Fatalf("no %s; stderr:\n%s", what, stderr.String())
		}
	}
}

// notifyFields splits a notify message into its KEY=value lines.
func notifyFields(msg string) map[string]string {
	fields := map[string]string{}
	for _, line := range strings.Split(msg, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			fields[k] = v
		}
	}
	return fields
}

// The unit and the binary agree: the exit status for a refused PIN is one
// systemd does not restart on (a restart presents the same PIN again, and
// a token with a retry counter locks), every other failing start ends
// after a few tries, and no directive changes the agent's sockets or
// metrics behind its back.
func TestServiceUnitMatchesTheBinary(t *testing.T) {
	raw, err := os.ReadFile("../../systemd/sigil.service")
	if err != nil {
		t.Fatal(err)
	}
	directives := map[string][]string{}
	for _, line := range strings.Split(string(raw), "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok && !strings.HasPrefix(k, "#") {
			directives[k] = append(directives[k], v)
		}
	}
	want := map[string]string{
		"Restart":                  "on-failure",
		"RestartPreventExitStatus": strconv.Itoa(exitConfig),
		"StartLimitBurst":          "5",
	}
	for k, v := range want {
		if got := directives[k]; len(got) != 1 || got[0] != v {
			t.Errorf("%s=%v, want %s", k, got, v)
		}
	}
	if got := directives["ProcSubset"]; len(got) != 0 {
		t.Errorf("ProcSubset=%v: hides somaxconn (listen backlog 128) and /proc/stat (process metrics)", got)
	}
}

// The agent process is not dumpable: no core file, no ptrace by its user's
// other processes. Checked in a child test process, since the flag cannot
// be taken back.
func TestHardenProcessMakesItNotDumpable(t *testing.T) {
	if os.Getenv("SIGIL_TEST_HARDEN_CHILD") == "1" {
		if err := hardenProcess(); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		d, err := dumpable()
		fmt.Printf("dumpable=%v err=%v\n", d, err)
		os.Exit(0)
	}
	if d, err := dumpable(); err != nil || !d {
		t.Skipf("this test process is not dumpable to begin with (%v, %v)", d, err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHardenProcessMakesItNotDumpable$")
	cmd.Env = append(os.Environ(), "SIGIL_TEST_HARDEN_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "dumpable=false err=<nil>") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

// inheritedListeners takes only stream sockets it can serve, under names it
// knows, and only when LISTEN_PID is this process; whatever it finds, it
// unsets LISTEN_*, so that no child takes the fds for its own. Run in a
// child test process, whose fds 3 and up are the files of each case.
func TestInheritedListeners(t *testing.T) {
	if os.Getenv("SIGIL_TEST_INHERIT_CHILD") == "1" {
		s, err := inheritedListeners()
		env := os.Getenv("LISTEN_PID") + os.Getenv("LISTEN_FDS") + os.Getenv("LISTEN_FDNAMES")
		switch {
		case err != nil:
			fmt.Printf("error: %v\nenv=%q\n", err, env)
		case s == nil:
			fmt.Printf("none\nenv=%q\n", env)
		default:
			fmt.Printf("client=%v admin=%v tcp=%v\nenv=%q\n", s.client != nil, s.admin != nil, s.tcp != nil, env)
		}
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "sigil-inh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	n := 0
	file := func(f interface{ File() (*os.File, error) }) *os.File {
		t.Helper()
		of, err := f.File()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { of.Close() })
		return of
	}
	unixStream := func() *os.File {
		n++
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, strconv.Itoa(n)), Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return file(ln)
	}
	unixDatagram := func() *os.File {
		n++
		c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, strconv.Itoa(n)), Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return file(c)
	}
	tcp := func() *os.File {
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return file(ln)
	}
	regular := func() *os.File {
		f, err := os.CreateTemp(dir, "plain")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	// What a socket unit with Accept=yes passes: one connection.
	connected := func() *os.File {
		n++
		path := filepath.Join(dir, strconv.Itoa(n))
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return file(c)
	}
	for _, tc := range []struct {
		name     string
		files    []*os.File
		names    string
		otherPID bool
		want     string // the child's first line, or its prefix up to "…"
	}{
		{"client and admin", []*os.File{unixStream(), unixStream()}, "client:admin", false, "client=true admin=true tcp=false"},
		{"all three", []*os.File{unixStream(), unixStream(), tcp()}, "client:admin:tcp", false, "client=true admin=true tcp=true"},
		{"another process's", []*os.File{unixStream()}, "client", true, "none"},
		{"unnamed", []*os.File{unixStream()}, "", false, `error: systemd socket activation: unknown socket name "LISTEN_FD_3"…`},
		{"unknown name", []*os.File{unixStream()}, "sigil.socket", false, `error: systemd socket activation: unknown socket name "sigil.socket"…`},
		{"twice client", []*os.File{unixStream(), unixStream()}, "client:client", false, `error: systemd socket activation: more than one socket named "client"…`},
		{"TCP as client", []*os.File{tcp()}, "client", false, `error: systemd socket activation: "client" must be a Unix socket…`},
		{"datagram as client", []*os.File{unixDatagram()}, "client", false, `error: systemd socket activation: "client": not a stream socket…`},
		{"connection as client", []*os.File{connected()}, "client", false, `error: systemd socket activation: "client": not a listening socket…`},
		{"regular file as admin", []*os.File{unixStream(), regular()}, "client:admin", false, `error: systemd socket activation: "admin": not a socket…`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := withoutEnv(os.Environ(), "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
			env = append(env, "SIGIL_TEST_INHERIT_CHILD=1", "LISTEN_FDS="+strconv.Itoa(len(tc.files)))
			if tc.names != "" {
				env = append(env, "LISTEN_FDNAMES="+tc.names)
			}
			pid := `$$`
			if tc.otherPID {
				pid = "1"
			}
			cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=`+pid+`; export LISTEN_PID; exec "$@"`, "sh",
				os.Args[0], "-test.run=^TestInheritedListeners$")
			cmd.Env = env
			cmd.ExtraFiles = tc.files
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("child: %v\n%s", err, out)
			}
			first, rest, _ := strings.Cut(string(out), "\n")
			if prefix, ok := strings.CutSuffix(tc.want, "…"); ok && !strings.HasPrefix(first, prefix) || !ok && first != tc.want {
				t.Errorf("got %q, want %q", first, tc.want)
			}
			if !strings.HasPrefix(rest, `env=""`) {
				t.Errorf("LISTEN_* left in the environment: %s", rest)
			}
		})
	}
}
