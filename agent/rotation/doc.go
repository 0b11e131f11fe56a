// Package rotation keeps the key versions of Sigil's key slots and changes
// them: rotation (new key, CSR, cut-over, canaries, evidence), rollback,
// retirement, a calendar scheduler and incident drills. It persists its
// state in the agent's journal (package journal) and never imports the
// agent: the agent imports it and plugs in its providers and policy engine.
//
// # Versions and states
//
// A slot ("tenant/slot") has versions v1..vN, numbered in creation order and
// never reused. Each is a provider key with its kid and public key, in one
// of three states:
//
//   - active: signs. Exactly one version of a slot is active at all times.
//   - accepted: no longer signs; its signatures verify until its T1
//     (exclusive). From T1 on it counts as retired whether or not RetireDue
//     has recorded that yet (Version.StateAt).
//   - retired: neither signs nor verifies (KEY_RETIRED).
//
// A rotation makes the new version active and the old one accepted with
// T1 = cut-over + overlap (default 24h). Rollback makes the previous
// version (the highest-numbered one below the active one that did not fail
// its rotation) active again and the current one accepted with a fresh
// T1; it is refused with ErrKeyRetired once that previous version is
// retired or past its T1. An emergency rotation (incident drill) sets the
// old version's T1 to the cut-over, so it stops verifying at once, and
// after the canaries have verified retires it and every older version
// still accepted.
//
// # The hot path
//
// Store.Resolve (per signature) and Store.VersionForVerify (per
// verification) read an immutable snapshot behind an atomic pointer: no
// lock, no allocation (about 4 and 10 ns on the 2-core development VM,
// BenchmarkResolve, BenchmarkVersionForVerify). Every mutation builds a new
// snapshot and swaps it in after its journal commit is confirmed.
//
// # Persistence and crash consistency
//
// Each slot's state is one JSON value under "rot/<tenant>/<slot>" in the
// journal's state namespace; REPs are under "rotrep/…" and incident
// statements under "rotdrill/…". Every state change is committed together
// with its audit record in one journal.AppendWithState, so after a crash
// the record and the state are both there or neither is: a rotation
// interrupted before its cut-over record leaves the old version active,
// one interrupted after it leaves the new version active (and its canary
// and evidence steps unfinished: the journal shows which). Never neither,
// never two (TestCrashAfterEachStep). OpenStore validates every slot on
// load (exactly one active version, kids match their keys) and refuses to
// start on a corrupted state rather than guess which key signs.
//
// State commits run detached from the caller's context with their own
// deadline: a revert after a cancelled rotation must still be written, and
// an abandoned commit would leave the outcome unknown. If a commit is not
// confirmed it may still have landed (journal doc.go, "Failures"): a failed
// fsync after the write, or a commit that timed out in the queue and went
// through later. So the store puts a journal.Barrier through, after which
// that commit has landed or never will, and reads the slot back. A cut-over
// found there is reverted as after any failed step, a rollback found there
// is reported as done, and an evidence pack found there completes the
// rotation (TestEvidenceCommitNotConfirmedButLanded). A slot that cannot be
// read back, or whose
// revert the journal did not confirm, does not sign (Resolve returns
// ErrStateUnknown or ErrNotReverted) until the store has read it back and
// committed the revert; the slot's next mutation and every scheduler round
// try (TestCutoverCommitNotConfirmed, TestCutoverOutcomeUnknownFailsClosed,
// TestRollbackCommitNotConfirmed).
//
// # A rotation's steps
//
// Rotator.Rotate runs start, keygen, csr, cutover, canary, retire
// (emergency only) and evidence, journaling each (ops "rotate.start",
// "rotate.keygen", "rotate.csr", "rotate", "canary", "retire",
// "rotate.rep"). The CSR is made with x509.CreateCertificateRequest through
// a crypto.Signer over the provider (CryptoSigner) and its signature is
// checked: the pre-flight proof that the new key signs and is the key whose
// public half was recorded. The canaries are signed with the key the slot
// resolves to after the cut-over, as the signing path would, and each is
// verified against the new public key with providers.Verify. A failed step
// journals "rotate.failed" with the step and the cause and returns a
// *StepError; when the cut-over had happened the failure record reverts it
// in the same commit (old version active again, the new one retired and
// marked failed). Every attempt gets a fresh key name ("…/v2", "…/v2-a2",
// …): the attempt counter is committed with the start record, so a retry
// never collides with a key that a failed or crashed attempt left in the
// provider (the failure record names that key, for cleaning up).
//
// # Rotation Evidence Packs
//
// Each successful rotation produces a manifest (Manifest, format
// "sigil-rep/1") in canonical JSON (CanonicalJSON: sorted keys, no white
// space; RFC 8785 for this content), signed with the agent's Ed25519
// evidence key (a raw 64-byte detached signature), stored in the journal,
// written as <dir>/<tenant>/<slot>/rep-<n>.json, .sig and .md, and quoted
// by its BLAKE3 in the "rotate.rep" record. The manifest carries every
// canary signature, so VerifyREP re-derives the payloads (CanaryPayload)
// and re-verifies them, the CSR and the kids offline, besides the
// signature. n is the new version's number (a failed rotation's number has
// no pack).
//
// # Scheduling and drills
//
// A Scheduler rotates slots on their Calendar (a period counted from the
// active version's activation, explicit dates, and one-off times set with
// RotateAt and kept in the slot's state) and calls RetireDue. Each of its
// rotations has a deadline of its own (SchedulerOptions.Timeout), as the
// agent gives an operator's: a hung provider fails the rotation rather than
// holding the slot and every later round. Tick does one round at the
// injected clock; Run loops on a timer. Rotator.Drill pauses
// the slot through a Pauser (the agent's, over its policy engine), rotates in emergency
// mode, resumes, and renders an incident statement from the journal
// records of the drill. A failed drill leaves the slot paused.
//
// docs/rotation.md is the operator's view: configuration, commands, the
// REP format.
package rotation
