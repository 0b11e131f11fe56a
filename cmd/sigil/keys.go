package main

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

func newKeysCommand(g *globalFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keys",
		Short: "List keys, sign with them, print their public keys",
	}
	cmd.AddCommand(newKeysInfoCommand(g), newKeysSignCommand(g), newKeysPubkeyCommand(g))
	return cmd
}

func newKeysInfoCommand(g *globalFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "info",
		Short: "List the agent's keys: name, kid, provider, type, and the certificate the agent serves with each",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := g.context()
			defer cancel()
			c, err := g.connect(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			keys, err := c.ListKeys(ctx)
			if err != nil {
				return agentError("list keys", err)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				type row struct {
					Name        string           `json:"name"`
					KID         string           `json:"kid"`
					Provider    string           `json:"provider"`
					Type        string           `json:"type"`
					Certificate *certificateInfo `json:"certificate,omitempty"`
				}
				rows := make([]row, len(keys))
				for i, k := range keys {
					rows[i] = row{k.Name, k.KID, k.Provider, k.Type, describeCertificate(k.Certificate)}
				}
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(rows)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tKID\tPROVIDER\tTYPE\tCERTIFICATE")
			for _, k := range keys {
				cert := "-"
				if c := describeCertificate(k.Certificate); c != nil {
					cert = c.Subject + " until " + c.NotAfter.Format(time.DateOnly)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", k.Name, k.KID, k.Provider, k.Type, cert)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON instead of a table")
	return cmd
}

// certificateInfo is what `keys info` shows of a key's certificate.
type certificateInfo struct {
	Subject  string    `json:"subject"`
	Issuer   string    `json:"issuer"`
	NotAfter time.Time `json:"not_after"`
}

// describeCertificate summarises a DER certificate; nil for none (or one
// that does not parse, which the agent would not have served).
func describeCertificate(der []byte) *certificateInfo {
	if der == nil {
		return nil
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil
	}
	return &certificateInfo{Subject: c.Subject.String(), Issuer: c.Issuer.String(), NotAfter: c.NotAfter.UTC()}
}

// keyFlags select a key by --key or --kid.
type keyFlags struct{ name, kid string }

// add adds --key and --kid to cmd, where neither means the agent's default
// key.
func (k *keyFlags) add(cmd *cobra.Command) {
	k.addFlags(cmd, "key name (default: the agent's default key)")
}

// addRequired adds --key and --kid to cmd, which refuses to run without
// one of them (verify-signature): the help must not promise a default.
func (k *keyFlags) addRequired(cmd *cobra.Command) {
	k.addFlags(cmd, "key name (this or --kid is required)")
}

func (k *keyFlags) addFlags(cmd *cobra.Command, nameUsage string) {
	cmd.Flags().StringVar(&k.name, "key", "", nameUsage)
	cmd.Flags().StringVar(&k.kid, "kid", "", "key id, as 'sigil keys info' prints it")
	cmd.MarkFlagsMutuallyExclusive("key", "kid")
}

func (k *keyFlags) ref() client.KeyRef { return client.KeyRef{Name: k.name, KID: k.kid} }

func newKeysSignCommand(g *globalFlags) *cobra.Command {
	var (
		key          keyFlags
		in, out, alg string
		printBase64  bool
	)
	cmd := &cobra.Command{
		Use:   "sign --in FILE [--key NAME | --kid KID] [--out FILE]",
		Short: "Sign a file with a key behind the agent",
		Long: `Sign a file. For ECDSA and RSA keys the file is hashed here (SHA-256, or SHA-384
for P-384, unless --alg says otherwise) and only the digest goes to the agent;
Ed25519 signs the file itself, which must then fit in one frame (about 64 KiB).

The signature is written raw to --out, or base64 to stdout without --out.
An --out that cannot be written is refused before the agent signs.
What key signed, and its kid, goes to stderr.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if in == "" {
				return usageError("--in FILE is required (use - for stdin)")
			}
			if err := checkInputs(alg, in); err != nil {
				return err
			}
			if err := checkOut(out); err != nil {
				return err
			}
			ctx, cancel := g.context()
			defer cancel()
			c, err := g.connect(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			k, a, digest, err := keyAndDigest(ctx, c, "sign", key.ref(), alg, in)
			if err != nil {
				return err
			}
			// Pin the kid: the key whose type chose the hash is the key that
			// signs. Keep the name: it is the key slot whose policy applies
			// (two slots may share a key).
			ref := key.ref()
			ref.KID = k.KID
			// --timeout is per request: reading and hashing the input (a slow
			// pipe, a large file) does not count against the signature's.
			signCtx, cancelSign := g.context()
			defer cancelSign()
			sig, err := c.Sign(signCtx, ref, a, digest)
			if err != nil {
				return agentError("sign", err)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "signed %s with key %q (kid %s, %s)\n", displayName(in), sig.Key, sig.KID, algorithmName(a))
			if out == "" || printBase64 {
				fmt.Fprintln(cmd.OutOrStdout(), base64.StdEncoding.EncodeToString(sig.Sig))
				if out == "" {
					return nil
				}
			}
			if err := writeOut(cmd.OutOrStdout(), out, sig.Sig); err != nil {
				return &exitError{exitFailure, fmt.Errorf("write signature: %w", err)}
			}
			return nil
		},
	}
	key.add(cmd)
	cmd.Flags().StringVar(&in, "in", "", "file to sign (- for stdin)")
	cmd.Flags().StringVar(&out, "out", "", "write the raw signature here (default: base64 on stdout)")
	cmd.Flags().StringVar(&alg, "alg", "", "ecdsa-sha256|384|512, rsa-pkcs1v15-sha256…, rsa-pss-sha256…, ed25519 (default: the key's)")
	cmd.Flags().BoolVar(&printBase64, "base64", false, "also print the signature as base64 on stdout")
	return cmd
}

func newKeysPubkeyCommand(g *globalFlags) *cobra.Command {
	var key keyFlags
	cmd := &cobra.Command{
		Use:   "pubkey [--kid KID | --key NAME]",
		Short: "Print a key's public key as PEM",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := g.context()
			defer cancel()
			c, err := g.connect(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			k, err := c.PublicKey(ctx, key.ref())
			if err != nil {
				return agentError("pubkey", err)
			}
			return pem.Encode(cmd.OutOrStdout(), &pem.Block{Type: "PUBLIC KEY", Bytes: k.SPKI})
		},
	}
	key.add(cmd)
	return cmd
}

// checkInputs reports a mistyped --alg (usage, exit 2) or an --in that
// cannot be read (exit 1) before the agent is dialled, so neither hides
// behind "no agent".
func checkInputs(algFlag, in string) error {
	if algFlag != "" {
		if _, err := client.ParseAlgorithm(algFlag); err != nil {
			return usageError("%s", withoutClientLead(err))
		}
	}
	if in != "-" {
		// Stat, not open: opening a named pipe here would take (and
		// lose) what its writer sends, and the real read would then wait
		// for a writer that has gone.
		st, err := os.Stat(in)
		if err != nil {
			return &exitError{exitFailure, unreadable("--in", in, err)}
		}
		if st.IsDir() {
			return &exitError{exitFailure, fmt.Errorf("--in %s is a directory, not a file", in)}
		}
		if st.Mode().IsRegular() {
			f, err := os.Open(in)
			if err != nil {
				return &exitError{exitFailure, unreadable("--in", in, err)}
			}
			f.Close()
		}
	}
	return nil
}

// unreadable is a flag's file that could not be read. The file system's
// words ("stat PATH: no such file or directory") name a system call and
// the path, not which flag gave it.
func unreadable(flag, path string, err error) error {
	if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
		err = pe.Err
	}
	return fmt.Errorf("%s %s: cannot read it: %w", flag, path, err)
}

// checkOut reports an --out the signature could not be written to before
// the agent is asked: after, the signature would be made, journaled and
// counted against the slot's quota, and then lost. A file that does not
// exist yet needs a directory this user can create it in; an existing
// regular file must be writable. Other files (a pipe, /dev/stdout) are
// left to the write.
func checkOut(out string) error {
	if out == "" || out == "-" {
		return nil
	}
	st, err := os.Stat(out)
	switch {
	case err == nil && st.IsDir():
		return &exitError{exitFailure, fmt.Errorf("--out %s is a directory, not a file", out)}
	case err == nil && st.Mode().IsRegular():
		if err := unix.Access(out, unix.W_OK); err != nil {
			return &exitError{exitFailure, &fs.PathError{Op: "write signature to", Path: out, Err: err}}
		}
		return nil
	case err == nil:
		return nil
	case !errors.Is(err, fs.ErrNotExist):
		return &exitError{exitFailure, err}
	}
	dir := filepath.Dir(out)
	dst, err := os.Stat(dir)
	if err == nil && !dst.IsDir() {
		err = syscall.ENOTDIR
	}
	if err == nil {
		err = unix.Access(dir, unix.W_OK|unix.X_OK)
	}
	if err != nil {
		if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
			err = pe.Err // the directory's stat names it; say what it is for
		}
		return &exitError{exitFailure, fmt.Errorf("--out %s: cannot create it in %s: %w", out, dir, err)}
	}
	return nil
}

func chooseAlgorithm(flag, keyType string) (client.Algorithm, error) {
	if flag == "" {
		return client.DefaultAlgorithm(keyType), nil
	}
	return client.ParseAlgorithm(flag)
}

func algorithmName(a client.Algorithm) string {
	names := map[client.Scheme]string{
		client.SchemeECDSA: "ecdsa", client.SchemePKCS1v15: "rsa-pkcs1v15", client.SchemePSS: "rsa-pss", client.SchemeEd25519: "ed25519",
	}
	n := names[a.Scheme]
	switch a.Hash {
	case crypto.SHA256:
		n += "-sha256"
	case crypto.SHA384:
		n += "-sha384"
	case crypto.SHA512:
		n += "-sha512"
	}
	return n
}

// maxMessage leaves room in a frame for the request's other fields.
const maxMessage = proto.DefaultMaxFrame - 512

// maxSignature is the longest signature of the key types the agent serves
// (providers.KeyTypes): RSA-4096's 512 bytes.
const maxSignature = 512

// digestFile hashes the file with h, or for h == 0 (pure Ed25519) returns the
// file itself, refusing one that cannot fit in a frame.
func digestFile(path string, h crypto.Hash) ([]byte, error) {
	r, closeFn, err := openInput(path)
	if err != nil {
		return nil, err
	}
	defer closeFn()
	if h == 0 {
		data, err := io.ReadAll(io.LimitReader(r, maxMessage+1))
		if err != nil {
			return nil, readError(path, err)
		}
		if len(data) > maxMessage {
			return nil, fmt.Errorf("%s is larger than %d bytes: pure Ed25519 signs the message itself and it must fit in one request; use an ECDSA or RSA key for large files", displayName(path), maxMessage)
		}
		return data, nil
	}
	hasher := h.New()
	if _, err := io.Copy(hasher, r); err != nil {
		return nil, readError(path, err)
	}
	return hasher.Sum(nil), nil
}

// readError is a failed read of the input. A file's error names the read
// and the file already ("read NAME: ..."); said again, it read twice.
func readError(path string, err error) error {
	if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
		return err
	}
	return fmt.Errorf("read %s: %w", displayName(path), err)
}

func openInput(path string) (io.Reader, func(), error) {
	if path == "-" {
		return os.Stdin, func() {}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	return f, func() { f.Close() }, nil
}

func displayName(path string) string {
	if path == "-" {
		return "stdin"
	}
	return path
}

// keyAndDigest looks the key up, picks the algorithm (--alg, else the key's
// default) and hashes the input the way that algorithm needs: what both
// `keys sign` and `verify-signature` do before talking to the agent again.
func keyAndDigest(ctx context.Context, c *client.Client, what string, ref client.KeyRef, algFlag, in string) (client.Key, client.Algorithm, []byte, error) {
	k, err := c.PublicKey(ctx, ref)
	if err != nil {
		return client.Key{}, client.Algorithm{}, nil, agentError(what, err)
	}
	a, err := chooseAlgorithm(algFlag, k.Type)
	if err != nil {
		return client.Key{}, client.Algorithm{}, nil, usageError("%s", withoutClientLead(err))
	}
	digest, err := digestFile(in, a.Hash)
	if err != nil {
		return client.Key{}, client.Algorithm{}, nil, &exitError{exitFailure, err}
	}
	return k, a, digest, nil
}
