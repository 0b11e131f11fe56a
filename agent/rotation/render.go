package rotation

import (
	"bytes"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/sigil-agent/sigil/agent/journal"
)

// RenderREPStatement renders the human-readable statement of a pack from
// its manifest. The statement is a reading aid; the signed manifest is the
// evidence.
func RenderREPStatement(m *Manifest) []byte {
	var b bytes.Buffer
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	kind := "Rotation"
	if m.Emergency {
		kind = "Emergency rotation"
	}
	p("# %s statement: %s v%d → v%d\n\n", kind, md(m.Slot), m.Old.Version, m.New.Version)
	p("Tenant **%s**, key slot **%s**: version %d was replaced by version %d at %s (reason: %s).",
		md(m.Tenant), md(m.Slot), m.Old.Version, m.New.Version, ts(m.CutoverAt), md(m.Reason))
	if m.Host != "" {
		p(" Agent: %s.", md(m.Host))
	}
	p("\n\nThis statement is rendered from the signed manifest `rep-%d.json` (format %s). The manifest and its\n", m.Number, md(m.Format))
	p("signature `rep-%d.sig` are the evidence; verify them as shown at the end.\n\n", m.Number)

	p("## Keys\n\n| | old (v%d) | new (v%d) |\n|---|---|---|\n", m.Old.Version, m.New.Version)
	row := func(name, a, c string) { p("| %s | %s | %s |\n", name, a, c) }
	row("kid", code(m.Old.KID), code(m.New.KID))
	row("provider", md(m.Old.Provider), md(m.New.Provider))
	row("key", md(m.Old.Key), md(m.New.Key))
	if m.Old.URI != "" || m.New.URI != "" {
		row("uri", md(m.Old.URI), md(m.New.URI))
	}
	row("key type", md(m.Old.KeyType), md(m.New.KeyType))
	row("state after the rotation", stateText(m.Old), stateText(m.New))

	p("\n## Timeline (UTC)\n\n| step | time |\n|---|---|\n")
	p("| started | %s |\n| cut over (new version signs) | %s |\n", ts(m.StartedAt), ts(m.CutoverAt))
	if !m.Old.T1.IsZero() {
		p("| old version verifies until (T1) | %s |\n", ts(m.Old.T1))
	}
	p("| completed | %s |\n", ts(m.CompletedAt))
	p("\nOverlap: %s.\n", md(m.Overlap))

	p("\n## Checks\n\n")
	p("- **CSR** for `%s`, signed by the new key; its self-signature verifies with the new public key.\n", mdCode(m.CSR.Subject))
	p("- **Canaries**: %d payloads (%s) signed with the key the slot resolved to after the cut-over (kid `%s`), algorithm %s: **%d of %d verified** against the new public key. BLAKE3 of the signatures: `%s`.\n",
		m.Canary.Count, md(m.Canary.Scheme), m.Canary.SigningKID, md(m.Canary.Algorithm), m.Canary.Verified, m.Canary.Count, m.Canary.SignaturesHash)
	p("- **Policy hash**: `%s`.\n", m.PolicyHash)
	if m.Attestation.Offered {
		p("- **Device attestation**: offered, format %s (%d base64 characters in the manifest).\n", md(m.Attestation.Format), len(m.Attestation.Data))
	} else {
		p("- **Device attestation**: %s.\n", md(m.Attestation.Note))
	}

	p("\n## Audit chain\n\n")
	p("The rotation's journal records are seq %d to %d (records of other slots may lie between). Record %d has hash `%s`; the journal head was seq %d, hash `%s`. The pack's own record (`rotate.rep`, quoting the manifest's BLAKE3) follows. `sigil audit verify` recomputes the chain.\n",
		m.Audit.FirstSeq, m.Audit.LastSeq, m.Audit.LastSeq, m.Audit.LastHash, m.Audit.HeadSeq, m.Audit.HeadHash)

	p("\n## Verify\n\nSigned by evidence key `%s`. In this file's directory (the evidence directory's `TENANT/SLOT`), with the evidence public key at the evidence directory's top (`evidence-key.pub.pem`; the agent also writes it as `DATA_DIR/evidence.pub`):\n\n```sh\n", m.EvidenceKey)
	p("sigil rep verify rep-%d.json --evidence-key ../../evidence-key.pub.pem\n", m.Number)
	p("openssl pkeyutl -verify -pubin -inkey ../../evidence-key.pub.pem -rawin -in rep-%d.json -sigfile rep-%d.sig\n```\n", m.Number, m.Number)
	p("\n`sigil rep verify` also re-verifies the CSR and every canary signature; openssl checks the signature only.\n")
	return b.Bytes()
}

func stateText(k KeyEvidence) string {
	switch State(k.State) {
	case StateActive:
		return "active (signs) since " + ts(k.Activated)
	case StateAccepted:
		return "accepted (verifies only) until " + ts(k.T1)
	}
	return md(k.State)
}

// ts shows t as the manifest's JSON does (RFC 3339 with the fraction it
// has): cut to seconds, a statement would disagree with what it restates.
func ts(t time.Time) string {
	if t.IsZero() {
		return "–"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// md makes text safe in a Markdown table cell or line.
func md(s string) string {
	r := strings.NewReplacer("|", `\|`, "\n", " ", "\r", " ", "*", `\*`, "_", `\_`, "`", "'", "<", "&lt;", "[", `\[`)
	return r.Replace(s)
}

// mdCode makes text safe inside a single-backtick code span.
func mdCode(s string) string {
	return strings.NewReplacer("`", "'", "\n", " ", "|", `\|`).Replace(s)
}

func code(s string) string {
	if s == "" {
		return "–"
	}
	return "`" + mdCode(s) + "`"
}

// incident is what an incident statement is rendered from.
type incident struct {
	slot           string
	started, ended time.Time
	firstSeq       uint64
	records        []journal.Record // the slot's records from the drill's first seq
	result         *Result
	err            error
	resumed        bool
	wasPaused      bool
	// pausedMeanwhile: paused again during the drill, so not resumed.
	pausedMeanwhile bool
	evidenceKeyID   string
}

// renderIncident renders the incident statement of a drill from the
// journal records of the drill.
func renderIncident(in *incident) []byte {
	var b bytes.Buffer
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	outcome := "completed"
	if in.err != nil {
		outcome = "FAILED"
	}
	p("# Incident drill statement: %s\n\n", md(in.slot))
	p("Drill %s. Started %s, ended %s (UTC). Rendered from the audit journal, records from seq %d on.\n\n",
		outcome, ts(in.started), ts(in.ended), in.firstSeq)
	p("## Outcome\n\n")
	if in.err != nil {
		p("- **Failed**: %s\n", md(in.err.Error()))
		if !in.resumed && !in.wasPaused && !in.pausedMeanwhile {
			p("- The slot was left **paused** (signing refused with `PAUSED`): resume it with `sigil admin resume %s` once the situation is understood.\n", mdCode(in.slot))
		}
	}
	if r := in.result; r != nil {
		p("- Emergency rotation v%d → v%d: new kid `%s`, old kid `%s` retired at once.\n", r.Old.Number, r.New.Number, r.New.KID, r.Old.KID)
		p("- Rotation Evidence Pack `rep-%d` (evidence key `%s`).\n", r.REP, in.evidenceKeyID)
	}
	if in.resumed {
		p("- The slot was resumed.\n")
	}
	if in.wasPaused {
		p("- The slot was paused before the drill and stays **paused**: the drill neither paused nor resumed it.\n")
	}
	if in.pausedMeanwhile {
		p("- The slot was paused again during the drill and stays **paused**: the drill did not lift that pause.\n")
	}

	// Signing decisions on the slot during the drill, by code.
	codes := map[string]int{}
	for _, r := range in.records {
		if r.Op == "sign" {
			codes[r.CodeName]++
		}
	}
	if len(codes) > 0 {
		names := make([]string, 0, len(codes))
		for c := range codes {
			names = append(names, c)
		}
		sort.Strings(names)
		p("- Signing requests for the slot during the drill:")
		for i, c := range names {
			sep := ","
			if i == len(names)-1 {
				sep = "."
			}
			p(" %d `%s`%s", codes[c], md(c), sep)
		}
		p("\n")
	}

	p("\n## Timeline\n\n| seq | time (UTC) | step | version | kid | result | detail |\n|---|---|---|---|---|---|---|\n")
	for _, r := range in.records {
		if r.Op == "sign" {
			continue
		}
		p("| %d | %s | %s | v%d | %s | %s | %s |\n", r.Seq, r.Time.UTC().Format("2006-01-02T15:04:05.000Z"),
			md(r.Op), r.Version, code(short(r.KID)), md(r.CodeName), md(r.Detail))
	}
	if n := len(in.records); n > 0 {
		last := in.records[n-1]
		p("\nThe last record above is seq %d, hash `%x`. The drill's closing record (`drill.done`) quotes this statement's BLAKE3. `sigil audit verify` recomputes the chain.\n", last.Seq, last.Hash)
	}
	return b.Bytes()
}

func short(kid string) string {
	if len(kid) > 12 {
		return kid[:12] + "…"
	}
	return kid
}
