package providers

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// KeySet is a copy-on-write set of named entries: reads (Get, All) are one
// atomic load and never lock or allocate beyond what they return; Add copies
// the set under a mutex, so keys can be added while signatures run.
//
// The zero KeySet is empty and ready to use. A KeySet must not be copied
// after first use. Its mutex makes each write atomic by itself; a provider
// that checks the set, does slow work (a network call) and then adds serializes
// those steps with a lock of its own, so that Add cannot then find the name
// taken.
type KeySet[T any] struct {
	snap atomic.Pointer[keySnapshot[T]]
	mu   sync.Mutex // serializes writers of snap
}

// keySnapshot is one immutable generation of a KeySet.
type keySnapshot[T any] struct {
	byName map[string]T
	order  []string
}

// Get returns the entry named name.
func (s *KeySet[T]) Get(name string) (T, bool) {
	if ks := s.snap.Load(); ks != nil {
		v, ok := ks.byName[name]
		return v, ok
	}
	var zero T
	return zero, false
}

// All returns the entries in insertion order, in a fresh slice.
func (s *KeySet[T]) All() []T {
	ks := s.snap.Load()
	if ks == nil {
		return []T{}
	}
	out := make([]T, len(ks.order))
	for i, name := range ks.order {
		out[i] = ks.byName[name]
	}
	return out
}

// Infos returns info of each entry, in insertion order: what a provider's
// Keys answers, from the KeyInfo its entries carry.
func (s *KeySet[T]) Infos(info func(T) KeyInfo) []KeyInfo {
	all := s.All()
	out := make([]KeyInfo, len(all))
	for i, v := range all {
		out[i] = info(v)
	}
	return out
}

// Names returns the entries' names in insertion order, in a fresh slice.
func (s *KeySet[T]) Names() []string {
	ks := s.snap.Load()
	if ks == nil {
		return []string{}
	}
	return append([]string(nil), ks.order...)
}

// Len returns the number of entries.
func (s *KeySet[T]) Len() int {
	if ks := s.snap.Load(); ks != nil {
		return len(ks.order)
	}
	return 0
}

// Add adds v under name, after the entries already there. An empty name, or
// one already in the set, is refused with an error wrapping ErrBadRequest.
func (s *KeySet[T]) Add(name string, v T) error {
	if name == "" {
		return fmt.Errorf("empty key name: %w", ErrBadRequest)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.snap.Load()
	if old != nil {
		if _, dup := old.byName[name]; dup {
			return fmt.Errorf("key %q is already in the set: %w", name, ErrBadRequest)
		}
	}
	s.snap.Store(old.with(name, v))
	return nil
}

// Replace replaces the entry under name with v, keeping its place in the
// order. A name not in the set is refused with an error wrapping ErrNotFound.
func (s *KeySet[T]) Replace(name string, v T) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.snap.Load()
	if old == nil {
		return fmt.Errorf("key %q: %w", name, ErrNotFound)
	}
	if _, ok := old.byName[name]; !ok {
		return fmt.Errorf("key %q: %w", name, ErrNotFound)
	}
	s.snap.Store(old.with(name, v))
	return nil
}

// Remove drops the entry under name, if there is one, and reports whether
// there was.
func (s *KeySet[T]) Remove(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.snap.Load()
	if old == nil {
		return false
	}
	if _, ok := old.byName[name]; !ok {
		return false
	}
	next := &keySnapshot[T]{byName: make(map[string]T, len(old.byName)-1), order: make([]string, 0, len(old.order)-1)}
	for _, n := range old.order {
		if n != name {
			next.byName[n] = old.byName[n]
			next.order = append(next.order, n)
		}
	}
	s.snap.Store(next)
	return true
}

// with returns a copy of ks (nil: empty) serving v under name, added after
// the others when name is new.
func (ks *keySnapshot[T]) with(name string, v T) *keySnapshot[T] {
	var n int
	var order []string
	if ks != nil {
		n = len(ks.byName)
		order = ks.order[:len(ks.order):len(ks.order)]
	}
	next := &keySnapshot[T]{byName: make(map[string]T, n+1), order: order}
	if ks != nil {
		for k, e := range ks.byName {
			next.byName[k] = e
		}
	}
	if _, ok := next.byName[name]; !ok {
		next.order = append(next.order, name)
	}
	next.byName[name] = v
	return next
}
