package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Result is one scenario at one connection count. Latencies and CPU per op are
// the median over reps of each rep's figure; Errors and Ops are totals over
// reps. Only successful ops have latencies: a failure that returns at once
// would otherwise read as a fast signature.
type Result struct {
	Scenario   string  `json:"scenario"`
	Key        string  `json:"key"`
	Conns      int     `json:"conns"`
	P50us      float64 `json:"p50_us"`
	P95us      float64 `json:"p95_us"`
	P99us      float64 `json:"p99_us"`
	P999us     float64 `json:"p999_us"`
	OpsPerS    float64 `json:"ops_per_s"`
	Errors     int     `json:"errors"`
	CPUPerOpUs float64 `json:"cpu_per_op_us"` // this process, its waited-for children and Scenario.CPU, per successful op
	Reps       int     `json:"reps"`
	Err        string  `json:"error,omitempty"` // NewWorker failed or ops went unanswered: not run, or not every rep
	// Unanswered: Err is that ops were still unanswered Options.Drain
	// after a phase. The signer, not the harness, failed: an SLO miss.
	Unanswered bool `json:"unanswered,omitempty"`

	// Each rep's own p50 and ops/s, in rep order (a rep without one
	// successful op has p50 0). The figures above are their medians; these
	// pair a rep with the same rep of another scenario (RepRatios).
	RepP50us   []float64 `json:"rep_p50_us,omitempty"`
	RepOpsPerS []float64 `json:"rep_ops_per_s,omitempty"`

	Ops       int64  `json:"ops"`                  // successful ops over all reps
	AllFailed bool   `json:"all_failed,omitempty"` // it ran, and not one op succeeded
	OpErr     string `json:"op_error,omitempty"`   // the first op error, to say why

	// CDF is the latency distribution of all reps merged, downsampled to at
	// most MaxCDFPoints: CDF[j] is the latency at quantile j/(len(CDF)-1).
	CDF []time.Duration `json:"-"`
}

func (r Result) label() string { return resultLabel(r.Scenario, r.Key, r.Conns) }

// resultLabel names a result as the progress lines and
// Interruption.Incomplete do: scenario/key@conns.
func resultLabel(scenario, key string, conns int) string {
	return fmt.Sprintf("%s/%s@%d", scenario, key, conns)
}

// ran reports whether r has figures worth comparing.
func (r Result) ran() bool { return r.Err == "" && !r.AllFailed && r.Reps > 0 }

// Report is the outcome of Run.
type Report struct {
	Started time.Time `json:"started"`
	Options
	Results []Result           `json:"results"` // scenario order, then Conns order
	Ratios  map[string]float64 `json:"ratios"`  // see ComputeRatios
	// RepRatios holds each ratio rep by rep, for the reps where both
	// scenarios ran: how far the ratio moves within the run.
	RepRatios map[string][]float64 `json:"rep_ratios"`
	Machine   Machine              `json:"machine"`
	// Interrupted is set when the run was stopped (Ctrl-C) before its
	// last rep: the results hold what was measured until then.
	Interrupted *Interruption `json:"interrupted,omitempty"`
}

// An Interruption says where a run was stopped.
type Interruption struct {
	AfterRep int `json:"after_rep"` // reps every scenario went through, of Options.Reps
	// Incomplete names (scenario/key@conns) each result short of reps,
	// or never reached, because of the stop; a result that failed on its
	// own is reported as before, not here.
	Incomplete []string `json:"incomplete"`
}

// incomplete reports whether the stop left the result of scenario on key
// at conns short of reps: no goal is judged on it, as its median covers
// other reps than the figure it is divided by.
func (r *Report) incomplete(scenario, key string, conns int) bool {
	if r.Interrupted == nil {
		return false
	}
	return slices.Contains(r.Interrupted.Incomplete, resultLabel(scenario, key, conns))
}

// Find returns the result of scenario on key at conns connections.
func (r *Report) Find(scenario, key string, conns int) (Result, bool) {
	for _, res := range r.Results {
		if res.Scenario == scenario && res.Key == key && res.Conns == conns {
			return res, true
		}
	}
	return Result{}, false
}

// Skipped returns the results that did not run to completion because a
// worker could not be opened. They are neither passes nor SLO violations: the
// harness, not the signer, failed to measure them. A result whose ops went
// unanswered is not among them: that is the signer's failure.
func (r *Report) Skipped() []Result {
	var out []Result
	for _, res := range r.Results {
		if res.Err != "" && !res.Unanswered {
			out = append(out, res)
		}
	}
	return out
}

// Names of the goal ratios (issue 3's, the journal's of issue 5 and the
// PKCS#11 front's of issue 8); each is the first-named figure divided by the
// second, ECDSA P-256, same run.
const (
	RatioAgentVsDirectP50    = "agent_vs_direct_p50"    // agent-unix p50 @1 / direct p50 @1
	RatioAgentVsDirectOpsG8  = "agent_vs_direct_ops_g8" // agent-unix ops/s @8 / direct ops/s @8
	RatioP11KitVsAgentP50    = "p11kit_vs_agent_p50"    // p11kit p50 @1 / agent-unix p50 @1
	RatioAgentVsP11KitOpsG8  = "agent_vs_p11kit_ops_g8" // agent-unix ops/s @8 / p11kit ops/s @8
	RatioTCPVsUnixP50        = "tcp_vs_unix_p50"        // agent-tcp p50 @1 / agent-unix p50 @1
	GoalSoftwareEd25519OpsG8 = "software_ed25519_ops_g8"
	RatioJournalVsOffOpsG8   = "journal_wal_vs_off_ops_g8"      // software-wal ops/s @8 / software-nojournal ops/s @8
	RatioMainVsOffOpsG8      = "journal_wal_main_vs_off_ops_g8" // software ops/s @8 / software-nojournal ops/s @8 (reported)
	RatioFsyncVsOffOpsG8     = "journal_fsync_vs_off_ops_g8"    // software-fsync ops/s @8 / software-nojournal ops/s @8 (reported)
	RatioJournalHSMOpsG8     = "journal_wal_vs_off_hsm_ops_g8"  // agent-unix ops/s @8 / agent-unix-nojournal ops/s @8 (reported)
	RatioPolicyVsNoneOpsG8   = "policy_vs_none_ops_g8"          // software-policy ops/s @8 / software-wal ops/s @8
	RatioFrontVsP11KitOpsG8  = "front_vs_p11kit_ops_g8"         // pkcs11-front ops/s @8 / p11kit ops/s @8
	RatioFrontVsP11KitP50    = "front_vs_p11kit_p50"            // pkcs11-front p50 @1 / p11kit p50 @1
)

type ratioDef struct {
	name     string
	num, den string // scenarios, both on KeyECDSAP256
	conns    int
	ops      bool // ops/s rather than p50
	goal     float64
	atMost   bool // the goal is an upper bound
	reach    reachKind
}

// reachKind says which side of a ratio signs on the SoftHSM2 token in
// another process than the bench's, and so how far the ratio can go in a
// run (Goal.Reach). Such a signature costs at least the token's own in a
// hot loop in process (direct) and a bare round trip to another process
// (roundtrip): in latency, the two p50s at 1 connection; in CPU, the
// least CPU per op either was measured at. With every core busy, no such
// signer can do more than cores ÷ that CPU per op.
type reachKind int

const (
	reachNone   reachKind = iota
	reachP50Num           // num's p50 is at least direct's + roundtrip's
	reachP50Den           // den's is
	reachOpsNum           // num's ops/s are at most cores ÷ (direct's + roundtrip's CPU per op)
)

var ratioDefs = []ratioDef{
	{name: RatioAgentVsDirectP50, num: ScenarioAgentUnix, den: ScenarioDirect, conns: 1, goal: 1.3, atMost: true, reach: reachP50Num},
	{name: RatioAgentVsDirectOpsG8, num: ScenarioAgentUnix, den: ScenarioDirect, conns: 8, ops: true, goal: 1.0, reach: reachOpsNum},
	{name: RatioP11KitVsAgentP50, num: ScenarioP11Kit, den: ScenarioAgentUnix, conns: 1, goal: 3, reach: reachP50Den},
	{name: RatioAgentVsP11KitOpsG8, num: ScenarioAgentUnix, den: ScenarioP11Kit, conns: 8, ops: true, goal: 3, reach: reachOpsNum},
	{name: RatioTCPVsUnixP50, num: ScenarioAgentTCP, den: ScenarioAgentUnix, conns: 1, goal: 1.2, atMost: true},
	{name: RatioJournalVsOffOpsG8, num: ScenarioSoftwareWAL, den: ScenarioSoftwareNoJournal, conns: 8, ops: true, goal: 0.9},
	{name: RatioMainVsOffOpsG8, num: ScenarioSoftware, den: ScenarioSoftwareNoJournal, conns: 8, ops: true},
	{name: RatioFsyncVsOffOpsG8, num: ScenarioSoftwareFsync, den: ScenarioSoftwareNoJournal, conns: 8, ops: true},
	{name: RatioJournalHSMOpsG8, num: ScenarioAgentUnix, den: ScenarioAgentNoJournal, conns: 8, ops: true},
	{name: RatioPolicyVsNoneOpsG8, num: ScenarioSoftwarePolicy, den: ScenarioSoftwareWAL, conns: 8, ops: true, goal: 0.95},
	{name: RatioFrontVsP11KitOpsG8, num: ScenarioPKCS11Front, den: ScenarioP11Kit, conns: 8, ops: true, goal: 2.5, reach: reachOpsNum},
	{name: RatioFrontVsP11KitP50, num: ScenarioPKCS11Front, den: ScenarioP11Kit, conns: 1, goal: 0.5, atMost: true, reach: reachP50Num},
}

// ComputeRatios fills Ratios with the goal ratios on ECDSA P-256, each the
// ratio of the two scenarios' medians, and RepRatios with the same ratios
// rep by rep. A ratio whose inputs did not run (missing, skipped, every op
// failed, or a zero divisor) is left out rather than reported as 0 or
// infinity.
func (r *Report) ComputeRatios() {
	r.Ratios = make(map[string]float64, len(ratioDefs))
	r.RepRatios = make(map[string][]float64, len(ratioDefs))
	for _, d := range ratioDefs {
		num, ok1 := r.Find(d.num, KeyECDSAP256, d.conns)
		den, ok2 := r.Find(d.den, KeyECDSAP256, d.conns)
		if !ok1 || !ok2 || !num.ran() || !den.ran() || r.incomplete(d.num, KeyECDSAP256, d.conns) || r.incomplete(d.den, KeyECDSAP256, d.conns) {
			continue
		}
		n, m := num.P50us, den.P50us
		repN, repM := num.RepP50us, den.RepP50us
		if d.ops {
			n, m = num.OpsPerS, den.OpsPerS
			repN, repM = num.RepOpsPerS, den.RepOpsPerS
		}
		if m > 0 {
			r.Ratios[d.name] = n / m
		}
		// Rep i of both was measured in the same pass over the
		// scenarios, seconds apart, so a drift of the machine between
		// reps moves both.
		var per []float64
		for i := range min(len(repN), len(repM)) {
			if repN[i] > 0 && repM[i] > 0 {
				per = append(per, repN[i]/repM[i])
			}
		}
		if len(per) > 0 {
			r.RepRatios[d.name] = per
		}
	}
}

// A Goal is one target and how this report stands against it.
type Goal struct {
	Name     string  `json:"name"`  // a Ratio* or Goal* constant
	Text     string  `json:"goal"`  // e.g. "≤ 1.3"
	Limit    float64 `json:"limit"` // the bound
	AtMost   bool    `json:"at_most"`
	Value    float64 `json:"value"`
	Measured bool    `json:"measured"`

	// The same ratio rep by rep (Report.RepRatios): its range, and in how
	// many of the RepPairs it was met (0 for a figure with no goal). Zero
	// when no pair was measured.
	RepMin      float64 `json:"rep_min,omitempty"`
	RepMax      float64 `json:"rep_max,omitempty"`
	RepPairs    int     `json:"rep_pairs,omitempty"`
	RepPairsMet int     `json:"rep_pairs_met,omitempty"`

	// Failed counts the ops that failed in the results the goal compares:
	// their latencies are the successes' alone, so a goal with failures
	// is not met, whatever its figure.
	Failed int `json:"failed,omitempty"`

	// Interrupted: the run was stopped before a result the goal needs
	// had every rep (Report.Interrupted); the goal is not judged.
	Interrupted bool `json:"interrupted,omitempty"`

	// Reach is the best value the ratio could have taken in this run, for
	// a goal on a signer in another process (reachKind): from the direct
	// and roundtrip scenarios, 0 when either was not measured.
	Reach float64 `json:"reach,omitempty"`
}

// OutOfReach reports whether the run's floors put the goal beyond any
// signer in another process: not even one that did nothing but sign on
// the token and answer could have met it.
func (g Goal) OutOfReach() bool {
	return g.Reach > 0 && g.Limit != 0 && !g.reached(g.Reach)
}

// reached reports whether v meets the goal's bound.
func (g Goal) reached(v float64) bool {
	if g.AtMost {
		return v <= g.Limit
	}
	return v >= g.Limit
}

// Met reports whether the goal was measured, with no op failed, and
// reached.
func (g Goal) Met() bool {
	return g.Measured && g.Failed == 0 && g.reached(g.Value)
}

func (g Goal) status() string {
	switch {
	case g.Interrupted:
		return "not judged: interrupted"
	case !g.Measured:
		return "not measured"
	case g.Failed > 0 && g.Limit == 0:
		return fmt.Sprintf("reported (no goal); %d ops failed in its scenarios", g.Failed)
	case g.Failed > 0:
		return fmt.Sprintf("NOT met: %d ops failed in its scenarios", g.Failed)
	case g.Limit == 0:
		return "reported (no goal)"
	case g.Met():
		return "met"
	default:
		return "NOT met"
	}
}

// figure is the goal's value for the report: two decimals, or as many as
// it takes for the printed figure to side with the verdict (0.8996 against
// ≥ 0.9 reads "0.8996", not "0.90 … NOT met").
func (g Goal) figure() string { return g.format(g.Value) }

// format prints x, a value of the goal's ratio (the median or one rep's),
// as figure does.
func (g Goal) format(x float64) string {
	for _, prec := range []int{2, 4, 6} {
		s := strconv.FormatFloat(x, 'f', prec, 64)
		if v, _ := strconv.ParseFloat(s, 64); g.Limit == 0 || g.reached(v) == g.reached(x) {
			return s
		}
	}
	return strconv.FormatFloat(x, 'g', -1, 64)
}

// Goals evaluates the goals against Ratios (call ComputeRatios
// first on a hand-built report) and the software Ed25519 throughput.
func (r *Report) Goals() []Goal {
	goals := make([]Goal, 0, len(ratioDefs)+1)
	for _, d := range ratioDefs {
		g := Goal{Name: d.name, Limit: d.goal, AtMost: d.atMost}
		g.Value, g.Measured = r.Ratios[d.name]
		g.Interrupted = r.incomplete(d.num, KeyECDSAP256, d.conns) || r.incomplete(d.den, KeyECDSAP256, d.conns)
		for _, sc := range []string{d.num, d.den} {
			if res, ok := r.Find(sc, KeyECDSAP256, d.conns); ok && g.Measured {
				g.Failed += res.Errors
			}
		}
		if per := r.RepRatios[d.name]; g.Measured && len(per) > 0 {
			g.RepMin, g.RepMax, g.RepPairs = slices.Min(per), slices.Max(per), len(per)
			for _, v := range per {
				if g.Limit != 0 && g.reached(v) {
					g.RepPairsMet++
				}
			}
		}
		g.Reach = r.reach(d)
		goals = append(goals, g)
	}
	g := Goal{Name: GoalSoftwareEd25519OpsG8, Limit: 40000, Interrupted: r.incomplete(ScenarioSoftware, KeyEd25519, 8)}
	if res, ok := r.Find(ScenarioSoftware, KeyEd25519, 8); ok && res.ran() && !g.Interrupted {
		g.Value, g.Measured, g.Failed = res.OpsPerS, true, res.Errors
	}
	goals = append(goals, g)
	for i := range goals {
		op := "≥"
		if goals[i].AtMost {
			op = "≤"
		}
		goals[i].Text = fmt.Sprintf("%s %g", op, goals[i].Limit)
		if goals[i].Limit == 0 {
			goals[i].Text = "none, the figure is reported"
		}
	}
	return goals
}

// reach works out Goal.Reach for d (reachKind).
func (r *Report) reach(d ratioDef) float64 {
	usable := func(scenario, key string, conns int) (Result, bool) {
		res, ok := r.Find(scenario, key, conns)
		if !ok || !res.ran() || res.Errors > 0 || r.incomplete(scenario, key, conns) {
			return Result{}, false
		}
		return res, true
	}
	switch d.reach {
	case reachOpsNum:
		den, ok := usable(d.den, KeyECDSAP256, d.conns)
		sign, trip := r.leastCPUPerOp(ScenarioDirect, KeyECDSAP256), r.leastCPUPerOp(ScenarioRoundTrip, KeyNone)
		if !ok || den.OpsPerS <= 0 || sign == 0 || trip == 0 || r.Machine.Cores == 0 {
			return 0
		}
		return float64(r.Machine.Cores) * 1e6 / (sign + trip) / den.OpsPerS
	case reachP50Num, reachP50Den:
		fixed := d.den // the side that does not sign in another process
		if d.reach == reachP50Den {
			fixed = d.num
		}
		other, ok := usable(fixed, KeyECDSAP256, d.conns)
		direct, ok1 := usable(ScenarioDirect, KeyECDSAP256, 1)
		trip, ok2 := usable(ScenarioRoundTrip, KeyNone, 1)
		if !ok || !ok1 || !ok2 || other.P50us <= 0 {
			return 0
		}
		floor := direct.P50us + trip.P50us
		if d.reach == reachP50Den {
			return other.P50us / floor
		}
		return floor / other.P50us
	}
	return 0
}

// leastCPUPerOp is the least CPU per op scenario was measured at on key,
// over every connection count that ran without a failed op; 0 if none.
func (r *Report) leastCPUPerOp(scenario, key string) float64 {
	least := 0.0
	for _, res := range r.Results {
		if res.Scenario != scenario || res.Key != key || !res.ran() || res.Errors > 0 || res.CPUPerOpUs <= 0 || r.incomplete(scenario, key, res.Conns) {
			continue
		}
		if least == 0 || res.CPUPerOpUs < least {
			least = res.CPUPerOpUs
		}
	}
	return least
}

var goalDescriptions = map[string]string{
	RatioAgentVsDirectP50:    "agent-unix p50 ÷ direct p50, 1 conn",
	RatioAgentVsDirectOpsG8:  "agent-unix ops/s ÷ direct ops/s, 8 conns",
	RatioP11KitVsAgentP50:    "p11kit p50 ÷ agent-unix p50, 1 conn",
	RatioAgentVsP11KitOpsG8:  "agent-unix ops/s ÷ p11kit ops/s, 8 conns",
	RatioTCPVsUnixP50:        "agent-tcp p50 ÷ agent-unix p50, 1 conn",
	GoalSoftwareEd25519OpsG8: "software Ed25519 ops/s, 8 conns",
	RatioJournalVsOffOpsG8:   "software ops/s with the journal (wal) ÷ without, agents alike but for it (software-wal ÷ software-nojournal), 8 conns",
	RatioMainVsOffOpsG8:      "software ops/s on the main agent, which serves every scenario, ÷ the journal-off agent (software ÷ software-nojournal), 8 conns",
	RatioFsyncVsOffOpsG8:     "software ops/s with the journal in fsync mode ÷ without, 8 conns",
	RatioJournalHSMOpsG8:     "SoftHSM2 ops/s with the journal (wal) ÷ without (agent-unix ÷ agent-unix-nojournal), 8 conns",
	RatioPolicyVsNoneOpsG8:   "software ops/s with every policy rule on ÷ without a policy (software-policy ÷ software-wal), 8 conns",
	RatioFrontVsP11KitOpsG8:  "pkcs11-front ops/s ÷ p11kit ops/s, 8 conns",
	RatioFrontVsP11KitP50:    "pkcs11-front p50 ÷ p11kit p50, 1 conn",
}

// Markdown writes the results table, then the goals with their status, then
// what was skipped.
func (r *Report) Markdown(w io.Writer) error {
	var b strings.Builder
	if r.Interrupted != nil {
		fmt.Fprintf(&b, "**Interrupted after rep %d of %d**: the rows hold what was measured until then; incomplete: %s. No goal is judged on an incomplete result.\n\n",
			r.Interrupted.AfterRep, r.Reps, strings.Join(r.Interrupted.Incomplete, ", "))
	}
	b.WriteString("| scenario | key | conns | p50 µs | p95 µs | p99 µs | p99.9 µs | ops/s | CPU µs/op | errors |\n")
	b.WriteString("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, res := range r.Results {
		fmt.Fprintf(&b, "| %s | %s | %d ", mdEscape(res.Scenario), mdEscape(res.Key), res.Conns)
		switch {
		case res.Unanswered && res.Reps == 0:
			b.WriteString("| – | – | – | – | – | – | unanswered |\n")
			continue
		case res.Err != "" && res.Reps == 0:
			b.WriteString("| – | – | – | – | – | – | not run |\n")
			continue
		case res.AllFailed:
			fmt.Fprintf(&b, "| – | – | – | – | 0 | – | %d (all failed) |\n", res.Errors)
			continue
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %.0f | %s | %d |\n",
			fmtUs(res.P50us), fmtUs(res.P95us), fmtUs(res.P99us), fmtUs(res.P999us),
			res.OpsPerS, fmtUs(res.CPUPerOpUs), res.Errors)
	}

	b.WriteString("\nGoals (ECDSA P-256 unless named, one run):\n\n")
	anyReach := false
	for _, g := range r.Goals() {
		anyReach = anyReach || g.Reach > 0
		fmt.Fprintf(&b, "- %s (%s): ", g.Name, goalDescriptions[g.Name])
		if g.Measured {
			if g.Name == GoalSoftwareEd25519OpsG8 {
				fmt.Fprintf(&b, "%.0f", g.Value)
			} else {
				b.WriteString(g.figure())
			}
			fmt.Fprintf(&b, ", goal %s: %s", g.Text, g.status())
			if g.RepPairs > 1 {
				// Each end sides with the count after it: reps of
				// 0.8996 and 0.95 against ≥ 0.9 read "0.90-0.95, met in
				// 1 of 2".
				fmt.Fprintf(&b, " (rep by rep %s-%s", g.format(g.RepMin), g.format(g.RepMax))
				if g.Limit != 0 {
					fmt.Fprintf(&b, ", met in %d of %d", g.RepPairsMet, g.RepPairs)
				}
				b.WriteString(")")
			}
			if g.Reach > 0 {
				fmt.Fprintf(&b, "; at best %s in this run", g.format(g.Reach))
				if g.OutOfReach() {
					b.WriteString(": out of reach")
				}
			}
			b.WriteString("\n")
		} else {
			fmt.Fprintf(&b, "goal %s: %s\n", g.Text, g.status())
		}
	}

	if anyReach {
		b.WriteString("\n\"At best\" is the figure a signer in another process would reach if it did nothing but sign on the token and answer: a signature costs at least the `direct` p50 plus the `roundtrip` p50 (a bare request and reply with an echo process), and at least the least CPU per op either was measured at, of which the machine's cores give so many per second. \"Out of reach\": the goal is beyond that figure in this run.\n")
	}

	if line := r.cloudSLOSummary(); line != "" {
		b.WriteString("\n" + line)
	}

	var notes []string
	for _, res := range r.Results {
		switch {
		case res.Err != "" && res.Reps > 0:
			notes = append(notes, fmt.Sprintf("- %s: only %d of %d reps ran: %s", res.label(), res.Reps, r.Reps, mdEscape(res.Err)))
		case res.Err != "":
			notes = append(notes, fmt.Sprintf("- %s: not run: %s", res.label(), mdEscape(res.Err)))
		case res.AllFailed:
			notes = append(notes, fmt.Sprintf("- %s: every op failed: %s", res.label(), mdEscape(res.OpErr)))
		}
	}
	if len(notes) > 0 {
		b.WriteString("\nNot measured:\n\n")
		b.WriteString(strings.Join(notes, "\n"))
		b.WriteString("\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func fmtUs(us float64) string {
	if us >= 1000 {
		return fmt.Sprintf("%.0f", us)
	}
	return fmt.Sprintf("%.1f", us)
}

// mdEscape keeps error text from breaking a table row or a list line.
func mdEscape(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ", "\r", " ").Replace(s)
}

// WriteJSON writes the report as one JSON object: "results" holds one object
// per scenario, key and connection count (scenario, key, conns, p50_us,
// p95_us, p99_us, p999_us, ops_per_s, errors, cpu_per_op_us, reps, ...),
// "ratios" the goal ratios by name, "goals" their status, and "machine",
// "options" and "started" say where and how it was measured.
func (r *Report) WriteJSON(w io.Writer) error {
	type jsonOptions struct {
		Conns    []int  `json:"conns"`
		Duration string `json:"duration"`
		Warmup   string `json:"warmup"`
		Reps     int    `json:"reps"`
	}
	type jsonGoal struct {
		Goal
		Met bool `json:"met"`
	}
	out := struct {
		Started   time.Time            `json:"started"`
		Options   jsonOptions          `json:"options"`
		Machine   Machine              `json:"machine"`
		Results   []Result             `json:"results"`
		Ratios    map[string]float64   `json:"ratios"`
		RepRatios map[string][]float64 `json:"rep_ratios"`
		Goals     []jsonGoal           `json:"goals"`
		// Absent from a complete run's file, as before.
		Interrupted *Interruption `json:"interrupted,omitempty"`
	}{
		Started: r.Started,
		Options: jsonOptions{
			Conns:    r.Conns,
			Duration: r.Duration.String(),
			Warmup:   r.Warmup.String(),
			Reps:     r.Reps,
		},
		Machine:     r.Machine,
		Results:     r.Results,
		Ratios:      r.Ratios,
		RepRatios:   r.RepRatios,
		Interrupted: r.Interrupted,
	}
	// Consumers index these; null would make them special-case an empty run.
	if out.Results == nil {
		out.Results = []Result{}
	}
	if out.Ratios == nil {
		out.Ratios = map[string]float64{}
	}
	if out.RepRatios == nil {
		out.RepRatios = map[string][]float64{}
	}
	for _, g := range r.Goals() {
		out.Goals = append(out.Goals, jsonGoal{Goal: g, Met: g.Met()})
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		return fmt.Errorf("bench: write json: %w", err)
	}
	return nil
}
