package agent_test

import (
	"context"
	"crypto/sha256"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
)

// BenchmarkTenantFairness is tenant B's signature latency while tenant A
// floods the same agent: A holds 32 connections with 8 pipelined RSA-2048
// signatures in flight on each (256 at once, enough to keep both cores
// busy for seconds), B signs Ed25519 one at a time. Reported: B's p50 and
// p99, and A's throughput, with limits.max_in_flight_per_tenant at its
// default (32), at 8, and switched off. Run:
//
//	go test -run '^$' -bench TenantFairness -benchtime 400x ./agent/
var floodConns, floodPipeline = 32, 8

func BenchmarkTenantFairness(b *testing.B) {
	for _, tc := range []struct {
		name  string
		limit int
	}{{"per-tenant-limit=8", 8}, {"per-tenant-limit=32", 32}, {"per-tenant-limit=off", 1 << 20}} {
		b.Run(tc.name, func(b *testing.B) {
			cfg := softwareConfig(b)
			cfg.Limits.MaxInFlightPerTenant = tc.limit
			cfg.Limits.RequestTimeout = time.Minute
			s := startTLSAgentWith(b, cfg)
			tenantB, _ := s.ca.Issue(devcerts.Leaf{CommonName: "tenant-b"})
			cb, err := s.dial(b, tenantB)
			if err != nil {
				b.Fatal(err)
			}
			d := sha256.Sum256([]byte("fairness"))

			ctx, stop := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			var floodMu sync.Mutex
			flooded := 0
			for i := 0; i < floodConns; i++ {
				c := s.running.dial(b)
				for g := 0; g < floodPipeline; g++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						n := 0
						for ctx.Err() == nil {
							if _, err := c.Sign(ctx, client.ByName("rsa"), client.Algorithm{}, d[:]); err == nil {
								n++
							}
						}
						floodMu.Lock()
						flooded += n
						floodMu.Unlock()
					}()
				}
			}
			time.Sleep(300 * time.Millisecond) // the flood's queues fill

			lat := make([]time.Duration, 0, b.N)
			start := time.Now()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if _, err := cb.Sign(context.Background(), client.ByName("ed"), client.Algorithm{}, d[:]); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
			b.StopTimer()
			elapsed := time.Since(start)
			stop()
			wg.Wait()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "B-p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "B-p99-µs")
			b.ReportMetric(float64(flooded)/elapsed.Seconds(), "A-sigs/s")
		})
	}
}
