package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// FieldError is one problem found while loading a policy. Load and Parse
// return every problem they find, joined with errors.Join; each names the
// file, the line and the field, as in
//
//	policy.yaml:14: tenants[0].slots[1].policy.rate.per_second: must be > 0
type FieldError struct {
	File  string
	Line  int    // 1-based; 0 when the problem has no line (an unreadable file)
	Field string // the field's path; "" for a problem with the file itself
	Msg   string
}

func (e *FieldError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteByte(':')
		b.WriteString(strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Limits on values, so that arithmetic on the hot path cannot overflow.
const (
	maxRatePerSecond = 1e6
	maxBurst         = 1_000_000
	maxQuota         = 1<<quotaCountBits - 1
	maxNameLen       = 63
	maxKeyNameLen    = 256
	// A full bucket must refill within a year: burst/per_second bounds the
	// GCRA tolerance in nanoseconds well inside int64.
	maxRefillSeconds = 366 * 24 * 3600
)

// Load reads a policy from a file, or from every *.yaml and *.yml file of a
// directory (not its subdirectories or hidden files), in name order. The
// files of a directory form one set: their tenants are pooled (one tenant
// per file is the convention) and their admins merged.
func Load(path string) (*Set, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		return parseFiles([]sourceFile{{path, data}})
	}
	entries, err := os.ReadDir(path)
	if err != nil {
		return nil, err
	}
	var files []sourceFile
	for _, e := range entries { // os.ReadDir sorts by name
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || !(strings.HasSuffix(name, ".yaml") || strings.HasSuffix(name, ".yml")) {
			continue
		}
		full := filepath.Join(path, name)
		data, err := os.ReadFile(full)
		if err != nil {
			return nil, err
		}
		files = append(files, sourceFile{full, data})
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("directory %s holds no *.yaml or *.yml file", path)
	}
	return parseFiles(files)
}

// Parse reads a policy from one file's contents; name is used in errors.
func Parse(name string, data []byte) (*Set, error) {
	return parseFiles([]sourceFile{{name, data}})
}

type sourceFile struct {
	name string
	data []byte
}

func parseFiles(files []sourceFile) (*Set, error) {
	p := &parser{}
	for _, f := range files {
		p.files = append(p.files, f.name)
		p.parseFile(f.name, f.data)
	}
	p.crossCheck()
	if len(p.errs) > 0 {
		order := func(file string) int { return slices.Index(p.files, file) }
		slices.SortStableFunc(p.errs, func(a, b *FieldError) int {
			if c := order(a.File) - order(b.File); c != 0 {
				return c
			}
			return a.Line - b.Line
		})
		errs := make([]error, len(p.errs))
		for i, e := range p.errs {
			errs[i] = e
		}
		return nil, errors.Join(errs...)
	}
	return p.build(), nil
}

// srcPos is where something was written.
type srcPos struct {
	file  string
	line  int
	field string
}

func (a srcPos) String() string { return a.file + ":" + strconv.Itoa(a.line) }

type idKind uint8

const (
	idUID idKind = iota + 1
	idGID
	idMTLS
)

// rawID is one identity entry as written, with its place.
type rawID struct {
	at     srcPos
	kind   idKind
	num    uint32 // uid or gid
	name   string // mTLS name or prefix (without the "*")
	prefix bool
}

func (id rawID) String() string {
	switch id.kind {
	case idUID:
		return "uid " + strconv.FormatUint(uint64(id.num), 10)
	case idGID:
		return "gid " + strconv.FormatUint(uint64(id.num), 10)
	}
	if id.prefix {
		return fmt.Sprintf("mTLS prefix %q", id.name+"*")
	}
	return fmt.Sprintf("mTLS name %q", id.name)
}

type rawTenant struct {
	at, nameAt srcPos
	t          *Tenant
	ids        []rawID
	slots      []*rawSlot
}

type rawSlot struct {
	at, nameAt srcPos
	s          *Slot
	clients    []rawID
}

type parser struct {
	files   []string
	errs    []*FieldError
	admins  []rawID
	tenants []*rawTenant

	// Aliases let a small file describe a huge tree ("billion laughs"):
	// visits counts the mappings and list elements walked, aliases expanded.
	// (The walk follows the schema, so a recursive alias cannot loop: each
	// level descends only into the fields the format defines.)
	visits   int
	tooLarge bool
}

// maxVisits bounds a policy's size: about 100,000 slots.
const maxVisits = 1 << 20

func (p *parser) visit(file string, n *yaml.Node, path string) bool {
	p.visits++
	if p.visits <= maxVisits {
		return true
	}
	if !p.tooLarge {
		p.tooLarge = true
		// Past the error cap too: this is the error that explains the rest.
		p.errs = append(p.errs, &FieldError{File: file, Line: n.Line, Field: path,
			Msg: fmt.Sprintf("the policy is too large once aliases are expanded (more than %d entries)", maxVisits)})
	}
	return false
}

// maxErrors bounds the report: past it, one more error says so.
const maxErrors = 1000

func (p *parser) errorf(at srcPos, format string, args ...any) {
	switch {
	case len(p.errs) < maxErrors:
		p.errs = append(p.errs, &FieldError{File: at.file, Line: at.line, Field: at.field, Msg: fmt.Sprintf(format, args...)})
	case len(p.errs) == maxErrors:
		p.errs = append(p.errs, &FieldError{File: at.file, Line: at.line, Msg: fmt.Sprintf("more than %d errors; the rest are not reported", maxErrors)})
	}
}

func at(file string, n *yaml.Node, field string) srcPos { return srcPos{file, n.Line, field} }

var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

func (p *parser) parseFile(file string, data []byte) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if err != io.EOF { // io.EOF: an empty file, an empty policy
			p.yamlError(file, err)
		}
		return
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		if err == nil {
			p.errorf(srcPos{file, extra.Line, ""}, "a policy file holds one YAML document; found another")
		} else {
			p.yamlError(file, err)
		}
		return
	}
	if len(doc.Content) == 0 {
		return
	}
	p.fields(file, doc.Content[0], "", []field{
		{"admins", func(v *yaml.Node, f string) { p.admins = append(p.admins, p.identities(file, v, f)...) }},
		{"tenants", func(v *yaml.Node, f string) {
			p.list(file, v, f, func(el *yaml.Node, f string) { p.tenant(file, el, f) })
		}},
	})
}

func (p *parser) yamlError(file string, err error) {
	msg := err.Error()
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		p.errs = append(p.errs, &FieldError{File: file, Line: line, Msg: "YAML: " + m[2]})
		return
	}
	p.errs = append(p.errs, &FieldError{File: file, Msg: strings.Replace(msg, "yaml: ", "YAML: ", 1)})
}

// field is one known key of a mapping and what to do with its value.
type field struct {
	name string
	fn   func(v *yaml.Node, path string)
}

func resolve(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	n = resolve(n)
	return n == nil || n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// fields walks a mapping, calling each known key's function in document
// order. Unknown and repeated keys are errors at their own line. A null
// value (an empty mapping) is accepted as having no keys. A key whose value
// is null (`paused:`, `burst: ~`) is skipped: docs/policy.md makes a null
// field the same as an absent one, for every field, so each field's function
// sees only a value.
func (p *parser) fields(file string, n *yaml.Node, path string, known []field) {
	n = resolve(n)
	if isNull(n) {
		return
	}
	if n.Kind != yaml.MappingNode {
		p.errorf(at(file, n, path), "want a mapping of %s", fieldNames(known))
		return
	}
	if !p.visit(file, n, path) {
		return
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := resolve(n.Content[i]), n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			p.errorf(at(file, k, path), "keys must be plain names")
			continue
		}
		fpath := join(path, k.Value)
		if seen[k.Value] {
			p.errorf(at(file, k, fpath), "repeated field")
			continue
		}
		seen[k.Value] = true
		j := slices.IndexFunc(known, func(f field) bool { return f.name == k.Value })
		if j < 0 {
			p.errorf(at(file, k, fpath), "unknown field (want %s)", fieldNames(known))
			continue
		}
		if !isNull(v) {
			known[j].fn(v, fpath)
		}
	}
}

func fieldNames(known []field) string {
	names := make([]string, len(known))
	for i, f := range known {
		names[i] = f.name
	}
	return strings.Join(names, ", ")
}

// list walks a sequence. It reports whether n was a sequence (an empty one
// included); a null value is absent and reports false without an error.
func (p *parser) list(file string, n *yaml.Node, path string, fn func(el *yaml.Node, path string)) bool {
	n = resolve(n)
	if isNull(n) {
		return false
	}
	if n.Kind != yaml.SequenceNode {
		p.errorf(at(file, n, path), "want a list")
		return false
	}
	for i, el := range n.Content {
		f := path + "[" + strconv.Itoa(i) + "]"
		if !p.visit(file, el, f) {
			break
		}
		fn(el, f)
	}
	return true
}

func (p *parser) str(file string, n *yaml.Node, path string) (string, bool) {
	n = resolve(n)
	if n.Kind != yaml.ScalarNode || isNull(n) {
		p.errorf(at(file, n, path), "want a string")
		return "", false
	}
	return n.Value, true
}

func (p *parser) integer(file string, n *yaml.Node, path string) (int64, bool) {
	n = resolve(n)
	var v int64
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" || n.Decode(&v) != nil {
		p.errorf(at(file, n, path), "want an integer, got %q", n.Value)
		return 0, false
	}
	if !plainDecimal(n.Value) {
		p.errorf(at(file, n, path), "write %q in plain decimal digits (YAML reads a leading 0 as octal, 0x as hex)", n.Value)
		return 0, false
	}
	return v, true
}

// plainDecimal reports whether an integer scalar is written in decimal
// digits, with no leading zero. YAML also takes 0o17, 0x1F, and (as yaml.v3
// does for YAML 1.1) 017 as octal: a uid written 01001 would map uid 513,
// while the same digits in a `clients` entry ("uid:01001") read as 1001.
func plainDecimal(s string) bool {
	s = strings.TrimPrefix(strings.TrimPrefix(s, "-"), "+")
	if s == "" || (len(s) > 1 && s[0] == '0') {
		return false
	}
	for _, r := range s {
		if r < '0' || r > '9' {
			return false
		}
	}
	return true
}

func (p *parser) number(file string, n *yaml.Node, path string) (float64, bool) {
	n = resolve(n)
	var v float64
	if n.Kind != yaml.ScalarNode || (n.ShortTag() != "!!int" && n.ShortTag() != "!!float") || n.Decode(&v) != nil ||
		math.IsNaN(v) || math.IsInf(v, 0) {
		p.errorf(at(file, n, path), "want a number, got %q", n.Value)
		return 0, false
	}
	if n.ShortTag() == "!!int" && !plainDecimal(n.Value) {
		p.errorf(at(file, n, path), "write %q in plain decimal digits (YAML reads a leading 0 as octal, 0x as hex)", n.Value)
		return 0, false
	}
	return v, true
}

func (p *parser) boolean(file string, n *yaml.Node, path string) (bool, bool) {
	n = resolve(n)
	var v bool
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" || n.Decode(&v) != nil {
		p.errorf(at(file, n, path), "want true or false, got %q", n.Value)
		return false, false
	}
	return v, true
}

// checkName enforces the tenant and slot name rule: 1 to 63 characters of
// [a-z0-9._-], starting with a letter or digit, so that "tenant/slot" is
// unambiguous and safe in paths, logs and metrics labels.
func (p *parser) checkName(pos srcPos, s string) bool {
	problem := ""
	switch {
	case s == "":
		problem = "must not be empty"
	case len(s) > maxNameLen:
		problem = fmt.Sprintf("longer than %d characters", maxNameLen)
	default:
		for i := 0; i < len(s); i++ {
			if c := s[i]; !isAlnum(c) && c != '.' && c != '_' && c != '-' {
				problem = fmt.Sprintf("character %q not allowed", c)
				break
			}
		}
		if problem == "" && !isAlnum(s[0]) {
			problem = "must start with a letter or digit"
		}
	}
	if problem != "" {
		p.errorf(pos, "name %q %s (allowed: a-z 0-9 . _ -)", s, problem)
		return false
	}
	return true
}

func isAlnum(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' }

func (p *parser) checkKeyName(pos srcPos, s string) bool {
	if s == "" || len(s) > maxKeyNameLen {
		p.errorf(pos, "key name must be 1 to %d bytes", maxKeyNameLen)
		return false
	}
	for _, r := range s {
		if r < ' ' || r == 0x7f {
			p.errorf(pos, "key name must not contain control characters")
			return false
		}
	}
	return true
}

func (p *parser) identities(file string, n *yaml.Node, path string) []rawID {
	var ids []rawID
	unix := func(kind idKind) func(v *yaml.Node, f string) {
		return func(v *yaml.Node, f string) {
			p.list(file, v, f, func(el *yaml.Node, f string) {
				x, ok := p.integer(file, el, f)
				if !ok {
					return
				}
				if x < 0 || x > math.MaxUint32 {
					p.errorf(at(file, el, f), "%d is out of range for a Unix id", x)
					return
				}
				if problem := unixIDProblem(uint32(x)); problem != "" {
					p.errorf(at(file, el, f), "%d %s", x, problem)
					return
				}
				ids = append(ids, rawID{at: at(file, el, f), kind: kind, num: uint32(x)})
			})
		}
	}
	p.fields(file, n, path, []field{
		{"unix_uids", unix(idUID)},
		{"unix_gids", unix(idGID)},
		{"mtls", func(v *yaml.Node, f string) {
			p.list(file, v, f, func(el *yaml.Node, f string) {
				s, ok := p.str(file, el, f)
				if !ok {
					return
				}
				name, prefix, problem := mtlsPattern(s)
				if problem != "" {
					p.errorf(at(file, el, f), "%q: %s", s, problem)
					return
				}
				ids = append(ids, rawID{at: at(file, el, f), kind: idMTLS, name: name, prefix: prefix})
			})
		}},
	})
	return ids
}

// overflowID is the kernel's default overflowuid and overflowgid: what
// SO_PEERCRED reports for a peer in another user namespace whose uid or
// gid has no mapping in the agent's (a container's root, say).
const overflowID = 65534

// unixIDProblem says why id cannot name a peer: the overflow id stands for
// every unmapped user of every other user namespace as well as for the
// user it is here (nobody), and (uid_t)-1 is no user at all.
func unixIDProblem(id uint32) string {
	switch id {
	case overflowID:
		return "is the kernel's overflow id (nobody): peers of other user namespaces whose ids have no mapping here show as it; give the client a user of its own"
	case math.MaxUint32:
		return "is (uid_t)-1, which names no user"
	}
	return ""
}

func (p *parser) tenant(file string, n *yaml.Node, path string) {
	rt := &rawTenant{at: at(file, resolve(n), path), t: &Tenant{}}
	var hasName bool
	idsLine := rt.at.line
	p.fields(file, n, path, []field{
		{"name", func(v *yaml.Node, f string) {
			hasName = true
			rt.nameAt = at(file, resolve(v), f)
			if s, ok := p.str(file, v, f); ok && p.checkName(rt.nameAt, s) {
				rt.t.Name = s
			}
		}},
		{"identities", func(v *yaml.Node, f string) {
			idsLine = resolve(v).Line
			rt.ids = p.identities(file, v, f)
		}},
		{"slots", func(v *yaml.Node, f string) {
			p.list(file, v, f, func(el *yaml.Node, f string) {
				rt.slots = append(rt.slots, p.slot(file, el, f))
			})
		}},
	})
	if !hasName {
		p.errorf(srcPos{file, rt.at.line, join(path, "name")}, "required")
	}
	if f := join(path, "identities"); len(rt.ids) == 0 && !p.reported(file, f) {
		p.errorf(srcPos{file, idsLine, f}, "required: a tenant needs at least one identity")
	}
	p.tenants = append(p.tenants, rt)
}

// reported says whether an error was already recorded for field.
func (p *parser) reported(file, field string) bool {
	for _, e := range p.errs {
		if e.File == file && strings.HasPrefix(e.Field, field) {
			return true
		}
	}
	return false
}

func (p *parser) slot(file string, n *yaml.Node, path string) *rawSlot {
	rs := &rawSlot{at: at(file, resolve(n), path), s: &Slot{}}
	s := rs.s
	s.Policy.algs = allAlgorithms
	var hasName, hasKey, hasVersions bool
	p.fields(file, n, path, []field{
		{"name", func(v *yaml.Node, f string) {
			hasName = true
			rs.nameAt = at(file, resolve(v), f)
			if name, ok := p.str(file, v, f); ok && p.checkName(rs.nameAt, name) {
				s.Name = name
			}
		}},
		{"key", func(v *yaml.Node, f string) {
			hasKey = true
			if k, ok := p.str(file, v, f); ok && p.checkKeyName(at(file, resolve(v), f), k) {
				s.Versions = []Version{{Number: 1, Key: k}}
			}
		}},
		{"versions", func(v *yaml.Node, f string) {
			hasVersions = true
			p.versions(file, v, f, s)
		}},
		{"policy", func(v *yaml.Node, f string) { p.policy(file, v, f, rs) }},
	})
	if !hasName {
		p.errorf(srcPos{file, rs.at.line, join(path, "name")}, "required")
	}
	switch {
	case hasKey && hasVersions:
		p.errorf(srcPos{file, rs.at.line, join(path, "versions")}, "give key or versions, not both")
	case !hasKey && !hasVersions:
		p.errorf(srcPos{file, rs.at.line, join(path, "key")}, "required (the agent key that backs the slot), or versions")
	}
	return rs
}

func (p *parser) versions(file string, n *yaml.Node, path string, s *Slot) {
	seen := map[int64]srcPos{}
	present := p.list(file, n, path, func(el *yaml.Node, f string) {
		var v Version
		var hasNum, hasKey bool
		p.fields(file, el, f, []field{
			{"version", func(x *yaml.Node, f string) {
				hasNum = true
				num, ok := p.integer(file, x, f)
				if !ok {
					return
				}
				pos := at(file, resolve(x), f)
				if num < 1 || num > math.MaxInt32 {
					p.errorf(pos, "must be 1 or more")
					return
				}
				if first, dup := seen[num]; dup {
					p.errorf(pos, "version %d is already listed at %s", num, first)
					return
				}
				seen[num] = pos
				v.Number = int(num)
			}},
			{"key", func(x *yaml.Node, f string) {
				hasKey = true
				if k, ok := p.str(file, x, f); ok && p.checkKeyName(at(file, resolve(x), f), k) {
					v.Key = k
				}
			}},
		})
		line := resolve(el).Line
		if !hasNum {
			p.errorf(srcPos{file, line, join(f, "version")}, "required")
		}
		if !hasKey {
			p.errorf(srcPos{file, line, join(f, "key")}, "required")
		}
		if v.Number > 0 && v.Key != "" {
			s.Versions = append(s.Versions, v)
		}
	})
	if present && len(resolve(n).Content) == 0 {
		p.errorf(at(file, resolve(n), path), "a slot needs at least one version")
	}
	slices.SortFunc(s.Versions, func(a, b Version) int { return a.Number - b.Number })
}

func (p *parser) policy(file string, n *yaml.Node, path string, rs *rawSlot) {
	pol := &rs.s.Policy
	p.fields(file, n, path, []field{
		{"algorithms", func(v *yaml.Node, f string) {
			var set algSet
			present := p.list(file, v, f, func(el *yaml.Node, f string) {
				name, ok := p.str(file, el, f)
				if !ok {
					return
				}
				bit, ok := parseAlgorithm(name)
				if !ok {
					p.errorf(at(file, resolve(el), f), "unknown algorithm %q (want one of %s)", name, strings.Join(AlgorithmNames(), ", "))
					return
				}
				set |= bit
			})
			if present && len(resolve(v).Content) == 0 {
				p.errorf(at(file, resolve(v), f), "lists no algorithm; omit the field to allow every algorithm, or pause the slot")
			}
			if set != 0 {
				pol.algs = set
			}
		}},
		{"rate", func(v *yaml.Node, f string) { p.rate(file, v, f, pol) }},
		{"daily_quota", func(v *yaml.Node, f string) {
			q, ok := p.integer(file, v, f)
			if !ok {
				return
			}
			if q < 1 || q > maxQuota {
				p.errorf(at(file, resolve(v), f), "must be between 1 and %d (omit for unlimited; pause the slot to stop signing)", int64(maxQuota))
				return
			}
			pol.DailyQuota = q
		}},
		{"windows", func(v *yaml.Node, f string) {
			var mask weekMask
			count := 0
			present := p.list(file, v, f, func(el *yaml.Node, f string) {
				s, ok := p.str(file, el, f)
				if !ok {
					return
				}
				if err := mask.addWindow(s); err != nil {
					p.errorf(at(file, resolve(el), f), "%v", err)
					return
				}
				count++
			})
			if present && len(resolve(v).Content) == 0 {
				p.errorf(at(file, resolve(v), f), "lists no window; omit the field to allow any time, or pause the slot")
			}
			if count > 0 && !mask.full() {
				pol.window = &mask
			}
		}},
		{"clients", func(v *yaml.Node, f string) {
			present := p.list(file, v, f, func(el *yaml.Node, f string) {
				s, ok := p.str(file, el, f)
				if !ok {
					return
				}
				if id, ok := p.client(at(file, resolve(el), f), s); ok {
					rs.clients = append(rs.clients, id)
				}
			})
			if present && len(resolve(v).Content) == 0 {
				p.errorf(at(file, resolve(v), f), "lists no client; omit the field to allow every identity of the tenant, or pause the slot")
			}
		}},
		{"paused", func(v *yaml.Node, f string) {
			if b, ok := p.boolean(file, v, f); ok {
				pol.Paused = b
			}
		}},
	})
}

func (p *parser) rate(file string, n *yaml.Node, path string, pol *Policy) {
	var perSecond float64
	var burst int64
	var hasRate, badRate, badBurst bool
	p.fields(file, n, path, []field{
		{"per_second", func(v *yaml.Node, f string) {
			hasRate = true
			r, ok := p.number(file, v, f)
			switch {
			case !ok:
				badRate = true
			case r <= 0:
				p.errorf(at(file, resolve(v), f), "must be > 0 (omit rate for unlimited; pause the slot to stop signing)")
				badRate = true
			case r > maxRatePerSecond:
				p.errorf(at(file, resolve(v), f), "must be at most %g", float64(maxRatePerSecond))
				badRate = true
			default:
				perSecond = r
			}
		}},
		{"burst", func(v *yaml.Node, f string) {
			b, ok := p.integer(file, v, f)
			switch {
			case !ok:
				badBurst = true
			case b < 1 || b > maxBurst:
				p.errorf(at(file, resolve(v), f), "must be between 1 and %d", maxBurst)
				badBurst = true
			default:
				burst = b
			}
		}},
	})
	pos := at(file, resolve(n), path)
	if !hasRate {
		p.errorf(srcPos{file, pos.line, join(path, "per_second")}, "required")
		return
	}
	if badRate || badBurst {
		return
	}
	if burst == 0 {
		burst = max(1, int64(math.Ceil(perSecond)))
	}
	if float64(burst)/perSecond > maxRefillSeconds {
		p.errorf(pos, "burst %d at %g per second takes longer than a year to refill", burst, perSecond)
		return
	}
	pol.Rate = &Rate{PerSecond: perSecond, Burst: burst}
	pol.interval = max(1, int64(math.Round(1e9/perSecond)))
	pol.tolerance = pol.interval * burst
}

// client parses one entry of a slot's clients: "uid:N", "gid:N",
// "mtls:NAME", or a bare mTLS name or "…/*" prefix.
func (p *parser) client(pos srcPos, s string) (rawID, bool) {
	for _, u := range []struct {
		prefix string
		kind   idKind
	}{{"uid:", idUID}, {"gid:", idGID}} {
		if rest, ok := strings.CutPrefix(s, u.prefix); ok {
			n, err := strconv.ParseUint(rest, 10, 32)
			if err != nil {
				p.errorf(pos, "%q: want %sN with N a Unix id", s, u.prefix)
				return rawID{}, false
			}
			return rawID{at: pos, kind: u.kind, num: uint32(n)}, true
		}
	}
	name, prefix, problem := mtlsPattern(strings.TrimPrefix(s, "mtls:"))
	if problem != "" {
		p.errorf(pos, "%q: %s", s, problem)
		return rawID{}, false
	}
	return rawID{at: pos, kind: idMTLS, name: name, prefix: prefix}, true
}

// crossCheck applies the rules that span entries and files: unique tenant
// names, unique slot names per tenant, each identity in one tenant, and each
// client of a slot reachable as an identity of the slot's tenant.
func (p *parser) crossCheck() {
	tenants := map[string]*rawTenant{}
	for _, rt := range p.tenants {
		name := rt.t.Name
		if name != "" {
			if first, dup := tenants[name]; dup {
				p.errorf(rt.nameAt, "tenant %q is already defined at %s", name, first.nameAt)
			} else {
				tenants[name] = rt
			}
		}
		slots := map[string]*rawSlot{}
		for _, rs := range rt.slots {
			if rs.s.Name == "" {
				continue
			}
			if first, dup := slots[rs.s.Name]; dup {
				p.errorf(rs.nameAt, "slot %q is already defined in this tenant at %s", rs.s.Name, first.nameAt)
				continue
			}
			slots[rs.s.Name] = rs
		}
	}

	type owner struct {
		rt *rawTenant
		id rawID
	}
	uids := map[uint32]owner{}
	gids := map[uint32]owner{}
	names := map[string]owner{} // exact mTLS names
	var nameList []owner        // the same, in file order
	var prefixes []owner        // few in practice: the checks are O(names × prefixes)
	for _, rt := range p.tenants {
		for _, id := range rt.ids {
			var m map[uint32]owner
			switch id.kind {
			case idUID:
				m = uids
			case idGID:
				m = gids
			case idMTLS:
				conflict := func(o owner) {
					p.errorf(id.at, "%s overlaps %s of tenant %q at %s: an identity maps to one tenant", id, o.id, o.rt.t.Name, o.id.at)
				}
				for _, o := range prefixes {
					if o.rt != rt && overlaps(id.name, id.prefix, o.id.name, true) {
						conflict(o)
					}
				}
				if !id.prefix {
					if o, dup := names[id.name]; dup && o.rt != rt {
						conflict(o)
					} else if !dup {
						names[id.name] = owner{rt, id}
						nameList = append(nameList, owner{rt, id})
					}
					continue
				}
				for _, o := range nameList {
					if o.rt != rt && overlaps(id.name, true, o.id.name, false) {
						conflict(o)
					}
				}
				prefixes = append(prefixes, owner{rt, id})
				continue
			}
			if o, dup := m[id.num]; dup {
				if o.rt != rt {
					p.errorf(id.at, "%s already belongs to tenant %q at %s: an identity maps to one tenant", id, o.rt.t.Name, o.id.at)
				}
				continue
			}
			m[id.num] = owner{rt, id}
		}
	}

	for _, rt := range p.tenants {
		var ids identitySet
		fillIdentitySet(&ids, rt.ids)
		for _, rs := range rt.slots {
			for _, c := range rs.clients {
				switch c.kind {
				case idUID:
					if o, ok := uids[c.num]; ok && o.rt != rt {
						p.errorf(c.at, "%s belongs to tenant %q (%s); it can never use a slot of %q", c, o.rt.t.Name, o.id.at, rt.t.Name)
					} else if !ok && len(ids.gids) == 0 {
						p.errorf(c.at, "%s is not an identity of tenant %q", c, rt.t.Name)
					}
				case idGID:
					if _, ok := slices.BinarySearch(ids.gids, c.num); !ok && len(ids.uids) == 0 {
						p.errorf(c.at, "%s is not an identity of tenant %q", c, rt.t.Name)
					}
				case idMTLS:
					if !reachable(&ids, c) {
						p.errorf(c.at, "%s is not an identity of tenant %q", c, rt.t.Name)
					}
				}
			}
		}
	}
}

// reachable reports whether an mTLS client entry can match some identity of
// the tenant.
func reachable(ids *identitySet, c rawID) bool {
	if !c.prefix {
		return ids.matches(MTLSIdentity(c.name))
	}
	for _, q := range ids.prefixes {
		// Either prefix may be the longer: the client's may narrow the
		// tenant's, or cover all of it.
		if overlaps(c.name, true, q, true) {
			return true
		}
	}
	for _, e := range ids.names {
		if len(e) > len(c.name) && strings.HasPrefix(e, c.name) {
			return true
		}
	}
	return false
}

func fillIdentitySet(s *identitySet, ids []rawID) {
	for _, id := range ids {
		switch id.kind {
		case idUID:
			s.uids = append(s.uids, id.num)
		case idGID:
			s.gids = append(s.gids, id.num)
		case idMTLS:
			if id.prefix {
				s.prefixes = append(s.prefixes, id.name)
			} else {
				s.names = append(s.names, id.name)
			}
		}
	}
	s.normalize()
}
