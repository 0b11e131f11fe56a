package journal

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// An export is checked on its own, line by line: an edited field, a line
// deleted, moved or re-hashed is found, as in the journal. Lines cut from
// the end are not (the export has no checkpoint): the head it reports is
// what to compare with one kept elsewhere.
func TestVerifyExport(t *testing.T) {
	const n = 10
	j := openTest(t, t.TempDir(), WAL)
	appendN(t, j, "acme", n)
	var buf bytes.Buffer
	if err := j.WriteJSONL(context.Background(), &buf, Filter{}); err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != n {
		t.Fatalf("%d lines exported, want %d", len(lines), n)
	}
	_, head := j.Head()

	rehash := func(t *testing.T, line string, edit func(*Record)) string {
		t.Helper()
		var r Record
		if err := parseExportLine([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		edit(&r)
		r.encode()
		b, err := r.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		return string(b) + "\n"
	}
	cases := []struct {
		name    string
		edit    func(t *testing.T, l []string) []string
		seq     uint64 // 0: verifies
		reason  BreakReason
		records uint64
	}{
		{"as exported", func(_ *testing.T, l []string) []string { return l }, 0, 0, n},
		{"a field edited", func(_ *testing.T, l []string) []string {
			l[4] = strings.Replace(l[4], `"code_name":"OK"`, `"code_name":"PERMISSION_DENIED"`, 1)
			return l
		}, 5, BreakHashMismatch, n},
		{"a field edited and the line re-hashed", func(t *testing.T, l []string) []string {
			l[4] = rehash(t, l[4], func(r *Record) { r.Peer = "uid:0" })
			return l
		}, 6, BreakPrevMismatch, n},
		{"a line deleted", func(_ *testing.T, l []string) []string { return append(l[:4:4], l[5:]...) },
			5, BreakGap, n - 1},
		{"two lines swapped", func(_ *testing.T, l []string) []string { l[3], l[4] = l[4], l[3]; return l },
			4, BreakGap, n},
		{"a field added", func(_ *testing.T, l []string) []string {
			l[2] = strings.Replace(l[2], `{`, `{"note":"x",`, 1)
			return l
		}, 3, BreakUndecodable, 2},
		// encoding/json keeps a repeated key's last value, and matches
		// names in any case or escaped: each of these lines hashed to its
		// hash with "OK", while a reader that keeps the first value saw a
		// refusal.
		{"a field repeated", func(_ *testing.T, l []string) []string {
			l[4] = strings.Replace(l[4], `{`, `{"code_name":"PERMISSION_DENIED",`, 1)
			return l
		}, 5, BreakUndecodable, 4},
		{"a field repeated in capitals", func(_ *testing.T, l []string) []string {
			l[4] = strings.Replace(l[4], `{`, `{"CODE_NAME":"PERMISSION_DENIED",`, 1)
			return l
		}, 5, BreakUndecodable, 4},
		{"a field repeated, its name escaped", func(_ *testing.T, l []string) []string {
			l[4] = strings.Replace(l[4], `{`, `{"code\u005fname":"PERMISSION_DENIED",`, 1)
			return l
		}, 5, BreakUndecodable, 4},
		{"a brace after the record", func(_ *testing.T, l []string) []string {
			l[4] = strings.Replace(l[4], "}\n", "}}\n", 1)
			return l
		}, 5, BreakUndecodable, 4},
		{"a hash cut short", func(_ *testing.T, l []string) []string {
			l[2] = strings.Replace(l[2], `"hash":"`, `"hash":"00`, 1)
			return l
		}, 3, BreakUndecodable, 2},
		// Not found: nothing says where the export ended.
		{"lines cut from the end", func(_ *testing.T, l []string) []string { return l[:n-3] }, 0, 0, n - 3},
	}
	// Every line of an export goes through the name check.
	first := []byte(lines[0])
	if a := testing.AllocsPerRun(100, func() { _ = checkExportNames(first) }); a != 0 {
		t.Errorf("checkExportNames: %v allocations per line, want none", a)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			edited := tc.edit(t, append([]string(nil), lines...))
			rep, err := VerifyExport(context.Background(), strings.NewReader(strings.Join(edited, "")))
			if err != nil {
				t.Fatal(err)
			}
			if rep.Records != tc.records {
				t.Errorf("records %d, want %d", rep.Records, tc.records)
			}
			if tc.seq == 0 {
				if !rep.OK() {
					t.Fatalf("VerifyExport: %v", rep.Break)
				}
				if tc.records == n && rep.HeadHash != head {
					t.Fatalf("head %x, the journal's is %x", rep.HeadHash[:8], head[:8])
				}
				return
			}
			if rep.OK() {
				t.Fatal("VerifyExport passed an edited export")
			}
			if rep.Break.Seq != tc.seq || rep.Break.Reason != tc.reason {
				t.Fatalf("break at %d (%s), want %d (%s): %v", rep.Break.Seq, rep.Break.Reason, tc.seq, tc.reason, rep.Break)
			}
		})
	}
}

// A record written before invalid UTF-8 was replaced at append hashes the
// raw bytes; its export carries U+FFFD instead and cannot match. The break
// says so, so that the operator checks the journal instead of suspecting
// an edit (a reviewer's note on audit verify --export).
func TestVerifyExportNamesUFFFD(t *testing.T) {
	j := openTest(t, t.TempDir(), WAL)
	appendN(t, j, "acme", 3)
	var buf bytes.Buffer
	if err := j.WriteJSONL(context.Background(), &buf, Filter{}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, replacement string
		noted             bool
	}{
		{"escaped", `\ufffd`, true},
		{"raw", "\uFFFD", true},
		{"another edit", "x", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			edited := strings.Replace(buf.String(), `"peer":"`, `"peer":"`+tc.replacement, 1)
			rep, err := VerifyExport(context.Background(), strings.NewReader(edited))
			if err != nil || rep.Break == nil || rep.Break.Reason != BreakHashMismatch {
				t.Fatalf("%+v %v, want a hash mismatch", rep.Break, err)
			}
			if got := strings.Contains(rep.Break.Detail, "U+FFFD"); got != tc.noted {
				t.Fatalf("detail %q names U+FFFD: %v, want %v", rep.Break.Detail, got, tc.noted)
			}
		})
	}
}
