package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// panickyProvider panics in Sign for one key, as a provider with a bug (or
// a library under it) does: a nil dereference, an index out of range.
type panickyProvider struct {
	providers.Provider
	key    string
	remote bool
	aside  bool // Sign runs on a goroutine of its own, as Azure's does (providers.CallAside)
}

// panicSecret stands for data a panic's value may carry; it must reach
// neither the client nor the log.
const panicSecret = "secret-in-the-panic-value"

func (p *panickyProvider) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	sign := func() ([]byte, error) {
		if key == p.key {
			panic(fmt.Errorf("provider bug holding %s", panicSecret))
		}
		return p.Provider.Sign(ctx, key, alg, digest)
	}
	if p.aside {
		return providers.CallAside(ctx, sign)
	}
	return sign()
}

func (p *panickyProvider) Remote() bool { return p.remote }

// A provider that panics in Sign fails that request with INTERNAL and a
// journaled refusal, and the agent goes on serving: the same connection
// and another one sign with another provider's key and with the same
// provider's other key. Local providers sign on the connection's reader,
// remote ones on the worker pool: both are covered.
func TestProviderPanicInSignFailsTheRequestOnly(t *testing.T) {
	for _, tc := range []struct {
		name          string
		remote, aside bool
	}{
		{"local provider, on the reader", false, false},
		{"remote provider, on a worker", true, false},
		{"remote provider, on a goroutine of its own", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
			soft, err := software.Open(software.Config{ID: "panicky", DataDir: t.TempDir(), Keys: []software.KeyConfig{
				{Name: "boom", Type: providers.KeyECDSAP256}, {Name: "calm", Type: providers.KeyECDSAP256}}})
			if err != nil {
				t.Fatal(err)
			}
			r, logs := startAgentObserved(t, cfg, agent.WithProviders(&panickyProvider{Provider: soft, key: "boom", remote: tc.remote, aside: tc.aside}))
			admin := r.serveAdmin(t, cfg.AdminSocket)
			c := r.dial(t)
			ctx := context.Background()
			d := sha256.Sum256([]byte("panic " + tc.name))

			_, err = c.Sign(ctx, client.ByName("boom"), client.Algorithm{}, d[:])
			if client.Code(err) != proto.Internal {
				t.Fatalf("sign with the panicking key: %v, want INTERNAL", err)
			}
			if strings.Contains(err.Error(), panicSecret) {
				t.Fatalf("the client was told the panic's value: %v", err)
			}

			// The refusal is journaled like any provider failure's.
			recs, err := admin.AuditTail(ctx, "", 0, 1)
			if err != nil || len(recs) != 1 {
				t.Fatalf("audit tail: %d records, %v", len(recs), err)
			}
			var rec struct {
				Op, KID  string
				CodeName string `json:"code_name"`
			}
			if err := json.Unmarshal(recs[0], &rec); err != nil {
				t.Fatal(err)
			}
			if rec.Op != "sign" || rec.CodeName != "INTERNAL" || rec.KID == "" {
				t.Fatalf("the panicking sign's record: %s", recs[0])
			}

			// The agent serves on: the same connection, a new one, another
			// provider's key and the panicking provider's other key.
			for _, cl := range []*client.Client{c, r.dial(t)} {
				for _, key := range []string{"default", "calm"} {
					s, err := cl.Sign(ctx, client.ByName(key), client.Algorithm{}, d[:])
					if err != nil {
						t.Fatalf("sign with %s after the panic: %v", key, err)
					}
					pk, err := cl.PublicKey(ctx, client.ByName(key))
					if err != nil {
						t.Fatal(err)
					}
					pub, err := x509.ParsePKIXPublicKey(pk.SPKI)
					if err != nil {
						t.Fatal(err)
					}
					if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d[:], s.Sig) {
						t.Fatalf("the signature by %s after the panic does not verify", key)
					}
				}
			}
			// A second request to the panicking key fails the same way.
			if _, err := c.Sign(ctx, client.ByName("boom"), client.Algorithm{}, d[:]); client.Code(err) != proto.Internal {
				t.Fatalf("second sign with the panicking key: %v, want INTERNAL", err)
			}

			// One error-level entry per panic names the provider, the key,
			// the panic's type and its stack; never the value's text or the
			// digest.
			var panics []string
			for _, e := range logs.All() {
				line := e.Message
				for _, f := range e.Context {
					line += fmt.Sprintf(" %s=%v%s", f.Key, f.String, f.Interface)
				}
				if strings.Contains(line, panicSecret) || strings.Contains(line, hex.EncodeToString(d[:])) {
					t.Errorf("the log has the panic's value or the digest: %s", line)
				}
				if e.Level == zapcore.ErrorLevel && strings.Contains(e.Message, "panicked") {
					fields := e.ContextMap()
					if fields["provider"] != "panicky" || fields["key"] != "boom" || fields["panic"] != "*errors.errorString" ||
						!strings.Contains(fmt.Sprint(fields["stack"]), "panickyProvider).Sign") {
						t.Errorf("the panic's log entry: %s %v", e.Message, fields)
					}
					panics = append(panics, e.Message)
				}
			}
			if len(panics) != 2 {
				t.Errorf("%d error-level panic entries for 2 panics: %q", len(panics), panics)
			}
		})
	}
}

// sickProvider is a panickyProvider with a health check that panics while
// sick is set (a PKCS#11 provider's Healthy reads its pool and its token).
type sickProvider struct {
	*panickyProvider
	sick atomic.Bool
}

func (p *sickProvider) Healthy() error {
	if p.sick.Load() {
		panic(panicSecret)
	}
	return nil
}

// A panicking Sign counts as an INTERNAL Sign of its provider in
// /metrics, and a health check that panics makes /readyz report the
// provider unavailable, as a failed one does, without its value.
func TestProviderPanicInMetricsAndReadiness(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.AdminHTTP.Listen = "127.0.0.1:0"
	soft, err := software.Open(software.Config{ID: "panicky", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "boom", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	sp := &sickProvider{panickyProvider: &panickyProvider{Provider: soft, key: "boom"}}
	r, logs := startAgentObserved(t, cfg, agent.WithProviders(sp))
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

	d := sha256.Sum256([]byte("metrics"))
	if _, err := r.dial(t).Sign(context.Background(), client.ByName("boom"), client.Algorithm{}, d[:]); client.Code(err) != proto.Internal {
		t.Fatalf("sign: %v, want INTERNAL", err)
	}
	_, body := get("/metrics")
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"op": "Sign", "code": "INTERNAL", "tenant": "", "provider": "panicky"}
	if got := counter(mf, "sigil_requests_total", labels); got != 1 {
		t.Errorf("INTERNAL Signs of the panicking provider: %v, want 1", got)
	}

	if code, body := get("/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz before the health check panics: %d %s", code, body)
	}
	sp.sick.Store(true)
	code, body := get("/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "provider panicky unavailable") || strings.Contains(body, panicSecret) {
		t.Errorf("/readyz with a panicking health check: %d %q", code, body)
	}
	sp.sick.Store(false)
	if code, body := get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz once the health check is back: %d %s", code, body)
	}
	for _, e := range logs.All() {
		for _, f := range e.Context {
			if strings.Contains(f.String+fmt.Sprint(f.Interface), panicSecret) {
				t.Errorf("the log has the panic's value: %s %v", e.Message, e.ContextMap())
			}
		}
	}
	if n := logs.FilterMessageSnippet("panicked").FilterField(zap.String("op", "health check")).Len(); n != 1 {
		t.Errorf("%d log entries for the health check's panic, want 1", n)
	}
}

// panickyCloud is a cloud-style provider (it makes new versions of a key,
// as GCP and Azure do) whose NewVersion panics.
type panickyCloud struct{ *software.Provider }

func (p panickyCloud) NewVersion(context.Context, string, string) (providers.KeyInfo, error) {
	panic(panicSecret)
}
func (p panickyCloud) URI(name string) (string, error) { return "cloud:" + name, nil }
func (p panickyCloud) AddKey(context.Context, string, string) (providers.KeyInfo, error) {
	return providers.KeyInfo{}, providers.ErrUnavailable
}

// A rotation whose provider panics making the new version fails that
// attempt, journaled (rotate.failed, INTERNAL), whether an operator or the
// scheduler asked, and the agent serves on: the slot signs with its key on
// the same connection and on a new one.
func TestProviderPanicInRotationFailsTheAttempt(t *testing.T) {
	cfg := smallRotationConfig(t)
	os.WriteFile(cfg.Policy, []byte(releasePolicy("fixed", "")), 0o600)
	soft, err := software.Open(software.Config{ID: "cloud", DataDir: t.TempDir(),
		Keys: []software.KeyConfig{{Name: "fixed", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	r, logs := startAgentObserved(t, cfg, agent.WithProviders(panickyCloud{soft}))
	admin := r.serveAdmin(t, cfg.AdminSocket)
	c := r.dial(t)
	ctx := context.Background()
	const slot = "payments/release"
	failures := func() []map[string]any { return auditOps(t, admin, "payments", "rotate.failed") }
	for _, tc := range []struct {
		name      string
		ask       func() error
		scheduled bool
	}{
		{"rotate", func() error { return admin.Rotate(ctx, slot) }, false},
		{"a one-off time", func() error {
			_, err := admin.ScheduleRotation(ctx, slot, time.Now().Add(2*time.Second))
			return err
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(failures())
			err := tc.ask()
			switch {
			case tc.scheduled && err != nil:
				t.Fatal(err)
			case !tc.scheduled && (client.Code(err) != proto.Internal || strings.Contains(err.Error(), panicSecret)):
				t.Fatalf("%v, want INTERNAL without the panic's value", err)
			}
			var got []map[string]any
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				if got = failures(); len(got) > before || time.Now().After(deadline) {
					break
				}
			}
			if len(got) != before+1 {
				t.Fatalf("%d rotate.failed records, want %d", len(got), before+1)
			}
			rec := got[len(got)-1]
			detail, _ := rec["detail"].(string)
			if rec["code_name"] != "INTERNAL" || !strings.Contains(detail, "step keygen failed") || !strings.Contains(detail, "panicked") ||
				strings.Contains(detail, panicSecret) || (rec["peer"] == "scheduler") != tc.scheduled {
				t.Fatalf("failure record %v", rec)
			}
			d := sha256.Sum256([]byte("after " + tc.name))
			for _, cl := range []*client.Client{c, r.dial(t)} {
				s, err := cl.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
				if err != nil {
					t.Fatalf("the slot after the failed rotation: %v", err)
				}
				pk, err := cl.PublicKey(ctx, client.ByKID(s.KID))
				if err != nil {
					t.Fatal(err)
				}
				pub, err := x509.ParsePKIXPublicKey(pk.SPKI)
				if err != nil {
					t.Fatal(err)
				}
				if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d[:], s.Sig) {
					t.Fatal("the slot's signature after the failed rotation does not verify")
				}
			}
		})
	}
	n := 0
	for _, e := range logs.All() {
		if strings.Contains(fmt.Sprint(e.Message, e.ContextMap()), panicSecret) {
			t.Errorf("the log has the panic's value: %s", e.Message)
		}
		if e.Level == zapcore.ErrorLevel && strings.Contains(e.Message, "panicked") && e.ContextMap()["op"] == "generate key" {
			n++
		}
	}
	if n != 2 {
		t.Errorf("%d error-level entries for the 2 panics", n)
	}
}
