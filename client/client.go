package client

import (
	"bufio"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// Client is a connection to an agent.
type Client struct {
	nc       net.Conn
	maxFrame int

	writeMu sync.Mutex

	mu      sync.Mutex
	pending map[uint64]chan *proto.Response
	err     error // set once, when the connection has failed or closed
	done    chan struct{}

	nextID atomic.Uint64
}

// ErrClosed is returned for calls on a closed client.
var ErrClosed = errors.New("sigil client closed")

// Dial connects to the agent at addr and says Hello. An empty addr means
// $SIGIL_SOCK, else the default socket path. addr is a Unix socket path,
// optionally written "unix:PATH".
func Dial(ctx context.Context, addr string) (*Client, error) {
	if addr == "" {
		addr = proto.ClientSocketPath()
	}
	path := strings.TrimPrefix(addr, "unix:")
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("sigil: connect to agent at %s: %w", path, err)
	}
	c := &Client{
		nc:       nc,
		maxFrame: proto.DefaultMaxFrame,
		pending:  map[uint64]chan *proto.Response{},
		done:     make(chan struct{}),
	}
	go c.readLoop()
	if _, err := c.call(ctx, &proto.Request{Op: proto.OpHello, Version: proto.Version, Features: proto.FeaturePipelining}); err != nil {
		c.Close()
		return nil, fmt.Errorf("sigil: hello: %w", err)
	}
	return c, nil
}

// Close closes the connection; calls waiting for replies fail with ErrClosed.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	return nil
}

func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	pending := c.pending
	c.pending = nil
	close(c.done)
	c.mu.Unlock()
	c.nc.Close()
	for _, ch := range pending {
		close(ch)
	}
}

func (c *Client) readLoop() {
	br := bufio.NewReaderSize(c.nc, 16<<10)
	codec := proto.NewCodec()
	var buf []byte
	for {
		payload, err := proto.ReadFrame(br, buf, c.maxFrame)
		if err != nil {
			c.fail(fmt.Errorf("sigil: connection to agent lost: %w", err))
			return
		}
		buf = payload[:0]
		resp := new(proto.Response)
		if err := codec.DecodeResponse(payload, resp); err != nil {
			c.fail(fmt.Errorf("sigil: malformed reply from agent: %w", err))
			return
		}
		if resp.ID == 0 {
			// The agent's last word before it closes the connection.
			c.fail(resp.Err())
			return
		}
		c.mu.Lock()
		ch := c.pending[resp.ID]
		delete(c.pending, resp.ID)
		c.mu.Unlock()
		if ch != nil {
			ch <- resp
		}
	}
}

// call sends req and waits for its reply, or ctx, or the connection's end. A
// non-OK reply is returned as a *proto.Error.
func (c *Client) call(ctx context.Context, req *proto.Request) (*proto.Response, error) {
	req.ID = c.nextID.Add(1)
	if dl, ok := ctx.Deadline(); ok {
		ms := time.Until(dl).Milliseconds()
		if ms <= 0 {
			return nil, fmt.Errorf("sigil %s: %w", req.Op, context.DeadlineExceeded)
		}
		req.TimeoutMillis = uint32(min(ms, math.MaxUint32))
	}
	ch := make(chan *proto.Response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.pending[req.ID] = ch
	c.mu.Unlock()

	codec := codecPool.Get().(*proto.Codec)
	frame, err := codec.AppendRequestFrame(nil, req)
	codecPool.Put(codec)
	if err == nil && len(frame)-proto.FrameHeaderLen > c.maxFrame {
		err = &proto.Error{Code: proto.BadRequest, Msg: fmt.Sprintf("request of %d bytes exceeds the %d-byte frame limit", len(frame)-proto.FrameHeaderLen, c.maxFrame)}
	}
	if err != nil {
		c.forget(req.ID)
		return nil, err
	}
	c.writeMu.Lock()
	_, err = c.nc.Write(frame)
	c.writeMu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("sigil: write to agent: %w", err))
		return nil, c.terminalErr()
	}

	select {
	case resp, ok := <-ch:
		if !ok {
			return nil, c.terminalErr()
		}
		if err := resp.Err(); err != nil {
			return nil, err
		}
		return resp, nil
	case <-ctx.Done():
		c.forget(req.ID)
		return nil, fmt.Errorf("sigil %s: %w", req.Op, ctx.Err())
	}
}

var codecPool = sync.Pool{New: func() any { return proto.NewCodec() }}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

func (c *Client) terminalErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// KeyRef names a key by name or by kid; the zero KeyRef means the agent's
// default key.
type KeyRef struct {
	Name string
	KID  string
}

// ByName refers to a key by its configured name.
func ByName(name string) KeyRef { return KeyRef{Name: name} }

// ByKID refers to a key by its kid.
func ByKID(kid string) KeyRef { return KeyRef{KID: kid} }

// Key describes a key the agent serves.
type Key struct {
	Name     string
	KID      string
	Provider string
	Type     string // ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096, ed25519
	Public   crypto.PublicKey
	SPKI     []byte // DER SubjectPublicKeyInfo
}

// Ping checks the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.call(ctx, &proto.Request{Op: proto.OpPing})
	return err
}

// ListKeys lists the keys the agent serves to this caller.
func (c *Client) ListKeys(ctx context.Context) ([]Key, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpListKeys})
	if err != nil {
		return nil, err
	}
	out := make([]Key, 0, len(resp.Keys))
	for _, k := range resp.Keys {
		pub, err := x509.ParsePKIXPublicKey(k.Pub)
		if err != nil {
			return nil, fmt.Errorf("sigil: key %q: public key: %w", k.Name, err)
		}
		out = append(out, Key{Name: k.Name, KID: k.KID, Provider: k.Provider, Type: k.KeyType, Public: pub, SPKI: k.Pub})
	}
	return out, nil
}

// PublicKey fetches one key's public half.
func (c *Client) PublicKey(ctx context.Context, ref KeyRef) (Key, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpPublicKey, Key: ref.Name, KID: ref.KID})
	if err != nil {
		return Key{}, err
	}
	pub, err := x509.ParsePKIXPublicKey(resp.Pub)
	if err != nil {
		return Key{}, fmt.Errorf("sigil: key %q: public key: %w", resp.Key, err)
	}
	return Key{Name: resp.Key, KID: resp.KID, Type: resp.KeyType, Public: pub, SPKI: resp.Pub}, nil
}

// Signature is a Sign result: the signature in crypto.Signer's encoding
// (ASN.1 DER for ECDSA) and the key that made it.
type Signature struct {
	Sig []byte
	Key string
	KID string
}

// Sign signs digest (for Ed25519: the message) with the key. A zero Algorithm
// asks for the key's default (ECDSA with the curve's hash, RSA PKCS#1 v1.5
// SHA-256, pure Ed25519).
func (c *Client) Sign(ctx context.Context, ref KeyRef, alg Algorithm, digest []byte) (Signature, error) {
	h, err := wireHash(alg.Hash)
	if err != nil {
		return Signature{}, err
	}
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpSign, Key: ref.Name, KID: ref.KID, Scheme: uint8(alg.Scheme), Hash: h, Digest: digest})
	if err != nil {
		return Signature{}, err
	}
	return Signature{Sig: resp.Sig, Key: resp.Key, KID: resp.KID}, nil
}

// Verify asks the agent whether sig is a valid signature by the key over
// digest. A false result with a nil error means the signature is wrong.
func (c *Client) Verify(ctx context.Context, ref KeyRef, alg Algorithm, digest, sig []byte) (bool, error) {
	h, err := wireHash(alg.Hash)
	if err != nil {
		return false, err
	}
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpVerify, Key: ref.Name, KID: ref.KID, Scheme: uint8(alg.Scheme), Hash: h, Digest: digest, Sig: sig})
	if err != nil {
		return false, err
	}
	return resp.Valid, nil
}

// Code returns the stable code of an error from this package: the agent's
// code for a refused request, DEADLINE_EXCEEDED for a context deadline,
// UNAVAILABLE for a lost connection.
func Code(err error) proto.Code {
	var pe *proto.Error
	switch {
	case err == nil:
		return proto.OK
	case errors.As(err, &pe):
		return pe.Code
	case errors.Is(err, context.DeadlineExceeded):
		return proto.DeadlineExceeded
	}
	return proto.Unavailable
}
