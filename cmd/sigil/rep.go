package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/client"
)

func newREPCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rep",
		Short: "Rotation Evidence Packs: export from the agent, verify offline",
	}
	var sigPath, pubPath string
	verify := &cobra.Command{
		Use:   "verify MANIFEST.json --evidence-key PUB.pem [--sig MANIFEST.sig]",
		Short: "Verify a Rotation Evidence Pack offline; exit 1 on any edited byte",
		Long: `Checks the detached Ed25519 signature by the agent's evidence key over the
manifest's exact bytes, then its content: each kid matches its public key, the
CSR is signed by the new key, every canary signature verifies. The signature
defaults to the manifest's name with .sig for .json. A manifest named
rep-N.json must be pack N of the slot its directories name (TENANT/SLOT/),
where the agent and rep export put it: another pack in its place fails.

Exit status: 0 the pack verifies; 1 it does not (the first problem named),
including a file missing and an --evidence-key file that is not an Ed25519
public key (PEM, or the 32 raw bytes); 2 a usage error.`,
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
			// A key file of another kind checks nothing: the pack is not
			// verified (exit 1, as for a pack that fails), and the message
			// says why without showing what the file holds.
			pub, err := rotation.ParseEvidencePublicKey(pubPEM)
			if err != nil {
				return &exitError{exitFailure, fmt.Errorf("evidence pack not verified: --evidence-key %s is not an Ed25519 public key (%w)", pubPath, err)}
			}
			m, err := rotation.VerifyREP(manifest, sig, pub)
			if err == nil {
				err = rotation.CheckREPPlace(args[0], m)
			}
			// The fingerprint is what an auditor pins (docs/rotation.md):
			// the key file given may be any key found beside the pack.
			given := rotation.EvidenceKeyID(pub)
			if err != nil {
				keys := "verified with evidence key " + given
				if named := rotation.NamedEvidenceKey(manifest); named != "" && named != given {
					keys += "; the manifest names evidence key " + named
				}
				return &exitError{exitFailure, fmt.Errorf("evidence pack INVALID: %w (%s)", err, keys)}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "evidence pack OK: %s rotation %d (evidence key %s)\n", m.Slot, m.Number, given)
			return nil
		},
	}
	verify.Flags().StringVar(&sigPath, "sig", "", "the detached signature (default: MANIFEST with .sig)")
	verify.Flags().StringVar(&pubPath, "evidence-key", "", "the agent's evidence public key (PEM; the agent writes DATA_DIR/evidence.pub)")
	cmd.AddCommand(verify)
	return cmd
}

// repExportCommand is `sigil rep export`; the root command attaches it, as
// it talks to the agent over the admin socket plumbing of adminCommands.
func repExportCommand(g *globalFlags, run adminRunner) *cobra.Command {
	var out string
	cmd := &cobra.Command{
		Use:   "export TENANT/SLOT [N] [--out DIR]",
		Short: "Write a stored evidence pack (rep-N.json, .sig, .md) from the running agent's journal",
		Long: `Fetch a stored Rotation Evidence Pack (the newest without N) from the running
agent over its admin socket and write DIR/TENANT/SLOT/rep-N.json, .sig and
.md (DIR is --out), and the agent's evidence public key as
DIR/evidence-key.pub.pem, where each statement's verify command looks for
it. A file there holding another key is not replaced: nothing is written.
A pack larger than one reply comes in parts, and each part waits
--timeout: the export as a whole has no bound, and goes on while parts
come in time.

Exit status: 0 written; 1 the files could not be written under --out, its
evidence-key.pub.pem holds another key, or the manifest fetched does not
parse or is not the pack asked for; 2 usage; 3 no agent reachable; 4 the
agent refused (no such pack: NOT_FOUND) or did not answer within --timeout.`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			n := 0
			if len(args) == 2 {
				v, err := strconv.Atoi(args[1])
				if err != nil || v < 1 {
					return usageError("N: a pack number (1, 2, ...)")
				}
				n = v
			}
			return run(cmd, "rep export "+args[0], eachRequest, func(ctx context.Context, c *client.Client) (string, error) {
				pack, err := c.ExportREPPack(ctx, args[0], n, g.timeout)
				if err != nil {
					return "", err
				}
				manifest, sig := pack.Manifest, pack.Sig
				// The pack is here: what fails from now on fails here
				// (exit 1), not the agent or the connection.
				var m rotation.Manifest
				if err := json.Unmarshal(manifest, &m); err != nil {
					return "", &exitError{exitFailure, fmt.Errorf("the pack's manifest does not parse: %w", err)}
				}
				// Written under the manifest's own slot and number, another
				// pack would land where it was not asked for, as "wrote".
				if m.Slot != args[0] || n != 0 && m.Number != n {
					return "", &exitError{exitFailure, fmt.Errorf("the agent sent pack %d of %.80q, not the pack asked for: nothing written", m.Number, m.Slot)}
				}
				// The key first: a file of another key there refuses the
				// export before any pack is written beside it.
				var files []string
				var note string
				if pack.EvidenceKey == nil {
					note = "; no " + rotation.EvidencePublicKeyFile + " written: the agent did not send its evidence public key (an older agent)"
				} else {
					// An --out that cannot be a directory fails as such,
					// not as an unreadable key file.
					if err := os.MkdirAll(out, 0o755); err != nil {
						return "", &exitError{exitFailure, fmt.Errorf("the pack could not be written under --out %s: %w", out, err)}
					}
					keyFile, err := rotation.WriteEvidencePublicKey(out, pack.EvidenceKey)
					if err != nil {
						return "", &exitError{exitFailure, fmt.Errorf("nothing written under --out %s: %w", out, err)}
					}
					files = append(files, keyFile)
					current := rotation.EvidenceKeyID(pack.EvidenceKey)
					if named := rotation.NamedEvidenceKey(manifest); named != "" && named != current {
						note = fmt.Sprintf("; the pack names evidence key %s, not the agent's current %s: verify it with that key's public key (%s)", named, current, rotation.KeptEvidencePublicKeyFile(named))
					}
				}
				packFiles, err := rotation.WriteREP(out, &m, manifest, sig)
				if err != nil {
					return "", &exitError{exitFailure, fmt.Errorf("the pack could not be written under --out %s: %w", out, err)}
				}
				return "wrote " + strings.Join(append(packFiles, files...), ", ") + note, nil
			})
		},
	}
	cmd.Flags().StringVar(&out, "out", ".", "directory to write TENANT/SLOT/rep-N.* under")
	return cmd
}
