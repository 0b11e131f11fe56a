package agent

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"net"
	"slices"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/sshagent"
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
	a.mu.Unlock()
	err := sshagent.Serve(ctx, ln, a.sshBackendFor, a.log.Named("ssh-agent"))
	if ctx.Err() != nil {
		return ErrClosed
	}
	return err
}

var errNotUnix = errors.New("the ssh-agent socket takes Unix connections only")

func (a *Agent) sshBackendFor(nc net.Conn) (sshagent.Backend, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil, errNotUnix
	}
	c := newConn(a, nc, false)
	p, err := unixPeer(uc)
	if err != nil {
		return nil, err
	}
	c.peer = p
	c.peerName = "ssh:" + p.String()
	c.log = a.log.Named("ssh-agent").With(p.logFields()...)
	if err := c.admitted(); err != nil {
		c.log.Info("ssh-agent connection refused", zap.Error(err))
		return nil, err
	}
	return sshBackend{c: c}, nil
}

// sshBackend answers the ssh-agent front for one connection.
type sshBackend struct{ c *conn }

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
// path is the socket path: policy, provider, journal, metrics.
func (b sshBackend) Sign(_ context.Context, name string, alg providers.Algorithm, message []byte) ([]byte, error) {
	if allowed := b.c.a.cfg.SSHKeys; len(allowed) > 0 && !slices.Contains(allowed, name) {
		return nil, &proto.Error{Code: proto.NotFound, Msg: "not an ssh key"}
	}
	req := &proto.Request{Op: proto.OpSign, Key: name, Scheme: uint8(alg.Scheme), Hash: protoHash(alg.Hash), Digest: message}
	var resp proto.Response
	b.c.dispatch(req, &resp)
	if err := resp.Err(); err != nil {
		return nil, err
	}
	return resp.Sig, nil
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
