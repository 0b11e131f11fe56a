package client_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"

	"github.com/sigil-agent/sigil/client"
)

// joseAlgorithms lists the JWS algorithms (RFC 7518 §3.1) a key of the
// signer's type makes: ES256 and ES384 bound to their curves (§3.4), as
// strict verifiers require; every RS and PS hash for RSA; EdDSA for
// Ed25519 (RFC 8037).
func joseAlgorithms(pub crypto.PublicKey) []jwa.SignatureAlgorithm {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P384() {
			return []jwa.SignatureAlgorithm{jwa.ES384()}
		}
		return []jwa.SignatureAlgorithm{jwa.ES256()}
	case ed25519.PublicKey:
		return []jwa.SignatureAlgorithm{jwa.EdDSA()}
	}
	return []jwa.SignatureAlgorithm{jwa.RS256(), jwa.RS384(), jwa.RS512(), jwa.PS256(), jwa.PS384(), jwa.PS512()}
}

// A key behind the agent, of every type and from every provider, signs
// JWTs through lestrrat-go/jwx as a key in process does, with the Signer
// passed to jwt.WithKey: jwx verifies each token against the public key,
// and so does Go's crypto, by RFC 7518's rules alone (ECDSA as the fixed
// length r||s, not the Signer's ASN.1 DER; PSS with the hash's length of
// salt), and both refuse the token once its claims change. A plain JWS
// over bytes that are not JSON verifies too.
func TestSignerInJOSE(t *testing.T) {
	c, names := everyKeyAgent(t)
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			s, err := c.Signer(context.Background(), client.ByName(name))
			if err != nil {
				t.Fatal(err)
			}
			for _, alg := range joseAlgorithms(s.Public()) {
				t.Run(alg.String(), func(t *testing.T) {
					now := time.Now().Truncate(time.Second)
					tok, err := jwt.NewBuilder().Issuer("sigil").Subject(name).IssuedAt(now).Expiration(now.Add(time.Hour)).Build()
					if err != nil {
						t.Fatal(err)
					}
					compact, err := jwt.Sign(tok, jwt.WithKey(alg, s))
					if err != nil {
						t.Fatalf("jwt.Sign: %v", err)
					}
					got, err := jwt.Parse(compact, jwt.WithKey(alg, s.Public()), jwt.WithIssuer("sigil"))
					if err != nil {
						t.Fatalf("jwt.Parse: %v", err)
					}
					if sub, _ := got.Subject(); sub != name {
						t.Fatalf("sub = %q, want %q", sub, name)
					}
					if err := verifyJWS(s.Public(), alg, compact); err != nil {
						t.Fatalf("Go's crypto: %v", err)
					}
					forged := bytes.Replace(compact, []byte(".ey"), []byte(".ez"), 1)
					if _, err := jwt.Parse(forged, jwt.WithKey(alg, s.Public())); err == nil {
						t.Fatal("jwt.Parse accepted a token whose claims were changed")
					}
					if err := verifyJWS(s.Public(), alg, forged); err == nil {
						t.Fatal("Go's crypto accepted a token whose claims were changed")
					}

					payload := []byte("release v1.2.3\x00\xff")
					msg, err := jws.Sign(payload, jws.WithKey(alg, s))
					if err != nil {
						t.Fatalf("jws.Sign: %v", err)
					}
					verified, err := jws.Verify(msg, jws.WithKey(alg, s.Public()))
					if err != nil {
						t.Fatalf("jws.Verify: %v", err)
					}
					if !bytes.Equal(verified, payload) {
						t.Fatalf("jws.Verify returned %q, want %q", verified, payload)
					}
					if err := verifyJWS(s.Public(), alg, msg); err != nil {
						t.Fatalf("Go's crypto: %v", err)
					}
				})
			}
		})
	}
}

// verifyJWS checks a compact JWS with the standard library alone, to RFC
// 7515 §5.2 and RFC 7518 §3: the header names alg, and the signature is
// over "header.payload" as sent.
func verifyJWS(pub crypto.PublicKey, alg jwa.SignatureAlgorithm, compact []byte) error {
	parts := strings.Split(string(compact), ".")
	if len(parts) != 3 {
		return fmt.Errorf("%d parts in a compact JWS", len(parts))
	}
	header, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		return fmt.Errorf("header: %v", err)
	}
	if want := fmt.Sprintf(`"alg":%q`, alg.String()); !strings.Contains(string(header), want) {
		return fmt.Errorf("header %s lacks %s", header, want)
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return fmt.Errorf("signature: %v", err)
	}
	input := []byte(parts[0] + "." + parts[1])
	if alg == jwa.EdDSA() {
		if !ed25519.Verify(pub.(ed25519.PublicKey), input, sig) {
			return fmt.Errorf("Ed25519 signature does not verify")
		}
		return nil
	}
	hashes := map[byte]crypto.Hash{'2': crypto.SHA256, '3': crypto.SHA384, '5': crypto.SHA512}
	name := alg.String()
	h := hashes[name[2]]
	d := h.New()
	d.Write(input)
	digest := d.Sum(nil)
	switch name[:2] {
	case "ES":
		k := pub.(*ecdsa.PublicKey)
		size := (k.Curve.Params().BitSize + 7) / 8
		if len(sig) != 2*size {
			return fmt.Errorf("ECDSA signature of %d bytes, want r||s of %d", len(sig), 2*size)
		}
		r, ss := new(big.Int).SetBytes(sig[:size]), new(big.Int).SetBytes(sig[size:])
		if !ecdsa.Verify(k, digest, r, ss) {
			return fmt.Errorf("ECDSA signature does not verify")
		}
		return nil
	case "RS":
		return rsa.VerifyPKCS1v15(pub.(*rsa.PublicKey), h, digest, sig)
	case "PS":
		// RFC 7518 §3.5: the salt is as long as the hash's output.
		return rsa.VerifyPSS(pub.(*rsa.PublicKey), h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	}
	return fmt.Errorf("no check for %s", alg)
}
