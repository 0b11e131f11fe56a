package rotation

import (
	"testing"

	"github.com/sigil-agent/sigil/providers"
)

// The agent calls Resolve once per signature and VersionForVerify once per
// Verify: both read the snapshot without a lock and must not allocate.
func BenchmarkResolve(b *testing.B) {
	e := newEnv(b, providers.KeyEd25519)
	e.rotate()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.store.Resolve(testSlot); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkVersionForVerify(b *testing.B) {
	e := newEnv(b, providers.KeyEd25519)
	e.rotate()
	sl, _ := e.store.Get(testSlot)
	kid, now := sl.Versions[0].KID, e.clock.Now() // the accepted version: the T1 check runs
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.store.VersionForVerify(testSlot, kid, now); err != nil {
				b.Fatal(err)
			}
		}
	})
}
