package bench

// The soak (issue 9): `sigil soak` holds Conns connections to one agent
// process for Duration with a mix of well-behaved and hostile clients, samples
// the process, and fails on a crash, a signature that does not verify, a
// released signature without its audit record, or growth of memory, file
// descriptors or goroutines after warm-up (LeakRule).

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/zeebo/blake3"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// SoakOptions configures Soak. Zero fields take the defaults EnsureDefaults
// documents.
type SoakOptions struct {
	Sigil    string        `json:"-"`        // the sigil binary: runs the agent, then `sigil audit`
	Conns    int           `json:"conns"`    // concurrent client connections; default 1000
	Duration time.Duration `json:"duration"` // default 5m
	// Warmup is excluded from the leak rule; default Duration/5.
	Warmup time.Duration `json:"warmup"`
	// SampleEvery is the agent sampling period; default Duration/60,
	// within 250ms..5s.
	SampleEvery time.Duration `json:"sample_every"`
	Mix         SoakMix       `json:"mix"`
	// SlowByte is the mean pause between a slow client's bytes; default
	// 200ms, so a Hello (24 bytes, ~5s) arrives within the agent's default
	// frame_timeout of 10s and a Sign frame (73 bytes, ~15s) does not.
	SlowByte time.Duration `json:"slow_byte"`
	Leak     LeakRule      `json:"leak_rule"`
	Keys     []string      `json:"keys"` // key types; default all of benchKeyTypes
	Log      io.Writer     `json:"-"`    // progress lines; default discarded
}

// SoakMix divides the connections among the client kinds, in percent of
// Conns; signers take what the others leave.
type SoakMix struct {
	Slow         int `json:"slow_pct"`          // default 10
	Junk         int `json:"junk_pct"`          // default 10
	NeverReaders int `json:"never_readers_pct"` // default 10
}

// LeakRule says how much the agent may grow after warm-up. The samples
// after warm-up are cut into thirds; for each metric the median of the last
// third may exceed the median of the first third by at most Tolerance
// (relative) plus the metric's slack (absolute, for small figures and the
// churn of reconnecting clients). Threads are judged only when goroutines
// cannot be read (no metrics endpoint).
type LeakRule struct {
	Tolerance      float64 `json:"tolerance"`       // default 0.10
	RSSSlack       int64   `json:"rss_slack_bytes"` // default 16 MiB
	FDSlack        int64   `json:"fd_slack"`        // default 32
	GoroutineSlack int64   `json:"goroutine_slack"` // default 64
	ThreadSlack    int64   `json:"thread_slack"`    // default 8
}

// EnsureDefaults fills zero fields: 1000 connections for 5 minutes, 10% each
// slow, junk and never-reading clients, the rest well-behaved signers.
func (o *SoakOptions) EnsureDefaults() {
	if o.Conns == 0 {
		o.Conns = 1000
	}
	if o.Duration == 0 {
		o.Duration = 5 * time.Minute
	}
	if o.Warmup == 0 {
		o.Warmup = o.Duration / 5
	}
	if o.SampleEvery == 0 {
		o.SampleEvery = min(max(o.Duration/60, 250*time.Millisecond), 5*time.Second)
	}
	if o.Mix == (SoakMix{}) {
		o.Mix = SoakMix{Slow: 10, Junk: 10, NeverReaders: 10}
	}
	if o.SlowByte == 0 {
		o.SlowByte = 200 * time.Millisecond
	}
	if o.Leak == (LeakRule{}) {
		o.Leak = LeakRule{Tolerance: 0.10, RSSSlack: 16 << 20, FDSlack: 32, GoroutineSlack: 64, ThreadSlack: 8}
	}
	if len(o.Keys) == 0 {
		o.Keys = []string{KeyECDSAP256, KeyRSA2048, KeyEd25519}
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
}

func (o *SoakOptions) validate() error {
	m := o.Mix
	if m.Slow < 0 || m.Junk < 0 || m.NeverReaders < 0 || m.Slow+m.Junk+m.NeverReaders >= 100 {
		return fmt.Errorf("soak: mix %d%% slow, %d%% junk, %d%% never-readers leaves no signers", m.Slow, m.Junk, m.NeverReaders)
	}
	if o.Conns < 4 {
		return fmt.Errorf("soak: conns %d: need at least 4 (one of each kind)", o.Conns)
	}
	if o.Duration <= o.Warmup {
		return fmt.Errorf("soak: duration %v is not longer than the warm-up %v", o.Duration, o.Warmup)
	}
	return nil
}

// split returns the number of connections of each kind: at least one each.
func (o *SoakOptions) split() (signers, slow, junk, never int) {
	part := func(pct int) int { return max(1, o.Conns*pct/100) }
	slow, junk, never = part(o.Mix.Slow), part(o.Mix.Junk), part(o.Mix.NeverReaders)
	return o.Conns - slow - junk - never, slow, junk, never
}

// SoakReport is the outcome of Soak. Failures lists every reason it failed;
// an empty list is a pass.
type SoakReport struct {
	Started  time.Time     `json:"started"`
	Options  SoakOptions   `json:"options"`
	Machine  Machine       `json:"machine"`
	Elapsed  time.Duration `json:"elapsed_ns"`
	AgentPID int           `json:"agent_pid"`
	// FD limits (RLIMIT_NOFILE soft values) of this process and the agent.
	HarnessNoFile uint64 `json:"harness_nofile"`
	AgentNoFile   string `json:"agent_nofile"`

	Signers      SignerStats    `json:"signers"`
	Slow         SlowStats      `json:"slow"`
	Junk         JunkStats      `json:"junk"`
	NeverReaders NeverStats     `json:"never_readers"`
	Samples      []SoakSample   `json:"samples"`
	Leaks        []LeakCheck    `json:"leaks"`
	Audit        AuditCheck     `json:"audit"`
	Refusals     map[string]int `json:"limit_refusals,omitempty"` // sigil_limit_refusals_total by limit, at the end
	AgentExit    string         `json:"agent_exit"`
	Failures     []string       `json:"failures"`
}

// Passed reports whether the soak found nothing wrong.
func (r *SoakReport) Passed() bool { return len(r.Failures) == 0 }

// SignerStats counts the well-behaved signers.
type SignerStats struct {
	Conns      int              `json:"conns"`
	Keys       []string         `json:"keys"`
	Dials      int64            `json:"dials"`
	Signatures int64            `json:"signatures"` // OK replies, each verified
	BadSigs    int64            `json:"bad_signatures"`
	FirstBad   string           `json:"first_bad,omitempty"`
	Errors     map[string]int64 `json:"errors"` // by wire code (client.Code)
	// FirstError is the first error message seen for each code.
	FirstError map[string]string `json:"first_error"`
}

// SlowStats counts the slow-loris clients.
type SlowStats struct {
	Conns    int              `json:"conns"`
	Dials    int64            `json:"dials"`
	Answered int64            `json:"answered"` // frames that arrived whole and got a reply
	Cut      int64            `json:"cut"`      // connections the agent closed mid-frame
	Replies  map[string]int64 `json:"reply_codes"`
}

// JunkStats counts the junk senders.
type JunkStats struct {
	Conns    int   `json:"conns"`
	Sent     int64 `json:"sent"`     // junk payloads written (one per connection)
	Closed   int64 `json:"closed"`   // the agent closed the connection (after a reply or not)
	Answered int64 `json:"answered"` // the agent replied (BAD_REQUEST, …) before closing
	Ignored  int64 `json:"ignored"`  // still open after junkWait: the harness closed it
}

// NeverStats counts the clients that pipeline Sign requests and never read.
type NeverStats struct {
	Conns    int           `json:"conns"`
	Dials    int64         `json:"dials"`
	Frames   int64         `json:"frames"`   // frames (Hello, then Signs) written whole
	Dropped  int64         `json:"dropped"`  // the agent closed the connection
	Outlived int64         `json:"outlived"` // still open after neverMax: the harness closed it
	DropP50  time.Duration `json:"drop_p50_ns"`
	DropMax  time.Duration `json:"drop_max_ns"`
}

// SoakSample is one reading of the agent process.
type SoakSample struct {
	At         time.Duration `json:"at_ns"` // since the load started
	RSS        int64         `json:"rss_bytes"`
	FDs        int64         `json:"fds"`
	Threads    int64         `json:"threads"`
	Goroutines int64         `json:"goroutines"`       // -1: no metrics endpoint answered
	HeapInuse  int64         `json:"heap_inuse_bytes"` // Go heap in use; -1 as Goroutines
	CPU        time.Duration `json:"cpu_ns"`           // agent CPU time so far
	Signatures int64         `json:"signatures"`       // well-behaved signatures so far
}

// LeakCheck is the leak rule applied to one metric.
type LeakCheck struct {
	Metric   string  `json:"metric"`
	Baseline float64 `json:"baseline"` // median of the first third after warm-up
	Final    float64 `json:"final"`    // median of the last third
	Limit    float64 `json:"limit"`
	OK       bool    `json:"ok"`
	Note     string  `json:"note,omitempty"`
}

// AuditCheck compares the journal with the signatures the signers received.
type AuditCheck struct {
	Verified     bool   `json:"chain_verified"`
	VerifyOutput string `json:"verify_output"`
	Records      int64  `json:"records"`
	SignOK       int64  `json:"sign_ok_records"`
	Released     int64  `json:"released"` // OK replies the well-behaved signers received
	Missing      int64  `json:"missing"`  // released without a record
	Err          string `json:"error,omitempty"`
}

// Client timings. signTimeout is above the agent's request_timeout (5s) so
// the agent's own limits, not the harness's, decide; junkWait and the reply
// wait of slow clients are above its frame_timeout (10s), so a cut shows.
const (
	signTimeout = 15 * time.Second
	junkWait    = 15 * time.Second
	replyWait   = 15 * time.Second
	// neverMax bounds how long a never-reader waits to be dropped: the
	// agent's write_timeout is 10s once its replies stop draining.
	neverMax = 2 * time.Minute
	// neverBurst Sign frames are pipelined at once, more than
	// max_in_flight_per_conn (64), then one per neverTick.
	neverBurst = 256
	neverTick  = 50 * time.Millisecond
	// neverKey is cheap to sign with: never-readers load the agent's
	// writer, not its providers.
	neverKeyType = KeyEd25519
)

// Soak sets up a SoftHSM2 token and the agent process (Setup, agent only,
// with its metrics listener), runs the client mix for Duration, stops the
// agent with SIGTERM, checks its journal with `sigil audit verify` and
// `sigil audit export`, and returns the report. An error means the soak
// could not run; a soak that ran and found problems returns a report whose
// Failures say what.
func Soak(ctx context.Context, o SoakOptions) (*SoakReport, error) {
	o.EnsureDefaults()
	if err := o.validate(); err != nil {
		return nil, err
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return nil, fmt.Errorf("soak: RLIMIT_NOFILE: %w", err)
	}
	// Go raises the soft limit to the hard one at start; each connection
	// holds one descriptor here, reconnecting ones briefly two.
	if need := uint64(2*o.Conns + 256); lim.Cur < need {
		return nil, fmt.Errorf("soak: %d connections need about %d file descriptors; RLIMIT_NOFILE is %d (raise the hard limit: ulimit -Hn)", o.Conns, need, lim.Cur)
	}
	env, err := Setup(ctx, SetupOptions{Sigil: o.Sigil, Keys: o.Keys, Log: o.Log, AgentOnly: true, AdminHTTP: true})
	if err != nil {
		return nil, err
	}
	defer env.Close()

	rep := &SoakReport{Started: time.Now(), Options: o, Machine: DescribeMachine(), AgentPID: env.AgentPID(), HarnessNoFile: lim.Cur}
	rep.AgentNoFile = agentNoFile(env.AgentPID())
	run, err := newSoakRun(ctx, env, o)
	if err != nil {
		return nil, err
	}
	run.load(ctx, rep)

	// Stop the agent as systemd would, then read its journal.
	state, _ := env.StopAgent(30 * time.Second)
	rep.AgentExit = describeExit(state)
	if run.died.Load() {
		rep.Failures = append(rep.Failures, fmt.Sprintf("the agent process exited during the run (%s)", rep.AgentExit))
	} else if state == nil || !state.Success() {
		rep.Failures = append(rep.Failures, fmt.Sprintf("the agent did not exit cleanly on SIGTERM: %s", rep.AgentExit))
	}
	rep.Audit = checkAudit(ctx, o.Sigil, env.AgentConfig, run.releasedIDs())
	if !rep.Audit.Verified {
		rep.Failures = append(rep.Failures, "the audit chain does not verify: "+firstLine(rep.Audit.VerifyOutput))
	}
	if rep.Audit.Err != "" {
		rep.Failures = append(rep.Failures, "audit export: "+rep.Audit.Err)
	}
	if rep.Audit.Missing > 0 {
		rep.Failures = append(rep.Failures, fmt.Sprintf("%d of %d released signatures have no audit record", rep.Audit.Missing, rep.Audit.Released))
	}
	if rep.Signers.BadSigs > 0 {
		rep.Failures = append(rep.Failures, fmt.Sprintf("%d signatures did not verify (first: %s)", rep.Signers.BadSigs, rep.Signers.FirstBad))
	}
	if rep.Signers.Signatures == 0 {
		rep.Failures = append(rep.Failures, "the well-behaved signers got no signature")
	}
	rep.Leaks = CheckLeaks(rep.Samples, o.Warmup, o.Leak)
	for _, l := range rep.Leaks {
		if !l.OK {
			rep.Failures = append(rep.Failures, fmt.Sprintf("%s grew from %.0f to %.0f after warm-up (limit %.0f)", l.Metric, l.Baseline, l.Final, l.Limit))
		}
	}
	return rep, nil
}

// soakKey is a key the signers use, with what verifying its signatures takes.
type soakKey struct {
	name   string
	pub    crypto.PublicKey
	alg    client.Algorithm
	palg   providers.Algorithm
	digest int // digest length (Ed25519: the message's)
}

// soakRun is one soak's shared state.
type soakRun struct {
	o          SoakOptions
	socket     string
	pid        int
	metricsURL string
	keys       []soakKey
	neverKey   string

	signers, slowN, junkN, neverN int
	start                         time.Time
	died                          atomic.Bool

	mu          sync.Mutex
	signErrs    map[string]int64
	firstErr    map[string]string
	slowReplies map[string]int64
	firstBad    string
	released    [][16]byte
	neverDrops  []time.Duration

	signDials, signOK, badSigs                 atomic.Int64
	slowDials, slowAnswered, slowCut           atomic.Int64
	junkSent, junkClosed, junkAnswered, junkIg atomic.Int64
	neverDials, neverFrames, neverDropped      atomic.Int64
	neverOutlived                              atomic.Int64
}

func newSoakRun(ctx context.Context, env *Env, o SoakOptions) (*soakRun, error) {
	r := &soakRun{
		o: o, socket: env.AgentSocket, pid: env.AgentPID(), metricsURL: "http://" + env.AdminHTTP + "/metrics",
		neverKey: softKeyName(neverKeyType), signErrs: map[string]int64{}, firstErr: map[string]string{}, slowReplies: map[string]int64{},
	}
	r.signers, r.slowN, r.junkN, r.neverN = o.split()
	c, err := client.Dial(ctx, r.socket)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	keys, err := c.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("soak: list keys: %w", err)
	}
	for _, k := range keys {
		alg := client.DefaultAlgorithm(k.Type)
		n := 32
		if alg.Hash != 0 {
			n = alg.Hash.Size()
		}
		r.keys = append(r.keys, soakKey{name: k.Name, pub: k.Public, alg: alg,
			palg: providers.Algorithm{Scheme: providers.Scheme(alg.Scheme), Hash: alg.Hash}, digest: n})
	}
	slices.SortFunc(r.keys, func(a, b soakKey) int { return strings.Compare(a.name, b.name) })
	if len(r.keys) == 0 {
		return nil, errors.New("soak: the agent serves no keys")
	}
	return r, nil
}

// load runs the clients and the sampler for Duration, then fills the
// client counters and samples into rep.
func (r *soakRun) load(ctx context.Context, rep *SoakReport) {
	// The run ends by cancellation, not a deadline: a deadline would reach
	// each Sign's context, and the client refuses to send a request in the
	// last millisecond before it (DEADLINE_EXCEEDED that the agent never
	// saw), nor would the agent get a sensible TimeoutMillis near the end.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	end := time.AfterFunc(r.o.Duration, cancel)
	defer end.Stop()
	r.start = time.Now()
	fmt.Fprintf(r.o.Log, "soak: %d signers, %d slow, %d junk, %d never-readers for %v\n", r.signers, r.slowN, r.junkN, r.neverN, r.o.Duration)

	var wg sync.WaitGroup
	spawn := func(n int, fn func(context.Context, int)) {
		for i := range n {
			wg.Go(func() { fn(ctx, i) })
		}
	}
	spawn(r.signers, r.signer)
	spawn(r.slowN, r.slow)
	spawn(r.junkN, r.junk)
	spawn(r.neverN, r.neverReader)
	var samples []SoakSample
	var sampler sync.WaitGroup
	sampler.Go(func() { samples = r.sample(ctx) })
	sampler.Go(func() { r.watch(ctx, cancel) })
	sampler.Wait()
	rep.Elapsed = time.Since(r.start) // the load's end; requests in flight drain below
	wg.Wait()
	rep.Samples = samples
	rep.Refusals = scrapeRefusals(r.metricsURL)

	r.mu.Lock()
	defer r.mu.Unlock()
	keys := make([]string, len(r.keys))
	for i, k := range r.keys {
		keys[i] = k.name
	}
	rep.Signers = SignerStats{Conns: r.signers, Keys: keys, Dials: r.signDials.Load(), Signatures: r.signOK.Load(),
		BadSigs: r.badSigs.Load(), FirstBad: r.firstBad, Errors: r.signErrs, FirstError: r.firstErr}
	rep.Slow = SlowStats{Conns: r.slowN, Dials: r.slowDials.Load(), Answered: r.slowAnswered.Load(), Cut: r.slowCut.Load(), Replies: r.slowReplies}
	rep.Junk = JunkStats{Conns: r.junkN, Sent: r.junkSent.Load(), Closed: r.junkClosed.Load(), Answered: r.junkAnswered.Load(), Ignored: r.junkIg.Load()}
	rep.NeverReaders = NeverStats{Conns: r.neverN, Dials: r.neverDials.Load(), Frames: r.neverFrames.Load(),
		Dropped: r.neverDropped.Load(), Outlived: r.neverOutlived.Load()}
	if d := slices.Sorted(slices.Values(r.neverDrops)); len(d) > 0 {
		rep.NeverReaders.DropP50, rep.NeverReaders.DropMax = d[len(d)/2], d[len(d)-1]
	}
}

func (r *soakRun) releasedIDs() [][16]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.released
}

// digestID is what the soak remembers of a released digest: half of the
// BLAKE3 hash the journal records (digest_hash), enough to tell millions of
// random digests apart.
func digestID(digest []byte) [16]byte {
	h := blake3.Sum256(digest)
	return [16]byte(h[:16])
}

// pause sleeps d, or less if ctx ends; it reports whether ctx is still live.
func pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// jitter is d scaled by a random factor in [0.5, 1.5).
func jitter(rng *rand.Rand, d time.Duration) time.Duration {
	return d/2 + time.Duration(rng.Int64N(int64(d)))
}

func newRNG(kind, i int) *rand.Rand {
	return rand.New(rand.NewPCG(uint64(kind)<<32|uint64(i), uint64(time.Now().UnixNano())))
}

// signer is a well-behaved client: one connection (redialled when lost),
// one Sign at a time on its key, every signature verified with the public
// key the agent listed and remembered for the audit check.
func (r *soakRun) signer(ctx context.Context, i int) {
	rng := newRNG(1, i)
	k := r.keys[i%len(r.keys)]
	digest := make([]byte, k.digest)
	var released [][16]byte
	defer func() {
		r.mu.Lock()
		r.released = append(r.released, released...)
		r.mu.Unlock()
	}()
	for ctx.Err() == nil {
		r.signDials.Add(1)
		c, err := client.Dial(ctx, r.socket)
		if err != nil {
			if ctx.Err() == nil {
				r.countSignErr(err)
				pause(ctx, jitter(rng, 200*time.Millisecond))
			}
			continue
		}
		for ctx.Err() == nil {
			for j := range digest {
				digest[j] = byte(rng.Uint32())
			}
			sctx, cancel := context.WithTimeout(ctx, signTimeout)
			sig, err := c.Sign(sctx, client.ByName(k.name), k.alg, digest)
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					break // the run's end, not the agent's doing
				}
				r.countSignErr(err)
				if client.Code(err) == proto.Unavailable {
					break // connection lost: redial
				}
				continue
			}
			// Released is released, verified or not: it must have a record.
			released = append(released, digestID(digest))
			if verr := providers.Verify(k.pub, k.palg, digest, sig.Sig); verr != nil {
				if r.badSigs.Add(1) == 1 {
					r.mu.Lock()
					r.firstBad = fmt.Sprintf("%s: %v", k.name, verr)
					r.mu.Unlock()
				}
				continue
			}
			r.signOK.Add(1)
		}
		c.Close()
	}
}

func (r *soakRun) countSignErr(err error) {
	code := client.Code(err).String()
	r.mu.Lock()
	r.signErrs[code]++
	if _, ok := r.firstErr[code]; !ok {
		r.firstErr[code] = err.Error()
	}
	r.mu.Unlock()
}

// dialRaw opens a Unix connection that closes when ctx ends.
func (r *soakRun) dialRaw(ctx context.Context) (net.Conn, func(), error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", r.socket)
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	return nc, func() { stop(); nc.Close() }, nil
}

func helloFrame(c *proto.Codec) []byte {
	f, _ := c.AppendRequestFrame(nil, &proto.Request{ID: 1, Op: proto.OpHello, Version: proto.Version, Features: proto.FeaturePipelining})
	return f
}

func signFrame(c *proto.Codec, dst []byte, id uint64, key string, rng *rand.Rand) []byte {
	digest := make([]byte, 32)
	for j := range digest {
		digest[j] = byte(rng.Uint32())
	}
	f, _ := c.AppendRequestFrame(dst, &proto.Request{ID: id, Op: proto.OpSign, Key: key, Scheme: proto.SchemeEd25519, Digest: digest})
	return f
}

// slow is a slow-loris client: it writes each frame one byte at a time,
// SlowByte apart, and reads each reply; when the agent cuts it, it
// reconnects.
func (r *soakRun) slow(ctx context.Context, i int) {
	rng := newRNG(2, i)
	codec := proto.NewCodec()
	var buf []byte
	for ctx.Err() == nil {
		r.slowDials.Add(1)
		nc, closeConn, err := r.dialRaw(ctx)
		if err != nil {
			pause(ctx, jitter(rng, 200*time.Millisecond))
			continue
		}
		br := bufio.NewReader(nc)
		for id := uint64(1); ctx.Err() == nil; id++ {
			frame := helloFrame(codec)
			if id > 1 {
				frame = signFrame(codec, nil, id, r.neverKey, rng)
			}
			if !r.trickle(ctx, nc, frame, rng) {
				if ctx.Err() == nil {
					r.slowCut.Add(1)
				}
				break
			}
			nc.SetReadDeadline(time.Now().Add(replyWait))
			p, err := proto.ReadFrame(br, buf, proto.DefaultMaxFrame)
			if err != nil {
				if ctx.Err() == nil {
					r.slowCut.Add(1) // closed while the reply was due
				}
				break
			}
			buf = p
			var resp proto.Response
			code := "UNDECODABLE"
			if codec.DecodeResponse(p, &resp) == nil {
				code = resp.Code.String()
			}
			r.slowAnswered.Add(1)
			r.mu.Lock()
			r.slowReplies[code]++
			r.mu.Unlock()
			if resp.Code != proto.OK && resp.ID == 0 {
				break // refused as a connection (a limit): reconnect
			}
		}
		closeConn()
		pause(ctx, jitter(rng, 200*time.Millisecond))
	}
}

// trickle writes frame byte by byte; false when the agent closed the
// connection (or ctx ended).
func (r *soakRun) trickle(ctx context.Context, nc net.Conn, frame []byte, rng *rand.Rand) bool {
	for j := range frame {
		nc.SetWriteDeadline(time.Now().Add(replyWait))
		if _, err := nc.Write(frame[j : j+1]); err != nil {
			return false
		}
		if j < len(frame)-1 && !pause(ctx, jitter(rng, r.o.SlowByte)) {
			return false
		}
	}
	return true
}

// junkPayload is one hostile opening: random bytes, a length prefix far
// over any limit, a frame of garbage, an empty frame, or a Hello followed
// by garbage.
func junkPayload(rng *rand.Rand, codec *proto.Codec, n int) []byte {
	random := func(n int) []byte {
		b := make([]byte, n)
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		return b
	}
	switch n % 5 {
	case 0:
		return random(1 + rng.IntN(4096))
	case 1:
		b := binary.BigEndian.AppendUint32(nil, uint32(proto.DefaultMaxFrame)+1+rng.Uint32N(1<<31))
		return append(b, random(rng.IntN(64))...)
	case 2:
		body := random(1 + rng.IntN(512))
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
	case 3:
		return []byte{0, 0, 0, 0}
	default:
		body := random(1 + rng.IntN(512))
		return append(append(helloFrame(codec), binary.BigEndian.AppendUint32(nil, uint32(len(body)))...), body...)
	}
}

// junk sends one junk payload per connection and waits for the agent to
// close it (reading what it answers), then reconnects.
func (r *soakRun) junk(ctx context.Context, i int) {
	rng := newRNG(3, i)
	codec := proto.NewCodec()
	scratch := make([]byte, 4096)
	for n := i; ctx.Err() == nil; n++ {
		nc, closeConn, err := r.dialRaw(ctx)
		if err != nil {
			pause(ctx, jitter(rng, 200*time.Millisecond))
			continue
		}
		nc.SetWriteDeadline(time.Now().Add(junkWait))
		nc.Write(junkPayload(rng, codec, n))
		r.junkSent.Add(1)
		nc.SetReadDeadline(time.Now().Add(junkWait))
		got := 0
		var err2 error
		for err2 == nil {
			var k int
			k, err2 = nc.Read(scratch)
			got += k
		}
		switch {
		case ctx.Err() != nil:
		case errors.Is(err2, os.ErrDeadlineExceeded):
			r.junkIg.Add(1)
		default:
			r.junkClosed.Add(1)
			if got > 0 {
				r.junkAnswered.Add(1)
			}
		}
		closeConn()
		pause(ctx, jitter(rng, 100*time.Millisecond))
	}
}

// neverReader says Hello, pipelines neverBurst Sign requests, then one per
// neverTick, and never reads a reply. The agent must drop it (write_timeout)
// rather than hold its replies forever; it reconnects once dropped.
func (r *soakRun) neverReader(ctx context.Context, i int) {
	rng := newRNG(4, i)
	codec := proto.NewCodec()
	for ctx.Err() == nil {
		r.neverDials.Add(1)
		nc, closeConn, err := r.dialRaw(ctx)
		if err != nil {
			pause(ctx, jitter(rng, 200*time.Millisecond))
			continue
		}
		start := time.Now()
		pending := helloFrame(codec)
		id := uint64(1)
		for range neverBurst {
			id++
			pending = signFrame(codec, pending, id, r.neverKey, rng)
		}
		dropped := false
		for ctx.Err() == nil && time.Since(start) < neverMax {
			if len(pending) == 0 {
				id++
				pending = signFrame(codec, pending, id, r.neverKey, rng)
			}
			nc.SetWriteDeadline(time.Now().Add(2 * time.Second))
			n, err := nc.Write(pending)
			// Count whole frames written; a partial one finishes next time,
			// so the stream stays aligned.
			r.neverFrames.Add(int64(countFrameEnds(pending, n)))
			pending = pending[n:]
			if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
				dropped = ctx.Err() == nil
				break
			}
			if !pause(ctx, neverTick) {
				break
			}
		}
		switch {
		case dropped:
			r.neverDropped.Add(1)
			r.mu.Lock()
			r.neverDrops = append(r.neverDrops, time.Since(start))
			r.mu.Unlock()
		case ctx.Err() == nil:
			r.neverOutlived.Add(1)
		}
		closeConn()
		pause(ctx, jitter(rng, 200*time.Millisecond))
	}
}

// countFrameEnds counts the frames of stream (which starts at a frame
// boundary) that end within its first n bytes.
func countFrameEnds(stream []byte, n int) int {
	count := 0
	for off := 0; off+proto.FrameHeaderLen <= len(stream); {
		end := off + proto.FrameHeaderLen + int(binary.BigEndian.Uint32(stream[off:]))
		if end > n {
			break
		}
		count++
		off = end
	}
	return count
}

// watch polls the agent process and cancels the run the moment it exits
// (a zombie, since nobody waits for it until StopAgent).
func (r *soakRun) watch(ctx context.Context, cancel context.CancelFunc) {
	for pause(ctx, 250*time.Millisecond) {
		if !processAlive(r.pid) {
			r.died.Store(true)
			fmt.Fprintf(r.o.Log, "soak: the agent (pid %d) exited at %v\n", r.pid, time.Since(r.start).Round(time.Second))
			cancel()
			return
		}
	}
}

func processAlive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the command, which is in parentheses and may
	// contain anything.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z' && s[i+2] != 'X'
}

// sample reads the agent every SampleEvery until ctx ends.
func (r *soakRun) sample(ctx context.Context) []SoakSample {
	var out []SoakSample
	hc := &http.Client{Timeout: 2 * time.Second}
	tick := time.NewTicker(r.o.SampleEvery)
	defer tick.Stop()
	last := time.Now()
	for {
		select {
		case <-ctx.Done():
			return out
		case <-tick.C:
		}
		s, err := readAgentSample(r.pid)
		if err != nil {
			continue // exited: watch reports it
		}
		s.At = time.Since(r.start)
		s.Goroutines, s.HeapInuse = scrapeGauges(hc, r.metricsURL)
		s.Signatures = r.signOK.Load()
		out = append(out, s)
		if time.Since(last) >= 30*time.Second || len(out) == 1 {
			last = time.Now()
			fmt.Fprintf(r.o.Log, "soak: %v: rss %.1f MiB (Go heap %.1f MiB), %d fds, %d threads, %d goroutines, %d signatures\n",
				s.At.Round(time.Second), float64(s.RSS)/(1<<20), float64(s.HeapInuse)/(1<<20), s.FDs, s.Threads, s.Goroutines, s.Signatures)
		}
	}
}

// readAgentSample reads RSS and threads from /proc/PID/status, the open
// descriptors from /proc/PID/fd and the CPU time from /proc/PID/stat.
func readAgentSample(pid int) (SoakSample, error) {
	base := "/proc/" + strconv.Itoa(pid)
	status, err := os.ReadFile(base + "/status")
	if err != nil {
		return SoakSample{}, err
	}
	s, err := parseProcStatus(status)
	if err != nil {
		return SoakSample{}, err
	}
	fds, err := os.ReadDir(base + "/fd")
	if err != nil {
		return SoakSample{}, err
	}
	s.FDs = int64(len(fds))
	s.CPU, _ = ProcessCPU(pid)
	return s, nil
}

// parseProcStatus reads VmRSS and Threads from /proc/PID/status.
func parseProcStatus(b []byte) (SoakSample, error) {
	var s SoakSample
	var haveRSS, haveThreads bool
	for line := range strings.SplitSeq(string(b), "\n") {
		name, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(val)
		switch {
		case name == "VmRSS" && len(f) == 2 && f[1] == "kB":
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return s, fmt.Errorf("VmRSS %q: %w", val, err)
			}
			s.RSS, haveRSS = kb<<10, true
		case name == "Threads" && len(f) == 1:
			n, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return s, fmt.Errorf("Threads %q: %w", val, err)
			}
			s.Threads, haveThreads = n, true
		}
	}
	if !haveRSS || !haveThreads {
		return s, errors.New("/proc status without VmRSS or Threads (a zombie?)")
	}
	return s, nil
}

// scrapeGauges reads go_goroutines and go_memstats_heap_inuse_bytes from
// the agent's /metrics; -1 for what it cannot read.
func scrapeGauges(hc *http.Client, url string) (goroutines, heap int64) {
	goroutines, heap = -1, -1
	resp, err := hc.Get(url)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		return
	}
	if v, ok := metricValues(body, "go_goroutines")[""]; ok {
		goroutines = int64(v)
	}
	if v, ok := metricValues(body, "go_memstats_heap_inuse_bytes")[""]; ok {
		heap = int64(v)
	}
	return
}

// metricValues returns the samples of metric name in a Prometheus text page,
// keyed by their label text ("" for none, `limit="frame_timeout"` for one).
func metricValues(page []byte, name string) map[string]float64 {
	out := map[string]float64{}
	for line := range bytes.SplitSeq(page, []byte("\n")) {
		s := string(line)
		rest, ok := strings.CutPrefix(s, name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		labels := ""
		if rest[0] == '{' {
			end := strings.IndexByte(rest, '}')
			if end < 0 {
				continue
			}
			labels, rest = rest[1:end], rest[end+1:]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		out[labels] = v
	}
	return out
}

// scrapeRefusals reads sigil_limit_refusals_total by limit.
func scrapeRefusals(url string) map[string]int {
	hc := &http.Client{Timeout: 2 * time.Second}
	resp, err := hc.Get(url)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	out := map[string]int{}
	for labels, v := range metricValues(body, "sigil_limit_refusals_total") {
		name := labels
		for l := range strings.SplitSeq(labels, ",") {
			if k, val, ok := strings.Cut(l, "="); ok && k == "limit" {
				name = strings.Trim(val, `"`)
			}
		}
		out[name] += int(v)
	}
	return out
}

func agentNoFile(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/limits")
	if err != nil {
		return "unknown"
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			if f := strings.Fields(rest); len(f) >= 2 {
				return f[0] + " soft, " + f[1] + " hard"
			}
		}
	}
	return "unknown"
}

func describeExit(state *os.ProcessState) string {
	if state == nil {
		return "not reaped"
	}
	if ws, ok := state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "killed by " + ws.Signal().String()
	}
	return "exit status " + strconv.Itoa(state.ExitCode())
}

// CheckLeaks applies rule to the samples taken after warmup: RSS, open
// descriptors and goroutines (threads instead when no goroutine count was
// read). With fewer than 6 samples after warm-up nothing is judged.
func CheckLeaks(samples []SoakSample, warmup time.Duration, rule LeakRule) []LeakCheck {
	var post []SoakSample
	for _, s := range samples {
		if s.At >= warmup {
			post = append(post, s)
		}
	}
	type metric struct {
		name  string
		slack int64
		get   func(SoakSample) int64
	}
	haveGoroutines := len(post) > 0 && !slices.ContainsFunc(post, func(s SoakSample) bool { return s.Goroutines < 0 })
	metrics := []metric{
		{"rss_bytes", rule.RSSSlack, func(s SoakSample) int64 { return s.RSS }},
		{"fds", rule.FDSlack, func(s SoakSample) int64 { return s.FDs }},
	}
	if haveGoroutines {
		metrics = append(metrics, metric{"goroutines", rule.GoroutineSlack, func(s SoakSample) int64 { return s.Goroutines }})
	} else {
		metrics = append(metrics, metric{"threads", rule.ThreadSlack, func(s SoakSample) int64 { return s.Threads }})
	}
	var out []LeakCheck
	third := len(post) / 3
	for _, m := range metrics {
		if third < 2 {
			out = append(out, LeakCheck{Metric: m.name, OK: true, Note: fmt.Sprintf("not judged: %d samples after warm-up, want 6", len(post))})
			continue
		}
		vals := func(ss []SoakSample) []float64 {
			v := make([]float64, len(ss))
			for i, s := range ss {
				v[i] = float64(m.get(s))
			}
			return v
		}
		base, final := median(vals(post[:third])), median(vals(post[len(post)-third:]))
		limit := base*(1+rule.Tolerance) + float64(m.slack)
		out = append(out, LeakCheck{Metric: m.name, Baseline: base, Final: final, Limit: limit, OK: final <= limit})
	}
	return out
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// checkAudit runs `sigil audit verify` and `sigil audit export` on the
// stopped agent's journal and looks up every released signature's record.
func checkAudit(ctx context.Context, sigil, config string, released [][16]byte) AuditCheck {
	a := AuditCheck{Released: int64(len(released))}
	out, err := exec.CommandContext(ctx, sigil, "audit", "verify", "--config", config).CombinedOutput()
	a.VerifyOutput = strings.TrimSpace(string(out))
	a.Verified = err == nil
	cmd := exec.CommandContext(ctx, sigil, "audit", "export", "--config", config, "--format", "jsonl")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		a.Err = err.Error()
		return a
	}
	if err := cmd.Start(); err != nil {
		a.Err = err.Error()
		return a
	}
	m, merr := matchAudit(stdout, released)
	io.Copy(io.Discard, stdout)
	werr := cmd.Wait()
	m.Verified, m.VerifyOutput = a.Verified, a.VerifyOutput
	switch {
	case merr != nil:
		m.Err = merr.Error()
	case werr != nil:
		m.Err = fmt.Sprintf("%v: %s", werr, strings.TrimSpace(stderr.String()))
	}
	return m
}

// matchAudit reads a JSONL export and counts the released digests that have
// no OK sign record.
func matchAudit(r io.Reader, released [][16]byte) (AuditCheck, error) {
	a := AuditCheck{Released: int64(len(released))}
	want := slices.Clone(released)
	slices.SortFunc(want, func(x, y [16]byte) int { return bytes.Compare(x[:], y[:]) })
	found := make([]bool, len(want))
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var rec struct {
			Op         string `json:"op"`
			Code       uint16 `json:"code"`
			DigestHash string `json:"digest_hash"`
		}
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			return a, fmt.Errorf("record %d: %w", a.Records+1, err)
		}
		a.Records++
		if rec.Op != "sign" || rec.Code != uint16(proto.OK) {
			continue
		}
		a.SignOK++
		h, err := hex.DecodeString(rec.DigestHash)
		if err != nil || len(h) < 16 {
			return a, fmt.Errorf("record %d: digest_hash %q", a.Records, rec.DigestHash)
		}
		if i, ok := slices.BinarySearchFunc(want, [16]byte(h[:16]), func(x, y [16]byte) int { return bytes.Compare(x[:], y[:]) }); ok {
			// Equal IDs (the same digest signed twice) sit side by side.
			for ; i < len(want) && want[i] == [16]byte(h[:16]); i++ {
				if !found[i] {
					found[i] = true
					break
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return a, err
	}
	for _, f := range found {
		if !f {
			a.Missing++
		}
	}
	return a, nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// Markdown writes the report as a Markdown section.
func (r *SoakReport) Markdown(w io.Writer) error {
	var b strings.Builder
	verdict := "PASS"
	if !r.Passed() {
		verdict = "FAIL"
	}
	o := r.Options
	secs := r.Elapsed.Seconds()
	fmt.Fprintf(&b, "### Soak: %d connections for %v: %s\n\n", o.Conns, o.Duration, verdict)
	m := r.Machine
	fmt.Fprintf(&b, "- %s; %d cores, %s, Linux %s, %s\n", r.Started.UTC().Format("2006-01-02 15:04 MST"), m.Cores, m.CPUModel, m.Kernel, m.GoVersion)
	fmt.Fprintf(&b, "- one agent process (pid %d) on SoftHSM2 and software keys, the agent's default limits; RLIMIT_NOFILE: harness %d, agent %s\n", r.AgentPID, r.HarnessNoFile, r.AgentNoFile)
	fmt.Fprintf(&b, "- ran %v; warm-up %v; a sample every %v\n\n", r.Elapsed.Round(time.Second), o.Warmup, o.SampleEvery)

	b.WriteString("| clients | conns | connections made | outcome |\n|---|---:|---:|---|\n")
	s := r.Signers
	fmt.Fprintf(&b, "| well-behaved signers (%s) | %d | %d | %d signatures (%.0f/s), %d that did not verify; errors: %s |\n",
		strings.Join(s.Keys, ", "), s.Conns, s.Dials, s.Signatures, float64(s.Signatures)/secs, s.BadSigs, codeList(s.Errors))
	sl := r.Slow
	fmt.Fprintf(&b, "| slow (1 byte per ~%v) | %d | %d | %d frames answered (%s), %d cut mid-frame or before the reply |\n",
		o.SlowByte, sl.Conns, sl.Dials, sl.Answered, codeList(sl.Replies), sl.Cut)
	j := r.Junk
	fmt.Fprintf(&b, "| junk (random bytes, oversized or empty frames, garbage after Hello) | %d | %d | %d closed by the agent (%d after a reply), %d left open %v and closed by the harness |\n",
		j.Conns, j.Sent, j.Closed, j.Answered, j.Ignored, junkWait)
	n := r.NeverReaders
	fmt.Fprintf(&b, "| never-readers (%d pipelined Signs, then one per %v) | %d | %d | %d frames sent; %d dropped by the agent (after %v median, %v max), %d outlived %v |\n\n",
		neverBurst, neverTick, n.Conns, n.Dials, n.Frames, n.Dropped, n.DropP50.Round(100*time.Millisecond), n.DropMax.Round(100*time.Millisecond), n.Outlived, neverMax)

	if len(s.FirstError) > 0 {
		b.WriteString("First signer error of each code:\n\n")
		for _, code := range slices.Sorted(maps.Keys(s.FirstError)) {
			fmt.Fprintf(&b, "- %s: %s\n", code, s.FirstError[code])
		}
		b.WriteString("\n")
	}
	if len(r.Refusals) > 0 {
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(r.Refusals)) {
			parts = append(parts, fmt.Sprintf("%s %d", k, r.Refusals[k]))
		}
		fmt.Fprintf(&b, "Limit refusals (`sigil_limit_refusals_total`): %s.\n\n", strings.Join(parts, ", "))
	}

	b.WriteString("The agent over time (every ~" + sampleStride(r.Samples, 12).String() + "; all samples in the JSON):\n\n")
	b.WriteString("| t | RSS MiB | Go heap MiB | FDs | threads | goroutines | CPU % | signatures/s |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	step := max(1, len(r.Samples)/12)
	roundTo := time.Second
	if o.Duration < 2*time.Minute {
		roundTo = 100 * time.Millisecond
	}
	for i := 0; i < len(r.Samples); i += step {
		cur := r.Samples[i]
		prev := SoakSample{}
		if i >= step {
			prev = r.Samples[i-step]
		}
		dt := (cur.At - prev.At).Seconds()
		fmt.Fprintf(&b, "| %v | %.1f | %.1f | %d | %d | %d | %.0f | %.0f |\n", cur.At.Round(roundTo), float64(cur.RSS)/(1<<20), float64(cur.HeapInuse)/(1<<20), cur.FDs, cur.Threads,
			cur.Goroutines, 100*(cur.CPU-prev.CPU).Seconds()/dt, float64(cur.Signatures-prev.Signatures)/dt)
	}
	fmt.Fprintf(&b, "\nLeak rule: after the %v warm-up the samples are cut into thirds; the median of the last third may exceed the median of the first by %.0f%% plus a slack (RSS %d MiB, FDs %d, goroutines %d; threads %d when goroutines cannot be read).\n\n",
		o.Warmup, 100*o.Leak.Tolerance, o.Leak.RSSSlack>>20, o.Leak.FDSlack, o.Leak.GoroutineSlack, o.Leak.ThreadSlack)
	b.WriteString("| metric | first third | last third | limit | |\n|---|---:|---:|---:|---|\n")
	for _, l := range r.Leaks {
		ok := "ok"
		if !l.OK {
			ok = "**LEAK**"
		}
		if l.Note != "" {
			ok = l.Note
		}
		unit, scale := "", 1.0
		if l.Metric == "rss_bytes" {
			unit, scale = " MiB", 1<<20
		}
		fmt.Fprintf(&b, "| %s | %.1f%s | %.1f%s | %.1f%s | %s |\n", l.Metric, l.Baseline/scale, unit, l.Final/scale, unit, l.Limit/scale, unit, ok)
	}
	a := r.Audit
	fmt.Fprintf(&b, "\nAudit (agent stopped with SIGTERM: %s): `sigil audit verify`: %s; %d records, %d OK sign records; %d of the %d signatures the well-behaved signers received have no record.\n",
		r.AgentExit, firstLine(a.VerifyOutput), a.Records, a.SignOK, a.Missing, a.Released)
	if a.Err != "" {
		fmt.Fprintf(&b, "Audit export error: %s\n", a.Err)
	}
	if len(r.Failures) > 0 {
		b.WriteString("\nFailures:\n\n")
		for _, f := range r.Failures {
			fmt.Fprintf(&b, "- %s\n", f)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// sampleStride is the time between the rows the Markdown table shows.
func sampleStride(samples []SoakSample, rows int) time.Duration {
	if len(samples) < 2 {
		return 0
	}
	step := max(1, len(samples)/rows)
	per := (samples[len(samples)-1].At - samples[0].At) / time.Duration(len(samples)-1)
	return (per * time.Duration(step)).Round(time.Second)
}

// codeList renders counts by code, most frequent first: "RATE_LIMITED 3, …".
func codeList(m map[string]int64) string {
	if len(m) == 0 {
		return "none"
	}
	type kv struct {
		k string
		v int64
	}
	var list []kv
	for k, v := range m {
		list = append(list, kv{k, v})
	}
	slices.SortFunc(list, func(a, b kv) int {
		if c := cmp.Compare(b.v, a.v); c != 0 {
			return c
		}
		return strings.Compare(a.k, b.k)
	})
	parts := make([]string, len(list))
	for i, e := range list {
		parts[i] = fmt.Sprintf("%s %d", e.k, e.v)
	}
	return strings.Join(parts, ", ")
}

// WriteJSON writes the report as indented JSON.
func (r *SoakReport) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}
