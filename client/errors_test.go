package client_test

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// An error from the client says what happened once, led by its code's name
// (client.Code's, which it still gives) and by "sigil: " where no code
// names it (a caller's cancellation, a closed client). It used to
// nest the client's own words: "sigil: hello: sigil Hello: context deadline
// exceeded", "sigil Ping: reconnect: sigil: connect to agent at X: dial
// unix X: ...", "sigil: hello: UNSUPPORTED_VERSION: ...". The causes stay
// in the chain for errors.Is and errors.As.
func TestErrorsSayItOnce(t *testing.T) {
	short := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 300*time.Millisecond)
	}
	var opErr *net.OpError
	var refused *proto.Error
	for _, tc := range []struct {
		name   string
		run    func(t *testing.T) error
		code   proto.Code
		prefix string // the text's start
		is     error  // in the chain, when set
		as     any    // errors.As target, when set
	}{
		{name: "dial: no agent", code: proto.Unavailable, prefix: "UNAVAILABLE: connect to the agent: dial unix ", as: &opErr,
			run: func(t *testing.T) error {
				dir, err := os.MkdirTemp("", "sigil-c") // t.TempDir's name holds the test's words
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { os.RemoveAll(dir) })
				_, err = client.Dial(context.Background(), filepath.Join(dir, "none.sock"))
				return err
			}},
		{name: "dial: no Hello in time", code: proto.DeadlineExceeded, prefix: "DEADLINE_EXCEEDED: Hello ", is: context.DeadlineExceeded,
			run: func(t *testing.T) error {
				f := listenFake(t, func(_ int32, _ net.Conn, br *bufio.Reader) { readRequest(br); readRequest(br) })
				ctx, cancel := short()
				defer cancel()
				_, err := client.Dial(ctx, f.path)
				return err
			}},
		{name: "dial: Hello refused", code: proto.UnsupportedVersion, prefix: "UNSUPPORTED_VERSION: this agent speaks version 7", as: &refused,
			run: func(t *testing.T) error {
				f := listenFake(t, func(_ int32, nc net.Conn, br *bufio.Reader) {
					if req, err := readRequest(br); err == nil {
						writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.UnsupportedVersion, Version: 7, Msg: "this agent speaks version 7"})
					}
				})
				_, err := client.Dial(context.Background(), f.path)
				return err
			}},
		{name: "call: cancelled before it was sent", code: proto.DeadlineExceeded, prefix: "sigil: Ping not sent: ", is: context.Canceled,
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) {})
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				return c.Ping(ctx)
			}},
		{name: "call: no reply in time", code: proto.DeadlineExceeded, prefix: "DEADLINE_EXCEEDED: Ping ", is: context.DeadlineExceeded,
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) { readRequest(br); readRequest(br) })
				ctx, cancel := short()
				defer cancel()
				return c.Ping(ctx)
			}},
		{name: "call: connection lost", code: proto.Unavailable, prefix: "UNAVAILABLE: connection to the agent lost: ",
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) { readRequest(br); nc.Close() })
				return c.Ping(context.Background())
			}},
		{name: "call: reconnect finds no agent", code: proto.Unavailable, prefix: "UNAVAILABLE: Ping not sent: reconnect: connect to the agent: dial unix ", as: &opErr,
			run: func(t *testing.T) error {
				var f *fakeAgents
				f = listenFake(t, func(_ int32, nc net.Conn, br *bufio.Reader) {
					answerHello(nc, br)
					f.stop() // no second connection
					nc.Close()
				})
				c, err := client.Dial(context.Background(), f.path)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				time.Sleep(50 * time.Millisecond) // the close reaches the client's socket
				return c.Ping(context.Background())
			}},
		{name: "call: client closed", code: proto.BadRequest, prefix: "sigil: client closed", is: client.ErrClosed,
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) {})
				c.Close()
				return c.Ping(context.Background())
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run(t)
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			if client.Code(err) != tc.code || !strings.HasPrefix(msg, tc.prefix) {
				t.Fatalf("%q (%s), want %s and a text starting %q", msg, client.Code(err), tc.code, tc.prefix)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Fatalf("%q: errors.Is %v false", msg, tc.is)
			}
			if tc.as != nil && !errors.As(err, tc.as) {
				t.Fatalf("%q: errors.As %T false", msg, tc.as)
			}
			words := []string{"sigil", "Hello", "Ping", "reconnect", "connect to", "dial", "lost", "context"}
			for _, c := range proto.Codes() {
				words = append(words, c.String())
			}
			for _, w := range words {
				if n := strings.Count(msg, w); n > 1 {
					t.Errorf("%q says %q %d times", msg, w, n)
				}
			}
		})
	}
}

// edSPKI and otherSPKI are Ed25519 public keys as the agent lists them
// (DER SPKI).
var edSPKI, otherSPKI = newEdSPKI(), newEdSPKI()

func newEdSPKI() []byte {
	pub, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		panic(err)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		panic(err)
	}
	return der
}

// dialFake connects to a fake agent that answers Hello and then runs then.
func dialFake(t *testing.T, then func(nc net.Conn, br *bufio.Reader)) *client.Client {
	t.Helper()
	c, err := client.Dial(context.Background(), fakeAgent(t, then))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// What the client finds wrong itself has a code of its own, not the
// UNAVAILABLE of an agent that is not there, which a caller retries: a
// request it refuses before sending anything (BAD_REQUEST, or
// UNSUPPORTED_ALGORITHM for an algorithm; ErrRefusedByClient), a reply
// it cannot take (INTERNAL; ErrMalformedReply) and a name TLSCertificate
// finds no certificate under in the agent's list (NOT_FOUND;
// ErrNoCertificate). None is a *proto.Error, which is the agent's answer
// alone. Each used to be UNAVAILABLE, or a *proto.Error the CLI reported
// as "agent refused".
func TestClientFaultsHaveCodesOfTheirOwn(t *testing.T) {
	ctx := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	// nothingSent is a fake agent after Hello that fails the test when a
	// request reaches it, and answers Ping so that the test can tell the
	// connection is still open and in step.
	nothingSent := func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
		return func(nc net.Conn, br *bufio.Reader) {
			for {
				req, err := readRequest(br)
				if err != nil {
					return
				}
				if req.Op != proto.OpPing {
					t.Errorf("the agent got a %v the client refused", req.Op)
				}
				writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK})
			}
		}
	}
	// answers is a fake agent after Hello that answers one request with
	// reply (its id set here), or with raw bytes.
	answers := func(reply *proto.Response, raw []byte) func(nc net.Conn, br *bufio.Reader) {
		return func(nc net.Conn, br *bufio.Reader) {
			req, err := readRequest(br)
			if err != nil {
				return
			}
			if raw != nil {
				nc.Write(raw)
				return
			}
			reply.ID = req.ID
			writeResponse(nc, reply)
		}
	}
	garbage := []byte{0, 0, 0, 3, 0xc1, 0xc1, 0xc1} // 0xc1 is no msgpack type
	// listsOne is a fake agent that answers ListKeys with one Ed25519 key
	// named name, without a certificate.
	listsOne := func(name string) func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
		return func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
			return answers(&proto.Response{Code: proto.OK, Keys: []proto.KeyEntry{{Name: name, KID: "0123", Provider: "p", KeyType: "ed25519", Pub: edSPKI}}}, nil)
		}
	}
	tlsCertificate := func(name string) func(t *testing.T, c *client.Client) error {
		return func(t *testing.T, c *client.Client) error {
			_, err := c.TLSCertificate(ctx(t), name)
			return err
		}
	}
	for _, tc := range []struct {
		name  string
		agent func(t *testing.T) func(nc net.Conn, br *bufio.Reader)
		run   func(t *testing.T, c *client.Client) error
		code  proto.Code
		is    error
		says  string
	}{
		{name: "refused: a Sign over the frame limit", agent: nothingSent, code: proto.BadRequest, is: client.ErrRefusedByClient,
			says: "BAD_REQUEST: Sign refused by the client, not sent: the request's ",
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.Sign(ctx(t), client.ByName("ed"), client.Algorithm{Scheme: client.SchemeEd25519}, make([]byte, proto.DefaultMaxFrame))
				return err
			}},
		{name: "refused: a Verify over the frame limit", agent: nothingSent, code: proto.BadRequest, is: client.ErrRefusedByClient,
			says: "BAD_REQUEST: Verify refused by the client, not sent: ",
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.Verify(ctx(t), client.ByName("ed"), client.Algorithm{Scheme: client.SchemeEd25519}, make([]byte, proto.DefaultMaxFrame-100), make([]byte, 512))
				return err
			}},
		{name: "refused: a hash the protocol has no number for", agent: nothingSent, code: proto.UnsupportedAlgorithm, is: client.ErrRefusedByClient,
			says: "UNSUPPORTED_ALGORITHM: hash MD5 is not supported",
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.Sign(ctx(t), client.ByName("k"), client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.MD5}, make([]byte, 16))
				return err
			}},
		{name: "refused: a rotation scheduled for the Unix epoch or before", agent: nothingSent, code: proto.BadRequest, is: client.ErrRefusedByClient,
			says: "BAD_REQUEST: Rotate refused by the client, not sent: a rotation can be scheduled only for a time in the future",
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.ScheduleRotation(ctx(t), "a/b", time.Unix(-1, 0))
				return err
			}},
		{name: "refused: an algorithm name", agent: nothingSent, code: proto.UnsupportedAlgorithm, is: client.ErrRefusedByClient,
			says: `UNSUPPORTED_ALGORITHM: unknown algorithm "md5"`,
			run: func(t *testing.T, c *client.Client) error {
				_, err := client.ParseAlgorithm("md5")
				return err
			}},
		{name: "malformed: a public key that does not parse", code: proto.Internal, is: client.ErrMalformedReply,
			says: `INTERNAL: PublicKey reply: key "k": public key: `,
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return answers(&proto.Response{Code: proto.OK, Key: "k", KID: "0123", Pub: []byte{0x30, 0x01}}, nil)
			},
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.PublicKey(ctx(t), client.ByName("k"))
				return err
			}},
		{name: "malformed: a public key without its kid", code: proto.Internal, is: client.ErrMalformedReply,
			says: `INTERNAL: PublicKey reply: key "k" comes without its kid`,
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return answers(&proto.Response{Code: proto.OK, Key: "k", KeyType: "ed25519", Pub: edSPKI}, nil)
			},
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.PublicKey(ctx(t), client.ByName("k"))
				return err
			}},
		{name: "malformed: a public key of another kid than asked", code: proto.Internal, is: client.ErrMalformedReply,
			says: `INTERNAL: PublicKey reply: key "k" has kid "4567", not the "0123" asked for`,
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return answers(&proto.Response{Code: proto.OK, Key: "k", KID: "4567", KeyType: "ed25519", Pub: edSPKI}, nil)
			},
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.PublicKey(ctx(t), client.KeyRef{Name: "k", KID: "0123"})
				return err
			}},
		{name: "malformed: a listed public key that does not parse", code: proto.Internal, is: client.ErrMalformedReply,
			says: `INTERNAL: ListKeys reply: key "k": public key: `,
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return answers(&proto.Response{Code: proto.OK, Keys: []proto.KeyEntry{{Name: "k", KID: "0123", Provider: "p", KeyType: "ed25519", Pub: []byte("nope")}}}, nil)
			},
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.ListKeys(ctx(t))
				return err
			}},
		{name: "malformed: evidence pack parts that do not add up", code: proto.Internal, is: client.ErrMalformedReply,
			says: "INTERNAL: malformed ExportREP reply",
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return answers(&proto.Response{Code: proto.OK, Records: [][]byte{[]byte("{}")}}, nil)
			},
			run: func(t *testing.T, c *client.Client) error {
				_, _, err := c.ExportREP(ctx(t), "a/b", 0)
				return err
			}},
		{name: "malformed: evidence pack parts that announce another length", code: proto.Internal, is: client.ErrMalformedReply,
			says: "INTERNAL: malformed ExportREP reply",
			// Each part is bounded on its own (ExportREPPerPart), so the
			// length must hold still for the parts to end.
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return func(nc net.Conn, br *bufio.Reader) {
					for total := 10; ; total++ {
						req, err := readRequest(br)
						if err != nil {
							return
						}
						writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Records: [][]byte{[]byte("{"), {1}, fmt.Appendf(nil, "%d 1", total)}})
					}
				}
			},
			run: func(t *testing.T, c *client.Client) error {
				_, _, err := c.ExportREPPerPart(ctx(t), "a/b", 0, time.Second)
				return err
			}},
		// The evidence key beside a pack is what rep export writes for
		// auditors: one that does not parse, or that changes between the
		// parts of one pack, is not passed on.
		{name: "malformed: an evidence key that does not parse", code: proto.Internal, is: client.ErrMalformedReply,
			says: "INTERNAL: malformed ExportREP reply: the evidence public key does not parse",
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return answers(&proto.Response{Code: proto.OK, Records: [][]byte{[]byte("{}"), {1}}, Pub: []byte{0x30, 0x01}}, nil)
			},
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.ExportREPPack(ctx(t), "a/b", 0, 0)
				return err
			}},
		{name: "malformed: evidence pack parts with another evidence key", code: proto.Internal, is: client.ErrMalformedReply,
			says: "INTERNAL: malformed ExportREP reply",
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return func(nc net.Conn, br *bufio.Reader) {
					for i := 0; ; i++ {
						req, err := readRequest(br)
						if err != nil {
							return
						}
						pub := edSPKI
						if i > 0 {
							pub = otherSPKI
						}
						writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Pub: pub, Records: [][]byte{[]byte("{"), {1}, []byte("2 1")}})
					}
				}
			},
			run: func(t *testing.T, c *client.Client) error {
				_, err := c.ExportREPPack(ctx(t), "a/b", 0, time.Second)
				return err
			}},
		{name: "malformed: a final reply with code OK", code: proto.Internal, is: client.ErrMalformedReply,
			says: "INTERNAL: protocol error: the agent sent a final reply (id 0) with code OK",
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return func(nc net.Conn, br *bufio.Reader) {
					if _, err := readRequest(br); err == nil {
						writeResponse(nc, &proto.Response{ID: 0, Code: proto.OK})
					}
				}
			},
			run: func(t *testing.T, c *client.Client) error { return c.Ping(ctx(t)) }},
		{name: "malformed: a reply that does not decode", code: proto.Internal, is: client.ErrMalformedReply,
			says:  "INTERNAL: connection to the agent closed: malformed reply: ",
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) { return answers(nil, garbage) },
			run:   func(t *testing.T, c *client.Client) error { return c.Ping(ctx(t)) }},
		// The agent answered ListKeys; it is the client that found no
		// certificate in the list. These were a *proto.Error, which the
		// CLI and callers take for the agent's NOT_FOUND.
		{name: "not found: a name the key list does not have", code: proto.NotFound, is: client.ErrNoCertificate,
			says: `NOT_FOUND: no key named "k"`, agent: listsOne("other"), run: tlsCertificate("k")},
		{name: "not found: a listed key without a certificate", code: proto.NotFound, is: client.ErrNoCertificate,
			says: `NOT_FOUND: the agent has no certificate for key "k"`, agent: listsOne("k"), run: tlsCertificate("k")},
		{name: "not found: a qualified name the listed slot is another key of", code: proto.NotFound, is: client.ErrNoCertificate,
			says: `NOT_FOUND: no key named "a/k"`,
			agent: func(t *testing.T) func(nc net.Conn, br *bufio.Reader) {
				return func(nc net.Conn, br *bufio.Reader) {
					for {
						req, err := readRequest(br)
						if err != nil {
							return
						}
						switch req.Op {
						case proto.OpListKeys:
							writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Keys: []proto.KeyEntry{{Name: "k", KID: "0123", Provider: "p", KeyType: "ed25519", Pub: edSPKI, Cert: []byte("a certificate")}}})
						case proto.OpPublicKey:
							writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Key: req.Key, KID: "4567", KeyType: "ed25519", Pub: edSPKI})
						}
					}
				}
			},
			run: tlsCertificate("a/k")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialFake(t, tc.agent(t))
			err := tc.run(t, c)
			var pe *proto.Error
			switch {
			case err == nil:
				t.Fatal("no error")
			case client.Code(err) != tc.code || !errors.Is(err, tc.is) || !strings.HasPrefix(err.Error(), tc.says):
				t.Fatalf("%q (%s), want %s, %v in the chain and a text starting %q", err, client.Code(err), tc.code, tc.is, tc.says)
			case errors.As(err, &pe):
				t.Fatalf("%q: a *proto.Error, which is the agent's answer alone", err)
			case errors.Is(err, client.ErrRefusedByClient) && errors.Is(err, client.ErrMalformedReply):
				t.Fatalf("%q: both refused and malformed", err)
			}
			if tc.is == client.ErrRefusedByClient {
				// Nothing of the request went out: the connection is in step.
				if err := c.Ping(ctx(t)); err != nil {
					t.Fatalf("Ping after the refusal: %v", err)
				}
			}
		})
	}
}

// What the caller ended itself is not UNAVAILABLE, the code of an agent
// that cannot be reached and that a caller retries with backoff: a call
// whose context the caller cancelled (DEADLINE_EXCEEDED, as for its
// deadline: the call's time ran out at the caller's word; the protocol
// has no code of its own for it) and a call on a client the caller
// closed (BAD_REQUEST: Close is final, and the call fails the same way
// every time). Both were UNAVAILABLE, so that a loop retrying while
// UNAVAILABLE went on for ever after its own context ended or its own
// Close. The causes stay in the chain, and none is the agent's word.
func TestCallersOwnEndIsNotUnavailable(t *testing.T) {
	// silent is a fake agent after Hello that reads requests, reports
	// each on got and answers none.
	silent := func(got chan<- struct{}) func(nc net.Conn, br *bufio.Reader) {
		return func(nc net.Conn, br *bufio.Reader) {
			for {
				if _, err := readRequest(br); err != nil {
					return
				}
				select {
				case got <- struct{}{}:
				default:
				}
			}
		}
	}
	for _, tc := range []struct {
		name string
		run  func(t *testing.T) error
		code proto.Code
		is   error
	}{
		{name: "cancelled before it was sent", code: proto.DeadlineExceeded, is: context.Canceled,
			run: func(t *testing.T) error {
				c := dialFake(t, silent(nil))
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				return c.Ping(ctx)
			}},
		{name: "cancelled while waiting for the reply", code: proto.DeadlineExceeded, is: context.Canceled,
			run: func(t *testing.T) error {
				got := make(chan struct{}, 1)
				c := dialFake(t, silent(got))
				ctx, cancel := context.WithCancel(context.Background())
				go func() { <-got; cancel() }()
				defer cancel()
				return c.Ping(ctx)
			}},
		{name: "deadline while waiting for the reply", code: proto.DeadlineExceeded, is: context.DeadlineExceeded,
			run: func(t *testing.T) error {
				c := dialFake(t, silent(nil))
				ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
				defer cancel()
				return c.Ping(ctx)
			}},
		{name: "dial cancelled", code: proto.DeadlineExceeded, is: context.Canceled,
			run: func(t *testing.T) error {
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				_, err := client.Dial(ctx, fakeAgent(t, silent(nil)))
				return err
			}},
		{name: "dial cancelled while waiting for the Hello", code: proto.DeadlineExceeded, is: context.Canceled,
			run: func(t *testing.T) error {
				got := make(chan struct{}, 1)
				f := listenFake(t, func(_ int32, nc net.Conn, br *bufio.Reader) { silent(got)(nc, br) })
				ctx, cancel := context.WithCancel(context.Background())
				go func() { <-got; cancel() }()
				defer cancel()
				_, err := client.Dial(ctx, f.path)
				return err
			}},
		{name: "call on a closed client", code: proto.BadRequest, is: client.ErrClosed,
			run: func(t *testing.T) error {
				c := dialFake(t, silent(nil))
				c.Close()
				return c.Ping(context.Background())
			}},
		{name: "call on a closed client whose connection was lost", code: proto.BadRequest, is: client.ErrClosed,
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) { nc.Close() })
				time.Sleep(20 * time.Millisecond) // the close reaches the client's socket
				c.Close()
				_, err := c.ListKeys(context.Background())
				return err
			}},
		{name: "call in flight when the client is closed", code: proto.BadRequest, is: client.ErrClosed,
			run: func(t *testing.T) error {
				got := make(chan struct{}, 1)
				c := dialFake(t, silent(got))
				go func() { <-got; c.Close() }()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_, err := c.Sign(ctx, client.ByName("ed"), ed25519Alg, []byte("m"))
				return err
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run(t)
			var pe *proto.Error
			switch {
			case err == nil:
				t.Fatal("no error")
			case client.Code(err) != tc.code || !errors.Is(err, tc.is):
				t.Fatalf("%q (%s), want %s and %v in the chain", err, client.Code(err), tc.code, tc.is)
			case errors.As(err, &pe):
				t.Fatalf("%q: a *proto.Error, which is the agent's answer alone", err)
			case errors.Is(err, client.ErrRefusedByClient) || errors.Is(err, client.ErrMalformedReply):
				t.Fatalf("%q: not the caller's own doing", err)
			case !strings.HasPrefix(err.Error(), "sigil: ") && tc.is != context.DeadlineExceeded:
				// The protocol has no code that names it: the text does
				// not lead with one.
				t.Fatalf("%q: want a text starting %q", err, "sigil: ")
			}
		})
	}
}

// Code's mapping of the errors a caller may hold, wrapped or not: the
// agent's code wins; then the caller's own ending; UNAVAILABLE is left for
// what says nothing of the caller.
func TestCodeOfCallersOwnErrors(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("sign the release: %w", err) }
	for _, tc := range []struct {
		name string
		err  error
		want proto.Code
	}{
		{"nil", nil, proto.OK},
		{"context.Canceled", context.Canceled, proto.DeadlineExceeded},
		{"context.Canceled wrapped", wrap(context.Canceled), proto.DeadlineExceeded},
		{"context.DeadlineExceeded", context.DeadlineExceeded, proto.DeadlineExceeded},
		{"ErrClosed", client.ErrClosed, proto.BadRequest},
		{"ErrClosed wrapped", wrap(client.ErrClosed), proto.BadRequest},
		{"the agent's UNAVAILABLE", wrap(&proto.Error{Code: proto.Unavailable, Msg: "shutting down"}), proto.Unavailable},
		{"the agent's code before the caller's cancellation", errors.Join(&proto.Error{Code: proto.RateLimited}, context.Canceled), proto.RateLimited},
		{"an untrusted socket dir", wrap(proto.ErrUntrustedSocketDir), proto.Unauthenticated},
		{"a lost connection", &net.OpError{Op: "read", Net: "unix", Err: errors.New("connection reset by peer")}, proto.Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := client.Code(tc.err); got != tc.want {
				t.Fatalf("Code(%v) = %s, want %s", tc.err, got, tc.want)
			}
		})
	}
}
