package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/bench"
)

func newSoakCommand() *cobra.Command {
	var (
		conns    int
		duration time.Duration
		jsonPath string
	)
	cmd := &cobra.Command{
		Use:   "soak [--conns N] [--duration D] [--json FILE]",
		Short: "Hold many connections, well-behaved and hostile, to a throwaway agent and check it survives intact",
		Long: `Soak starts a throwaway SoftHSM2 token and an agent process on its keys and
software keys (with the agent's default limits), then holds --conns
connections to it for --duration:

  70%  well-behaved signers: Sign in a loop, every signature verified with
       the public key the agent lists
  10%  slow clients: each frame written one byte at a time (slow-loris)
  10%  junk senders: random bytes, oversized or empty frames, garbage after
       Hello
  10%  never-readers: pipeline Sign requests and never read a reply

Clients the agent drops reconnect. The agent's RSS, open descriptors,
threads and goroutines (from its /metrics) are sampled throughout. Then the
agent is stopped with SIGTERM and its journal checked with 'sigil audit
verify' and 'sigil audit export'.

It exits 1 if the agent exits during the run or uncleanly on SIGTERM, a
signature does not verify, a signature a client received has no audit record
or the chain does not verify, or RSS, descriptors or goroutines grow after
warm-up (the first fifth): the median of the last third of the samples may
exceed the median of the first third by 10% plus a slack (16 MiB, 32
descriptors, 64 goroutines).

The summary is Markdown on stdout; --json FILE writes every sample.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			self, err := os.Executable()
			if err != nil {
				return &exitError{exitFailure, err}
			}
			o := bench.SoakOptions{Sigil: self, Conns: conns, Duration: duration, Log: cmd.ErrOrStderr()}
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			report, err := bench.Soak(ctx, o)
			if err != nil {
				return &exitError{exitFailure, err}
			}
			if err := report.Markdown(cmd.OutOrStdout()); err != nil {
				return err
			}
			if jsonPath != "" {
				var b bytes.Buffer
				if err := report.WriteJSON(&b); err != nil {
					return err
				}
				if err := os.WriteFile(jsonPath, b.Bytes(), 0o644); err != nil {
					return &exitError{exitFailure, err}
				}
			}
			if !report.Passed() {
				return &exitError{exitFailure, fmt.Errorf("soak failed: %d problem(s), listed above", len(report.Failures))}
			}
			if ctx.Err() != nil {
				return &exitError{exitFailure, errors.New("soak interrupted")}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&conns, "conns", 0, "concurrent connections (default 1000)")
	f.DurationVar(&duration, "duration", 0, "how long to hold them (default 5m)")
	f.StringVar(&jsonPath, "json", "", "write the report with every sample as JSON here")
	return cmd
}
