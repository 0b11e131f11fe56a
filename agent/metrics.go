package agent

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// metrics holds the agent's Prometheus collectors, on a registry of its own
// (never the global default). Labels are bounded: op and code are wire
// enums, tenant is a policy tenant name ("" in single-tenant mode or before
// the peer is mapped), provider is a configured provider id, key_type a
// providers.KeyType. Key names sent by clients are never labels.
//
// The hot path looks children up in copy-on-write maps (one atomic load and
// a map lookup, no allocation); only a label combination's first use takes a
// lock and goes through WithLabelValues.
type metrics struct {
	reg *prometheus.Registry

	requests      *prometheus.CounterVec   // op, code, tenant, provider
	signLatency   *prometheus.HistogramVec // provider, key_type
	journalAppend prometheus.Histogram
	journalOK     prometheus.Counter
	journalFailed prometheus.Counter
	journalPruned prometheus.Counter
	certExpiry    *prometheus.GaugeVec   // key (config-defined names only)
	denials       *prometheus.CounterVec // reason
	refusals      *prometheus.CounterVec // limit

	inFlight atomic.Int64

	// Keyed by the resolved key entry (a pointer: cheap to hash) rather
	// than by label strings; several entries may share one child.
	requestChildren childCache[requestKey, prometheus.Counter]
	latencyChildren childCache[*keyEntry, prometheus.Observer]
}

type requestKey struct {
	op     proto.Op
	code   proto.Code
	tenant string
	key    *keyEntry // nil when the request resolved no key
}

// reqMeta is what a request's handler learned for its metric labels.
type reqMeta struct {
	tenant string
	key    *keyEntry
}

// set labels a request with its tenant (a policy tenant name, or "") and
// the provider of the key it resolved to ("" when none).
func (r *reqMeta) set(tenant string, t target) {
	r.tenant, r.key = tenant, t.key
}

// signLatencyBuckets span 10µs (a software key) to 10s (a remote KMS under
// trouble): roughly ×2.5 per bucket.
var signLatencyBuckets = []float64{
	10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
	1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
	1, 2.5, 5, 10,
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sigil_requests_total",
			Help: "Requests answered, by operation, result code, tenant and provider.",
		}, []string{"op", "code", "tenant", "provider"}),
		signLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "sigil_sign_duration_seconds",
			Help:    "Time to answer a successful Sign (policy check, signature and audit record), by provider and key type.",
			Buckets: signLatencyBuckets,
		}, []string{"provider", "key_type"}),
		journalAppend: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sigil_journal_append_duration_seconds",
			Help:    "Time to append one record to the audit journal.",
			Buckets: signLatencyBuckets,
		}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sigil_policy_denials_total",
			Help: "Sign requests refused by the policy, by reason.",
		}, []string{"reason"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sigil_limit_refusals_total",
			Help: "Connections refused or closed, and requests refused, by the limit that did it (limits.* in the config).",
		}, []string{"limit"}),
	}
	records := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sigil_journal_records_total",
		Help: "Audit journal appends, by result (ok or error).",
	}, []string{"result"})
	m.journalOK = records.WithLabelValues("ok")
	m.journalFailed = records.WithLabelValues("error")
	m.journalPruned = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sigil_journal_pruned_records_total",
		Help: "Audit records deleted by retention or `sigil audit prune`.",
	})
	m.certExpiry = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sigil_key_certificate_expiry_timestamp_seconds",
		Help: "When each key's certificate (certificates: in the config) expires, Unix time; alert on it minus time().",
	}, []string{"key"})
	m.reg.MustRegister(
		m.requests, m.signLatency, m.journalAppend, records, m.journalPruned, m.certExpiry, m.denials, m.refusals,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sigil_connections_open",
			Help: "Client connections open (all listeners).",
		}, func() float64 {
			a.mu.Lock()
			defer a.mu.Unlock()
			return float64(len(a.conns))
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "sigil_requests_in_flight",
			Help: "Requests being answered now.",
		}, func() float64 { return float64(m.inFlight.Load()) }),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	if j := a.journal; j != nil {
		m.reg.MustRegister(
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "sigil_journal_failures_total",
				Help: "Audit journal writes that failed and made the journal reopen its store: commits (their signatures were withheld) and applies of records already in the tail log (nothing withheld).",
			}, func() float64 { return float64(j.Stats().Failures) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "sigil_journal_recoveries_total",
				Help: "Reopens of the audit journal's store after a failure.",
			}, func() float64 { return float64(j.Stats().Recoveries) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name: "sigil_journal_replayed_records_total",
				Help: "Audit records put back from the journal's tail log at start or at a reopen: confirmed before a kill or a failed WAL write, missing from the store's own log.",
			}, func() float64 { return float64(j.Stats().Replayed) }),
		)
	}
	// Session pools (PKCS#11): sessions open/idle/in use and repairs
	// (re-logins, module reloads, session sweeps), per provider.
	for _, p := range a.keys.providers {
		pr, ok := p.(providers.PoolReporter)
		if !ok {
			continue
		}
		labels := prometheus.Labels{"provider": p.ID()}
		for _, state := range []string{"open", "idle", "in_use"} {
			m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name:        "sigil_pool_sessions",
				Help:        "Provider sessions by state (open = idle + in_use).",
				ConstLabels: prometheus.Labels{"provider": p.ID(), "state": state},
			}, func() float64 {
				st := pr.PoolStats()
				switch state {
				case "open":
					return float64(st.Open)
				case "idle":
					return float64(st.Idle)
				}
				return float64(st.Open - st.Idle)
			}))
		}
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name:        "sigil_provider_repairs_total",
			Help:        "Session pool repairs since start: re-logins, module reloads, session sweeps (reconnects).",
			ConstLabels: labels,
		}, func() float64 { return float64(pr.PoolStats().Repairs) }))
	}
	for _, l := range []string{limitConns, limitHandshakes, limitTenantConns, limitTenantFlight, limitFrameTimeout, limitIdleTimeout, limitUnreadReplies} {
		m.refusals.WithLabelValues(l)
	}
	// Every denial reason shows up at 0 from the start.
	for r := policy.NotFound; r <= policy.Paused; r++ {
		m.denials.WithLabelValues(r.String())
	}
	return m
}

// request counts one answered request.
func (m *metrics) request(op proto.Op, code proto.Code, meta *reqMeta) {
	if !knownOp(op) {
		op = 0 // unknown operation numbers share one series
	}
	k := requestKey{op: op, code: code, tenant: meta.tenant, key: meta.key}
	m.requestChildren.get(k, func() prometheus.Counter {
		name, provider := "unknown", ""
		if op != 0 {
			name = op.String()
		}
		if k.key != nil {
			provider = k.key.provider.ID()
		}
		return m.requests.WithLabelValues(name, code.String(), k.tenant, provider)
	}).Inc()
}

func knownOp(op proto.Op) bool {
	switch op {
	case proto.OpHello, proto.OpPing, proto.OpListKeys, proto.OpPublicKey, proto.OpSign, proto.OpVerify,
		proto.OpRotate, proto.OpRollback, proto.OpPause, proto.OpResume,
		proto.OpReloadPolicy, proto.OpAuditTail, proto.OpExportREP, proto.OpIncidentDrill, proto.OpAuditVerify,
		proto.OpAuditPrune:
		return true
	}
	return false
}

// signed observes a successful Sign's latency with key e.
func (m *metrics) signed(e *keyEntry, d time.Duration) {
	m.latencyChildren.get(e, func() prometheus.Observer {
		return m.signLatency.WithLabelValues(e.provider.ID(), string(e.info.Type))
	}).Observe(d.Seconds())
}

func (m *metrics) denied(r policy.Reason) { m.denials.WithLabelValues(r.String()).Inc() }

func (m *metrics) refused(limit string) { m.refusals.WithLabelValues(limit).Inc() }

func (m *metrics) journalAppended(d time.Duration, err error) {
	m.journalAppend.Observe(d.Seconds())
	if err != nil {
		m.journalFailed.Inc()
	} else {
		m.journalOK.Inc()
	}
}

// childCache maps label sets to metric children: lock-free reads of a map
// that is replaced whole when a new label set appears (rarely: labels are
// bounded).
type childCache[K comparable, V any] struct {
	m  atomic.Pointer[map[K]V]
	mu sync.Mutex
}

func (c *childCache[K, V]) get(k K, create func() V) V {
	if m := c.m.Load(); m != nil {
		if v, ok := (*m)[k]; ok {
			return v
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := c.m.Load()
	if old != nil {
		if v, ok := (*old)[k]; ok {
			return v
		}
	}
	v := create()
	next := make(map[K]V, 1)
	if old != nil {
		next = make(map[K]V, len(*old)+1)
		for ok, ov := range *old {
			next[ok] = ov
		}
	}
	next[k] = v
	c.m.Store(&next)
	return v
}
