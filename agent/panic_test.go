package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

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
}

// panicSecret stands for data a panic's value may carry; it must reach
// neither the client nor the log.
const panicSecret = "secret-in-the-panic-value"

func (p *panickyProvider) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if key == p.key {
		panic(fmt.Errorf("provider bug holding %s", panicSecret))
	}
	return p.Provider.Sign(ctx, key, alg, digest)
}

func (p *panickyProvider) Remote() bool { return p.remote }

// A provider that panics in Sign fails that request with INTERNAL and a
// journaled refusal, and the agent goes on serving: the same connection
// and another one sign with another provider's key and with the same
// provider's other key. Local providers sign on the connection's reader,
// remote ones on the worker pool: both are covered.
func TestProviderPanicInSignFailsTheRequestOnly(t *testing.T) {
	for _, tc := range []struct {
		name   string
		remote bool
	}{
		{"local provider, on the reader", false},
		{"remote provider, on a worker", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
			soft, err := software.Open(software.Config{ID: "panicky", DataDir: t.TempDir(), Keys: []software.KeyConfig{
				{Name: "boom", Type: providers.KeyECDSAP256}, {Name: "calm", Type: providers.KeyECDSAP256}}})
			if err != nil {
				t.Fatal(err)
			}
			r, logs := startAgentObserved(t, cfg, agent.WithProviders(&panickyProvider{Provider: soft, key: "boom", remote: tc.remote}))
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
	ln, err := net.Listen("tcp", cfg.AdminHTTP.Listen)
	if err != nil {
		t.Fatal(err)
	}
	httpDone := make(chan error, 1)
	go func() { httpDone <- r.agent.ServeAdminHTTP(ln) }()
	t.Cleanup(func() {
		r.agent.Shutdown(context.Background())
		if err := <-httpDone; !errors.Is(err, agent.ErrClosed) {
			t.Errorf("ServeAdminHTTP returned %v", err)
		}
	})
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + ln.Addr().String() + path)
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
