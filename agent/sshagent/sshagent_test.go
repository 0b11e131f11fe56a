package sshagent

import (
	"bytes"
	"context"
	"crypto/sha512"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// fakeBackend serves a software provider's keys the way the Sigil agent's
// Backend will: check the request, sign, and record what was asked.
type fakeBackend struct {
	p *software.Provider

	mu       sync.Mutex
	signs    []signCall
	refusals []refusal
}

type refusal struct {
	name, fingerprint string
	err               error
}

type signCall struct {
	name string
	alg  providers.Algorithm
}

func (b *fakeBackend) Keys(ctx context.Context) ([]Key, error) {
	ks, err := b.p.Keys(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Key, len(ks))
	for i, k := range ks {
		out[i] = Key{Name: k.Name, Public: k.Public}
	}
	return out, nil
}

func (b *fakeBackend) Sign(ctx context.Context, name string, alg providers.Algorithm, msg []byte) ([]byte, error) {
	ks, err := b.p.Keys(ctx)
	if err != nil {
		return nil, err
	}
	for _, k := range ks {
		if k.Name != name {
			continue
		}
		if err := providers.CheckRequest(k.Type, alg, msg); err != nil {
			return nil, err
		}
		b.mu.Lock()
		b.signs = append(b.signs, signCall{name, alg})
		b.mu.Unlock()
		return b.p.Sign(ctx, name, alg, msg)
	}
	return nil, errors.New("no such key")
}

func (b *fakeBackend) Refused(_ context.Context, name, fingerprint string, _ []byte, err error) {
	b.mu.Lock()
	b.refusals = append(b.refusals, refusal{name, fingerprint, err})
	b.mu.Unlock()
}

func (b *fakeBackend) lastRefusal() refusal {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.refusals) == 0 {
		return refusal{}
	}
	return b.refusals[len(b.refusals)-1]
}

func (b *fakeBackend) lastSign() signCall {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.signs) == 0 {
		return signCall{}
	}
	return b.signs[len(b.signs)-1]
}

var testKeys = []software.KeyConfig{
	{Name: "ssh-p256", Type: providers.KeyECDSAP256},
	{Name: "ssh-p384", Type: providers.KeyECDSAP384},
	{Name: "ssh-rsa2048", Type: providers.KeyRSA2048},
	{Name: "ssh-ed25519", Type: providers.KeyEd25519},
}

// startAgent serves a fakeBackend on a fresh Unix socket and returns the
// socket's path. The socket lives in a short directory: sun_path is 108 bytes.
func startAgent(t *testing.T) (string, *fakeBackend) {
	t.Helper()
	p, err := software.Open(software.Config{ID: "soft", DataDir: t.TempDir(), Keys: testKeys})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	b := &fakeBackend{p: p}

	dir, err := os.MkdirTemp("", "sigil-ssh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, ln, func(c net.Conn) (Backend, net.Conn, error) { return b, c, nil }, zaptest.NewLogger(t))
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return sock, b
}

func dialAgent(t *testing.T, sock string) agent.ExtendedAgent {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return agent.NewClient(c)
}

func TestInProcess(t *testing.T) {
	sock, b := startAgent(t)
	ac := dialAgent(t, sock)

	keys, err := ac.List()
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*agent.Key{}
	for _, k := range keys {
		byName[k.Comment] = k
	}
	if len(keys) != len(testKeys) {
		t.Fatalf("listed %d keys, want %d", len(keys), len(testKeys))
	}
	data := []byte("the whole SSH signature payload")

	tests := []struct {
		key    string
		flags  agent.SignatureFlags
		format string
		alg    providers.Algorithm
	}{
		{"ssh-ed25519", 0, ssh.KeyAlgoED25519, providers.Algorithm{Scheme: providers.SchemeEd25519}},
		{"ssh-p256", 0, ssh.KeyAlgoECDSA256, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: 5}},
		{"ssh-p384", 0, ssh.KeyAlgoECDSA384, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: 6}},
		{"ssh-rsa2048", agent.SignatureFlagRsaSha256, ssh.KeyAlgoRSASHA256, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: 5}},
		{"ssh-rsa2048", agent.SignatureFlagRsaSha512, ssh.KeyAlgoRSASHA512, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: 7}},
		// Both flags: SHA-256, as OpenSSH's ssh-agent picks
		// (agent_decode_alg), so a slot allowing only rsa-pkcs1-sha256
		// signs for such a client here as there.
		{"ssh-rsa2048", agent.SignatureFlagRsaSha256 | agent.SignatureFlagRsaSha512, ssh.KeyAlgoRSASHA256, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: 5}},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s/flags%d", tc.format, tc.flags), func(t *testing.T) {
			k := byName[tc.key]
			if k == nil {
				t.Fatalf("key %s not listed", tc.key)
			}
			pub, err := ssh.ParsePublicKey(k.Blob)
			if err != nil {
				t.Fatal(err)
			}
			sig, err := ac.SignWithFlags(pub, data, tc.flags)
			if err != nil {
				t.Fatal(err)
			}
			if sig.Format != tc.format {
				t.Errorf("format %q, want %q", sig.Format, tc.format)
			}
			if err := pub.Verify(data, sig); err != nil {
				t.Errorf("verify: %v", err)
			}
			if got := b.lastSign(); got != (signCall{tc.key, tc.alg}) {
				t.Errorf("backend asked %+v, want %s %v", got, tc.key, tc.alg)
			}
			bad := *sig
			if err := pub.Verify(append([]byte("x"), data...), &bad); err == nil {
				t.Error("signature verified over other data")
			}
		})
	}

	t.Run("ssh-rsa SHA-1 refused", func(t *testing.T) {
		pub, _ := ssh.ParsePublicKey(byName["ssh-rsa2048"].Blob)
		if _, err := ac.Sign(pub, data); err == nil {
			t.Fatal("plain ssh-rsa (SHA-1) signature was produced")
		}
		if got := b.lastRefusal(); got.name != "ssh-rsa2048" || got.fingerprint != ssh.FingerprintSHA256(pub) || !errors.Is(got.err, ErrSHA1) {
			t.Fatalf("backend told of %+v, want the refusal of ssh-rsa2048 with ErrSHA1", got)
		}
	})
	t.Run("unknown key refused", func(t *testing.T) {
		other, err := ssh.NewPublicKey(testEd25519Pub(t))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ac.Sign(other, data); err == nil {
			t.Fatal("signed with a key the backend does not list")
		}
		if got := b.lastRefusal(); got.name != "" || got.fingerprint != ssh.FingerprintSHA256(other) || !errors.Is(got.err, ErrUnknownKey) {
			t.Fatalf("backend told of %+v, want the refusal of an unknown key", got)
		}
	})
	t.Run("mutations refused", func(t *testing.T) {
		pub, _ := ssh.ParsePublicKey(byName["ssh-p256"].Blob)
		for name, err := range map[string]error{
			"remove":     ac.Remove(pub),
			"remove all": ac.RemoveAll(),
			"lock":       ac.Lock([]byte("pw")),
			"unlock":     ac.Unlock([]byte("pw")),
		} {
			if err == nil {
				t.Errorf("%s was not refused", name)
			}
		}
		if _, err := ac.Extension("session-bind@openssh.com", nil); err == nil {
			t.Error("extension was not refused")
		}
		if keys, _ := ac.List(); len(keys) != len(testKeys) {
			t.Errorf("after refused mutations %d keys listed, want %d", len(keys), len(testKeys))
		}
	})
}

func TestFrontDirect(t *testing.T) {
	a := NewAgent(context.Background(), &fakeBackend{}, nil)
	if err := a.Add(agent.AddedKey{}); !errors.Is(err, ErrRefused) {
		t.Errorf("Add: %v, want ErrRefused", err)
	}
	if _, err := a.Extension("x", nil); !errors.Is(err, agent.ErrExtensionUnsupported) {
		t.Errorf("Extension: %v, want ErrExtensionUnsupported", err)
	}
	if _, err := ecdsaDERToSSH([]byte{0x30, 0x00}); err == nil {
		t.Error("empty DER sequence accepted")
	}
}

func testEd25519Pub(t *testing.T) any {
	t.Helper()
	p, err := software.Open(software.Config{ID: "other", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "x", Type: providers.KeyEd25519}}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ks, err := p.Keys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return ks[0].Public
}

// TestOpenSSH drives the front with the real OpenSSH client tools.
func TestOpenSSH(t *testing.T) {
	for _, tool := range []string{"ssh-add", "ssh-keygen"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("OpenSSH client tools are not installed (%s: %v); install openssh-client to run this test", tool, err)
		}
	}
	sock, b := startAgent(t)
	dir := t.TempDir()
	env := append(os.Environ(), "SSH_AUTH_SOCK="+sock)
	run := func(t *testing.T, stdin []byte, name string, args ...string) ([]byte, error) {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Env = env
		if stdin != nil {
			cmd.Stdin = bytes.NewReader(stdin)
		}
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		if err != nil {
			t.Logf("%s %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), err, out.String(), errb.String())
		}
		return out.Bytes(), err
	}

	out, err := run(t, nil, "ssh-add", "-L")
	if err != nil {
		t.Fatal("ssh-add -L failed")
	}
	lines := map[string]string{} // comment -> authorized_keys line
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 {
			t.Fatalf("ssh-add -L line %q", l)
		}
		lines[f[2]] = l
	}
	for _, k := range testKeys {
		if lines[k.Name] == "" {
			t.Errorf("ssh-add -L does not list %s:\n%s", k.Name, out)
		}
	}
	if len(lines) != len(testKeys) {
		t.Errorf("ssh-add -L lists %d keys, want %d", len(lines), len(testKeys))
	}

	data := []byte("a file signed through Sigil's ssh-agent front\n")
	tests := []struct {
		key    string
		sigAlg string // what the signature must be, as ssh.Signature.Format
		alg    providers.Algorithm
	}{
		{"ssh-ed25519", ssh.KeyAlgoED25519, providers.Algorithm{Scheme: providers.SchemeEd25519}},
		{"ssh-p256", ssh.KeyAlgoECDSA256, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: 5}},
		{"ssh-p384", ssh.KeyAlgoECDSA384, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: 6}},
		{"ssh-rsa2048", ssh.KeyAlgoRSASHA512, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: 7}},
	}
	for _, tc := range tests {
		t.Run(tc.key, func(t *testing.T) {
			kd := filepath.Join(dir, tc.key)
			if err := os.Mkdir(kd, 0o700); err != nil {
				t.Fatal(err)
			}
			pubFile := filepath.Join(kd, "id.pub")
			dataFile := filepath.Join(kd, "data")
			allowed := filepath.Join(kd, "allowed_signers")
			line := lines[tc.key]
			f := strings.Fields(line)
			if err := os.WriteFile(pubFile, []byte(line+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(dataFile, data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(allowed, []byte("sigil@test "+f[0]+" "+f[1]+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := run(t, nil, "ssh-keygen", "-Y", "sign", "-f", pubFile, "-n", "file", dataFile); err != nil {
				t.Fatal("ssh-keygen -Y sign through the agent failed")
			}
			if got := b.lastSign(); got != (signCall{tc.key, tc.alg}) {
				t.Errorf("backend asked %+v, want %s %v", got, tc.key, tc.alg)
			}
			sigFile := dataFile + ".sig"
			if _, err := run(t, data, "ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "sigil@test", "-n", "file", "-s", sigFile); err != nil {
				t.Fatal("ssh-keygen -Y verify rejected the signature")
			}
			if _, err := run(t, append(data, 'x'), "ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "sigil@test", "-n", "file", "-s", sigFile); err == nil {
				t.Error("ssh-keygen -Y verify accepted the signature over other data")
			}
			// In process: the SSHSIG's inner signature has the expected
			// format and verifies with x/crypto/ssh.
			armored, err := os.ReadFile(sigFile)
			if err != nil {
				t.Fatal(err)
			}
			pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
			if err != nil {
				t.Fatal(err)
			}
			sig, signed := parseSSHSIG(t, armored, data)
			if sig.Format != tc.sigAlg {
				t.Errorf("signature format %q, want %q", sig.Format, tc.sigAlg)
			}
			if err := pub.Verify(signed, sig); err != nil {
				t.Errorf("x/crypto/ssh rejects the signature: %v", err)
			}
		})
	}

	t.Run("ssh-add of a private key is refused", func(t *testing.T) {
		keyFile := filepath.Join(dir, "private")
		if _, err := run(t, nil, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "intruder", "-f", keyFile); err != nil {
			t.Fatal("ssh-keygen could not make a key")
		}
		if _, err := run(t, nil, "ssh-add", keyFile); err == nil {
			t.Fatal("ssh-add of a private key succeeded")
		}
		if _, err := run(t, nil, "ssh-add", "-D"); err == nil {
			t.Error("ssh-add -D succeeded")
		}
		out, err := run(t, nil, "ssh-add", "-L")
		if err != nil || strings.Contains(string(out), "intruder") || strings.Count(string(out), "\n") != len(testKeys) {
			t.Errorf("after refused additions ssh-add -L lists:\n%s", out)
		}
	})
}

// parseSSHSIG decodes an armored SSHSIG (PROTOCOL.sshsig) made with the
// "file" namespace over message, and returns its inner signature and the
// blob that signature covers.
func parseSSHSIG(t *testing.T, armored, message []byte) (*ssh.Signature, []byte) {
	t.Helper()
	blk, _ := pem.Decode(armored)
	if blk == nil || blk.Type != "SSH SIGNATURE" {
		t.Fatalf("not an armored SSH signature:\n%s", armored)
	}
	if !bytes.HasPrefix(blk.Bytes, []byte("SSHSIG")) {
		t.Fatal("SSHSIG magic missing")
	}
	var s struct {
		Version   uint32
		PublicKey []byte
		Namespace string
		Reserved  string
		HashAlg   string
		Signature []byte
	}
	if err := ssh.Unmarshal(blk.Bytes[6:], &s); err != nil {
		t.Fatalf("SSHSIG: %v", err)
	}
	if s.Namespace != "file" || s.HashAlg != "sha512" {
		t.Fatalf("SSHSIG namespace %q hash %q", s.Namespace, s.HashAlg)
	}
	var sig ssh.Signature
	if err := ssh.Unmarshal(s.Signature, &sig); err != nil {
		t.Fatalf("SSHSIG signature: %v", err)
	}
	h := sha512.Sum512(message)
	signed := append([]byte("SSHSIG"), ssh.Marshal(struct {
		Namespace, Reserved, HashAlg string
		Hash                         []byte
	}{s.Namespace, s.Reserved, s.HashAlg, h[:]})...)
	return &sig, signed
}

// alienKey is a key blob a client made up: its type is whatever the
// client wrote, up to a whole message.
type alienKey struct{ typ string }

func (k alienKey) Type() string { return k.typ }
func (k alienKey) Marshal() []byte {
	return ssh.Marshal(struct{ Format, Rest string }{k.typ, "x"})
}
func (k alienKey) Verify([]byte, *ssh.Signature) error { return errors.New("no") }

// A sign request for a key the agent does not serve is logged by the
// key's fingerprint, a bounded name: not by the key type the request
// carries, which is the client's bytes (a whole message of them, invalid
// UTF-8 and all), as docs/security.md has it for a malformed frame's.
func TestSignRefusalLogsNoClientBytes(t *testing.T) {
	p, err := software.Open(software.Config{ID: "soft", DataDir: t.TempDir(), Keys: testKeys[:1]})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	core, logs := observer.New(zap.DebugLevel)
	a := NewAgent(context.Background(), &fakeBackend{p: p}, zap.New(core))
	junk := "client-bytes-" + strings.Repeat("\xff", 8) + strings.Repeat("A", 60000)
	if _, err := a.SignWithFlags(alienKey{junk}, []byte("data"), 0); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("SignWithFlags: %v, want ErrUnknownKey", err)
	}
	if logs.Len() == 0 {
		t.Fatal("the refusal was not logged")
	}
	for _, e := range logs.All() {
		for k, v := range e.ContextMap() {
			if s, ok := v.(string); ok && (strings.Contains(s, "client-bytes-") || len(s) > 256) {
				t.Errorf("log %q field %s carries the client's bytes (%d bytes)", e.Message, k, len(s))
			}
		}
	}
}
