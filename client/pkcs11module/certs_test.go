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
// agent, names the certificates in the agent's config (`certificates:`)
// and restarts it. It returns the certificates.
func (f *fixture) issueCertificates(names ...string) map[string]*x509.Certificate {
	f.t.Helper()
	ca, err := devcerts.NewCA("sigil test CA")
	if err != nil {
		f.t.Fatal(err)
	}
	certs := map[string]*x509.Certificate{}
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
// issuer and serial number as the certificate has them. The Go client
// lists the certificate too.
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
	if err != nil || len(found) != 2 {
		t.Fatalf("certificate objects: %d, %v; want 2", len(found), err)
	}
	for _, h := range found {
		attrs, err := ctx.GetAttributeValue(s, h, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_LABEL, nil), p11.NewAttribute(p11.CKA_ID, nil), p11.NewAttribute(p11.CKA_VALUE, nil),
			p11.NewAttribute(p11.CKA_SUBJECT, nil), p11.NewAttribute(p11.CKA_ISSUER, nil), p11.NewAttribute(p11.CKA_SERIAL_NUMBER, nil),
			p11.NewAttribute(p11.CKA_CERTIFICATE_TYPE, nil), p11.NewAttribute(p11.CKA_TOKEN, nil),
		})
		if err != nil {
			t.Fatal(err)
		}
		name := string(attrs[0].Value)
		want := certs[name]
		if want == nil {
			t.Fatalf("a certificate object labelled %q", name)
		}
		serial, _ := asn1.Marshal(want.SerialNumber)
		if !bytes.Equal(attrs[2].Value, want.Raw) || !bytes.Equal(attrs[3].Value, want.RawSubject) ||
			!bytes.Equal(attrs[4].Value, want.RawIssuer) || !bytes.Equal(attrs[5].Value, serial) ||
			!bytes.Equal(attrs[6].Value, p11.NewAttribute(p11.CKA_CERTIFICATE_TYPE, p11.CKC_X_509).Value) ||
			!bytes.Equal(attrs[7].Value, []byte{1}) {
			t.Errorf("%s: certificate object attributes differ from the certificate", name)
		}
		// The private key with the same CKA_ID carries the subject too.
		priv := findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, name)
		pa, err := ctx.GetAttributeValue(s, priv, []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil), p11.NewAttribute(p11.CKA_SUBJECT, nil)})
		if err != nil || !bytes.Equal(pa[0].Value, attrs[1].Value) || !bytes.Equal(pa[1].Value, want.RawSubject) {
			t.Errorf("%s: private key CKA_ID/CKA_SUBJECT do not match its certificate: %v", name, err)
		}
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
