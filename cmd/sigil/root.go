package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// How long the commands wait for the agent. The dial and its Hello, and
// each request, wait --timeout; the requests the agent itself gives longer
// are waited for that long at least. The agent finishes those whether or
// not anyone waits for the answer, and a command that gave up sooner would
// report as failed a change that was made, or a check that passed.
var (
	// adminChangeWait is for the admin requests that change the agent:
	// pause, resume, reload, rotate, rollback and the incident drill. The
	// agent gives a rotation 2 minutes (key generation on an HSM, the
	// canaries), and a pause waits out the slot's signatures in flight
	// (request_timeout + 2 × write_timeout + 1s) and any drill under way.
	adminChangeWait = 3 * time.Minute
	// auditLongWait is for audit verify and audit prune over the admin
	// socket, which the agent gives 10 minutes: they read every record.
	auditLongWait = 11 * time.Minute
)

// globalFlags are shared by the client-side commands.
type globalFlags struct {
	socket  string
	timeout time.Duration
	// mTLS, for --socket tls://host:port
	tlsCert, tlsKey, tlsCA string
}

func newRootCommand() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:   "sigil",
		Short: "Sigil: a signing agent in front of HSMs and cloud KMS",
		Long: `Sigil holds warm sessions to HSMs and KMS and signs digests for local services and people.

Run the agent with 'sigil agent'; then sign with 'sigil keys sign --in FILE'.
Clients find the agent through $SIGIL_SOCK, else ` + proto.DefaultSocketPath() + `.

Exit status: 0 success; 1 an invalid signature or a local failure (a
request too large for one message included: it is not sent); 2 usage;
3 no agent reachable; 4 the agent refused (its code printed), did not
answer in time, or sent a reply the client cannot read (INTERNAL);
5 audit verify could not check; 78 the agent did not start and will not
until an operator acts (a PIN refused, a token locked, a PIN source that
gives no PIN or whose file others may change, a PKCS#11 module path that
gives no library or that others may change or whose copies' TMPDIR
others may change, a config or policy that fails its checks, the
evidence key lost while its packs are kept, sockets systemd passed that
the agent cannot take, admin_http.listen bound beyond loopback, a
journal written by a newer sigil).`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			if g.timeout <= 0 {
				// A context that has ended before the dial: every command
				// would say the agent "did not answer" (exit 3).
				return usageError("--timeout must be positive, not %s", g.timeout)
			}
			return nil
		},
	}
	root.PersistentFlags().StringVar(&g.socket, "socket", "", "agent socket (default $SIGIL_SOCK, else "+proto.DefaultSocketPath()+")")
	root.PersistentFlags().DurationVar(&g.timeout, "timeout", 10*time.Second, "deadline for reaching the agent (the dial and its Hello) and for each request; the admin changes wait at least "+adminChangeWait.String()+", audit verify and prune at least "+auditLongWait.String())
	root.PersistentFlags().StringVar(&g.tlsCert, "tls-cert", "", "client certificate (PEM) for --socket tls://host:port")
	root.PersistentFlags().StringVar(&g.tlsKey, "tls-key", "", "client private key (PEM) for --socket tls://host:port")
	root.PersistentFlags().StringVar(&g.tlsCA, "tls-ca", "", "CA bundle (PEM) that signed the agent's certificate")
	adminCmd, opsCmds := adminCommands(g)
	root.AddCommand(adminCmd)
	root.AddCommand(opsCmds[:3]...)
	rep := newREPCommand()
	rep.AddCommand(opsCmds[3])
	root.AddCommand(newAgentCommand(g), newKeysCommand(g), newVerifyCommand(g), newAuditCommand(g), newPolicyCommand(), rep, newSSHAgentEnvCommand(), newBenchCommand(g), newSoakCommand(), newVersionCommand(), newBenchEchoCommand())
	for _, c := range root.Commands() {
		refuseUnknownSubcommands(c)
	}
	return root
}

// refuseUnknownSubcommands makes each command group under c (admin, audit,
// keys, ...) refuse a word that names none of its subcommands: cobra prints
// such a group's help and succeeds, so 'sigil admin pasue SLOT' exited 0
// having paused nothing, and a cron 'sigil audit verfy' checked nothing.
// The root refuses unknown words itself.
func refuseUnknownSubcommands(c *cobra.Command) {
	for _, sub := range c.Commands() {
		refuseUnknownSubcommands(sub)
	}
	if !c.HasSubCommands() || c.Runnable() {
		return
	}
	c.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return fmt.Errorf("unknown command %q for %q; see '%s --help'", args[0], cmd.CommandPath(), cmd.CommandPath())
		}
		return nil
	}
	c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
}

// connect dials the agent within ctx, mapping failure to its exit status
// (dialAgent) with a hint to start one.
func (g *globalFlags) connect(ctx context.Context) (*client.Client, error) {
	return g.dialAgent(ctx, "connect", g.socket, func(addr, cause string) string {
		return fmt.Sprintf("no agent at %s (start one with 'sigil agent' or 'make run', or set $SIGIL_SOCK): %s", addr, cause)
	})
}

// dialAgent dials addr (dialAddr) within ctx, its Hello included, and maps
// a failure to its exit status: a usage error (the --tls-* files) as it
// is; a refusal (too many connections, a peer the agent does not admit) to
// exitRefused for what, as an agent that answered and said no; a default
// socket dir not to trust, and a socket that accepted and said no Hello
// before ctx's deadline (a wedged agent, a listener that is not an agent),
// to exitUnreachable saying so; and a dial that found nothing to
// exitUnreachable in noAgent's words, given the address and the cause.
func (g *globalFlags) dialAgent(ctx context.Context, what, addr string, noAgent func(addr, cause string) string) (*client.Client, error) {
	c, err := g.dialAddr(ctx, addr)
	if err == nil {
		return c, nil
	}
	var usage *exitError
	if errors.As(err, &usage) {
		return nil, err
	}
	var refused *proto.Error
	if errors.As(err, &refused) {
		return nil, agentError(what, err)
	}
	if errors.Is(err, proto.ErrUntrustedSocketDir) {
		return nil, &exitError{exitUnreachable, errors.New(dialCause(err))}
	}
	if addr == "" {
		addr = proto.ClientSocketPath()
	}
	if errors.Is(err, context.DeadlineExceeded) {
		// A Unix dial to nothing fails at once: something is there
		// and did not say Hello in time.
		return nil, &exitError{exitUnreachable, fmt.Errorf("the agent at %s did not answer within --timeout (%s)", addr, g.timeout)}
	}
	return nil, &exitError{exitUnreachable, errors.New(noAgent(addr, dialCause(err)))}
}

// dialCause is why a dial failed, for a message that has already named the
// agent's address. The client's errors start with their code's name
// ("UNAVAILABLE: connect to the agent: dial unix ADDR: ...") or, from the
// client and proto packages, with "sigil: ", which after main's "sigil: "
// and the caller's "no agent answered at ADDR" would say it twice. It is
// the first error in err's chain that is not such a wrapping (the
// network's, the TLS handshake's), else err's message without its lead (a
// refusal of the default socket dir, whose details follow the sentinel's
// words).
func dialCause(err error) string {
	for e := err; e != nil; e = errors.Unwrap(e) {
		if _, ok := clientLead(e.Error()); !ok {
			return e.Error()
		}
	}
	rest, _ := clientLead(err.Error())
	return rest
}

// clientLead reports whether msg starts as the client's and proto's errors
// do, with "sigil" or a code's name, and returns what follows a "sigil: "
// or "CODE: " lead.
func clientLead(msg string) (rest string, ok bool) {
	if strings.HasPrefix(msg, "sigil") {
		return strings.TrimPrefix(msg, "sigil: "), true
	}
	lead, rest, found := strings.Cut(msg, ": ")
	if _, known := proto.ParseCode(lead); found && (known || strings.HasPrefix(lead, "CODE_")) {
		return rest, true
	}
	return msg, false
}

// withoutClientLead is err's text without the client's lead: a usage
// error from client.ParseAlgorithm is no code the agent answered.
func withoutClientLead(err error) string {
	rest, _ := clientLead(err.Error())
	return rest
}

// dialAddr dials an agent address as the admin and audit commands name it:
// a Unix socket path, or tls://host:port with the global --tls-* files (an
// mTLS identity in the policy's admins is served admin operations there).
// A TLS setup error is a usage error (exitError). An empty addr is
// --socket's default, $SIGIL_SOCK (a tls:// one too), else the default
// path.
func (g *globalFlags) dialAddr(ctx context.Context, addr string) (*client.Client, error) {
	if addr == "" {
		addr = proto.ClientSocketPath()
	}
	if host, ok := strings.CutPrefix(addr, "tls://"); ok {
		cfg, err := clientTLSConfig(g.tlsCert, g.tlsKey, g.tlsCA)
		if err != nil {
			return nil, usageError("%v", err)
		}
		return client.DialTLS(ctx, host, cfg)
	}
	return client.Dial(ctx, addr)
}

// clientTLSConfig builds the mTLS client side from PEM files.
func clientTLSConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, errors.New("tls:// needs --tls-cert, --tls-key and --tls-ca")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("client certificate: %w", err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("CA bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("CA bundle %s holds no PEM certificate", caFile)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS13}, nil
}

// context bounds one request, or a dial and its Hello, by --timeout.
func (g *globalFlags) context() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), g.timeout)
}

// longWait is how long to wait for a request the agent gives wait
// (adminChangeWait, auditLongWait): that long, or --timeout if longer.
func (g *globalFlags) longWait(wait time.Duration) time.Duration {
	return max(g.timeout, wait)
}

// agentError wraps an error from a request bound by --timeout: refused by
// the agent (exitRefused, with the code name first), no answer in time
// (exitRefused, DEADLINE_EXCEEDED), refused by the client before any of it
// was sent (exitFailure: the agent never saw it) or a lost connection
// (exitUnreachable).
func agentError(what string, err error) error {
	return agentErrorAfter(what, err, "the --timeout")
}

// agentErrorAfter is agentError for a request that waited for as long as
// waited says.
func agentErrorAfter(what string, err error, waited string) error {
	var pe *proto.Error
	if errors.As(err, &pe) {
		return &exitError{exitRefused, fmt.Errorf("%s: agent refused: %s", what, pe.Error())}
	}
	if errors.Is(err, client.ErrRefusedByClient) {
		// Too large for one frame, say: a local failure, which the
		// agent's log knows nothing of. The client's words say it was
		// not sent; its code (BAD_REQUEST) would read as the agent's.
		return &exitError{exitFailure, fmt.Errorf("%s: %s", what, withoutClientLead(err))}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return &exitError{exitRefused, fmt.Errorf("%s: %s: no answer within %s", what, proto.DeadlineExceeded, waited)}
	}
	if errors.Is(err, client.ErrMalformedReply) {
		// Something answered at the socket, so not exit 3 (no agent):
		// an answer that is no use, as a refusal is.
		return &exitError{exitRefused, fmt.Errorf("%s: %s", what, err)}
	}
	// A network failure (the agent went away, and a redial found none) is
	// told by the network's error alone, under the client's words
	// ("UNAVAILABLE: AuditTail not sent: reconnect: connect to the agent:
	// dial unix ..."); other failures keep the client's text, which leads
	// with its code's name (or "sigil: ", which main prints once).
	var netErr *net.OpError
	if errors.As(err, &netErr) {
		return &exitError{exitUnreachable, fmt.Errorf("%s: connection to the agent failed: %v", what, netErr)}
	}
	return &exitError{exitUnreachable, fmt.Errorf("%s: %s", what, strings.TrimPrefix(err.Error(), "sigil: "))}
}

func usageError(format string, args ...any) error {
	return &exitError{exitUsage, fmt.Errorf(format, args...)}
}

var version = "dev"

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print sigil's version and protocol version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintf(cmd.OutOrStdout(), "sigil %s (protocol %d)\n", version, proto.Version)
		},
	}
}

// writeOut writes data to the file at path, or to stdout (the command's
// output, as everything else it prints) for "" or "-".
func writeOut(stdout io.Writer, path string, data []byte) error {
	if path == "" || path == "-" {
		_, err := stdout.Write(data)
		return err
	}
	return os.WriteFile(path, data, 0o644)
}
