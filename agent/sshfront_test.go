package agent_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	sshagentclient "golang.org/x/crypto/ssh/agent"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
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

	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	j, err := journal.Open(journal.Options{Dir: filepath.Join(cfg.DataDir, "journal")})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
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
	sshSock := filepath.Join(filepath.Dir(cfg.Socket), "ssh.sock")
	ln, err := agent.ListenUnix(sshSock)
	if err != nil {
		t.Fatal(err)
	}
	go r.agent.ServeSSHAgent(ln)
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
