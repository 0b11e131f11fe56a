package agent_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	dto "github.com/prometheus/client_model/go"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// healthProvider serves no keys and reports the health the test sets.
type healthProvider struct{ down atomic.Bool }

func (p *healthProvider) ID() string                                        { return "hsm" }
func (p *healthProvider) Keys(context.Context) ([]providers.KeyInfo, error) { return nil, nil }
func (p *healthProvider) Sign(context.Context, string, providers.Algorithm, []byte) ([]byte, error) {
	return nil, providers.ErrUnavailable
}
func (p *healthProvider) Close() error { return nil }
func (p *healthProvider) Healthy() error {
	if p.down.Load() {
		return errors.New("token removed (secret detail: PIN 1234)")
	}
	return nil
}

func TestAdminHTTPMetricsAndHealth(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.AdminHTTP.Listen = "127.0.0.1:0"
	hp := &healthProvider{}
	r := startAgent(t, cfg, agent.WithProviders(hp))
	base := r.serveAdminHTTP(t, cfg.AdminHTTP.Listen)

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	scrape := func() map[string]*dto.MetricFamily {
		t.Helper()
		code, body := get("/metrics")
		if code != http.StatusOK {
			t.Fatalf("/metrics: %d", code)
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		mf, err := parser.TextToMetricFamilies(strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		return mf
	}

	before := scrape()
	c := r.dial(t)
	d := sha256.Sum256([]byte("metrics"))
	for range 3 {
		if _, err := c.Sign(context.Background(), client.ByName("default"), client.Algorithm{}, d[:]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Sign(context.Background(), client.ByName("no-such-key"), client.Algorithm{}, d[:]); err == nil {
		t.Fatal("sign with an unknown key succeeded")
	}
	after := scrape()

	okLabels := map[string]string{"op": "Sign", "code": "OK", "tenant": "", "provider": "soft"}
	if got := counter(after, "sigil_requests_total", okLabels) - counter(before, "sigil_requests_total", okLabels); got != 3 {
		t.Errorf("Sign OK requests moved by %v, want 3", got)
	}
	refused := map[string]string{"op": "Sign", "code": "NOT_FOUND", "tenant": "", "provider": ""}
	if got := counter(after, "sigil_requests_total", refused); got != 1 {
		t.Errorf("Sign NOT_FOUND requests = %v, want 1", got)
	}
	for _, val := range after["sigil_requests_total"].GetMetric() {
		for _, l := range val.GetLabel() {
			if strings.Contains(l.GetValue(), "no-such-key") {
				t.Errorf("a client-supplied key name became a label: %v", val)
			}
		}
	}
	lat := map[string]string{"provider": "soft", "key_type": "ecdsa-p256"}
	if got := histCount(after, "sigil_sign_duration_seconds", lat); got != 3 {
		t.Errorf("sign latency count %d, want 3", got)
	}
	if got := histCount(after, "sigil_journal_append_duration_seconds", nil); got != 4 {
		t.Errorf("journal append count %d, want 4", got)
	}
	if got := counter(after, "sigil_journal_records_total", map[string]string{"result": "ok"}); got != 4 {
		t.Errorf("journal records %v, want 4", got)
	}
	for _, name := range []string{"sigil_journal_failures_total", "sigil_journal_recoveries_total", "sigil_journal_replayed_records_total"} {
		if after[name] == nil || counter(after, name, nil) != 0 {
			t.Errorf("%s missing or not 0 on a healthy agent", name)
		}
	}
	if got := gauge(after, "sigil_connections_open"); got < 1 {
		t.Errorf("open connections %v, want ≥1", got)
	}

	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz: %d", code)
	}
	if code, body := get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz: %d %s", code, body)
	}
	hp.down.Store(true)
	code, body := get("/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "provider hsm") {
		t.Errorf("/readyz with a provider down: %d %q", code, body)
	}
	if strings.Contains(body, "1234") {
		t.Errorf("/readyz leaks provider error detail: %q", body)
	}
	if code, _ := get("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz with a provider down: %d", code)
	}
	hp.down.Store(false)
	if code, _ := get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after recovery: %d", code)
	}
}

func TestAdminHTTPRefusesRemoteByDefault(t *testing.T) {
	for _, tc := range []struct {
		listen string
		remote bool
		ok     bool
	}{
		{"127.0.0.1:9464", false, true},
		{"[::1]:9464", false, true},
		{"localhost:9464", false, true},
		{":9464", false, false},
		{"0.0.0.0:9464", false, false},
		{"10.1.2.3:9464", false, false},
		{"0.0.0.0:9464", true, true},
		{"nonsense", true, false},
	} {
		cfg := agent.Config{AdminHTTP: agent.AdminHTTPConfig{Listen: tc.listen, AllowRemote: tc.remote}}
		if err := cfg.Validate(); (err == nil) != tc.ok {
			t.Errorf("listen %q allow_remote=%v: err %v, want ok=%v", tc.listen, tc.remote, err, tc.ok)
		}
	}
}

func findMetric(mf map[string]*dto.MetricFamily, name string, labels map[string]string) *dto.Metric {
	f := mf[name]
	if f == nil {
		return nil
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range labels {
			if have[k] != v {
				continue next
			}
		}
		return m
	}
	return nil
}

func counter(mf map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	if m := findMetric(mf, name, labels); m != nil {
		return m.GetCounter().GetValue()
	}
	return 0
}

func gauge(mf map[string]*dto.MetricFamily, name string) float64 {
	if m := findMetric(mf, name, nil); m != nil {
		return m.GetGauge().GetValue()
	}
	return 0
}

func histCount(mf map[string]*dto.MetricFamily, name string, labels map[string]string) uint64 {
	if m := findMetric(mf, name, labels); m != nil {
		return m.GetHistogram().GetSampleCount()
	}
	return 0
}

// scrapeMetrics reads a's /metrics.
func scrapeMetrics(t *testing.T, a *agent.Agent) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(a.AdminHandler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return mf
}

// A Sign refused for the tenant's in-flight limit is an answered request:
// sigil_requests_total counts it with every other answer, so an error-rate
// SLO sees overload.
func TestTenantCapacityRefusalIsCounted(t *testing.T) {
	r, h, held, d := tenantAtItsLimit(t)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err := r.dial(t).Sign(ctx, client.ByName("default"), client.Algorithm{}, d[:])
	cancel()
	h.release()
	if client.Code(err) != proto.DeadlineExceeded {
		t.Fatalf("a Sign past the tenant's limit: %v, want DEADLINE_EXCEEDED", err)
	}
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	// The client's own deadline may end its call a moment before the
	// agent answers (and counts) the refusal: wait for the count.
	var got float64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		mf := scrapeMetrics(t, r.agent)
		if got = counter(mf, "sigil_requests_total", map[string]string{"op": "Sign", "code": "DEADLINE_EXCEEDED"}); got != 0 {
			break
		}
	}
	if got != 1 {
		t.Errorf("sigil_requests_total{op=Sign,code=DEADLINE_EXCEEDED} = %v, want 1", got)
	}
}

// An operator action's record is a journal append like a signature's, and
// sigil_journal_records_total counts it.
func TestJournalEventsAreCounted(t *testing.T) {
	_, _, r, admin := heldAgent(t)
	records := func() float64 {
		return counter(scrapeMetrics(t, r.agent), "sigil_journal_records_total", map[string]string{"result": "ok"})
	}
	before := records()
	if _, err := admin.Pause(context.Background(), "payments/release"); err != nil {
		t.Fatal(err)
	}
	if got := records(); got != before+1 {
		t.Fatalf("sigil_journal_records_total{result=ok}: %v before a pause, %v after, want one more", before, got)
	}
}

func TestMetricsTenantAndPolicyDenials(t *testing.T) {
	s := startTenancy(t)
	c := s.running.dial(t)
	d := sha256.Sum256([]byte("x"))
	if _, err := c.Sign(context.Background(), client.ByName("release"), client.Algorithm{}, d[:]); err != nil {
		t.Fatal(err)
	}
	d384 := sha512.Sum384([]byte("x"))
	if _, err := c.Sign(context.Background(), client.ByName("release"), client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA384}, d384[:]); client.Code(err) != proto.UnsupportedAlgorithm {
		t.Fatalf("sign outside the slot's algorithms: %v", err)
	}
	mf := scrapeMetrics(t, s.running.agent)
	ok := map[string]string{"op": "Sign", "code": "OK", "tenant": "payments", "provider": "soft"}
	if got := counter(mf, "sigil_requests_total", ok); got != 1 {
		t.Errorf("payments Sign OK = %v, want 1", got)
	}
	denied := map[string]string{"op": "Sign", "code": "UNSUPPORTED_ALGORITHM", "tenant": "payments", "provider": "soft"}
	if got := counter(mf, "sigil_requests_total", denied); got != 1 {
		t.Errorf("payments Sign UNSUPPORTED_ALGORITHM = %v, want 1", got)
	}
	if got := counter(mf, "sigil_policy_denials_total", map[string]string{"reason": "UNSUPPORTED_ALGORITHM"}); got != 1 {
		t.Errorf("policy denials = %v, want 1", got)
	}
	if got := counter(mf, "sigil_policy_denials_total", map[string]string{"reason": "PAUSED"}); got != 0 {
		t.Errorf("paused denials = %v, want 0", got)
	}
}

// The PKCS#11 session pool shows in /metrics, and a repair behind the
// pool's back (all sessions closed) counts as one.
func TestPoolMetrics(t *testing.T) {
	tok := softhsmtest.New(t, "metrics")
	tok.Around = func(fn func()) {
		if err := pkcs11.PauseModule(tok.Module, fn); err != nil {
			t.Error(err)
		}
	}
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	r := startAgent(t, hsmConfig(t, tok, keys))
	c := r.dial(t)
	d := sha256.Sum256([]byte("pool"))
	if _, err := c.Sign(context.Background(), client.ByName("hsm-ecdsa-p256"), client.Algorithm{}, d[:]); err != nil {
		t.Fatal(err)
	}
	tok.CloseAllSessions(t)
	if _, err := c.Sign(context.Background(), client.ByName("hsm-ecdsa-p256"), client.Algorithm{}, d[:]); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(r.agent.AdminHandler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if m := findMetric(mf, "sigil_pool_sessions", map[string]string{"provider": "hsm", "state": "open"}); m == nil || m.GetGauge().GetValue() < 1 {
		t.Fatalf("no open sessions reported: %v", m)
	}
	if got := counter(mf, "sigil_provider_repairs_total", map[string]string{"provider": "hsm"}); got < 1 {
		t.Fatalf("repairs = %v after sessions were closed behind the pool's back", got)
	}
}

// Go's profiler is served only when admin_http.pprof asks for it.
func TestAdminHTTPPprofIsOptIn(t *testing.T) {
	for _, on := range []bool{false, true} {
		cfg := softwareConfig(t)
		cfg.AdminHTTP.Pprof = on
		r := startAgent(t, cfg)
		rec := httptest.NewRecorder()
		r.agent.AdminHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/debug/pprof/", nil))
		if got, want := rec.Code == http.StatusOK, on; got != want {
			t.Errorf("pprof %v: /debug/pprof/ answered %d", on, rec.Code)
		}
	}
}
