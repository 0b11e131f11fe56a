package awskmstest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// local-kms knows no Ed25519 keys (its CreateKey refuses
// ECC_NIST_EDWARDS25519), so Front adds them the way AWS KMS serves them.
const (
	specEd25519   = "ECC_NIST_EDWARDS25519"
	algEd25519    = "ED25519_SHA_512"    // pure Ed25519 (RFC 8032): MessageType RAW only
	algEd25519ph  = "ED25519_PH_SHA_512" // Ed25519ph: MessageType DIGEST, a SHA-512 digest
	maxRawMessage = 4096                 // what Sign takes in Message, whatever its type
	// specPlaceholder is what an Ed25519 key is in local-kms: a key whose
	// id, ARN, aliases, state and deletion local-kms keeps, while Front
	// keeps its key pair and answers everything about its cryptography.
	specPlaceholder = "ECC_NIST_P256"
)

// Front is an HTTP server in front of local-kms that adds Ed25519 keys
// (KeySpec ECC_NIST_EDWARDS25519) as AWS KMS has them: CreateKey makes one,
// GetPublicKey and DescribeKey report its spec, public key and signing
// algorithms (ED25519_SHA_512, ED25519_PH_SHA_512), and Sign signs with it,
// answering as AWS does: ED25519_SHA_512 with MessageType RAW only,
// ED25519_PH_SHA_512 with DIGEST only, a Message of at most 4096 bytes,
// ValidationException otherwise, and InvalidKeyUsageException for another
// algorithm. A disabled or pending-deletion key is refused as local-kms
// refuses its own. Every other request, and every request about another
// key, passes through to local-kms unchanged. Verify with an Ed25519 key is
// not emulated (UnsupportedOperationException), rather than answered by the
// placeholder local-kms holds.
type Front struct {
	// Endpoint is its loopback endpoint, http://127.0.0.1:PORT.
	Endpoint string
	upstream string
	client   *http.Client
	srv      *http.Server
	done     chan struct{}

	mu   sync.Mutex
	keys map[string]*edKey // key id and key ARN → the key
}

type edKey struct {
	arn  string
	priv ed25519.PrivateKey
}

// StartFront serves a Front for the local-kms at upstream on a free
// loopback port. Close stops it.
func StartFront(upstream string) (*Front, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f := &Front{
		Endpoint: "http://" + ln.Addr().String(),
		upstream: strings.TrimSuffix(upstream, "/"),
		client:   &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}},
		done:     make(chan struct{}),
		keys:     make(map[string]*edKey),
	}
	f.srv = &http.Server{Handler: f, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(f.done)
		f.srv.Serve(ln)
	}()
	return f, nil
}

// Close stops the front; local-kms is left running.
func (f *Front) Close() {
	f.srv.Close()
	<-f.done
	f.client.CloseIdleConnections()
}

func (f *Front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	target := r.Header.Get("X-Amz-Target")
	switch target[strings.LastIndexByte(target, '.')+1:] {
	case "CreateKey":
		f.createKey(w, r, body)
	case "GetPublicKey", "DescribeKey":
		f.rewrite(w, r, body)
	case "Sign":
		f.sign(w, r, body)
	case "Verify":
		if k, _, _ := f.resolve(r.Context(), keyIDOf(body)); k != nil {
			writeError(w, "UnsupportedOperationException", "awskmstest does not emulate Verify with an Ed25519 key")
			return
		}
		f.pass(w, r, body)
	default:
		f.pass(w, r, body)
	}
}

// answer is an upstream response read whole.
type answer struct {
	status int
	header http.Header
	body   []byte
}

func (a *answer) write(w http.ResponseWriter) {
	for k, v := range a.header {
		if k != "Content-Length" {
			w.Header()[k] = v
		}
	}
	w.WriteHeader(a.status)
	w.Write(a.body)
}

// forward sends body to local-kms with r's method, path and headers.
func (f *Front) forward(r *http.Request, body []byte) (*answer, error) {
	req, err := http.NewRequestWithContext(r.Context(), r.Method, f.upstream+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header = r.Header.Clone()
	return f.do(req)
}

// do sends req to local-kms and reads its whole answer.
func (f *Front) do(req *http.Request) (*answer, error) {
	resp, err := f.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	return &answer{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

func (f *Front) pass(w http.ResponseWriter, r *http.Request, body []byte) {
	if a, ok := f.forwardOK(w, r, body); ok {
		a.write(w)
	}
}

// forwardOK forwards body and returns local-kms's answer when it is a
// success, for the caller to use; any other answer, or a failure to reach
// local-kms (502), it has written to w already.
func (f *Front) forwardOK(w http.ResponseWriter, r *http.Request, body []byte) (*answer, bool) {
	a, err := f.forward(r, body)
	if err != nil {
		http.Error(w, "awskmstest front: "+err.Error(), http.StatusBadGateway)
		return nil, false
	}
	if a.status != http.StatusOK {
		a.write(w)
		return nil, false
	}
	return a, true
}

// call sends one request of its own to local-kms, which does not check
// request signatures.
func (f *Front) call(ctx context.Context, op string, in any) (*answer, error) {
	b, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, f.upstream+"/", bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/x-amz-json-1.1")
	req.Header.Set("X-Amz-Target", "TrentService."+op)
	return f.do(req)
}

func writeError(w http.ResponseWriter, code, msg string) {
	writeJSON(w, http.StatusBadRequest, map[string]string{"__type": code, "message": msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.WriteHeader(status)
	w.Write(b)
}

// decodeObject reads a JSON object keeping numbers as written (local-kms's
// dates are numbers), so a rewritten answer changes only what it must.
func decodeObject(b []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, errors.New("not a JSON object")
	}
	return m, nil
}

func keyIDOf(body []byte) string {
	var in struct{ KeyId string }
	json.Unmarshal(body, &in)
	return in.KeyId
}

func (f *Front) lookup(id string) *edKey {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.keys[id]
}

// describeAs sets the fields AWS reports for an Ed25519 key in m, a
// KeyMetadata or a GetPublicKey answer.
func describeAs(m map[string]any) {
	m["KeySpec"] = specEd25519
	m["CustomerMasterKeySpec"] = specEd25519
	m["SigningAlgorithms"] = []any{algEd25519, algEd25519ph}
}

func (f *Front) createKey(w http.ResponseWriter, r *http.Request, body []byte) {
	in, err := decodeObject(body)
	if err != nil {
		f.pass(w, r, body)
		return
	}
	spec, _ := in["KeySpec"].(string)
	if spec == "" {
		spec, _ = in["CustomerMasterKeySpec"].(string)
	}
	if spec != specEd25519 {
		f.pass(w, r, body)
		return
	}
	if usage, _ := in["KeyUsage"].(string); usage != "SIGN_VERIFY" {
		// AWS's default usage is ENCRYPT_DECRYPT, which Ed25519 keys lack.
		writeError(w, "ValidationException", fmt.Sprintf("KeyUsage %s is not compatible with KeySpec %s", usage, specEd25519))
		return
	}
	if origin, _ := in["Origin"].(string); origin != "" && origin != "AWS_KMS" {
		writeError(w, "UnsupportedOperationException", fmt.Sprintf("KeySpec %s is not supported for Origin %s", specEd25519, origin))
		return
	}
	delete(in, "CustomerMasterKeySpec")
	in["KeySpec"] = specPlaceholder
	fwd, err := json.Marshal(in)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	a, ok := f.forwardOK(w, r, fwd)
	if !ok {
		return
	}
	out, err := decodeObject(a.body)
	md, _ := out["KeyMetadata"].(map[string]any)
	if err != nil || md == nil {
		http.Error(w, "awskmstest front: CreateKey answer without KeyMetadata", http.StatusBadGateway)
		return
	}
	id, _ := md["KeyId"].(string)
	arn, _ := md["Arn"].(string)
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	k := &edKey{arn: arn, priv: priv}
	f.mu.Lock()
	f.keys[id], f.keys[arn] = k, k
	f.mu.Unlock()
	describeAs(md)
	writeJSON(w, http.StatusOK, out)
}

// rewrite passes GetPublicKey and DescribeKey through, and makes an answer
// about an Ed25519 key say what AWS says of it.
func (f *Front) rewrite(w http.ResponseWriter, r *http.Request, body []byte) {
	a, ok := f.forwardOK(w, r, body)
	if !ok {
		return
	}
	out, err := decodeObject(a.body)
	if err != nil {
		a.write(w)
		return
	}
	if md, ok := out["KeyMetadata"].(map[string]any); ok { // DescribeKey
		arn, _ := md["Arn"].(string)
		if f.lookup(arn) == nil {
			a.write(w)
			return
		}
		describeAs(md)
		writeJSON(w, http.StatusOK, out)
		return
	}
	arn, _ := out["KeyId"].(string) // GetPublicKey names the key by ARN
	k := f.lookup(arn)
	if k == nil {
		a.write(w)
		return
	}
	spki, err := x509.MarshalPKIXPublicKey(k.priv.Public())
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	describeAs(out)
	out["PublicKey"] = spki // encoded as base64, as the wire has it
	writeJSON(w, http.StatusOK, out)
}

// resolve finds the Ed25519 key keyID names (a key id, key ARN, alias or
// alias ARN) with its metadata, or nil when it names another key or none.
// Only ids Front made and aliases cost a DescribeKey.
func (f *Front) resolve(ctx context.Context, keyID string) (*edKey, map[string]any, *answer) {
	if f.lookup(keyID) == nil && !strings.HasPrefix(keyID, "alias/") && !strings.Contains(keyID, ":alias/") {
		return nil, nil, nil
	}
	a, err := f.call(ctx, "DescribeKey", map[string]string{"KeyId": keyID})
	if err != nil || a.status != http.StatusOK {
		if f.lookup(keyID) != nil && a != nil {
			return nil, nil, a
		}
		return nil, nil, nil
	}
	out, err := decodeObject(a.body)
	md, _ := out["KeyMetadata"].(map[string]any)
	if err != nil || md == nil {
		return nil, nil, nil
	}
	arn, _ := md["Arn"].(string)
	k := f.lookup(arn)
	if k == nil {
		return nil, nil, nil
	}
	return k, md, nil
}

func (f *Front) sign(w http.ResponseWriter, r *http.Request, body []byte) {
	var in struct {
		KeyId            string
		Message          []byte
		MessageType      *string
		SigningAlgorithm string
	}
	if err := json.Unmarshal(body, &in); err != nil {
		f.pass(w, r, body)
		return
	}
	k, md, failed := f.resolve(r.Context(), in.KeyId)
	if failed != nil {
		failed.write(w)
		return
	}
	if k == nil {
		f.pass(w, r, body)
		return
	}
	// AWS checks the request's shape before the key.
	if len(in.Message) > maxRawMessage {
		writeError(w, "ValidationException", fmt.Sprintf("1 validation error detected: Value at 'message' failed to satisfy constraint: Member must have length less than or equal to %d", maxRawMessage))
		return
	}
	msgType := "RAW"
	if in.MessageType != nil {
		msgType = *in.MessageType
	}
	if msgType != "RAW" && msgType != "DIGEST" && msgType != "EXTERNAL_MU" {
		writeError(w, "ValidationException", fmt.Sprintf("1 validation error detected: Value '%s' at 'messageType' failed to satisfy constraint: Member must satisfy enum value set: [DIGEST, RAW, EXTERNAL_MU]", msgType))
		return
	}
	if md["DeletionDate"] != nil || md["KeyState"] == "PendingDeletion" {
		writeError(w, "KMSInvalidStateException", k.arn+" is pending deletion.")
		return
	}
	if enabled, _ := md["Enabled"].(bool); !enabled {
		writeError(w, "DisabledException", k.arn+" is disabled.")
		return
	}
	var sig []byte
	var err error
	switch in.SigningAlgorithm {
	case algEd25519:
		if msgType != "RAW" {
			writeError(w, "ValidationException", fmt.Sprintf("%s requires MessageType RAW", algEd25519))
			return
		}
		sig, err = k.priv.Sign(nil, in.Message, crypto.Hash(0))
	case algEd25519ph:
		if msgType != "DIGEST" {
			writeError(w, "ValidationException", fmt.Sprintf("%s requires MessageType DIGEST", algEd25519ph))
			return
		}
		if len(in.Message) != crypto.SHA512.Size() {
			writeError(w, "ValidationException", "Digest is invalid length for algorithm "+algEd25519ph+".")
			return
		}
		sig, err = k.priv.Sign(nil, in.Message, &ed25519.Options{Hash: crypto.SHA512})
	default:
		writeError(w, "InvalidKeyUsageException", fmt.Sprintf("Algorithm %s is incompatible with key spec %s.", in.SigningAlgorithm, specEd25519))
		return
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"KeyId": k.arn, "Signature": sig, "SigningAlgorithm": in.SigningAlgorithm})
}
