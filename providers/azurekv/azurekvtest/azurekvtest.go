// Package azurekvtest is an in-process Azure Key Vault for tests: an
// httptest TLS server speaking the Key Vault REST endpoints the azkeys SDK
// uses (get-key, create-key, update-key, list-key-versions and sign),
// holding real Go keys, reached by the real
// azkeys.Client through its real challenge-based bearer authentication. The
// azurekv provider's tests, the agent's and `sigil bench` use it; nothing
// here is for production. It does not import testing (TB is the part of
// testing.TB Start uses), so the sigil binary can link it.
//
// Beside the vault, Listen serves an App Service managed-identity token
// endpoint, so that a separate process (the agent under `sigil bench`) gets
// its token the production way: azidentity's default chain, configured by
// IDENTITY_ENDPOINT and IDENTITY_HEADER.
package azurekvtest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha256" // SHA-256 for RS/PS256
	_ "crypto/sha512" // SHA-384 for RS/PS384
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
)

// Resource is the audience Key Vault tokens are for: the challenge names it,
// and the managed-identity endpoint issues tokens for it only.
const Resource = "https://vault.azure.net"

// Challenge is the WWW-Authenticate header the fake answers an
// unauthenticated request with, as Key Vault does.
const Challenge = `Bearer authorization="https://login.microsoftonline.com/tenant", resource="` + Resource + `"`

// Token is the bearer token Credential issues.
const Token = "fake-token"

// Server is an in-process Key Vault. Keys have versions; the newest version
// of a name is its current one. Faults are set per version, under Update.
type Server struct {
	mu         sync.Mutex
	keys       map[string][]*Version // name → versions, oldest first
	signs      int                   // sign requests answered, faults included
	challenges int                   // unauthenticated requests answered with 401
	gets       int                   // authenticated get-key requests answered, faults included
	identities int                   // tokens issued by the managed-identity endpoint
	creates    int                   // versions made by create-key requests

	// Set through Update. Create-key requests are carried out, and then,
	// with CreateStatus, answered with that HTTP status (and a Key Vault
	// error body) instead of the new version; with CreateStall, not
	// answered until the client gives up.
	CreateStatus int
	CreateStall  bool
	// UpdateStatus, set through Update, answers update-key requests with
	// that HTTP status (and a Key Vault error body), changing nothing.
	UpdateStatus int
	// NewVersionFault, set through Update, is applied to every version a
	// create-key request makes (under the server's lock), so a test can
	// fail a rotation after the version exists.
	NewVersionFault func(*Version)
	// ListPageSize, set through Update, splits a list-key-versions answer
	// into pages of that many versions, each but the last with a nextLink,
	// as Key Vault pages it (25 a page); 0 answers with one page.
	ListPageSize int
}

// Version is one key version.
type Version struct {
	Name    string // the key's name
	ID      string // the version id, 32 hex digits as Key Vault uses
	Signer  crypto.Signer
	Enabled bool
	Tags    map[string]string // as the create-key request set them
	// Created is the version's created attribute: when Add made it, unless
	// a test sets another (Key Vault keeps whole seconds).
	Created time.Time
	// NotBefore and Expires are the version's nbf and exp attributes (zero:
	// none). Key Vault refuses to sign outside them with a 403, as for a
	// disabled version; verify would still work.
	NotBefore, Expires time.Time
	// KeyOps are the operations the version permits (its JWK key_ops); nil
	// means every operation of its key type, as Key Vault gives a key made
	// without key_ops. A sign it does not permit is refused with a 403.
	KeyOps []string

	Delay      time.Duration // sign stalls this long (or until the client gives up)
	SignStatus int           // sign answers with this HTTP status (and a Key Vault error body)
	GetStatus  int           // get-key answers with this HTTP status
}

// Add creates a new version of key name, signing with signer, and makes it
// the current version.
func (s *Server) Add(name string, signer crypto.Signer) *Version {
	var id [16]byte
	rand.Read(id[:])
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys == nil {
		s.keys = make(map[string][]*Version)
	}
	v := &Version{Name: name, ID: hex.EncodeToString(id[:]), Signer: signer, Enabled: true, Created: time.Now()}
	s.keys[name] = append(s.keys[name], v)
	return v
}

// Update runs fn under the server's lock, for changing a Version's faults
// while requests may be in flight.
func (s *Server) Update(fn func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn()
}

// CreateCount returns how many versions create-key requests made.
func (s *Server) CreateCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.creates
}

// Versions returns key name's versions, oldest first.
func (s *Server) Versions(name string) []*Version {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*Version(nil), s.keys[name]...)
}

// SignCount is the number of authenticated sign requests answered.
func (s *Server) SignCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.signs
}

// GetKeyCount is the number of authenticated get-key requests answered.
func (s *Server) GetKeyCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gets
}

// Challenges is the number of unauthenticated requests answered with a 401
// challenge.
func (s *Server) Challenges() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.challenges
}

// lookup finds a version; version "" is the current one.
func (s *Server) lookup(name, version string) *Version {
	vs := s.keys[name]
	if len(vs) == 0 {
		return nil
	}
	if version == "" {
		return vs[len(vs)-1]
	}
	for _, v := range vs {
		if v.ID == version {
			return v
		}
	}
	return nil
}

// TB is the part of testing.TB Start uses; *testing.T and *testing.B
// satisfy it.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
}

// Start serves the vault on a loopback TLS listener until the test ends. It
// returns the vault URL, client options whose transport trusts the server's
// certificate (with challenge resource verification off, as the server is
// not under vault.azure.net), and a static credential.
func (s *Server) Start(t TB) (vaultURL string, opts *azkeys.ClientOptions, cred azcore.TokenCredential) {
	t.Helper()
	v, err := s.Listen()
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(v.Close)
	return v.URL, v.ClientOptions(), Credential{}
}

// Vault is a Server listening on loopback: the vault over TLS and its
// managed-identity token endpoint over plain HTTP, as App Service serves its
// own on the host.
type Vault struct {
	URL string // https://127.0.0.1:PORT/
	// CertPEM is the vault's self-signed certificate, made for this Listen
	// (its key is nowhere else): the root a separate process trusts it by,
	// e.g. through SSL_CERT_FILE.
	CertPEM []byte
	// IdentityEndpoint and IdentityHeader are what App Service puts in
	// IDENTITY_ENDPOINT and IDENTITY_HEADER: the endpoint issues Token, for
	// Resource only, to a caller sending IdentityHeader in X-IDENTITY-HEADER.
	IdentityEndpoint string
	IdentityHeader   string

	vault, identity *httptest.Server
}

// Env is the environment that points azidentity's default chain at the
// managed-identity endpoint (and at it alone, through AZURE_TOKEN_CREDENTIALS).
func (v *Vault) Env() []string {
	return []string{
		"IDENTITY_ENDPOINT=" + v.IdentityEndpoint,
		"IDENTITY_HEADER=" + v.IdentityHeader,
		"AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential",
	}
}

// ClientOptions reach the vault from this process: a transport trusting its
// certificate, and challenge resource verification off, as the vault is not
// under vault.azure.net.
func (v *Vault) ClientOptions() *azkeys.ClientOptions {
	return &azkeys.ClientOptions{
		ClientOptions:                        azcore.ClientOptions{Transport: v.vault.Client()},
		DisableChallengeResourceVerification: true,
	}
}

// Close stops both listeners.
func (v *Vault) Close() {
	v.vault.Close()
	v.identity.Close()
}

// Listen serves the vault and its managed-identity endpoint on loopback
// until Close. Unlike httptest.NewTLSServer it returns an error rather than
// panicking, and the TLS certificate is made here rather than httptest's
// shared one, whose key is public.
func (s *Server) Listen() (*Vault, error) {
	cert, certPEM, err := loopbackCertificate()
	if err != nil {
		return nil, fmt.Errorf("azurekvtest: certificate: %w", err)
	}
	var secret [16]byte
	rand.Read(secret[:])
	header := hex.EncodeToString(secret[:])
	vl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("azurekvtest: listen: %w", err)
	}
	il, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		vl.Close()
		return nil, fmt.Errorf("azurekvtest: listen: %w", err)
	}
	v := &Vault{
		CertPEM:        certPEM,
		IdentityHeader: header,
		vault: &httptest.Server{
			Listener: vl,
			Config:   &http.Server{Handler: http.HandlerFunc(s.serveHTTP)},
			TLS:      &tls.Config{Certificates: []tls.Certificate{cert}},
		},
		identity: &httptest.Server{Listener: il, Config: &http.Server{Handler: s.identityHandler(header)}},
	}
	v.vault.StartTLS()
	v.identity.Start()
	v.URL = v.vault.URL + "/"
	v.IdentityEndpoint = v.identity.URL + "/msi/token"
	return v, nil
}

// loopbackCertificate makes a self-signed ECDSA P-256 certificate for
// 127.0.0.1 and ::1, valid for a day.
func loopbackCertificate() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "azurekvtest vault"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true, // it is its own root
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

// IdentityTokens is the number of tokens the managed-identity endpoint issued.
func (s *Server) IdentityTokens() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.identities
}

// identityHandler answers as App Service's managed-identity endpoint does
// (api-version 2019-08-01): GET with the secret header, the resource in the
// query, a token and its expiry in seconds since the epoch as a string.
func (s *Server) identityHandler(header string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		switch {
		case r.Method != http.MethodGet || r.URL.Path != "/msi/token":
			http.Error(w, "no such endpoint", http.StatusNotFound)
			return
		case r.Header.Get("X-IDENTITY-HEADER") != header:
			http.Error(w, "missing or wrong X-IDENTITY-HEADER", http.StatusUnauthorized)
			return
		case q.Get("api-version") != "2019-08-01":
			http.Error(w, "api-version 2019-08-01 required", http.StatusBadRequest)
			return
		case q.Get("resource") != Resource:
			http.Error(w, "no identity for resource "+q.Get("resource"), http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		s.identities++
		s.mu.Unlock()
		writeJSON(w, map[string]string{
			"access_token": Token,
			"expires_on":   strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10),
			"resource":     Resource,
			"token_type":   "Bearer",
			"client_id":    "00000000-0000-0000-0000-00000000a2b0",
		})
	})
}

// Credential is a static azcore.TokenCredential issuing Token.
type Credential struct{}

// GetToken implements azcore.TokenCredential.
func (Credential) GetToken(_ context.Context, o policy.TokenRequestOptions) (azcore.AccessToken, error) {
	if len(o.Scopes) != 1 || o.Scopes[0] != "https://vault.azure.net/.default" || o.TenantID != "tenant" {
		return azcore.AccessToken{}, fmt.Errorf("azurekvtest: token for scopes %v tenant %q, want the challenge's", o.Scopes, o.TenantID)
	}
	return azcore.AccessToken{Token: Token, ExpiresOn: time.Now().Add(time.Hour)}, nil
}

type kvError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	var e kvError
	e.Error.Code, e.Error.Message = code, msg
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	switch status {
	case http.StatusTooManyRequests:
		w.Header().Set("Retry-After", "1")
	case http.StatusUnauthorized:
		// Key Vault challenges every 401, a rejected token included; the SDK
		// then fetches a fresh token and tries once more.
		w.Header().Set("WWW-Authenticate", Challenge)
	}
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(e)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	json.NewEncoder(w).Encode(v)
}

// codeFor is the error code Key Vault sends with an HTTP status.
func codeFor(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "BadParameter"
	case http.StatusUnauthorized:
		return "Unauthorized"
	case http.StatusForbidden:
		return "Forbidden"
	case http.StatusNotFound:
		return "KeyNotFound"
	case http.StatusTooManyRequests:
		return "Throttled"
	case http.StatusServiceUnavailable:
		return "ServiceUnavailable"
	}
	return "InternalServerError"
}

var b64 = base64.RawURLEncoding

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("api-version") == "" {
		writeError(w, http.StatusBadRequest, "BadParameter", "api-version is required")
		return
	}
	// The SDK's first request carries no token and no body; Key Vault answers
	// it with a challenge naming the tenant and the resource to get a token for.
	if r.Header.Get("Authorization") != "Bearer "+Token {
		s.mu.Lock()
		s.challenges++
		s.mu.Unlock()
		writeError(w, http.StatusUnauthorized, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
	switch {
	case r.Method == http.MethodGet && len(parts) == 3 && parts[0] == "keys" && parts[1] != "" && parts[2] == "versions":
		s.listVersions(w, r, parts[1])
	case r.Method == http.MethodPatch && len(parts) == 3 && parts[0] == "keys" && parts[1] != "" && parts[2] != "":
		s.updateKey(w, r, parts[1], parts[2])
	case r.Method == http.MethodGet && len(parts) >= 2 && len(parts) <= 3 && parts[0] == "keys" && parts[1] != "":
		version := ""
		if len(parts) == 3 {
			version = parts[2]
		}
		s.getKey(w, r, parts[1], version)
	case r.Method == http.MethodPost && len(parts) == 3 && parts[0] == "keys" && parts[2] == "create" && parts[1] != "":
		s.createKey(w, r, parts[1])
	case r.Method == http.MethodPost && len(parts) == 4 && parts[0] == "keys" && parts[3] == "sign" && parts[1] != "" && parts[2] != "":
		s.sign(w, r, parts[1], parts[2])
	default:
		writeError(w, http.StatusNotFound, "NotFound", "no such endpoint")
	}
}

func kid(r *http.Request, v *Version) string {
	return "https://" + r.Host + "/keys/" + v.Name + "/" + v.ID
}

func (s *Server) getKey(w http.ResponseWriter, r *http.Request, name, version string) {
	s.mu.Lock()
	s.gets++
	v := s.lookup(name, version)
	var status int
	var attrs versionAttrs
	if v != nil {
		status, attrs = v.GetStatus, v.attrs()
	}
	s.mu.Unlock()
	if v == nil {
		writeError(w, http.StatusNotFound, "KeyNotFound", "A key with (name/id) "+name+" was not found in this key vault.")
		return
	}
	if status != 0 {
		writeError(w, status, codeFor(status), "injected fault")
		return
	}
	writeBundle(w, r, v, attrs)
}

// versionAttrs are what a key bundle says of a version beside its public
// key, copied under the server's lock.
type versionAttrs struct {
	enabled                     bool
	created, notBefore, expires time.Time
	keyOps                      []string
}

func (v *Version) attrs() versionAttrs {
	return versionAttrs{enabled: v.Enabled, created: v.Created, notBefore: v.NotBefore, expires: v.Expires, keyOps: append([]string(nil), v.KeyOps...)}
}

// json is the attributes object Key Vault sends for a version: times in
// seconds since the epoch, nbf and exp only when set.
func (a versionAttrs) json() map[string]any {
	attributes := map[string]any{"enabled": a.enabled, "created": a.created.Unix(), "updated": a.created.Unix(), "recoveryLevel": "Recoverable+Purgeable"}
	if !a.notBefore.IsZero() {
		attributes["nbf"] = a.notBefore.Unix()
	}
	if !a.expires.IsZero() {
		attributes["exp"] = a.expires.Unix()
	}
	return attributes
}

// createKey makes a new version of key name (a new key if there is none)
// holding a fresh Go key of the requested kty and crv or key_size, and
// answers with its key bundle, as Key Vault does.
func (s *Server) createKey(w http.ResponseWriter, r *http.Request, name string) {
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		writeError(w, http.StatusBadRequest, "BadParameter", "content type "+ct)
		return
	}
	var req struct {
		Kty     string            `json:"kty"`
		Crv     string            `json:"crv"`
		KeySize int               `json:"key_size"`
		KeyOps  []string          `json:"key_ops"`
		Tags    map[string]string `json:"tags"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "malformed body")
		return
	}
	var signer crypto.Signer
	var err error
	switch req.Kty {
	case "EC", "EC-HSM":
		var curve elliptic.Curve
		switch req.Crv {
		case "P-256", "":
			curve = elliptic.P256()
		case "P-384":
			curve = elliptic.P384()
		case "P-521":
			curve = elliptic.P521()
		default:
			writeError(w, http.StatusBadRequest, "BadParameter", "unsupported curve "+req.Crv)
			return
		}
		signer, err = ecdsa.GenerateKey(curve, rand.Reader)
	case "RSA", "RSA-HSM":
		size := req.KeySize
		if size == 0 {
			size = 2048
		}
		if size != 2048 && size != 3072 && size != 4096 {
			writeError(w, http.StatusBadRequest, "BadParameter", fmt.Sprintf("unsupported key size %d", size))
			return
		}
		signer, err = rsa.GenerateKey(rand.Reader, size)
	default:
		writeError(w, http.StatusBadRequest, "BadParameter", "unsupported kty "+req.Kty)
		return
	}
	if err != nil {
		writeError(w, http.StatusInternalServerError, "InternalServerError", err.Error())
		return
	}
	v := s.Add(name, signer)
	s.mu.Lock()
	v.Tags = req.Tags
	v.KeyOps = req.KeyOps
	if s.NewVersionFault != nil {
		s.NewVersionFault(v)
	}
	s.creates++
	status, stall := s.CreateStatus, s.CreateStall
	attrs := v.attrs()
	s.mu.Unlock()
	switch {
	case stall:
		<-r.Context().Done()
		return
	case status != 0:
		writeError(w, status, codeFor(status), "injected fault")
		return
	}
	writeBundle(w, r, v, attrs)
}

// listVersions answers with the properties of key name's versions, as Key
// Vault's list-key-versions does: kid, attributes (enabled, created, nbf,
// exp) and tags, no key material; ListPageSize versions a page when set,
// the next page's link carrying the offset.
func (s *Server) listVersions(w http.ResponseWriter, r *http.Request, name string) {
	skip, _ := strconv.Atoi(r.URL.Query().Get("$skiptoken"))
	s.mu.Lock()
	vs, size := s.keys[name], s.ListPageSize
	if skip < 0 || skip > len(vs) {
		skip = len(vs)
	}
	vs = vs[skip:]
	var next any
	if size > 0 && len(vs) > size {
		vs = vs[:size]
		q := url.Values{"api-version": {r.URL.Query().Get("api-version")}, "$skiptoken": {strconv.Itoa(skip + size)}}
		next = "https://" + r.Host + r.URL.Path + "?" + q.Encode()
	}
	items := []map[string]any{}
	for _, v := range vs {
		items = append(items, map[string]any{
			"kid":        kid(r, v),
			"attributes": v.attrs().json(),
			"tags":       v.Tags,
		})
	}
	s.mu.Unlock()
	writeJSON(w, map[string]any{"value": items, "nextLink": next})
}

// updateKey applies an update-key request's enabled attribute to a version.
func (s *Server) updateKey(w http.ResponseWriter, r *http.Request, name, version string) {
	var req struct {
		Attributes *struct {
			Enabled *bool `json:"enabled"`
		} `json:"attributes"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "malformed body")
		return
	}
	s.mu.Lock()
	if status := s.UpdateStatus; status != 0 {
		s.mu.Unlock()
		writeError(w, status, codeFor(status), "injected fault")
		return
	}
	v := s.lookup(name, version)
	if v != nil && req.Attributes != nil && req.Attributes.Enabled != nil {
		v.Enabled = *req.Attributes.Enabled
	}
	var attrs versionAttrs
	if v != nil {
		attrs = v.attrs()
	}
	s.mu.Unlock()
	if v == nil {
		writeError(w, http.StatusNotFound, "KeyNotFound", "A key with (name/id) "+name+" was not found in this key vault.")
		return
	}
	writeBundle(w, r, v, attrs)
}

// writeBundle answers with v's KeyBundle: its JWK public key and attributes.
func writeBundle(w http.ResponseWriter, r *http.Request, v *Version, a versionAttrs) {
	key := map[string]any{"kid": kid(r, v)}
	switch pub := v.Signer.Public().(type) {
	case *ecdsa.PublicKey:
		n := (pub.Curve.Params().BitSize + 7) / 8
		point, err := pub.Bytes()
		if err != nil {
			writeError(w, http.StatusInternalServerError, "InternalServerError", err.Error())
			return
		}
		key["kty"] = "EC"
		key["crv"] = pub.Curve.Params().Name
		key["x"] = b64.EncodeToString(point[1 : 1+n])
		key["y"] = b64.EncodeToString(point[1+n:])
		key["key_ops"] = []string{"sign", "verify"}
	case *rsa.PublicKey:
		key["kty"] = "RSA"
		key["n"] = b64.EncodeToString(pub.N.Bytes())
		key["e"] = b64.EncodeToString(bigEndian(pub.E))
		key["key_ops"] = []string{"sign", "verify", "encrypt", "decrypt", "wrapKey", "unwrapKey"}
	default:
		writeError(w, http.StatusInternalServerError, "InternalServerError", "unsupported test key")
		return
	}
	if a.keyOps != nil {
		key["key_ops"] = a.keyOps
	}
	writeJSON(w, map[string]any{"key": key, "attributes": a.json()})
}

func bigEndian(e int) []byte {
	var out []byte
	for ; e > 0; e >>= 8 {
		out = append([]byte{byte(e)}, out...)
	}
	return out
}

func (s *Server) sign(w http.ResponseWriter, r *http.Request, name, version string) {
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		writeError(w, http.StatusBadRequest, "BadParameter", "content type "+ct)
		return
	}
	var req struct {
		Alg   string `json:"alg"`
		Value string `json:"value"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "malformed body")
		return
	}
	digest, err := b64.DecodeString(req.Value)
	if err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", "value is not base64url")
		return
	}
	s.mu.Lock()
	v := s.lookup(name, version)
	if v == nil {
		s.mu.Unlock()
		writeError(w, http.StatusNotFound, "KeyNotFound", "A key with (name/id) "+name+"/"+version+" was not found in this key vault.")
		return
	}
	s.signs++
	delay, status, attrs := v.Delay, v.SignStatus, v.attrs()
	s.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if status != 0 {
		writeError(w, status, codeFor(status), "injected fault")
		return
	}
	now := time.Now()
	switch {
	case !attrs.enabled:
		writeError(w, http.StatusForbidden, "Forbidden", "Operation sign is not allowed on a disabled key.")
		return
	case !attrs.notBefore.IsZero() && now.Before(attrs.notBefore), !attrs.expires.IsZero() && !now.Before(attrs.expires):
		writeError(w, http.StatusForbidden, "Forbidden", "Operation sign is not allowed outside the key's validity period.")
		return
	case attrs.keyOps != nil && !slices.Contains(attrs.keyOps, "sign"):
		writeError(w, http.StatusForbidden, "Forbidden", "Operation sign is not permitted on this key.")
		return
	}
	sig, err := signWith(v.Signer, req.Alg, digest)
	if err != nil {
		writeError(w, http.StatusBadRequest, "BadParameter", err.Error())
		return
	}
	writeJSON(w, map[string]string{"kid": kid(r, v), "value": b64.EncodeToString(sig)})
}

// signWith signs as Key Vault does: ECDSA as raw r‖s of fixed width, RSA-PSS
// with a salt as long as the digest. The algorithm must suit the key: an EC
// curve takes only its own hash.
func signWith(signer crypto.Signer, alg string, digest []byte) ([]byte, error) {
	var h crypto.Hash
	switch alg[len(alg)-3:] {
	case "256":
		h = crypto.SHA256
	case "384":
		h = crypto.SHA384
	case "512":
		h = crypto.SHA512
	default:
		return nil, fmt.Errorf("algorithm %q", alg)
	}
	if len(digest) != h.Size() {
		return nil, fmt.Errorf("digest of %d bytes for %s", len(digest), alg)
	}
	switch pub := signer.Public().(type) {
	case *ecdsa.PublicKey:
		want := map[string]string{"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}[pub.Curve.Params().Name]
		if alg != want {
			return nil, fmt.Errorf("algorithm %s on curve %s", alg, pub.Curve.Params().Name)
		}
		der, err := signer.Sign(rand.Reader, digest, h)
		if err != nil {
			return nil, err
		}
		return derToRaw(der, (pub.Curve.Params().BitSize+7)/8)
	case *rsa.PublicKey:
		switch alg[:2] {
		case "RS":
			return signer.Sign(rand.Reader, digest, h)
		case "PS":
			return signer.Sign(rand.Reader, digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: h})
		}
		return nil, fmt.Errorf("algorithm %s on an RSA key", alg)
	}
	return nil, fmt.Errorf("unsupported test key %T", signer.Public())
}

// derToRaw converts an ASN.1 DER ECDSA signature to r‖s, each left-padded
// to n bytes, as JOSE and Key Vault encode it.
func derToRaw(der []byte, n int) ([]byte, error) {
	var sig struct{ R, S *big.Int }
	if rest, err := asn1.Unmarshal(der, &sig); err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("ecdsa signature is not DER")
	}
	out := make([]byte, 2*n)
	sig.R.FillBytes(out[:n])
	sig.S.FillBytes(out[n:])
	return out, nil
}
