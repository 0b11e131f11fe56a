package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sigil-agent/sigil/agent"
)

func newAgentCommand(g *globalFlags) *cobra.Command {
	var (
		configPath   string
		dataDir      string
		logLevel     string
		printDefault bool
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the signing agent",
		Long: `Run the signing agent in the foreground until SIGTERM or SIGINT.

With no --config it runs on the embedded default: software keys (ECDSA P-256
"default", ECDSA P-384, Ed25519, RSA-2048) generated on first start into the
data dir ($XDG_STATE_HOME/sigil, else ~/.local/state/sigil), and the socket at
$XDG_RUNTIME_DIR/sigil/agent.sock, else /tmp/sigil-$UID/agent.sock.
--socket overrides the socket path.`,
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
					return &exitError{exitFailure, err}
				}
			}
			if g.socket != "" {
				cfg.Socket = g.socket
			}
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
	return cmd
}

func runAgent(cfg agent.Config) error {
	cfg.EnsureDefaults()
	log, err := newLogger(cfg.Log)
	if err != nil {
		return &exitError{exitUsage, err}
	}
	defer log.Sync()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		code := agent.Code(err)
		log.Error("agent failed to start", zap.Stringer("code", code), zap.Error(err))
		return &exitError{exitFailure, fmt.Errorf("agent failed to start (%s): %w", code, err)}
	}
	ln, err := agent.ListenUnix(cfg.Socket)
	if err != nil {
		a.Shutdown(context.Background())
		log.Error("agent failed to listen", zap.Error(err))
		return &exitError{exitFailure, err}
	}
	log.Info("agent listening", zap.String("socket", cfg.Socket), zap.String("data_dir", cfg.DataDir))
	// Scripts that started the agent in the background wait for this line.
	fmt.Fprintf(os.Stderr, "sigil agent ready; export SIGIL_SOCK=%s\n", cfg.Socket)

	serveErr := make(chan error, 3)
	go func() { serveErr <- a.Serve(ln) }()
	aln, err := agent.ListenUnix(cfg.AdminSocket)
	if err != nil {
		a.Shutdown(context.Background())
		os.Remove(cfg.Socket)
		log.Error("agent failed to listen on its admin socket", zap.Error(err))
		return &exitError{exitFailure, err}
	}
	defer os.Remove(cfg.AdminSocket)
	go func() { serveErr <- a.ServeAdmin(aln) }()
	if cfg.TCP.Listen != "" {
		tln, err := a.ListenTLS()
		if err != nil {
			a.Shutdown(context.Background())
			os.Remove(cfg.Socket)
			log.Error("agent failed to listen", zap.Error(err))
			return &exitError{exitFailure, err}
		}
		log.Info("agent listening (mutual TLS)", zap.String("addr", tln.Addr().String()))
		go func() { serveErr <- a.Serve(tln) }()
	}

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
wait:
	for {
		select {
		case <-ctx.Done():
			log.Info("shutting down: finishing in-flight requests", zap.Duration("grace", cfg.Limits.ShutdownGrace))
			break wait
		case <-hup:
			a.Reload()
		case err := <-serveErr:
			log.Error("listener failed", zap.Error(err))
			break wait
		}
	}
	shutCtx, cancel := context.WithTimeout(context.Background(), cfg.Limits.ShutdownGrace)
	defer cancel()
	err = a.Shutdown(shutCtx)
	os.Remove(cfg.Socket)
	if err != nil && !errors.Is(err, agent.ErrClosed) {
		log.Warn("shutdown", zap.Error(err))
	}
	log.Info("agent stopped")
	return nil
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
