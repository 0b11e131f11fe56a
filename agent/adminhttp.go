package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"golang.org/x/net/netutil"

	"github.com/sigil-agent/sigil/providers"
)

// AdminHTTPConfig configures the optional admin HTTP listener that serves
// /metrics (Prometheus), /healthz and /readyz. Off when Listen is empty.
type AdminHTTPConfig struct {
	// Listen is host:port, e.g. 127.0.0.1:9464. A non-loopback address is
	// refused unless AllowRemote is set: the endpoints are unauthenticated.
	Listen      string `yaml:"listen"`
	AllowRemote bool   `yaml:"allow_remote"`
	// Pprof adds Go's profiler under /debug/pprof/ (off by default): CPU
	// and heap profiles of the running agent, for finding where a
	// signature's time goes under real load. Profiles show function names
	// and timings, never request contents.
	Pprof bool `yaml:"pprof"`
}

func (h *AdminHTTPConfig) validate() error {
	if h.Listen == "" {
		return nil
	}
	host, _, err := net.SplitHostPort(h.Listen)
	if err != nil {
		return fmt.Errorf("admin_http.listen %q: %w", h.Listen, err)
	}
	if !h.AllowRemote && !isLoopbackHost(host) {
		return fmt.Errorf("admin_http.listen %q is not a loopback address; set admin_http.allow_remote: true to serve metrics beyond this host", h.Listen)
	}
	return nil
}

// ListenAdminHTTP opens the configured admin HTTP address.
func (a *Agent) ListenAdminHTTP() (net.Listener, error) {
	if a.cfg.AdminHTTP.Listen == "" {
		return nil, errors.New("admin_http.listen is not configured")
	}
	ln, err := net.Listen("tcp", a.cfg.AdminHTTP.Listen)
	if err != nil {
		return nil, fmt.Errorf("admin http: %w", err)
	}
	if err := boundWhereAllowed(ln.Addr(), a.cfg.AdminHTTP); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// boundWhereAllowed checks the address the listener got, not only the
// configured name: "localhost" is taken as loopback by the config's check,
// and a hosts file that maps it elsewhere would serve the unauthenticated
// endpoints beyond this host.
func boundWhereAllowed(addr net.Addr, h AdminHTTPConfig) error {
	if h.AllowRemote {
		return nil
	}
	if ta, ok := addr.(*net.TCPAddr); ok && ta.IP.IsLoopback() {
		return nil
	}
	return fmt.Errorf("admin http: admin_http.listen %q bound %s: %w", h.Listen, addr, ErrAdminHTTPNotLoopback)
}

// ErrAdminHTTPNotLoopback is ListenAdminHTTP's error for an address that
// resolved beyond this host without admin_http.allow_remote: the config's
// fault, which a restart would only repeat.
var ErrAdminHTTPNotLoopback = errors.New("not a loopback address; set admin_http.allow_remote: true to serve metrics beyond this host")

// maxAdminHTTPConns bounds the admin HTTP server's open connections: they
// take file descriptors from the process that serves the signing sockets,
// and the timeouts alone let a client hold many for seconds each. A
// scraper needs one. A variable so that tests can lower it.
var maxAdminHTTPConns = 64

// AdminHandler serves /metrics, /healthz and /readyz (and /debug/pprof/
// with admin_http.pprof).
func (a *Agent) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	if a.cfg.AdminHTTP.Pprof {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{
		ErrorLog: zap.NewStdLog(a.log.Named("metrics")),
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if reason := a.notReady(r.Context()); reason != "" {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, reason)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// adminHTTPTimeouts bound how long one connection may hold the admin HTTP
// server, whose connections take file descriptors from the signing
// sockets. read covers the body too: without it a client that trickled a
// body held its connection for ever, since the server reads an unread
// body (up to 256 KiB) before it answers. It ends the reading of the
// request only, not the handler: a /debug/pprof profile still runs its
// seconds (up to write). A variable so that tests can shorten them.
var adminHTTPTimeouts = struct{ readHeader, read, write, idle time.Duration }{
	readHeader: 5 * time.Second,
	read:       10 * time.Second,
	write:      30 * time.Second,
	idle:       60 * time.Second,
}

// ServeAdminHTTP serves the admin HTTP endpoints on ln until Shutdown; it
// returns ErrClosed after a shutdown, or the listener's error.
func (a *Agent) ServeAdminHTTP(ln net.Listener) error {
	t := adminHTTPTimeouts
	srv := &http.Server{
		Handler:           a.AdminHandler(),
		ReadHeaderTimeout: t.readHeader,
		ReadTimeout:       t.read,
		WriteTimeout:      t.write,
		IdleTimeout:       t.idle,
	}
	a.mu.Lock()
	if a.closing {
		a.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	a.httpServers[srv] = struct{}{}
	a.mu.Unlock()
	err := srv.Serve(netutil.LimitListener(ln, maxAdminHTTPConns))
	a.mu.Lock()
	delete(a.httpServers, srv)
	a.mu.Unlock()
	if errors.Is(err, http.ErrServerClosed) {
		return ErrClosed
	}
	return err
}

// healthChecker is what a provider may implement to report whether it can
// sign now (the PKCS#11 provider does); others count as ready.
type healthChecker interface{ Healthy() error }

// notReady is "" when every provider is reachable and the journal is open,
// else a short reason without secrets.
func (a *Agent) notReady(ctx context.Context) string {
	if a.isClosing() {
		return "shutting down"
	}
	if a.cfg.Journal.Mode != "off" && a.journal == nil {
		return "audit journal not open"
	}
	if a.journal != nil {
		if err := a.journal.Healthy(ctx); err != nil {
			a.log.Info("not ready: audit journal unavailable", zap.Error(err))
			return "audit journal unavailable"
		}
	}
	for _, p := range a.keys.providers {
		hc, ok := p.(healthChecker)
		if !ok {
			continue
		}
		if ctx.Err() != nil {
			return "readiness check cancelled"
		}
		if err := a.providerHealthy(p.ID(), hc); err != nil {
			a.log.Info("not ready: provider unhealthy", zap.String("provider", p.ID()), zap.Error(err))
			return "provider " + p.ID() + " unavailable"
		}
	}
	return ""
}

// providerHealthy is hc's Healthy, a panic in it (a provider's bug) an
// error: the provider counts as unavailable, and the admin HTTP server's
// own recovery, which would log the panic's value, is not reached.
func (a *Agent) providerHealthy(id string, hc healthChecker) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = logProviderPanic(a.log, providers.Recovered(v, id, "health check", ""))
		}
	}()
	return hc.Healthy()
}

// shutdownHTTP stops the admin HTTP servers (during Shutdown).
func (a *Agent) shutdownHTTP(ctx context.Context) error {
	a.mu.Lock()
	srvs := make([]*http.Server, 0, len(a.httpServers))
	for s := range a.httpServers {
		srvs = append(srvs, s)
	}
	a.mu.Unlock()
	var errs []error
	for _, s := range srvs {
		if err := s.Shutdown(ctx); err != nil {
			s.Close()
			errs = append(errs, fmt.Errorf("admin http: %w", err))
		}
	}
	return errors.Join(errs...)
}
