package journal

import (
	"context"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
)

// The state namespace holds the agent's other durable state (rotation
// state, calendars, Rotation Evidence Packs) under keys of its choosing.
// Writes go through the same committer as audit records, so they have the
// same durability and can be made atomic with a record (AppendWithState).

// Put stores value under key in the state namespace, durable per
// Options.Durability when it returns. Errors wrap ErrUnavailable.
func (j *Journal) Put(ctx context.Context, key string, value []byte) error {
	if key == "" {
		return errEmptyKey
	}
	return j.commitState(ctx, []StateChange{{Key: key, Value: value}})
}

// Delete removes key from the state namespace; a missing key is not an
// error.
func (j *Journal) Delete(ctx context.Context, key string) error {
	if key == "" {
		return errEmptyKey
	}
	return j.commitState(ctx, []StateChange{{Key: key, Delete: true}})
}

// Get returns a copy of the value under key, or ErrNotFound.
func (j *Journal) Get(key string) ([]byte, error) {
	if key == "" {
		return nil, errEmptyKey
	}
	db, err := j.readDB()
	if err != nil {
		return nil, err
	}
	defer j.dbMu.RUnlock()
	v, closer, err := db.Get(stateKey(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("journal: get %q: %w", key, err)
	}
	out := append([]byte(nil), v...)
	_ = closer.Close()
	return out, nil
}

// ScanState calls fn for every state key starting with prefix, in key
// order. fn's value is only valid during the call. An error from fn stops
// the scan and is returned.
func (j *Journal) ScanState(ctx context.Context, prefix string, fn func(key string, value []byte) error) error {
	db, err := j.readDB()
	if err != nil {
		return err
	}
	defer j.dbMu.RUnlock()
	lower := stateKey(prefix)
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(lower)})
	if err != nil {
		return fmt.Errorf("journal: scan state %q: %w", prefix, err)
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(string(it.Key()[len(statePrefix):]), it.Value()); err != nil {
			return err
		}
	}
	return it.Error()
}

// prefixEnd returns the least key greater than every key starting with p.
func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] != 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}
