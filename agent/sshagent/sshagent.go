package sshagent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"sync"

	"go.uber.org/zap"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"

	"github.com/sigil-agent/sigil/providers"
)

// Backend is what the ssh-agent front needs from Sigil, per connection (the
// peer's identity decides the tenant).
type Backend interface {
	// Keys lists the SSH-enabled keys the peer may use: name, public key.
	Keys(ctx context.Context) ([]Key, error)
	// Sign signs data (the whole SSH signature payload) with the named key
	// and the SSH algorithm's scheme/hash, through policy and journal.
	// message is the digest for ECDSA and RSA and the payload itself for
	// Ed25519; the result has crypto.Signer's encoding (ASN.1 DER for
	// ECDSA, raw for RSA and Ed25519).
	Sign(ctx context.Context, name string, alg providers.Algorithm, message []byte) ([]byte, error)
	// Refused journals a signature the front refused without calling
	// Sign, as Sign journals its own refusals: the client's key is none
	// Keys lists (name "") or Keys failed, or the listed key named cannot
	// sign as asked (plain ssh-rsa). fingerprint is the client's key's
	// SHA256 fingerprint, data the payload it asked to have signed, err
	// why (ErrUnknownKey, ErrSHA1, or what Keys returned).
	Refused(ctx context.Context, name, fingerprint string, data []byte, err error)
}

// Key is one key a Backend offers.
type Key struct {
	Name   string
	Public crypto.PublicKey
}

// ErrRefused is returned for Add, Remove, RemoveAll, Lock and Unlock.
var ErrRefused = errors.New("keys live in the HSM; adding or removing keys through the agent protocol is refused")

// ErrSHA1 is returned when a client asks for a plain ssh-rsa (SHA-1) signature.
var ErrSHA1 = errors.New("ssh-rsa signatures (SHA-1) are refused; use rsa-sha2-256 or rsa-sha2-512")

// ErrUnknownKey is returned when a client asks to sign with a key the
// Backend does not list.
var ErrUnknownKey = errors.New("no such key in this agent")

// Serve accepts connections on ln and serves the OpenSSH agent protocol on
// each, with the Backend backendFor returns for it, over the connection it
// returns (the accepted one, or a wrapper that enforces limits; Serve
// closes that one). A connection whose backendFor fails is closed. Serve returns nil once ctx is done (it closes
// ln and every open connection and waits for them), or the listener's error.
func Serve(ctx context.Context, ln net.Listener, backendFor func(conn net.Conn) (Backend, net.Conn, error), log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	defer wg.Wait()

	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("ssh-agent: accept: %w", err)
		}
		mu.Lock()
		if ctx.Err() != nil {
			mu.Unlock()
			conn.Close()
			return nil
		}
		conns[conn] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			served := serveConn(ctx, conn, backendFor, log)
			mu.Lock()
			delete(conns, conn)
			mu.Unlock()
			if served != nil && served != conn {
				served.Close()
			}
			conn.Close()
		}()
	}
}

func serveConn(ctx context.Context, conn net.Conn, backendFor func(net.Conn) (Backend, net.Conn, error), log *zap.Logger) net.Conn {
	b, served, err := backendFor(conn)
	if err != nil {
		log.Info("ssh-agent: connection refused", zap.Error(err))
		return served
	}
	if served == nil {
		served = conn
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a := &front{ctx: ctx, b: b, log: log}
	if err := agent.ServeAgent(a, served); err != nil && !errors.Is(err, io.EOF) && ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
		log.Debug("ssh-agent: connection ended", zap.Error(err))
	}
	return served
}

// NewAgent returns the agent.ExtendedAgent Serve runs for one connection;
// ctx bounds its Backend calls. It is exported for callers that serve the
// protocol on a connection of their own (agent.ServeAgent).
func NewAgent(ctx context.Context, b Backend, log *zap.Logger) agent.ExtendedAgent {
	if log == nil {
		log = zap.NewNop()
	}
	return &front{ctx: ctx, b: b, log: log}
}

// front implements agent.ExtendedAgent over a Backend.
type front struct {
	ctx context.Context
	b   Backend
	log *zap.Logger
}

var _ agent.ExtendedAgent = (*front)(nil)

type listed struct {
	name string
	pub  crypto.PublicKey
	ssh  ssh.PublicKey
}

func (f *front) keys() ([]listed, error) {
	ks, err := f.b.Keys(f.ctx)
	if err != nil {
		return nil, err
	}
	out := make([]listed, 0, len(ks))
	for _, k := range ks {
		sp, err := ssh.NewPublicKey(k.Public)
		if err != nil {
			f.log.Debug("ssh-agent: key not usable over SSH", zap.String("key", k.Name), zap.Error(err))
			continue
		}
		if _, err := sshAlgorithm(k.Public, 0); err != nil && !errors.Is(err, ErrSHA1) {
			f.log.Debug("ssh-agent: key not usable over SSH", zap.String("key", k.Name), zap.Error(err))
			continue
		}
		out = append(out, listed{name: k.Name, pub: k.Public, ssh: sp})
	}
	return out, nil
}

// List implements agent.Agent.
func (f *front) List() ([]*agent.Key, error) {
	ks, err := f.keys()
	if err != nil {
		f.log.Info("ssh-agent: list failed", zap.Error(err))
		return nil, err
	}
	out := make([]*agent.Key, len(ks))
	for i, k := range ks {
		out[i] = &agent.Key{Format: k.ssh.Type(), Blob: k.ssh.Marshal(), Comment: k.name}
	}
	return out, nil
}

// Sign implements agent.Agent.
func (f *front) Sign(key ssh.PublicKey, data []byte) (*ssh.Signature, error) {
	return f.SignWithFlags(key, data, 0)
}

// SignWithFlags implements agent.ExtendedAgent.
func (f *front) SignWithFlags(key ssh.PublicKey, data []byte, flags agent.SignatureFlags) (*ssh.Signature, error) {
	sig, name, err := f.sign(key, data, flags)
	if err != nil {
		// A key the agent does not serve is named by its fingerprint:
		// its type is the request's bytes, whatever the client wrote,
		// up to a whole message. A served key's type is its own.
		fields := []zap.Field{zap.String("key", name), zap.String("fingerprint", ssh.FingerprintSHA256(key)), zap.Error(err)}
		if name != "" {
			fields = append(fields, zap.String("type", key.Type()))
		}
		f.log.Info("ssh-agent: sign refused", fields...)
		return nil, err
	}
	return sig, nil
}

func (f *front) sign(key ssh.PublicKey, data []byte, flags agent.SignatureFlags) (*ssh.Signature, string, error) {
	ks, err := f.keys()
	if err != nil {
		f.b.Refused(f.ctx, "", ssh.FingerprintSHA256(key), data, err)
		return nil, "", err
	}
	want := key.Marshal()
	var k *listed
	for i := range ks {
		if bytes.Equal(ks[i].ssh.Marshal(), want) {
			k = &ks[i]
			break
		}
	}
	if k == nil {
		// Another tenant's key, or no key of ours: the socket journals a
		// Sign for a slot the tenant lacks, so this is journaled too.
		f.b.Refused(f.ctx, "", ssh.FingerprintSHA256(key), data, ErrUnknownKey)
		return nil, "", ErrUnknownKey
	}
	sa, err := sshAlgorithm(k.pub, flags)
	if err != nil {
		f.b.Refused(f.ctx, k.name, ssh.FingerprintSHA256(key), data, err)
		return nil, k.name, err
	}
	msg := data
	if sa.alg.Hash != 0 {
		h := sa.alg.Hash.New()
		h.Write(data)
		msg = h.Sum(nil)
	}
	raw, err := f.b.Sign(f.ctx, k.name, sa.alg, msg)
	if err != nil {
		return nil, k.name, err
	}
	blob := raw
	if sa.alg.Scheme == providers.SchemeECDSA {
		if blob, err = ecdsaDERToSSH(raw); err != nil {
			return nil, k.name, err
		}
	}
	return &ssh.Signature{Format: sa.format, Blob: blob}, k.name, nil
}

type sshAlg struct {
	format string
	alg    providers.Algorithm
}

// sshAlgorithm is the SSH signature format and the Sigil algorithm for a
// key and the client's flags.
func sshAlgorithm(pub crypto.PublicKey, flags agent.SignatureFlags) (sshAlg, error) {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return sshAlg{ssh.KeyAlgoED25519, providers.Algorithm{Scheme: providers.SchemeEd25519}}, nil
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return sshAlg{ssh.KeyAlgoECDSA256, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}}, nil
		case elliptic.P384():
			return sshAlg{ssh.KeyAlgoECDSA384, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}}, nil
		}
		return sshAlg{}, fmt.Errorf("ecdsa curve %s: %w", k.Curve.Params().Name, providers.ErrUnsupportedAlgorithm)
	case *rsa.PublicKey:
		// SHA-256 first when a client sets both flags, as OpenSSH's
		// ssh-agent does: a slot's algorithm policy then rules alike here.
		switch {
		case flags&agent.SignatureFlagRsaSha256 != 0:
			return sshAlg{ssh.KeyAlgoRSASHA256, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}}, nil
		case flags&agent.SignatureFlagRsaSha512 != 0:
			return sshAlg{ssh.KeyAlgoRSASHA512, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA512}}, nil
		}
		return sshAlg{}, ErrSHA1
	}
	return sshAlg{}, fmt.Errorf("public key %T: %w", pub, providers.ErrUnsupportedAlgorithm)
}

// ecdsaDERToSSH re-encodes an ASN.1 DER ECDSA signature as SSH's blob:
// string(mpint r || mpint s) is the caller's Signature.Blob, i.e. the two
// mpints back to back (RFC 5656 section 3.1.2).
func ecdsaDERToSSH(der []byte) ([]byte, error) {
	var rs struct{ R, S *big.Int }
	rest, err := asn1.Unmarshal(der, &rs)
	if err != nil || len(rest) != 0 || rs.R == nil || rs.S == nil || rs.R.Sign() <= 0 || rs.S.Sign() <= 0 {
		return nil, fmt.Errorf("ecdsa signature from the key holder is not valid DER (r, s)")
	}
	return ssh.Marshal(rs), nil
}

// Signers implements agent.Agent: one ssh.Signer per listed key, signing
// through the Backend.
func (f *front) Signers() ([]ssh.Signer, error) {
	ks, err := f.keys()
	if err != nil {
		return nil, err
	}
	out := make([]ssh.Signer, len(ks))
	for i, k := range ks {
		out[i] = &signer{f: f, pub: k.ssh}
	}
	return out, nil
}

type signer struct {
	f   *front
	pub ssh.PublicKey
}

func (s *signer) PublicKey() ssh.PublicKey { return s.pub }

func (s *signer) Sign(_ io.Reader, data []byte) (*ssh.Signature, error) {
	var flags agent.SignatureFlags
	if s.pub.Type() == ssh.KeyAlgoRSA {
		flags = agent.SignatureFlagRsaSha512
	}
	return s.f.SignWithFlags(s.pub, data, flags)
}

func (f *front) refuse(op string) error {
	f.log.Info("ssh-agent: refused", zap.String("op", op))
	return ErrRefused
}

// Add implements agent.Agent; it is refused.
func (f *front) Add(agent.AddedKey) error { return f.refuse("add") }

// Remove implements agent.Agent; it is refused.
func (f *front) Remove(ssh.PublicKey) error { return f.refuse("remove") }

// RemoveAll implements agent.Agent; it is refused.
func (f *front) RemoveAll() error { return f.refuse("remove-all") }

// Lock implements agent.Agent; it is refused.
func (f *front) Lock([]byte) error { return f.refuse("lock") }

// Unlock implements agent.Agent; it is refused.
func (f *front) Unlock([]byte) error { return f.refuse("unlock") }

// Extension implements agent.ExtendedAgent; no extension is supported.
func (f *front) Extension(string, []byte) ([]byte, error) {
	return nil, agent.ErrExtensionUnsupported
}
