package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/agent/rotation"
)

func newREPCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rep",
		Short: "Rotation Evidence Packs: verify one offline",
	}
	var sigPath, pubPath string
	verify := &cobra.Command{
		Use:   "verify MANIFEST.json --evidence-key PUB.pem [--sig MANIFEST.sig]",
		Short: "Verify a Rotation Evidence Pack offline; exit 1 on any edited byte",
		Long: `Checks the detached Ed25519 signature by the agent's evidence key over the
manifest's exact bytes, then its content: each kid matches its public key, the
CSR is signed by the new key, every canary signature verifies. The signature
defaults to the manifest's name with .sig for .json.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if pubPath == "" {
				return usageError("--evidence-key: the agent's evidence public key (PEM)")
			}
			if sigPath == "" {
				sigPath = strings.TrimSuffix(args[0], ".json") + ".sig"
			}
			manifest, err := os.ReadFile(args[0])
			if err != nil {
				return &exitError{exitFailure, err}
			}
			sig, err := os.ReadFile(sigPath)
			if err != nil {
				return &exitError{exitFailure, err}
			}
			pubPEM, err := os.ReadFile(pubPath)
			if err != nil {
				return &exitError{exitFailure, err}
			}
			pub, err := rotation.ParseEvidencePublicKey(pubPEM)
			if err != nil {
				return usageError("%v", err)
			}
			m, err := rotation.VerifyREP(manifest, sig, pub)
			if err != nil {
				return &exitError{exitFailure, fmt.Errorf("evidence pack INVALID: %w", err)}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "evidence pack OK: %s rotation %d\n", m.Slot, m.Number)
			return nil
		},
	}
	verify.Flags().StringVar(&sigPath, "sig", "", "the detached signature (default: MANIFEST with .sig)")
	verify.Flags().StringVar(&pubPath, "evidence-key", "", "the agent's evidence public key (PEM)")
	cmd.AddCommand(verify)
	return cmd
}
