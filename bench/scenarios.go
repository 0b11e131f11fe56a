package bench

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/providers"
)

// ckmEdDSA is CKM_EDDSA, which miekg/pkcs11 does not define.
const ckmEdDSA = 0x1057

// benchDigest is what every scenario signs (Ed25519: as the message), so all
// scenarios do the same work.
var benchDigest = sha256.Sum256([]byte("sigil benchmark payload"))

// AgentScenario signs through an agent at socket with the named key, one
// client connection per worker: what a co-located service does.
func AgentScenario(name, keyType, socket, keyName string, cpu func() time.Duration) Scenario {
	return SplitAgentScenario(name, keyType, []string{socket}, keyName, cpu)
}

// AgentTLSScenario signs through the agent's mutual-TLS listener, one
// connection (one full handshake, then reused) per worker.
func AgentTLSScenario(name, keyType, addr string, cfg *tls.Config, keyName string, cpu func() time.Duration) Scenario {
	return Scenario{
		Name: name, Key: keyType, CPU: cpu,
		NewWorker: func(ctx context.Context) (func(context.Context) error, func() error, error) {
			return signingWorker(keyName)(client.DialTLS(ctx, addr, cfg))
		},
	}
}

// signingWorker makes a worker of a connection to an agent: each op signs
// the bench digest with the named key. It takes Dial's results as they are.
func signingWorker(keyName string) func(*client.Client, error) (func(context.Context) error, func() error, error) {
	return func(c *client.Client, err error) (func(context.Context) error, func() error, error) {
		if err != nil {
			return nil, nil, err
		}
		ref := client.ByName(keyName)
		op := func(ctx context.Context) error {
			_, err := c.Sign(ctx, ref, client.Algorithm{}, benchDigest[:])
			return err
		}
		return op, c.Close, nil
	}
}

// Cryptoki is a PKCS#11 module loaded in this process with the bench token
// logged in: the direct (SoftHSM2) and p11kit (p11-kit client) scenarios.
type Cryptoki struct {
	ctx  *p11.Ctx
	slot uint
	// login keeps one session open so the token stays logged in: PKCS#11
	// login state lives as long as any session of the application.
	login p11.SessionHandle
}

var errNoToken = errors.New("token not found")

// OpenCryptoki loads module, finds the token by label and logs in once.
func OpenCryptoki(module, label, pin string) (*Cryptoki, error) {
	ctx := p11.New(module)
	if ctx == nil {
		return nil, fmt.Errorf("load %s failed", module)
	}
	if err := ctx.Initialize(); err != nil && !errors.Is(err, p11.Error(p11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		ctx.Destroy()
		return nil, fmt.Errorf("C_Initialize %s: %w", module, err)
	}
	c := &Cryptoki{ctx: ctx}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("C_GetSlotList: %w", err)
	}
	found := false
	for _, s := range slots {
		ti, err := ctx.GetTokenInfo(s)
		if err == nil && trimLabel(ti.Label) == label {
			c.slot, found = s, true
			break
		}
	}
	if !found {
		c.Close()
		return nil, fmt.Errorf("%s: %q: %w", module, label, errNoToken)
	}
	if c.login, err = ctx.OpenSession(c.slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION); err != nil {
		c.Close()
		return nil, fmt.Errorf("C_OpenSession: %w", err)
	}
	if err := ctx.Login(c.login, p11.CKU_USER, pin); err != nil && !errors.Is(err, p11.Error(p11.CKR_USER_ALREADY_LOGGED_IN)) {
		c.Close()
		return nil, errors.New("C_Login failed (PIN not shown)")
	}
	return c, nil
}

func trimLabel(s string) string {
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == 0) {
		s = s[:len(s)-1]
	}
	return s
}

// Close logs out and unloads the module.
func (c *Cryptoki) Close() {
	if c.login != 0 {
		c.ctx.Logout(c.login)
		c.ctx.CloseSession(c.login)
	}
	c.ctx.Finalize()
	c.ctx.Destroy()
}

// Scenario signs with the private key labelled keyType, one session per
// worker, each signature C_SignInit + C_Sign as miekg/pkcs11 does them (the
// floor the agent is measured against, and what p11-kit forwards).
func (c *Cryptoki) Scenario(name, keyType string, cpu func() time.Duration) Scenario {
	var once sync.Once
	var mech []*p11.Mechanism
	var data []byte
	var keyErr error
	prepare := func(s p11.SessionHandle) (p11.ObjectHandle, error) {
		if err := c.ctx.FindObjectsInit(s, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY),
			p11.NewAttribute(p11.CKA_LABEL, keyType),
		}); err != nil {
			return 0, err
		}
		objs, _, err := c.ctx.FindObjects(s, 1)
		c.ctx.FindObjectsFinal(s)
		if err != nil {
			return 0, err
		}
		if len(objs) == 0 {
			return 0, fmt.Errorf("no private key labelled %q", keyType)
		}
		once.Do(func() {
			switch keyType {
			case KeyECDSAP256:
				mech, data = []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, benchDigest[:]
			case KeyRSA2048:
				prefix, _ := providers.DigestInfoPrefix(crypto.SHA256)
				mech, data = []*p11.Mechanism{p11.NewMechanism(p11.CKM_RSA_PKCS, nil)}, append(append([]byte{}, prefix...), benchDigest[:]...)
			case KeyEd25519:
				mech, data = []*p11.Mechanism{p11.NewMechanism(ckmEdDSA, nil)}, benchDigest[:]
			default:
				keyErr = fmt.Errorf("key type %q", keyType)
			}
		})
		return objs[0], keyErr
	}
	return Scenario{
		Name: name, Key: keyType, CPU: cpu,
		NewWorker: func(context.Context) (func(context.Context) error, func() error, error) {
			s, err := c.ctx.OpenSession(c.slot, p11.CKF_SERIAL_SESSION)
			if err != nil {
				return nil, nil, fmt.Errorf("C_OpenSession: %w", err)
			}
			key, err := prepare(s)
			if err != nil {
				c.ctx.CloseSession(s)
				return nil, nil, err
			}
			// A mechanism the module cannot do (p11-kit forwarding CKM_EDDSA)
			// should say so once, not fail every op.
			if err := c.ctx.SignInit(s, mech, key); err != nil {
				c.ctx.CloseSession(s)
				return nil, nil, fmt.Errorf("C_SignInit: %w", err)
			}
			if _, err := c.ctx.Sign(s, data); err != nil {
				c.ctx.CloseSession(s)
				return nil, nil, fmt.Errorf("C_Sign: %w", err)
			}
			op := func(context.Context) error {
				if err := c.ctx.SignInit(s, mech, key); err != nil {
					return err
				}
				_, err := c.ctx.Sign(s, data)
				return err
			}
			return op, func() error { return c.ctx.CloseSession(s) }, nil
		},
	}
}

// p11kitEnv points p11-kit's client module at the server. The module reads
// it when loaded.
func p11kitEnv(addr string) { os.Setenv("P11_KIT_SERVER_ADDRESS", addr) }
