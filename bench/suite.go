package bench

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"os"

	"github.com/sigil-agent/sigil/proto"
)

// ScenarioPKCS11Front signs through libsigil-pkcs11.so (miekg/pkcs11 in this
// process → the module → the agent → SoftHSM2): the PKCS#11 front measured
// beside p11kit, which forwards the same token.
const ScenarioPKCS11Front = "pkcs11-front"

// SuiteOptions configures RunSuite.
type SuiteOptions struct {
	Options
	// Sigil is the binary that runs the agent (os.Executable() for `sigil bench`).
	Sigil string
	// Keys are the key types to measure; default ecdsa-p256, rsa-2048, ed25519.
	Keys []string
	// Scenarios limits which scenarios run (default all): roundtrip, direct, agent-unix,
	// agent-unix-nojournal, agent-tcp, p11kit, pkcs11-front, software (and its
	// -wal, -nojournal, -fsync and -policy variants), and the cloud ones (awskms,
	// gcpkms, azurekv; see StartCloud).
	Scenarios []string
	// Addr and Key measure an agent that is already running instead of
	// setting one up: only the agent-unix scenario, with that key.
	Addr, Key string
	Log       io.Writer
}

func (o *SuiteOptions) wants(name string) bool {
	if len(o.Scenarios) == 0 {
		return !experimentScenarios[name]
	}
	for _, s := range o.Scenarios {
		if s == name {
			return true
		}
	}
	return false
}

// RunSuite sets up (or attaches to) what it measures, runs every scenario
// interleaved rep by rep, and tears the set-up down.
func RunSuite(ctx context.Context, o SuiteOptions) (*Report, error) {
	if o.Log == nil {
		o.Log = io.Discard
	}
	if o.Addr != "" {
		if o.Key == "" {
			return nil, fmt.Errorf("--addr needs --key: the key to sign with")
		}
		return Run(ctx, []Scenario{AgentScenario(ScenarioAgentUnix, o.Key, o.Addr, o.Key, nil)}, o.Options)
	}
	env, err := Setup(ctx, SetupOptions{Sigil: o.Sigil, Keys: o.Keys, Log: o.Log})
	if err != nil {
		return nil, fmt.Errorf("bench set-up: %w", err)
	}
	defer env.Close()
	cloud, err := env.StartCloud(ctx, o.Sigil, o.wants, o.Log)
	if err != nil {
		return nil, fmt.Errorf("cloud scenarios: %w", err)
	}
	defer cloud.Close()

	agentCPU := processesCPU(env.AgentPID())
	// Why a wanted scenario could not be set up, by name: it is reported
	// as not run (notSetUp) rather than left out of the report.
	unavailable := map[string]string{}
	var direct, forwarded *Cryptoki
	if o.wants(ScenarioDirect) {
		if direct, err = OpenCryptoki(env.Module, env.TokenLabel, env.PIN); err != nil {
			return nil, fmt.Errorf("direct scenario: %w", err)
		}
		defer direct.Close()
	}
	if o.wants(ScenarioP11Kit) && env.P11KitAddress == "" {
		unavailable[ScenarioP11Kit] = cmp.Or(env.P11KitSkip, "no p11-kit server")
	}
	if o.wants(ScenarioP11Kit) && env.P11KitAddress != "" {
		p11kitEnv(env.P11KitAddress)
		if forwarded, err = OpenCryptoki(env.P11KitClient, env.TokenLabel, env.PIN); err != nil {
			fmt.Fprintf(o.Log, "bench: p11kit scenario skipped: %v\n", err)
			unavailable[ScenarioP11Kit] = err.Error()
			forwarded = nil
		} else {
			defer forwarded.Close()
		}
	}
	p11kitCPU := processesCPU(env.P11KitPID())
	var front *Cryptoki
	var frontAgent Variant
	if o.wants(ScenarioPKCS11Front) {
		if env.PKCS11Front == "" {
			unavailable[ScenarioPKCS11Front] = fmt.Sprintf("no libsigil-pkcs11.so beside %s (make build)", o.Sigil)
			fmt.Fprintf(o.Log, "bench: pkcs11-front scenario skipped: %s\n", unavailable[ScenarioPKCS11Front])
		} else if frontAgent, err = env.startFrontAgent(ctx, o.Sigil); err != nil {
			return nil, fmt.Errorf("pkcs11-front agent: %w", err)
		} else {
			// The module reads SIGIL_SOCK at C_Initialize; it needs no PIN
			// but accepts OpenCryptoki's login.
			os.Setenv(proto.SocketEnv, frontAgent.Socket)
			os.Setenv("SIGIL_PKCS11_CONF", "")
			if front, err = OpenCryptoki(env.PKCS11Front, "sigil", env.PIN); err != nil {
				return nil, fmt.Errorf("pkcs11-front scenario: %w", err)
			}
			defer front.Close()
		}
	}
	var single, second Variant
	if o.wants(ScenarioAgentOneInstance) || o.wants(ScenarioAgentTwoProcs) {
		if single, err = env.startHSMAgent(ctx, o.Sigil, "hsm-1inst", 1); err != nil {
			return nil, fmt.Errorf("experiment agent: %w", err)
		}
	}
	if o.wants(ScenarioAgentTwoProcs) {
		if second, err = env.startHSMAgent(ctx, o.Sigil, "hsm-1inst-b", 1); err != nil {
			return nil, fmt.Errorf("experiment agent: %w", err)
		}
	}
	var noJournal Variant
	if o.wants(ScenarioAgentNoJournal) {
		if noJournal, err = env.startHSMAgentWith(ctx, o.Sigil, "hsm-nojournal", benchModuleInstances, "journal: {mode: \"off\"}\n"); err != nil {
			return nil, fmt.Errorf("journal-off agent: %w", err)
		}
	}
	var oneProc Variant
	if o.wants(ScenarioAgentOneProc) || o.wants(ScenarioSoftwareOneProc) {
		if oneProc, err = env.startHSMAgent(ctx, o.Sigil, "hsm-procs1", benchModuleInstances, "GOMAXPROCS=1"); err != nil {
			return nil, fmt.Errorf("experiment agent: %w", err)
		}
	}

	var scenarios []Scenario
	if o.wants(ScenarioRoundTrip) {
		// A floor, not a signer: without it the goals go without their
		// "at best", and the run goes on.
		if echo, err := env.startEcho(ctx, o.Sigil); err != nil {
			fmt.Fprintf(o.Log, "bench: roundtrip scenario skipped: %v\n", err)
			scenarios = append(scenarios, notSetUp(ScenarioRoundTrip, KeyNone, err.Error()))
		} else {
			scenarios = append(scenarios, RoundTripScenario(echo.Socket, processesCPU(echo.PID)))
		}
	}
	for _, k := range env.Keys {
		if direct != nil {
			scenarios = append(scenarios, direct.Scenario(ScenarioDirect, k, nil))
		}
		if o.wants(ScenarioAgentUnix) {
			scenarios = append(scenarios, AgentScenario(ScenarioAgentUnix, k, env.AgentSocket, hsmKeyName(k), agentCPU))
		}
		if o.wants(ScenarioAgentNoJournal) {
			scenarios = append(scenarios, AgentScenario(ScenarioAgentNoJournal, k, noJournal.Socket, hsmKeyName(k), processesCPU(noJournal.PID)))
		}
		if o.wants(ScenarioAgentOneInstance) {
			scenarios = append(scenarios, AgentScenario(ScenarioAgentOneInstance, k, single.Socket, hsmKeyName(k), processesCPU(single.PID)))
		}
		if o.wants(ScenarioAgentOneProc) {
			scenarios = append(scenarios, AgentScenario(ScenarioAgentOneProc, k, oneProc.Socket, hsmKeyName(k), processesCPU(oneProc.PID)))
		}
		if o.wants(ScenarioSoftwareOneProc) {
			scenarios = append(scenarios, AgentScenario(ScenarioSoftwareOneProc, k, oneProc.Socket, softKeyName(k), processesCPU(oneProc.PID)))
		}
		if o.wants(ScenarioAgentTwoProcs) {
			scenarios = append(scenarios, SplitAgentScenario(ScenarioAgentTwoProcs, k, []string{single.Socket, second.Socket}, hsmKeyName(k), processesCPU(single.PID, second.PID)))
		}
		if o.wants(ScenarioAgentTCP) {
			scenarios = append(scenarios, AgentTLSScenario(ScenarioAgentTCP, k, env.AgentTCP, env.ClientTLS, hsmKeyName(k), agentCPU))
		}
		if forwarded != nil {
			scenarios = append(scenarios, forwarded.Scenario(ScenarioP11Kit, k, p11kitCPU))
		} else if why, ok := unavailable[ScenarioP11Kit]; ok {
			scenarios = append(scenarios, notSetUp(ScenarioP11Kit, k, why))
		}
		if front != nil {
			scenarios = append(scenarios, front.Scenario(ScenarioPKCS11Front, k, processesCPU(frontAgent.PID)))
		} else if why, ok := unavailable[ScenarioPKCS11Front]; ok {
			scenarios = append(scenarios, notSetUp(ScenarioPKCS11Front, k, why))
		}
		if o.wants(ScenarioSoftware) {
			scenarios = append(scenarios, AgentScenario(ScenarioSoftware, k, env.AgentSocket, softKeyName(k), agentCPU))
		}
		for _, name := range []string{ScenarioSoftwareWAL, ScenarioSoftwareNoJournal, ScenarioSoftwareFsync, ScenarioSoftwarePolicy} {
			v, ok := env.Variants[name]
			if !ok || !o.wants(name) {
				continue
			}
			scenarios = append(scenarios, AgentScenario(name, k, v.Socket, softKeyName(k), processesCPU(v.PID)))
		}
	}
	scenarios = append(scenarios, cloud.Scenarios()...)
	for _, name := range CloudScenarios {
		if why, ok := cloud.Skipped[name]; ok {
			scenarios = append(scenarios, notSetUp(name, KeyECDSAP256, why))
		}
	}
	return Run(ctx, scenarios, o.Options)
}

// errNotSetUp is why a scenario could not be set up: Run reports it as is,
// not as a worker that failed to open.
type errNotSetUp struct{ why string }

func (e errNotSetUp) Error() string { return "not set up: " + e.why }

// notSetUp stands for a wanted scenario that could not be set up (an
// emulator or p11-kit not installed, the PKCS#11 module not built): every
// connection count of it is reported "not run" with why. Left out, it
// vanished from the table, and a run of nothing else but such scenarios
// failed with "no scenarios".
func notSetUp(name, key, why string) Scenario {
	err := errNotSetUp{why}
	return Scenario{Name: name, Key: key, NewWorker: func(context.Context) (func(context.Context) error, func() error, error) {
		return nil, nil, err
	}}
}
