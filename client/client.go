package client

import (
	"bufio"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// Client talks to one agent over one connection at a time, and replaces the
// connection when it fails (see call and redial).
type Client struct {
	// cur is the connection calls go to. A call reads it without a lock:
	// a healthy connection's call costs one atomic load more, nothing else.
	cur atomic.Pointer[conn]
	// dial opens a connection the way Dial or DialTLS did (address, TLS
	// config), for redial.
	dial func(ctx context.Context) (net.Conn, error)

	// redialToken holds one token when nobody is redialling: one dial at a
	// time, and a caller waiting for it can give up when its context ends.
	// The holder alone touches failedAt and failErr.
	redialToken chan struct{}
	failedAt    time.Time // when the last redial failed; zero after a success
	failErr     error     // why it failed
	// lastRedial is the connection the last successful redial made. Lost
	// before it proved itself (conn.proven), it counts as a failed redial:
	// an agent that answers the Hello and drops every connection before
	// any reply would otherwise cost each call of a retrying caller a
	// connect and a Hello, with no backoff.
	lastRedial *conn
	// reconnecting is the redial in progress: its dial or Hello goes on
	// without the token (see redial). unansweredAt is when a redial last
	// went unanswered for redialWait, zero once one succeeds. Both read and
	// set by the token's holder alone.
	reconnecting *reconnect
	unansweredAt time.Time

	mu     sync.Mutex
	closed bool // set by Close: no redial after it
	// closing is cancelled by Close. A redial's connection is not cur until
	// its Hello is answered, so Close cannot close it: a redial watches
	// closing instead, or an agent that never answers the Hello would hold
	// the redialling call, and every call queued behind it, past Close.
	closing  context.Context
	closeNow context.CancelFunc
}

// redialBackoff is how long after a failed redial the next one may start.
// Without it every caller of a service whose agent is down would dial in a
// tight loop, each call a connect and, with TLS, a handshake.
const redialBackoff = 100 * time.Millisecond

// redialWait bounds a redial's dial and Hello, which go on after the call
// that began them has given up (see redial). Under systemd's socket
// activation the socket stays open while the agent is down or restarting:
// the connect succeeds and the Hello waits until an agent takes the
// connection. A var for tests.
var redialWait = 30 * time.Second

// reconnectPatience is how long a call must have waited for a redial before
// its deadline passing marks the redial abandoned (see redial): a caller
// with a short deadline (a health check's 50 ms) says nothing of an agent
// that answers a reconnect in 150 ms. Well under a second, the shortest
// Signer timeout a service is likely to set: a caller whose deadline is
// the patience itself would race it.
const reconnectPatience = 500 * time.Millisecond

// reconnectGrace is how long from its start a redial is waited for while
// the agent is known to be down (a redial went unanswered, or was
// abandoned and failed, within redialWait): a healthy agent answers a
// connect and a Hello well within it.
const reconnectGrace = 100 * time.Millisecond

// reconnect is a redial's connect, which runs without the redial token and
// may outlive the call that began it.
type reconnect struct {
	start time.Time
	done  chan struct{} // closed when cn, err and unanswered are set
	// abandoned is closed (abandon) once a call's deadline passed after it
	// waited reconnectPatience or more, or in a known outage once its
	// grace passed or a call stopped waiting: calls made after that fail
	// at once rather than wait in turn; those waiting already wait on.
	abandoned     chan struct{}
	abandonedOnce sync.Once
	// inOutage: begun within redialWait of an unanswered redial (a known
	// outage). Every call waits for it reconnectGrace from its start at
	// most, whoever began it, and then abandons it.
	inOutage bool
	cn       *conn
	err      error
	// unanswered: redialWait passed without the agent's answer.
	unanswered bool
	// What it came to, recorded once (settle), the redial token held.
	settledCn  *conn
	settledErr error
}

// helloID is the id of connect's Hello, a connection's first request.
const helloID = 1

// frameTimeout bounds the wait for the rest of a reply frame once part of
// it has been read, as the agent's limits.frame_timeout (10 s by default)
// bounds a request's: the agent writes a reply whole, so a frame that stops
// partway is a hung or hostile agent or a lost network, and no reply can
// follow it on the connection. Without the bound a caller with no deadline
// waited for good, and callers with deadlines each timed out on a
// connection that was never given up. A var for tests.
var frameTimeout = 10 * time.Second

// conn is one connection to an agent.
//
// There is no reader goroutine: a caller waiting for its reply reads the
// socket itself when no other caller is reading ("the reader role", a token
// in readerRole), and hands replies that belong to others to their channels.
// A lone caller so gets its reply without any goroutine hand-off, which on
// the VMs we measure on saves a thread wake-up worth more than the frame's
// decoding; concurrent callers still share one pipelined connection.
type conn struct {
	nc       net.Conn
	maxFrame int

	// writeToken holds one token when nobody is writing: a channel, not a
	// mutex, so that a caller queued behind a blocked write can give up when
	// its context ends. The holder alone touches the write deadline.
	writeToken    chan struct{}
	writeDeadline time.Time     // the write deadline last set on nc
	writeCut      chan struct{} // a write's context.AfterFunc reports here that it ran
	// cutWriteBreaks is set on TLS: crypto/tls fails every Write after one
	// that timed out, even one that sent nothing.
	cutWriteBreaks bool

	// readerRole holds one token when nobody is reading. The holder alone
	// touches br, codec and the connection's read deadline.
	readerRole chan struct{}
	br         *bufio.Reader
	codec      *proto.Codec
	deadline   time.Time // the read deadline last set on nc
	// frameBy is when the rest of a reply frame that is partly in br must
	// have come (frameTimeout); zero while br holds no part of a frame
	// that a reader has waited on. It outlives a reader that gives up at
	// its own deadline, so that callers with short deadlines cannot keep a
	// frame that never ends alive between them.
	frameBy time.Time

	// probe, set on TCP connections, is the socket under TLS that
	// peerSpoke peeks at: a TCP write to an agent that has closed the
	// connection succeeds, so the close must be looked for before a request
	// goes out (see send). born (when it was dialled) and lastRead
	// (nanoseconds since born, when the last reply was read) tell how long
	// the connection has been quiet.
	probe    syscall.RawConn
	born     time.Time
	lastRead atomic.Int64
	// proven is set once the agent has answered a request after the Hello,
	// or a caller ended the connection itself (a write it cut off): a loss
	// after that is not the agent failing the redial (Client.lastRedial).
	proven atomic.Bool

	mu      sync.Mutex
	pending map[uint64]chan *proto.Response
	err     error // set once, when the connection has failed or closed
	done    chan struct{}

	nextID atomic.Uint64
}

// Dial connects to the agent at addr and says Hello. An empty addr means
// $SIGIL_SOCK, else the default socket path. addr is a Unix socket path,
// optionally written "unix:PATH". The client redials the same path when the
// connection fails. A path in the default socket directory is dialled only
// while that directory is this user's (proto.CheckDefaultSocketDir). A
// tls://host:port address (the sigil CLI takes one, in $SIGIL_SOCK too) is
// refused (BAD_REQUEST, ErrRefusedByClient): it needs DialTLS and a client
// certificate.
func Dial(ctx context.Context, addr string) (*Client, error) {
	from := "address"
	if addr == "" {
		addr = proto.ClientSocketPath()
		from = "$" + proto.SocketEnv
	}
	if strings.HasPrefix(addr, "tls://") {
		// Dialled as a path it failed with "no such file or directory",
		// naming neither the cause nor the remedy.
		return nil, refused(proto.BadRequest, fmt.Sprintf("Dial speaks Unix sockets only; the %s %s is an mTLS agent: use DialTLS with its host:port and a tls.Config holding a client certificate", from, addr))
	}
	path := strings.TrimPrefix(addr, "unix:")
	return newClient(ctx, func(ctx context.Context) (net.Conn, error) {
		if err := proto.CheckDefaultSocketDir(path); err != nil {
			return nil, err
		}
		var d net.Dialer
		nc, err := d.DialContext(ctx, "unix", path)
		if err != nil {
			return nil, dialFailed(path, err)
		}
		if proto.InDefaultSocketDir(path) {
			// Who listens, by the kernel's word: closes the window between
			// the directory check and the connect.
			if err := checkPeerUID(nc); err != nil {
				nc.Close()
				return nil, err
			}
		}
		if sc, ok := nc.(socketConn); ok {
			return pollingConn(sc), nil
		}
		return nc, nil
	})
}

// DialTLS connects to an agent's mutual-TLS listener at addr (host:port).
// cfg must carry the client certificate (Certificates or
// GetClientCertificate) and the CAs that signed the agent's certificate
// (RootCAs); TLS 1.3 is required. A nil cfg is refused (BAD_REQUEST,
// ErrRefusedByClient). The client redials with the same configuration when
// the connection fails.
func DialTLS(ctx context.Context, addr string, cfg *tls.Config) (*Client, error) {
	if cfg == nil {
		// The agent requires a client certificate: without a config no
		// handshake can succeed, and Clone of nil is nil.
		return nil, refused(proto.BadRequest, "DialTLS needs a tls.Config with the client certificate and the CAs of the agent's certificate; got nil")
	}
	cfg = cfg.Clone()
	cfg.MinVersion = tls.VersionTLS13
	if cfg.ServerName == "" {
		// What tls.Dialer would derive: the name the certificate must bear.
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		cfg.ServerName = host
	}
	return newClient(ctx, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, dialFailed(addr, err)
		}
		// The TCP connection waits in poll(2) as the Unix socket does,
		// the TLS records on top.
		if sc, ok := nc.(socketConn); ok {
			nc = pollingConn(sc)
		}
		tc := tls.Client(nc, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, dialFailed(addr, err)
		}
		return tc, nil
	})
}

// dialFailed is the failure of a dial to addr. The network's error names
// the address itself ("dial unix PATH: ..."); a TLS handshake's does not.
func dialFailed(addr string, err error) error {
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Addr != nil {
		return failed("connect to the agent", err) // its text names the address
	}
	// A TLS alert is a *net.OpError too, but names no address.
	return failed("connect to the agent at "+addr, err)
}

func newClient(ctx context.Context, dial func(context.Context) (net.Conn, error)) (*Client, error) {
	c := &Client{dial: dial, redialToken: make(chan struct{}, 1)}
	c.closing, c.closeNow = context.WithCancel(context.Background())
	c.redialToken <- struct{}{}
	cn, err := c.connect(ctx)
	if err != nil {
		return nil, err
	}
	c.cur.Store(cn)
	return c, nil
}

// connect dials and says Hello.
func (c *Client) connect(ctx context.Context) (*conn, error) {
	nc, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	cn := &conn{
		nc:       nc,
		maxFrame: proto.DefaultMaxFrame,
		// Frames are read with Peek so that a read deadline (a caller's
		// context) never leaves half a frame consumed: the buffer must hold
		// the largest frame.
		br:         bufio.NewReaderSize(nc, proto.DefaultMaxFrame+proto.FrameHeaderLen),
		codec:      proto.NewCodec(),
		readerRole: make(chan struct{}, 1),
		writeToken: make(chan struct{}, 1),
		writeCut:   make(chan struct{}, 1),
		pending:    map[uint64]chan *proto.Response{},
		done:       make(chan struct{}),
		born:       time.Now(),
	}
	if tc, ok := nc.(*tls.Conn); ok {
		cn.cutWriteBreaks = true
		if sc, ok := tc.NetConn().(syscall.Conn); ok {
			cn.probe, _ = sc.SyscallConn()
		}
	}
	cn.readerRole <- struct{}{}
	cn.writeToken <- struct{}{}
	resp, _, err := cn.call(ctx, &proto.Request{Op: proto.OpHello, Version: proto.Version, Features: proto.FeaturePipelining})
	if err == nil && resp.Version != proto.Version {
		// The agent says it speaks another version than the one it agreed
		// to: what it sends next may mean what this client cannot read.
		err = malformedReply(fmt.Sprintf("protocol error: the agent answered the Hello for protocol version %d with OK and version %d; connection closed", proto.Version, resp.Version), nil)
	}
	if err != nil {
		cn.fail(ErrClosed)
		// As is: the agent's refusal, a lost connection, or a failure
		// that names the Hello.
		return nil, err
	}
	return cn, nil
}

// Close closes the connection; calls waiting for replies, and every later
// call, fail with ErrClosed. A closed client does not redial.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.closeNow()
	// A redial in progress sees closed before it publishes its connection
	// (redial), so the connection loaded here is the last one.
	c.cur.Load().fail(ErrClosed)
	return nil
}

// call sends req on the current connection. When that connection turns out
// to have failed before req was written, it redials once and sends req on
// the new one. A request that was written is never sent again, even when its
// reply is lost: the agent may have signed it, and a second signature would
// be a second audit record and, for a caller counting on at-most-once, wrong.
func (c *Client) call(ctx context.Context, req *proto.Request) (*proto.Response, error) {
	cn := c.cur.Load()
	resp, unsent, err := cn.call(ctx, req)
	if !unsent {
		return resp, err
	}
	cn, err = c.redial(ctx, cn)
	if errors.Is(err, ErrClosed) {
		return nil, err
	}
	if err != nil {
		return nil, failed(req.Op.String()+" not sent", err)
	}
	resp, _, err = cn.call(ctx, req)
	return resp, err
}

// abandon marks r abandoned.
func (r *reconnect) abandon() { r.abandonedOnce.Do(func() { close(r.abandoned) }) }

// isAbandoned reports whether r was abandoned.
func (r *reconnect) isAbandoned() bool {
	select {
	case <-r.abandoned:
		return true
	default:
		return false
	}
}

// ready reports whether r has ended; a caller looks before it looks at
// abandoned, so that a reconnect the agent answered is never reported
// unanswered because its end and its abandonment came together.
func (r *reconnect) ready() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// redial replaces the failed connection dead, unless another caller already
// has, and returns the current connection. One redial runs at a time, and
// none starts within redialBackoff of a failed one: callers then get
// UNAVAILABLE at once.
//
// A redial's connect runs on its own bound (redialWait, and Close), not the
// caller's context, and nobody holds the redial token while it runs. The
// call that began it waits for it up to its own deadline, and so does every
// call made meanwhile (each up to its own): a healthy agent that takes a
// while to answer (a TLS reconnect over a long path, a restart under socket
// activation) serves them all. Once a call's deadline passes after it
// waited reconnectPatience or more, the agent has not answered within a
// caller's deadline: every call made after that, until the redial ends,
// fails at once with UNAVAILABLE (the calls already waiting wait on, up to
// their own deadlines), so an agent that stays down costs the callers of
// its first seconds their deadlines, not every caller. A call that is
// cancelled, or that waited less than reconnectPatience, changes nothing
// for the others. The connect goes on without them, and once the agent
// answers, that connection serves the next call. A redial begun within
// redialWait of one that went unanswered for redialWait, or was abandoned
// and then failed (the agent down for long), is waited for reconnectGrace
// from its start at most, by every call: else one call in every
// redialWait, and those made meanwhile, would wait their whole deadlines.
func (c *Client) redial(ctx context.Context, dead *conn) (*conn, error) {
	cn, r, began, err := c.redialOnce(ctx, dead)
	if r == nil {
		return cn, err
	}
	return c.await(ctx, r, began)
}

// notAnswered is the error of a call that does not wait for the reconnect
// r, which has not ended.
func notAnswered(r *reconnect) error {
	return failed(fmt.Sprintf("reconnect: the agent has not answered a reconnect begun %v ago (it may be starting, or down behind a socket that systemd holds)", time.Since(r.start).Round(time.Millisecond)), nil)
}

// await waits for the reconnect r: until it ends, the caller's context
// ends, Close, or r is abandoned. began: the caller began r.
func (c *Client) await(ctx context.Context, r *reconnect, began bool) (*conn, error) {
	waitFrom := time.Now()
	var grace <-chan time.Time
	if r.inOutage {
		t := time.NewTimer(time.Until(r.start.Add(reconnectGrace)))
		defer t.Stop()
		grace = t.C
	}
	// Not r.abandoned: an abandoned redial fails the calls made after it,
	// not those already waiting, which wait out their own deadlines.
	select {
	case <-r.done:
	case <-grace:
		if r.ready() {
			break
		}
		r.abandon()
		return nil, notAnswered(r)
	case <-ctx.Done():
		if r.ready() {
			break
		}
		// Evidence that the agent does not answer: this call waited
		// reconnectPatience for it, or the outage is known. A shorter
		// wait, or a cancel, says nothing of the agent.
		if r.inOutage || errors.Is(ctx.Err(), context.DeadlineExceeded) && time.Since(waitFrom) >= reconnectPatience {
			r.abandon()
		}
		if !began {
			return nil, ctx.Err()
		}
		return nil, failed("reconnect (it goes on without this call)", ctx.Err())
	case <-c.closing.Done():
		return nil, ErrClosed
	}
	return c.ended(ctx, r, began)
}

// redialOnce is redial's turn with the redial token. It returns the
// connection to use, or an error, or a reconnect in progress to wait for
// without the token (await), and whether this call began it.
func (c *Client) redialOnce(ctx context.Context, dead *conn) (cn *conn, r *reconnect, began bool, err error) {
	if c.isClosed() {
		return nil, nil, false, ErrClosed // without waiting for a dial in progress
	}
	if err := c.takeRedialToken(ctx); err != nil {
		return nil, nil, false, err
	}
	defer func() { c.redialToken <- struct{}{} }()
	if c.isClosed() {
		return nil, nil, false, ErrClosed
	}
	if cur := c.cur.Load(); cur != dead {
		return cur, nil, false, nil // redialled while we waited
	}
	if other := c.reconnecting; other != nil {
		if other.ready() {
			cn, err := c.settle(other)
			return cn, nil, false, err
		}
		select {
		case <-other.abandoned:
			return nil, nil, false, notAnswered(other)
		default:
			return nil, other, false, nil
		}
	}
	if dead == c.lastRedial && !dead.proven.Load() && dead.born.After(c.failedAt) {
		c.failedAt, c.failErr = dead.born, failed("its connection was lost before any reply", dead.terminalErr())
	}
	if since := time.Since(c.failedAt); since < redialBackoff {
		// Not wrapped: the code is UNAVAILABLE whatever the last
		// failure's was, which its text names when it is another.
		last := causeText(c.failErr)
		if Code(c.failErr) != proto.Unavailable {
			last = c.failErr.Error()
		}
		return nil, nil, false, failed(fmt.Sprintf("the last reconnect, %v ago, failed: %s", since.Round(time.Millisecond), last), nil)
	}
	// A redial that went unanswered long ago says nothing of this one: a
	// client idle while the agent came back must not take a later restart
	// for the same outage.
	inOutage := !c.unansweredAt.IsZero() && time.Since(c.unansweredAt) < redialWait
	r = &reconnect{start: time.Now(), done: make(chan struct{}), abandoned: make(chan struct{}), inOutage: inOutage}
	// Published before anyone waits for it: later calls see it in progress
	// and wait with it rather than queue for the token.
	c.reconnecting = r
	wait := redialWait
	go func() {
		// Not the caller's context: the connect may outlive it.
		dialCtx, cancel := context.WithTimeout(c.closing, wait)
		r.cn, r.err = c.connect(dialCtx)
		if r.err != nil && errors.Is(dialCtx.Err(), context.DeadlineExceeded) {
			r.unanswered = true
			r.err = failed(fmt.Sprintf("the agent did not answer in %v", wait), nil)
		}
		cancel()
		close(r.done)
		// Recorded now, whoever waits for it: an answered connection
		// becomes the client's, a failure starts the backoff.
		<-c.redialToken
		c.settle(r)
		c.redialToken <- struct{}{}
	}()
	return nil, r, true, nil
}

// takeRedialToken waits for the redial token, which the holder gives back
// soon: nobody holds it while a connect runs.
func (c *Client) takeRedialToken(ctx context.Context) error {
	select {
	case <-c.redialToken:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.closing.Done():
		return ErrClosed
	}
}

// ended returns what the reconnect r, which has ended, came to, recording
// it unless r's goroutine or another caller has.
func (c *Client) ended(ctx context.Context, r *reconnect, patient bool) (*conn, error) {
	if err := c.takeRedialToken(ctx); err != nil {
		if patient && !errors.Is(err, ErrClosed) {
			return nil, failed("reconnect", err)
		}
		return nil, err
	}
	defer func() { c.redialToken <- struct{}{} }()
	return c.settle(r)
}

// settle records the end of the reconnect r once, the redial token held,
// and returns what it came to: the new connection becomes the client's, or
// the failure starts a backoff.
func (c *Client) settle(r *reconnect) (*conn, error) {
	if c.reconnecting == r {
		c.reconnecting = nil
		r.settledCn, r.settledErr = c.redialed(r)
	}
	return r.settledCn, r.settledErr
}

// redialed records the end of the reconnect r, the redial token held.
func (c *Client) redialed(r *reconnect) (*conn, error) {
	cn, err := r.cn, r.err
	if err != nil {
		if c.isClosed() {
			return nil, ErrClosed // cut short by Close
		}
		c.failedAt, c.failErr = time.Now(), err
		// Until a redial succeeds, or redialWait passes: a refused dial in
		// between says nothing of how long the next one waits. A redial
		// abandoned and then failed (the agent's side took the connect
		// and dropped it unanswered: a crash loop under socket
		// activation, a proxy's timeout) is an outage too.
		if r.unanswered || r.isAbandoned() {
			c.unansweredAt = c.failedAt
		}
		return nil, failed("reconnect", err)
	}
	c.failedAt, c.failErr, c.unansweredAt = time.Time{}, nil, time.Time{}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		cn.fail(ErrClosed)
		return nil, ErrClosed
	}
	c.cur.Store(cn)
	c.lastRedial = cn
	return cn, nil
}

func (c *Client) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// fail ends the connection: err becomes every later call's error.
func (c *conn) fail(err error) {
	if err == nil {
		// A nil c.err reads as "still open" while pending is already gone:
		// the next call would write to a nil map.
		err = failed("connection to the agent failed", nil)
	}
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

// call sends req and waits for its reply, or ctx, or the connection's end. A
// non-OK reply is returned as a *proto.Error. unsent reports that the call
// failed because the connection had failed before any byte of req reached
// it: only such a request may be sent again on another connection.
func (c *conn) call(ctx context.Context, req *proto.Request) (resp *proto.Response, unsent bool, err error) {
	ch, dl, unsent, err := c.send(ctx, req)
	if err != nil {
		return nil, unsent, err
	}
	resp, err = c.await(ctx, req, ch, dl)
	return resp, false, err
}

// send registers req for its reply and writes it. It returns the channel the
// reply comes on and ctx's deadline.
func (c *conn) send(ctx context.Context, req *proto.Request) (ch chan *proto.Response, dl time.Time, unsent bool, err error) {
	if err := ctx.Err(); err != nil {
		// A request its caller gave up on before it was sent stays unsent:
		// the agent would sign it, journal it and count it against the
		// slot's rate and quota.
		return nil, dl, false, failed(req.Op.String()+" not sent", err)
	}
	req.ID = c.nextID.Add(1)
	dl, hasDeadline := ctx.Deadline()
	if hasDeadline {
		ms := time.Until(dl).Milliseconds()
		if ms <= 0 {
			return nil, dl, false, failed(req.Op.String()+" not sent", context.DeadlineExceeded)
		}
		req.TimeoutMillis = uint32(min(ms, math.MaxUint32))
	}
	ch = make(chan *proto.Response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, dl, true, err
	}
	quiet := c.probe != nil && len(c.pending) == 0
	c.pending[req.ID] = ch
	c.mu.Unlock()
	if quiet && c.quietFor() >= quietProbeAfter && c.closedByAgent(dl) {
		// Found before anything was written: req may go out on a new
		// connection.
		c.forget(req.ID)
		return nil, dl, true, c.terminalErr()
	}

	codec := codecPool.Get().(*proto.Codec)
	frame, err := codec.AppendRequestFrame(nil, req)
	codecPool.Put(codec)
	if err != nil {
		err = refused(proto.BadRequest, fmt.Sprintf("%s refused by the client, not sent: %v", req.Op, err))
	} else if len(frame)-proto.FrameHeaderLen > c.maxFrame {
		err = refused(proto.BadRequest, fmt.Sprintf("%s refused by the client, not sent: the request's %d bytes exceed the %d-byte frame limit", req.Op, len(frame)-proto.FrameHeaderLen, c.maxFrame))
	}
	if err != nil {
		c.forget(req.ID)
		return nil, dl, false, err
	}
	if unsent, err := c.write(ctx, req.Op, frame); err != nil {
		c.forget(req.ID)
		return nil, dl, unsent, err
	}
	return ch, dl, false, nil
}

// await waits for the reply to req, sent, on ch.
func (c *conn) await(ctx context.Context, req *proto.Request, ch chan *proto.Response, dl time.Time) (*proto.Response, error) {
	for {
		select {
		case resp, ok := <-ch:
			return c.result(resp, ok)
		case <-c.readerRole:
			// Our reply may have been delivered while we waited for the role.
			if resp, ok, got := c.delivered(ch); got {
				c.readerRole <- struct{}{}
				return c.result(resp, ok)
			}
			resp, ok, err := c.readUntil(ctx, req.ID, ch, dl)
			c.readerRole <- struct{}{}
			if err != nil {
				c.forget(req.ID)
				return nil, failed(req.Op.String()+" sent, no reply yet", err)
			}
			return c.result(resp, ok)
		case <-ctx.Done():
			if resp, ok, got := c.delivered(ch); got {
				return c.result(resp, ok)
			}
			c.forget(req.ID)
			return nil, failed(req.Op.String()+" sent, no reply yet", ctx.Err())
		case <-c.done:
			// A reader hands out the replies it read before it fails the
			// connection: one may be waiting, a signature the agent made
			// and journaled. Reported lost, a caller that retries would
			// get a second one.
			if resp, ok, got := c.delivered(ch); got {
				return c.result(resp, ok)
			}
			return nil, c.terminalErr()
		}
	}
}

// delivered takes the reply waiting on ch, if there is one.
func (c *conn) delivered(ch chan *proto.Response) (resp *proto.Response, ok, got bool) {
	select {
	case resp, ok = <-ch:
		return resp, ok, true
	default:
		return nil, false, false
	}
}

// quietProbeAfter is how long a TCP connection must have gone without a
// reply before a request looks for the agent's close first. Back-to-back
// requests skip the look (a system call); an agent's restart takes longer.
const quietProbeAfter = time.Millisecond

// quietFor is how long ago the last reply was read.
func (c *conn) quietFor() time.Duration {
	return time.Since(c.born) - time.Duration(c.lastRead.Load())
}

// closedByAgent reports whether the agent has ended this quiet connection:
// it closed it (a restart, an idle timeout) or said its last word (an id 0
// reply). A TCP write to such a connection succeeds, and the request would
// be lost with it, so a request that finds the connection ended this way
// goes out on a new one instead. Anything else the agent sent meanwhile is
// read: a late reply to a call that gave up is dropped as readUntil drops
// it. The connection is failed when it reports true. A read of part of a
// frame waits for the rest until the caller's deadline dl at most.
func (c *conn) closedByAgent(dl time.Time) bool {
	select {
	case <-c.readerRole:
	default:
		return false // a caller is reading: it meets the close itself
	}
	defer func() { c.readerRole <- struct{}{} }()
	for c.spoke() {
		c.deadline = time.Now().Add(finalWordWait)
		if !dl.IsZero() && dl.Before(c.deadline) {
			c.deadline = dl
		}
		c.nc.SetReadDeadline(c.deadline)
		resp, err := c.readFrame(nil)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return false // part of a frame: the next reader waits for the rest
		}
		if err != nil {
			c.fail(lostOrClosed(err))
			return true
		}
		if resp.ID == 0 {
			c.fail(finalReplyError(resp))
			return true
		}
		c.deliver(resp)
	}
	return false
}

// spoke reports whether the agent has sent anything not yet read: bytes or
// the end of the stream in the socket, in the connection's buffer, or in
// crypto/tls's (records it read off the socket with an earlier reply but
// has not handed up yet), without waiting. The caller holds the reader role.
func (c *conn) spoke() bool {
	if c.br.Buffered() > 0 || c.peerSpoke() {
		return true
	}
	// A deadline already past fails a read that would have to wait, before
	// any system call; crypto/tls takes the timeout as temporary.
	c.deadline = pastDeadline
	c.nc.SetReadDeadline(pastDeadline)
	_, err := c.br.Peek(1)
	return !errors.Is(err, os.ErrDeadlineExceeded)
}

// peerSpoke reports whether the socket under the connection has bytes or
// an end of stream to read, without reading them.
func (c *conn) peerSpoke() bool {
	var err error
	var b [1]byte
	c.probe.Read(func(fd uintptr) bool {
		_, _, err = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return true
	})
	return err == nil
}

// pastDeadline is the write deadline that cuts a write now.
var pastDeadline = time.Unix(1, 0)

// write sends one frame, giving up when ctx ends. A write can block for
// good: the agent stops reading a connection that has max_in_flight_per_conn
// requests in flight, and a hung agent reads nothing; an unbounded write
// would hold this caller and every caller queued behind it. unsent reports
// that the connection had failed and nothing of frame reached it.
func (c *conn) write(ctx context.Context, op proto.Op, frame []byte) (unsent bool, err error) {
	select {
	case <-c.writeToken:
	case <-ctx.Done():
		return false, failed(op.String()+" not sent", ctx.Err())
	case <-c.done:
		return true, c.terminalErr()
	}
	defer func() { c.writeToken <- struct{}{} }()
	if err := ctx.Err(); err != nil {
		// The token and the cancellation were both ready, and select took
		// the token: nothing is sent for a caller that gave up.
		return false, failed(op.String()+" not sent", err)
	}
	dl, _ := ctx.Deadline()
	if !c.writeDeadline.Equal(dl) {
		c.nc.SetWriteDeadline(dl)
		c.writeDeadline = dl
	}
	// The deadline bounds the write; a cancellation before it is watched
	// too, as readUntil does: a context with a deadline can also be
	// cancelled (its parent, its cancel func).
	stop := func() bool { return true }
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, func() {
			c.nc.SetWriteDeadline(pastDeadline)
			c.writeCut <- struct{}{}
		})
	}
	n, err := c.nc.Write(frame)
	if !stop() {
		// The cut has run or is running: wait for it, so that it cannot
		// land on the next holder's write.
		<-c.writeCut
		c.writeDeadline = pastDeadline
	}
	if err == nil {
		return false, nil
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		c.fail(c.finalWord(failed("write to the agent", err)))
		// A Unix socket whose peer has closed fails the write (EPIPE) with
		// nothing sent: how a connection to a restarted agent is found dead.
		// Over TLS, n counts whole records written, so n == 0 still means
		// the agent cannot have decoded any of the request.
		return n == 0, c.terminalErr()
	}
	cause := ctx.Err()
	if cause == nil {
		cause = context.DeadlineExceeded // nc's deadline fired before ctx's timer
	}
	if n == 0 && !c.cutWriteBreaks {
		// Nothing of the frame went out: the stream is still in step.
		return false, failed(op.String()+" not sent", cause)
	}
	// Part of the frame went out. The agent would read the next request's
	// bytes as the rest of this one, so no request may follow on this
	// connection.
	c.proven.Store(true) // closed for the caller's sake, not the agent's
	c.fail(failed(fmt.Sprintf("connection to the agent closed: a %s request was cut off by its caller's deadline or cancellation after %d of its %d bytes", op, n, len(frame)), nil))
	return false, failed(fmt.Sprintf("%s cut off after %d of its %d bytes, so the connection was closed", op, n, len(frame)), cause)
}

// finalWordWait bounds the look for the agent's last reply after a failed
// write; the reply, if any, is in the socket already.
const finalWordWait = 100 * time.Millisecond

// finalWord returns the agent's last reply before it closed the connection
// (id 0: why it refused or ended it) as the error to report instead of
// writeErr, when one is waiting in the socket. An agent that refuses a
// connection (at max_conns, a peer it does not admit) says why and closes
// at once, so the client's first write fails (EPIPE) with the reason
// unread. Replies to earlier requests read on the way go to their callers.
func (c *conn) finalWord(writeErr error) error {
	select {
	case <-c.readerRole:
	default:
		return writeErr // a caller is reading: it meets the reply itself
	}
	defer func() { c.readerRole <- struct{}{} }()
	c.deadline = time.Now().Add(finalWordWait)
	c.nc.SetReadDeadline(c.deadline)
	for {
		resp, err := c.readFrame(nil)
		if err != nil {
			return writeErr
		}
		if resp.ID == 0 {
			if perr := resp.Err(); perr != nil {
				return perr
			}
			return writeErr
		}
		c.deliver(resp)
	}
}

func (c *conn) result(resp *proto.Response, ok bool) (*proto.Response, error) {
	if !ok {
		return nil, c.terminalErr()
	}
	if err := resp.Err(); err != nil {
		return nil, err
	}
	return resp, nil
}

// readUntil reads replies, handing each to its caller, until the one for id
// arrives (returned with ok), the connection fails (ok false: the caller
// reads the terminal error), or ctx ends (err). The caller holds the reader
// role.
func (c *conn) readUntil(ctx context.Context, id uint64, ch chan *proto.Response, dl time.Time) (*proto.Response, bool, error) {
	if ctx.Done() != nil {
		// Cut the blocking read when ctx ends: at its deadline the read
		// deadline does it, but a cancellation before then must too.
		stop := context.AfterFunc(ctx, func() { c.nc.SetReadDeadline(time.Now()) })
		defer stop()
	}
	for {
		if !c.deadline.Equal(dl) {
			c.nc.SetReadDeadline(dl)
			c.deadline = dl
			if ctx.Err() != nil {
				// Cancelled before that set: the AfterFunc's cut came
				// first and was just undone. A context ends before its
				// AfterFuncs run, so after this look a cancellation's cut
				// comes after the set, and holds.
				c.deadline = time.Time{}
				c.nc.SetReadDeadline(time.Time{})
				return nil, false, ctx.Err()
			}
		}
		resp, err := c.readFrame(ctx)
		if c.probe != nil {
			c.lastRead.Store(int64(time.Since(c.born)))
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if ctx.Err() != nil {
					c.deadline = time.Time{} // unknown now; the next reader sets its own
					c.nc.SetReadDeadline(time.Time{})
					return nil, false, ctx.Err()
				}
				// A deadline left by an earlier reader's cancellation: ours
				// is still good, set it again and go on.
				c.deadline = time.Now()
				continue
			}
			c.fail(lostOrClosed(err))
			return nil, false, nil
		}
		if resp.ID == 0 {
			c.fail(finalReplyError(resp))
			return nil, false, nil
		}
		if resp.ID == id {
			c.forget(id)
			return resp, true, nil
		}
		c.deliver(resp)
	}
}

// lostOrClosed is the error a failed read ends the connection with: lost
// (the network's err), or closed by the client for a reply it cannot take.
func lostOrClosed(err error) error {
	if errors.Is(err, ErrMalformedReply) {
		return failed("connection to the agent closed", err)
	}
	return failed("connection to the agent lost", err)
}

// finalReplyError is the error an id 0 reply ends the connection with:
// the agent's last word before it closes the connection, which is a
// refusal; one with code OK is a protocol error.
func finalReplyError(resp *proto.Response) error {
	if err := resp.Err(); err != nil {
		return err
	}
	return malformedReply("protocol error: the agent sent a final reply (id 0) with code OK; connection closed", nil)
}

// deliver hands a reply read by the reader to the call waiting for it, if
// that call is still waiting.
func (c *conn) deliver(resp *proto.Response) {
	c.mu.Lock()
	waiting := c.pending[resp.ID]
	delete(c.pending, resp.ID)
	c.mu.Unlock()
	if waiting != nil {
		waiting <- resp
		if c.br.Buffered() == 0 {
			// The caller just handed its reply is queued on this P, and
			// the reader's next read waits. On a connection in poll mode
			// (pollconn.go) that wait keeps the P, and the caller would
			// run only when another P took it or the runtime took the P
			// back, milliseconds later: it runs first.
			runtime.Gosched()
		}
	}
}

// readFrame reads one reply. It peeks the whole frame before consuming any
// of it, so a read deadline in the middle leaves the stream in step. ctx,
// when not nil, is the context of the caller whose deadline is set.
func (c *conn) readFrame(ctx context.Context) (*proto.Response, error) {
	hdr, err := c.peekFrame(ctx, proto.FrameHeaderLen)
	if err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr))
	if n == 0 {
		return nil, malformedReply("malformed reply: no payload", proto.ErrEmptyFrame)
	}
	if n > c.maxFrame {
		// Not the announced length: from an agent or a stream that lost
		// its place, those four bytes may be a digest's (docs/security.md).
		return nil, malformedReply(fmt.Sprintf("malformed reply: over the limit of %d bytes", c.maxFrame), proto.ErrFrameTooLarge)
	}
	frame, err := c.peekFrame(ctx, proto.FrameHeaderLen+n)
	if err != nil {
		return nil, err
	}
	resp := new(proto.Response)
	err = c.codec.DecodeResponse(frame[proto.FrameHeaderLen:], resp)
	c.br.Discard(proto.FrameHeaderLen + n)
	c.frameBy = time.Time{}
	if err != nil {
		// No proof of a working agent: the connection closes for it, and
		// the redial backs off as after a failed dial (lastRedial).
		return nil, malformedReply("malformed reply", err)
	}
	if resp.ID > helloID && !c.proven.Load() {
		c.proven.Store(true)
	}
	return resp, nil
}

// peekFrame returns the first n bytes of the frame at the head of br, n
// at most the frame's length, reading one read at a time: a reply read
// whole by its first read takes no timer and no system call more. Once part
// of the frame is in and more must be waited for, the wait is bounded by
// frameTimeout as well as by the caller's deadline.
func (c *conn) peekFrame(ctx context.Context, n int) ([]byte, error) {
	for {
		have := c.br.Buffered()
		if have >= n {
			return c.br.Peek(n)
		}
		if have > 0 {
			if err := c.boundFrame(ctx); err != nil {
				return nil, err
			}
		}
		if _, err := c.br.Peek(have + 1); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !c.frameBy.IsZero() && !time.Now().Before(c.frameBy) {
				return nil, failed(fmt.Sprintf("a reply frame stopped after %d bytes, and the rest did not come within %v", c.br.Buffered(), frameTimeout), nil)
			}
			return nil, err
		}
	}
}

// boundFrame makes the read deadline no later than frameBy, armed by the
// first wait for the rest of the frame. A reader that comes after frameBy
// still reads what is in the socket, for finalWordWait.
func (c *conn) boundFrame(ctx context.Context) error {
	now := time.Now()
	if c.frameBy.IsZero() {
		c.frameBy = now.Add(frameTimeout)
	}
	by := c.frameBy
	if grace := now.Add(finalWordWait); by.Before(grace) {
		by = grace
	}
	if !c.deadline.IsZero() && !by.Before(c.deadline) {
		return nil // the deadline set comes first
	}
	c.nc.SetReadDeadline(by)
	c.deadline = by
	if ctx != nil && ctx.Err() != nil {
		// The caller's cancellation cut the read deadline before this
		// moved it: it is cut again here, as readUntil's own would be.
		return os.ErrDeadlineExceeded
	}
	return nil
}

var codecPool = sync.Pool{New: func() any { return proto.NewCodec() }}

func (c *conn) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

func (c *conn) terminalErr() error {
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
	// Certificate is the key's X.509 certificate (DER) when the agent's
	// config names one (`certificates:`), else nil: with the key's Signer
	// it makes a tls.Certificate (TLSCertificate). Intermediates are the
	// certificates that followed it in that file.
	Certificate   []byte
	Intermediates [][]byte
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
	// Grown as the keys parse, not made for the count the agent sent: a
	// list whose first key does not parse allocates nothing more.
	var out []Key
	for _, k := range resp.Keys {
		pub, err := x509.ParsePKIXPublicKey(k.Pub)
		if err != nil {
			return nil, malformedReply(fmt.Sprintf("ListKeys reply: key %q: public key", k.Name), err)
		}
		out = append(out, Key{Name: k.Name, KID: k.KID, Provider: k.Provider, Type: k.KeyType, Public: pub, SPKI: k.Pub, Certificate: k.Cert, Intermediates: k.Chain})
	}
	return out, nil
}

// PublicKey fetches one key's public half.
func (c *Client) PublicKey(ctx context.Context, ref KeyRef) (Key, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpPublicKey, Key: ref.Name, KID: ref.KID})
	if err != nil {
		return Key{}, err
	}
	// A caller pins the kid it gets here for its next request (sigil
	// keys sign, verify-signature): an empty one would turn a request for
	// this key into one for the default key, another would name a key
	// not asked for.
	switch {
	case resp.KID == "":
		return Key{}, malformedReply(fmt.Sprintf("PublicKey reply: key %q comes without its kid", resp.Key), nil)
	case ref.KID != "" && resp.KID != ref.KID:
		return Key{}, malformedReply(fmt.Sprintf("PublicKey reply: key %q has kid %q, not the %q asked for", resp.Key, resp.KID, ref.KID), nil)
	}
	pub, err := x509.ParsePKIXPublicKey(resp.Pub)
	if err != nil {
		return Key{}, malformedReply(fmt.Sprintf("PublicKey reply: key %q: public key", resp.Key), err)
	}
	return Key{Name: resp.Key, KID: resp.KID, Type: resp.KeyType, Public: pub, SPKI: resp.Pub}, nil
}

// Signature is a Sign result: the signature in crypto.Signer's encoding
// (ASN.1 DER for ECDSA) and the key that made it.
type Signature struct {
	Sig []byte
	Key string
	KID string
	// PolicyHash is the hash of the tenant policy that allowed the
	// signature (empty when the agent runs without policies).
	PolicyHash []byte
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
	// A Signer hands the signature on as crypto.Signer's: an empty one, or
	// one by another key than the kid it pins (Public's), is not to be sent.
	switch {
	case len(resp.Sig) == 0:
		return Signature{}, malformedReply("Sign reply: OK without a signature", nil)
	case ref.KID != "" && resp.KID != ref.KID:
		return Signature{}, malformedReply(fmt.Sprintf("Sign reply: signed by kid %q, not the %q asked for", resp.KID, ref.KID), nil)
	}
	return Signature{Sig: resp.Sig, Key: resp.Key, KID: resp.KID, PolicyHash: resp.PolicyHash}, nil
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

// Code returns the stable code of an error from this package:
//   - the agent's code for a request it refused (one this version does not
//     know included: proto.CodeOutOfRange for a number past 16 bits);
//   - DEADLINE_EXCEEDED for a call whose context ended: its deadline, or
//     its caller's cancellation (context.Canceled), which the protocol has
//     no code of its own for; retry only in a context that has not ended;
//   - BAD_REQUEST for a call on a closed client, or one waiting for its
//     reply when the client was closed (ErrClosed): Close is final, and
//     the call fails the same way every time;
//   - BAD_REQUEST, or UNSUPPORTED_ALGORITHM for an algorithm, for a request
//     the client refused itself before sending it (ErrRefusedByClient);
//   - NOT_FOUND from TLSCertificate for a name the agent's key list has
//     no certificate under (ErrNoCertificate);
//   - INTERNAL for a reply the client cannot take (ErrMalformedReply);
//   - UNAUTHENTICATED for a socket the client will not trust as the
//     agent's (proto.ErrUntrustedSocketDir: a default socket directory
//     others can write to or own, or a listener of another user), which
//     stays so until an operator fixes it;
//   - UNAVAILABLE otherwise: no agent, a lost connection, the one a caller
//     may retry with backoff.
//
// The caller's own endings are never UNAVAILABLE, so that a loop retrying
// while UNAVAILABLE ends with its context or its Close; errors.Is tells
// context.Canceled, context.DeadlineExceeded and ErrClosed apart.
func Code(err error) proto.Code {
	var pe *proto.Error
	switch {
	case err == nil:
		return proto.OK
	case errors.As(err, &pe):
		return pe.Code
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return proto.DeadlineExceeded
	case errors.Is(err, ErrClosed):
		return proto.BadRequest
	case errors.Is(err, proto.ErrUntrustedSocketDir):
		// The client would not take the socket's owner for the agent: a
		// retry meets the same directory until an operator fixes it.
		return proto.Unauthenticated
	}
	// The client's own finding, however deep: "reconnect" wraps a Hello
	// whose reply did not decode.
	for f := (*failure)(nil); errors.As(err, &f); err = f.cause {
		if f.code != proto.OK {
			return f.code
		}
	}
	return proto.Unavailable
}
