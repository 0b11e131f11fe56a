package agent

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/proto"
)

// conn is one client connection: a reader goroutine (this one) that decodes
// requests and dispatches them, and a writer goroutine that sends replies in
// the order they become ready.
type conn struct {
	a   *Agent
	nc  net.Conn
	log *zap.Logger

	ctx    context.Context // cancelled when the connection ends
	cancel context.CancelFunc

	out        chan *outFrame // replies ready to write
	writerDone chan struct{}
	inFlight   chan struct{} // one token per request being handled off the reader
	handlers   sync.WaitGroup

	helloDone bool // touched by the reader goroutine only
}

type outFrame struct{ b []byte }

var (
	outFramePool = sync.Pool{New: func() any { return &outFrame{b: make([]byte, 0, 256)} }}
	codecPool    = sync.Pool{New: func() any { return proto.NewCodec() }}
	requestPool  = sync.Pool{New: func() any { return new(proto.Request) }}
)

func newConn(a *Agent, nc net.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	lim := a.cfg.Limits
	c := &conn{
		a:          a,
		nc:         nc,
		ctx:        ctx,
		cancel:     cancel,
		out:        make(chan *outFrame, lim.MaxInFlightPerConn+4),
		writerDone: make(chan struct{}),
		inFlight:   make(chan struct{}, lim.MaxInFlightPerConn),
	}
	c.log = a.log.With(peerFields(nc)...)
	return c
}

// peerFields identifies the peer for the log: uid and pid from SO_PEERCRED on
// a Unix socket (the identity tenants will be mapped from), the address on TCP.
func peerFields(nc net.Conn) []zap.Field {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return []zap.Field{zap.String("peer", nc.RemoteAddr().String())}
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil
	}
	var cred *syscall.Ucred
	raw.Control(func(fd uintptr) {
		cred, err = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if err != nil || cred == nil {
		return nil
	}
	return []zap.Field{zap.Uint32("peer_uid", cred.Uid), zap.Int32("peer_pid", cred.Pid)}
}

// serve runs the connection to its end and releases everything it held.
func (c *conn) serve() {
	defer c.a.forget(c)
	c.log.Debug("connection opened")
	go c.writeLoop()
	c.readLoop()
	// Requests already read still get their replies, unless the peer is gone.
	c.handlers.Wait()
	close(c.out)
	<-c.writerDone
	c.cancel()
	c.nc.Close()
	c.log.Debug("connection closed")
}

// stopReading makes the reader return at its next read, for shutdown: no new
// requests are taken, in-flight ones finish.
func (c *conn) stopReading() {
	c.nc.SetReadDeadline(time.Now())
}

func (c *conn) readLoop() {
	lim := c.a.cfg.Limits
	br := bufio.NewReaderSize(c.nc, 16<<10)
	codec := proto.NewCodec()
	var buf []byte
	for {
		payload, err := proto.ReadFrame(br, buf, lim.MaxFrame)
		if err != nil {
			c.readFailed(err)
			return
		}
		buf = payload[:0]
		req := requestPool.Get().(*proto.Request)
		req.Reset()
		if err := codec.DecodeRequest(payload, req); err != nil {
			requestPool.Put(req)
			c.log.Info("closing connection: malformed message", zap.Error(err))
			c.sendFinal(proto.BadRequest, "malformed message; closing connection")
			return
		}
		if !c.helloDone && req.Op != proto.OpHello {
			c.log.Info("closing connection: request before Hello", zap.Stringer("op", req.Op))
			c.sendFinal(proto.BadRequest, "the first request on a connection must be Hello")
			requestPool.Put(req)
			return
		}
		if req.Op == proto.OpSign || req.Op == proto.OpVerify {
			// Backpressure: past the in-flight bound the reader stops reading,
			// so a client that floods waits instead of growing our memory.
			select {
			case c.inFlight <- struct{}{}:
			case <-c.ctx.Done():
				requestPool.Put(req)
				return
			}
			c.handlers.Add(1)
			c.a.workers.run(job{c: c, req: req})
			continue
		}
		c.handle(req)
	}
}

func (c *conn) readFailed(err error) {
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, os.ErrDeadlineExceeded):
		// The peer hung up, or shutdown stopped the reader.
	case errors.Is(err, proto.ErrFrameTooLarge), errors.Is(err, proto.ErrEmptyFrame):
		c.log.Info("closing connection: bad frame", zap.Error(err))
		c.sendFinal(proto.BadRequest, err.Error()+"; closing connection")
	default:
		c.log.Debug("connection read failed", zap.Error(err))
	}
}

func (c *conn) handleAsync(req *proto.Request) {
	defer func() {
		<-c.inFlight
		c.handlers.Done()
	}()
	c.handle(req)
}

func (c *conn) handle(req *proto.Request) {
	resp := proto.Response{ID: req.ID}
	c.dispatch(req, &resp)
	requestPool.Put(req)
	c.send(&resp)
}

// sendFinal queues the reply that precedes closing the connection. Its id is
// 0: the offending frame's id, if it had one, could not be trusted.
func (c *conn) sendFinal(code proto.Code, msg string) {
	c.send(&proto.Response{ID: 0, Code: code, Msg: msg})
}

func (c *conn) send(resp *proto.Response) {
	codec := codecPool.Get().(*proto.Codec)
	of := outFramePool.Get().(*outFrame)
	var err error
	of.b, err = codec.AppendResponseFrame(of.b[:0], resp)
	codecPool.Put(codec)
	if err != nil {
		// Only a bug gets here (every field is encodable); tell the client
		// something rather than leaving its request unanswered.
		c.log.Error("encode reply", zap.Error(err))
		of.b, _ = proto.NewCodec().AppendResponseFrame(of.b[:0], &proto.Response{ID: resp.ID, Code: proto.Internal, Msg: "internal error; see the agent's log"})
	}
	c.out <- of
}

// writeLoop writes replies as they come, draining whatever else is ready
// before each flush so pipelined replies share one write.
func (c *conn) writeLoop() {
	defer close(c.writerDone)
	bw := bufio.NewWriterSize(c.nc, 16<<10)
	timeout := c.a.cfg.Limits.WriteTimeout
	broken := false
	for of := range c.out {
		if broken {
			outFramePool.Put(of)
			continue
		}
		c.nc.SetWriteDeadline(time.Now().Add(timeout))
		bw.Write(of.b)
		outFramePool.Put(of)
	drain:
		for {
			select {
			case more, ok := <-c.out:
				if !ok {
					break drain
				}
				bw.Write(more.b)
				outFramePool.Put(more)
			default:
				break drain
			}
		}
		if err := bw.Flush(); err != nil {
			// A peer that stopped reading (or vanished): drop it. Closing the
			// socket also ends the reader; queued replies are discarded.
			broken = true
			c.log.Info("closing connection: write failed", zap.Error(err))
			c.cancel()
			c.nc.Close()
		}
	}
}
