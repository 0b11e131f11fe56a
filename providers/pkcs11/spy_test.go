package pkcs11

import (
	"crypto"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// TestOneCSignPerSignature counts the module calls a signature makes, with
// OpenSC's pkcs11-spy (a logging PKCS#11 module) between the provider and
// SoftHSM: C_SignInit and exactly one C_Sign, where miekg's Ctx.Sign makes
// two (a length query, then the signature).
func TestOneCSignPerSignature(t *testing.T) {
	var spy string
	for _, p := range []string{"/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so", "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so", "/usr/lib/pkcs11/pkcs11-spy.so"} {
		if _, err := os.Stat(p); err == nil {
			spy = p
			break
		}
	}
	if spy == "" {
		t.Skip("pkcs11-spy (opensc) not installed")
	}
	tok := softhsmtest.New(t, "spy")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256, providers.KeyRSA2048, providers.KeyEd25519)
	logFile := filepath.Join(t.TempDir(), "spy.log")
	t.Setenv("PKCS11SPY", tok.Module)
	t.Setenv("PKCS11SPY_OUTPUT", logFile)
	p := open(t, tok, keyConfigs(keys), func(c *Config) { c.Module = spy; c.Sessions = 1 })

	cases := []struct {
		key providers.KeyType
		alg providers.Algorithm
	}{
		{providers.KeyECDSAP256, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}},
		{providers.KeyRSA2048, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}},
		{providers.KeyRSA2048, providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA384}},
		{providers.KeyEd25519, providers.Algorithm{Scheme: providers.SchemeEd25519}},
	}
	for _, tc := range cases {
		t.Run(tc.alg.String(), func(t *testing.T) {
			before := spyCalls(t, logFile)
			const n = 5
			for i := 0; i < n; i++ {
				signAndVerify(t, p, string(tc.key), tc.alg, []byte("spy"))
			}
			after := spyCalls(t, logFile)
			if got := after["C_Sign"] - before["C_Sign"]; got != n {
				t.Errorf("%d C_Sign calls for %d signatures", got, n)
			}
			if got := after["C_SignInit"] - before["C_SignInit"]; got != n {
				t.Errorf("%d C_SignInit calls for %d signatures", got, n)
			}
			for call, c := range after {
				if call != "C_Sign" && call != "C_SignInit" && c != before[call] {
					t.Errorf("%s called %d times during signing", call, c-before[call])
				}
			}
		})
	}
}

// spyCalls counts the calls in a pkcs11-spy log ("n: C_Name" lines).
func spyCalls(t *testing.T, path string) map[string]int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	calls := map[string]int{}
	for _, line := range strings.Split(string(b), "\n") {
		if _, name, ok := strings.Cut(line, ": C_"); ok && !strings.Contains(name, " ") {
			calls["C_"+strings.TrimSpace(name)]++
		}
	}
	return calls
}
