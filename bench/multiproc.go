package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sigil-agent/sigil/client"
)

// Experiments behind the agent's module_instances setting (issue 3 asks
// whether more sessions, fewer, or worker processes each with its own module
// instance get the agent past SoftHSM2's per-process floor). They run only
// when named: `sigil bench --scenarios direct,agent-unix,agent-unix-1inst,agent-unix-2proc`.
//
//   - agent-unix-1inst: an agent loading the module once (module_instances
//     1, the default), beside agent-unix with benchModuleInstances.
//   - agent-unix-2proc: two agent processes, one instance each, the client
//     connections split between them: the same two module instances as
//     module_instances 2 but in two processes, without the agent → worker
//     hop a real pool of worker processes would add, so an upper bound for
//     that design.
//   - agent-unix-procs1: the agent as agent-unix, with GOMAXPROCS=1, so its
//     runtime never spins an idle P looking for work on a machine whose
//     other core runs the client and the token.
const (
	ScenarioAgentOneInstance = "agent-unix-1inst"
	ScenarioAgentTwoProcs    = "agent-unix-2proc"
	ScenarioAgentOneProc     = "agent-unix-procs1"
	ScenarioSoftwareOneProc  = "software-procs1" // software keys on the agent-unix-procs1 agent
)

// experimentScenarios run only when --scenarios names them.
var experimentScenarios = map[string]bool{ScenarioAgentOneInstance: true, ScenarioAgentTwoProcs: true, ScenarioAgentOneProc: true, ScenarioSoftwareOneProc: true}

// startHSMAgent starts another agent process serving the SoftHSM2 keys of
// the main one with the given module_instances, its own state directory and
// its own module instances (and so its own sessions and SoftHSM2 locks).
func (e *Env) startHSMAgent(ctx context.Context, sigil, name string, instances int, env ...string) (Variant, error) {
	return e.startHSMAgentWith(ctx, sigil, name, instances, "", env...)
}

// startHSMAgentWith is startHSMAgent with extra config lines.
func (e *Env) startHSMAgentWith(ctx context.Context, sigil, name string, instances int, extra string, env ...string) (Variant, error) {
	sock := filepath.Join(e.Dir, name+".sock")
	var b strings.Builder
	fmt.Fprintf(&b, "socket: %s\nadmin_socket: %s\ndata_dir: %s\nlog: {level: warn}\n%s", sock, sock+".admin", filepath.Join(e.Dir, name+"-state"), extra)
	e.writeProviders(&b, instances)
	cmd, err := e.launch(ctx, sigil, name, b.String(), sock, env...)
	if err != nil {
		return Variant{}, err
	}
	e.extra = append(e.extra, cmd)
	return Variant{Socket: sock, PID: cmd.Process.Pid}, nil
}

// SplitAgentScenario is AgentScenario over several agents: worker i dials
// sockets[i % len(sockets)], so the connections split evenly.
func SplitAgentScenario(name, keyType string, sockets []string, keyName string, cpu func() time.Duration) Scenario {
	var next atomic.Uint64
	return Scenario{
		Name: name, Key: keyType, CPU: cpu,
		NewWorker: func(ctx context.Context) (func(context.Context) error, func() error, error) {
			socket := sockets[(next.Add(1)-1)%uint64(len(sockets))]
			return signingWorker(keyName)(client.Dial(ctx, socket))
		},
	}
}
