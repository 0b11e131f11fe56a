package journal

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

func TestAppendConcurrentVerifyRestart(t *testing.T) {
	cases := []struct {
		mode       Durability
		goroutines int
		perG       int
	}{
		{WAL, 1, 300},
		{WAL, 8, 150},
		{Fsync, 1, 30},
		{Fsync, 8, 40},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/g%d", tc.mode, tc.goroutines), func(t *testing.T) {
			dir := t.TempDir()
			j := openTest(t, dir, tc.mode)
			var wg sync.WaitGroup
			seqs := make([][]uint64, tc.goroutines)
			for g := 0; g < tc.goroutines; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					tenant := fmt.Sprintf("tenant-%d", g)
					for i := 0; i < tc.perG; i++ {
						r := signRecord(tenant, i)
						if err := j.Append(context.Background(), r); err != nil {
							t.Errorf("Append: %v", err)
							return
						}
						if r.Seq == 0 || r.Hash == ([32]byte{}) {
							t.Errorf("Append did not fill seq/hash: %+v", r)
						}
						seqs[g] = append(seqs[g], r.Seq)
					}
				}()
			}
			wg.Wait()
			n := uint64(tc.goroutines * tc.perG)
			if seq, _ := j.Head(); seq != n {
				t.Fatalf("head seq %d, want %d", seq, n)
			}
			// Each goroutine's records got increasing seqs: the chain order
			// is the order in which Append returned to each caller.
			for g, s := range seqs {
				for i := 1; i < len(s); i++ {
					if s[i] <= s[i-1] {
						t.Fatalf("goroutine %d: seq %d after %d", g, s[i], s[i-1])
					}
				}
			}
			rep := mustVerify(t, j, n)
			_, head := j.Head()
			if rep.HeadHash != head {
				t.Fatalf("verify head hash %x, journal head %x", rep.HeadHash, head)
			}

			// Scan returns seq order with intact links and the fields we wrote.
			var prev [32]byte
			next := uint64(1)
			perTenant := map[string]int{}
			err := j.Scan(context.Background(), Filter{}, func(r *Record) error {
				if r.Seq != next || r.PrevHash != prev {
					return fmt.Errorf("record %d: seq %d prev %x, want seq %d prev %x", next, r.Seq, r.PrevHash[:4], next, prev[:4])
				}
				want := signRecord(r.Tenant, perTenant[r.Tenant])
				perTenant[r.Tenant]++
				if r.DigestHash != want.DigestHash || r.KID != want.KID || r.Op != "sign" || r.Peer != "uid:1000" {
					return fmt.Errorf("record %d fields differ: %+v", r.Seq, r)
				}
				prev, next = r.Hash, next+1
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}

			// Restart: the chain continues where it stopped.
			if err := j.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			j2 := openTest(t, dir, tc.mode)
			if seq, h := j2.Head(); seq != n || h != head {
				t.Fatalf("after restart head %d %x, want %d %x", seq, h[:4], n, head[:4])
			}
			appendN(t, j2, "after-restart", 5)
			mustVerify(t, j2, n+5)
			last, err := j2.Last(context.Background(), 1, "")
			if err != nil {
				t.Fatal(err)
			}
			if len(last) != 1 || last[0].Seq != n+5 {
				t.Fatalf("Last(1) = %+v", last)
			}
		})
	}
}

func TestVerifyFindsTampering(t *testing.T) {
	const n = 20
	cases := []struct {
		name    string
		tamper  func(t *testing.T, j *Journal)
		seq     uint64
		reason  BreakReason
		records uint64
	}{
		{
			name: "edited tenant byte",
			tamper: func(t *testing.T, j *Journal) {
				v := rawGet(t, j, auditKey(7))
				v[recordFixedLen+2] ^= 0x01 // first byte of the tenant
				rawSet(t, j, auditKey(7), v)
			},
			seq: 7, reason: BreakHashMismatch, records: n,
		},
		{
			name: "edited code and re-hashed",
			tamper: func(t *testing.T, j *Journal) {
				var r Record
				if err := decodeRecord(rawGet(t, j, auditKey(7)), &r); err != nil {
					t.Fatal(err)
				}
				r.Code, r.CodeName = 7, "PERMISSION_DENIED"
				rawSet(t, j, auditKey(7), r.encode()) // a consistent record 7 ...
			},
			seq: 8, reason: BreakPrevMismatch, records: n, // ... no longer matches record 8's link
		},
		{
			name:   "deleted middle record",
			tamper: func(t *testing.T, j *Journal) { rawDelete(t, j, auditKey(11)) },
			seq:    11, reason: BreakGap, records: n - 1,
		},
		{
			name:   "deleted first record",
			tamper: func(t *testing.T, j *Journal) { rawDelete(t, j, auditKey(1)) },
			seq:    1, reason: BreakGap, records: n - 1,
		},
		{
			name:   "deleted last record",
			tamper: func(t *testing.T, j *Journal) { rawDelete(t, j, auditKey(n)) },
			seq:    n, reason: BreakHeadMismatch, records: n - 1,
		},
		{
			name: "history rewritten from seq 3 on",
			tamper: func(t *testing.T, j *Journal) {
				// Every link recomputed: only the checkpoint disagrees.
				rewriteHistoryFrom3(t, j, n)
			},
			seq: n, reason: BreakHeadMismatch, records: n,
		},
		{
			name:   "garbage value",
			tamper: func(t *testing.T, j *Journal) { rawSet(t, j, auditKey(3), []byte("not a record")) },
			seq:    3, reason: BreakUndecodable, records: n,
		},
		{
			name: "unknown format version",
			tamper: func(t *testing.T, j *Journal) {
				v := rawGet(t, j, auditKey(5))
				v[0] = 9
				rawSet(t, j, auditKey(5), v)
			},
			seq: 5, reason: BreakUndecodable, records: n,
		},
		{
			name: "record moved to another seq",
			tamper: func(t *testing.T, j *Journal) {
				rawSet(t, j, auditKey(4), rawGet(t, j, auditKey(6)))
			},
			seq: 4, reason: BreakUndecodable, records: n,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			j := openTest(t, dir, WAL)
			appendN(t, j, "acme", n)
			mustVerify(t, j, n)
			// Tampering happens while the agent is stopped; its clean
			// shutdown left a checkpoint at seq n.
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			j = openTest(t, dir, WAL)
			tc.tamper(t, j)
			rep := expectBreak(t, j, tc.seq, tc.reason)
			if rep.Records != tc.records {
				t.Fatalf("records %d, want %d", rep.Records, tc.records)
			}
		})
	}
}

// After the last record is deleted, a restart continues from the head
// entry, so the next append does not paper over the missing seq.
func TestRestartAfterTruncationKeepsEvidence(t *testing.T) {
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	appendN(t, j, "acme", 5)
	rawDelete(t, j, auditKey(5))
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openTest(t, dir, WAL)
	appendN(t, j, "acme", 1)
	rep, err := j.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Break.Seq != 5 || rep.Break.Reason != BreakGap {
		t.Fatalf("want a gap at 5, got %+v", rep.Break)
	}
}

// The journal stores the digest's hash, never the digest: no byte string
// of the digest appears in any file of the store or in the export. The
// tenant, which is stored, is the control that the search would see it.
func TestNoRawDigestStored(t *testing.T) {
	for _, mode := range []Durability{WAL, Fsync} {
		t.Run(mode.String(), func(t *testing.T) {
			dir := t.TempDir()
			j := openTest(t, dir, mode)
			digest := []byte("RAW-DIGEST-MARKER-7b1f0c2e9d4a6b8c") // stands in for the 32 digest bytes
			tenant := "TENANT-CONTROL-MARKER-51c3"
			r := signRecord(tenant, 0)
			r.DigestHash = HashDigest(digest)
			if err := j.Append(context.Background(), r); err != nil {
				t.Fatal(err)
			}
			var jsonl bytes.Buffer
			if err := j.WriteJSONL(context.Background(), &jsonl, Filter{}); err != nil {
				t.Fatal(err)
			}
			var values bytes.Buffer
			if err := j.Scan(context.Background(), Filter{}, func(r *Record) error {
				b, _ := r.MarshalJSON()
				values.Write(b)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			files := map[string][]byte{"export": jsonl.Bytes(), "scan": values.Bytes()}
			err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return err
				}
				b, err := os.ReadFile(path)
				files[path] = b
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			controlSeen := false
			for name, b := range files {
				if bytes.Contains(b, digest) || bytes.Contains(b, []byte(hex.EncodeToString(digest))) {
					t.Errorf("%s contains the raw digest", name)
				}
				controlSeen = controlSeen || bytes.Contains(b, []byte(tenant))
			}
			if !controlSeen {
				t.Fatal("control marker not found: the search cannot see stored bytes")
			}
		})
	}
}

func TestWriteJSONL(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	j := openTest(t, t.TempDir(), WAL, func(o *Options) { o.Clock = fixedClock(t0) })
	for i := 0; i < 10; i++ {
		tenant := "acme"
		if i%2 == 1 {
			tenant = "globex"
		}
		if err := j.Append(context.Background(), signRecord(tenant, i)); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name   string
		filter Filter
		seqs   []uint64
	}{
		{"all", Filter{}, []uint64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}},
		{"tenant", Filter{Tenant: "globex"}, []uint64{2, 4, 6, 8, 10}},
		{"since", Filter{Since: t0.Add(8 * time.Millisecond)}, []uint64{8, 9, 10}},
		{"tenant and since", Filter{Tenant: "acme", Since: t0.Add(6 * time.Millisecond)}, []uint64{7, 9}},
		{"from seq", Filter{FromSeq: 9}, []uint64{9, 10}},
		{"nobody", Filter{Tenant: "initech"}, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := j.WriteJSONL(context.Background(), &buf, tc.filter); err != nil {
				t.Fatal(err)
			}
			var got []uint64
			sc := bufio.NewScanner(&buf)
			for sc.Scan() {
				var m map[string]any
				if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
					t.Fatalf("line %q: %v", sc.Text(), err)
				}
				for _, k := range []string{"digest_hash", "policy_hash", "prev_hash", "hash"} {
					s, _ := m[k].(string)
					if b, err := hex.DecodeString(s); err != nil || len(b) != 32 {
						t.Fatalf("%s = %q, want 64 hex digits", k, s)
					}
				}
				ts, err := time.Parse(time.RFC3339Nano, m["time"].(string))
				if err != nil || ts.Before(tc.filter.Since) {
					t.Fatalf("time %v: %v", m["time"], err)
				}
				if tc.filter.Tenant != "" && m["tenant"] != tc.filter.Tenant {
					t.Fatalf("tenant %v", m["tenant"])
				}
				got = append(got, uint64(m["seq"].(float64)))
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.seqs) {
				t.Fatalf("seqs %v, want %v", got, tc.seqs)
			}
		})
	}
}

func TestLast(t *testing.T) {
	j := openTest(t, t.TempDir(), WAL)
	for i := 0; i < 12; i++ {
		tenant := []string{"acme", "globex", "initech"}[i%3]
		if err := j.Append(context.Background(), signRecord(tenant, i)); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		n      int
		tenant string
		seqs   []uint64
	}{
		{3, "", []uint64{10, 11, 12}},
		{2, "globex", []uint64{8, 11}},
		{100, "initech", []uint64{3, 6, 9, 12}},
		{0, "", nil},
		{5, "nobody", nil},
	}
	for _, tc := range cases {
		got, err := j.Last(context.Background(), tc.n, tc.tenant)
		if err != nil {
			t.Fatal(err)
		}
		var seqs []uint64
		for _, r := range got {
			seqs = append(seqs, r.Seq)
		}
		if fmt.Sprint(seqs) != fmt.Sprint(tc.seqs) {
			t.Errorf("Last(%d, %q) = %v, want %v", tc.n, tc.tenant, seqs, tc.seqs)
		}
	}
	// A tenant with no records walks the whole journal back: the caller's
	// context ends the walk.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if got, err := j.Last(ctx, 5, "nobody"); !errors.Is(err, context.Canceled) {
		t.Errorf("Last with a cancelled context = %v, %v; want context.Canceled", got, err)
	}
}

func TestStateNamespace(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	j := openTest(t, dir, Fsync)
	steps := []struct {
		op    string
		key   string
		value string
	}{
		{"put", "rotation/acme/release", "v2 active"},
		{"put", "rotation/acme/build", "v1 active"},
		{"put", "calendar/acme/release", "P90D"},
		{"put", "rotation/acme/release", "v3 active"},
		{"delete", "rotation/acme/build", ""},
		{"delete", "never/existed", ""},
	}
	for _, s := range steps {
		var err error
		if s.op == "put" {
			err = j.Put(ctx, s.key, []byte(s.value))
		} else {
			err = j.Delete(ctx, s.key)
		}
		if err != nil {
			t.Fatalf("%s %s: %v", s.op, s.key, err)
		}
	}
	// A rotation step and its audit record commit together.
	rec := &Record{Tenant: "acme", Slot: "acme/release", Version: 3, Op: "rotate", Detail: "cut over v2 to v3"}
	if err := j.AppendWithState(ctx, rec, StateChange{Key: "rotation/acme/release", Value: []byte("v3 active, v2 accepted")}); err != nil {
		t.Fatal(err)
	}
	if rec.Seq != 1 {
		t.Fatalf("rotation record seq %d, want 1 (state writes take no seq)", rec.Seq)
	}
	check := func(j *Journal) {
		t.Helper()
		v, err := j.Get("rotation/acme/release")
		if err != nil || string(v) != "v3 active, v2 accepted" {
			t.Fatalf("Get = %q, %v", v, err)
		}
		if _, err := j.Get("rotation/acme/build"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("deleted key: %v", err)
		}
		var keys []string
		if err := j.ScanState(ctx, "rotation/", func(k string, v []byte) error {
			keys = append(keys, k)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if fmt.Sprint(keys) != "[rotation/acme/release]" {
			t.Fatalf("ScanState keys %v", keys)
		}
		mustVerify(t, j, 1)
	}
	check(j)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	check(openTest(t, dir, Fsync))
}

func TestClosedJournal(t *testing.T) {
	j := openTest(t, t.TempDir(), WAL)
	appendN(t, j, "acme", 1)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	checks := map[string]error{
		"Append": j.Append(context.Background(), signRecord("acme", 1)),
		"Put":    j.Put(context.Background(), "k", nil),
		"Scan":   j.Scan(context.Background(), Filter{}, func(*Record) error { return nil }),
		"Close":  j.Close(),
	}
	for name, err := range checks {
		if !errors.Is(err, ErrClosed) || !errors.Is(err, ErrUnavailable) {
			t.Errorf("%s after Close: %v, want ErrClosed wrapping ErrUnavailable", name, err)
		}
	}
}

func TestAppendContextDone(t *testing.T) {
	j := openTest(t, t.TempDir(), WAL)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := j.Append(ctx, signRecord("acme", 0))
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.Canceled) {
		t.Fatalf("Append with a done context: %v", err)
	}
	if seq, _ := j.Head(); seq != 0 {
		t.Fatalf("head %d after a refused append", seq)
	}
}

// An Append whose context ends while its record waits for a commit
// returns ErrUnavailable (the caller releases nothing); the record may
// still be committed afterwards, in order, with an intact chain.
func TestAppendContextEndsWhileQueued(t *testing.T) {
	j := openTest(t, t.TempDir(), WAL)
	// Pretend a commit is in flight, so the next Append queues.
	j.mu.Lock()
	j.busy = true
	j.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	r := signRecord("acme", 0)
	err := j.Append(ctx, r)
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Append: %v, want ErrUnavailable and DeadlineExceeded", err)
	}
	if r.Seq != 0 {
		t.Fatalf("a refused Append filled seq %d", r.Seq)
	}
	// The "commit in flight" ends and hands the queue on.
	j.releaseCommit()
	appendN(t, j, "acme", 1)
	mustVerify(t, j, 2)
	last, err := j.Last(context.Background(), 2, "")
	if err != nil || len(last) != 2 || last[0].DigestHash != r.DigestHash {
		t.Fatalf("the abandoned record should be seq 1: %+v, %v", last, err)
	}
}

// Barrier returns once the commits queued before it are resolved, so a
// state write whose caller gave up is visible to a Get after it. A group
// the journal refuses (a full disk) still resolves it; only a context that
// ends first or a closed journal make it fail.
func TestBarrierWaitsForAbandonedCommits(t *testing.T) {
	fs := &spaceFS{FS: vfs.Default}
	fs.avail.Store(10 << 30)
	j := openTest(t, t.TempDir(), WAL, func(o *Options) { o.FS = fs })
	// Pretend a commit is in flight, so what comes next queues.
	j.mu.Lock()
	j.busy = true
	j.mu.Unlock()
	short := func() context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		t.Cleanup(cancel)
		return ctx
	}
	if err := j.Put(short(), "k", []byte("v")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Put: %v, want its context's end", err)
	}
	if err := j.Barrier(short()); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Barrier that cannot wait: %v, want its context's end", err)
	}
	done := make(chan error, 1)
	go func() { done <- j.Barrier(context.Background()) }()
	select {
	case err := <-done:
		t.Fatalf("Barrier returned %v with a commit before it pending", err)
	case <-time.After(20 * time.Millisecond):
	}
	j.releaseCommit() // the commit in flight ends and hands the queue on
	if err := <-done; err != nil {
		t.Fatalf("Barrier: %v", err)
	}
	if v, err := j.Get("k"); err != nil || string(v) != "v" {
		t.Fatalf("Get after the Barrier: %q %v, want the abandoned Put's value", v, err)
	}

	fs.avail.Store(1 << 20)
	time.Sleep(spaceCheckInterval + 10*time.Millisecond)
	if err := j.Put(context.Background(), "k", []byte("w")); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Put on a full disk: %v", err)
	}
	if err := j.Barrier(context.Background()); err != nil {
		t.Fatalf("Barrier on a full disk: %v, want nil (its group was refused, in its turn)", err)
	}
	_ = j.Close()
	if err := j.Barrier(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Barrier after Close: %v, want ErrClosed", err)
	}
}

func TestParseDurability(t *testing.T) {
	cases := []struct {
		in   string
		want Durability
		ok   bool
	}{
		{"wal", WAL, true}, {"", WAL, true}, {"FSYNC", Fsync, true}, {"sync", 0, false},
	}
	for _, tc := range cases {
		var d Durability
		err := d.UnmarshalText([]byte(tc.in))
		if (err == nil) != tc.ok || d != tc.want {
			t.Errorf("UnmarshalText(%q) = %v, %v", tc.in, d, err)
		}
	}
}
