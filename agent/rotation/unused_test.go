package rotation

import (
	"context"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/providers"
)

// keyFiles are the software provider's key files: one per key it holds.
func (e *env) keyFiles() []string {
	e.t.Helper()
	m, err := filepath.Glob(filepath.Join(e.dir, "keys", "*.pem"))
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

// A rotation that fails before its cut-over used to leave its new key in
// the provider, and every retry made one more (the attempt counter gives
// each a new name): a scheduled rotation failing every retry_after fills a
// token with few object slots. The key of an attempt that never cut over
// never signed, so it is destroyed; a key that was active, even briefly,
// is kept.
func TestFailedAttemptsLeaveNoUnusedKeys(t *testing.T) {
	const attempts = 3
	for _, tc := range []struct {
		name   string
		modify func(e *env, o *RotateOptions) context.Context
		step   string
		kept   bool // the key was active: it stays
	}{
		{"csr hook", func(e *env, o *RotateOptions) context.Context {
			e.rot.hook = func(step string) error {
				if step == StepCSR {
					return errInjected
				}
				return nil
			}
			return context.Background()
		}, StepCSR, false},
		{"csr signing error", func(e *env, o *RotateOptions) context.Context {
			o.Signer = failingSigner{providers.ErrUnavailable}
			return context.Background()
		}, StepCSR, false},
		{"timeout", func(e *env, o *RotateOptions) context.Context {
			o.Signer = &blockingSigner{release: make(chan struct{})} // blocks on the CSR
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			e.t.Cleanup(cancel)
			return ctx
		}, StepCSR, false},
		{"after the cut-over", func(e *env, o *RotateOptions) context.Context {
			e.rot.hook = func(step string) error {
				if step == StepCutover {
					return errInjected
				}
				return nil
			}
			return context.Background()
		}, StepCutover, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			before := e.keyFiles()
			for i := range attempts {
				o := e.opts()
				ctx := tc.modify(e, &o)
				_, err := e.rot.Rotate(ctx, testSlot, o)
				var se *StepError
				if !errors.As(err, &se) || se.Step != tc.step {
					t.Fatalf("attempt %d: %v, want a failure at %s", i+1, err, tc.step)
				}
			}
			left := len(e.keyFiles()) - len(before)
			want := 0
			if tc.kept {
				want = attempts
			}
			if left != want {
				t.Fatalf("%d failed attempts left %d keys in the provider, want %d: %v", attempts, left, want, e.keyFiles())
			}
			sl, _ := e.store.Get(testSlot)
			for _, v := range sl.Versions {
				if _, err := os.Stat(filepath.Join(e.dir, "keys", url.PathEscape(v.Key)+".pem")); err != nil {
					t.Fatalf("v%d's key file: %v", v.Number, err)
				}
			}
			recs := e.records()
			destroyed := 0
			for _, r := range recs {
				if r.Op == "rotate.destroy" && r.CodeName == "OK" {
					destroyed++
				}
			}
			if destroyed != attempts-want {
				t.Fatalf("%d rotate.destroy records, want %d: %v", destroyed, attempts-want, ops(recs))
			}

			// The next attempt still succeeds, and its key signs.
			e.rot.hook = nil
			res := e.rotate()
			alg, in, sig := signWith(t, e.soft, res.New, []byte("after"))
			if err := providers.Verify(res.New.Public, alg, in, sig); err != nil {
				t.Fatal(err)
			}
			if got := len(e.keyFiles()) - len(before); got != want+1 {
				t.Fatalf("%d keys after the rotation, want %d", got, want+1)
			}
		})
	}
}

// errCrash is the panic that stands for the process dying in a step.
var errCrash = errors.New("the process dies here")

// An attempt that dies after generating its key cannot destroy it; its
// start record committed the key's name in the slot's state, which only a
// cut-over clears. The next attempt's start destroys it, and journals so.
// A key whose cut-over was committed is a version and is kept.
func TestNextAttemptDestroysTheKeyOfACrashedOne(t *testing.T) {
	for _, tc := range []struct {
		step      string
		destroyed bool
	}{
		{StepStart, false}, // no key made: nothing to destroy, "not in" the provider
		{StepKeygen, true},
		{StepCSR, true},
		{StepCutover, false},
	} {
		t.Run(tc.step, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			before := e.keyFiles()
			e.rot.hook = func(step string) error {
				if step == tc.step {
					panic(errCrash)
				}
				return nil
			}
			func() {
				defer func() {
					if r := recover(); r != errCrash {
						t.Fatalf("Rotate did not die in step %s: %v", tc.step, r)
					}
				}()
				_, _ = e.rot.Rotate(context.Background(), testSlot, e.opts())
			}()
			e.reopen()
			left := e.keyFiles()
			if tc.step != StepStart && len(left) != len(before)+1 {
				t.Fatalf("after the crash: %d key files, want %d", len(left), len(before)+1)
			}
			crashed := e.active()

			res := e.rotate()
			var destroys []string
			for _, r := range e.records() {
				if r.Op == "rotate.destroy" {
					destroys = append(destroys, r.CodeName+" "+r.Detail)
				}
			}
			sl, _ := e.store.Get(testSlot)
			kept := 1 // v1
			if tc.step == StepCutover {
				kept = 2 // v1 and the crashed attempt's v2, active after it
				if crashed.Number != 2 {
					t.Fatalf("after a crash past the cut-over v%d is active, want v2", crashed.Number)
				}
			}
			if got := len(e.keyFiles()); got != kept+1 {
				t.Fatalf("%d key files after the next rotation, want %d (records: %v)", got, kept+1, destroys)
			}
			for _, v := range sl.Versions {
				if _, err := os.Stat(filepath.Join(e.dir, "keys", url.PathEscape(v.Key)+".pem")); err != nil {
					t.Fatalf("v%d's key file: %v", v.Number, err)
				}
			}
			switch {
			case tc.destroyed:
				if len(destroys) != 1 || !strings.HasPrefix(destroys[0], "OK unused key "+testSlot+"/v2 ") || !strings.Contains(destroys[0], "destroyed") {
					t.Fatalf("destroy records %q, want v2's key destroyed", destroys)
				}
			case tc.step == StepStart:
				if len(destroys) != 1 || !strings.Contains(destroys[0], "not in soft") {
					t.Fatalf("destroy records %q, want one saying the key was never made", destroys)
				}
			default:
				if len(destroys) != 0 {
					t.Fatalf("destroy records %q after a crash past the cut-over", destroys)
				}
			}
			if sl.AttemptKey != (AttemptKey{}) {
				t.Fatalf("the slot still names an attempt's key after a rotation: %+v", sl.AttemptKey)
			}
			alg, in, sig := signWith(t, e.soft, res.New, []byte("after"))
			if err := providers.Verify(res.New.Public, alg, in, sig); err != nil {
				t.Fatal(err)
			}
			if rep, err := e.j.Verify(context.Background()); err != nil || !rep.OK() {
				t.Fatalf("journal verify: %+v %v", rep, err)
			}
		})
	}
}

// dyingMaker generates the key, then the process dies before the keygen
// record: the key exists, and no record or state holds its kid. The
// rotation's goroutine ends there (runtime.Goexit): a panic would not do,
// as the rotation recovers a provider's panic and fails the attempt.
type dyingMaker struct{ KeyMakerDestroyer }

// KeyMakerDestroyer is what the software provider is to a rotation.
type KeyMakerDestroyer interface {
	KeyMaker
	KeyDestroyer
}

func (m dyingMaker) GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	if _, err := m.KeyMakerDestroyer.GenerateKey(ctx, name, kt); err != nil {
		return providers.KeyInfo{}, err
	}
	runtime.Goexit()
	return providers.KeyInfo{}, nil
}

// An attempt that died between making its key and journaling it left a
// name in the slot's state and no kid: the next attempt cannot tell the
// key under that name from another's (an operator's, on a shared token),
// so it keeps it and says so in a rotate.destroy record that is not OK.
func TestACrashedAttemptsKeyWithoutItsKidIsKept(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	before := e.keyFiles()
	died := make(chan struct{})
	go func() {
		defer close(died)
		o := e.opts()
		o.Maker = dyingMaker{e.soft}
		_, err := e.rot.Rotate(context.Background(), testSlot, o)
		t.Errorf("Rotate did not die in its key generation: %v", err)
	}()
	<-died
	e.reopen()
	if got := len(e.keyFiles()); got != len(before)+1 {
		t.Fatalf("after the crash: %d key files, want %d", got, len(before)+1)
	}
	e.rotate()
	if got := len(e.keyFiles()); got != len(before)+2 {
		t.Fatalf("%d key files after the next rotation, want %d: the crashed attempt's key and the new one", got, len(before)+2)
	}
	var destroys []string
	for _, r := range e.records() {
		if r.Op == "rotate.destroy" {
			destroys = append(destroys, r.CodeName+" "+r.Detail)
		}
	}
	if len(destroys) != 1 || strings.HasPrefix(destroys[0], "OK ") || !strings.Contains(destroys[0], "not journaled") {
		t.Fatalf("destroy records %q, want one keeping the key, its generation not journaled", destroys)
	}
	if sl, _ := e.store.Get(testSlot); sl.AttemptKey != (AttemptKey{}) {
		t.Fatalf("the slot still names an attempt's key: %+v", sl.AttemptKey)
	}
}
