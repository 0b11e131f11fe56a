package pkcs11module

import (
	"context"
	"crypto"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"
	"golang.org/x/crypto/ssh"

	"github.com/sigil-agent/sigil/proto"
)

// The agent's keys, software and SoftHSM2, as pkcs11-tool sees them through
// the module: listed, signed with under each family's mechanisms, and every
// signature verified by openssl against the agent's public key.
// A host that finds the agent by default (no SIGIL_SOCK, no
// XDG_RUNTIME_DIR: /tmp/sigil-$UID) does not talk to an agent in a
// directory another local user could have made or can write to.
func TestModuleRefusesAnUntrustedDefaultSocketDir(t *testing.T) {
	need(t, "pkcs11-tool")
	tmp := shortDir(t)
	t.Setenv("XDG_RUNTIME_DIR", "")
	t.Setenv("TMPDIR", tmp)
	f := startFixture(t, fixtureOptions{socketDir: filepath.Dir(proto.DefaultSocketPath())})
	t.Setenv(proto.SocketEnv, "")
	mod := modulePath(t)
	if out := run(t, nil, "pkcs11-tool", "--module", mod, "--list-objects"); !strings.Contains(out, "label:      p256\n") {
		t.Fatalf("the user's own default socket dir: pkcs11-tool --list-objects:\n%s", out)
	}
	if err := os.Chmod(filepath.Dir(f.cfg.Socket), 0o777); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("pkcs11-tool", "--module", mod, "--list-objects").CombinedOutput()
	if err == nil || strings.Contains(string(out), "label:      p256") {
		t.Fatalf("pkcs11-tool listed keys of an agent in a socket dir others can write to (err %v):\n%s", err, out)
	}
	if !strings.Contains(string(out), "refusing to trust an agent there") {
		t.Errorf("pkcs11-tool does not say why:\n%s", out)
	}
}

func TestPkcs11ToolSignsAndOpenSSLVerifies(t *testing.T) {
	need(t, "pkcs11-tool", "openssl")
	f := startFixture(t, fixtureOptions{hsm: true})
	mod := modulePath(t)
	tool := func(args ...string) string {
		return run(t, nil, "pkcs11-tool", append([]string{"--module", mod}, args...)...)
	}
	objects := tool("--list-objects")
	for name := range f.keys {
		for _, class := range []string{"Private Key Object", "Public Key Object"} {
			if !strings.Contains(objects, "label:      "+name+"\n") || !strings.Contains(objects, class) {
				t.Errorf("pkcs11-tool --list-objects does not show %s %q:\n%s", class, name, objects)
			}
		}
	}
	if mechs := tool("--list-mechanisms"); !strings.Contains(mechs, "ECDSA-SHA256") || !strings.Contains(mechs, "EDDSA") || !strings.Contains(mechs, "SHA256-RSA-PKCS-PSS") {
		t.Errorf("pkcs11-tool --list-mechanisms:\n%s", mechs)
	}

	msg := filepath.Join(f.dir, "message")
	os.WriteFile(msg, message, 0o600)
	dig := filepath.Join(f.dir, "digest")
	os.WriteFile(dig, sum(crypto.SHA256, message), 0o600)
	info := filepath.Join(f.dir, "digestinfo")
	os.WriteFile(info, digestInfo(crypto.SHA256, message), 0o600)
	pss := []string{"-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"}
	cases := []struct {
		key, mech string
		in        string
		extra     []string // pkcs11-tool
		verify    func(pem, sig string) []string
	}{
		{"p256", "ECDSA-SHA256", msg, []string{"--signature-format", "openssl"}, func(pem, sig string) []string {
			return []string{"dgst", "-sha256", "-verify", pem, "-signature", sig, msg}
		}},
		{"p256", "ECDSA", dig, []string{"--signature-format", "openssl"}, func(pem, sig string) []string {
			return []string{"pkeyutl", "-verify", "-pubin", "-inkey", pem, "-in", dig, "-sigfile", sig}
		}},
		{"p384", "ECDSA-SHA384", msg, []string{"--signature-format", "openssl"}, func(pem, sig string) []string {
			return []string{"dgst", "-sha384", "-verify", pem, "-signature", sig, msg}
		}},
		{"rsa", "SHA256-RSA-PKCS", msg, nil, func(pem, sig string) []string {
			return []string{"dgst", "-sha256", "-verify", pem, "-signature", sig, msg}
		}},
		{"rsa", "RSA-PKCS", info, nil, func(pem, sig string) []string {
			return []string{"dgst", "-sha256", "-verify", pem, "-signature", sig, msg}
		}},
		{"rsa", "SHA256-RSA-PKCS-PSS", msg, nil, func(pem, sig string) []string {
			return append([]string{"dgst", "-sha256", "-verify", pem, "-signature", sig}, append(pss, msg)...)
		}},
		{"rsa", "RSA-PKCS-PSS", dig, []string{"--hash-algorithm", "SHA256", "--mgf", "MGF1-SHA256", "--salt-len", "32"}, func(pem, sig string) []string {
			return append([]string{"dgst", "-sha256", "-verify", pem, "-signature", sig}, append(pss, msg)...)
		}},
		{"ed", "EDDSA", msg, nil, func(pem, sig string) []string {
			return []string{"pkeyutl", "-verify", "-pubin", "-inkey", pem, "-rawin", "-in", msg, "-sigfile", sig}
		}},
	}
	for _, prefix := range []string{"", "hsm-"} {
		for _, tc := range cases {
			key := prefix + tc.key
			if _, ok := f.keys[key]; !ok {
				continue // p384 is software only
			}
			t.Run(key+"/"+tc.mech, func(t *testing.T) {
				sig := filepath.Join(f.dir, key+"-"+tc.mech+".sig")
				// By CKA_ID, the kid: pkcs11-tool --sign selects keys by id.
				tool(append([]string{"--sign", "--mechanism", tc.mech, "--id", f.keys[key].KID, "--input-file", tc.in, "--output-file", sig}, tc.extra...)...)
				out := run(t, nil, "openssl", tc.verify(f.pem(key), sig)...)
				if !strings.Contains(out, "Verified OK") && !strings.Contains(out, "Signature Verified Successfully") {
					t.Fatalf("openssl: %s", out)
				}
			})
		}
	}
}

// OpenSSH: ssh-keygen -D prints the agent's ECDSA and RSA keys through the
// module; ssh-agent loads the module (ssh-add -s) and signs with it for
// ssh-keygen -Y sign, and ssh-keygen -Y verify accepts the signature.
// OpenSSH 9.2's PKCS#11 code knows no Ed25519, so it skips those keys.
func TestOpenSSHThroughTheModule(t *testing.T) {
	need(t, "ssh-keygen", "ssh-agent", "ssh-add")
	f := startFixture(t, fixtureOptions{hsm: true})
	mod := modulePath(t)
	listed := run(t, nil, "ssh-keygen", "-D", mod)
	for _, name := range []string{"p256", "p384", "rsa", "hsm-p256", "hsm-rsa"} {
		pub, err := ssh.NewPublicKey(f.keys[name].Public)
		if err != nil {
			t.Fatal(err)
		}
		line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub)))
		if !strings.Contains(listed, line+" "+name+"\n") {
			t.Errorf("ssh-keygen -D does not print %s:\n%s", name, listed)
		}
	}

	// ssh-agent only loads modules on its allow-list (-P).
	authSock := filepath.Join(f.dir, "ssh-agent.sock")
	agentCmd := exec.Command("ssh-agent", "-D", "-a", authSock, "-P", filepath.Dir(mod)+"/*")
	agentCmd.Env = os.Environ()
	agentCmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := agentCmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { agentCmd.Process.Kill(); agentCmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(authSock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ssh-agent did not come up")
		}
	}
	// ssh-add -s asks for a PIN; the token needs none, so askpass answers "".
	askpass := filepath.Join(f.dir, "askpass")
	os.WriteFile(askpass, []byte("#!/bin/sh\necho\n"), 0o700)
	env := []string{"SSH_AUTH_SOCK=" + authSock, "SSH_ASKPASS=" + askpass, "SSH_ASKPASS_REQUIRE=force", "DISPLAY=:0"}
	run(t, env, "ssh-add", "-s", mod)
	if out := run(t, env, "ssh-add", "-L"); strings.Count(out, "\n") < 5 {
		t.Fatalf("ssh-agent holds too few module keys:\n%s", out)
	}
	msg := filepath.Join(f.dir, "message")
	os.WriteFile(msg, message, 0o600)
	for _, name := range []string{"p256", "rsa", "hsm-p256", "hsm-rsa"} {
		t.Run(name, func(t *testing.T) {
			pub, _ := ssh.NewPublicKey(f.keys[name].Public)
			pubFile := filepath.Join(f.dir, name+".pub")
			os.WriteFile(pubFile, ssh.MarshalAuthorizedKey(pub), 0o600)
			os.Remove(msg + ".sig")
			run(t, env, "ssh-keygen", "-Y", "sign", "-f", pubFile, "-n", "file", msg)
			allowed := filepath.Join(f.dir, "allowed_signers")
			os.WriteFile(allowed, []byte("sigil@example "+string(ssh.MarshalAuthorizedKey(pub))), 0o600)
			cmd := exec.Command("ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "sigil@example", "-n", "file", "-s", msg+".sig")
			in, _ := os.Open(msg)
			defer in.Close()
			cmd.Stdin = in
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "Good \"file\" signature") {
				t.Fatalf("ssh-keygen -Y verify: %v\n%s", err, out)
			}
		})
	}
}

// OpenSSL through libp11's engine signs a file with a pkcs11: URI naming a
// key behind the agent. libp11 0.4.12 stops enumerating a token's keys at
// an Ed25519 key, so the module's keys= setting shows this host only the
// keys it uses (docs/pkcs11-module.md, Limits).
func TestOpenSSLEngineSigns(t *testing.T) {
	need(t, "openssl")
	engines, _ := filepath.Glob("/usr/lib/*/engines-3/pkcs11.so")
	if len(engines) == 0 {
		t.Skip("libengine-pkcs11-openssl not installed (make test installs it as root)")
	}
	f := startFixture(t, fixtureOptions{hsm: true})
	conf := filepath.Join(f.dir, "sigil-pkcs11.conf")
	os.WriteFile(conf, []byte("# what this host's OpenSSL may use\nkeys = p256, rsa, hsm-p256, hsm-rsa\n"), 0o600)
	t.Setenv("SIGIL_PKCS11_CONF", conf)
	osslConf := filepath.Join(f.dir, "openssl.cnf")
	os.WriteFile(osslConf, []byte(`openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = `+engines[0]+`
MODULE_PATH = `+modulePath(t)+`
init = 0
`), 0o600)
	msg := filepath.Join(f.dir, "message")
	os.WriteFile(msg, message, 0o600)
	for _, name := range []string{"p256", "rsa", "hsm-p256", "hsm-rsa"} {
		t.Run(name, func(t *testing.T) {
			sig := filepath.Join(f.dir, name+".engine.sig")
			run(t, []string{"OPENSSL_CONF=" + osslConf}, "openssl", "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine",
				"-sign", "pkcs11:token=sigil;object="+name+";type=private", "-out", sig, msg)
			out := run(t, nil, "openssl", "dgst", "-sha256", "-verify", f.pem(name), "-signature", sig, msg)
			if !strings.Contains(out, "Verified OK") {
				t.Fatalf("openssl verify: %s", out)
			}
		})
	}
}

// NSS (the PKCS#11 consumer of Firefox, Thunderbird, Chromium on Linux and
// Java's SunPKCS11 through NSS-style modules) loads the module with
// modutil, lists the keys with certutil, and signs certificate requests
// with them: PKCS#1 v1.5 and PSS for RSA, ECDSA for P-256, software and
// SoftHSM2 keys. OpenSSL checks each request's signature and that it
// carries the key behind the agent.
func TestNSSThroughTheModule(t *testing.T) {
	need(t, "certutil", "modutil", "openssl")
	f := startFixture(t, fixtureOptions{hsm: true})
	db := "sql:" + filepath.Join(f.dir, "nssdb")
	os.Mkdir(filepath.Join(f.dir, "nssdb"), 0o700)
	run(t, nil, "certutil", "-N", "-d", db, "--empty-password")
	run(t, nil, "modutil", "-force", "-add", "sigil", "-libfile", modulePath(t), "-dbdir", db)
	pw := filepath.Join(f.dir, "nss-password")
	os.WriteFile(pw, []byte("\n"), 0o600)

	// certutil -K: "< 0> ec  <CKA_ID in hex>  <label>"; NSS finds a key
	// for -k by that ID.
	ids := map[string]string{}
	for _, line := range strings.Split(run(t, nil, "certutil", "-K", "-d", db, "-h", "sigil", "-f", pw), "\n") {
		if fields := strings.Fields(line); len(fields) == 5 && strings.HasPrefix(fields[0], "<") {
			ids[fields[4]] = fields[3]
		}
	}
	for _, tc := range []struct{ key, alg string }{
		{"p256", "ecdsa-with-SHA256"}, {"rsa", "sha256WithRSAEncryption"}, {"rsa", "rsassaPss"},
		{"hsm-p256", "ecdsa-with-SHA256"}, {"hsm-rsa", "sha256WithRSAEncryption"},
	} {
		t.Run(tc.key+"/"+tc.alg, func(t *testing.T) {
			id, ok := ids[tc.key]
			if !ok {
				t.Fatalf("certutil -K does not list %s: %v", tc.key, ids)
			}
			csr := filepath.Join(f.dir, tc.key+"-"+tc.alg+".csr")
			args := []string{"-R", "-d", db, "-h", "sigil", "-f", pw, "-k", id, "-s", "CN=nss " + tc.key, "-Z", "SHA256", "-a", "-o", csr}
			if tc.alg == "rsassaPss" {
				args = append(args, "--pss")
			}
			run(t, nil, "certutil", args...)
			out := run(t, nil, "openssl", "req", "-in", csr, "-noout", "-verify", "-text")
			if !strings.Contains(out, "verify OK") || !strings.Contains(out, "Signature Algorithm: "+tc.alg) {
				t.Fatalf("openssl req -verify:\n%s", out)
			}
			// A --pss request restricts the key to PSS in its SPKI, so
			// RSA keys are compared by modulus.
			got := run(t, nil, "openssl", "req", "-in", csr, "-noout", "-pubkey")
			want, _ := os.ReadFile(f.pem(tc.key))
			if strings.Contains(tc.key, "rsa") {
				got = run(t, nil, "openssl", "req", "-in", csr, "-noout", "-modulus")
				want = []byte(run(t, nil, "openssl", "rsa", "-pubin", "-in", f.pem(tc.key), "-noout", "-modulus"))
			}
			if strings.TrimSpace(got) != strings.TrimSpace(string(want)) {
				t.Fatalf("the request carries another key:\n%s\nwant\n%s", got, want)
			}
		})
	}

	// With certificates named in the agent's config, NSS lists them on
	// the token and reads each back whole. The intermediate is listed too
	// (once: both keys share it, and NSS shows a certificate once).
	certs := f.issueCertificates("p256", "hsm-rsa")
	listed := run(t, nil, "certutil", "-L", "-d", db, "-h", "sigil", "-f", pw)
	if !strings.Contains(listed, "-ca1 ") {
		t.Errorf("certutil -L does not list the intermediate:\n%s", listed)
	}
	for name, cert := range certs {
		if name == "" {
			continue // the CA, listed above
		}
		if !strings.Contains(listed, "sigil:"+name+" ") {
			t.Errorf("certutil -L does not list sigil:%s:\n%s", name, listed)
			continue
		}
		out, err := runErr(nil, "certutil", "-L", "-d", db, "-h", "sigil", "-f", pw, "-n", "sigil:"+name, "-r")
		if err != nil || out != string(cert.Raw) {
			t.Errorf("certutil -L -n sigil:%s -r does not give the certificate back: %v", name, err)
		}
	}
}

const denialPolicy = `
admins:
  unix_uids: [UID]
tenants:
  - name: team
    identities: {unix_uids: [UID]}
    slots:
      - name: release
        key: p256
      - name: held
        key: p256
        policy:
          paused: true
`

// A policy denial surfaces as CKR_FUNCTION_REJECTED, to miekg and to
// pkcs11-tool alike, and the agent's audit journal records it; the token
// shows the tenant's slots, not the agent's key names.
func TestPolicyDenialIsRejectedAndJournaled(t *testing.T) {
	f := startFixture(t, fixtureOptions{policy: strings.ReplaceAll(denialPolicy, "UID", itoa(os.Getuid()))})
	ctx := openModule(t)
	s := openSession(t, ctx)
	if err := ctx.FindObjectsInit(s, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY)}); err != nil {
		t.Fatal(err)
	}
	objs, _, _ := ctx.FindObjects(s, 10)
	ctx.FindObjectsFinal(s)
	if len(objs) != 2 {
		t.Fatalf("the tenant's view has %d private keys, want its 2 slots", len(objs))
	}
	ok := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "release")
	held := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "held")
	mech := []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA_SHA256, nil)}
	if err := ctx.SignInit(s, mech, ok); err != nil {
		t.Fatal(err)
	}
	if _, err := ctx.Sign(s, message); err != nil {
		t.Fatalf("allowed slot: %v", err)
	}
	if err := ctx.SignInit(s, mech, held); err != nil {
		t.Fatal(err)
	}
	if _, err := ctx.Sign(s, message); ckr(err) != p11.CKR_FUNCTION_REJECTED {
		t.Fatalf("paused slot: %v, want CKR_FUNCTION_REJECTED", err)
	}
	if _, err := exec.LookPath("pkcs11-tool"); err == nil {
		out, err := runErr(nil, "pkcs11-tool", "--module", modulePath(t), "--sign", "--mechanism", "ECDSA-SHA256",
			"--label", "held", "--id", f.keysOf(t, "held"), "--input-file", "/dev/null")
		// OpenSC 0.23 has no name for it: "unknown PKCS11 error (0x200)".
		if err == nil || !strings.Contains(out, "CKR_FUNCTION_REJECTED") && !strings.Contains(out, "(0x200)") {
			t.Fatalf("pkcs11-tool on a paused slot: %v\n%s", err, out)
		}
	}
	admin := f.dialAdmin()
	defer admin.Close()
	recs, err := admin.AuditTail(context.Background(), "", 0, 20)
	if err != nil {
		t.Fatal(err)
	}
	var paused, allowed int
	for _, raw := range recs {
		var r struct {
			Slot     string `json:"slot"`
			CodeName string `json:"code_name"`
			Op       string `json:"op"`
		}
		if err := json.Unmarshal(raw, &r); err != nil {
			t.Fatalf("audit record %s: %v", raw, err)
		}
		switch {
		case r.Op == "sign" && r.Slot == "team/held" && r.CodeName == "PAUSED":
			paused++
		case r.Op == "sign" && r.Slot == "team/release" && r.CodeName == "OK":
			allowed++
		}
	}
	if paused < 1 || allowed != 1 {
		t.Fatalf("journal: %d PAUSED records for team/held, %d OK for team/release:\n%s", paused, allowed, recs)
	}
}

// keysOf is the kid of a slot as the tenant's ListKeys shows it.
func (f *fixture) keysOf(t testing.TB, name string) string {
	c := f.dial()
	defer c.Close()
	ks, err := c.ListKeys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range ks {
		if k.Name == name {
			return k.KID
		}
	}
	t.Fatalf("no slot %q", name)
	return ""
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

// An agent in the default socket directory that runs as another user (it
// made the socket in the window between the module's directory check and
// its connect) is refused by the kernel's word (SO_PEERCRED).
func TestModuleRefusesAnAgentOfAnotherUser(t *testing.T) {
	if os.Getenv("SIGIL_TEST_LISTEN_AS_OTHER") != "" {
		ln, err := net.Listen("unix", os.Getenv("SIGIL_TEST_LISTEN_AS_OTHER"))
		if err != nil {
			os.Exit(1)
		}
		os.Stdout.WriteString("listening\n")
		for {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(0)
			}
			defer c.Close()
		}
	}
	need(t, "pkcs11-tool")
	if os.Getuid() != 0 {
		t.Skip("running a listener as another uid needs root")
	}
	tmp := shortDir(t)
	os.Chmod(tmp, 0o755)
	t.Setenv("XDG_RUNTIME_DIR", "")
	t.Setenv("TMPDIR", tmp)
	t.Setenv(proto.SocketEnv, "")
	t.Setenv("SIGIL_PKCS11_CONF", "")
	sockDir := filepath.Dir(proto.DefaultSocketPath())
	if err := os.Mkdir(sockDir, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(sockDir, 0o777)
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(tmp, "module.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestModuleRefusesAnAgentOfAnotherUser$")
	cmd.Env = append(os.Environ(), "SIGIL_TEST_LISTEN_AS_OTHER="+proto.DefaultSocketPath())
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	line := make([]byte, 10)
	if n, _ := stdout.Read(line); string(line[:n]) != "listening\n" {
		t.Fatalf("the other user's listener did not start: %q", line[:n])
	}
	// The directory now passes the check (root's, written by nobody else);
	// the socket in it is still the other user's.
	if err := os.Chmod(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("pkcs11-tool", "--module", modulePath(t), "--list-objects").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "runs as uid 4242") {
		t.Fatalf("pkcs11-tool with the agent of uid 4242 (err %v):\n%s", err, out)
	}
}
