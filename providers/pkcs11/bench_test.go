package pkcs11

import (
	"context"
	"crypto"
	"fmt"
	"testing"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// The parallel benchmarks run 4 goroutines per core (8 on the 2-core
// machines of ANCHORS.md, matching its g=8 figures).
const benchParallelism = 4

func benchProvider(b *testing.B, kt providers.KeyType, sessions int) (*Provider, string) {
	b.Helper()
	tok := softhsmtest.New(b, "bench")
	keys := tok.GenerateKeys(b, kt)
	p := open(b, tok, keyConfigs(keys), func(c *Config) { c.Sessions = sessions })
	return p, string(kt)
}

// BenchmarkSignECDSAP256 is the provider's hot path: pool, C_SignInit and one
// C_Sign through the shim, raw r‖s to DER.
func BenchmarkSignECDSAP256(b *testing.B) {
	p, name := benchProvider(b, providers.KeyECDSAP256, 0)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	digest := digestOf(crypto.SHA256, []byte("bench"))
	ctx := context.Background()
	b.Run("g=1", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := p.Sign(ctx, name, alg, digest); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(benchParallelism)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := p.Sign(ctx, name, alg, digest); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkMiekgSignECDSAP256 is the floor to compare with: a plain miekg
// SignInit + Sign loop (which makes C_SignInit, C_Sign for the length and
// C_Sign) on a session of its own per goroutine, no pool, no recovery.
func BenchmarkMiekgSignECDSAP256(b *testing.B) {
	p, name := benchProvider(b, providers.KeyECDSAP256, 0)
	digest := digestOf(crypto.SHA256, []byte("bench"))
	k, _ := p.keys.Get(name)
	key := k.handle.Load().obj
	c := p.mod.ctx
	mech := []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}
	openSession := func(b *testing.B) p11.SessionHandle {
		s, err := c.OpenSession(uint(p.slot.Load()), p11.CKF_SERIAL_SESSION)
		if err != nil {
			b.Fatal(err)
		}
		return s
	}
	signLoop := func(s p11.SessionHandle, next func() bool) error {
		for next() {
			if err := c.SignInit(s, mech, key); err != nil {
				return err
			}
			if _, err := c.Sign(s, digest); err != nil {
				return err
			}
		}
		return nil
	}
	b.Run("g=1", func(b *testing.B) {
		s := openSession(b)
		defer c.CloseSession(s)
		b.ReportAllocs()
		if err := signLoop(s, b.Loop); err != nil {
			b.Fatal(err)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(benchParallelism)
		b.RunParallel(func(pb *testing.PB) {
			s := openSession(b)
			defer c.CloseSession(s)
			if err := signLoop(s, pb.Next); err != nil {
				b.Error(err)
			}
		})
	})
}

// BenchmarkSign covers the other mechanisms at g=1.
func BenchmarkSign(b *testing.B) {
	cases := []struct {
		kt  providers.KeyType
		alg providers.Algorithm
	}{
		{providers.KeyECDSAP384, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}},
		{providers.KeyRSA2048, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}},
		{providers.KeyRSA2048, providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}},
		{providers.KeyEd25519, providers.Algorithm{Scheme: providers.SchemeEd25519}},
	}
	tok := softhsmtest.New(b, "bench")
	keys := tok.GenerateKeys(b, providers.KeyECDSAP384, providers.KeyRSA2048, providers.KeyEd25519)
	p := open(b, tok, keyConfigs(keys), nil)
	ctx := context.Background()
	for _, tc := range cases {
		digest := digestOf(tc.alg.Hash, []byte("bench"))
		b.Run(tc.alg.String(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := p.Sign(ctx, string(tc.kt), tc.alg, digest); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkPoolSize measures ECDSA P-256 throughput with 8 goroutines against
// pool sizes; DefaultSessions comes from it.
func BenchmarkPoolSize(b *testing.B) {
	tok := softhsmtest.New(b, "bench")
	keys := tok.GenerateKeys(b, providers.KeyECDSAP256)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	digest := digestOf(crypto.SHA256, []byte("bench"))
	for _, n := range []int{1, 2, 4, 8} {
		b.Run(fmt.Sprintf("sessions=%d", n), func(b *testing.B) {
			p := open(b, tok, keyConfigs(keys), func(c *Config) { c.Sessions = n })
			defer p.Close()
			b.SetParallelism(benchParallelism)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := p.Sign(context.Background(), string(providers.KeyECDSAP256), alg, digest); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
