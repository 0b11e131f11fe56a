package main

import (
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
)

// The audit commands read the journal directly. Pebble allows one process
// at a time, so they run with the agent stopped (or on a copy of the
// directory); a running agent's journal answers "in use".
func newAuditCommand() *cobra.Command {
	var configPath, dir string
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Verify, read and export the audit journal",
	}
	cmd.PersistentFlags().StringVar(&configPath, "config", "", "agent configuration (to find the journal)")
	cmd.PersistentFlags().StringVar(&dir, "journal", "", "journal directory (default: from --config, else the default data dir)")
	open := func() (*journal.Journal, error) {
		d, err := journalDir(configPath, dir)
		if err != nil {
			return nil, &exitError{exitUsage, err}
		}
		if _, err := os.Stat(d); err != nil {
			return nil, &exitError{exitFailure, fmt.Errorf("no journal at %s: %w", d, err)}
		}
		j, err := journal.Open(journal.Options{Dir: d})
		if err != nil {
			if strings.Contains(err.Error(), "lock") {
				return nil, &exitError{exitFailure, fmt.Errorf("journal %s is in use (is the agent running? stop it, or copy the directory): %w", d, err)}
			}
			return nil, &exitError{exitFailure, err}
		}
		return j, nil
	}

	verify := &cobra.Command{
		Use:   "verify",
		Short: "Recompute the hash chain; exit 1 and name the first broken record on a break",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			j, err := open()
			if err != nil {
				return err
			}
			defer j.Close()
			rep, err := j.Verify(context.Background())
			if err != nil {
				return &exitError{exitFailure, err}
			}
			if !rep.OK() {
				return &exitError{exitFailure, fmt.Errorf("%d records read; %v", rep.Records, rep.Break)}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "audit chain OK: %d records, seq %d..%d, head %s\n",
				rep.Records, rep.FirstSeq, rep.LastSeq, hex.EncodeToString(rep.HeadHash[:]))
			return nil
		},
	}

	var tenant string
	var n int
	tail := &cobra.Command{
		Use:   "tail [-n N] [--tenant T]",
		Short: "Print the last records",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			j, err := open()
			if err != nil {
				return err
			}
			defer j.Close()
			recs, err := j.Last(n, tenant)
			if err != nil {
				return &exitError{exitFailure, err}
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SEQ\tTIME\tTENANT\tSLOT\tKID\tOP\tALG\tCODE\tµs\tPEER")
			for _, r := range recs {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", r.Seq, r.Time.UTC().Format(time.RFC3339Nano),
					dash(r.Tenant), r.Slot, dash(r.KID), r.Op, dash(r.Algorithm), r.CodeName, r.LatencyMicros, r.Peer)
			}
			return tw.Flush()
		},
	}
	tail.Flags().IntVarP(&n, "lines", "n", 20, "how many records")
	tail.Flags().StringVar(&tenant, "tenant", "", "only this tenant's records")

	var since, format string
	export := &cobra.Command{
		Use:   "export [--since TIME] [--tenant T] --format jsonl",
		Short: "Write records as JSON lines for a log pipeline",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if format != "jsonl" {
				return usageError("--format: only jsonl is supported")
			}
			f := journal.Filter{Tenant: tenant}
			if since != "" {
				t, err := parseSince(since)
				if err != nil {
					return usageError("--since: %v", err)
				}
				f.Since = t
			}
			j, err := open()
			if err != nil {
				return err
			}
			defer j.Close()
			if err := j.WriteJSONL(context.Background(), cmd.OutOrStdout(), f); err != nil {
				return &exitError{exitFailure, err}
			}
			return nil
		},
	}
	export.Flags().StringVar(&since, "since", "", "RFC 3339 time, or a duration ago (24h)")
	export.Flags().StringVar(&tenant, "tenant", "", "only this tenant's records")
	export.Flags().StringVar(&format, "format", "jsonl", "output format (jsonl)")

	cmd.AddCommand(verify, tail, export)
	return cmd
}

func journalDir(configPath, dir string) (string, error) {
	if dir != "" {
		return dir, nil
	}
	cfg := agent.DefaultConfig()
	if configPath != "" {
		var err error
		if cfg, err = agent.LoadConfig(configPath); err != nil {
			return "", err
		}
	}
	cfg.EnsureDefaults()
	if cfg.Journal.Dir != "" {
		return cfg.Journal.Dir, nil
	}
	return filepath.Join(cfg.DataDir, "journal"), nil
}

func parseSince(s string) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil {
		return time.Now().Add(-d), nil
	}
	return time.Parse(time.RFC3339, s)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
