package agent

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
)

// conn is one client connection. Its reader goroutine decodes requests and
// answers the cheap ones itself; Sign and Verify run on the reader too when
// nothing else of this connection is in flight (the common case of a client
// waiting for each signature: no goroutine hand-off, no thread wake-up), and
// on pool workers otherwise, so a pipelining client's requests overlap.
// Replies are written by whoever finishes one: the first writes, and replies
// that become ready meanwhile are appended and go out in its next write.
type conn struct {
	a   *Agent
	nc  net.Conn
	log *zap.Logger

	ctx    context.Context // cancelled when the connection ends
	cancel context.CancelFunc

	inFlight chan struct{} // one token per request handed to a worker
	handlers sync.WaitGroup

	w replyWriter

	load     *tenantLoad // nil on the admin socket (limits.go)
	stopping atomic.Bool // stopReading was called: keep the read deadline in the past
	// lastDone is when a request on a worker last ended, by monoNow, kept
	// with idle_timeout on: the connection is idle from then. Not the wall
	// clock: a step back held an idle connection open for as long as the
	// step, and a step forward closed one whose request had just ended.
	lastDone atomic.Int64

	peer       peer
	peerName   string // peer.String(), for audit records
	admin      bool   // accepted on the admin socket: admin operations only
	helloDone  bool   // touched by the reader goroutine only
	frameArmed bool   // the reader's deadline is limits.frame_timeout; reader only
	// final is the reply (id 0) the reader ended the connection with,
	// sent after the replies to the requests it had already taken.
	final *proto.Response

	// An mTLS peer's certificate: the client CAs it was last verified
	// under and when its verified chain ends (certInForce); reader only.
	certUnder *tls.Config
	certEnd   time.Time
}

// identify establishes who the peer is before anything is read from it: the
// kernel's credentials on a Unix socket, the verified client certificate
// after a bounded TLS handshake.
func (c *conn) identify() error {
	switch nc := c.nc.(type) {
	case *net.UnixConn:
		p, err := unixPeer(nc)
		c.peer = p
		return err
	case *tls.Conn:
		if c.a.tls != nil {
			// Taken before the handshake: a reload during it makes the
			// first request verify the certificate under the new CAs.
			c.certUnder = c.a.tls.current.Load()
		}
		ctx, cancel := context.WithTimeout(c.ctx, c.a.cfg.TCP.HandshakeTimeout)
		defer cancel()
		if err := nc.HandshakeContext(ctx); err != nil {
			c.log = c.log.With(zap.String("peer_addr", nc.RemoteAddr().String()))
			return fmt.Errorf("TLS handshake: %w", err)
		}
		cs := nc.ConnectionState()
		p, err := tlsPeer(cs, nc.RemoteAddr().String())
		c.peer = p
		c.certEnd = chainsEnd(cs.VerifiedChains)
		return err
	}
	// Fail closed: a connection whose peer cannot be identified (plain TCP,
	// say, through Serve or a systemd socket) must not be taken for the
	// single tenant of a policy-less agent.
	c.peer = peer{addr: c.nc.RemoteAddr().String()}
	return fmt.Errorf("a %T carries no peer identity: the agent serves Unix sockets and mutual TLS only", c.nc)
}

// replyWriter coalesces replies without a writer goroutine.
type replyWriter struct {
	mu       sync.Mutex
	pending  []byte // encoded frames waiting for the next write
	spare    []byte // the other buffer, swapped in while one is being written
	flushing bool   // someone is writing; appenders just leave their frame
	broken   bool   // a write failed or the peer stopped reading: drop replies
	// fences are the policy fences of the signatures in pending: each is
	// ended once the write that carries its reply returns (or the reply
	// is dropped), so that a Pause's ack comes after every signature it
	// let through has left, not merely been queued behind a slow reader.
	fences      []policy.Decision
	spareFences []policy.Decision

	// deadlineSet is when the write deadline was last set; only the
	// goroutine that is flushing touches it.
	deadlineSet time.Time
}

// drainIdle is how long a connection's reader goes on reading during
// shutdown, for the requests its client sent before it; the shutdown grace
// period bounds the whole drain.
const drainIdle = 20 * time.Millisecond

// maxPendingReplies bounds the replies queued behind a write that does not
// complete: a client that sends but never reads is disconnected, not buffered
// for without limit.
const maxPendingReplies = 1 << 20

var (
	codecPool   = sync.Pool{New: func() any { return proto.NewCodec() }}
	requestPool = sync.Pool{New: func() any { return new(proto.Request) }}
)

func newConn(a *Agent, nc net.Conn, admin bool) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	lim := a.cfg.Limits
	c := &conn{
		a:        a,
		nc:       nc,
		ctx:      ctx,
		cancel:   cancel,
		inFlight: make(chan struct{}, lim.MaxInFlightPerConn),
		admin:    admin,
	}
	c.log = a.log
	return c
}

// serve runs the connection to its end and releases everything it held.
func (c *conn) serve() {
	defer c.a.forget(c)
	_, handshakes := c.nc.(*tls.Conn)
	if handshakes && !c.a.beginHandshake() {
		// Not logged one by one: a flood of these would flood the log.
		c.a.metrics.refused(limitHandshakes)
		c.nc.Close()
		return
	}
	err := c.identify()
	if handshakes {
		c.a.endHandshake()
	}
	if err != nil {
		c.log.Info("connection refused: peer not identified", zap.Error(err))
		c.nc.Close()
		return
	}
	c.log = c.log.With(c.peer.logFields()...)
	c.peerName = c.peer.String()
	if limit := c.a.admit(c); limit != "" {
		c.refuse(limit)
		c.nc.Close()
		return
	}
	defer c.a.unadmit(c)
	c.log.Debug("connection opened")
	c.readLoop()
	// Requests already read still get their replies (each handler writes its
	// own), unless the peer is gone.
	c.handlers.Wait()
	if c.final != nil && c.ctx.Err() == nil {
		// Only now: id 0 marks the last reply on the connection, and a
		// client stops reading there (docs/protocol.md). Not once the
		// connection was dropped (shutdown's grace ran out, a failed
		// write): there is no one to tell.
		c.sendFinal(c.final.Code, c.final.Msg)
	}
	c.cancel()
	c.nc.Close()
	c.log.Debug("connection closed")
}

// stopReading makes the reader return at its next read, for shutdown: no new
// requests are taken, in-flight ones finish.
func (c *conn) stopReading() {
	c.stopping.Store(true)
	c.nc.SetReadDeadline(time.Now())
}

// setReadDeadline sets the reader's deadline unless shutdown has stopped
// the reader: stopReading's deadline in the past must not be overwritten.
func (c *conn) setReadDeadline(t time.Time) {
	c.nc.SetReadDeadline(t)
	if c.stopping.Load() {
		c.nc.SetReadDeadline(time.Now())
	}
}

// frameBuffered reports whether br holds a whole frame (or at least a
// header announcing more than max, which ReadFrame refuses at once).
func frameBuffered(br *bufio.Reader, max int) bool {
	n := br.Buffered()
	if n < 4 {
		return false
	}
	h, _ := br.Peek(4)
	l := int(binary.BigEndian.Uint32(h))
	return l > max || n-4 >= l
}

// waitFrame blocks until the next frame has fully arrived in br, within
// the limits: frame_timeout once its first byte is in (and for the first
// frame, Hello, from the connection's start), idle_timeout before that.
// In the common case (a small request in one segment, read whole) it sets
// no deadline at all. It returns the limit that expired, or "" and the
// read error, if any.
func (c *conn) waitFrame(br *bufio.Reader, lim Limits, draining bool) (string, error) {
	if draining {
		return "", nil // the drain's own deadline applies
	}
	if br.Buffered() == 0 && c.helloDone {
		idleFor := lim.IdleTimeout
		for {
			if lim.IdleTimeout > 0 {
				c.setReadDeadline(time.Now().Add(idleFor))
			}
			_, err := br.Peek(1)
			if err == nil {
				break
			}
			if lim.IdleTimeout > 0 && errors.Is(err, os.ErrDeadlineExceeded) && !c.stopping.Load() {
				// Idle means nothing in flight for idle_timeout: a
				// request still running on a worker (a cloud KMS sign,
				// say), or one that ended less than that ago, keeps the
				// connection.
				if len(c.inFlight) > 0 {
					idleFor = lim.IdleTimeout
					continue
				}
				if left := c.idleLeft(lim.IdleTimeout, monoNow()); left > 0 {
					idleFor = left
					continue
				}
				return limitIdleTimeout, err
			}
			return "", err
		}
	}
	if frameBuffered(br, lim.MaxFrame) {
		if lim.IdleTimeout > 0 {
			c.setReadDeadline(time.Time{})
		}
		return "", nil
	}
	c.setReadDeadline(time.Now().Add(lim.FrameTimeout))
	c.frameArmed = true
	h, err := br.Peek(4)
	if err == nil {
		l := int(binary.BigEndian.Uint32(h))
		if l > br.Size()-4 {
			// Larger than the read buffer: ReadFrame reads the rest
			// under the armed deadline, and readLoop clears it after.
			return "", nil
		}
		if l <= lim.MaxFrame {
			_, err = br.Peek(4 + l)
		}
	}
	if err != nil {
		if c.frameExpired(err) {
			return limitFrameTimeout, err
		}
		return "", err
	}
	c.disarmFrame()
	return "", nil
}

// frameExpired reports whether err is the frame deadline running out (not
// shutdown stopping the reader).
func (c *conn) frameExpired(err error) bool {
	return c.frameArmed && errors.Is(err, os.ErrDeadlineExceeded) && !c.stopping.Load()
}

func (c *conn) disarmFrame() {
	if c.frameArmed {
		c.frameArmed = false
		c.setReadDeadline(time.Time{})
	}
}

func (c *conn) readLoop() {
	lim := c.a.cfg.Limits
	br := bufio.NewReaderSize(c.nc, 16<<10)
	codec := proto.NewCodec()
	var buf []byte
	draining := false
	for {
		if limit, err := c.waitFrame(br, lim, draining); limit != "" {
			c.a.metrics.refused(limit)
			c.log.Info("closing connection: "+limit+" expired", zap.String("limit", limit))
			if limit == limitFrameTimeout {
				c.lastWord(proto.BadRequest, "frame not completed within limits.frame_timeout; closing connection")
			}
			return
		} else if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			c.readFailed(err)
			return
		}
		payload, err := proto.ReadFrame(br, buf, lim.MaxFrame)
		if err != nil && c.frameExpired(err) {
			c.a.metrics.refused(limitFrameTimeout)
			c.log.Info("closing connection: "+limitFrameTimeout+" expired", zap.String("limit", limitFrameTimeout))
			c.lastWord(proto.BadRequest, "frame not completed within limits.frame_timeout; closing connection")
			return
		}
		c.disarmFrame()
		if err != nil {
			if !draining && errors.Is(err, os.ErrDeadlineExceeded) && c.a.isClosing() && br.Buffered() == 0 {
				// Shutdown: requests the client has already sent (they may
				// have queued behind one run on this reader) are still
				// served, those in the socket within drainIdle. The
				// deadline is set once: re-armed per request, a client
				// that keeps sending would be served until the grace
				// period ran out and its connection was cut mid-request.
				draining = true
				c.nc.SetReadDeadline(time.Now().Add(drainIdle))
				continue
			}
			c.readFailed(err)
			return
		}
		buf = payload[:0]
		req := requestPool.Get().(*proto.Request)
		req.Reset()
		if err := codec.DecodeRequest(payload, req); err != nil {
			requestPool.Put(req)
			c.log.Info("closing connection: malformed message", zap.Error(err))
			c.lastWord(proto.BadRequest, "malformed message; closing connection")
			return
		}
		if req.ID == 0 {
			// Id 0 marks the final reply before a close: a reply to this
			// request could not be told from it, so the request is malformed.
			requestPool.Put(req)
			c.log.Info("closing connection: malformed message", zap.Error(errRequestIDZero))
			c.lastWord(proto.BadRequest, errRequestIDZero.Error()+"; closing connection")
			return
		}
		if c.peer.chain != nil {
			if err := c.certInForce(time.Now()); err != nil {
				c.log.Info("closing connection: client certificate no longer valid", zap.Error(err))
				c.lastWord(codeOf(err), clientMessage(codeOf(err), err))
				requestPool.Put(req)
				return
			}
		}
		if !c.helloDone && req.Op == proto.OpHello {
			if err := c.admitted(); err != nil {
				c.log.Info("closing connection: peer refused", zap.Error(err))
				c.lastWord(codeOf(err), clientMessage(codeOf(err), err))
				requestPool.Put(req)
				return
			}
		}
		if !c.helloDone && req.Op != proto.OpHello {
			c.log.Info("closing connection: request before Hello", zap.Stringer("op", req.Op))
			c.lastWord(proto.BadRequest, "the first request on a connection must be Hello")
			requestPool.Put(req)
			return
		}
		if req.Op != proto.OpSign && req.Op != proto.OpVerify {
			c.handle(req, time.Time{})
			continue
		}
		// The request's deadline runs from here: a wait for the tenant's
		// in-flight place is part of it, not added to it. That wait is a
		// worker's, never the reader's: a request behind one that waits
		// would not be read, and its deadline would start only when the
		// wait ended, long after its client gave up.
		arrived := time.Now()
		held := c.tryTenantToken()
		if held && c.runInline(req, br) {
			c.handle(req, arrived)
			c.releaseSlot()
			continue
		}
		if held {
			select {
			case c.inFlight <- struct{}{}:
			default:
				// The connection is at its in-flight bound. Waiting for a
				// place with the tenant's held would keep it from this
				// connection's requests on workers that wait for one:
				// each waited out its deadline.
				c.releaseSlot()
				held = false
			}
		}
		if !held {
			// Backpressure: past the in-flight bound the reader stops
			// reading, so a client that floods waits instead of growing
			// our memory.
			select {
			case c.inFlight <- struct{}{}:
			case <-c.ctx.Done():
				requestPool.Put(req)
				return
			}
			held = c.tryTenantToken()
			if !held && !c.mayWaitOnWorker() {
				// The tenant already has as many requests waiting on
				// workers as it may have in flight: this reader waits
				// itself, holding no tenant place meanwhile.
				if !c.acquireSlot(req, arrived) {
					<-c.inFlight
					if c.ctx.Err() != nil {
						return
					}
					continue
				}
				held = true
			}
		}
		c.handlers.Add(1)
		c.a.workers.run(job{c: c, req: req, arrived: arrived, waitSlot: !held})
	}
}

func (c *conn) readFailed(err error) {
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, os.ErrDeadlineExceeded):
		// The peer hung up, or shutdown stopped the reader.
	case errors.Is(err, proto.ErrFrameTooLarge), errors.Is(err, proto.ErrEmptyFrame):
		c.log.Info("closing connection: bad frame", zap.Error(err))
		c.lastWord(proto.BadRequest, err.Error()+"; closing connection")
	default:
		c.log.Debug("connection read failed", zap.Error(err))
	}
}

// monoEpoch is what monoNow measures from: its monotonic reading is the
// one that counts.
var monoEpoch = time.Now()

// monoNow is the time since monoEpoch by the monotonic clock, which no
// clock step moves.
func monoNow() time.Duration { return time.Since(monoEpoch) }

// markDone records that a request on a worker ended at now (monoNow).
func (c *conn) markDone(now time.Duration) { c.lastDone.Store(int64(now)) }

// idleLeft is how much of timeout is left at now (monoNow) since the last
// request on a worker ended: 0 or less when the connection has been idle
// for timeout, or no request ended on a worker.
func (c *conn) idleLeft(timeout, now time.Duration) time.Duration {
	done := c.lastDone.Load()
	if done == 0 {
		return 0
	}
	return timeout - (now - time.Duration(done))
}

// handleAsync answers req on a worker, first waiting for the tenant's
// in-flight place when the reader could not take one (waitSlot).
func (c *conn) handleAsync(req *proto.Request, arrived time.Time, waitSlot bool) {
	held := !waitSlot
	defer func() {
		if c.a.cfg.Limits.IdleTimeout > 0 {
			c.markDone(monoNow())
		}
		<-c.inFlight
		if held {
			c.releaseSlot()
		}
		c.handlers.Done()
	}()
	if waitSlot {
		ok := c.acquireSlot(req, arrived)
		c.doneWaiting()
		if !ok {
			return // answered, or the connection is ending
		}
	}
	held = true
	c.handle(req, arrived)
}

// handle answers req; arrived is when a Sign or Verify was read (its
// deadline runs from then), zero for other ops.
func (c *conn) handle(req *proto.Request, arrived time.Time) {
	resp := proto.Response{ID: req.ID}
	var fence policy.Decision
	c.dispatch(req, &resp, arrived, &fence)
	requestPool.Put(req)
	c.send(&resp, fence) // ends the fence once the reply is written or dropped
}

// errRequestIDZero refuses a request of id 0: docs/protocol.md keeps id 0 for
// the final reply before the agent closes a connection.
var errRequestIDZero = errors.New("request id 0 (request ids are non-zero)")

// sendFinal queues the reply that precedes closing the connection. Its id is
// 0: the offending frame's id, if it had one, could not be trusted.
func (c *conn) sendFinal(code proto.Code, msg string) {
	c.send(&proto.Response{ID: 0, Code: code, Msg: msg}, policy.Decision{})
}

// lastWord is the reader's sendFinal: the reply goes out once the requests
// already handed to workers have their replies, so none follows it.
func (c *conn) lastWord(code proto.Code, msg string) {
	c.final = &proto.Response{ID: 0, Code: code, Msg: msg}
}

// runInline reports whether a Sign or Verify should run on the reader: only
// when no other request of this connection is in flight or already waiting
// in the read buffer, and the key's provider answers locally (a remote one
// would hold up the connection's next requests for a network round trip).
func (c *conn) runInline(req *proto.Request, br *bufio.Reader) bool {
	if len(c.inFlight) != 0 || br.Buffered() != 0 {
		return false
	}
	// The same resolution dispatch will do: with a policy, names are slots.
	t, _, err := c.resolve(req.Key, req.KID, req.Op == proto.OpVerify)
	return err != nil || !t.key.remote
}

// send queues resp and, unless another goroutine is already writing, writes
// everything queued until nothing is left. fence (the policy's hold on the
// reply's slot, zero for other replies) is ended once the write carrying
// resp has returned or resp is dropped.
func (c *conn) send(resp *proto.Response, fence policy.Decision) {
	codec := codecPool.Get().(*proto.Codec)
	defer codecPool.Put(codec)
	w := &c.w
	w.mu.Lock()
	if w.broken {
		w.mu.Unlock()
		fence.Done()
		return
	}
	var err error
	if w.pending, err = codec.AppendResponseFrame(w.pending, resp); err != nil {
		// Only a bug gets here (every field is encodable); tell the client
		// something rather than leaving its request unanswered.
		c.log.Error("encode reply", zap.Error(err))
		w.pending, _ = codec.AppendResponseFrame(w.pending, &proto.Response{ID: resp.ID, Code: proto.Internal, Msg: "internal error; see the agent's log"})
	}
	if len(w.pending) > maxPendingReplies {
		// Dropped: nothing queued may be written after its fence ends,
		// not even by a flusher whose blocked write returns before the
		// close below.
		w.broken = true
		w.pending = w.pending[:0]
		dropped := w.fences
		w.fences = nil
		w.mu.Unlock()
		fence.Done()
		endFences(dropped)
		c.a.metrics.refused(limitUnreadReplies)
		c.log.Info("closing connection: client is not reading its replies")
		c.drop()
		return
	}
	if w.flushing {
		if fence.Holds() {
			w.fences = append(w.fences, fence)
		}
		w.mu.Unlock()
		return
	}
	w.flushing = true
	timeout := c.a.cfg.Limits.WriteTimeout
	for first := true; ; first = false {
		buf := w.pending
		w.pending = w.spare[:0]
		fences := w.fences
		w.fences = w.spareFences[:0]
		w.mu.Unlock()
		// The deadline is moved only once a tenth of it has passed, so a
		// write gets at least 0.9x limits.write_timeout. Moving it with
		// every reply moved a runtime timer per request, and the runtime
		// wakes a thread for that when none is asleep in the netpoller.
		if now := time.Now(); now.Sub(w.deadlineSet) >= timeout/10 {
			c.nc.SetWriteDeadline(now.Add(timeout))
			w.deadlineSet = now
		}
		_, err := c.nc.Write(buf)
		if first {
			fence.Done() // resp went out in this write (or is dropped with it)
		}
		endFences(fences)
		w.mu.Lock()
		w.spare = buf[:0]
		w.spareFences = fences[:0]
		if err != nil {
			w.broken, w.flushing = true, false
			w.pending = w.pending[:0]
			dropped := w.fences
			w.fences = nil
			w.mu.Unlock()
			endFences(dropped)
			// A peer that stopped reading (or vanished): drop it. Closing
			// the socket also ends the reader.
			c.log.Info("closing connection: write failed", zap.Error(err))
			c.drop()
			return
		}
		if len(w.pending) == 0 || w.broken { // broken: dropped meanwhile, pending emptied
			w.flushing = false
			w.mu.Unlock()
			return
		}
	}
}

// endFences ends each fence of fs (replies written or dropped).
func endFences(fs []policy.Decision) {
	for i := range fs {
		fs[i].Done()
	}
}

func (c *conn) drop() {
	c.cancel()
	c.nc.Close()
}
