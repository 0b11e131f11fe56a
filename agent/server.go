package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// Agent serves the wire protocol for one configuration.
type Agent struct {
	cfg     Config
	log     *zap.Logger
	keys    *keyring
	workers *workerPool
	tls     *tlsMaterial      // nil without a TCP listener
	journal *journal.Journal  // nil only with journal.mode: off
	policy  *policy.Engine    // nil without a policy file: single-tenant mode
	rot     *rotation.Rotator // nil without a policy file or without the journal
	sched   *rotation.Scheduler

	// retentionFloor is the newest record's time when the journal opened
	// (zero for an empty journal): retention's first round, at start,
	// prunes by no later time (retentionTime). retentionFloorOK: it could
	// be read.
	retentionFloor   time.Time
	retentionFloorOK bool

	stopSSH context.CancelFunc // ends ServeSSHAgent's connections on Shutdown
	sshWG   sync.WaitGroup     // held while ServeSSHAgent runs
	// background stops and waits for each goroutine goUntilShutdown
	// started: the rotation scheduler, retention, quota snapshots.
	background []func()

	metrics *metrics

	// signedHook, nil outside tests, runs after a Sign's signature was made
	// and kept and before its record is appended, with the request's
	// context: the one moment a departing client must not cost the record.
	signedHook func(request context.Context)

	// reloadMu serializes Reload and ReloadPolicy, and guards policyFile:
	// the policy file reloads read, the config's as of the last reload.
	reloadMu   sync.Mutex
	policyFile string

	// certMu serializes certificate reloads (SIGHUP and the admin op) and
	// guards certPaths, the certificates map in force.
	certMu    sync.Mutex
	certPaths map[string]string

	// pauseMu serializes run-time pauses and resumes (pause.go): each is a
	// change in memory and one in the journal, in opposite orders, and two
	// interleaved (two admins, or a drill and an admin) could leave a slot
	// signing in memory while the journal says paused.
	pauseMu sync.Mutex
	// pausedBy numbers the run-time pause in force of each slot it made
	// ("tenant/slot"), from pauseSerial, so that a drill lifts only its
	// own pause. Guarded by pauseMu.
	pausedBy    map[string]uint64
	pauseSerial uint64
	// drilling counts the incident drills under way by slot
	// ("tenant/slot"), which an operator's resume and a reload may not
	// let sign until they end. Guarded by pauseMu.
	drilling map[string]int

	mu          sync.Mutex
	listeners   map[net.Listener]struct{}
	httpServers map[*http.Server]struct{}
	conns       map[*conn]struct{}
	clientConns int                    // admitted client connections (limits.go)
	handshakes  int                    // TLS connections not yet identified (limits.go)
	tenants     map[string]*tenantLoad // by principal, while it has connections
	closing     bool
	connWG      sync.WaitGroup
}

// Option adjusts New.
type Option func(*options)

type options struct {
	extra      []providers.Provider
	journalFS  vfs.FS
	signedHook func(context.Context) // set by tests only (export_test.go)
}

// WithJournalFS makes the journal use fs (tests inject disk faults with it).
func WithJournalFS(fs vfs.FS) Option {
	return func(o *options) { o.journalFS = fs }
}

// WithProviders serves keys from already-open providers besides the
// configured ones (for embedding the agent, and for tests that need a
// provider with injected faults). The agent closes them on Shutdown.
func WithProviders(p ...providers.Provider) Option {
	return func(o *options) { o.extra = append(o.extra, p...) }
}

// IsConfigError reports whether err, from New, is the configuration's
// fault: the config fails its checks, the policy fails its own or names a
// key no provider serves, a PKCS#11 provider's PIN source gives no PIN, or
// its module does not load (pkcs11.ErrModuleLoad; not a module whose
// C_Initialize fails, which a restart may get past), or the evidence key
// file is missing while evidence of it is kept (rotation.ErrEvidenceKeyLost,
// ErrEvidenceKeyMismatch).
// Starting again fails the same way until an operator changes the config,
// a file it names or the agent's environment, so a supervisor should not
// restart the agent on it. It has no wire code: Code calls it INTERNAL,
// which would read as a fault of the agent's.
func IsConfigError(err error) bool {
	var ce *configError
	return errors.As(err, &ce)
}

// configError marks an error from New as the configuration's fault
// (IsConfigError), its text unchanged.
type configError struct{ err error }

func (e *configError) Error() string { return e.err.Error() }
func (e *configError) Unwrap() error { return e.err }

// New opens the configured providers (logging in to tokens) and returns an
// agent ready to serve. cfg is completed with EnsureDefaults. An error
// that only an operator can cure is one IsConfigError reports.
func New(ctx context.Context, cfg Config, log *zap.Logger, opts ...Option) (*Agent, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	cfg.EnsureDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, &configError{fmt.Errorf("config: %w", err)}
	}
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.DataDir == "" {
		return nil, &configError{errors.New("data_dir: no default (no $XDG_STATE_HOME, and no home directory): set it")}
	}
	if err := software.PrivateDir(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("data_dir: %w", err)
	}
	// evidence.key is written with software.WriteKeyFile, whose temp files
	// a crash leaves here.
	if err := software.RemoveStaleKeyTemps(cfg.DataDir); err != nil {
		return nil, fmt.Errorf("data_dir: %w", err)
	}
	provs, err := openProviders(ctx, &cfg, log)
	if err != nil {
		return nil, err
	}
	provs = append(provs, o.extra...)
	kr, err := newKeyring(ctx, provs, cfg.DefaultKey)
	if err != nil {
		for _, p := range provs {
			p.Close()
		}
		return nil, err
	}
	var tm *tlsMaterial
	if cfg.TCP.Listen != "" {
		if tm, err = newTLSMaterial(cfg.TCP); err != nil {
			kr.close()
			return nil, err
		}
	}
	var engine *policy.Engine
	if cfg.Policy != "" {
		set, err := policy.Load(cfg.Policy)
		if err == nil {
			err = checkSlotKeys(set, kr)
		}
		if err != nil {
			kr.close()
			return nil, &configError{fmt.Errorf("policy: %w", err)}
		}
		engine = policy.NewEngine(set, time.Now)
		log.Info("policy in force", zap.String("file", cfg.Policy), zap.String("hash", set.HashHex()), zap.Strings("tenants", set.Tenants()))
	}
	var set *policy.Set
	if engine != nil {
		set = engine.Set()
	}
	if err := sshKeysError(cfg, set, kr.serves); err != nil {
		kr.close()
		return nil, &configError{err}
	}
	// Fail closed: without its journal the agent does not start.
	jl, err := openJournal(&cfg, log, o.journalFS)
	if err != nil {
		kr.close()
		return nil, err
	}
	for _, k := range kr.list {
		log.Info("serving key", zap.String("key", k.Name), zap.String("kid", k.KID),
			zap.String("provider", k.Provider), zap.String("type", k.KeyType))
	}
	a := &Agent{
		cfg:        cfg,
		log:        log,
		keys:       kr,
		certPaths:  cfg.Certificates,
		policyFile: cfg.Policy,
		workers:    newWorkerPool(30 * time.Second),
		tls:        tm,
		journal:    jl,
		policy:     engine,
		listeners:  map[net.Listener]struct{}{},
		conns:      map[*conn]struct{}{},
		tenants:    map[string]*tenantLoad{},

		httpServers: map[*http.Server]struct{}{},
		signedHook:  o.signedHook,
	}
	a.metrics = newMetrics(a)
	a.retentionFloor, a.retentionFloorOK = newestRecordTime(ctx, jl, log)
	// Fail closed: without the stored pauses and the day's quota counts the
	// agent cannot tell which slots may sign, or how much.
	if err = a.restorePauses(ctx); err != nil {
		err = fmt.Errorf("stored pauses: %w", err)
	} else if err = a.restoreQuotas(ctx); err != nil {
		err = fmt.Errorf("daily quotas: %w", err)
	}
	if err != nil {
		kr.close()
		jl.Close()
		return nil, err
	}
	if off := rotationOffReason(&cfg); off != "" && engine != nil {
		// Validate refused rotation settings; the rotation commands
		// will be refused.
		log.Warn("key rotation is off: " + off)
	}
	if engine != nil && jl != nil {
		if err := a.setupRotation(ctx); err != nil {
			kr.close()
			jl.Close()
			return nil, fmt.Errorf("rotation: %w", err)
		}
	}
	// After the rotation's setup, which serves again the key versions
	// rotations made: `certificates:` may name those keys (a reload
	// takes them), and a start must too.
	if err := a.loadCertificates(cfg.Certificates); err != nil {
		kr.close()
		if jl != nil { // journal: off
			jl.Close()
		}
		return nil, err
	}
	a.checkCertificates(time.Now())
	a.startScheduler()
	a.startRetention()
	a.startQuotaSnapshots()
	return a, nil
}

// Config returns the agent's configuration with defaults filled in.
func (a *Agent) Config() Config { return a.cfg }

// ErrClosed is returned by Serve once Shutdown has begun.
var ErrClosed = errors.New("agent closed")

// Serve accepts client connections on ln until Shutdown. It returns
// ErrClosed after a shutdown, or the listener's error. ln must give Unix
// socket or TLS connections (ListenUnix, ListenTLS, WrapTLS): a peer of any
// other kind cannot be identified, and its connection is closed unread.
func (a *Agent) Serve(ln net.Listener) error { return a.serve(ln, false) }

// ServeAdmin accepts connections for the admin role on ln: peers that are
// admins under the policy (without one: the agent's own user and root) may
// pause and resume slots and reload the policy, and do nothing else.
func (a *Agent) ServeAdmin(ln net.Listener) error { return a.serve(ln, true) }

func (a *Agent) serve(ln net.Listener, admin bool) error {
	a.mu.Lock()
	if a.closing {
		a.mu.Unlock()
		ln.Close()
		return ErrClosed
	}
	a.listeners[ln] = struct{}{}
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.listeners, ln)
		a.mu.Unlock()
	}()

	pl := patientListener{Listener: ln, log: a.log}
	for {
		nc, err := pl.Accept()
		if err != nil {
			if a.isClosing() {
				return ErrClosed
			}
			return fmt.Errorf("accept: %w", err)
		}
		c := newConn(a, nc, admin)
		a.mu.Lock()
		if a.closing {
			a.mu.Unlock()
			nc.Close()
			return ErrClosed
		}
		a.conns[c] = struct{}{}
		a.connWG.Add(1)
		a.mu.Unlock()
		go c.serve()
	}
}

func (a *Agent) isClosing() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.closing
}

func (a *Agent) forget(c *conn) {
	a.mu.Lock()
	delete(a.conns, c)
	a.mu.Unlock()
	a.connWG.Done()
}

// stuckHandlerWait bounds the wait, after the grace period has cut the
// connections, for handlers to leave their provider calls (cancelled with
// their connections). A provider that holds calls past it has its own
// bound in its Close (the PKCS#11 provider waits 5 s for calls inside
// the module).
const stuckHandlerWait = time.Second

// Shutdown stops accepting, lets in-flight requests finish and their replies
// go out (until ctx ends, then connections are cut, and handlers still in a
// provider call get stuckHandlerWait more), and closes the providers.
func (a *Agent) Shutdown(ctx context.Context) error {
	a.mu.Lock()
	if a.closing {
		a.mu.Unlock()
		return ErrClosed
	}
	a.closing = true
	if a.stopSSH != nil {
		a.stopSSH()
	}
	for ln := range a.listeners {
		ln.Close()
	}
	for c := range a.conns {
		c.stopReading()
	}
	a.mu.Unlock()

	done := make(chan struct{})
	go func() {
		a.connWG.Wait()
		a.sshWG.Wait() // its requests were cancelled by stopSSH
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("shutdown: %w; cutting remaining connections", ctx.Err())
		a.mu.Lock()
		for c := range a.conns {
			// Cancel as well as close: an admin operation (a rotation, an
			// audit verify) runs on the connection's context, not its socket.
			c.drop()
		}
		a.mu.Unlock()
		select {
		case <-done:
		case <-time.After(stuckHandlerWait):
			// A provider call that ignores its context (a C_Sign on a
			// wedged network HSM) holds its handler. Closing the
			// providers and the journal under it is safe: a signature
			// it returns later finds the journal closed and is withheld.
			a.log.Error("shutdown: requests still running in their providers past the grace period; closing the providers under them",
				zap.Duration("waited", stuckHandlerWait))
			err = errors.Join(err, errors.New("shutdown: requests stuck in their providers were abandoned"))
		}
	}
	if herr := a.shutdownHTTP(ctx); herr != nil {
		err = errors.Join(err, herr)
	}
	a.workers.stop()
	a.stopBackground()
	a.storeFinalQuotas()
	if cerr := a.keys.close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	if a.journal != nil {
		if jerr := a.journal.Close(); jerr != nil {
			err = errors.Join(err, fmt.Errorf("close journal: %w", jerr))
		}
	}
	return err
}

// ReloadError is a reload refused in whole or in part. Each part (the
// TLS certificates, the keys' certificates, the policy, the rotation
// calendars) is taken or refused on its own, so that a bad certificate
// file does not hold back a policy change; Taken names the parts that
// were put in force all the same (the policy only when it changed).
type ReloadError struct {
	Taken []string
	Err   error
}

func (e *ReloadError) Error() string {
	if len(e.Taken) == 0 {
		return "refused, what was in force stays: " + e.Err.Error()
	}
	// Taken first: the SIGHUP status line keeps only the first line.
	return "refused in part (taken all the same: " + strings.Join(e.Taken, ", ") + "; the rest stays as it was): " + e.Err.Error()
}

func (e *ReloadError) Unwrap() error { return e.Err }

// Reload re-reads what can change without a restart: the TLS certificates
// (new handshakes use them; open connections carry on, unless their
// client's certificate no longer chains to the client CAs), the keys'
// certificates (certs.go), the policy and the rotation calendars, each
// from the path the config file names now (as `sigil agent --check` reads
// them). A part that fails to load is refused and its old version stays
// in force; the others are taken (*ReloadError says which).
func (a *Agent) Reload() error {
	return a.reload("")
}

// reload is Reload for who asked (an admin's peer name), which the
// policy's journal record names; "" for the process's own (SIGHUP).
func (a *Agent) reload(by string) error {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	var errs []error
	var taken []string
	var tcp *TCPConfig
	if a.tls != nil {
		tcp = &a.tls.cfg
	}
	a.certMu.Lock()
	certPaths, certsKnown := a.certPaths, true
	a.certMu.Unlock()
	var calendars map[string]rotation.CalendarConfig // the config's, checked against the policy reloaded below
	if a.cfg.source != "" {
		fresh, err := LoadConfig(a.cfg.source)
		if err != nil {
			// The key certificates come from the config alone: without
			// it they stay as they are.
			a.log.Warn("config not read again; reloading the TLS and policy files from the paths in force", zap.Error(err))
			errs = append(errs, fmt.Errorf("config: %w", err))
			certsKnown = false
		} else {
			var ferrs []error
			var calendarsSet bool
			tcp, calendarsSet, ferrs = a.followConfig(fresh)
			errs = append(errs, ferrs...)
			if calendarsSet {
				taken = append(taken, "rotation calendars")
			}
			certPaths = fresh.Certificates
			calendars = fresh.Rotation.Calendars
		}
	}
	if a.tls != nil {
		if err := a.tls.reloadFrom(*tcp); err != nil {
			a.log.Warn("reload failed; keeping the current certificates", zap.Error(err))
			errs = append(errs, err)
		} else {
			a.log.Info("TLS certificates reloaded")
			taken = append(taken, "TLS certificates")
		}
	}
	if !certsKnown {
		a.log.Warn("key certificates not reloaded; keeping the ones in force")
	} else if err := a.reloadCertificates(certPaths); err != nil {
		a.log.Warn("key certificates not reloaded; keeping the ones in force", zap.Error(err))
		errs = append(errs, err)
	} else if len(certPaths) > 0 {
		taken = append(taken, "key certificates")
	}
	if a.policy != nil {
		was := a.policy.Set().HashHex()
		if err := a.reloadPolicy(by); err != nil {
			errs = append(errs, err)
		} else if now := a.policy.Set().HashHex(); now != was {
			taken = append(taken, "policy "+now)
		}
		if a.sched != nil && calendars != nil {
			errs = append(errs, calendarSlotErrors(a.policy.Set(), calendars)...)
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return &ReloadError{Taken: taken, Err: errors.Join(errs...)}
}

// followConfig takes from fresh, the config file read again, what a reload
// follows: the TLS files, the policy file (setting policyFile) and the
// rotation calendars (into the scheduler).
// A change only a restart applies is an error naming it: the TCP listener
// or the policy file added or removed (either changes who may connect and
// how). The TCP address moved is logged; the listener stays where it is.
func (a *Agent) followConfig(fresh Config) (tcp *TCPConfig, calendarsSet bool, errs []error) {
	switch {
	case a.tls != nil && fresh.TCP.Listen == "":
		tcp = &a.tls.cfg
		errs = append(errs, errors.New("tcp.listen was removed from the config: restart the agent to close the TCP listener"))
	case a.tls == nil && fresh.TCP.Listen != "":
		errs = append(errs, errors.New("tcp.listen was added to the config: restart the agent to open the TCP listener"))
	case a.tls != nil:
		if fresh.TCP.Listen != a.tls.cfg.Listen {
			a.log.Warn("tcp.listen changed in the config; the listener stays at its address until a restart",
				zap.String("listening", a.tls.cfg.Listen), zap.String("config", fresh.TCP.Listen))
		}
		tcp = &fresh.TCP
	}
	switch {
	case a.policy != nil && fresh.Policy == "":
		errs = append(errs, errors.New("policy was removed from the config: restart the agent to run without one (single-tenant mode); the policy in force stays"))
	case a.policy == nil && fresh.Policy != "":
		errs = append(errs, errors.New("policy was added to the config: restart the agent to put it in force"))
	case a.policy != nil:
		a.policyFile = fresh.Policy
	}
	// Calendars come from the fleet's configuration system like the rest;
	// the scheduler takes the new set at once.
	switch cals, err := parseCalendars(fresh.Rotation.Calendars); {
	case err != nil:
		errs = append(errs, err)
	case a.sched != nil:
		if err := a.sched.SetCalendars(cals); err != nil {
			errs = append(errs, fmt.Errorf("rotation.calendars: %w", err))
		} else {
			calendarsSet = true
		}
	case len(cals) > 0:
		errs = append(errs, errors.New("rotation.calendars: rotation is off in this agent (it needs a policy file and the journal)"))
	}
	return tcp, calendarsSet, errs
}
