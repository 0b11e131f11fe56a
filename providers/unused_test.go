package providers

import (
	"errors"
	"testing"
)

func TestUnusedKeysDestroy(t *testing.T) {
	errVet := errors.New("in use")
	errService := errors.New("service refused")
	for _, tc := range []struct {
		name       string
		vet        error
		failFirst  bool // the first destroy call fails
		wantFirst  error
		wantServed bool // after the first call
		wantSecond error
		wantCalls  int
	}{
		{name: "destroyed", wantSecond: ErrNotFound, wantCalls: 1},
		{name: "vet refuses", vet: errVet, wantFirst: errVet, wantServed: true, wantSecond: errVet, wantCalls: 0},
		{name: "service fails, then a retry destroys", failFirst: true, wantFirst: errService, wantCalls: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var served KeySet[string]
			if err := served.Add("k-v2", "key-2"); err != nil {
				t.Fatal(err)
			}
			var u UnusedKeys[string]
			calls := 0
			destroy := func(k string) error {
				if k != "key-2" {
					t.Fatalf("destroy(%q)", k)
				}
				calls++
				if tc.failFirst && calls == 1 {
					return errService
				}
				return nil
			}
			vet := func(string) error { return tc.vet }
			if err := u.Destroy(&served, "k-v2", vet, destroy); !errors.Is(err, tc.wantFirst) || (tc.wantFirst == nil && err != nil) {
				t.Fatalf("first Destroy: %v, want %v", err, tc.wantFirst)
			}
			if _, ok := served.Get("k-v2"); ok != tc.wantServed {
				t.Fatalf("served after the first call: %v, want %v", ok, tc.wantServed)
			}
			err := u.Destroy(&served, "k-v2", vet, destroy)
			if !errors.Is(err, tc.wantSecond) || (tc.wantSecond == nil && err != nil) {
				t.Fatalf("second Destroy: %v, want %v", err, tc.wantSecond)
			}
			if calls != tc.wantCalls {
				t.Fatalf("destroy called %d times, want %d", calls, tc.wantCalls)
			}
		})
	}
	var u UnusedKeys[string]
	var served KeySet[string]
	err := u.Destroy(&served, "never-made", func(string) error { return nil }, func(string) error { return nil })
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrNotFound) {
		t.Fatalf("Destroy of a name never made: %v, want ErrUnavailable", err)
	}
}
