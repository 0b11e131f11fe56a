package providers

import "fmt"

// UnusedKeys holds, by name, the keys a provider stopped serving in order
// to destroy them (a rotation attempt's key that never cut over): one whose
// destruction failed stays here, so that a later DestroyKey (the next
// attempt's start) finds it and tries again; one destroyed is remembered as
// done. The zero value is ready to use. It has no lock of its own: callers
// hold the lock that serializes their key table's writers.
type UnusedKeys[T any] struct {
	byName map[string]*unusedKey[T]
}

type unusedKey[T any] struct {
	key       T
	destroyed bool
}

// Destroy runs the steps every cloud provider's DestroyKey shares. It finds
// name among the served keys, or among those a failed destruction left
// here; vet may refuse the key (the key is then kept, served as before, and
// vet's error returned); then the key stops being served and destroy is
// called with it.
//
// A name neither served nor here was never made by this process: after a
// restart the key may well exist, so that is ErrUnavailable, not
// ErrNotFound, which answers a name destroyed already.
func (u *UnusedKeys[T]) Destroy(served *KeySet[T], name string, vet, destroy func(T) error) error {
	k, ok := served.Get(name)
	if !ok {
		e := u.byName[name]
		switch {
		case e == nil:
			return fmt.Errorf("none was made under this name since the provider started (one made before a restart is not found by its name; the rotation records name it): %w", ErrUnavailable)
		case e.destroyed:
			return fmt.Errorf("destroyed already: %w", ErrNotFound)
		}
		k = e.key
	}
	if err := vet(k); err != nil {
		return err
	}
	if u.byName == nil {
		u.byName = make(map[string]*unusedKey[T])
	}
	e := &unusedKey[T]{key: k}
	u.byName[name] = e
	served.Remove(name)
	if err := destroy(k); err != nil {
		return err
	}
	e.destroyed = true
	return nil
}
