package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/agent"
)

func newSSHAgentEnvCommand() *cobra.Command {
	var configPath string
	cmd := &cobra.Command{
		Use:   "ssh-agent-env --config FILE",
		Short: "Print SSH_AUTH_SOCK for the agent's ssh-agent socket: eval \"$(sigil ssh-agent-env --config FILE)\"",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := agent.DefaultConfig()
			if configPath != "" {
				var err error
				if cfg, err = agent.LoadConfig(configPath); err != nil {
					return &exitError{exitFailure, err}
				}
			}
			if cfg.SSHAgentSocket == "" && configPath == "" {
				return &exitError{exitFailure, fmt.Errorf("the default configuration sets no ssh_agent_socket: name the agent's with --config FILE")}
			}
			if cfg.SSHAgentSocket == "" {
				return &exitError{exitFailure, fmt.Errorf("the configuration sets no ssh_agent_socket")}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "SSH_AUTH_SOCK=%s; export SSH_AUTH_SOCK;\n", shellQuote(cfg.SSHAgentSocket))
			return nil
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "the agent's configuration, which sets ssh_agent_socket")
	return cmd
}

// shellQuote quotes s for a POSIX shell's eval: a socket path with a space,
// a ";" or a "$(" in it must stay one word and run nothing.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
