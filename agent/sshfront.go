package agent

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/sshagent"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// ServeSSHAgent serves the OpenSSH agent protocol on ln until Shutdown. Each
// SSH connection is identified like a client connection (SO_PEERCRED), and
// every signature goes through the same dispatch as a Sign request: tenant,
// policy, provider, audit journal (peer recorded as "ssh:…").
func (a *Agent) ServeSSHAgent(ln net.Listener) error {
	ctx, cancel := context.WithCancel(context.Background())
	a.mu.Lock()
	if a.closing {
		a.mu.Unlock()
		cancel()
		ln.Close()
		return ErrClosed
	}
	a.stopSSH = cancel
	// Shutdown waits for this to return, and Serve returns only when its
	// connections have ended: no SSH signature outlives the providers.
	a.sshWG.Add(1)
	defer a.sshWG.Done()
	a.mu.Unlock()
	err := sshagent.Serve(ctx, patientListener{Listener: ln, log: a.log}, a.sshBackendFor, a.log.Named("ssh-agent"))
	if ctx.Err() != nil {
		return ErrClosed
	}
	return err
}

var errNotUnix = errors.New("the ssh-agent socket takes Unix connections only")

func (a *Agent) sshBackendFor(nc net.Conn) (sshagent.Backend, net.Conn, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil, nil, errNotUnix
	}
	c := newConn(a, nc, false)
	p, err := unixPeer(uc)
	if err != nil {
		return nil, nil, err
	}
	c.peer = p
	c.peerName = "ssh:" + p.String()
	c.log = a.log.Named("ssh-agent").With(p.logFields()...)
	if err := c.admitted(); err != nil {
		c.log.Info("ssh-agent connection refused", zap.Error(err))
		return nil, nil, err
	}
	if limit := a.admit(c); limit != "" {
		a.metrics.refused(limit)
		c.log.Warn("ssh-agent connection refused: limit reached", zap.String("limit", limit))
		return nil, nil, errors.New("ssh-agent connection refused: " + limit)
	}
	lim := a.cfg.Limits
	sc := &sshConn{Conn: nc, c: c, maxMsg: lim.MaxFrame, frameTimeout: lim.FrameTimeout, idleTimeout: lim.IdleTimeout, writeTimeout: lim.WriteTimeout}
	return sshBackend{c: c, out: sc}, sc, nil
}

// sshBackend answers the ssh-agent front for one connection.
type sshBackend struct {
	c   *conn
	out *sshConn // holds a signature's policy fence until its reply is written
}

func (b sshBackend) Keys(context.Context) ([]sshagent.Key, error) {
	entries, err := b.c.listKeys()
	if err != nil {
		return nil, err
	}
	allowed := b.c.a.cfg.SSHKeys
	out := make([]sshagent.Key, 0, len(entries))
	for _, e := range entries {
		if len(allowed) > 0 && !slices.Contains(allowed, e.Name) {
			continue
		}
		pub, err := x509.ParsePKIXPublicKey(e.Pub)
		if err != nil {
			continue
		}
		out = append(out, sshagent.Key{Name: e.Name, Public: pub})
	}
	return out, nil
}

// Sign runs a Sign request through the connection's dispatch, so the SSH
// path is the socket path: policy, the tenant's in-flight limit, provider,
// journal, metrics. ctx ends when the agent shuts down; the request is then
// cancelled, so that nothing signs after Shutdown has closed the providers.
func (b sshBackend) Sign(ctx context.Context, name string, alg providers.Algorithm, message []byte) ([]byte, error) {
	if allowed := b.c.a.cfg.SSHKeys; len(allowed) > 0 && !slices.Contains(allowed, name) {
		return nil, &proto.Error{Code: proto.NotFound, Msg: "not an ssh key"}
	}
	stop := context.AfterFunc(ctx, b.c.cancel)
	defer stop()
	req := &proto.Request{Op: proto.OpSign, Key: name, Scheme: uint8(alg.Scheme), Hash: protoHash(alg.Hash), Digest: message}
	arrived := time.Now()
	switch b.c.takeTenantToken(b.c.requestTimeout(req), b.c.ctx.Done()) {
	case nil:
	case errNoTenantCapacity:
		b.c.a.metrics.request(proto.OpSign, proto.DeadlineExceeded, &reqMeta{}) // as acquireSlot
		return nil, &proto.Error{Code: proto.DeadlineExceeded, Msg: noTenantCapacityMsg}
	default:
		return nil, &proto.Error{Code: proto.Unavailable, Msg: "the agent is shutting down"}
	}
	defer b.c.releaseSlot()
	var resp proto.Response
	var fence policy.Decision
	b.c.dispatch(req, &resp, arrived, &fence)
	if err := resp.Err(); err != nil {
		fence.Done()
		return nil, err
	}
	// The signature leaves when the ssh-agent server writes its reply,
	// after this returns: a Pause must not ack before that.
	b.out.holdFence(fence)
	return resp.Sig, nil
}

// Refused journals a signature the front refused before Sign, as dispatch
// journals a socket Sign it refuses: a key the tenant has no slot for is
// NOT_FOUND, recorded under the client's fingerprint as a socket refusal
// is under the client's text for the name.
func (b sshBackend) Refused(_ context.Context, name, fingerprint string, data []byte, err error) {
	c := b.c
	d := signDecision{start: time.Now(), keyName: fingerprint, digest: data, code: sshRefusalCode(err)}
	if name != "" {
		t, tenant, rerr := c.resolve(name, "", false)
		d.tenant = tenant
		if rerr == nil {
			d.target = t
		}
	} else {
		d.tenant, _ = c.tenant()
	}
	var meta reqMeta
	meta.set(d.tenant, d.target)
	c.a.metrics.request(proto.OpSign, d.code, &meta)
	// A refusal's record is written even past its request's deadline:
	// record gives its append the journal's own bound.
	c.record(context.Background(), &d)
}

func sshRefusalCode(err error) proto.Code {
	switch {
	case errors.Is(err, sshagent.ErrUnknownKey):
		return proto.NotFound
	case errors.Is(err, sshagent.ErrSHA1):
		return proto.UnsupportedAlgorithm
	}
	return codeOf(err)
}

func protoHash(h crypto.Hash) uint8 {
	switch h {
	case crypto.SHA256:
		return proto.HashSHA256
	case crypto.SHA384:
		return proto.HashSHA384
	case crypto.SHA512:
		return proto.HashSHA512
	}
	return proto.HashNone
}

// sshConn holds the ssh-agent socket to the client socket's limits
// (limits.go): its messages share limits.max_frame (x/crypto's server
// would otherwise allocate up to 16 MiB for a length prefix a client
// sends), a message must complete within limits.frame_timeout once its
// first byte is in, a connection quiet for limits.idle_timeout (when set)
// after its last reply is closed, and the connection counts against
// max_conns and the tenant's max_conns_per_tenant until it closes. It
// tracks message
// boundaries from the 4-byte length prefixes as bytes pass through Read.
type sshConn struct {
	net.Conn
	c            *conn
	maxMsg       int
	frameTimeout time.Duration
	idleTimeout  time.Duration

	writeTimeout time.Duration

	hdr       [4]byte
	hdrN      int // header bytes seen of the current message
	remaining int // body bytes still to come of the current message
	armed     bool
	closeOnce sync.Once

	// fence is the last signature's policy fence. The ssh-agent server
	// writes a reply and only then reads the next request, so the fence
	// ends at the next Read, or at Close (a failed or timed-out write
	// ends the connection).
	fenceMu sync.Mutex
	fence   policy.Decision
	// replying: a reply's first write has set the write deadline. Only
	// the ssh-agent server's goroutine reads and writes.
	replying bool
}

func (s *sshConn) holdFence(f policy.Decision) {
	s.fenceMu.Lock()
	s.fence.Done()
	s.fence = f
	s.fenceMu.Unlock()
}

func (s *sshConn) endFence() {
	s.fenceMu.Lock()
	s.fence.Done()
	s.fenceMu.Unlock()
}

// Write gives each reply limits.write_timeout: a client that stops
// reading is dropped, as on the agent's own socket, rather than holding
// its goroutine (and a signature's fence) for good. The ssh-agent server
// writes a reply in two calls (its length, then its body), so the
// deadline is set at a reply's first write, not at each.
func (s *sshConn) Write(p []byte) (int, error) {
	if s.writeTimeout > 0 && !s.replying {
		s.replying = true
		s.Conn.SetWriteDeadline(time.Now().Add(s.writeTimeout))
	}
	return s.Conn.Write(p)
}

var errSSHMessageTooLarge = errors.New("ssh-agent message longer than limits.max_frame")

func (s *sshConn) Read(p []byte) (int, error) {
	s.endFence() // the previous reply is written
	s.replying = false
	// Between messages the ssh-agent server has written its last reply
	// (it serves one message at a time), so the wait from here is idle:
	// a signature that takes longer than idle_timeout does not count.
	waitingIdle := s.idleTimeout > 0 && !s.armed
	if waitingIdle {
		s.Conn.SetReadDeadline(time.Now().Add(s.idleTimeout))
	}
	n, err := s.Conn.Read(p)
	if n > 0 {
		if perr := s.track(p[:n]); perr != nil {
			s.c.log.Info("closing ssh-agent connection", zap.Error(perr))
			s.Conn.Close()
			return 0, perr
		}
	}
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		switch {
		case s.armed:
			s.c.a.metrics.refused(limitFrameTimeout)
			s.c.log.Info("closing ssh-agent connection: " + limitFrameTimeout + " expired")
		case waitingIdle && n == 0:
			s.c.a.metrics.refused(limitIdleTimeout)
			s.c.log.Info("closing ssh-agent connection: " + limitIdleTimeout + " expired")
		}
	}
	return n, err
}

// track walks the bytes just read and arms or clears the frame deadline at
// message boundaries.
func (s *sshConn) track(b []byte) error {
	for len(b) > 0 {
		if s.remaining == 0 {
			k := copy(s.hdr[s.hdrN:], b)
			s.hdrN += k
			b = b[k:]
			if s.hdrN < 4 {
				break
			}
			l := int(binary.BigEndian.Uint32(s.hdr[:]))
			if l > s.maxMsg {
				return errSSHMessageTooLarge
			}
			s.hdrN, s.remaining = 0, l
			continue
		}
		k := min(len(b), s.remaining)
		s.remaining -= k
		b = b[k:]
	}
	inMessage := s.hdrN > 0 || s.remaining > 0
	switch {
	case inMessage && !s.armed:
		s.armed = true
		s.Conn.SetReadDeadline(time.Now().Add(s.frameTimeout))
	case !inMessage && s.armed:
		s.armed = false
		s.Conn.SetReadDeadline(time.Time{})
	}
	return nil
}

func (s *sshConn) Close() error {
	s.closeOnce.Do(func() { s.c.a.unadmit(s.c) })
	err := s.Conn.Close()
	s.endFence()
	return err
}
