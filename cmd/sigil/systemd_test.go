package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

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

	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
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
		deadline := time.After(within)
		for {
			select {
			case m, ok := <-msgs:
				if !ok {
					t.Fatalf("notify socket closed before %s", state)
				}
				for _, line := range strings.Split(m, "\n") {
					if line == state {
						return
					}
				}
			case err := <-exited:
				t.Fatalf("agent exited (%v) before %s; stderr:\n%s", err, state, stderr.String())
			case <-deadline:
				t.Fatalf("no %s within %s; stderr:\n%s", state, within, stderr.String())
			}
		}
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
// plain TCP peer has none.
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
