package pkcs11module

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"encoding/hex"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/proto"
)

// ccProgram builds testdata/name.c, a host program, with the flags the
// other test programs use (and extra), and returns the binary's path.
func ccProgram(t *testing.T, name string, extra ...string) string {
	t.Helper()
	need(t, "cc")
	bin := filepath.Join(t.TempDir(), name)
	args := append([]string{"-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror", "-I/usr/include/p11-kit-1"}, extra...)
	args = append(args, "-o", bin, "testdata/"+name+".c", "-ldl", "-lpthread")
	if out, err := exec.Command("cc", args...).CombinedOutput(); err != nil {
		t.Fatalf("cc %s.c: %v\n%s", name, err, out)
	}
	return bin
}

// runBounded runs a host program with extra environment and gives it
// limit to finish: a host call that never returns is the failure some
// tests look for, reported here rather than as the test binary's timeout.
func runBounded(t *testing.T, limit time.Duration, env []string, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s %s: still running after %v (killed): a call never returned\n%s", filepath.Base(name), strings.Join(args, " "), limit, out)
	}
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return string(out)
}

// verifyLines checks "MESSAGE HEX-SIGNATURE" lines (CKM_ECDSA_SHA256, raw
// r||s) against pub and returns how many there were; the line after them
// must start with last.
func verifyLines(t *testing.T, out string, pub *ecdsa.PublicKey, last string) int {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[len(lines)-1], last) {
		t.Fatalf("want a last line %q: %s", last, out)
	}
	for _, l := range lines[:len(lines)-1] {
		msg, sigHex, ok := strings.Cut(l, " ")
		sig, err := hex.DecodeString(sigHex)
		if !ok || err != nil || len(sig) != 64 {
			t.Fatalf("bad line %q", l)
		}
		h := crypto.SHA256.New()
		h.Write([]byte(msg))
		if !ecdsa.Verify(pub, h.Sum(nil), new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
			t.Errorf("the signature for %q does not verify", msg)
		}
	}
	return len(lines) - 1
}

// A host with a SIGALRM handler installed without SA_RESTART, the signal
// firing every 50 us: every call the module blocks in fails with EINTR
// over and over. Every signature must still come back whole and match its
// own message.
func TestSigningUnderSignalStorm(t *testing.T) {
	f := startFixture(t, fixtureOptions{})
	bin := ccProgram(t, "sigstorm")
	out := runBounded(t, 2*time.Minute, nil, bin, modulePath(t), "p256", "sign", "100")
	if n := verifyLines(t, out, f.keys["p256"].Public.(*ecdsa.PublicKey), "ok: "); n != 200 {
		t.Fatalf("%d signatures, want 200", n)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	t.Log(lines[len(lines)-1])
}

// serveUnixConns listens on sock until the test ends and runs handle on
// its own goroutine for each connection it accepts (closed at the end).
func serveUnixConns(t *testing.T, sock string, handle func(net.Conn)) {
	t.Helper()
	ln, err := net.Listen("unix", sock)
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
			t.Cleanup(func() { c.Close() })
			go handle(c)
		}
	}()
}

// silentListener accepts connections and reads what comes, never
// answering: an agent that hangs after accepting.
func silentListener(t *testing.T, sock string) {
	serveUnixConns(t, sock, func(c net.Conn) { io.Copy(io.Discard, c) })
}

// listenBacklog0 is a Unix socket listening on sock with a backlog of 0
// (one queued connection fills it), closed when the test ends; Go's
// net.Listen offers no backlog.
func listenBacklog0(t *testing.T, sock string) int {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: sock}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	return fd
}

// fullListener listens with a backlog that one queued connection (made
// here) fills, and never accepts: the module's connect(2) blocks.
func fullListener(t *testing.T, sock string) {
	listenBacklog0(t, sock)
	for range 2 {
		d := net.Dialer{Timeout: 200 * time.Millisecond}
		c, err := d.Dial("unix", sock)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return // full
			}
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
}

// An agent that does not answer costs a call the module's timeout
// (timeout_ms + 2 s), and then CKR_DEVICE_ERROR, even while the host's
// signals interrupt the module's waits: each EINTR used to start the wait
// over, so under a signal storm the call never returned.
func TestUnansweredAgentTimesOutUnderSignalStorm(t *testing.T) {
	bin := ccProgram(t, "sigstorm")
	for _, tc := range []struct {
		name   string
		listen func(*testing.T, string)
	}{
		{"accepts and never answers", silentListener},
		{"never accepts", fullListener},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			sock := filepath.Join(dir, "agent.sock")
			tc.listen(t, sock)
			conf := filepath.Join(dir, "pkcs11.conf")
			if err := os.WriteFile(conf, []byte("socket = "+sock+"\ntimeout_ms = 100\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			// 2.1 s is the module's wait; 30 s means it did not end.
			out := runBounded(t, 30*time.Second, []string{"SIGIL_PKCS11_CONF=" + conf}, bin, modulePath(t), "p256", "search")
			if strings.TrimSpace(out) != "rv 0x30" {
				t.Fatalf("C_FindObjectsInit: %s, want rv 0x30 (CKR_DEVICE_ERROR)", out)
			}
		})
	}
}

// lateHelloListener answers each connection's Hello after wait, then
// reads and never answers: an agent slow to greet that then hangs.
func lateHelloListener(wait time.Duration) func(*testing.T, string) {
	return func(t *testing.T, sock string) {
		serveUnixConns(t, sock, func(c net.Conn) {
			br := bufio.NewReader(c)
			codec := proto.NewCodec()
			payload, err := proto.ReadFrame(br, nil, proto.DefaultMaxFrame)
			var req proto.Request
			if err != nil || codec.DecodeRequest(payload, &req) != nil {
				return
			}
			time.Sleep(wait)
			frame, err := codec.AppendResponseFrame(nil, &proto.Response{ID: req.ID, Version: proto.Version})
			if err != nil {
				return
			}
			if _, err := c.Write(frame); err != nil {
				return
			}
			io.Copy(io.Discard, br)
		})
	}
}

// lateAcceptListener is fullListener that, after wait, accepts the one
// connection filling its backlog and then nothing more: the module's
// connect(2) goes through late and its Hello is never answered.
func lateAcceptListener(wait time.Duration) func(*testing.T, string) {
	return func(t *testing.T, sock string) {
		fd := listenBacklog0(t, sock)
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		timer := time.AfterFunc(wait, func() {
			if nfd, _, err := syscall.Accept(fd); err == nil {
				t.Cleanup(func() { syscall.Close(nfd) })
			}
		})
		t.Cleanup(func() { timer.Stop() })
	}
}

// The module's wait for one call is timeout_ms + 2 s in all, the dial of
// a fresh connection (connect and Hello) included: each step used to
// have its own deadline, so an agent slow to accept or to greet, and then
// silent, cost the first call on a connection about twice that.
func TestFirstCallOnNewConnectionKeepsOneDeadline(t *testing.T) {
	const wait = 2100 * time.Millisecond // timeout_ms = 100, + 2 s
	late := wait - 300*time.Millisecond
	for _, tc := range []struct {
		name   string
		listen func(*testing.T, string)
	}{
		{"Hello answered late, request never", lateHelloListener(late)},
		{"accepted late, Hello never answered", lateAcceptListener(late)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			sock := filepath.Join(dir, "agent.sock")
			tc.listen(t, sock)
			conf := filepath.Join(dir, "pkcs11.conf")
			if err := os.WriteFile(conf, []byte("socket = "+sock+"\ntimeout_ms = 100\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			t.Setenv("SIGIL_PKCS11_CONF", conf)
			ctx := openModule(t)
			s := openSession(t, ctx)
			start := time.Now()
			err := ctx.FindObjectsInit(s, nil)
			waited := time.Since(start)
			if ckr(err) != p11.CKR_DEVICE_ERROR {
				t.Fatalf("C_FindObjectsInit: %v, want CKR_DEVICE_ERROR", err)
			}
			// The slack is for a loaded machine; the bug cost late + wait.
			if waited > wait+time.Second {
				t.Fatalf("gave up after %v, want about %v (timeout_ms + 2 s)", waited, wait)
			}
		})
	}
}

// slowHelloAgent greets each connection after wait, then answers every
// request at once with an empty key list, sending the tmo each carried
// on got.
func slowHelloAgent(t *testing.T, sock string, wait time.Duration, got chan<- uint32) {
	serveUnixConns(t, sock, func(c net.Conn) {
		br := bufio.NewReader(c)
		codec := proto.NewCodec()
		for {
			payload, err := proto.ReadFrame(br, nil, proto.DefaultMaxFrame)
			var req proto.Request
			if err != nil || codec.DecodeRequest(payload, &req) != nil {
				return
			}
			resp := &proto.Response{ID: req.ID}
			if req.Op == proto.OpHello {
				time.Sleep(wait)
				resp.Version = proto.Version
			} else {
				got <- req.TimeoutMillis
				resp.Keys = []proto.KeyEntry{}
			}
			frame, err := codec.AppendResponseFrame(nil, resp)
			if err != nil {
				return
			}
			if _, err := c.Write(frame); err != nil {
				return
			}
		}
	})
}

// A request's tmo is what is left of timeout_ms once a fresh connection's
// connect and Hello have taken their share, as docs/protocol.md defines
// it (the client's remaining deadline), and a request with nothing left
// is not sent. It was timeout_ms whatever the dial took, so past the
// first 2 s of dial the agent could still be signing, and journaling,
// when the module gave up on the reply.
func TestRequestTimeoutCountsTheDial(t *testing.T) {
	const timeout = 1000 // ms
	for _, tc := range []struct {
		name   string
		hello  time.Duration
		wantRV uint
	}{
		{"Hello took most of it", 600 * time.Millisecond, p11.CKR_OK},
		{"Hello took all of it", 1300 * time.Millisecond, p11.CKR_DEVICE_ERROR},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			sock := filepath.Join(dir, "agent.sock")
			got := make(chan uint32, 4)
			slowHelloAgent(t, sock, tc.hello, got)
			conf := filepath.Join(dir, "pkcs11.conf")
			if err := os.WriteFile(conf, []byte("socket = "+sock+"\ntimeout_ms = 1000\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			t.Setenv("SIGIL_PKCS11_CONF", conf)
			ctx := openModule(t)
			s := openSession(t, ctx)
			err := ctx.FindObjectsInit(s, nil)
			if ckr(err) != tc.wantRV {
				t.Fatalf("C_FindObjectsInit: %v, want %#x", err, tc.wantRV)
			}
			if err == nil {
				ctx.FindObjectsFinal(s)
			}
			left := uint32(timeout - tc.hello.Milliseconds())
			select {
			case tmo := <-got:
				if tc.wantRV != p11.CKR_OK {
					t.Fatalf("a ListKeys with tmo %d ms was sent after the Hello took %v of timeout_ms %d", tmo, tc.hello, timeout)
				}
				if tmo == 0 || tmo > left {
					t.Fatalf("ListKeys carried tmo %d ms after a Hello of %v: want at most the %d ms left of timeout_ms", tmo, tc.hello, left)
				}
			default:
				if tc.wantRV == p11.CKR_OK {
					t.Fatal("the agent saw no ListKeys")
				}
			}
		})
	}
}

// countingListener accepts connections, counts them and never answers.
func countingListener(t *testing.T, sock string, n *atomic.Int64) {
	ln, err := net.Listen("unix", sock)
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
			n.Add(1) // counted as accepted, before the test can look
			t.Cleanup(func() { c.Close() })
			go io.Copy(io.Discard, c)
		}
	}()
}

// A socket the module cannot give its timeouts (setsockopt fails, under
// testdata/failsockopt.c) is not used: the call fails with
// CKR_DEVICE_ERROR before connecting. The failure used to be ignored:
// without SO_SNDTIMEO, a connect(2) to an agent whose backlog is full
// blocked for good; without SO_RCVTIMEO, the module went on to connect.
func TestSocketWithoutTimeoutsIsNotUsed(t *testing.T) {
	need(t, "cc")
	mod := modulePath(t)
	shim := filepath.Join(t.TempDir(), "failsockopt.so")
	if out, err := exec.Command("cc", "-shared", "-fPIC", "-o", shim, "testdata/failsockopt.c", "-ldl").CombinedOutput(); err != nil {
		t.Fatalf("cc failsockopt.c: %v\n%s", err, out)
	}
	// sigpipe's host installs no signal handler: no EINTR ends a wait.
	bin := ccProgram(t, "sigpipe")
	for _, tc := range []struct {
		option  string
		accepts bool // the listener accepts and counts; else its backlog is full
	}{
		{"SO_SNDTIMEO", false},
		{"SO_RCVTIMEO", true},
	} {
		t.Run(tc.option, func(t *testing.T) {
			dir := shortDir(t)
			sock := filepath.Join(dir, "agent.sock")
			var conns atomic.Int64
			if tc.accepts {
				countingListener(t, sock, &conns)
			} else {
				fullListener(t, sock)
			}
			conf := filepath.Join(dir, "pkcs11.conf")
			if err := os.WriteFile(conf, []byte("socket = "+sock+"\ntimeout_ms = 100\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, mod, "p256")
			cmd.Env = append(os.Environ(), "SIGIL_PKCS11_CONF="+conf, "LD_PRELOAD="+shim, "SIGIL_TEST_FAIL_SOCKOPT="+tc.option)
			out, _ := cmd.CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("sigpipe: still running after 20 s (killed): the module's connect never returned\n%s", out)
			}
			if !strings.Contains(string(out), "find key: rv 0x30") {
				t.Fatalf("sigpipe: %s, want find key: rv 0x30 (CKR_DEVICE_ERROR)", out)
			}
			if n := conns.Load(); n != 0 {
				t.Fatalf("the module connected %d times on a socket without timeouts", n)
			}
		})
	}
}

// reopen brings a closed fake agent back on its socket: the agent
// restarted.
func (f *fakeAgent) reopen() {
	f.t.Helper()
	ln, err := net.Listen("unix", f.sock)
	if err != nil {
		f.t.Fatal(err)
	}
	f.mu.Lock()
	f.ln, f.open = ln, nil
	f.mu.Unlock()
	f.closed.Store(false)
	go f.serve()
}

// A host that leaves SIGPIPE at its default (death) while the agent
// closes connections under it, dies and comes back: every send on a
// closed connection must come back as an error (the module retries or
// answers CKR_DEVICE_ERROR), never as a signal that kills the host, and
// once the agent is back the next call signs.
func TestHostSurvivesAgentGoingAway(t *testing.T) {
	keys := newFakeKeys(t)
	fake := startFake(t, keys)
	bin := ccProgram(t, "sigpipe")
	cmd := exec.Command(bin, modulePath(t), "p256")
	cmd.Env = append(os.Environ(), "SIGIL_SOCK="+fake.sock, "SIGIL_PKCS11_CONF=")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	pub := keys[0].signer.Public().(*ecdsa.PublicKey)
	// ask sends cmd and reads n answers; the host dying shows as no answer.
	cmd2 := cmd
	ask := func(cmd string, n int) []string {
		t.Helper()
		if _, err := io.WriteString(stdin, cmd+"\n"); err != nil {
			t.Fatalf("%s: the host is gone: %v", cmd, err)
		}
		var got []string
		for range n {
			if !lines.Scan() {
				t.Fatalf("%s: the host is gone (%v), stderr: %s", cmd, cmd2.Wait(), stderr.String())
			}
			got = append(got, lines.Text())
		}
		return got
	}
	signed := func(step, line string) {
		t.Helper()
		rest, ok := strings.CutPrefix(line, "ok ")
		if !ok {
			t.Fatalf("%s: %q, want a signature", step, line)
		}
		verifyLines(t, rest+"\nend", pub, "end")
	}

	signed("agent up", ask("sign", 1)[0])
	fake.hangUp.Store(true)
	go func() { // hungUp only has room for 16
		for range fake.hungUp {
		}
	}()
	for _, l := range ask("burst 20", 20) {
		// A request that left just before the agent's close is lost, not
		// repeated: CKR_DEVICE_ERROR. One that meets the close is retried.
		if l != "rv 0x30" {
			signed("agent hanging up after each answer", l)
		}
	}
	fake.hangUp.Store(false)
	fake.close()
	if got := ask("sign", 1)[0]; got != "rv 0x30" {
		t.Fatalf("agent gone: %q, want rv 0x30 (CKR_DEVICE_ERROR)", got)
	}
	fake.reopen()
	signed("agent back", ask("sign", 1)[0])
	stdin.Close()
	if !lines.Scan() || lines.Text() != "bye" {
		t.Fatalf("at the end: %q (%v), stderr: %s", lines.Text(), cmd.Wait(), stderr.String())
	}
}

// A host that starts programs while the module holds agent connections
// (one pooled, one in a round trip on another thread) passes none of them
// on: posix_spawn runs no atfork handler, so close-on-exec alone must keep
// them out; fork then exec too. testdata/cloexec.c.
func TestSpawnedProgramsGetNoAgentSocket(t *testing.T) {
	startFixture(t, fixtureOptions{})
	bin := ccProgram(t, "cloexec")
	out := runBounded(t, 2*time.Minute, nil, bin, modulePath(t), "p256")
	if !strings.HasPrefix(out, "ok: 20 children") {
		t.Fatalf("cloexec: %s", out)
	}
}

// Threads that share one session (the application's fault by PKCS#11,
// but a host may do it) get results, not a crash or a signature for
// another's request: testdata/sharedsession.c, under AddressSanitizer
// where the toolchain has it. Every signature any thread got verifies.
func TestThreadsSharingOneSession(t *testing.T) {
	f := startFixture(t, fixtureOptions{})
	mod, flags := asanBuild(t)
	bin := ccProgram(t, "sharedsession", flags...)
	out := runBounded(t, 2*time.Minute, nil, bin, mod, "p256")
	n := verifyLines(t, out, f.keys["p256"].Public.(*ecdsa.PublicKey), "ok: ")
	if n == 0 {
		t.Fatalf("no thread signed: %s", out)
	}
	t.Logf("%d signatures", n)
}

// A host thread cancelled (pthread_cancel) while C_Sign waits on the
// agent: poll(2) is a cancellation point, and a thread taken out there
// kept its session's lock and its place in the call gate, so the next
// call on the session and C_Finalize waited forever. The call runs to its
// end (here the module's timeout, CKR_DEVICE_ERROR) and the thread is
// cancelled after it. testdata/cancel.c.
func TestCancelledThreadLeavesTheModuleUsable(t *testing.T) {
	fake := startFake(t, newFakeKeys(t))
	fake.silent.Store(true)
	conf := filepath.Join(shortDir(t), "pkcs11.conf")
	if err := os.WriteFile(conf, []byte("socket = "+fake.sock+"\ntimeout_ms = 100\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bin := ccProgram(t, "cancel")
	out := runBounded(t, 30*time.Second, []string{"SIGIL_PKCS11_CONF=" + conf}, bin, modulePath(t), "p256")
	if strings.TrimSpace(out) != "ok: C_Sign rv 0x30" {
		t.Fatalf("cancel: %s, want C_Sign to end with CKR_DEVICE_ERROR (0x30)", out)
	}
}

// A reply already in the socket when the round trip's deadline has passed
// (the host was stopped or descheduled past it) is read, not dropped: the
// agent signed and journaled it, and CKR_DEVICE_ERROR would lose it.
// testdata/latereply.c includes csrc/agent.c to call its read_frame.
func TestReplyInTheSocketPastTheDeadlineIsRead(t *testing.T) {
	need(t, "cc")
	bin := filepath.Join(t.TempDir(), "latereply")
	if out, err := exec.Command("cc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror", "-I/usr/include/p11-kit-1", "-Icsrc",
		"-o", bin, "testdata/latereply.c", "csrc/wire.c", "-lcrypto").CombinedOutput(); err != nil {
		t.Fatalf("cc latereply.c: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin).CombinedOutput(); err != nil {
		t.Fatalf("%s(%v)", out, err)
	}
}
