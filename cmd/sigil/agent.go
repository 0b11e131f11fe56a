package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/proto"
)

func newAgentCommand(g *globalFlags) *cobra.Command {
	var (
		configPath   string
		dataDir      string
		logLevel     string
		printDefault bool
		check        bool
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the signing agent",
		Long: `Run the signing agent in the foreground until SIGTERM or SIGINT. A start
that cannot succeed until an operator acts (a config or policy that fails
its checks, a PIN source that gives no PIN or whose file others may
change, a PKCS#11 module path that gives no library or that others may
change or whose copies' TMPDIR others may change, a PIN refused, a token
locked, the evidence key lost while its packs are kept, sockets systemd
passed that the agent cannot take, admin_http.listen bound beyond
loopback, a journal written by a newer sigil) exits 78, which
sigil.service does not restart on; another failed start (a module whose
device does not answer, say) exits 1.

With --check it only checks the config and the files a reload reads (the
policy, the TLS listener's certificate, key and CAs, key certificates) and
exits 1 naming each problem; the systemd unit runs it before it signals a
reload.

With no --config it runs on the embedded default: software keys (ECDSA P-256
"default", ECDSA P-384, Ed25519, RSA-2048) generated on first start into the
data dir ($XDG_STATE_HOME/sigil, else ~/.local/state/sigil), and the socket at
$XDG_RUNTIME_DIR/sigil/agent.sock, else /tmp/sigil-$UID/agent.sock.
The socket is --socket, else the config's socket, else $SIGIL_SOCK when it is
a path (so an agent and the clients of one shell agree), else that default.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if printDefault {
				_, err := cmd.OutOrStdout().Write(agent.DefaultConfigYAML())
				return err
			}
			cfg := agent.DefaultConfig()
			if configPath != "" {
				var err error
				if cfg, err = agent.LoadConfig(configPath); err != nil {
					if check {
						return &exitError{exitFailure, err}
					}
					// As agent.New's own validation would: no restart
					// can pass it.
					return &exitError{exitConfig, fmt.Errorf("agent failed to start (%s): %w", configFault, err)}
				}
			}
			if check {
				if err := agent.CheckFiles(cfg); err != nil {
					return &exitError{exitFailure, fmt.Errorf("check: %w", err)}
				}
				what := "the embedded default"
				if configPath != "" {
					what = configPath
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s: the config and the files it names are valid\n", what)
				return nil
			}
			socket, err := agentSocket(g.socket, cfg.Socket, os.Getenv(proto.SocketEnv))
			if err != nil {
				return &exitError{exitUsage, err}
			}
			cfg.Socket = socket
			if dataDir != "" {
				cfg.DataDir = dataDir
			}
			if logLevel != "" {
				cfg.Log.Level = logLevel
			}
			return runAgent(cfg)
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "YAML configuration file (default: the embedded default)")
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "data directory (overrides the config's data_dir)")
	cmd.Flags().StringVar(&logLevel, "log-level", "", "debug, info, warn or error (overrides the config)")
	cmd.Flags().BoolVar(&printDefault, "print-default-config", false, "print the embedded default configuration and exit")
	cmd.Flags().BoolVar(&check, "check", false, "check the config, its policy and its TLS and certificate files as a reload reads them, and exit (1: invalid) without starting")
	return cmd
}

// firstLineOf is err's message up to its first line break: a joined error's
// first error, fit for an sd_notify STATUS (one line).
func firstLineOf(err error) string {
	line, _, _ := strings.Cut(err.Error(), "\n")
	return line
}

// agentSocket is the path the agent listens on: the --socket flag, else the
// config's socket, else $SIGIL_SOCK (the path the shell's clients dial),
// else "" for the default. A tls:// address is a client's, not a path an
// agent can listen on: the agent's TCP listener is the config's tcp section.
func agentSocket(flag, configured, env string) (string, error) {
	if strings.HasPrefix(flag, "tls://") {
		return "", errors.New("--socket tls://: the agent listens on a Unix socket; its mTLS listener is the config's tcp.listen")
	}
	switch {
	case flag != "":
		return strings.TrimPrefix(flag, "unix:"), nil
	case configured != "":
		return configured, nil
	case env != "" && !strings.HasPrefix(env, "tls://"):
		return strings.TrimPrefix(env, "unix:"), nil
	}
	return "", nil
}

// ownSocketRemover returns a func that removes the socket just made at
// path, if path is still that socket: Go's listener unlinks it on Close,
// when Shutdown begins, and a successor started during the drain may have
// made its own at the same path, which must stay.
func ownSocketRemover(path string) func() {
	var made syscall.Stat_t
	if err := syscall.Lstat(path, &made); err != nil {
		return func() {}
	}
	return func() {
		var now syscall.Stat_t
		// The inode number alone is no proof: a file system reuses a
		// freed one at once. Its change time (ns) tells a new file.
		if syscall.Lstat(path, &now) == nil && now.Ino == made.Ino && now.Dev == made.Dev && now.Ctim == made.Ctim {
			os.Remove(path)
		}
	}
}

// ownerOnlyFiles makes every file this process creates from now on its own
// user's alone, as sigil.service's UMask=0077 has it, and returns the umask
// it replaced. Pebble's files, the tail log and a recovered tail's copy hold
// the audit records, and would otherwise be 0666 less the caller's umask
// (0644 under the common 022) in a journal dir made beforehand. The agent
// and the audit commands that write to a journal directory call it.
func ownerOnlyFiles() (previous int) {
	return syscall.Umask(0o077)
}

// checkTCPAddr returns what a TCP listen on addr fails with now, and
// leaves nothing bound: binding is the only sure test that an address is
// free. Closing at once costs the real bind after agent.New nothing on
// Linux: a listening socket that accepted no connection leaves no
// TIME_WAIT behind, and Go's listeners set SO_REUSEADDR. A client that
// connects in that instant is reset, as by a port nobody listens on.
func checkTCPAddr(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return ln.Close()
}

// configFault is what a start that fails on its configuration calls the
// failure (agent.IsConfigError), where another failure names its code.
const configFault = "configuration"

func runAgent(cfg agent.Config) error {
	// Taken first: SIGHUP's default action ends the process, and a reload
	// sent while the agent starts (a config management run right after a
	// start) must not. One arriving then is served once the agent is up.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// A socket would otherwise be connectable by others between its bind
	// and its chmod.
	ownerOnlyFiles()
	cfg.EnsureDefaults()
	log, err := newLogger(cfg.Log)
	if err != nil {
		return &exitError{exitUsage, err}
	}
	defer log.Sync()
	// Go's standard logger, which libraries write to (x/crypto's ssh-agent
	// server logs each refused request there), goes through zap: its plain
	// lines broke a JSON log stream.
	defer zap.RedirectStdLog(log.Named("stdlog"))()
	if err := hardenProcess(); err != nil {
		log.Warn("the agent stays dumpable: other processes of its user could read its memory", zap.Error(err))
	}
	gcPercent, gcFrom := setGCPercent(cfg.Runtime.GCPercent, os.Getenv("GOGC"), debug.SetGCPercent)
	log.Info("garbage collector", zap.String("gc_percent", gcPercent), zap.String("from", gcFrom))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// The first signal gives the signals back their default action at
	// once, not when the loop below next looks: a reload stuck on a file
	// (a hung mount) or a provider that ignores ctx during New held the
	// loop, and a second SIGTERM went to a channel nobody read.
	context.AfterFunc(ctx, stop)

	// Under systemd socket activation the sockets come from sigil.socket
	// (and stay there across restarts); otherwise the agent makes its own.
	// Taken before the providers open: a socket unit's mistake is found
	// without logging in to a token first.
	sd, err := inheritedListeners()
	if err != nil {
		// The socket units decide what is passed: a restart would be
		// refused the same way.
		log.Error("agent failed to start", zap.String("fault", configFault), zap.Error(err))
		return &exitError{exitConfig, err}
	}
	if sd == nil {
		sd = &systemdListeners{}
	}
	// The sockets the agent makes itself are looked at before the
	// providers and the journal open: a second agent on a running one's
	// socket used to make keys and a journal in its data dir first, for no
	// agent to serve. ListenUnix below looks again: another agent may
	// start meanwhile.
	for _, own := range []struct {
		path    string
		systemd net.Listener
	}{{cfg.Socket, sd.client}, {cfg.AdminSocket, sd.admin}, {cfg.SSHAgentSocket, nil}} {
		if own.path == "" || own.systemd != nil {
			continue
		}
		if err := agent.CheckUnixSocket(own.path); err != nil {
			log.Error("agent failed to listen", zap.Error(err))
			return &exitError{exitFailure, err}
		}
	}
	// So are the TCP addresses, for the same reason (a port another
	// process holds); the listens below bind again. The config has
	// passed its checks (ParseConfig): a non-loopback admin_http.listen
	// was refused there as the config's fault, not here as an address
	// this host cannot bind.
	for _, own := range []struct {
		name, addr string
		systemd    net.Listener
	}{{"tcp.listen", cfg.TCP.Listen, sd.tcp}, {"admin_http.listen", cfg.AdminHTTP.Listen, nil}} {
		if own.addr == "" || own.systemd != nil {
			continue
		}
		if err := checkTCPAddr(own.addr); err != nil {
			log.Error("agent failed to listen", zap.Error(err))
			return &exitError{exitFailure, fmt.Errorf("%s: %w", own.name, err)}
		}
	}
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		if agent.IsConfigError(err) {
			// Not a wire code: Code would say INTERNAL, a fault of ours.
			log.Error("agent failed to start", zap.String("fault", configFault), zap.Error(err))
			return &exitError{exitConfig, fmt.Errorf("agent failed to start (%s): %w", configFault, err)}
		}
		code := agent.Code(err)
		var pe *proto.Error
		if code == proto.Internal && !errors.As(err, &pe) {
			// No code names it (another agent holding the data dir's
			// journal, a data_dir that is a file): INTERNAL would call
			// it a fault of ours.
			log.Error("agent failed to start", zap.Error(err))
			return &exitError{exitFailure, fmt.Errorf("agent failed to start: %w", err)}
		}
		log.Error("agent failed to start", zap.Stringer("code", code), zap.Error(err))
		exit := exitFailure
		if code == proto.PINIncorrect || code == proto.TokenLocked {
			exit = exitConfig
		}
		return &exitError{exit, fmt.Errorf("agent failed to start (%s): %w", code, err)}
	}
	ownSocket, ownAdmin := sd.client == nil, sd.admin == nil
	removeSocket := func() {}
	ln := sd.client
	if ln == nil {
		if ln, err = agent.ListenUnix(cfg.Socket); err != nil {
			a.Shutdown(context.Background())
			log.Error("agent failed to listen", zap.Error(err))
			return &exitError{exitFailure, err}
		}
		removeSocket = ownSocketRemover(cfg.Socket)
	}
	socket := cfg.Socket
	if !ownSocket {
		socket = ln.Addr().String()
	}
	log.Info("agent listening", zap.String("socket", socket), zap.Bool("systemd_socket", !ownSocket), zap.String("data_dir", cfg.DataDir))

	serveErr := make(chan error, 5)
	go func() { serveErr <- a.Serve(ln) }()
	aln := sd.admin
	if aln == nil {
		if aln, err = agent.ListenUnix(cfg.AdminSocket); err != nil {
			a.Shutdown(context.Background())
			removeSocket()
			log.Error("agent failed to listen on its admin socket", zap.Error(err))
			return &exitError{exitFailure, err}
		}
	}
	if ownAdmin {
		defer ownSocketRemover(cfg.AdminSocket)()
	}
	go func() { serveErr <- a.ServeAdmin(aln) }()
	if cfg.SSHAgentSocket != "" {
		sln, err := agent.ListenUnix(cfg.SSHAgentSocket)
		if err != nil {
			a.Shutdown(context.Background())
			removeSocket()
			log.Error("agent failed to listen on its ssh-agent socket", zap.Error(err))
			return &exitError{exitFailure, err}
		}
		defer ownSocketRemover(cfg.SSHAgentSocket)()
		log.Info("serving the OpenSSH agent protocol", zap.String("socket", cfg.SSHAgentSocket))
		go func() { serveErr <- a.ServeSSHAgent(sln) }()
	}
	if cfg.TCP.Listen != "" || sd.tcp != nil {
		var tln net.Listener
		if sd.tcp != nil {
			tln, err = a.WrapTLS(sd.tcp)
		} else {
			tln, err = a.ListenTLS()
		}
		if err != nil {
			a.Shutdown(context.Background())
			removeSocket()
			log.Error("agent failed to listen", zap.Error(err))
			return &exitError{exitFailure, err}
		}
		log.Info("agent listening (mutual TLS)", zap.String("addr", tln.Addr().String()), zap.Bool("systemd_socket", sd.tcp != nil))
		go func() { serveErr <- a.Serve(tln) }()
	}
	if cfg.AdminHTTP.Listen != "" {
		hln, err := a.ListenAdminHTTP()
		if err != nil {
			a.Shutdown(context.Background())
			removeSocket()
			if errors.Is(err, agent.ErrAdminHTTPNotLoopback) {
				log.Error("agent failed to start", zap.String("fault", configFault), zap.Error(err))
				return &exitError{exitConfig, err}
			}
			log.Error("agent failed to listen", zap.Error(err))
			return &exitError{exitFailure, err}
		}
		log.Info("admin HTTP listening (/metrics, /healthz, /readyz)", zap.String("addr", hln.Addr().String()))
		go func() { serveErr <- a.ServeAdminHTTP(hln) }()
	}

	// Providers are open (tokens logged in), the journal is open and every
	// listener is up: tell systemd (Type=notify), and keep its watchdog fed
	// while the agent answers. Scripts that started the agent in the
	// background wait for the line on stderr, printed only now: a listener
	// that fails to open (a port in use) ends the start, unannounced.
	if cfg.Log.Format == "json" {
		// The same words, as an entry of the JSON stream.
		log.Info("sigil agent ready", zap.String("export", "SIGIL_SOCK="+shellQuote(socket)))
	} else {
		fmt.Fprintf(os.Stderr, "sigil agent ready; export SIGIL_SOCK=%s\n", shellQuote(socket))
	}
	sdNotify(log, "READY=1\nSTATUS=serving on "+socket)
	wdCtx, wdStop := context.WithCancel(ctx)
	defer wdStop()
	go runWatchdog(wdCtx, log, socket)

	var failed error
wait:
	for {
		select {
		case <-ctx.Done():
			// A second SIGTERM or SIGINT ends the process at once, as
			// its default action (AfterFunc above): the journal loses
			// nothing to a kill.
			log.Info("shutting down: finishing in-flight requests (a second SIGTERM or Ctrl-C ends the process now)", zap.Duration("grace", cfg.Limits.ShutdownGrace))
			break wait
		case <-hup:
			sdReloading(log)
			// The outcome shows in `systemctl status`. READY=1 either way:
			// a refused reload leaves the agent serving as before.
			at := time.Now().UTC().Format(time.RFC3339)
			outcome := "reloaded at " + at
			if err := a.Reload(); err != nil {
				outcome = "the reload at " + at + " was " + firstLineOf(err) + " (see the log)"
			}
			sdNotify(log, "READY=1\nSTATUS=serving on "+socket+"; "+outcome)
		case err := <-serveErr:
			log.Error("listener failed", zap.Error(err))
			// Exit non-zero after the shutdown, so that a supervisor
			// (systemd's Restart=on-failure) starts the agent again.
			failed = &exitError{exitFailure, fmt.Errorf("listener failed: %w", err)}
			break wait
		}
	}
	wdStop()
	sdNotify(log, "STOPPING=1\nSTATUS=shutting down")
	shutCtx, cancel := context.WithTimeout(context.Background(), cfg.Limits.ShutdownGrace)
	defer cancel()
	err = a.Shutdown(shutCtx)
	removeSocket()
	if err != nil && !errors.Is(err, agent.ErrClosed) {
		log.Warn("shutdown", zap.Error(err))
	}
	log.Info("agent stopped")
	return failed
}

func newLogger(lc agent.LogConfig) (*zap.Logger, error) {
	level, err := zapcore.ParseLevel(lc.Level)
	if err != nil {
		return nil, fmt.Errorf("log level: %w", err)
	}
	var zc zap.Config
	if lc.Format == "json" {
		zc = zap.NewProductionConfig()
	} else {
		zc = zap.NewDevelopmentConfig()
		zc.DisableStacktrace = true
	}
	zc.Level = zap.NewAtomicLevelAt(level)
	zc.OutputPaths = []string{"stderr"}
	return zc.Build()
}

// setGCPercent applies the config's garbage-collection target through set
// (debug.SetGCPercent) unless GOGC is in the environment: the runtime has
// read an operator's GOGC at start, and it wins. It returns the target now
// in force and where it came from, for the log.
func setGCPercent(configured int, gogc string, set func(int) int) (percent, from string) {
	if gogc != "" {
		return gogc, "GOGC"
	}
	set(configured)
	return strconv.Itoa(configured), "runtime.gc_percent"
}
