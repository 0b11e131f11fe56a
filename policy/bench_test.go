package policy

import (
	"sync/atomic"
	"testing"
	"time"
)

// The allow path with every rule configured: clients, algorithms, windows,
// a daily quota and a rate limit. The fake clock advances 1µs per call, so the
// 1,000,000/s bucket refills exactly as fast as the benchmark drains it.
const benchPolicy = `
tenants:
  - name: payments
    identities:
      unix_uids: [1001]
      mtls: ["spiffe://example.org/payments/*"]
    slots:
      - name: release
        key: hsm-release
        policy:
          algorithms: [ecdsa-sha256, rsa-pss-sha256, ed25519]
          rate: {per_second: 1000000, burst: 1000000}
          daily_quota: 1000000000000
          windows: ["Mon-Sun 00:00-23:59"]
          clients: ["uid:1001", "spiffe://example.org/payments/ci"]
      - name: open
        key: hsm-open
`

func benchEngine(b *testing.B) (*Engine, *atomic.Int64) {
	set, err := Parse("bench.yaml", []byte(benchPolicy))
	if err != nil {
		b.Fatal(err)
	}
	var ns atomic.Int64
	ns.Store(monday.Add(time.Hour).UnixNano())
	clock := func() time.Time { return time.Unix(0, ns.Add(1000)) }
	return NewEngine(set, clock), &ns
}

func BenchmarkCheckAllow(b *testing.B) {
	for _, bc := range []struct {
		name string
		slot string
		id   Identity
	}{
		{"all-rules/unix", "release", UnixIdentity(1001, 1001)},
		{"all-rules/mtls", "release", MTLSIdentity("spiffe://example.org/payments/ci")},
		{"no-rules/unix", "open", UnixIdentity(1001, 1001)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			e, _ := benchEngine(b)
			b.ReportAllocs()
			for b.Loop() {
				if d := e.Check("payments", bc.slot, bc.id, es256, 32); d.Reason != OK {
					b.Fatalf("denied: %v", d.Reason)
				}
			}
		})
	}
}

// Many connections checking the same slot: the bucket and counter CAS loops
// contend on one cache line.
func BenchmarkCheckAllowParallel(b *testing.B) {
	e, _ := benchEngine(b)
	id := UnixIdentity(1001, 1001)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if d := e.Check("payments", "release", id, es256, 32); d.Reason != OK {
				b.Errorf("denied: %v", d.Reason)
				return
			}
		}
	})
}

func BenchmarkCheckDenyRateLimited(b *testing.B) {
	e, ns := benchEngine(b)
	id := UnixIdentity(1001, 1001)
	b.ReportAllocs()
	for b.Loop() {
		ns.Add(-1000) // freeze the clock: the bucket stays empty after the burst
		e.Check("payments", "release", id, es256, 32)
	}
}

func BenchmarkParse(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse("bench.yaml", []byte(benchPolicy)); err != nil {
			b.Fatal(err)
		}
	}
}

func TestCheckAllowDoesNotAllocate(t *testing.T) {
	if testing.Short() {
		t.Skip("allocation count")
	}
	set := mustParse(t, benchPolicy)
	var ns atomic.Int64
	ns.Store(monday.Add(time.Hour).UnixNano())
	e := NewEngine(set, func() time.Time { return time.Unix(0, ns.Add(1000)) })
	id := MTLSIdentity("spiffe://example.org/payments/ci")
	allocs := testing.AllocsPerRun(1000, func() {
		if d := e.Check("payments", "release", id, es256, 32); d.Reason != OK {
			t.Fatalf("denied: %v", d.Reason)
		}
	})
	if allocs != 0 {
		t.Errorf("Check allocates %v times per allowed request", allocs)
	}
}
