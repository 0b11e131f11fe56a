package agent_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/sigil-agent/sigil/client"
)

// BenchmarkSignOverSocket is a whole signature through the Unix socket with
// software keys, one client connection per parallel goroutine.
func BenchmarkSignOverSocket(b *testing.B) {
	for _, key := range []string{"ed", "default"} {
		for _, conns := range []int{1, 8} {
			b.Run(fmt.Sprintf("%s/conns=%d", key, conns), func(b *testing.B) {
				r := startAgent(b, softwareConfig(b))
				clients := make([]*client.Client, conns)
				for i := range clients {
					clients[i] = r.dial(b)
				}
				d := sha256.Sum256([]byte("bench"))
				var next atomic.Int64
				b.SetParallelism((conns + 1) / 2) // GOMAXPROCS=2 here: conns goroutines
				b.ReportAllocs()
				b.RunParallel(func(pb *testing.PB) {
					c := clients[int(next.Add(1)-1)%conns]
					for pb.Next() {
						if _, err := c.Sign(context.Background(), client.ByName(key), client.Algorithm{}, d[:]); err != nil {
							b.Fatal(err)
						}
					}
				})
			})
		}
	}
}
