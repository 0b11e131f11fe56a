package agent_test

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	sshagentclient "golang.org/x/crypto/ssh/agent"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// OpenSSH's own tools use keys behind Sigil through the ssh-agent socket:
// ssh-add lists them, ssh-keygen signs with one and verifies, adding a key
// is refused, and the signature is in the audit journal.
func TestSSHAgentSocketWithOpenSSH(t *testing.T) {
	for _, tool := range []string{"ssh-add", "ssh-keygen"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install openssh-client)", tool)
		}
	}
	cfg := softwareConfig(t)
	cfg.SSHKeys = []string{"ed", "default"}
	a, err := agent.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	sshSock := filepath.Join(filepath.Dir(cfg.Socket), "ssh.sock")
	ln, err := agent.ListenUnix(sshSock)
	if err != nil {
		t.Fatal(err)
	}
	go a.ServeSSHAgent(ln)
	env := append(os.Environ(), "SSH_AUTH_SOCK="+sshSock)
	run := func(stdin string, name string, args ...string) (string, error) {
		cmd := exec.Command(name, args...)
		cmd.Env = env
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run("", "ssh-add", "-L")
	if err != nil {
		t.Fatalf("ssh-add -L: %v %s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("ssh-add -L lists %d keys, want the 2 ssh_keys:\n%s", len(lines), out)
	}
	dir := t.TempDir()
	var edLine string
	for _, l := range lines {
		if strings.HasPrefix(l, "ssh-ed25519 ") {
			edLine = l
		}
	}
	if edLine == "" {
		t.Fatalf("no ed25519 key listed:\n%s", out)
	}
	pub := filepath.Join(dir, "ed.pub")
	os.WriteFile(pub, []byte(edLine+"\n"), 0o644)
	data := filepath.Join(dir, "data")
	os.WriteFile(data, []byte("release 2.0"), 0o644)
	if out, err := run("", "ssh-keygen", "-Y", "sign", "-f", pub, "-n", "file", data); err != nil {
		t.Fatalf("ssh-keygen -Y sign through the agent: %v %s", err, out)
	}
	fields := strings.Fields(edLine)
	allowed := filepath.Join(dir, "allowed")
	os.WriteFile(allowed, []byte("sigil@test "+fields[0]+" "+fields[1]+"\n"), 0o644)
	if out, err := run("release 2.0", "ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "sigil@test", "-n", "file", "-s", data+".sig"); err != nil {
		t.Fatalf("ssh-keygen -Y verify: %v %s", err, out)
	}
	if out, err := run("release 2.1", "ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "sigil@test", "-n", "file", "-s", data+".sig"); err == nil {
		t.Fatalf("verified over other data: %s", out)
	}
	priv := filepath.Join(dir, "id")
	if out, err := run("", "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", priv); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	if out, err := run("", "ssh-add", priv); err == nil {
		t.Fatalf("ssh-add of a private key was accepted: %s", out)
	}

	j := journalOfStopped(t, a, cfg)
	found := false
	j.Scan(context.Background(), journal.Filter{}, func(r *journal.Record) error {
		if strings.HasPrefix(r.Peer, "ssh:") && r.Slot == "ed" && r.CodeName == "OK" {
			found = true
		}
		return nil
	})
	if !found {
		t.Fatal("the SSH signature has no audit record")
	}
}

// The ssh-agent socket keeps the client socket's limits: an oversized
// length prefix and a message dribbled past frame_timeout close only that
// connection, connections count against max_conns_per_tenant, and a
// well-behaved ssh-agent client keeps working.
func TestSSHAgentSocketLimits(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.SSHKeys = []string{"ed"}
	cfg.Limits.FrameTimeout = 300 * time.Millisecond
	cfg.Limits.MaxConnsPerTenant = 3
	r := startAgent(t, cfg)
	sshSock := r.serveSSH(t, cfg)
	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("unix", sshSock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// One agent client per connection: x/crypto's client reads replies on
	// a goroutine of its own, so two clients on one connection would race
	// for each other's replies.
	clients := map[net.Conn]sshagentclient.ExtendedAgent{}
	listKeys := func(c net.Conn) error {
		ac, ok := clients[c]
		if !ok {
			ac = sshagentclient.NewClient(c)
			clients[c] = ac
		}
		keys, err := ac.List()
		if err == nil && len(keys) != 1 {
			err = fmt.Errorf("%d keys listed, want 1", len(keys))
		}
		return err
	}

	huge := dial()
	huge.Write([]byte{0x00, 0xff, 0xff, 0xff}) // 16 MiB announced
	waitClosed(t, huge, 5*time.Second)

	slow := dial()
	slow.Write([]byte{0, 0, 0, 1}) // one body byte that never comes
	if took := waitClosed(t, slow, 5*time.Second); took < 200*time.Millisecond {
		t.Fatalf("closed after %v, before frame_timeout", took)
	}

	// The tenant's connections: the Unix client socket's one (r.dial) and
	// two ssh-agent ones fill max_conns_per_tenant = 3.
	r.dial(t)
	good := dial()
	if err := listKeys(good); err != nil {
		t.Fatal(err)
	}
	second := dial()
	if err := listKeys(second); err != nil {
		t.Fatal(err)
	}
	if err := listKeys(dial()); err == nil {
		t.Fatal("a connection past max_conns_per_tenant was served")
	}
	second.Close()
	deadline := time.Now().Add(5 * time.Second)
	for listKeys(dial()) != nil {
		if time.Now().After(deadline) {
			t.Fatal("a closed ssh-agent connection did not free its place")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := listKeys(good); err != nil {
		t.Fatalf("the well-behaved connection: %v", err)
	}
}

// closeWatcher counts the signatures its provider finished after Close:
// with a PKCS#11 module that would be a call into a finalized library.
type closeWatcher struct {
	slowProvider
	closed, signedAfterClose atomic.Int32
}

func (w *closeWatcher) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	sig, err := w.slowProvider.Sign(ctx, key, alg, digest)
	if err == nil && w.closed.Load() != 0 {
		w.signedAfterClose.Add(1)
	}
	return sig, err
}

func (w *closeWatcher) Close() error {
	w.closed.Store(1)
	return w.slowProvider.Close()
}

// Shutdown with an SSH signature in flight waits for it to end (cancelled)
// before it closes the providers and the journal.
func TestShutdownEndsSSHSignaturesFirst(t *testing.T) {
	cfg := softwareConfig(t)
	watcher := &closeWatcher{}
	r, sshSock, sshDone := startSlowSSHAgent(t, cfg, 500*time.Millisecond, func(p providers.Provider) providers.Provider {
		watcher.slowProvider = *p.(*slowProvider)
		return watcher
	})
	a := r.agent

	nc, err := net.Dial("unix", sshSock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ac := sshagentclient.NewClient(nc)
	keys, err := ac.List()
	if err != nil || len(keys) != 1 {
		t.Fatalf("List: %d keys, %v", len(keys), err)
	}
	signed := make(chan error, 1)
	go func() {
		_, err := ac.Sign(keys[0], []byte("in flight at shutdown"))
		signed <- err
	}()
	time.Sleep(100 * time.Millisecond) // the signature is in the provider

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	select {
	case err := <-sshDone:
		if err != agent.ErrClosed {
			t.Errorf("ServeSSHAgent returned %v, want ErrClosed", err)
		}
	default:
		t.Error("Shutdown returned while ServeSSHAgent still ran")
	}
	if err := <-signed; err == nil {
		t.Error("the SSH signature in flight at shutdown was delivered")
	}
	time.Sleep(600 * time.Millisecond) // past the provider's delay
	if n := watcher.signedAfterClose.Load(); n != 0 {
		t.Fatalf("%d signatures made after the providers were closed", n)
	}
}

// SSH signatures count against limits.max_in_flight_per_tenant like the
// client socket's: with one token, two connections' signatures take turns.
func TestSSHSignaturesShareTheTenantInFlightLimit(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.MaxInFlightPerTenant = 1
	const delay = 300 * time.Millisecond
	_, sshSock, _ := startSlowSSHAgent(t, cfg, delay, nil)
	const conns = 2
	start := time.Now()
	errs := make(chan error, conns)
	for range conns {
		nc, err := net.Dial("unix", sshSock)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		go func() {
			ac := sshagentclient.NewClient(nc)
			keys, err := ac.List()
			if err == nil && len(keys) != 1 {
				err = fmt.Errorf("%d keys", len(keys))
			}
			if err == nil {
				_, err = ac.Sign(keys[0], []byte("taking turns"))
			}
			errs <- err
		}()
	}
	for range conns {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// A lower bound only: they cannot finish sooner than one after the other.
	if took := time.Since(start); took < conns*delay {
		t.Fatalf("%d signatures of %v each took %v with one in-flight token: they ran side by side", conns, delay, took)
	}
}

// startSlowSSHAgent runs an agent on cfg with an ssh-agent socket that
// serves one Ed25519 key, "slow", whose every signature takes delay (wrap,
// when set, wraps its provider). It returns the agent, the ssh-agent
// socket and what ServeSSHAgent returns.
func startSlowSSHAgent(t *testing.T, cfg agent.Config, delay time.Duration, wrap func(providers.Provider) providers.Provider) (*running, string, chan error) {
	t.Helper()
	cfg.SSHKeys = []string{"slow"}
	soft, err := software.Open(software.Config{ID: "slow", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "slow", Type: providers.KeyEd25519}}})
	if err != nil {
		t.Fatal(err)
	}
	var p providers.Provider = &slowProvider{Provider: soft, delay: delay}
	if wrap != nil {
		p = wrap(p)
	}
	r := startAgent(t, cfg, agent.WithProviders(p))
	sshSock := filepath.Join(filepath.Dir(cfg.Socket), "ssh.sock")
	ln, err := agent.ListenUnix(sshSock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.agent.ServeSSHAgent(ln) }()
	return r, sshSock, done
}

// The ssh-agent front holds a signature's policy fence until its reply is
// written, as the socket does: a Pause is not acknowledged while ssh-agent
// signatures it let through wait behind a client that does not read. The
// fence used to end before the ssh-agent server wrote the reply, and the
// reply's write had no deadline.
func TestSSHPauseAckComesAfterRepliesLeave(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.SSHKeys = []string{"release"}
	cfg.Limits.WriteTimeout = 2 * time.Second
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	os.WriteFile(cfg.Policy, []byte(releasePolicy("ed", "")), 0o600)
	r := startAgent(t, cfg)
	sshSock := r.serveSSH(t, cfg)
	admin := r.serveAdmin(t, cfg.AdminSocket)

	lc, err := net.Dial("unix", sshSock)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := sshagentclient.NewClient(lc).List()
	lc.Close()
	if err != nil || len(keys) != 1 {
		t.Fatalf("keys %v %v", keys, err)
	}
	// SSH_AGENTC_SIGN_REQUEST (13): string key blob, string data, uint32 flags.
	blob := keys[0].Blob
	body := []byte{13}
	body = binary.BigEndian.AppendUint32(body, uint32(len(blob)))
	body = append(body, blob...)
	body = binary.BigEndian.AppendUint32(body, 9)
	body = append(body, "to be signed"[:9]...)
	body = binary.BigEndian.AppendUint32(body, 0)
	var frames []byte
	for range 3000 {
		frames = binary.BigEndian.AppendUint32(frames, uint32(len(body)))
		frames = append(frames, body...)
	}
	nc, err := net.Dial("unix", sshSock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	go nc.Write(frames)     // blocks once the agent stops reading
	time.Sleep(time.Second) // the agent's replies fill the client's socket
	pauseWritesNothingAfterItsAck(t, admin, "payments/release", nc, bufio.NewReader(nc))
}

// A signature the ssh-agent front refuses before it names a key — the key
// blob of another tenant's key, or of no key of ours — is journaled as the
// same refusal on the client socket is (NOT_FOUND, the peer, the tenant):
// an audit that reads the journal sees a tenant probing for keys whichever
// socket it used.
func TestSSHRefusalsAreJournaled(t *testing.T) {
	soft, err := software.Open(software.Config{ID: "tenants", DataDir: t.TempDir(), Keys: []software.KeyConfig{
		{Name: "pay-key", Type: providers.KeyEd25519},
		{Name: "shop-key", Type: providers.KeyECDSAP256},
		{Name: "pay-rsa", Type: providers.KeyRSA2048},
	}})
	if err != nil {
		t.Fatal(err)
	}
	infos, err := soft.Keys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	pubs := map[string]ssh.PublicKey{}
	for _, k := range infos {
		if pubs[k.Name], err = ssh.NewPublicKey(k.Public); err != nil {
			t.Fatal(err)
		}
	}
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	if pubs["stranger"], err = ssh.NewPublicKey(stranger.Public()); err != nil {
		t.Fatal(err)
	}

	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(cfg.Policy, []byte(fmt.Sprintf(`tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: pay-key}
      - {name: legacy, key: pay-rsa}
  - name: shop
    identities: {mtls: [shop-client]}
    slots:
      - {name: release, key: shop-key}
`, os.Getuid())), 0o600)
	r := startAgent(t, cfg, agent.WithProviders(soft))
	sshSock := r.serveSSH(t, cfg)
	nc, err := net.Dial("unix", sshSock)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ac := sshagentclient.NewClient(nc)
	if keys, err := ac.List(); err != nil || len(keys) != 2 {
		t.Fatalf("List: %v %v, want payments' two keys", keys, err)
	}
	// Plain ssh-rsa (no flags) asks for SHA-1.
	for _, name := range []string{"shop-key", "stranger", "pay-rsa"} {
		if _, err := ac.Sign(pubs[name], []byte("probe "+name)); err == nil {
			t.Fatalf("signed with %s", name)
		}
	}
	sig, err := ac.Sign(pubs["pay-key"], []byte("own key"))
	if err != nil {
		t.Fatal(err)
	}
	if err := pubs["pay-key"].Verify([]byte("own key"), sig); err != nil {
		t.Fatal(err)
	}
	nc.Close()

	j := journalOfStopped(t, r.agent, cfg)
	wantSlot := map[string]string{
		"NOT_FOUND":             "SHA256:", // the client's key, by fingerprint
		"UNSUPPORTED_ALGORITHM": "payments/legacy",
		"OK":                    "payments/release",
	}
	var refused, signed int
	j.Scan(context.Background(), journal.Filter{}, func(rec *journal.Record) error {
		if rec.Op != "sign" {
			return nil // the slots' enrolments
		}
		if !strings.HasPrefix(rec.Peer, "ssh:") || rec.Tenant != "payments" {
			t.Errorf("record %d: peer %q op %q tenant %q", rec.Seq, rec.Peer, rec.Op, rec.Tenant)
		}
		if !strings.HasPrefix(rec.Slot, wantSlot[rec.CodeName]) {
			t.Errorf("record %d (%s): slot %q", rec.Seq, rec.CodeName, rec.Slot)
		}
		if rec.CodeName == "OK" {
			signed++
		} else {
			refused++
		}
		return nil
	})
	if refused != 3 || signed != 1 {
		t.Fatalf("journal: %d refused and %d OK ssh signatures, want 3 and 1", refused, signed)
	}
}

// limits.idle_timeout closes a quiet ssh-agent connection as it does a
// client socket's, counting from the last reply: a connection that asks
// more often stays, and so does one whose signature takes longer than
// the timeout.
func TestSSHAgentIdleTimeout(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.IdleTimeout = 300 * time.Millisecond
	_, sshSock, _ := startSlowSSHAgent(t, cfg, 500*time.Millisecond, nil)
	dial := func() (net.Conn, sshagentclient.ExtendedAgent) {
		t.Helper()
		nc, err := net.Dial("unix", sshSock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		return nc, sshagentclient.NewClient(nc)
	}
	idle, idleAgent := dial()
	if _, err := idleAgent.List(); err != nil {
		t.Fatal(err)
	}
	_, busy := dial()
	var keys []*sshagentclient.Key
	for range 6 {
		var err error
		if keys, err = busy.List(); err != nil || len(keys) != 1 {
			t.Fatalf("busy connection: %d keys, %v", len(keys), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// 500 ms in the provider, past idle_timeout, then still served.
	for range 2 {
		sig, err := busy.Sign(keys[0], []byte("slow"))
		if err != nil {
			t.Fatalf("a connection waiting on its signature was cut: %v", err)
		}
		if err := keys[0].Verify([]byte("slow"), sig); err != nil {
			t.Fatal(err)
		}
	}
	waitClosed(t, idle, 5*time.Second)
}

// The ssh-agent socket on malformed and unsupported messages
// (draft-miller-ssh-agent): a message it cannot use gets SSH_AGENT_FAILURE
// (5) and the connection goes on; a length it cannot take (0, past
// max_frame) ends the connection.
func TestSSHAgentMalformedMessages(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.SSHKeys = []string{"ed", "rsa"}
	r := startAgent(t, cfg)
	sshSock := r.serveSSH(t, cfg)

	lc, err := net.Dial("unix", sshSock)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := sshagentclient.NewClient(lc).List()
	lc.Close()
	if err != nil || len(keys) != 2 {
		t.Fatalf("List: %d keys, %v", len(keys), err)
	}
	str := func(b []byte) []byte { return append(binary.BigEndian.AppendUint32(nil, uint32(len(b))), b...) }
	signReq := func(blob []byte, data string, flags uint32) []byte {
		m := append([]byte{13}, str(blob)...)
		m = append(m, str([]byte(data))...)
		return binary.BigEndian.AppendUint32(m, flags)
	}
	var edBlob, rsaBlob []byte
	for _, k := range keys {
		switch k.Format {
		case ssh.KeyAlgoED25519:
			edBlob = k.Blob
		case ssh.KeyAlgoRSA:
			rsaBlob = k.Blob
		}
	}
	const (
		failure = 5
		signRes = 14
	)
	tests := []struct {
		name   string
		msg    []byte // the message, its length prefixed
		raw    []byte // or the bytes as sent
		want   byte   // the reply's type; 0: the connection ends
		format string // a signature's format
	}{
		{name: "unknown type", msg: []byte{200, 1, 2, 3}, want: failure},
		{name: "type only, sign", msg: []byte{13}, want: failure},
		{name: "sign, key blob string cut short", msg: append([]byte{13, 0, 0, 1, 0}, edBlob[:10]...), want: failure},
		{name: "sign, data string longer than the message", msg: append(append([]byte{13}, str(edBlob)...), 0xff, 0xff, 0xff, 0xff, 'x'), want: failure},
		{name: "sign, key blob not a key", msg: signReq([]byte("not a key"), "x", 0), want: failure},
		{name: "sign ed25519, unknown flag bits", msg: signReq(edBlob, "x", 0xfff0), want: signRes, format: ssh.KeyAlgoED25519},
		{name: "sign rsa, sha2-256 and unknown bits", msg: signReq(rsaBlob, "x", 0x2|0xf0), want: signRes, format: ssh.KeyAlgoRSASHA256},
		{name: "sign rsa, sha2-512", msg: signReq(rsaBlob, "x", 0x4), want: signRes, format: ssh.KeyAlgoRSASHA512},
		{name: "sign rsa, unknown bits only (SHA-1)", msg: signReq(rsaBlob, "x", 0xf0), want: failure},
		{name: "add identity", msg: append([]byte{17}, str([]byte(ssh.KeyAlgoED25519))...), want: failure},
		{name: "remove all", msg: []byte{19}, want: failure},
		{name: "lock", msg: append([]byte{22}, str([]byte("pw"))...), want: failure},
		{name: "unlock", msg: append([]byte{23}, str([]byte("pw"))...), want: failure},
		{name: "session-bind extension", msg: append(append([]byte{27}, str([]byte("session-bind@openssh.com"))...), str(edBlob)...), want: failure},
		{name: "length 0", raw: []byte{0, 0, 0, 0}},
		{name: "length 2^32-1", raw: []byte{0xff, 0xff, 0xff, 0xff, 11}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nc, err := net.Dial("unix", sshSock)
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			nc.SetDeadline(time.Now().Add(10 * time.Second))
			out := tc.raw
			if out == nil {
				out = append(binary.BigEndian.AppendUint32(nil, uint32(len(tc.msg))), tc.msg...)
			}
			// Pipelined behind it, a List that must be answered whenever
			// the connection goes on.
			out = append(out, 0, 0, 0, 1, 11)
			if _, err := nc.Write(out); err != nil {
				t.Fatal(err)
			}
			br := bufio.NewReader(nc)
			reply, err := readSSHReply(br)
			if tc.want == 0 {
				if err == nil {
					t.Fatalf("answered (type %d), want the connection closed", reply[0])
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if reply[0] != tc.want {
				t.Fatalf("reply type %d, want %d", reply[0], tc.want)
			}
			if tc.format != "" {
				// SSH_AGENT_SIGN_RESPONSE: byte 14, string signature.
				var sig ssh.Signature
				if err := ssh.Unmarshal(reply[1+4:], &sig); err != nil {
					t.Fatal(err)
				}
				if sig.Format != tc.format {
					t.Fatalf("signature format %q, want %q", sig.Format, tc.format)
				}
				blob := edBlob
				if tc.format != ssh.KeyAlgoED25519 {
					blob = rsaBlob
				}
				pub, err := ssh.ParsePublicKey(blob)
				if err != nil {
					t.Fatal(err)
				}
				if err := pub.Verify([]byte("x"), &sig); err != nil {
					t.Fatalf("verify: %v", err)
				}
			}
			next, err := readSSHReply(br)
			if err != nil || next[0] != 12 {
				t.Fatalf("the pipelined List after it: %v %v", next, err)
			}
		})
	}
}

// readSSHReply reads one length-prefixed ssh-agent message.
func readSSHReply(br *bufio.Reader) ([]byte, error) {
	var n [4]byte
	if _, err := io.ReadFull(br, n[:]); err != nil {
		return nil, err
	}
	l := binary.BigEndian.Uint32(n[:])
	if l == 0 || l > 1<<20 {
		return nil, fmt.Errorf("reply length %d", l)
	}
	b := make([]byte, l)
	_, err := io.ReadFull(br, b)
	return b, err
}

// Every key type the agent holds signs through the ssh-agent socket, and
// each signature verifies with x/crypto/ssh under the format it names.
func TestSSHAgentSignaturesVerify(t *testing.T) {
	cfg := softwareConfig(t)
	r := startAgent(t, cfg)
	nc, err := net.Dial("unix", r.serveSSH(t, cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ac := sshagentclient.NewClient(nc)
	keys, err := ac.List()
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*sshagentclient.Key{}
	for _, k := range keys {
		byName[k.Comment] = k
	}
	tests := []struct {
		key    string
		flags  sshagentclient.SignatureFlags
		format string
	}{
		{"ed", 0, ssh.KeyAlgoED25519},
		{"default", 0, ssh.KeyAlgoECDSA256},
		{"p384", 0, ssh.KeyAlgoECDSA384},
		{"rsa", sshagentclient.SignatureFlagRsaSha256, ssh.KeyAlgoRSASHA256},
		{"rsa", sshagentclient.SignatureFlagRsaSha512, ssh.KeyAlgoRSASHA512},
	}
	data := []byte("an SSH signature payload")
	for _, tc := range tests {
		t.Run(tc.format, func(t *testing.T) {
			k := byName[tc.key]
			if k == nil {
				t.Fatalf("%s not listed among %d keys", tc.key, len(keys))
			}
			sig, err := ac.SignWithFlags(k, data, tc.flags)
			if err != nil {
				t.Fatal(err)
			}
			if sig.Format != tc.format {
				t.Fatalf("format %q, want %q", sig.Format, tc.format)
			}
			pub, err := ssh.ParsePublicKey(k.Blob)
			if err != nil {
				t.Fatal(err)
			}
			if err := pub.Verify(data, sig); err != nil {
				t.Fatalf("verify: %v", err)
			}
			if err := pub.Verify([]byte("other data"), sig); err == nil {
				t.Fatal("verified over other data")
			}
		})
	}
}
