package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"fmt"
	"math"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// The admin operations are answered on the agent's admin socket only (see
// the agent's admin_socket); elsewhere they are PERMISSION_DENIED.

// Pause stops a key slot ("tenant/slot") from signing: signers get PAUSED.
// The returned text is the agent's note, if any.
func (c *Client) Pause(ctx context.Context, slot string) (string, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpPause, Key: slot})
	if err != nil {
		return "", err
	}
	return resp.Msg, nil
}

// Resume lifts a run-time pause. A slot the policy file pauses stays paused;
// the returned text says so.
func (c *Client) Resume(ctx context.Context, slot string) (string, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpResume, Key: slot})
	if err != nil {
		return "", err
	}
	return resp.Msg, nil
}

// ReloadPolicy makes the agent re-read what SIGHUP re-reads: its policy,
// TLS certificates and keys' certificates. What fails to load or validate
// is refused (BAD_REQUEST, with the reasons) and the old stays.
func (c *Client) ReloadPolicy(ctx context.Context) (string, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpReloadPolicy})
	if err != nil {
		return "", err
	}
	return resp.Msg, nil
}

// Rotate asks the agent to rotate a key slot ("tenant/slot") now: new key,
// CSR, cut-over, canaries, evidence pack.
func (c *Client) Rotate(ctx context.Context, slot string) error {
	_, err := c.RotateSlot(ctx, slot)
	return err
}

// RotateSlot is Rotate returning the agent's summary.
func (c *Client) RotateSlot(ctx context.Context, slot string) (string, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpRotate, Key: slot})
	if err != nil {
		return "", err
	}
	return resp.Msg, nil
}

// AuditVerify has the running agent recompute its audit chain (admin role):
// ok reports an intact chain; summary gives the record count, seq range and
// head hash, or names the first broken record.
func (c *Client) AuditVerify(ctx context.Context) (ok bool, summary string, err error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpAuditVerify})
	if err != nil {
		return false, "", err
	}
	return resp.Valid, resp.Msg, nil
}

// AuditPrune has the running agent delete its audit records older than
// before (admin role), keeping the chain verifiable from the new start; it
// returns the agent's summary. A broken chain refuses the prune (INTERNAL),
// and a zero before is no cut-off (BAD_REQUEST).
func (c *Client) AuditPrune(ctx context.Context, before time.Time) (string, error) {
	var at int64
	if !before.IsZero() {
		at = before.Unix() // the zero time's would read as a time before 1970
	}
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpAuditPrune, At: at})
	if err != nil {
		return "", err
	}
	return resp.Msg, nil
}

// AuditTail reads the running agent's audit journal (admin role): the last
// limit records when from is 0, else up to limit records from seq from on;
// tenant "" means every tenant. Each record is one JSON object.
func (c *Client) AuditTail(ctx context.Context, tenant string, from uint64, limit int) ([][]byte, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpAuditTail, Key: tenant, FromSeq: from, Limit: wireCount(limit)})
	if err != nil {
		return nil, err
	}
	return resp.Records, nil
}

// Rollback makes the slot's previous key version active again, while that
// version is not retired (KEY_RETIRED otherwise). It returns the agent's note.
func (c *Client) Rollback(ctx context.Context, slot string) (string, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpRollback, Key: slot})
	if err != nil {
		return "", err
	}
	return resp.Msg, nil
}

// IncidentDrill pauses the slot, rotates it in emergency mode (the old
// version stops verifying), re-signs the canary set, resumes the slot and
// writes an incident statement; it returns the agent's summary.
func (c *Client) IncidentDrill(ctx context.Context, slot string) (string, error) {
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpIncidentDrill, Key: slot})
	if err != nil {
		return "", err
	}
	return resp.Msg, nil
}

// ScheduleRotation stores a one-off rotation of the slot at the given time
// (it survives agent restarts). The time must be after the Unix epoch: on
// the wire 0 means "now", and an earlier time is in the past anyway.
func (c *Client) ScheduleRotation(ctx context.Context, slot string, at time.Time) (string, error) {
	if at.Unix() <= 0 {
		return "", refused(proto.BadRequest, "Rotate refused by the client, not sent: a rotation can be scheduled only for a time in the future, "+at.UTC().Format(time.RFC3339)+" is not")
	}
	resp, err := c.call(ctx, &proto.Request{Op: proto.OpRotate, Key: slot, At: at.Unix()})
	if err != nil {
		return "", err
	}
	return resp.Msg, nil
}

// ExportREP fetches a stored Rotation Evidence Pack of the slot: its
// canonical manifest and the detached signature. n 0 means the newest.
//
// A manifest larger than one reply comes in parts, which it asks for in
// turn, of the same pack, all within ctx (see ExportREPPerPart).
func (c *Client) ExportREP(ctx context.Context, slot string, n int) (manifest, sig []byte, err error) {
	return c.ExportREPPerPart(ctx, slot, n, 0)
}

// ExportREPPerPart is ExportREP with each request, one per part of a
// manifest larger than one reply, bounded by perPart as well as by ctx: a
// large pack over a slow link then needs each part in time, not the whole
// pack within one deadline. perPart 0 or less leaves each to ctx alone.
func (c *Client) ExportREPPerPart(ctx context.Context, slot string, n int, perPart time.Duration) (manifest, sig []byte, err error) {
	p, err := c.ExportREPPack(ctx, slot, n, perPart)
	if err != nil {
		return nil, nil, err
	}
	return p.Manifest, p.Sig, nil
}

// REPPack is a stored Rotation Evidence Pack as the agent sends it.
type REPPack struct {
	Manifest, Sig []byte
	// EvidenceKey is the agent's current evidence public key, which
	// signs its new packs; an older pack may be by an earlier one. nil
	// from an agent that does not send it.
	EvidenceKey ed25519.PublicKey
}

// ExportREPPack is ExportREPPerPart with the agent's evidence public key.
// The loop ends of itself: each part must bring the manifest closer to
// the length the first announced.
func (c *Client) ExportREPPack(ctx context.Context, slot string, n int, perPart time.Duration) (*REPPack, error) {
	malformed := malformedReply("malformed ExportREP reply: its parts do not make one manifest", nil)
	var manifest, spki []byte
	length := -1 // the manifest's, as the first part announced it
	for {
		resp, err := c.exportREPPart(ctx, perPart, &proto.Request{Op: proto.OpExportREP, Key: slot, Limit: wireCount(n), FromSeq: uint64(len(manifest))})
		if err != nil {
			return nil, err
		}
		if manifest != nil && !bytes.Equal(resp.Pub, spki) {
			return nil, malformed
		}
		spki = resp.Pub
		switch len(resp.Records) {
		case 2: // the whole manifest
			if manifest != nil {
				return nil, malformed
			}
			return exportedPack(resp.Records[0], resp.Records[1], spki)
		case 3: // a part: "LENGTH NUMBER" beside it
			var total, number int
			if _, err := fmt.Sscanf(string(resp.Records[2]), "%d %d", &total, &number); err != nil ||
				len(resp.Records[0]) == 0 || len(manifest)+len(resp.Records[0]) > total || (n != 0 && number != n) ||
				(length >= 0 && total != length) {
				return nil, malformed
			}
			manifest, n, length = append(manifest, resp.Records[0]...), number, total
			if len(manifest) == total {
				return exportedPack(manifest, resp.Records[1], spki)
			}
		default:
			return nil, malformed
		}
	}
}

// exportedPack parses the evidence key beside a pack: DER SPKI of an
// Ed25519 key, or nothing.
func exportedPack(manifest, sig, spki []byte) (*REPPack, error) {
	p := &REPPack{Manifest: manifest, Sig: sig}
	if len(spki) == 0 {
		return p, nil
	}
	pub, err := x509.ParsePKIXPublicKey(spki)
	if err != nil {
		return nil, malformedReply("malformed ExportREP reply: the evidence public key does not parse", err)
	}
	ed, ok := pub.(ed25519.PublicKey)
	if !ok {
		return nil, malformedReply(fmt.Sprintf("malformed ExportREP reply: the evidence public key is %T, not Ed25519", pub), nil)
	}
	p.EvidenceKey = ed
	return p, nil
}

// wireCount is n as the wire's 32-bit count or pack number: 2^32-1 for
// any larger n, which the protocol reads as the most records a reply
// holds, or a pack number never assigned (NOT_FOUND). Its low 32 bits
// would be another number: pack 2^32+1 would fetch pack 1.
func wireCount(n int) uint32 {
	switch {
	case n <= 0:
		return 0
	case uint64(n) > math.MaxUint32:
		return math.MaxUint32
	}
	return uint32(n)
}

// exportREPPart is one ExportREP request, within perPart when it is set.
func (c *Client) exportREPPart(ctx context.Context, perPart time.Duration, req *proto.Request) (*proto.Response, error) {
	if perPart > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, perPart)
		defer cancel()
	}
	return c.call(ctx, req)
}
