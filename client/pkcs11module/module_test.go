package pkcs11module

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

const ckmEdDSA = 0x1057 // CKM_EDDSA; miekg/pkcs11 does not name it

var message = []byte("a message signed through libsigil-pkcs11.so")

func sum(h crypto.Hash, b []byte) []byte {
	x := h.New()
	x.Write(b)
	return x.Sum(nil)
}

func digestInfo(h crypto.Hash, b []byte) []byte {
	prefix, err := providers.DigestInfoPrefix(h)
	if err != nil {
		panic(err)
	}
	return append(append([]byte{}, prefix...), sum(h, b)...)
}

// verify checks a PKCS#11-format signature (ECDSA r||s, RSA, Ed25519) over
// message with pub, for the hash the case signed with.
func verify(pub crypto.PublicKey, h crypto.Hash, pss bool, sig []byte) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		n := len(sig) / 2
		if !ecdsa.Verify(k, sum(h, message), new(big.Int).SetBytes(sig[:n]), new(big.Int).SetBytes(sig[n:])) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case *rsa.PublicKey:
		if pss {
			return rsa.VerifyPSS(k, h, sum(h, message), sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		}
		return rsa.VerifyPKCS1v15(k, h, sum(h, message), sig)
	case ed25519.PublicKey:
		if !ed25519.Verify(k, message, sig) {
			return errors.New("Ed25519 signature does not verify")
		}
		return nil
	}
	return fmt.Errorf("key type %T", pub)
}

type mechCase struct {
	name string
	key  string
	mech *p11.Mechanism
	data []byte
	hash crypto.Hash
	pss  bool
}

func mechCases(prefix string) []mechCase {
	k := func(n string) string { return prefix + n }
	pss := func(m uint, h, mgf, salt uint) *p11.Mechanism {
		return p11.NewMechanism(m, p11.NewPSSParams(h, mgf, salt))
	}
	return []mechCase{
		{"ECDSA/P-256", k("p256"), p11.NewMechanism(p11.CKM_ECDSA, nil), sum(crypto.SHA256, message), crypto.SHA256, false},
		{"ECDSA_SHA256/P-256", k("p256"), p11.NewMechanism(p11.CKM_ECDSA_SHA256, nil), message, crypto.SHA256, false},
		{"RSA_PKCS/SHA-256", k("rsa"), p11.NewMechanism(p11.CKM_RSA_PKCS, nil), digestInfo(crypto.SHA256, message), crypto.SHA256, false},
		{"RSA_PKCS/SHA-512", k("rsa"), p11.NewMechanism(p11.CKM_RSA_PKCS, nil), digestInfo(crypto.SHA512, message), crypto.SHA512, false},
		{"SHA256_RSA_PKCS", k("rsa"), p11.NewMechanism(p11.CKM_SHA256_RSA_PKCS, nil), message, crypto.SHA256, false},
		{"RSA_PKCS_PSS/SHA-256", k("rsa"), pss(p11.CKM_RSA_PKCS_PSS, p11.CKM_SHA256, p11.CKG_MGF1_SHA256, 32), sum(crypto.SHA256, message), crypto.SHA256, true},
		{"SHA256_RSA_PKCS_PSS", k("rsa"), pss(p11.CKM_SHA256_RSA_PKCS_PSS, p11.CKM_SHA256, p11.CKG_MGF1_SHA256, 32), message, crypto.SHA256, true},
		{"EDDSA", k("ed"), p11.NewMechanism(ckmEdDSA, nil), message, 0, false},
	}
}

// Every mechanism signs with exactly one agent round trip, single-part and
// multi-part: the length query miekg makes first is answered locally.
func TestOneRoundTripPerSignature(t *testing.T) {
	keys := newFakeKeys(t)
	fake := startFake(t, keys)
	t.Setenv(proto.SocketEnv, fake.sock)
	ctx := openModule(t)
	s := openSession(t, ctx)
	pubs := map[string]crypto.PublicKey{}
	for _, k := range keys {
		pubs[k.name] = k.signer.Public()
	}
	cases := append(mechCases(""),
		mechCase{"ECDSA/P-384", "p384", p11.NewMechanism(p11.CKM_ECDSA, nil), sum(crypto.SHA384, message), crypto.SHA384, false},
		mechCase{"ECDSA_SHA384/P-384", "p384", p11.NewMechanism(p11.CKM_ECDSA_SHA384, nil), message, crypto.SHA384, false},
		mechCase{"SHA512_RSA_PKCS", "rsa", p11.NewMechanism(p11.CKM_SHA512_RSA_PKCS, nil), message, crypto.SHA512, false},
	)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			key := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, tc.key)
			fake.reset()
			if err := ctx.SignInit(s, []*p11.Mechanism{tc.mech}, key); err != nil {
				t.Fatalf("C_SignInit: %v", err)
			}
			sig, err := ctx.Sign(s, tc.data)
			if err != nil {
				t.Fatalf("C_Sign: %v", err)
			}
			if n, signs := fake.total(), fake.ops[proto.OpSign].Load(); n != 1 || signs != 1 {
				t.Fatalf("C_SignInit + C_Sign (with its length query) made %d agent requests (%d Sign), want 1", n, signs)
			}
			if err := verify(pubs[tc.key], tc.hash, tc.pss, sig); err != nil {
				t.Fatal(err)
			}
			// Multi-part: the same signature input in three pieces.
			fake.reset()
			if err := ctx.SignInit(s, []*p11.Mechanism{tc.mech}, key); err != nil {
				t.Fatalf("C_SignInit: %v", err)
			}
			third := len(tc.data) / 3
			for _, part := range [][]byte{tc.data[:third], tc.data[third : 2*third], tc.data[2*third:]} {
				if err := ctx.SignUpdate(s, part); err != nil {
					t.Fatalf("C_SignUpdate: %v", err)
				}
			}
			if sig, err = ctx.SignFinal(s); err != nil {
				t.Fatalf("C_SignFinal: %v", err)
			}
			if n := fake.total(); n != 1 {
				t.Fatalf("multi-part signature made %d agent requests, want 1", n)
			}
			if err := verify(pubs[tc.key], tc.hash, tc.pss, sig); err != nil {
				t.Fatalf("multi-part: %v", err)
			}
		})
	}
}

// Each agent result code surfaces as the CKR docs/pkcs11-module.md says,
// and ends the signing operation.
func TestResultCodes(t *testing.T) {
	fake, ctx, s, key := fakeP256Session(t)
	want := map[proto.Code]uint{
		proto.BadRequest:           p11.CKR_DATA_INVALID,
		proto.UnsupportedVersion:   p11.CKR_DEVICE_ERROR,
		proto.Unauthenticated:      p11.CKR_FUNCTION_REJECTED,
		proto.PermissionDenied:     p11.CKR_FUNCTION_REJECTED,
		proto.NotFound:             p11.CKR_KEY_HANDLE_INVALID,
		proto.UnsupportedAlgorithm: p11.CKR_MECHANISM_INVALID,
		proto.RateLimited:          p11.CKR_FUNCTION_REJECTED,
		proto.QuotaExceeded:        p11.CKR_FUNCTION_REJECTED,
		proto.OutsideWindow:        p11.CKR_FUNCTION_REJECTED,
		proto.Paused:               p11.CKR_FUNCTION_REJECTED,
		proto.KeyRetired:           p11.CKR_FUNCTION_REJECTED,
		proto.PINIncorrect:         p11.CKR_DEVICE_ERROR,
		proto.TokenLocked:          p11.CKR_DEVICE_ERROR,
		proto.Unavailable:          p11.CKR_DEVICE_ERROR,
		proto.DeadlineExceeded:     p11.CKR_DEVICE_ERROR,
		proto.JournalUnavailable:   p11.CKR_DEVICE_ERROR,
		proto.Internal:             p11.CKR_GENERAL_ERROR,
		proto.Code(200):            p11.CKR_GENERAL_ERROR, // a code newer than the module
	}
	for _, code := range append(proto.Codes()[1:], proto.Code(200)) {
		t.Run(code.String(), func(t *testing.T) {
			fake.code.Store(uint32(code))
			if err := ctx.SignInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, key); err != nil {
				t.Fatalf("C_SignInit: %v", err)
			}
			_, err := ctx.Sign(s, make([]byte, 32))
			if got := ckr(err); got != want[code] {
				t.Fatalf("agent %s: C_Sign gave %v, want %v", code, err, p11.Error(want[code]))
			}
			if _, err := ctx.Sign(s, make([]byte, 32)); ckr(err) != p11.CKR_OPERATION_NOT_INITIALIZED {
				t.Fatalf("after a refusal the operation is still active: %v", err)
			}
		})
	}
	fake.code.Store(uint32(proto.OK))
	// The agent gone: the device is in error, and the session lives on.
	fake.close()
	if err := ctx.SignInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, key); err != nil {
		t.Fatalf("C_SignInit needs no agent: %v", err)
	}
	if _, err := ctx.Sign(s, make([]byte, 32)); ckr(err) != p11.CKR_DEVICE_ERROR {
		t.Fatalf("agent gone: %v, want CKR_DEVICE_ERROR", err)
	}
}

// What the module refuses before asking the agent.
func TestLocalRefusals(t *testing.T) {
	fake, ctx, s, p256 := fakeP256Session(t)
	p256pub := findKey(t, ctx, s, p11.CKO_PUBLIC_KEY, "p256")
	rsaKey := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "rsa")
	ed := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "ed")
	fake.reset()
	initErr := []struct {
		name string
		mech *p11.Mechanism
		key  p11.ObjectHandle
		want uint
	}{
		{"RSA mechanism on an EC key", p11.NewMechanism(p11.CKM_RSA_PKCS, nil), p256, p11.CKR_KEY_TYPE_INCONSISTENT},
		{"public key", p11.NewMechanism(p11.CKM_ECDSA, nil), p256pub, p11.CKR_KEY_FUNCTION_NOT_PERMITTED},
		{"no such object", p11.NewMechanism(p11.CKM_ECDSA, nil), 9999, p11.CKR_KEY_HANDLE_INVALID},
		{"unknown mechanism", p11.NewMechanism(p11.CKM_SHA1_RSA_PKCS, nil), rsaKey, p11.CKR_MECHANISM_INVALID},
		{"PSS without parameters", p11.NewMechanism(p11.CKM_RSA_PKCS_PSS, nil), rsaKey, p11.CKR_MECHANISM_PARAM_INVALID},
		{"PSS salt the agent does not use", p11.NewMechanism(p11.CKM_RSA_PKCS_PSS, p11.NewPSSParams(p11.CKM_SHA256, p11.CKG_MGF1_SHA256, 20)), rsaKey, p11.CKR_MECHANISM_PARAM_INVALID},
		{"PSS MGF of another hash", p11.NewMechanism(p11.CKM_SHA256_RSA_PKCS_PSS, p11.NewPSSParams(p11.CKM_SHA256, p11.CKG_MGF1_SHA384, 32)), rsaKey, p11.CKR_MECHANISM_PARAM_INVALID},
	}
	for _, tc := range initErr {
		if err := ctx.SignInit(s, []*p11.Mechanism{tc.mech}, tc.key); ckr(err) != tc.want {
			t.Errorf("%s: C_SignInit gave %v, want %v", tc.name, err, p11.Error(tc.want))
		}
	}
	signErr := []struct {
		name string
		mech *p11.Mechanism
		key  p11.ObjectHandle
		data []byte
		want uint
	}{
		{"CKM_ECDSA on a 20-byte digest", p11.NewMechanism(p11.CKM_ECDSA, nil), p256, make([]byte, 20), p11.CKR_DATA_LEN_RANGE},
		{"CKM_RSA_PKCS without a DigestInfo", p11.NewMechanism(p11.CKM_RSA_PKCS, nil), rsaKey, make([]byte, 36), p11.CKR_DATA_INVALID},
		{"CKM_RSA_PKCS with a SHA-1 DigestInfo", p11.NewMechanism(p11.CKM_RSA_PKCS, nil), rsaKey, append([]byte{0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14}, make([]byte, 20)...), p11.CKR_DATA_INVALID},
		{"PSS digest of the wrong length", p11.NewMechanism(p11.CKM_RSA_PKCS_PSS, p11.NewPSSParams(p11.CKM_SHA256, p11.CKG_MGF1_SHA256, 32)), rsaKey, make([]byte, 48), p11.CKR_DATA_LEN_RANGE},
		{"Ed25519 message over the frame", p11.NewMechanism(ckmEdDSA, nil), ed, make([]byte, proto.DefaultMaxFrame), p11.CKR_DATA_LEN_RANGE},
	}
	for _, tc := range signErr {
		if err := ctx.SignInit(s, []*p11.Mechanism{tc.mech}, tc.key); err != nil {
			t.Fatalf("%s: C_SignInit: %v", tc.name, err)
		}
		if _, err := ctx.Sign(s, tc.data); ckr(err) != tc.want {
			t.Errorf("%s: C_Sign gave %v, want %v", tc.name, err, p11.Error(tc.want))
		}
	}
	if n := fake.total(); n != 0 {
		t.Fatalf("refusals made %d agent requests", n)
	}
}

// C_Sign after C_SignUpdate is refused, and, as any C_Sign error but
// CKR_BUFFER_TOO_SMALL must (PKCS#11 v2.40 section 5.12), ends the operation:
// the session can begin a new one at once.
func TestSignAfterSignUpdateEndsOperation(t *testing.T) {
	fake, ctx, _, _ := fakeP256Session(t)
	var pub crypto.PublicKey
	for _, k := range fake.keys {
		if k.name == "p256" {
			pub = k.signer.Public()
		}
	}
	for _, tc := range []struct {
		name string
		mech uint // one that buffers its input, one that hashes it here
		data []byte
	}{
		{"ECDSA", p11.CKM_ECDSA, sum(crypto.SHA256, message)},
		{"ECDSA_SHA256", p11.CKM_ECDSA_SHA256, message},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openSession(t, ctx) // each case its own, so one's leftover cannot fail the next
			key := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256")
			mech := []*p11.Mechanism{p11.NewMechanism(tc.mech, nil)}
			fake.reset()
			if err := ctx.SignInit(s, mech, key); err != nil {
				t.Fatalf("C_SignInit: %v", err)
			}
			if err := ctx.SignUpdate(s, tc.data[:10]); err != nil {
				t.Fatalf("C_SignUpdate: %v", err)
			}
			if _, err := ctx.Sign(s, tc.data); ckr(err) != p11.CKR_OPERATION_ACTIVE {
				t.Fatalf("C_Sign after C_SignUpdate: %v, want CKR_OPERATION_ACTIVE", err)
			}
			if err := ctx.SignInit(s, mech, key); err != nil {
				t.Fatalf("C_SignInit after the refused C_Sign: %v (the operation was left active)", err)
			}
			sig, err := ctx.Sign(s, tc.data)
			if err != nil {
				t.Fatalf("C_Sign: %v", err)
			}
			if err := verify(pub, crypto.SHA256, false, sig); err != nil {
				t.Fatal(err)
			}
			if n := fake.total(); n != 1 {
				t.Fatalf("%d agent requests, want 1: the refused C_Sign asks nothing", n)
			}
		})
	}
}

// Functions outside the signing subset say so; the rest of the token's
// surface answers as PKCS#11 v2.40 says.
func TestTokenSurface(t *testing.T) {
	fake := startFake(t, newFakeKeys(t))
	t.Setenv(proto.SocketEnv, fake.sock)
	ctx := openModule(t)
	if err := ctx.Initialize(); ckr(err) != p11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
		t.Fatalf("second C_Initialize: %v", err)
	}
	info, err := ctx.GetInfo()
	if err != nil || info.CryptokiVersion.Major != 2 || info.CryptokiVersion.Minor != 40 {
		t.Fatalf("C_GetInfo: %+v %v", info, err)
	}
	slots, err := ctx.GetSlotList(true)
	if err != nil || len(slots) != 1 {
		t.Fatalf("C_GetSlotList: %v %v", slots, err)
	}
	ti, err := ctx.GetTokenInfo(slots[0])
	if err != nil || ti.Label != "sigil" || ti.Flags&p11.CKF_LOGIN_REQUIRED != 0 {
		t.Fatalf("C_GetTokenInfo: %+v %v", ti, err)
	}
	mechs, err := ctx.GetMechanismList(slots[0])
	if err != nil || len(mechs) != 13 {
		t.Fatalf("C_GetMechanismList: %d mechanisms, %v", len(mechs), err)
	}
	mi, err := ctx.GetMechanismInfo(slots[0], []*p11.Mechanism{p11.NewMechanism(p11.CKM_RSA_PKCS, nil)})
	if err != nil || mi.MinKeySize != 2048 || mi.MaxKeySize != 2048 || mi.Flags&p11.CKF_SIGN == 0 {
		t.Fatalf("C_GetMechanismInfo: %+v %v", mi, err)
	}
	s := openSession(t, ctx)
	// A context-specific login belongs right after an operation's Init
	// and logs no one in (v2.40 section 5.6).
	if err := ctx.Login(s, p11.CKU_CONTEXT_SPECIFIC, "1234"); ckr(err) != p11.CKR_OPERATION_NOT_INITIALIZED {
		t.Fatalf("C_Login(CKU_CONTEXT_SPECIFIC) with no operation: %v, want CKR_OPERATION_NOT_INITIALIZED", err)
	}
	if si, err := ctx.GetSessionInfo(s); err != nil || si.State != p11.CKS_RO_PUBLIC_SESSION {
		t.Fatalf("C_GetSessionInfo after a refused context-specific login: %+v %v", si, err)
	}
	// No SO functions here, and an SO may not log in while a read-only
	// session exists (v2.40 section 5.6); CKU_SO is a valid user type.
	if err := ctx.Login(s, p11.CKU_SO, "so"); ckr(err) != p11.CKR_SESSION_READ_ONLY_EXISTS {
		t.Fatalf("C_Login(CKU_SO) with a read-only session: %v, want CKR_SESSION_READ_ONLY_EXISTS", err)
	}
	if err := ctx.Login(s, 7, "x"); ckr(err) != p11.CKR_USER_TYPE_INVALID {
		t.Fatalf("C_Login(user type 7): %v, want CKR_USER_TYPE_INVALID", err)
	}
	if err := ctx.Login(s, p11.CKU_USER, "any PIN at all"); err != nil {
		t.Fatalf("C_Login: %v", err)
	}
	if si, err := ctx.GetSessionInfo(s); err != nil || si.State != p11.CKS_RO_USER_FUNCTIONS {
		t.Fatalf("C_GetSessionInfo after login: %+v %v", si, err)
	}
	if err := ctx.Logout(s); err != nil {
		t.Fatalf("C_Logout: %v", err)
	}
	key := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256")
	if err := ctx.SignInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, key); err != nil {
		t.Fatal(err)
	}
	if err := ctx.Login(s, p11.CKU_CONTEXT_SPECIFIC, "1234"); err != nil {
		t.Fatalf("C_Login(CKU_CONTEXT_SPECIFIC) after C_SignInit: %v", err)
	}
	if sig, err := ctx.Sign(s, make([]byte, 32)); err != nil || len(sig) != 64 {
		t.Fatalf("C_Sign after a context-specific login: %d bytes, %v", len(sig), err)
	}
	if si, err := ctx.GetSessionInfo(s); err != nil || si.State != p11.CKS_RO_PUBLIC_SESSION {
		t.Fatalf("C_GetSessionInfo after a context-specific login: %+v %v", si, err)
	}
	if err := ctx.EncryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_RSA_PKCS, nil)}, key); ckr(err) != p11.CKR_FUNCTION_NOT_SUPPORTED {
		t.Errorf("C_EncryptInit: %v", err)
	}
	if _, err := ctx.GenerateRandom(s, 16); ckr(err) != p11.CKR_FUNCTION_NOT_SUPPORTED {
		t.Errorf("C_GenerateRandom: %v", err)
	}
	if err := ctx.DestroyObject(s, key); ckr(err) != p11.CKR_FUNCTION_NOT_SUPPORTED {
		t.Errorf("C_DestroyObject: %v", err)
	}
	if _, err := ctx.GetAttributeValue(s, key, []*p11.Attribute{p11.NewAttribute(p11.CKA_VALUE, nil)}); ckr(err) != p11.CKR_ATTRIBUTE_SENSITIVE {
		t.Errorf("private CKA_VALUE: %v", err)
	}
	if _, err := ctx.GetAttributeValue(s, key, []*p11.Attribute{p11.NewAttribute(p11.CKA_CERTIFICATE_TYPE, nil)}); ckr(err) != p11.CKR_ATTRIBUTE_TYPE_INVALID {
		t.Errorf("an attribute keys do not have: %v", err)
	}
	if err := ctx.CloseSession(s); err != nil {
		t.Fatal(err)
	}
	if _, err := ctx.GetSessionInfo(s); ckr(err) != p11.CKR_SESSION_HANDLE_INVALID {
		t.Fatalf("closed session: %v", err)
	}
}

// The objects' attributes carry the agent's public keys exactly.
func TestObjectAttributes(t *testing.T) {
	f := startFixture(t, fixtureOptions{})
	ctx := openModule(t)
	s := openSession(t, ctx)
	for _, name := range []string{"p256", "p384", "rsa", "ed"} {
		pub := findKey(t, ctx, s, p11.CKO_PUBLIC_KEY, name)
		priv := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, name)
		spki, _ := x509.MarshalPKIXPublicKey(f.keys[name].Public)
		for _, h := range []p11.ObjectHandle{pub, priv} {
			attrs, err := ctx.GetAttributeValue(s, h, []*p11.Attribute{
				p11.NewAttribute(p11.CKA_ID, nil), p11.NewAttribute(p11.CKA_PUBLIC_KEY_INFO, nil),
			})
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if fmt.Sprintf("%x", attrs[0].Value) != f.keys[name].KID {
				t.Errorf("%s: CKA_ID %x, kid %s", name, attrs[0].Value, f.keys[name].KID)
			}
			if !bytes.Equal(attrs[1].Value, spki) {
				t.Errorf("%s: CKA_PUBLIC_KEY_INFO differs from the agent's key", name)
			}
		}
		var want []*p11.Attribute
		switch k := f.keys[name].Public.(type) {
		case *ecdsa.PublicKey:
			pt, _ := k.ECDH()
			want = []*p11.Attribute{p11.NewAttribute(p11.CKA_EC_POINT, append([]byte{0x04, byte(len(pt.Bytes()))}, pt.Bytes()...))}
		case *rsa.PublicKey:
			want = []*p11.Attribute{p11.NewAttribute(p11.CKA_MODULUS, k.N.Bytes()), p11.NewAttribute(p11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(k.E)).Bytes())}
		case ed25519.PublicKey:
			want = []*p11.Attribute{p11.NewAttribute(p11.CKA_VALUE, []byte(k)), p11.NewAttribute(p11.CKA_EC_PARAMS, []byte{0x06, 0x03, 0x2b, 0x65, 0x70})}
		}
		// Attributes every key object has (v2.40 sections 4.7, 4.9, 4.10).
		unavailable := make([]byte, 8)
		binary.NativeEndian.PutUint64(unavailable, ^uint64(0)) // CK_UNAVAILABLE_INFORMATION
		for _, c := range []struct {
			obj  p11.ObjectHandle
			attr *p11.Attribute
		}{
			{priv, p11.NewAttribute(p11.CKA_KEY_GEN_MECHANISM, unavailable)},
			{pub, p11.NewAttribute(p11.CKA_KEY_GEN_MECHANISM, unavailable)},
			{priv, p11.NewAttribute(p11.CKA_UNWRAP_TEMPLATE, []byte{})},
			{pub, p11.NewAttribute(p11.CKA_WRAP_TEMPLATE, []byte{})},
		} {
			got, err := ctx.GetAttributeValue(s, c.obj, []*p11.Attribute{p11.NewAttribute(c.attr.Type, nil)})
			if err != nil {
				t.Errorf("%s: attribute %#x: %v", name, c.attr.Type, err)
			} else if !bytes.Equal(got[0].Value, c.attr.Value) {
				t.Errorf("%s: attribute %#x = %x, want %x", name, c.attr.Type, got[0].Value, c.attr.Value)
			}
		}
		for _, w := range want {
			got, err := ctx.GetAttributeValue(s, pub, []*p11.Attribute{p11.NewAttribute(w.Type, nil)})
			if err != nil {
				t.Errorf("%s: attribute %#x: %v", name, w.Type, err)
			} else if !bytes.Equal(got[0].Value, w.Value) {
				t.Errorf("%s: attribute %#x = %x, want %x", name, w.Type, got[0].Value, w.Value)
			}
		}
	}
}

// Threads sign concurrently, each on its own session, and every signature
// verifies.
func TestConcurrentSigning(t *testing.T) {
	f := startFixture(t, fixtureOptions{})
	ctx := openModule(t)
	const workers, each = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			tc := mechCases("")[[]int{1, 4, 7}[w%3]] // ECDSA_SHA256, SHA256_RSA_PKCS, EDDSA
			s, err := ctx.OpenSession(1, p11.CKF_SERIAL_SESSION)
			if err != nil {
				errs <- err
				return
			}
			defer ctx.CloseSession(s)
			key := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, tc.key)
			for i := 0; i < each; i++ {
				if err := ctx.SignInit(s, []*p11.Mechanism{tc.mech}, key); err != nil {
					errs <- fmt.Errorf("worker %d C_SignInit: %w", w, err)
					return
				}
				sig, err := ctx.Sign(s, tc.data)
				if err != nil {
					errs <- fmt.Errorf("worker %d C_Sign: %w", w, err)
					return
				}
				if err := verify(f.keys[tc.key].Public, tc.hash, tc.pss, sig); err != nil {
					errs <- fmt.Errorf("worker %d %s: %w", w, tc.name, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// C_Finalize then C_Initialize again works, and in between the module
// answers CKR_CRYPTOKI_NOT_INITIALIZED.
func TestFinalizeAndInitializeAgain(t *testing.T) {
	f := startFixture(t, fixtureOptions{})
	ctx := p11.New(modulePath(t))
	if ctx == nil {
		t.Fatal("cannot load the module")
	}
	defer ctx.Destroy()
	var before []p11.SessionHandle
	for round := 0; round < 3; round++ {
		if err := ctx.Initialize(); err != nil {
			t.Fatalf("round %d: C_Initialize: %v", round, err)
		}
		s := openSession(t, ctx)
		// Handles die with C_Finalize: one kept from an earlier round
		// must not name this round's session.
		for _, old := range before {
			if _, err := ctx.GetSessionInfo(old); ckr(err) != p11.CKR_SESSION_HANDLE_INVALID {
				t.Fatalf("round %d: a session handle from before C_Finalize (%#x, now %#x): %v", round, old, s, err)
			}
		}
		before = append(before, s)
		key := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256")
		if err := ctx.SignInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA_SHA256, nil)}, key); err != nil {
			t.Fatal(err)
		}
		sig, err := ctx.Sign(s, message)
		if err != nil {
			t.Fatalf("round %d: C_Sign: %v", round, err)
		}
		if err := verify(f.keys["p256"].Public, crypto.SHA256, false, sig); err != nil {
			t.Fatal(err)
		}
		if err := ctx.Finalize(); err != nil {
			t.Fatalf("C_Finalize: %v", err)
		}
		if _, err := ctx.GetSlotList(true); ckr(err) != p11.CKR_CRYPTOKI_NOT_INITIALIZED {
			t.Fatalf("after C_Finalize: %v", err)
		}
	}
}

// Object handles die with C_Finalize, as session handles do: one an
// application kept from before names no key after the next C_Initialize,
// whatever the agent lists then. They were numbered from the key table's
// index alone, so a kept handle named whichever key took that index: read
// its attributes and signed with it. Within one initialization a key that
// stays listed keeps its handles, wherever it moves in the list.
func TestObjectHandlesDieWithFinalize(t *testing.T) {
	keys := newFakeKeys(t)
	p256, p384 := keys[0], keys[1]
	fake := startFake(t, []fakeKey{p256, p384})
	t.Setenv(proto.SocketEnv, fake.sock)
	ctx := p11.New(modulePath(t))
	if ctx == nil {
		t.Fatal("cannot load the module")
	}
	defer ctx.Destroy()
	ecdsaMech := []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}
	for _, tc := range []struct {
		name  string
		after []fakeKey // what the agent lists after C_Finalize
	}{
		{"the list unchanged", []fakeKey{p256, p384}},
		{"the keys swapped", []fakeKey{p384, p256}},
		{"the key removed", []fakeKey{p384}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake.setKeys([]fakeKey{p256, p384})
			if err := ctx.Initialize(); err != nil {
				t.Fatalf("C_Initialize: %v", err)
			}
			s := openSession(t, ctx)
			oldPriv := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256")
			oldPub := findKey(t, ctx, s, p11.CKO_PUBLIC_KEY, "p256")
			if err := ctx.Finalize(); err != nil {
				t.Fatalf("C_Finalize: %v", err)
			}
			fake.setKeys(tc.after)
			if err := ctx.Initialize(); err != nil {
				t.Fatalf("C_Initialize again: %v", err)
			}
			defer ctx.Finalize()
			s = openSession(t, ctx)
			// A search fetches the new list: the table is filled again.
			newPriv := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p384")
			for _, h := range []p11.ObjectHandle{oldPriv, oldPub} {
				attrs, err := ctx.GetAttributeValue(s, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, nil)})
				if ckr(err) != p11.CKR_OBJECT_HANDLE_INVALID {
					label := ""
					if err == nil {
						label = string(attrs[0].Value)
					}
					t.Errorf("C_GetAttributeValue on p256's handle %#x from before C_Finalize: label %q, %v; want CKR_OBJECT_HANDLE_INVALID", h, label, err)
				}
			}
			if err := ctx.SignInit(s, ecdsaMech, oldPriv); ckr(err) != p11.CKR_KEY_HANDLE_INVALID {
				signer := "no key"
				if err == nil {
					if sig, err := ctx.Sign(s, sum(crypto.SHA256, message)); err == nil {
						for _, k := range keys {
							if verify(k.signer.Public(), crypto.SHA256, false, sig) == nil {
								signer = k.name
							}
						}
					}
				}
				t.Errorf("C_SignInit with p256's handle %#x from before C_Finalize: %v (signed with %s); want CKR_KEY_HANDLE_INVALID", oldPriv, err, signer)
			}
			// This initialization's handles work, and keep naming their
			// key when a search sees it moved in the list.
			fake.setKeys([]fakeKey{p256, p384})
			if again := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p384"); again != newPriv {
				t.Fatalf("p384's private key moved from handle %#x to %#x within one initialization", newPriv, again)
			}
			sig, err := signMessageECDSA(ctx, s, newPriv)
			if err != nil {
				t.Fatalf("C_Sign with this initialization's handle: %v", err)
			}
			if err := verify(p384.signer.Public(), crypto.SHA256, false, sig); err != nil {
				t.Fatalf("p384's handle: %v", err)
			}
		})
	}
}

// An agent restart costs nothing but the restart: pooled connections the
// agent closed are noticed before use, so the next call after the agent is
// back succeeds; a call while it is down fails and the one after recovers.
func TestAgentRestartReconnects(t *testing.T) {
	f := startFixture(t, fixtureOptions{})
	ctx := openModule(t)
	s := openSession(t, ctx)
	key := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256")
	sign := func() error {
		sig, err := signMessageECDSA(ctx, s, key)
		if err == nil {
			err = verify(f.keys["p256"].Public, crypto.SHA256, false, sig)
		}
		return err
	}
	if err := sign(); err != nil {
		t.Fatal(err)
	}
	f.stop()
	f.start()
	if err := sign(); err != nil {
		t.Fatalf("first call after a restart: %v", err)
	}
	f.stop()
	if err := sign(); ckr(err) != p11.CKR_DEVICE_ERROR {
		t.Fatalf("agent down: %v, want CKR_DEVICE_ERROR", err)
	}
	f.start()
	if err := sign(); err != nil {
		t.Fatalf("agent back: %v", err)
	}
}

// An agent that takes a request and never answers costs the caller
// timeout_ms plus the module's 2 s grace, then CKR_DEVICE_ERROR; the
// connection is not reused, and the next call signs on a fresh one.
func TestUnansweredRequestTimesOut(t *testing.T) {
	fake := startFake(t, newFakeKeys(t))
	conf := filepath.Join(shortDir(t), "pkcs11.conf")
	if err := os.WriteFile(conf, []byte("socket = "+fake.sock+"\ntimeout_ms = 100\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SIGIL_PKCS11_CONF", conf)
	ctx := openModule(t)
	s := openSession(t, ctx)
	key := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256")
	fake.silent.Store(true)
	start := time.Now()
	_, err := signMessageECDSA(ctx, s, key)
	waited := time.Since(start)
	if ckr(err) != p11.CKR_DEVICE_ERROR {
		t.Fatalf("unanswered request: %v, want CKR_DEVICE_ERROR", err)
	}
	if waited < 2100*time.Millisecond || waited > 10*time.Second {
		t.Fatalf("gave up after %v, want timeout_ms (100 ms) + 2 s", waited)
	}
	fake.silent.Store(false)
	conns := fake.conns.Load()
	sig, err := signMessageECDSA(ctx, s, key)
	if err != nil {
		t.Fatalf("after a timeout: %v", err)
	}
	if err := verify(fake.keys[0].signer.Public(), crypto.SHA256, false, sig); err != nil {
		t.Fatal(err)
	}
	if fake.conns.Load() != conns+1 {
		t.Fatalf("the timed-out connection was reused (%d dials, want %d)", fake.conns.Load(), conns+1)
	}
}

// A connection the agent closes right after answering (here, every one) is
// not reused however soon the next call comes: the module skips its stale
// check for a connection pooled a moment ago, and then the send fails
// before the request leaves and goes again on a fresh connection.
func TestConnectionClosedAfterAnswerIsNotReused(t *testing.T) {
	fake, ctx, s, key := fakeP256Session(t)
	fake.hangUp.Store(true)
	for i := range 5 {
		conns := fake.conns.Load()
		sig, err := signMessageECDSA(ctx, s, key)
		if err != nil {
			t.Fatalf("signature %d after the agent hung up: %v", i, err)
		}
		if err := verify(fake.keys[0].signer.Public(), crypto.SHA256, false, sig); err != nil {
			t.Fatal(err)
		}
		<-fake.hungUp // the next call starts after the close, as fast as it can
		if i > 0 && fake.conns.Load() != conns+1 {
			t.Fatalf("signature %d: %d dials, want 1", i, fake.conns.Load()-conns)
		}
	}
}

// The config file's socket comes before $SIGIL_SOCK, so a bad $SIGIL_SOCK
// is not even read when the file names a socket (it used to fail
// C_Initialize first), and a `keys =` line longer than 511 bytes is one
// line (it was cut in two and refused with a line number the file lacks).
func TestConfigFileSocketAndLongLines(t *testing.T) {
	fake := startFake(t, newFakeKeys(t))
	names := []string{"p256"}
	for i := range 60 {
		names = append(names, fmt.Sprintf("payments-release-%02d", i))
	}
	conf := filepath.Join(shortDir(t), "pkcs11.conf")
	bound := "#" + strings.Repeat("x", 65535) + "\n" // a line of 64 KiB exactly, the longest taken
	if err := os.WriteFile(conf, []byte(bound+"socket = "+fake.sock+"\nkeys = "+strings.Join(names, ", ")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SIGIL_PKCS11_CONF", conf)
	t.Setenv("SIGIL_SOCK", "/tmp/"+strings.Repeat("x", 150)+"/agent.sock")
	ctx := openModule(t)
	s := openSession(t, ctx)
	key := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256")
	sig, err := signMessageECDSA(ctx, s, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(fake.keys[0].signer.Public(), crypto.SHA256, false, sig); err != nil {
		t.Fatal(err)
	}
}

// A config file that cannot be read to its end makes C_Initialize fail:
// it used to be taken for one that ended there, settings such as `keys =`
// after the failure silently dropped. A line past 64 KiB is refused, and
// one holding a NUL, which cut the line short for every string function.
func TestConfigFileNotReadWholeIsRefused(t *testing.T) {
	dir := shortDir(t)
	long := filepath.Join(dir, "long.conf")
	os.WriteFile(long, []byte("# "+strings.Repeat("x", 65535)+"\nkeys = p256\n"), 0o600) // 65537 bytes
	nul := filepath.Join(dir, "nul.conf")
	os.WriteFile(nul, []byte("\x00keys = p256\n"), 0o600)
	for _, tc := range []struct{ name, conf string }{
		{"a directory", dir}, // fopen succeeds, the first read fails (EISDIR)
		{"a line past 64 KiB", long},
		{"a NUL byte", nul}, // it hid the keys restriction
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("SIGIL_PKCS11_CONF", tc.conf)
			ctx := p11.New(modulePath(t))
			if ctx == nil {
				t.Fatal("cannot load the module")
			}
			defer ctx.Destroy()
			if err := ctx.Initialize(); ckr(err) != p11.CKR_GENERAL_ERROR {
				if err == nil {
					ctx.Finalize()
				}
				t.Fatalf("C_Initialize: %v, want CKR_GENERAL_ERROR", err)
			}
		})
	}
}

// A final reply (id 0) must carry an error: docs/protocol.md calls one
// with OK malformed. The module took it as the answer to the request in
// flight, so C_Sign returned the zeros such a reply carried as a
// signature; on a fresh connection the Hello's final OK was even handed
// back as the answer to a request never sent.
func TestFinalReplyWithOKIsADeviceError(t *testing.T) {
	keys := newFakeKeys(t)
	fake := startFake(t, keys[3:]) // ed: its signature is the 64 bytes as sent
	t.Setenv(proto.SocketEnv, fake.sock)
	ctx := p11.New(modulePath(t))
	if ctx == nil {
		t.Fatal("cannot load the module")
	}
	defer ctx.Destroy()
	if err := ctx.Initialize(); err != nil {
		t.Fatal(err)
	}
	defer ctx.Finalize()
	s := openSession(t, ctx)
	priv := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "ed")
	fake.finalOK.Store(true)
	for _, where := range []string{"on the pooled connection", "on a fresh connection (the Hello)"} {
		if err := ctx.SignInit(s, []*p11.Mechanism{p11.NewMechanism(ckmEdDSA, nil)}, priv); err != nil {
			t.Fatal(err)
		}
		sig, err := ctx.Sign(s, message)
		if ckr(err) != p11.CKR_DEVICE_ERROR {
			t.Fatalf("%s: C_Sign = %x, %v; want CKR_DEVICE_ERROR", where, sig, err)
		}
	}
}

// A tls://host:port address (the sigil CLI's, in SIGIL_SOCK too) is
// refused at C_Initialize, saying the module speaks Unix sockets only: it
// was taken as a path, showed a slot named after it and failed every call
// with CKR_DEVICE_ERROR and no word why.
func TestTLSAddressIsRefused(t *testing.T) {
	need(t, "pkcs11-tool")
	conf := filepath.Join(shortDir(t), "pkcs11.conf")
	if err := os.WriteFile(conf, []byte("socket = tls://127.0.0.1:7443\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, conf, sock string }{
		{"in SIGIL_SOCK", "", "tls://127.0.0.1:7443"},
		{"in the config file", conf, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("SIGIL_PKCS11_CONF", tc.conf)
			t.Setenv(proto.SocketEnv, tc.sock)
			ctx := p11.New(modulePath(t))
			if ctx == nil {
				t.Fatal("cannot load the module")
			}
			defer ctx.Destroy()
			if err := ctx.Initialize(); ckr(err) != p11.CKR_GENERAL_ERROR {
				if err == nil {
					ctx.Finalize()
				}
				t.Fatalf("C_Initialize: %v, want CKR_GENERAL_ERROR", err)
			}
			out, _ := runErr(nil, "pkcs11-tool", "--module", modulePath(t), "-L")
			for _, want := range []string{"tls://127.0.0.1:7443", "Unix sockets only"} {
				if !strings.Contains(out, want) {
					t.Errorf("pkcs11-tool -L said %q, want it to name %q", out, want)
				}
			}
		})
	}
}
