package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/policy"
)

// adminRunner runs one admin request for cmd (what names it in messages)
// with the admin socket's client and prints its answer on cmd's output:
// fn's requests wait --timeout, or max(--timeout, wait) for wait > 0; for
// wait eachRequest fn bounds each of its requests itself.
type adminRunner func(cmd *cobra.Command, what string, wait time.Duration, fn func(context.Context, *client.Client) (string, error)) error

// eachRequest is the adminRunner wait of an fn that makes several requests
// and bounds each by --timeout itself (rep export's parts): one deadline
// for them all would fail a large pack on a slow link although every
// part came in time.
const eachRequest time.Duration = -1

// adminCommands builds `sigil admin ...` and the top-level rotate, rollback
// and incident commands over the same admin-socket plumbing.
func adminCommands(g *globalFlags) (*cobra.Command, []*cobra.Command) {
	var adminSocket string
	cmd := &cobra.Command{
		Use:   "admin",
		Short: "Operator commands on the agent's admin socket: pause, resume, reload, rotate, rollback, drill",
	}
	cmd.PersistentFlags().StringVar(&adminSocket, "admin-socket", "", "admin socket (default: admin.sock beside the agent socket, --socket's or $SIGIL_SOCK's)")
	// run dials the admin socket within --timeout, asks fn, and prints
	// its answer. fn's requests wait --timeout, or max(--timeout, wait)
	// for wait > 0 (adminChangeWait); with eachRequest, fn's context has
	// no deadline and fn bounds each request.
	var run adminRunner = func(cmd *cobra.Command, what string, wait time.Duration, fn func(context.Context, *client.Client) (string, error)) error {
		addr := adminSocketAddr(adminSocket, g.socket)
		dialCtx, cancelDial := g.context()
		defer cancelDial()
		c, err := g.dialAgent(dialCtx, what, addr, func(addr, cause string) string {
			return fmt.Sprintf("no agent admin socket at %s: %s", addr, cause)
		})
		if err != nil {
			return err
		}
		defer c.Close()
		ctx, waited := context.Background(), "the --timeout"
		if wait != eachRequest {
			limit := g.timeout
			if wait > 0 {
				limit = g.longWait(wait)
				waited = limit.String()
			}
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, limit)
			defer cancel()
		}
		msg, err := fn(ctx, c)
		var local *exitError
		if errors.As(err, &local) {
			// fn's own failure (rep export writing its files), with its
			// exit status: not the agent's answer.
			return &exitError{local.code, fmt.Errorf("%s: %w", what, local.err)}
		}
		if err != nil {
			return agentErrorAfter(what, err, waited)
		}
		if msg == "" {
			msg = "done"
		}
		// cmd's writer, as the other commands print: main checks its
		// writes, and a caller of the command can capture it.
		fmt.Fprintln(cmd.OutOrStdout(), what+":", msg)
		return nil
	}
	pause := &cobra.Command{
		Use:   "pause TENANT/SLOT",
		Short: "Stop a key slot from signing (signers get PAUSED)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return run(cmd, "pause "+args[0], adminChangeWait, func(ctx context.Context, c *client.Client) (string, error) { return c.Pause(ctx, args[0]) })
		},
	}
	resume := &cobra.Command{
		Use:   "resume TENANT/SLOT",
		Short: "Lift a run-time pause",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return run(cmd, "resume "+args[0], adminChangeWait, func(ctx context.Context, c *client.Client) (string, error) { return c.Resume(ctx, args[0]) })
		},
	}
	reload := &cobra.Command{
		Use:   "reload",
		Short: "Re-read what SIGHUP re-reads: the policy, the TLS certificates and the keys' certificates (each on its own: a part that fails to load is refused and its old version stays; the reply names the parts taken)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return run(cmd, "reload", adminChangeWait, func(ctx context.Context, c *client.Client) (string, error) { return c.ReloadPolicy(ctx) })
		},
	}
	cmd.AddCommand(pause, resume, reload)
	cmd.AddCommand(rotationCommands(run)...)
	top := rotationCommands(run)
	for _, c := range top {
		c.Flags().StringVar(&adminSocket, "admin-socket", "", "admin socket (default: admin.sock beside the agent socket, --socket's or $SIGIL_SOCK's)")
	}
	export := repExportCommand(g, run)
	export.Flags().StringVar(&adminSocket, "admin-socket", "", "admin socket (default: admin.sock beside the agent socket, --socket's or $SIGIL_SOCK's)")
	incident := &cobra.Command{Use: "incident", Short: "Incident drills"}
	incident.AddCommand(top[2])
	return cmd, []*cobra.Command{top[0], top[1], incident, export}
}

// rotationCommands are rotate, rollback and drill; they are also top-level
// commands (`sigil rotate SLOT`), as operators know them.
func rotationCommands(run adminRunner) []*cobra.Command {
	var at string
	rotate := &cobra.Command{
		Use:   "rotate TENANT/SLOT [--at TIME]",
		Short: "Rotate a key slot now (new key, CSR, cut-over, canaries, evidence pack), or schedule it --at an RFC 3339 time",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if at != "" {
				t, err := time.Parse(time.RFC3339, at)
				if err != nil {
					return usageError("--at: %v (want RFC 3339, e.g. 2026-12-01T09:00:00Z)", err)
				}
				return run(cmd, "rotate "+args[0], adminChangeWait, func(ctx context.Context, c *client.Client) (string, error) {
					return c.ScheduleRotation(ctx, args[0], t)
				})
			}
			return run(cmd, "rotate "+args[0], adminChangeWait, func(ctx context.Context, c *client.Client) (string, error) { return c.RotateSlot(ctx, args[0]) })
		},
	}
	rotate.Flags().StringVar(&at, "at", "", "schedule the rotation at this RFC 3339 time instead of now")
	rollback := &cobra.Command{
		Use:   "rollback TENANT/SLOT",
		Short: "Make the previous key version active again (while it is not retired)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return run(cmd, "rollback "+args[0], adminChangeWait, func(ctx context.Context, c *client.Client) (string, error) { return c.Rollback(ctx, args[0]) })
		},
	}
	drill := &cobra.Command{
		Use:   "drill TENANT/SLOT",
		Short: "Incident drill: pause, emergency rotation, canaries, resume, incident statement",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return run(cmd, "incident drill "+args[0], adminChangeWait, func(ctx context.Context, c *client.Client) (string, error) { return c.IncidentDrill(ctx, args[0]) })
		},
	}
	return []*cobra.Command{rotate, rollback, drill}
}

func newPolicyCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Check policy files before they reach an agent",
	}
	validate := &cobra.Command{
		Use:   "validate FILE|DIR",
		Short: "Validate a policy; errors name file, line and field",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := policy.Validate(args[0]); err != nil {
				return &exitError{exitFailure, err}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: valid\n", args[0])
			return nil
		},
	}
	hash := &cobra.Command{
		Use:   "hash FILE|DIR",
		Short: "Print the policy's hash and each tenant's (the one stamped on replies and audit records)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			set, err := policy.Load(args[0])
			if err != nil {
				return &exitError{exitFailure, fmt.Errorf("policy: %w", err)}
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "%s  (whole policy)\n", set.HashHex())
			for _, t := range set.Tenants() {
				h, _ := set.TenantHash(t)
				fmt.Fprintf(out, "%x  tenant %s\n", h, t)
			}
			return nil
		},
	}
	cmd.AddCommand(validate, hash)
	return cmd
}
