// Package policy decides, inline on the signing path, whether a peer may sign
// with a key slot. It loads tenants, their key slots and each slot's signing
// policy from YAML, validates them with errors that name file, line and
// field, hashes them (BLAKE3 of a canonical form), and enforces them at run
// time with an Engine whose allow path takes no lock and allocates nothing.
//
// # Model
//
// A tenant is who is asking. The agent authenticates a peer (SO_PEERCRED on
// the Unix socket, the verified client certificate on mTLS TCP) into an
// Identity, and Set.TenantOf maps it to at most one tenant: a Unix peer by uid,
// else by gid; an mTLS peer by its exact name (URI SAN, else subject CN), else
// by a URI prefix written "spiffe://example.org/payments/*". Loading refuses a
// uid, gid or mTLS name (or overlapping prefix) listed under two tenants. The
// admin role (Set.IsAdmin) is a separate list and may overlap tenants.
//
// A key slot is a tenant-scoped name, "payments/release", backed by an agent
// key (one version for now; the file format already takes a `versions` list).
// A tenant sees its own slots only: Set.Slot and Engine.Check answer another
// tenant's slot exactly as a slot that does not exist.
//
// A slot's policy lists the allowed algorithms (the digest length must match
// the hash), a token-bucket rate, a daily quota (UTC days), UTC time windows,
// the allowed client identities within the tenant, and a paused flag. The file
// format, every field and its default are documented in docs/policy.md.
//
// # Files
//
// Load reads one file, or every *.yaml and *.yml file of a directory in name
// order (one tenant per file by convention; admins lists are merged). Unknown
// fields, repeated fields, bad values and cross-entry conflicts are all
// reported, each as a *FieldError, joined with errors.Join. Validate and
// HashFile are the functions behind `sigil policy validate` and `sigil policy
// hash`.
//
// # Canonical form and hash
//
// Set.Hash is BLAKE3-256 over Set.Canonical, a compact JSON document built
// from the parsed set, not from the text, so comments, key order, quoting,
// whitespace, anchors and the split into files do not change it, while any
// change of meaning does. Exactly:
//
//   - Encoding: UTF-8 JSON without insignificant whitespace, as Go's
//     encoding/json writes it with HTML escaping off: strings escape only
//     '"', '\\', control characters, U+2028 and U+2029; integers in decimal;
//     per_second in the shortest decimal that round-trips a float64.
//   - Document: {"format":"sigil-policy/1","admins":IDS,"tenants":[TENANT…]}
//     with keys in exactly this order, here and below.
//   - IDS: {"unix_uids":[…],"unix_gids":[…],"mtls":[…]}, each sorted
//     ascending (numbers numerically, strings bytewise) and without
//     duplicates; empty lists are [] (never null). Prefixes keep their "/*".
//   - TENANT: {"name":…,"identities":IDS,"slots":[SLOT…]}; tenants sorted by
//     name, slots sorted by name.
//   - SLOT: {"name":…,"versions":[{"version":N,"key":…}…],"policy":POLICY};
//     versions sorted by number; a file's `key: K` is [{"version":1,"key":K}].
//   - POLICY: {"algorithms":[…],"rate":R,"daily_quota":Q,"windows":W,
//     "clients":C,"paused":bool}. algorithms: the allowed names, deduplicated,
//     in the fixed order of AlgorithmNames (absent in the file: all of them).
//     rate: null, or {"per_second":F,"burst":N} with the default burst filled.
//     daily_quota: null or the number. windows: null (always), or the allowed
//     minutes merged into maximal runs, each "Ddd HH:MM-Ddd HH:MM" (end
//     exclusive, end day always written, a run across Sunday midnight kept
//     whole), sorted by start minute, Monday 00:00 first; windows covering the
//     whole week are null. clients: null (any identity of the tenant) or the
//     entries as "uid:N", "gid:N", "mtls:NAME", deduplicated, sorted bytewise.
//
// Fields added to the format later appear in the canonical form only when
// they differ from their default, so an unchanged file keeps its hash across
// upgrades; "format" changes only if this definition changes incompatibly.
//
// Each tenant also has its own hash, Tenant.Hash: BLAKE3-256 over
// {"format":"sigil-policy/1","tenant":TENANT}. That is the policy hash a
// Decision carries, for the signature reply and the audit record, so a tenant
// never observes changes to other tenants' policies.
//
// # Run-time state
//
// An Engine holds, per slot, the token bucket (GCRA in one atomic word), the
// daily count (day and count in one atomic word; it resets at 00:00 UTC) and
// a run-time paused flag. This state lives in memory: a restart refills
// every bucket and zeroes every count. The agent stores run-time pauses and
// the day's counts in its journal and puts them back at start
// (agent/pause.go, agent/quota.go: Engine.DailyCounts and
// Engine.RestoreDailyCount). Engine.Swap puts a reloaded set in force with
// one atomic pointer store; slots that survive (same tenant and slot name)
// keep their state. A slot is paused if its file says paused: true or an
// admin paused it at run time; Resume lifts only the run-time pause.
package policy
