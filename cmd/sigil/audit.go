package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// The audit commands read the journal directory, which Pebble lets one
// process open at a time: with the agent stopped, or on a copy. verify and
// tail ask a running agent over its admin socket instead when one answers
// (and no directory is named).
// unchecked marks a failure of 'audit verify' to reach a verdict: exit 5,
// not the broken chain's 1. Usage errors keep their code.
func unchecked(err error) error {
	var ee *exitError
	if errors.As(err, &ee) && ee.code != exitFailure {
		return err
	}
	return &exitError{exitUnchecked, err}
}

func newAuditCommand(g *globalFlags) *cobra.Command {
	var configPath, dir string
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Verify, read and export the audit journal",
	}
	cmd.PersistentFlags().StringVar(&configPath, "config", "", "agent configuration (to find the journal)")
	cmd.PersistentFlags().StringVar(&dir, "journal", "", "journal directory (default: from --config, else the default data dir)")
	// open opens the journal directory itself with o (its Dir set here).
	// The reading commands open it read-only: they write nothing (no file another user would own,
	// no checkpoint over the evidence they report), and they read what a
	// writable Open refuses. inUse is what to do when another process
	// (the agent) holds the journal.
	const askTheAgent = "is the agent running? ask it with --admin-socket PATH, stop it, or copy the directory"
	// recover has no agent to ask: it writes to the journal itself.
	const recoverInUse = "is the agent running? recover writes to the journal: stop the agent first"
	open := func(o journal.Options, inUse string) (*journal.Journal, error) {
		d, err := journalDir(configPath, dir)
		if err != nil {
			// A --config that does not load: a local failure, as for
			// 'sigil agent --config'.
			return nil, &exitError{exitFailure, err}
		}
		if _, err := os.Stat(d); err != nil {
			return nil, &exitError{exitFailure, fmt.Errorf("no journal at %s: %w", d, err)}
		}
		o.Dir = d
		j, err := journal.Open(o)
		if err != nil {
			if errors.Is(err, journal.ErrInUse) {
				// The journal's words ("journal: in use by another
				// process: DIR") would name the directory a second time.
				return nil, &exitError{exitFailure, fmt.Errorf("journal %s is in use by another process (%s)", d, inUse)}
			}
			return nil, &exitError{exitFailure, err}
		}
		return j, nil
	}

	var adminSocket string
	// dialAdmin dials the admin socket at addr within --timeout (what
	// names the command in a refusal). A command that reads the directory
	// when no agent answers (the socket was not named) does so on an
	// exitUnreachable error.
	dialAdmin := func(what, addr string, noAgent func(addr, cause string) string) (*client.Client, error) {
		ctx, cancel := g.context()
		defer cancel()
		return g.dialAgent(ctx, what, addr, noAgent)
	}
	// theDirectoryIsItsJournal reports whether the directory read when no
	// agent answers is the journal of the agent asked: one named with
	// --admin-socket has its own; without --config the directory is the
	// default data dir's, the default agent's, and not that of an agent
	// at another --socket or $SIGIL_SOCK (a stopped systemd agent's).
	theDirectoryIsItsJournal := func() bool {
		return adminSocket == "" && (configPath != "" || namesTheDefaultAgent(g.socket))
	}
	noAgentAnswered := func(addr, cause string) string {
		if adminSocket == "" && !theDirectoryIsItsJournal() {
			return fmt.Sprintf("no agent answered at %s: %s; to read that agent's journal while it is stopped, name it with --config FILE or --journal DIR (the default data dir's is another agent's)", addr, cause)
		}
		return fmt.Sprintf("no agent answered at %s: %s", addr, cause)
	}
	readTheDirectory := func(err error) bool {
		var ee *exitError
		return theDirectoryIsItsJournal() && errors.As(err, &ee) && ee.code == exitUnreachable
	}
	// runningAgent dials the running agent's admin socket (auditAdminSocket)
	// unless there is none to ask. nil and no error: read the directory (no
	// agent answered, and none was named).
	runningAgent := func(what string) (*client.Client, error) {
		addr, err := auditAdminSocket(configPath, dir, adminSocket, g.socket)
		if err != nil || addr == "" {
			return nil, err
		}
		c, err := dialAdmin(what, addr, noAgentAnswered)
		if readTheDirectory(err) {
			return nil, nil
		}
		return c, err
	}
	var exportPath string
	verify := &cobra.Command{
		Use:   "verify",
		Short: "Recompute the hash chain (the running agent's, over its admin socket, else the journal directory); exit 1 and name the first broken record on a break, 5 when it could not be checked",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if exportPath != "" {
				if adminSocket != "" || configPath != "" || dir != "" {
					return usageError("--export checks a file alone: no --admin-socket, --config or --journal with it")
				}
				return verifyExport(cmd.OutOrStdout(), cmd.InOrStdin(), exportPath)
			}
			if c, err := runningAgent("audit verify"); err != nil {
				return unchecked(err)
			} else if c != nil {
				defer c.Close()
				wait := g.longWait(auditLongWait)
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				defer cancel()
				ok, summary, err := c.AuditVerify(ctx)
				if err != nil {
					return agentErrorAfter("audit verify", err, wait.String())
				}
				if !ok {
					return &exitError{exitFailure, fmt.Errorf("running agent: %s", summary)}
				}
				fmt.Fprintf(cmd.OutOrStdout(), "audit chain OK (running agent): %s\n", summary)
				return nil
			}
			j, err := open(journal.Options{ReadOnly: true}, askTheAgent)
			if err != nil {
				return unchecked(err)
			}
			defer j.Close()
			rep, err := j.Verify(context.Background())
			if err != nil {
				return unchecked(err)
			}
			if !rep.OK() {
				return &exitError{exitFailure, fmt.Errorf("%d records read; %v", rep.Records, rep.Break)}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "audit chain OK: %s\n", journal.Summary(&rep))
			return nil
		},
	}

	verify.Flags().StringVar(&adminSocket, "admin-socket", "", "verify the running agent's chain over its admin socket")
	verify.Flags().StringVar(&exportPath, "export", "", "check a file 'audit export' wrote (- for stdin) instead of a journal")
	var tenant string
	var n int
	var follow bool
	tail := &cobra.Command{
		Use:   "tail [-n N] [--tenant T] [--follow]",
		Short: "Print the last records (from the running agent over its admin socket, else from the journal directory)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// The running agent reads a count below 1 as its default
			// (100 records), the directory as none: neither is what was
			// asked for.
			if n < 1 {
				return usageError("-n/--lines: the number of records must be at least 1, not %d", n)
			}
			out := cmd.OutOrStdout()
			addr, err := auditAdminSocket(configPath, dir, adminSocket, g.socket)
			if err != nil {
				return err
			}
			if addr == "" && follow {
				return usageError("--follow reads the running agent: name its admin socket with --admin-socket")
			}
			if addr != "" {
				noAgent := noAgentAnswered
				if follow {
					noAgent = func(addr, cause string) string {
						return fmt.Sprintf("--follow reads the running agent, and none answered at %s: %s", addr, cause)
					}
				}
				c, err := dialAdmin("audit tail", addr, noAgent)
				if err == nil {
					defer c.Close()
					return tailOnline(cmd.Context(), c, out, tenant, n, follow, g.timeout)
				}
				// As verify, export and prune: the agent named is the
				// one asked about; another journal's records would pass
				// for its.
				if follow || !readTheDirectory(err) {
					return err
				}
			}
			j, err := open(journal.Options{ReadOnly: true}, askTheAgent)
			if err != nil {
				return err
			}
			defer j.Close()
			recs, err := j.Last(cmd.Context(), n, tenant)
			if err != nil {
				return &exitError{exitFailure, err}
			}
			tw := newTailWriter(out)
			for i := range recs {
				b, _ := recs[i].MarshalJSON()
				tw.row(b)
			}
			return tw.Flush()
		},
	}
	tail.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new records (running agent only)")
	tail.Flags().StringVar(&adminSocket, "admin-socket", "", "the running agent's admin socket")
	tail.Flags().IntVarP(&n, "lines", "n", 20, "how many records (at least 1)")
	tail.Flags().StringVar(&tenant, "tenant", "", "only this tenant's records")

	var since, format string
	export := &cobra.Command{
		Use:   "export [--since TIME] [--tenant T] --format jsonl",
		Short: "Write records as JSON lines for a log pipeline (the running agent's, over its admin socket, else the journal directory)",
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
			if c, err := runningAgent("audit export"); err != nil {
				return err
			} else if c != nil {
				defer c.Close()
				return exportOnline(cmd.Context(), c, cmd.OutOrStdout(), f, g.timeout)
			}
			j, err := open(journal.Options{ReadOnly: true}, askTheAgent)
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
	export.Flags().StringVar(&adminSocket, "admin-socket", "", "the running agent's admin socket")
	export.Flags().StringVar(&tenant, "tenant", "", "only this tenant's records")
	export.Flags().StringVar(&format, "format", "jsonl", "output format (jsonl)")

	var before string
	prune := &cobra.Command{
		Use:   "prune --before TIME",
		Short: "Delete the records older than TIME (the running agent's, over its admin socket, else the journal directory); the chain stays verifiable",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if before == "" {
				return usageError("--before is required: an RFC 3339 time, or a duration ago (2160h)")
			}
			cut, err := parseSince(before)
			if err != nil {
				return usageError("--before: %v", err)
			}
			out := cmd.OutOrStdout()
			if c, err := runningAgent("audit prune"); err != nil {
				return err
			} else if c != nil {
				defer c.Close()
				wait := g.longWait(auditLongWait)
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				defer cancel()
				summary, err := c.AuditPrune(ctx, cut)
				if err != nil {
					return agentErrorAfter("audit prune", err, wait.String())
				}
				fmt.Fprintf(out, "running agent: %s\n", summary)
				return nil
			}
			defer syscall.Umask(ownerOnlyFiles())
			j, err := open(journal.Options{}, askTheAgent)
			if err != nil {
				return err
			}
			defer j.Close()
			cut, kept, err := agent.OfflinePruneCutoff(cmd.Context(), j, cut, time.Now())
			if err != nil {
				return &exitError{exitFailure, err}
			}
			if kept {
				fmt.Fprintf(out, "today's records were kept: the daily quota counts of a restart need them (the running agent prunes them, storing the counts first)\n")
			}
			res, err := j.Prune(cmd.Context(), cut, "sigil audit prune (offline)")
			if err != nil {
				return &exitError{exitFailure, err}
			}
			fmt.Fprintln(out, res)
			return nil
		},
	}
	prune.Flags().StringVar(&before, "before", "", "delete records older than this: RFC 3339 time, or a duration ago (2160h)")
	prune.Flags().StringVar(&adminSocket, "admin-socket", "", "the running agent's admin socket")

	recover := &cobra.Command{
		Use:   "recover",
		Short: "Record the records a damaged tail log lost, so that the agent starts again",
		Long: `A killed agent's journal whose tail log is damaged between frames has lost
records that were confirmed to signers, and the agent refuses to start on it.
recover (with the agent stopped) replays what the tail still holds, keeps the
damaged tail beside the journal as journal.tail.lost-<time>, and writes a
journal.lost record naming the lost seqs: the chain goes on after them, so no
seq of a released signature is used again. 'audit verify' reports the gap
until a prune deletes past it. A tail log that disagrees with the store (the
store changed under the journal), or that names more lost records than it
could have held, is not recovered: keep it as evidence.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			defer syscall.Umask(ownerOnlyFiles())
			j, err := open(journal.Options{AcceptTailLoss: true}, recoverInUse)
			if err != nil {
				return err
			}
			defer j.Close()
			// Open has committed the journal.lost record, if anything was lost.
			last, err := j.Last(cmd.Context(), 1, "")
			if err != nil {
				return &exitError{exitFailure, err}
			}
			if len(last) == 1 && last[0].Op == journal.LostOp {
				fmt.Fprintf(cmd.OutOrStdout(), "recorded at seq %d: %s\n", last[0].Seq, last[0].Detail)
				return nil
			}
			fmt.Fprintln(cmd.OutOrStdout(), "nothing to recover: the journal opens as it is")
			return nil
		},
	}

	cmd.AddCommand(verify, tail, export, prune, recover)
	return cmd
}

// auditAdminSocket is the admin socket the audit commands ask a running
// agent over, or "" to read the journal directory: the one named with
// --admin-socket; none when a directory is named (--journal); with
// --config, the one that config's agent listens on if the config names its
// socket or admin socket, else none (the default path could be another
// agent's, whose journal is not the config's); else the default one.
func auditAdminSocket(configPath, dir, named, clientSocket string) (string, error) {
	switch {
	case named != "":
		return named, nil
	case dir != "":
		return "", nil
	case configPath != "":
		cfg, err := agent.LoadConfig(configPath)
		if err != nil {
			return "", &exitError{exitFailure, err}
		}
		if cfg.Socket == "" && cfg.AdminSocket == "" {
			return "", nil
		}
		cfg.EnsureDefaults()
		return cfg.AdminSocket, nil
	}
	return adminSocketAddr("", clientSocket), nil
}

// adminSocketAddr is the admin socket named, else the default one beside
// the client socket: the global --socket, else $SIGIL_SOCK or the default
// path. A tls:// agent address is its own: the mTLS listener serves an
// admin identity's admin operations.
func adminSocketAddr(named, clientSocket string) string {
	if named != "" {
		return named
	}
	if clientSocket == "" {
		clientSocket = proto.ClientSocketPath()
	}
	if strings.HasPrefix(clientSocket, "tls://") {
		return clientSocket
	}
	return filepath.Join(filepath.Dir(clientSocket), "admin.sock")
}

// namesTheDefaultAgent reports whether the client socket (the global
// --socket, else $SIGIL_SOCK, else the default path) is the default
// agent's, whose journal is in the default data dir.
func namesTheDefaultAgent(clientSocket string) bool {
	if clientSocket == "" {
		clientSocket = proto.ClientSocketPath()
	}
	if strings.HasPrefix(clientSocket, "tls://") {
		return false
	}
	return filepath.Clean(strings.TrimPrefix(clientSocket, "unix:")) == filepath.Clean(proto.DefaultSocketPath())
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

// parseSince reads an RFC 3339 time or a duration ago. A negative duration
// is refused: "-2160h ago" is 90 days ahead, and a prune before it would
// delete every record.
func parseSince(s string) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("%s: a duration ago cannot be negative", s)
		}
		return time.Now().Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		// Go's own words name its layout ("2006-01-02T15:04:05Z07:00"),
		// and not the durations taken too; a value out of range ("month
		// out of range") is kept.
		var detail string
		if pe, ok := err.(*time.ParseError); ok {
			detail = pe.Message
		}
		return time.Time{}, fmt.Errorf("%q is neither an RFC 3339 time (2026-12-01T09:00:00Z) nor a duration ago (2160h: a day is 24h)%s", s, detail)
	}
	return t, nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return cell(s)
}

// cell is a record's field as a table cell: quoted (Go syntax) when it holds
// a tab, a line break, a terminal escape or anything else unprintable. A
// client's key name lands in a refused request's record, and unquoted it
// could draw table rows of its own, decisions that never happened.
func cell(s string) string {
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

// tailRecord is the part of a record's JSON the table shows.
type tailRecord struct {
	Seq       uint64 `json:"seq"`
	Time      string `json:"time"`
	Tenant    string `json:"tenant"`
	Slot      string `json:"slot"`
	KID       string `json:"kid"`
	Op        string `json:"op"`
	Algorithm string `json:"alg"`
	CodeName  string `json:"code_name"`
	Latency   uint32 `json:"latency_us"`
	Peer      string `json:"peer"`
}

type tailWriter struct {
	*tabwriter.Writer
	last uint64
}

func newTailWriter(w io.Writer) *tailWriter {
	tw := &tailWriter{Writer: tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)}
	fmt.Fprintln(tw, "SEQ\tTIME\tTENANT\tSLOT\tKID\tOP\tALG\tCODE\tµs\tPEER")
	return tw
}

func (tw *tailWriter) row(js []byte) {
	var r tailRecord
	if json.Unmarshal(js, &r) != nil {
		return
	}
	tw.last = r.Seq
	fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", r.Seq, cell(r.Time), dash(r.Tenant), dash(r.Slot),
		dash(r.KID), cell(r.Op), dash(r.Algorithm), cell(r.CodeName), r.Latency, cell(r.Peer))
}

// exportOnline writes the running agent's records as JSON lines, paging
// through the AuditTail admin operation from the first record on (the
// agent's reply is each record's export JSON) until a page comes back
// empty: the agent sends fewer than asked when they would not fit a reply.
// Records before f.Since are skipped here, as WriteJSONL does on the
// directory. Each page waits timeout (--timeout); the export as a whole has
// no bound: it goes on while pages come. Its error has its exit status: the
// agent's (agentError), or exitFailure for what fails here, a gap, a record
// that does not parse, an output not written.
func exportOnline(ctx context.Context, c *client.Client, out io.Writer, f journal.Filter, timeout time.Duration) error {
	const page = 100
	w := bufio.NewWriterSize(out, 64<<10)
	failed := func(err error) error { return &exitError{exitFailure, fmt.Errorf("audit export: %w", err)} }
	for from := uint64(1); ; {
		recs, err := auditTailPage(ctx, c, timeout, f.Tenant, from, page)
		if err != nil {
			return agentError("audit export", err)
		}
		for _, r := range recs {
			var head struct {
				Seq    uint64    `json:"seq"`
				Time   time.Time `json:"time"`
				Op     string    `json:"op"`
				Detail string    `json:"detail"`
			}
			if err := json.Unmarshal(r, &head); err != nil {
				return failed(fmt.Errorf("record after seq %d: %w", from-1, err))
			}
			if err := continuesExport(from, head.Seq, f.Tenant, head.Op, head.Detail); err != nil {
				w.Flush()
				return failed(err)
			}
			from = head.Seq + 1
			if !f.Since.IsZero() && head.Time.Before(f.Since) {
				continue
			}
			w.Write(r)
			w.WriteByte('\n')
		}
		if len(recs) == 0 {
			if err := w.Flush(); err != nil {
				return failed(err)
			}
			return nil
		}
	}
}

// continuesExport checks that record seq (its op and detail) may follow an
// export that has reached from-1. Pages of the whole journal follow on seq
// by seq after the first (which starts wherever the chain now starts): a
// jump means a prune (the agent's retention, say) deleted the records in
// between while the export ran, and the output would have a silent gap,
// unless the record is the journal.lost record that names exactly those
// seqs (the gap is in the journal, attested). A tenant's records have gaps
// of their own.
func continuesExport(from, seq uint64, tenant, op, detail string) error {
	if from <= 1 || seq == from || tenant != "" {
		return nil
	}
	if op == journal.LostOp && strings.HasPrefix(detail, fmt.Sprintf("records %d-%d ", from, seq-1)) {
		return nil
	}
	return fmt.Errorf("records %d-%d were pruned while the export ran, so the output has a gap there: export again", from, seq-1)
}

// auditTailPage is one AuditTail request, which waits timeout (--timeout).
func auditTailPage(ctx context.Context, c *client.Client, timeout time.Duration, tenant string, from uint64, limit int) ([][]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return c.AuditTail(ctx, tenant, from, limit)
}

// lastOnline returns the running agent's last n records (of tenant),
// oldest first, as Journal.Last does on the directory. One AuditTail call
// answers at most 100 records, fewer when they would not fit a reply, and
// asks for none before a seq: the older ones are paged forward from a seq
// far enough back, a window that doubles while it holds too few (a
// tenant's records are spread out, a prune leaves none before its anchor).
func lastOnline(ctx context.Context, c *client.Client, timeout time.Duration, tenant string, n int) ([][]byte, error) {
	recs, err := auditTailPage(ctx, c, timeout, tenant, 0, n)
	if err != nil || len(recs) == 0 || len(recs) >= n {
		return recs, err
	}
	oldest, err := recordSeq(recs[0])
	if err != nil {
		return nil, err
	}
	need := uint64(n - len(recs))
	for window := need; ; window *= 2 {
		from := uint64(1)
		if oldest > window {
			from = oldest - window
		}
		var older [][]byte
	pages:
		for next := from; next < oldest; {
			page, err := auditTailPage(ctx, c, timeout, tenant, next, 100)
			if err != nil {
				return nil, err
			}
			if len(page) == 0 {
				break
			}
			for _, r := range page {
				seq, err := recordSeq(r)
				if err != nil {
					return nil, err
				}
				if seq >= oldest {
					break pages
				}
				older = append(older, r)
				next = seq + 1
			}
		}
		if uint64(len(older)) >= need || from == 1 {
			if uint64(len(older)) > need {
				older = older[uint64(len(older))-need:]
			}
			return append(older, recs...), nil
		}
	}
}

// recordSeq reads the seq of a record's export JSON.
func recordSeq(js []byte) (uint64, error) {
	var r struct {
		Seq uint64 `json:"seq"`
	}
	if err := json.Unmarshal(js, &r); err != nil {
		return 0, &exitError{exitFailure, fmt.Errorf("audit tail: a record that does not parse: %w", err)}
	}
	return r.Seq, nil
}

// tailOnline reads the running agent's journal through the AuditTail admin
// operation; with follow it polls for new records until interrupted. Each
// request waits timeout (--timeout); following has no bound.
func tailOnline(ctx context.Context, c *client.Client, out io.Writer, tenant string, n int, follow bool, timeout time.Duration) error {
	tw := newTailWriter(out)
	recs, err := lastOnline(ctx, c, timeout, tenant, n)
	var local *exitError
	if errors.As(err, &local) {
		return err
	}
	if err != nil {
		return agentError("audit tail", err)
	}
	for _, r := range recs {
		tw.row(r)
	}
	if err := tw.Flush(); err != nil || !follow {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		for {
			recs, err := auditTailPage(ctx, c, timeout, tenant, tw.last+1, 100)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return agentError("audit tail", err)
			}
			for _, r := range recs {
				tw.row(r)
			}
			tw.Flush()
			if len(recs) == 0 {
				break
			}
		}
	}
}

// verifyExport checks an export file on its own (journal.VerifyExport):
// exit 0 sound, 1 broken, 5 unreadable, as for a journal.
func verifyExport(out io.Writer, stdin io.Reader, path string) error {
	in := stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return unchecked(fmt.Errorf("audit verify --export: %w", err))
		}
		defer f.Close()
		in = f
	}
	rep, err := journal.VerifyExport(context.Background(), in)
	if err != nil {
		return unchecked(fmt.Errorf("audit verify --export: %w", err))
	}
	if !rep.OK() {
		return &exitError{exitFailure, fmt.Errorf("export: %d records read; %v", rep.Records, rep.Break)}
	}
	if rep.Records == 0 {
		return unchecked(errors.New("audit verify --export: no records in it"))
	}
	fmt.Fprintf(out, "export chain OK: %s (compare the head with one kept elsewhere: an export cut short, or rewritten whole, verifies too)\n", journal.Summary(&rep))
	return nil
}
