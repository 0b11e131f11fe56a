package main

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func newVerifyCommand(g *globalFlags) *cobra.Command {
	var (
		key         keyFlags
		in, sigPath string
		alg         string
	)
	cmd := &cobra.Command{
		Use:   "verify-signature --in FILE --sig FILE --kid KID",
		Short: "Check a signature made by 'sigil keys sign'",
		Long: `Check that --sig is a valid signature over --in by the key (--kid or --key).
The signature file may be raw bytes or base64. The file is hashed here the
same way 'sigil keys sign' hashed it. With --key, the key version the
lookup found (its kid is printed) both picks the algorithm and verifies;
a signature by a version the slot has rotated away from needs its --kid.

Exit status: 0 valid; 1 invalid, an input that cannot be read, or a
message and signature too large together for one request (not sent);
2 usage; 3 no agent reachable; 4 the agent refused (an unknown key, an
algorithm the key does not make: the code is printed).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if in == "" || sigPath == "" {
				return usageError("--in FILE and --sig FILE are required")
			}
			if key.name == "" && key.kid == "" {
				return usageError("name the key that signed: --kid KID (or --key NAME)")
			}
			// The inputs and --alg first: a usage error or a missing
			// file is said as such, not as an invalid signature.
			if err := checkInputs(alg, in); err != nil {
				return err
			}
			sig, err := readSignature(sigPath)
			if err != nil {
				return &exitError{exitFailure, err}
			}
			if len(sig) > maxSignature {
				// The wrong file, most likely: no key makes it. Said as
				// such, not as the request the client would refuse to
				// send (exit 1 too, but "not sent", which hides why).
				return &exitError{exitFailure, fmt.Errorf("signature INVALID: %s holds %d bytes, and no key behind the agent makes a signature longer than %d", sigPath, len(sig), maxSignature)}
			}
			ctx, cancel := g.context()
			defer cancel()
			c, err := g.connect(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			k, a, digest, err := keyAndDigest(ctx, c, "verify", key.ref(), alg, in)
			if err != nil {
				return err
			}
			// Pin the kid, as 'keys sign' does: the key whose type chose
			// the algorithm is the key that verifies, and the one the
			// result names, even if the slot rotates in between.
			ref := key.ref()
			ref.KID = k.KID
			// --timeout is per request, not for reading the input too.
			verifyCtx, cancelVerify := g.context()
			defer cancelVerify()
			ok, err := c.Verify(verifyCtx, ref, a, digest, sig)
			if err != nil {
				return agentError("verify", err)
			}
			if !ok {
				return &exitError{exitFailure, fmt.Errorf("signature INVALID: not made by key %q (kid %s) over %s with %s", k.Name, k.KID, displayName(in), algorithmName(a))}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "signature OK: key %q (kid %s), %s\n", k.Name, k.KID, algorithmName(a))
			return nil
		},
	}
	key.addRequired(cmd)
	cmd.Flags().StringVar(&in, "in", "", "the signed file (- for stdin)")
	cmd.Flags().StringVar(&sigPath, "sig", "", "the signature, raw or base64")
	cmd.Flags().StringVar(&alg, "alg", "", "the algorithm used to sign (default: the key's)")
	return cmd
}

// readSignature accepts the raw bytes `keys sign --out` writes and the base64
// it prints.
func readSignature(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, unreadable("--sig", path, err)
	}
	text := bytes.TrimSpace(raw)
	if dec, err := base64.StdEncoding.DecodeString(string(text)); err == nil && len(dec) > 0 {
		return dec, nil
	}
	return raw, nil
}
