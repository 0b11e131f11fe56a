package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/bench"
)

func newBenchCommand(g *globalFlags) *cobra.Command {
	var (
		quick             bool
		conns             string
		keys, scenarios   string
		duration, warmup  time.Duration
		reps              int
		jsonPath, svgPath string
		docPath, sloSpec  string
		addr, key         string
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure signing latency and throughput against the goals and SLOs",
		Long: `Measure signatures per second and latency percentiles.

With no --addr it sets everything up in a temp dir and tears it down after: a
SoftHSM2 token with ECDSA P-256, RSA-2048 and Ed25519 keys, the agent as its own
process serving them (and software keys of the same types), and a p11-kit
server forwarding the same token. Scenarios, interleaved rep by rep so ratios
hold on a noisy machine:

  roundtrip   a bare request and reply with an echo process, nothing signed
              (the floor of a round trip on this machine; with direct, it
              gives each goal the best figure this run allows, "at best")
  direct      in-process miekg/pkcs11 on the token (the floor)
  agent-unix  the agent over its Unix socket, one connection per worker
  agent-tcp   the agent over mutual TLS 1.3 on loopback, one connection per worker
  p11kit      PKCS#11 forwarded by p11-kit (client module in this process)
  pkcs11-front
              libsigil-pkcs11.so (beside this binary) loaded in this process,
              signing through an agent on the same SoftHSM2 keys
  software    the agent on software keys
  software-wal, software-nojournal, software-fsync, software-policy
              the same keys on agents of their own with the journal in wal
              mode (as the main agent), off, in fsync mode, and in wal mode
              with a policy whose every rule is on (cost ratios)
  awskms, gcpkms, azurekv
              one more agent process signing with an ECDSA P-256 key in each
              cloud KMS, against emulators started on loopback: local-kms
              (not run when not installed), an in-process Cloud KMS and an
              in-process Key Vault (docs/cloudkms.md)

A scenario that cannot be set up (p11-kit or local-kms not installed,
libsigil-pkcs11.so not built) is reported "not run" with why; its goals read
"not measured" and no SLO judges it.

--quick (what 'make bench' runs) takes under a minute on 2 cores.
--doc FILE writes the full report (machine, command, table, ratios) and the
CDF plot beside it. --slo p95=50ms,p99=200ms exits 1 naming every scenario
that missed. The cloud scenarios are always judged against the seeds' cloud
SLO, p95=150ms,p99=200ms, whatever --slo says (their latency includes a KMS
round trip); the report says whether they met it, and with --slo a miss
exits 1 too.

Ctrl-C (or SIGTERM) stops the run and still writes the report, --doc and
--json of what was measured, marked interrupted after rep K of N with the
incomplete results named; no goal is judged on those, nor the SLO, and it
exits 1. A second Ctrl-C quits at once.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o := bench.SuiteOptions{Log: cmd.ErrOrStderr(), Addr: addr, Key: key}
			if quick {
				o.Conns = []int{1, 8}
				// 40 scenario×conns cells (with the cloud ones and
				// pkcs11-front) × 2 reps fit in the minute: see the
				// commit that set 400 ms for what make bench measured.
				o.Duration = 400 * time.Millisecond
				o.Warmup = 100 * time.Millisecond
				o.Reps = 2
				o.Keys = []string{bench.KeyECDSAP256, bench.KeyEd25519}
			}
			if conns != "" {
				list, err := parseInts(conns)
				if err != nil {
					return usageError("--conns: %v", err)
				}
				o.Conns = list
			}
			if keys != "" {
				o.Keys = strings.Split(keys, ",")
			}
			if scenarios != "" {
				o.Scenarios = strings.Split(scenarios, ",")
			}
			if duration != 0 {
				o.Duration = duration
			}
			if warmup != 0 {
				o.Warmup = warmup
			}
			if reps != 0 {
				o.Reps = reps
			}
			var slo bench.SLO
			if sloSpec != "" {
				var err error
				if slo, err = bench.ParseSLO(sloSpec); err != nil {
					return usageError("--slo: %v", err)
				}
			}
			if addr != "" && key == "" {
				return usageError("--addr needs --key: the key to sign with")
			}
			if addr != "" {
				// The flags first (a usage error is said as such), then an
				// agent must answer there within --timeout: the harness's
				// workers dial with no deadline, and waited for good on a
				// socket that accepts and never answers.
				ctx, cancel := g.context()
				c, err := g.dialAgent(ctx, "bench", addr, func(addr, cause string) string {
					return fmt.Sprintf("--addr: no agent at %s: %s", addr, cause)
				})
				cancel()
				if err != nil {
					return err
				}
				c.Close()
			}
			self, err := os.Executable()
			if err != nil {
				return &exitError{exitFailure, err}
			}
			o.Sigil = self
			o.Progress = func(line string) { fmt.Fprintln(cmd.ErrOrStderr(), line) }

			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			// The first signal stops the run and keeps what it measured;
			// with the handler gone, a second one ends the process at
			// once, as an operator who presses Ctrl-C twice means.
			context.AfterFunc(ctx, func() {
				stop()
				fmt.Fprintln(cmd.ErrOrStderr(), "bench: interrupted: reporting what was measured (again to quit at once)")
			})
			report, err := bench.RunSuite(ctx, o)
			if report == nil || (err != nil && report.Interrupted == nil) {
				return &exitError{exitFailure, err}
			}
			report.ComputeRatios()
			if err := report.Markdown(cmd.OutOrStdout()); err != nil {
				return err
			}
			if err := writeReportFiles(report, jsonPath, svgPath, docPath, os.Args); err != nil {
				return &exitError{exitFailure, err}
			}
			if in := report.Interrupted; in != nil {
				// Partial figures are written for the operator, but a
				// run that was stopped passes nothing, the SLO included.
				return &exitError{exitFailure, fmt.Errorf("interrupted after rep %d of %d: %d results incomplete, goals on them and the SLO not judged", in.AfterRep, report.Reps, len(in.Incomplete))}
			}
			if sloSpec != "" {
				if err := slo.Check(report).Err(); err != nil {
					return &exitError{exitFailure, fmt.Errorf("SLO %s missed: %w", slo, err)}
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "SLO %s met by every scenario (cloud scenarios: %s)\n", slo, bench.CloudSLO)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&quick, "quick", false, "1 and 8 connections, ECDSA P-256 and Ed25519, 2 reps of 400ms (under a minute)")
	f.StringVar(&conns, "conns", "", "connection counts, comma-separated (default 1,8,64)")
	f.StringVar(&keys, "keys", "", "key types: ecdsa-p256,rsa-2048,ed25519 (default all)")
	f.StringVar(&scenarios, "scenarios", "", "roundtrip,direct,agent-unix,agent-unix-nojournal,agent-tcp,p11kit,pkcs11-front,software,software-wal,software-nojournal,software-fsync,software-policy,awskms,gcpkms,azurekv (default all but the experiments)")
	f.DurationVar(&duration, "duration", 0, "measured time per rep (default 2s)")
	f.DurationVar(&warmup, "warmup", 0, "warm-up before each rep (default 300ms)")
	f.IntVar(&reps, "reps", 0, "repetitions (default 3); figures are medians over reps")
	f.StringVar(&jsonPath, "json", "", "write results and ratios as JSON here")
	f.StringVar(&svgPath, "svg", "", "write the latency CDF (1 connection) as SVG here")
	f.StringVar(&docPath, "doc", "", "write the full Markdown report here (and its SVG beside it)")
	f.StringVar(&sloSpec, "slo", "", "e.g. p95=50ms,p99=200ms: exit 1 if any scenario misses (cloud scenarios: always p95=150ms,p99=200ms)")
	f.StringVar(&addr, "addr", "", "measure an agent already running at this socket (it must say Hello within --timeout)")
	f.StringVar(&key, "key", "", "with --addr: the key to sign with")
	return cmd
}

// newBenchEchoCommand is the echo process of the bench's roundtrip
// scenario (bench.ServeEcho): hidden, as only `sigil bench` runs it.
func newBenchEchoCommand() *cobra.Command {
	return &cobra.Command{
		Use:    bench.EchoCommand + " SOCKET",
		Short:  "Echo every message on a Unix socket (the bench's roundtrip floor)",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			if err := bench.ServeEcho(ctx, args[0]); err != nil {
				return &exitError{exitFailure, err}
			}
			return nil
		},
	}
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, part := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(part))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive count", part)
		}
		out = append(out, n)
	}
	return out, nil
}

func writeReportFiles(r *bench.Report, jsonPath, svgPath, docPath string, argv []string) error {
	if jsonPath != "" {
		var b bytes.Buffer
		if err := r.WriteJSON(&b); err != nil {
			return err
		}
		if err := os.WriteFile(jsonPath, b.Bytes(), 0o644); err != nil {
			return err
		}
	}
	if svgPath != "" {
		if err := writeSVG(r, svgPath, 1); err != nil {
			return err
		}
	}
	if docPath == "" {
		return nil
	}
	base := strings.TrimSuffix(filepath.Base(docPath), filepath.Ext(docPath))
	var svgs []string
	for _, n := range r.Conns {
		name := fmt.Sprintf("%s-cdf-%d.svg", strings.ToLower(base), n)
		if err := writeSVG(r, filepath.Join(filepath.Dir(docPath), name), n); err != nil {
			return err
		}
		svgs = append(svgs, name)
	}
	var b bytes.Buffer
	m := r.Machine
	fmt.Fprintf(&b, "# Benchmarks\n\nWritten by `sigil bench --doc` on %s. Regenerate with `make bench-full`.\n\n", r.Started.UTC().Format("2006-01-02 15:04 MST"))
	if in := r.Interrupted; in != nil {
		fmt.Fprintf(&b, "**This run was interrupted after rep %d of %d**: partial figures, see Results.\n\n", in.AfterRep, r.Reps)
	}
	fmt.Fprintf(&b, "## Machine and versions\n\n- %d cores, %s, Linux %s, %s %s/%s\n", m.Cores, m.CPUModel, m.Kernel, m.GoVersion, m.OS, m.Arch)
	fmt.Fprintf(&b, "- SoftHSM2 %s, p11-kit %s\n", toolVersion("softhsm2-util", "--version"), toolVersion("p11-kit", "--version"))
	fmt.Fprintf(&b, "- the agents' garbage-collection target: %s\n", agentGCTarget(os.Getenv("GOGC")))
	fmt.Fprintf(&b, "- command: `%s`\n", strings.Join(append([]string{"sigil"}, argv[1:]...), " "))
	fmt.Fprintf(&b, "- %d reps of %v after %v warm-up, scenarios interleaved rep by rep, in reverse order every other rep; figures are medians over reps; a goal is judged on the ratio of the medians, and \"rep by rep\" gives the same ratio for each rep\n\n", r.Reps, r.Duration, r.Warmup)
	b.WriteString("What limits each goal, and what was tried, is in [performance.md](performance.md).\n\n## Results\n\n")
	if err := r.Markdown(&b); err != nil {
		return err
	}
	b.WriteString("\n## Latency CDFs\n\n")
	for i, s := range svgs {
		fmt.Fprintf(&b, "%d connection(s):\n\n![latency CDF, %d connections](%s)\n\n", r.Conns[i], r.Conns[i], s)
	}
	return os.WriteFile(docPath, b.Bytes(), 0o644)
}

// agentGCTarget says which GC target the bench's agents ran at: they
// inherit the bench's environment, so a GOGC there overrides their default
// and changes the software rows (docs/performance.md, "The garbage
// collector").
func agentGCTarget(gogc string) string {
	if gogc != "" {
		return "GOGC=" + gogc + " from the environment"
	}
	return strconv.Itoa(agent.DefaultGCPercent) + " (runtime.gc_percent, the default)"
}

func writeSVG(r *bench.Report, path string, conns int) error {
	var b bytes.Buffer
	if err := r.WriteSVG(&b, conns); err != nil {
		return err
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}

func toolVersion(tool string, args ...string) string {
	out, err := exec.Command(tool, args...).Output()
	if err != nil {
		// Some tools (p11-kit) have no --version: ask the package manager.
		if pkg, perr := exec.Command("dpkg-query", "-W", "-f", "${Version}", tool).Output(); perr == nil && len(pkg) > 0 {
			return string(pkg)
		}
		return "(not installed)"
	}
	v := strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	if v == "" {
		return "(unknown)"
	}
	return v
}
