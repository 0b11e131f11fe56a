// Package journal is the agent's hash-chained audit journal and durable
// state store, on Pebble (github.com/cockroachdb/pebble/v2).
//
// Every signing decision, allowed or denied, becomes one Record: time,
// tenant, slot and version, kid, algorithm, the BLAKE3 hash of the digest
// (never the digest), policy hash, result code, latency and the peer that
// asked; rotation steps and other events use the same Record with Op and
// Detail. Append returns only once the record is durable (see
// "Durability"), so the agent releases a signature only after its record is
// in the journal, and refuses to sign (JOURNAL_UNAVAILABLE) when Append
// returns an error wrapping ErrUnavailable.
//
// # The chain
//
// Records are numbered 1, 2, 3... (Seq) and each carries the Hash of the
// record before it (PrevHash); its own Hash is BLAKE3-256 over its
// canonical encoding, which covers every field including Seq and PrevHash.
// Verify recomputes every hash and link and reports the first break: an
// edited record (hash mismatch), a replaced one (prev mismatch), a deleted
// one (gap), bytes that are not a record (undecodable), or a chain that
// disagrees with the head checkpoint (records cut from the end, or history
// rewritten up to the checkpoint). Head returns the last confirmed seq and
// hash, which Rotation Evidence Packs quote to anchor the chain outside the
// host.
//
// The encoding (record.go) is a fixed binary layout with a leading format
// version byte: big-endian integers, 32-byte hashes, strings as a 2-byte
// length and bytes. It is hand-written rather than msgpack because the hash
// must be over one canonical byte string that an independent verifier can
// rebuild from a page of documentation (TestRecordGolden pins it, checked
// against a Python re-implementation and b3sum), and a generic encoder's
// choices (integer widths, map order, future library behaviour) would be
// part of the audit format without being written down. It also encodes
// straight into the Pebble batch with no allocation (about 260 ns including
// the hash).
//
// # Key layout
//
// One Pebble database, three namespaces:
//
//	a/<seq: 8 bytes big-endian>  a run of audit records: the record seq,
//	                             or it and the records after it, their
//	                             encodings concatenated
//	m/head                       chain-head checkpoint: version byte 1,
//	                             seq (8 bytes BE), hash (32 bytes)
//	m/format                     the journal's format: one byte (1)
//	s/<key>                      agent state (rotation state, calendars,
//	                             REPs): Put, Get, Delete, ScanState
//
// A record's encoding says where it ends (its strings carry their
// lengths), so a run needs no framing, and a value of one record, as every
// value was before runs, is a run of one. The applier stores what it
// applies at once as runs of up to 64 records (commit.go, maxRun); waited
// commits and tail replay store a record per key, and a prune that ends
// inside a run stores the rest of it as a run of its own.
// Readers find record seq in the last run stored under a seq not above it.
// Runs make Pebble's per-key work (memtable inserts, flush and compaction)
// once per run rather than once per record.
//
// # Formats
//
// A writable Open stores the journal's format under m/format (journal.go,
// journalFormat), and every Open refuses a directory whose format is
// newer than the build's (ErrNewerFormat) before it reads or replays
// anything: an older build rolled back onto a journal a newer one wrote
// stops, saying so, instead of misreading it. Format 1 is the layout
// above. A directory without the entry was written by an agent from
// before it, whose layouts (a record per key, then runs) format 1 reads as
// they are. Agents from before runs do not read runs: rolled back onto a
// journal of format 1 they report undecodable records, and they predate
// the entry, so nothing stops them (docs/audit.md, "Upgrades and
// rollbacks"). A change that an older build would misread raises the
// format.
//
// Audit keys only grow, so sstables of audit keys never overlap and move
// down the LSM without rewrites; Options.Experimental.SpanPolicyFunc cuts
// every flush and compaction output at the edges of "a/", so the few m/
// and s/ keys never share an sstable with audit keys (sharing one made
// every level rewrite all audit data: +0.5 µs of CPU per record).
//
// The m/head checkpoint is written with a commit at most every 100 ms and
// on Close. Close also copies it into the head file journal.head beside
// Pebble's files (journal.go, headFileName): Pebble replays a damaged WAL
// up to the damage and drops the rest, m/head included, without an error,
// and the copy outside the WAL shows that cut. Writing it with every commit would cost about 0.9 µs per
// record. Open continues the chain from the last record, or from the
// checkpoint if records after it are missing, so new records do not reuse
// the seqs of deleted ones.
//
// State writes go through the same committer as records, with the same
// durability, and AppendWithState commits a record and state changes
// atomically (a rotation step and its audit record are both there after a
// crash, or neither is).
//
// # Durability
//
// Two modes (Options.Durability, config names "wal" and "fsync"):
//
//   - WAL (default): Append returns after the commit group was copied
//     into the tail log's shared mapping (the kernel's page cache; written
//     with write(2) when the journal is not on the OS filesystem), without
//     fsync. Pebble gets the group within Options.ApplyDelay (2 ms), in
//     one commit with the groups around it (commit.go, "Deferred apply"),
//     and its WAL writer writes it moments later; readers see it at once.
//     The record survives a killed or crashed agent (the kernel has it),
//     not a power cut or kernel crash; Pebble's memtable flushes (every
//     ~16 MiB of records) and Close fsync what came before.
//   - Fsync: Append returns after Pebble's WAL was written and fsynced;
//     survives a power cut on a disk that honours flushes.
//
// Neither of Pebble's write options gives the WAL mode cheaply. With
// pebble.NoSync a commit returns once the batch is in the WAL writer's
// in-process 32 KiB buffer, which the writer goroutine writes to the file
// when it next runs: measured with TestKilledProcessKeepsConfirmedRecords,
// a SIGKILL lost 37 to 78 records whose Append had returned. With
// pebble.Sync over a filesystem whose WAL sync is a no-op (vfs.go, still
// what Fsync mode and every waited commit use) the commit waits for the
// WAL writer goroutine, two hand-offs that cost more than the rest of the
// record. So WAL mode writes each group to a tail log of its own first and
// gives it to Pebble later, with NoSync (tail.go).
//
// # Group commit
//
// One goroutine commits at a time. An Append that finds nobody committing
// commits its own record inline; Appends that arrive meanwhile queue, and
// the committer goroutine commits each queue as one Pebble batch with one
// WAL write and, in Fsync mode, one fsync. Records per fsync equal the
// appends waiting when a commit starts: with g closed-loop appenders about
// g/2 (two cohorts alternate, one syncing while the other gathers; Pebble's
// own pipeline, measured without the journal, groups the same), under the
// agent's open-loop load arrival rate times fsync time.
//
// BenchmarkAppend gives, per record: wall time, the whole process's CPU
// (Pebble's WAL writer, flushes and compactions included), records per
// commit and, in Fsync mode, records per fsync. Figures for this machine
// are in docs/BENCHMARKS.md; the alternative it is measured against, a
// chain mutex held across one waited Pebble commit per record, costs
// about 9 µs of CPU per record in WAL mode against 1.9 µs (it waits for
// Pebble's WAL writer every time; session 10's run) and never shares an
// fsync (1.0 records/fsync at g=8, against 4 for the committer). Encoding
// plus hashing a record alone is about 0.5 µs (BenchmarkEncodeRecord).
//
// # Failures
//
// What Pebble v2.1.7 does when a WAL write or sync fails: the commit calls
// Logger.Fatalf("pebble: fatal commit error"); that DB keeps the error and
// never accepts another write, and its memtable holds the failed batch.
// The journal's Pebble logger panics in Fatalf (Pebble requires it not to
// return: it would report the failed commit as a success) and the
// committer recovers that panic, so:
//
//   - the Appends of that commit get ErrUnavailable, and the chain head
//     does not move: it only advances when Pebble confirms a commit;
//   - the journal closes that DB (Close returns the error; it does not
//     hang) and reopens Pebble from disk at once, and then at most every
//     RecoveryInterval while the fault lasts; Appends meanwhile fail at
//     once. Before reopening it probes the directory (create, write, sync
//     a scratch file), because a pebble.Open that fails late (creating its
//     new WAL) leaves a compaction running that crashes the process;
//   - the reopened DB replays whatever reached the WAL file. A record is
//     never half there (a batch is one WAL record, CRC-checked). If the
//     write reached the file but the fsync failed, the failed commit's
//     records are there although their callers were refused; the journal
//     then appends a "journal.recovered" record naming that seq range. No
//     signature was released for them.
//
// Disk full is refused before Pebble sees it: below Options.MinFreeBytes
// (64 MiB) of free space Append fails with ErrUnavailable ("journal full")
// and succeeds again once there is room. That matters because some write
// faults cannot be survived in-process, by Pebble's design:
//
//   - a fault while Pebble rotates to a new WAL (when a memtable fills)
//     panics inside Pebble with its mutex released; the Go runtime aborts
//     the process ("fatal error: sync: unlock of unlocked mutex") and no
//     recover can catch it (TestFaultDuringWALRotationAbortsProcess);
//   - a failed MANIFEST write (after a flush or compaction) calls Fatalf on
//     a background goroutine, and the panic ends the process.
//
// In both cases the process dies like a SIGKILL: every record whose Append
// returned is in the journal, and the restarted agent continues the chain
// (tested). A supervisor (systemd) restarts it.
//
// A failed write to Pebble's WAL in WAL mode comes after the appends it
// carried were confirmed, and they are in the tail log. Pebble keeps that
// error to itself and would panic on a later commit holding its commit
// lock, so walFS notes the failure and the next commit takes Pebble out
// of service instead (TestPebbleWALFailureAfterTheTailWasWritten); the
// reopen replays the tail.
//
// Records are deleted only from the start of the chain, by Prune, which
// keeps an anchor so that the rest still verifies (prune.go).
package journal
