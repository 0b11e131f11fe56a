package journal

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// maxExportLine bounds one line of an export: a record's eight strings at
// their limit, escaped, and the fixed fields.
const maxExportLine = 8*6*maxStringLen + 4096

// VerifyExport checks an export (WriteJSONL's lines, `sigil audit export`)
// on its own, with no journal: each line's hash over its fields, rebuilt
// in the record encoding; each line's prev_hash against the line before;
// and seqs with no gap. The first line's prev_hash is taken as given,
// since an export may start anywhere (--since, or after a prune). An
// export of one tenant (--tenant) has gaps by design and does not verify.
//
// What it proves is that the lines are an unedited piece of one chain. It
// cannot tell that chain from one rewritten whole, nor see lines cut from
// the end: compare HeadHash, or the hash at some seq, with a head kept
// elsewhere (an earlier export, a Rotation Evidence Pack). The error is for
// failures to read, not for breaks.
func VerifyExport(ctx context.Context, r io.Reader) (VerifyReport, error) {
	var rep VerifyReport
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxExportLine)
	var prev [32]byte
	breakAt := func(seq uint64, reason BreakReason, format string, args ...any) {
		if rep.Break == nil {
			rep.Break = &ChainBreak{Seq: seq, Reason: reason, Detail: fmt.Sprintf(format, args...)}
		}
	}
	for line := 1; sc.Scan(); line++ {
		if line%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return rep, err
			}
		}
		expected := rep.LastSeq + 1
		var rec Record
		if err := parseExportLine(sc.Bytes(), &rec); err != nil {
			breakAt(expected, BreakUndecodable, "line %d: %v", line, err)
			return rep, nil // a line that does not parse says nothing of the next
		}
		rep.Records++
		switch {
		case rep.Records == 1:
			rep.FirstSeq = rec.Seq
			prev = rec.PrevHash
		case rec.Seq != expected:
			breakAt(expected, BreakGap, "line %d: expected seq %d, found %d", line, expected, rec.Seq)
		}
		claimed := rec.Hash
		rec.encode() // sets rec.Hash to what the fields hash to
		switch {
		case rec.Hash != claimed:
			breakAt(rec.Seq, BreakHashMismatch, "line %d: hash %x, its fields hash to %x%s", line, claimed[:8], rec.Hash[:8], replacementNote(sc.Bytes()))
		case rec.PrevHash != prev:
			breakAt(rec.Seq, BreakPrevMismatch, "line %d: prev hash %x, the line before has hash %x", line, rec.PrevHash[:8], prev[:8])
		}
		rep.LastSeq, prev = rec.Seq, claimed
	}
	if err := sc.Err(); err != nil {
		return rep, fmt.Errorf("journal: read export: %w", err)
	}
	rep.HeadHash = prev
	return rep, nil
}

// parseExportLine is MarshalJSON's inverse, strictly: a field the export
// does not have, a field named twice or spelled otherwise than the export
// spells it, anything after the record on the line, or a hash that is not
// 32 bytes of hex, is an error.
func parseExportLine(line []byte, r *Record) error {
	var js jsonRecord
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&js); err != nil {
		return fmt.Errorf("not an exported record: %w", err)
	}
	// More does not see a stray '}' or ']' after the object.
	if len(bytes.TrimSpace(line[dec.InputOffset():])) != 0 {
		return fmt.Errorf("not an exported record: more after it on the line")
	}
	if err := checkExportNames(line); err != nil {
		return fmt.Errorf("not an exported record: %w", err)
	}
	t, err := time.Parse(time.RFC3339Nano, js.Time)
	if err != nil {
		return fmt.Errorf("time: %w", err)
	}
	*r = Record{
		Seq: js.Seq, Time: t, Tenant: js.Tenant, Slot: js.Slot, Version: js.Version, KID: js.KID,
		Op: js.Op, Algorithm: js.Algorithm, Code: js.Code, CodeName: js.CodeName,
		LatencyMicros: js.LatencyMicros, Peer: js.Peer, Detail: js.Detail,
	}
	if err := r.validate(); err != nil {
		return err
	}
	for _, h := range []struct {
		name string
		hex  string
		to   *[32]byte
	}{
		{"digest_hash", js.DigestHash, &r.DigestHash}, {"policy_hash", js.PolicyHash, &r.PolicyHash},
		{"prev_hash", js.PrevHash, &r.PrevHash}, {"hash", js.Hash, &r.Hash},
	} {
		b, err := hex.DecodeString(h.hex)
		if err != nil || len(b) != 32 {
			return fmt.Errorf("%s is not 32 bytes of hex", h.name)
		}
		copy(h.to[:], b)
	}
	return nil
}

// exportNames are the export's field names (jsonRecord's), as
// MarshalJSON writes them.
var exportNames = [...]string{
	"seq", "time", "tenant", "slot", "version", "kid", "op", "alg", "digest_hash",
	"policy_hash", "code", "code_name", "latency_us", "peer", "detail", "prev_hash", "hash",
}

// checkExportNames refuses a line (one JSON object, which encoding/json
// has decoded) that names a field twice, or names one otherwise than
// exportNames spells it. encoding/json keeps a repeated name's last value
// and matches names in any case and with escapes, so a line could hash to
// its hash with one value while a reader that keeps the first value, or
// matches names exactly, reads another. It allocates nothing.
func checkExportNames(line []byte) error {
	var seen uint32
	depth := 0
	for i := 0; i < len(line); i++ {
		switch line[i] {
		case '{', '[':
			depth++
		case '}', ']':
			depth--
		case '"':
			end := i + 1
			for end < len(line) && line[end] != '"' {
				if line[end] == '\\' {
					end++
				}
				end++
			}
			if end >= len(line) {
				return errors.New("a string does not end")
			}
			if depth == 1 && nextNonSpace(line, end+1) == ':' {
				name := line[i+1 : end]
				k := -1
				for n, want := range exportNames {
					if string(name) == want { // compared in place, not converted
						k = n
						break
					}
				}
				switch {
				case k < 0:
					return fmt.Errorf("field name %.40q is not spelled as the export spells it", name)
				case seen&(1<<k) != 0:
					return fmt.Errorf("field %q named twice", exportNames[k])
				}
				seen |= 1 << k
			}
			i = end
		}
	}
	return nil
}

// nextNonSpace returns the first byte at or after i that is not JSON
// whitespace, or 0.
func nextNonSpace(b []byte, i int) byte {
	for ; i < len(b); i++ {
		switch b[i] {
		case ' ', '\t', '\n', '\r':
		default:
			return b[i]
		}
	}
	return 0
}

// replacementNote says, for a line whose hash does not match, when the
// line holds U+FFFD: journals written before invalid UTF-8 was replaced at
// append hashed a string's raw bytes, which JSON cannot carry (the export
// writes U+FFFD for them), so such a record, sound in the journal, cannot
// verify from its export alone.
func replacementNote(line []byte) string {
	if bytes.Contains(line, []byte(`\ufffd`)) || bytes.Contains(line, []byte("\uFFFD")) {
		return " (the line holds U+FFFD: if the record was written before invalid UTF-8 was replaced at append, its hash covers the raw bytes the export cannot carry; check it with `audit verify` on the journal)"
	}
	return ""
}
