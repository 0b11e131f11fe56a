package journal

import (
	"context"
	"encoding/binary"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/cockroachdb/pebble/v2"
)

// Run: go test -run '^$' -bench . -benchtime 2s ./agent/journal/
//
// Besides ns/op and allocs/op each benchmark reports:
//   - cpu-ns/op: user+system CPU of the whole process (Pebble's WAL
//     goroutine included) per record. With 2 cores, wall ns/op at g=8 can
//     be below cpu-ns/op; CPU is what a signing agent pays per signature.
//   - recs/commit: records per Pebble commit (the committer's grouping).
//   - recs/sync: records per WAL fsync (fsync mode; group commit).

func cpuNanos() int64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// runAppenders runs op b.N times over g goroutines and reports CPU per op.
func runAppenders(b *testing.B, g int, op func(r *Record) error) {
	tmpl := *signRecord("acme", 1)
	b.ReportAllocs()
	cpu0 := cpuNanos()
	b.ResetTimer()
	// One Record per goroutine, refilled each time: the benchmark itself
	// allocates nothing per op, so allocs/op is the journal's.
	if g == 1 {
		r := new(Record)
		for i := 0; i < b.N; i++ {
			*r = tmpl
			if err := op(r); err != nil {
				b.Fatal(err)
			}
		}
	} else {
		b.SetParallelism((g + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
		b.RunParallel(func(pb *testing.PB) {
			r := new(Record)
			for pb.Next() {
				*r = tmpl
				if err := op(r); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuNanos()-cpu0)/float64(b.N), "cpu-ns/op")
}

func reportGrouping(b *testing.B, records, commits, syncs uint64) {
	if commits > 0 {
		b.ReportMetric(float64(records)/float64(commits), "recs/commit")
	}
	if syncs > 0 {
		b.ReportMetric(float64(records)/float64(syncs), "recs/sync")
	}
}

// BenchmarkAppend is the chosen design: an Append commits inline when
// nobody is committing, else the committer goroutine chains and commits
// everything pending as one group (commit.go, "Who commits"); in `wal` mode
// the groups reach Pebble in one batch per Options.ApplyDelay.
func BenchmarkAppend(b *testing.B) {
	for _, mode := range []Durability{WAL, Fsync} {
		for _, g := range []int{1, 8, 64} {
			b.Run(fmt.Sprintf("%s/g%d", mode, g), func(b *testing.B) {
				j := openTest(b, b.TempDir(), mode)
				before := j.Stats()
				ctx := context.Background()
				runAppenders(b, g, func(r *Record) error { return j.Append(ctx, r) })
				after := j.Stats()
				reportGrouping(b, after.Records-before.Records, after.Commits-before.Commits, after.WALSyncs-before.WALSyncs)
			})
		}
	}
}

// BenchmarkAppendMutexPerRecord is the alternative measured against it: a
// chain mutex held across encoding and one Pebble commit per record (same
// FS and sync semantics, no checkpoint entries). Holding the mutex across the commit is what
// keeps the chain order equal to the commit order and the head confirmed;
// it also means no two records ever share a commit or a sync.
func BenchmarkAppendMutexPerRecord(b *testing.B) {
	for _, mode := range []Durability{WAL, Fsync} {
		for _, g := range []int{1, 8} {
			b.Run(fmt.Sprintf("%s/g%d", mode, g), func(b *testing.B) {
				j := openTest(b, b.TempDir(), mode)
				db := j.db // the committer stays idle: this benchmark writes directly
				var (
					mu    sync.Mutex
					seq   uint64
					prev  [32]byte
					batch = db.NewBatch()
					key   [auditKeyLen]byte
				)
				copy(key[:], auditPrefix)
				syncs0 := j.fs.walSyncs.Load()
				runAppenders(b, g, func(r *Record) error {
					mu.Lock()
					defer mu.Unlock()
					r.Seq, r.PrevHash = seq+1, prev
					putRecord(batch, &key, r)
					if err := db.Apply(batch, pebble.Sync); err != nil {
						return err
					}
					batch.Reset()
					seq, prev = r.Seq, r.Hash
					return nil
				})
				reportGrouping(b, seq, seq, j.fs.walSyncs.Load()-syncs0)
			})
		}
	}
}

// BenchmarkPebbleSyncCommit checks the claim that Pebble's commit pipeline
// groups concurrent pebble.Sync commits into shared fsyncs: g goroutines
// each commit their own one-key batch with Sync, no journal in between.
func BenchmarkPebbleSyncCommit(b *testing.B) {
	for _, g := range []int{1, 8} {
		b.Run(fmt.Sprintf("g%d", g), func(b *testing.B) {
			j := openTest(b, b.TempDir(), Fsync)
			db := j.db
			var n atomic.Uint64
			value := make([]byte, 300) // about one record
			syncs0 := j.fs.walSyncs.Load()
			runAppenders(b, g, func(*Record) error {
				var key [10]byte
				copy(key[:], "x/")
				binary.BigEndian.PutUint64(key[2:], n.Add(1))
				batch := db.NewBatch()
				_ = batch.Set(key[:], value, nil)
				err := db.Apply(batch, pebble.Sync)
				_ = batch.Close()
				return err
			})
			reportGrouping(b, n.Load(), n.Load(), j.fs.walSyncs.Load()-syncs0)
		})
	}
}

// BenchmarkEncodeRecord is the CPU floor of one record: encoding plus the
// BLAKE3 chain hash.
func BenchmarkEncodeRecord(b *testing.B) {
	r := *signRecord("acme", 1)
	buf := make([]byte, r.encodedLen())
	b.ReportAllocs()
	b.SetBytes(int64(len(buf)))
	for i := 0; i < b.N; i++ {
		r.encodeInto(buf)
	}
}
