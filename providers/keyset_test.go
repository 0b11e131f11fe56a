package providers

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
)

func TestKeySetAdd(t *testing.T) {
	type add struct {
		name, v string
		err     error // nil: added
	}
	for _, tc := range []struct {
		desc  string
		adds  []add
		names []string
		all   []string
	}{
		{desc: "empty"},
		{desc: "one", adds: []add{{"a", "A", nil}}, names: []string{"a"}, all: []string{"A"}},
		{
			desc:  "insertion order, not sorted",
			adds:  []add{{"c", "C", nil}, {"a", "A", nil}, {"b", "B", nil}},
			names: []string{"c", "a", "b"}, all: []string{"C", "A", "B"},
		},
		{
			desc:  "duplicate refused, first kept",
			adds:  []add{{"a", "A", nil}, {"b", "B", nil}, {"a", "A2", ErrBadRequest}},
			names: []string{"a", "b"}, all: []string{"A", "B"},
		},
		{
			desc:  "empty name refused",
			adds:  []add{{"", "X", ErrBadRequest}, {"a", "A", nil}},
			names: []string{"a"}, all: []string{"A"},
		},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			var s KeySet[string]
			for _, a := range tc.adds {
				err := s.Add(a.name, a.v)
				if !errors.Is(err, a.err) || (a.err == nil) != (err == nil) {
					t.Fatalf("Add(%q) = %v, want %v", a.name, err, a.err)
				}
			}
			if got := s.All(); !slices.Equal(got, tc.all) || got == nil {
				t.Errorf("All() = %#v, want %#v", got, tc.all)
			}
			if got := s.Names(); !slices.Equal(got, tc.names) {
				t.Errorf("Names() = %q, want %q", got, tc.names)
			}
			if s.Len() != len(tc.all) {
				t.Errorf("Len() = %d, want %d", s.Len(), len(tc.all))
			}
			for i, n := range tc.names {
				if v, ok := s.Get(n); !ok || v != tc.all[i] {
					t.Errorf("Get(%q) = %q, %v; want %q, true", n, v, ok, tc.all[i])
				}
			}
			if v, ok := s.Get("missing"); ok || v != "" {
				t.Errorf("Get(missing) = %q, %v", v, ok)
			}
		})
	}
}

func TestKeySetAllIsFresh(t *testing.T) {
	var s KeySet[int]
	_ = s.Add("a", 1)
	_ = s.Add("b", 2)
	all := s.All()
	all[0] = 99
	names := s.Names()
	names[0] = "z"
	if v, _ := s.Get("a"); v != 1 || !slices.Equal(s.All(), []int{1, 2}) || !slices.Equal(s.Names(), []string{"a", "b"}) {
		t.Fatal("changing a returned slice changed the set")
	}
	// A slice returned before an Add is not extended or changed by it.
	_ = s.Add("c", 3)
	if !slices.Equal(all, []int{99, 2}) {
		t.Fatalf("earlier All() = %v after Add", all)
	}
}

func TestKeySetReplace(t *testing.T) {
	var s KeySet[string]
	if err := s.Replace("a", "x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Replace on empty set: %v", err)
	}
	_ = s.Add("a", "A")
	_ = s.Add("b", "B")
	if err := s.Replace("a", "A2"); err != nil {
		t.Fatal(err)
	}
	if err := s.Replace("c", "C"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Replace(c): %v", err)
	}
	if got := s.All(); !slices.Equal(got, []string{"A2", "B"}) {
		t.Fatalf("All() = %q", got)
	}
}

// TestKeySetConcurrent reads while keys are added; run it with -race.
func TestKeySetConcurrent(t *testing.T) {
	var s KeySet[int]
	_ = s.Add("k0", 0)
	const adds = 200
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for r := 0; r < 4; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if v, ok := s.Get("k0"); !ok || v != 0 {
					t.Errorf("Get(k0) = %d, %v", v, ok)
					return
				}
				all := s.All()
				for i, v := range all {
					if v != i {
						t.Errorf("All()[%d] = %d", i, v)
						return
					}
				}
				if n := s.Len(); n < len(all) {
					t.Errorf("Len() = %d after All() returned %d", n, len(all))
					return
				}
			}
		}()
	}
	var aw sync.WaitGroup
	errs := make(chan error, adds)
	for w := 0; w < 2; w++ {
		aw.Add(1)
		go func() {
			defer aw.Done()
			for i := 1; i < adds; i++ {
				// Both writers try every name: exactly one of each pair wins.
				if err := s.Add(fmt.Sprintf("k%d", i), i); err != nil && !errors.Is(err, ErrBadRequest) {
					errs <- err
				}
			}
		}()
	}
	aw.Wait()
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if s.Len() != adds {
		t.Fatalf("Len() = %d, want %d", s.Len(), adds)
	}
	for i := 0; i < adds; i++ {
		if v, ok := s.Get(fmt.Sprintf("k%d", i)); !ok || v != i {
			t.Fatalf("Get(k%d) = %d, %v", i, v, ok)
		}
	}
}

func TestKeySetGetAllocatesNothing(t *testing.T) {
	var s KeySet[*KeyInfo]
	for _, n := range []string{"a", "b", "c"} {
		if err := s.Add(n, &KeyInfo{}); err != nil {
			t.Fatal(err)
		}
	}
	var sink bool
	for _, name := range []string{"b", "missing"} {
		if n := testing.AllocsPerRun(100, func() {
			_, ok := s.Get(name)
			sink = sink != ok
		}); n != 0 {
			t.Errorf("Get(%q) allocates %v times", name, n)
		}
	}
	var empty KeySet[int]
	if n := testing.AllocsPerRun(100, func() { _, _ = empty.Get("a"); _ = empty.Len() }); n != 0 {
		t.Errorf("Get on an empty set allocates %v times", n)
	}
}

func TestKeySetInfos(t *testing.T) {
	var s KeySet[KeyInfo]
	if got := s.Infos(func(k KeyInfo) KeyInfo { return k }); len(got) != 0 {
		t.Fatalf("empty set: %v", got)
	}
	_ = s.Add("b", KeyInfo{Name: "b", KID: "2"})
	_ = s.Add("a", KeyInfo{Name: "a", KID: "1"})
	got := s.Infos(func(k KeyInfo) KeyInfo { return k })
	if len(got) != 2 || got[0].Name != "b" || got[1].KID != "1" {
		t.Fatalf("Infos = %+v, want b then a in insertion order", got)
	}
}
