package pkcs11module

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/agent/devcerts"
)

// issueCertificates has a throwaway CA certify the named keys behind the
// agent, names the certificates in the agent's config (`certificates:`;
// each file holds the key's certificate, then the CA's, which the agent
// lists as its intermediate) and restarts it. It returns the certificates
// by key name and, under "", the CA's.
func (f *fixture) issueCertificates(names ...string) map[string]*x509.Certificate {
	f.t.Helper()
	ca, err := devcerts.NewCA("sigil test CA")
	if err != nil {
		f.t.Fatal(err)
	}
	certs := map[string]*x509.Certificate{"": ca.Cert}
	f.cfg.Certificates = map[string]string{}
	for _, name := range names {
		der, err := ca.Certify(f.keys[name].Public, devcerts.Leaf{CommonName: name, CodeSigning: true})
		if err != nil {
			f.t.Fatal(err)
		}
		certs[name], _ = x509.ParseCertificate(der)
		path := filepath.Join(f.dir, name+".crt")
		os.WriteFile(path, append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), ca.CertPEM...), 0o600)
		f.cfg.Certificates[name] = path
	}
	f.stop()
	f.start()
	return certs
}

// A key the config gives a certificate has a certificate object beside its
// key objects: same label and CKA_ID, the DER in CKA_VALUE, and subject,
// issuer and serial number as the certificate has them. Each intermediate
// that followed it in the file is a certificate object of its own
// (label KEY-ca1, no CKA_ID, category authority), found by its subject the
// way Java and NSS build a chain. The Go client lists the certificate too.
func TestCertificateObjects(t *testing.T) {
	f := startFixture(t, fixtureOptions{hsm: true})
	certs := f.issueCertificates("p256", "hsm-rsa")

	c := f.dial()
	defer c.Close()
	keys, err := c.ListKeys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if want := certs[k.Name]; (want == nil) != (k.Certificate == nil) || want != nil && !bytes.Equal(k.Certificate, want.Raw) {
			t.Errorf("ListKeys: %s's certificate is %d bytes", k.Name, len(k.Certificate))
		}
	}

	ctx := openModule(t)
	s := openSession(t, ctx)
	if err := ctx.FindObjectsInit(s, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_CERTIFICATE)}); err != nil {
		t.Fatal(err)
	}
	found, _, err := ctx.FindObjects(s, 10)
	ctx.FindObjectsFinal(s)
	if err != nil || len(found) != 4 {
		t.Fatalf("certificate objects: %d, %v; want 4 (2 keys' certificates, 2 intermediates)", len(found), err)
	}
	intermediates := 0
	for _, h := range found {
		// A certificate is no key (v2.40 section 5.1).
		if err := ctx.SignInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, h); ckr(err) != p11.CKR_KEY_HANDLE_INVALID {
			t.Errorf("C_SignInit on a certificate object: %v, want CKR_KEY_HANDLE_INVALID", err)
		}
		attrs, err := ctx.GetAttributeValue(s, h, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_LABEL, nil), p11.NewAttribute(p11.CKA_ID, nil), p11.NewAttribute(p11.CKA_VALUE, nil),
			p11.NewAttribute(p11.CKA_SUBJECT, nil), p11.NewAttribute(p11.CKA_ISSUER, nil), p11.NewAttribute(p11.CKA_SERIAL_NUMBER, nil),
			p11.NewAttribute(p11.CKA_CERTIFICATE_TYPE, nil), p11.NewAttribute(p11.CKA_TOKEN, nil),
			p11.NewAttribute(p11.CKA_CERTIFICATE_CATEGORY, nil),
		})
		if err != nil {
			t.Fatal(err)
		}
		label := string(attrs[0].Value)
		name, isCA := strings.CutSuffix(label, "-ca1")
		want, category := certs[name], uint(0)
		if isCA {
			want, category = certs[""], 2
			intermediates++
			if len(attrs[1].Value) != 0 {
				t.Errorf("%s: an intermediate has CKA_ID %x; it pairs with no key", label, attrs[1].Value)
			}
		}
		if want == nil {
			t.Fatalf("a certificate object labelled %q", label)
		}
		serial, _ := asn1.Marshal(want.SerialNumber)
		if !bytes.Equal(attrs[2].Value, want.Raw) || !bytes.Equal(attrs[3].Value, want.RawSubject) ||
			!bytes.Equal(attrs[4].Value, want.RawIssuer) || !bytes.Equal(attrs[5].Value, serial) ||
			!bytes.Equal(attrs[6].Value, p11.NewAttribute(p11.CKA_CERTIFICATE_TYPE, p11.CKC_X_509).Value) ||
			!bytes.Equal(attrs[7].Value, []byte{1}) ||
			!bytes.Equal(attrs[8].Value, p11.NewAttribute(p11.CKA_CERTIFICATE_CATEGORY, category).Value) {
			t.Errorf("%s: certificate object attributes differ from the certificate", label)
		}
		if isCA {
			continue
		}
		// The private key with the same CKA_ID carries the subject too.
		priv := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, name)
		pa, err := ctx.GetAttributeValue(s, priv, []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil), p11.NewAttribute(p11.CKA_SUBJECT, nil)})
		if err != nil || !bytes.Equal(pa[0].Value, attrs[1].Value) || !bytes.Equal(pa[1].Value, want.RawSubject) {
			t.Errorf("%s: private key CKA_ID/CKA_SUBJECT do not match its certificate: %v", name, err)
		}
	}
	if intermediates != 2 {
		t.Errorf("%d intermediate objects, want one per key", intermediates)
	}
	// A chain builder finds the issuer by subject: the leaf's issuer names
	// the intermediates.
	if err := ctx.FindObjectsInit(s, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_CERTIFICATE), p11.NewAttribute(p11.CKA_SUBJECT, certs["p256"].RawIssuer),
	}); err != nil {
		t.Fatal(err)
	}
	issuers, _, err := ctx.FindObjects(s, 10)
	ctx.FindObjectsFinal(s)
	if err != nil || len(issuers) != 2 {
		t.Errorf("certificates whose subject is p256's issuer: %d, %v; want the 2 intermediates", len(issuers), err)
	}
	// A key without a certificate has no certificate object and an empty
	// subject.
	priv := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "rsa")
	pa, err := ctx.GetAttributeValue(s, priv, []*p11.Attribute{p11.NewAttribute(p11.CKA_SUBJECT, nil)})
	if err != nil || len(pa[0].Value) != 0 {
		t.Errorf("rsa without a certificate: subject %x, %v", pa[0].Value, err)
	}
}

// Java's SunPKCS11 provider (keytool, jarsigner) sees a key with a
// certificate as a PrivateKeyEntry and signs a JAR through the module;
// jarsigner -verify checks the signature against the certificate.
func TestJavaJarsignerThroughTheModule(t *testing.T) {
	need(t, "keytool", "jarsigner", "jar")
	f := startFixture(t, fixtureOptions{hsm: true})
	f.issueCertificates("p256", "rsa", "hsm-p256", "hsm-rsa")
	cfg := filepath.Join(f.dir, "java-pkcs11.cfg")
	os.WriteFile(cfg, []byte("name = Sigil\nlibrary = "+modulePath(t)+"\n"), 0o600)
	provider := []string{"-storetype", "PKCS11", "-keystore", "NONE", "-storepass", "unused",
		"-providerClass", "sun.security.pkcs11.SunPKCS11", "-providerArg", cfg}

	list := run(t, nil, "keytool", append([]string{"-list"}, provider...)...)
	for _, name := range []string{"p256", "rsa", "hsm-p256", "hsm-rsa"} {
		if !strings.Contains(list, name+", PrivateKeyEntry") {
			t.Fatalf("keytool -list does not show %s as a PrivateKeyEntry:\n%s", name, list)
		}
	}
	if strings.Contains(list, "ed, ") {
		t.Errorf("a key without a certificate is listed:\n%s", list)
	}
	// Java builds each key's chain from the token: its certificate, then
	// the intermediate the module shows beside it.
	verbose := run(t, nil, "keytool", append([]string{"-list", "-v", "-alias", "p256"}, provider...)...)
	if !strings.Contains(verbose, "Certificate chain length: 2") || !strings.Contains(verbose, "CN=sigil test CA") {
		t.Errorf("keytool -list -v -alias p256 does not show the chain through the intermediate:\n%s", verbose)
	}

	payload := filepath.Join(f.dir, "payload.txt")
	os.WriteFile(payload, []byte("signed through Sigil\n"), 0o600)
	for _, tc := range []struct{ key, alg string }{
		{"p256", "SHA256withECDSA"}, {"rsa", "SHA256withRSA"}, {"hsm-p256", "SHA256withECDSA"}, {"hsm-rsa", "SHA256withRSA"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			jarFile := filepath.Join(f.dir, tc.key+".jar")
			run(t, nil, "jar", "cf", jarFile, "-C", f.dir, "payload.txt")
			run(t, nil, "jarsigner", append(append([]string{}, provider...), "-sigalg", tc.alg, jarFile, tc.key)...)
			out := run(t, nil, "jarsigner", "-verify", "-verbose", "-certs", jarFile)
			if !strings.Contains(out, "jar verified.") || !strings.Contains(out, "CN="+tc.key) {
				t.Fatalf("jarsigner -verify:\n%s", out)
			}
		})
	}
}
