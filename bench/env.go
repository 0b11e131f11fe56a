package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11"
)

// pinEnv carries the bench token's PIN to the agent process, the way an
// operator's service manager would.
const pinEnv = "SIGIL_BENCH_PIN"

// benchKeyTypes are the key types a self-contained run provisions.
var benchKeyTypes = map[string]providers.KeyType{
	KeyECDSAP256: providers.KeyECDSAP256,
	KeyRSA2048:   providers.KeyRSA2048,
	KeyEd25519:   providers.KeyEd25519,
}

// Env is a self-contained benchmark set-up in a temporary directory: a
// SoftHSM2 token with one key per type, the agent as its own process serving
// those keys (and software keys of the same types), and a p11-kit server
// forwarding the same token when p11-kit is installed.
type Env struct {
	Dir        string
	Module     string // libsofthsm2.so
	TokenLabel string
	PIN        string
	Keys       []string // key types provisioned, e.g. "ecdsa-p256"

	AgentSocket string
	AgentTCP    string      // host:port of the agent's mutual-TLS listener
	ClientTLS   *tls.Config // a client certificate the agent accepts
	agent       *exec.Cmd
	extra       []*exec.Cmd
	stops       []func() // servers waited for by a goroutine of their own (the echo)
	logs        []*os.File
	// Variants are the extra agents by scenario name.
	Variants map[string]Variant

	P11KitClient  string // p11-kit-client.so, "" when p11-kit is absent
	P11KitAddress string // P11_KIT_SERVER_ADDRESS for the client module
	P11KitSkip    string // why the p11kit scenario cannot run, if it cannot
	p11kit        *exec.Cmd

	// PKCS11Front is libsigil-pkcs11.so beside the sigil binary ("" when it
	// was not built): the pkcs11-front scenario loads it here.
	PKCS11Front string

	// AgentConfig is the main agent's config file; AdminHTTP the host:port
	// of its admin HTTP listener (/metrics), "" unless SetupOptions asked.
	AgentConfig string
	AdminHTTP   string
}

// SetupOptions configures Setup.
type SetupOptions struct {
	Sigil string   // the sigil binary that runs the agent
	Keys  []string // key types; default all of benchKeyTypes
	Log   io.Writer
	// AgentOnly starts the main agent alone: no variant agents, no p11-kit
	// server (sigil soak loads one agent and measures that process).
	AgentOnly bool
	// AdminHTTP gives the main agent an admin HTTP listener on loopback,
	// for reading its /metrics (Env.AdminHTTP).
	AdminHTTP bool
}

// softhsmModules are where Debian and others install SoftHSM2's module.
var softhsmModules = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// p11kitClientModules are where p11-kit's client module lives.
var p11kitClientModules = []string{
	"/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
	"/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
	"/usr/lib/pkcs11/p11-kit-client.so",
}

func firstExisting(paths []string) string {
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// Setup builds the environment. It sets SOFTHSM2_CONF in this process, since
// the direct and p11kit scenarios load modules here.
func Setup(ctx context.Context, o SetupOptions) (_ *Env, err error) {
	if len(o.Keys) == 0 {
		o.Keys = []string{KeyECDSAP256, KeyRSA2048, KeyEd25519}
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	module := os.Getenv("SOFTHSM2_MODULE")
	if module == "" {
		module = firstExisting(softhsmModules)
	}
	if module == "" {
		return nil, errors.New("SoftHSM2 is not installed (apt-get install softhsm2; `make test` does it as root)")
	}
	dir, err := os.MkdirTemp("", "sigil-bench-")
	if err != nil {
		return nil, err
	}
	e := &Env{Dir: dir, Module: module, TokenLabel: "sigil-bench", PIN: "5678", Keys: o.Keys}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	if err := e.initToken(); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "bench: SoftHSM2 token %q in %s\n", e.TokenLabel, dir)
	if err := e.generateKeys(ctx); err != nil {
		return nil, err
	}
	if err := e.startAgent(ctx, o); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "bench: agent (pid %d) on %s\n", e.agent.Process.Pid, e.AgentSocket)
	if o.AgentOnly {
		return e, nil
	}
	if err := e.startP11Kit(ctx); err != nil {
		e.P11KitSkip = err.Error()
		fmt.Fprintf(o.Log, "bench: p11kit scenario skipped: %v\n", err)
	} else {
		fmt.Fprintf(o.Log, "bench: p11-kit server (pid %d) at %s\n", e.p11kit.Process.Pid, e.P11KitAddress)
	}
	return e, nil
}

func (e *Env) initToken() error {
	tokens := filepath.Join(e.Dir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return err
	}
	conf := filepath.Join(e.Dir, "softhsm2.conf")
	if err := os.WriteFile(conf, []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600); err != nil {
		return err
	}
	os.Setenv("SOFTHSM2_CONF", conf)
	out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", e.TokenLabel,
		"--so-pin", "1234", "--pin", e.PIN).CombinedOutput()
	if err != nil {
		return fmt.Errorf("softhsm2-util --init-token: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// generateKeys makes the keys in the token through Sigil's own provider (the
// path rotation uses), then closes it so the module is free for the others.
func (e *Env) generateKeys(ctx context.Context) error {
	os.Setenv(pinEnv, e.PIN)
	p, err := pkcs11.Open(ctx, pkcs11.Config{ID: "bench-setup", Module: e.Module, TokenLabel: e.TokenLabel, PINEnv: pinEnv})
	if err != nil {
		return fmt.Errorf("open token: %w", err)
	}
	defer p.Close()
	for i, k := range e.Keys {
		kt, ok := benchKeyTypes[k]
		if !ok {
			return fmt.Errorf("key type %q: want one of ecdsa-p256, rsa-2048, ed25519", k)
		}
		if _, err := p.GenerateKey(ctx, k, kt, k, []byte{byte(i + 1)}); err != nil {
			return fmt.Errorf("generate %s: %w", k, err)
		}
	}
	return nil
}

// benchModuleInstances is the agent's module_instances for SoftHSM2: what
// docs/pkcs11.md recommends for it, chosen by measurement (instances.go in
// providers/pkcs11; the agent-unix-2proc experiment).
const benchModuleInstances = 2

// writeProviders writes an agent config's providers: the SoftHSM2 token's
// keys (as hsm-TYPE, with the given module_instances) and software keys of
// the same types (soft-TYPE).
func (e *Env) writeProviders(b *strings.Builder, instances int) {
	b.WriteString("providers:\n")
	fmt.Fprintf(b, "  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: %s\n    pin_env: %s\n    module_instances: %d\n    keys:\n", e.Module, e.TokenLabel, pinEnv, instances)
	for _, k := range e.Keys {
		fmt.Fprintf(b, "      - {name: %s, uri: \"pkcs11:token=%s;object=%s\"}\n", hsmKeyName(k), e.TokenLabel, k)
	}
	fmt.Fprintf(b, "  - id: soft\n    type: software\n    keys:\n")
	for _, k := range e.Keys {
		fmt.Fprintf(b, "      - {name: %s, type: %s}\n", softKeyName(k), k)
	}
}

// hsmKeyName and softKeyName are the agent's names for the bench keys.
func hsmKeyName(kt string) string  { return "hsm-" + kt }
func softKeyName(kt string) string { return "soft-" + kt }

func (e *Env) startAgent(ctx context.Context, o SetupOptions) error {
	sigil := o.Sigil
	if sigil == "" {
		return errors.New("no sigil binary to run the agent")
	}
	e.AgentSocket = filepath.Join(e.Dir, "agent.sock")
	tcp, err := e.tlsMaterial()
	if err != nil {
		return fmt.Errorf("bench certificates: %w", err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "socket: %s\ndata_dir: %s\nlog: {level: warn}\n%s", e.AgentSocket, filepath.Join(e.Dir, "state"), tcp)
	if o.AdminHTTP {
		if e.AdminHTTP, err = freeLoopbackPort(); err != nil {
			return err
		}
		fmt.Fprintf(&b, "admin_http: {listen: %q}\n", e.AdminHTTP)
	}
	e.writeProviders(&b, benchModuleInstances)
	cmd, err := e.launch(ctx, sigil, "agent", b.String(), e.AgentSocket)
	if err != nil {
		return err
	}
	e.agent = cmd
	e.AgentConfig = filepath.Join(e.Dir, "agent.yaml")
	if o.AgentOnly {
		return nil
	}
	e.PKCS11Front = firstExisting([]string{filepath.Join(filepath.Dir(sigil), "libsigil-pkcs11.so")})
	return e.startVariants(ctx, sigil)
}

// freeLoopbackPort returns a 127.0.0.1 address no one listens on right now.
func freeLoopbackPort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// startFrontAgent starts the agent the pkcs11-front scenario signs through:
// the main agent's SoftHSM2 provider, with each key named by its token label
// (a provider may not name one object twice). Through libsigil-pkcs11.so the
// agent's key names are the objects' labels, which is what the PKCS#11
// scenarios look a key up by.
func (e *Env) startFrontAgent(ctx context.Context, sigil string) (Variant, error) {
	sock := filepath.Join(e.Dir, "front.sock")
	var b strings.Builder
	fmt.Fprintf(&b, "socket: %s\nadmin_socket: %s\ndata_dir: %s\nlog: {level: warn}\nproviders:\n", sock, sock+".admin", filepath.Join(e.Dir, "front-state"))
	fmt.Fprintf(&b, "  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: %s\n    pin_env: %s\n    module_instances: %d\n    keys:\n", e.Module, e.TokenLabel, pinEnv, benchModuleInstances)
	for _, k := range e.Keys {
		fmt.Fprintf(&b, "      - {name: %s, uri: \"pkcs11:token=%s;object=%s\"}\n", k, e.TokenLabel, k)
	}
	cmd, err := e.launch(ctx, sigil, "front", b.String(), sock)
	if err != nil {
		return Variant{}, err
	}
	e.extra = append(e.extra, cmd)
	return Variant{Socket: sock, PID: cmd.Process.Pid}, nil
}

// Variant agents serve the same software keys under other settings, so the
// cost of a setting is a ratio between scenarios of one run: the journal
// off, in `wal` mode and in fsync mode, and a policy with every rule
// switched on.
//
// software-wal is the main agent's journal setting on an agent of its own.
// The journal's and the policy's costs compare it with the other variants,
// not the main agent: the main agent (the software scenario) also holds
// the SoftHSM2 module instances, and its journal records every other
// scenario, whose flushes land in any scenario's window. In the full run
// of 2026-12-06 18:04 the main agent did 14.8k/s on software ECDSA at 8
// connections where the policy variant, with a journal and every policy
// rule, did 15.8k/s; in a run of the software scenarios alone the two were
// level.
const (
	ScenarioSoftwareWAL       = "software-wal"
	ScenarioSoftwareNoJournal = "software-nojournal"
	// ScenarioAgentNoJournal is agent-unix (SoftHSM2 keys, the same module
	// instances) with the journal off: the journal's cost where a
	// signature costs what an HSM's does.
	ScenarioAgentNoJournal = "agent-unix-nojournal"
	ScenarioSoftwareFsync  = "software-fsync"
	ScenarioSoftwarePolicy = "software-policy"
)

func (e *Env) startVariants(ctx context.Context, sigil string) error {
	e.Variants = map[string]Variant{}
	policyFile := filepath.Join(e.Dir, "policy.yaml")
	var p strings.Builder
	fmt.Fprintf(&p, "tenants:\n  - name: bench\n    identities: {unix_uids: [%d]}\n    slots:\n", os.Getuid())
	for _, k := range e.Keys {
		fmt.Fprintf(&p, "      - name: %s\n        key: %s\n        policy:\n          algorithms: [ecdsa-sha256, rsa-pkcs1v15-sha256, ed25519]\n          rate: {per_second: 1000000, burst: 1000000}\n          daily_quota: 1000000000\n          windows: [\"Mon-Sun 00:00-24:00\"]\n", softKeyName(k), softKeyName(k))
	}
	if err := os.WriteFile(policyFile, []byte(p.String()), 0o600); err != nil {
		return err
	}
	for _, v := range []struct{ name, extra string }{
		{ScenarioSoftwareWAL, "journal: {mode: wal}\n"},
		{ScenarioSoftwareNoJournal, "journal: {mode: \"off\"}\n"},
		{ScenarioSoftwareFsync, "journal: {mode: fsync}\n"},
		{ScenarioSoftwarePolicy, "policy: " + policyFile + "\n"},
	} {
		sock := filepath.Join(e.Dir, v.name+".sock")
		var b strings.Builder
		fmt.Fprintf(&b, "socket: %s\nadmin_socket: %s\ndata_dir: %s\nlog: {level: warn}\n%s", sock, sock+".admin", filepath.Join(e.Dir, v.name), v.extra)
		fmt.Fprintf(&b, "providers:\n  - id: soft\n    type: software\n    keys:\n")
		for _, k := range e.Keys {
			fmt.Fprintf(&b, "      - {name: %s, type: %s}\n", softKeyName(k), k)
		}
		cmd, err := e.launch(ctx, sigil, v.name, b.String(), sock)
		if err != nil {
			return err
		}
		e.extra = append(e.extra, cmd)
		e.Variants[v.name] = Variant{Socket: sock, PID: cmd.Process.Pid}
	}
	return nil
}

// Variant is one of the extra agents.
type Variant struct {
	Socket string
	PID    int
}

// launch runs `sigil agent` on config and waits for its socket. env adds
// to (and overrides) this process's environment, as a service manager's
// Environment= would.
func (e *Env) launch(ctx context.Context, sigil, name, config, socket string, env ...string) (*exec.Cmd, error) {
	cfgPath := filepath.Join(e.Dir, name+".yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(e.Dir, name+".log"))
	if err != nil {
		return nil, err
	}
	e.logs = append(e.logs, logf)
	cmd := exec.Command(sigil, "agent", "--config", cfgPath)
	cmd.Env = append(append(os.Environ(), pinEnv+"="+e.PIN), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = serverProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	if err := waitForSocket(ctx, "unix", socket, 20*time.Second); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		log, _ := os.ReadFile(logf.Name())
		return nil, fmt.Errorf("%s did not come up: %w\n%s", name, err, log)
	}
	return cmd, nil
}

// tlsMaterial makes a throwaway CA, the agent's certificate and a client
// certificate, and returns the agent config's tcp section.
func (e *Env) tlsMaterial() (string, error) {
	ca, err := devcerts.NewCA("sigil bench CA")
	if err != nil {
		return "", err
	}
	srv, err := ca.Issue(devcerts.Leaf{CommonName: "sigil bench agent", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	if err != nil {
		return "", err
	}
	cli, err := ca.Issue(devcerts.Leaf{CommonName: "bench-client", URIs: []string{"spiffe://sigil.bench/client"}})
	if err != nil {
		return "", err
	}
	certFile, keyFile, err := srv.Write(e.Dir, "agent-tls")
	if err != nil {
		return "", err
	}
	caFile, err := ca.WriteCert(e.Dir, "bench-ca")
	if err != nil {
		return "", err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	e.AgentTCP = ln.Addr().String()
	ln.Close()
	e.ClientTLS = &tls.Config{Certificates: []tls.Certificate{cli.TLS}, RootCAs: ca.Pool()}
	return fmt.Sprintf("tcp: {listen: %q, cert_file: %s, key_file: %s, client_ca_file: %s}\n", e.AgentTCP, certFile, keyFile, caFile), nil
}

// StopAgent stops the main agent as a service manager would: SIGTERM, then
// SIGKILL after grace. It returns how the process ended (an agent that
// crashed earlier is reaped here); Close then leaves it alone. The directory
// stays, so the agent's journal can be read afterwards.
func (e *Env) StopAgent(grace time.Duration) (*os.ProcessState, error) {
	cmd := e.agent
	if cmd == nil || cmd.Process == nil {
		return nil, errors.New("no agent running")
	}
	if cmd.ProcessState != nil {
		return cmd.ProcessState, nil
	}
	cmd.Process.Signal(syscall.SIGTERM)
	timer := time.AfterFunc(grace, func() { cmd.Process.Kill() })
	defer timer.Stop()
	cmd.Wait() // the exit status is in ProcessState
	return cmd.ProcessState, nil
}

// AgentPID is the agent process's pid, for ProcessCPU.
func (e *Env) AgentPID() int { return e.agent.Process.Pid }

// P11KitPID is the p11-kit server's pid, 0 when it is not running.
func (e *Env) P11KitPID() int {
	if e.p11kit == nil {
		return 0
	}
	return e.p11kit.Process.Pid
}

func (e *Env) startP11Kit(ctx context.Context) error {
	client := firstExisting(p11kitClientModules)
	if client == "" {
		return errors.New("p11-kit-client.so not found (apt-get install p11-kit p11-kit-modules)")
	}
	if _, err := exec.LookPath("p11-kit"); err != nil {
		return errors.New("p11-kit not installed")
	}
	sock := filepath.Join(e.Dir, "p11kit.sock")
	cmd := exec.Command("p11-kit", "server", "-f", "--provider", e.Module, "-n", sock, "pkcs11:token="+e.TokenLabel)
	cmd.Env = os.Environ()
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.SysProcAttr = serverProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start p11-kit server: %w", err)
	}
	e.p11kit = cmd
	go io.Copy(io.Discard, bufio.NewReader(out))
	if err := waitForSocket(ctx, "unix", sock, 10*time.Second); err != nil {
		return fmt.Errorf("p11-kit server did not come up: %w", err)
	}
	e.P11KitClient = client
	e.P11KitAddress = "unix:path=" + sock
	return nil
}

func waitForSocket(ctx context.Context, network, addr string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		c, err := net.DialTimeout(network, addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Close stops the processes and removes the directory.
func (e *Env) Close() error {
	for _, stop := range e.stops {
		stop()
	}
	for _, cmd := range append([]*exec.Cmd{e.agent, e.p11kit}, e.extra...) {
		if cmd == nil || cmd.Process == nil || cmd.ProcessState != nil {
			continue
		}
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}
	for _, f := range e.logs {
		f.Close()
	}
	return os.RemoveAll(e.Dir)
}

// serverProcAttr is how the bench starts its servers (agents, the p11-kit
// server): killed if the bench dies, and in a process group of their own,
// so that a terminal's Ctrl-C, which signals its foreground group, reaches
// the bench alone, which stops its run, reports what it measured, and
// then stops them itself (Close).
func serverProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
}
