/*
 * keys.c: the PKCS#11 objects of one agent key, built from its ListKeys
 * entry (name, kid, DER SubjectPublicKeyInfo, and the DER certificate when
 * the agent has one).
 */
#include "sigil.h"

#include <openssl/asn1.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int attr_add(sg_attrs *a, CK_ATTRIBUTE_TYPE t, const void *v, size_t n)
{
	if (a->n == a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 32;
		sg_attr *nv = realloc(a->v, cap * sizeof *nv);
		if (!nv)
			return -1;
		a->v = nv;
		a->cap = cap;
	}
	uint8_t *copy = malloc(n ? n : 1);
	if (!copy)
		return -1;
	if (n)
		memcpy(copy, v, n);
	a->v[a->n++] = (sg_attr){t, (CK_ULONG)n, copy};
	return 0;
}

static int add_ulong(sg_attrs *a, CK_ATTRIBUTE_TYPE t, CK_ULONG v) { return attr_add(a, t, &v, sizeof v); }
static int add_bool(sg_attrs *a, CK_ATTRIBUTE_TYPE t, CK_BBOOL v) { return attr_add(a, t, &v, sizeof v); }

const sg_attr *sg_attrs_find(const sg_attrs *a, CK_ATTRIBUTE_TYPE t)
{
	for (size_t i = 0; i < a->n; i++)
		if (a->v[i].type == t)
			return &a->v[i];
	return NULL;
}

/* Private key attributes that hold key material: the agent never has it to
 * give, and a client asking is told CKR_ATTRIBUTE_SENSITIVE. Only those of
 * the key's own type (v2.40 curr. mechs. sections 2.1.3, 2.3.4; EdDSA as
 * EC): another type's, such as CKA_PRIME_1 of an EC key, is an attribute
 * the key does not have, CKR_ATTRIBUTE_TYPE_INVALID (v2.40 section 5.7,
 * C_GetAttributeValue's case 2), so a host that probes for one learns what
 * the key is not. */
int sg_attr_sensitive(int family, CK_ATTRIBUTE_TYPE t)
{
	if (family == SG_FAM_RSA) {
		switch (t) {
		case CKA_PRIVATE_EXPONENT: case CKA_PRIME_1: case CKA_PRIME_2:
		case CKA_EXPONENT_1: case CKA_EXPONENT_2: case CKA_COEFFICIENT:
			return 1;
		}
		return 0;
	}
	return t == CKA_VALUE;
}

static void attrs_free(sg_attrs *a)
{
	for (size_t i = 0; i < a->n; i++)
		free(a->v[i].val);
	free(a->v);
	memset(a, 0, sizeof *a);
}

void sg_key_free(sg_key *k)
{
	if (!k)
		return;
	free(k->name);
	free(k->kid);
	attrs_free(&k->priv);
	attrs_free(&k->pub);
	attrs_free(&k->cert);
	free(k->cert_der);
	for (int i = 0; i < SG_MAX_CHAIN; i++) {
		attrs_free(&k->chain[i]);
		free(k->chain_der[i]);
	}
	free(k);
}

static char *dup_bytes(sg_bytes b)
{
	char *s = malloc(b.n + 1);
	if (s) {
		if (b.n) /* b.p may be NULL for an absent field; memcpy must not see it */
			memcpy(s, b.p, b.n);
		s[b.n] = 0;
	}
	return s;
}

static int hexval(int c)
{
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	if (c >= 'A' && c <= 'F') return c - 'A' + 10;
	return -1;
}

/* CKA_ID is the kid: its hex decoded (16 bytes for the agent's kids), or
 * the kid's bytes as they are when it is not hex. */
static size_t kid_to_id(sg_bytes kid, uint8_t *out, size_t cap)
{
	if (kid.n % 2 == 0 && kid.n / 2 <= cap) {
		size_t i;
		for (i = 0; i < kid.n / 2; i++) {
			int hi = hexval(kid.p[2 * i]), lo = hexval(kid.p[2 * i + 1]);
			if (hi < 0 || lo < 0)
				break;
			out[i] = (uint8_t)(hi << 4 | lo);
		}
		if (i == kid.n / 2)
			return i;
	}
	size_t n = kid.n < cap ? kid.n : cap;
	memcpy(out, kid.p, n);
	return n;
}

/* DER OIDs for CKA_EC_PARAMS (namedCurve), as SoftHSM2 and OpenSC write them. */
static const uint8_t oid_p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
static const uint8_t oid_p384[] = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22};
static const uint8_t oid_ed25519[] = {0x06, 0x03, 0x2b, 0x65, 0x70};

/* DER OCTET STRING around a point of fewer than 128 bytes, the CKA_EC_POINT
 * encoding OpenSSH, OpenSC and libp11 read. */
static int add_ec_point(sg_attrs *a, const uint8_t *pt, size_t n)
{
	uint8_t buf[2 + 127];
	if (n > 127)
		return -1;
	buf[0] = 0x04;
	buf[1] = (uint8_t)n;
	memcpy(buf + 2, pt, n);
	return attr_add(a, CKA_EC_POINT, buf, n + 2);
}

static const CK_MECHANISM_TYPE ec_mechs[] = {CKM_ECDSA, CKM_ECDSA_SHA256, CKM_ECDSA_SHA384, CKM_ECDSA_SHA512};
static const CK_MECHANISM_TYPE rsa_mechs[] = {
	CKM_RSA_PKCS, CKM_SHA256_RSA_PKCS, CKM_SHA384_RSA_PKCS, CKM_SHA512_RSA_PKCS,
	CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS, CKM_SHA384_RSA_PKCS_PSS, CKM_SHA512_RSA_PKCS_PSS,
};
static const CK_MECHANISM_TYPE ed_mechs[] = {CKM_EDDSA};

/* object_common adds what every object has: a read-only token object with
 * a label and CKA_ID (the key's for its own objects: how programs pair a
 * key's objects), no dates, and a subject (the certificate's; empty for a
 * key without one). */
static int object_common(sg_attrs *a, const char *label, size_t labeln, const uint8_t *id, size_t idn, sg_bytes subject)
{
	int rc = 0;
	rc |= add_bool(a, CKA_TOKEN, CK_TRUE);
	/* Access control is the agent's, by socket peer: the objects are
	 * visible without C_Login, so they do not claim to be private. */
	rc |= add_bool(a, CKA_PRIVATE, CK_FALSE);
	rc |= add_bool(a, CKA_MODIFIABLE, CK_FALSE);
	rc |= add_bool(a, CKA_COPYABLE, CK_FALSE);
	rc |= add_bool(a, CKA_DESTROYABLE, CK_FALSE);
	rc |= attr_add(a, CKA_LABEL, label, labeln);
	rc |= attr_add(a, CKA_ID, id, idn);
	rc |= attr_add(a, CKA_START_DATE, "", 0);
	rc |= attr_add(a, CKA_END_DATE, "", 0);
	rc |= attr_add(a, CKA_SUBJECT, subject.p, subject.n);
	return rc;
}

/* The attributes both key objects share, then each object's own. subject
 * is the certificate's subject (DER Name), empty without one. */
static int common(sg_attrs *a, CK_OBJECT_CLASS cls, CK_KEY_TYPE kt, const sg_key *k, const uint8_t *id, size_t idn, sg_bytes spki, sg_bytes subject)
{
	int rc = 0;
	rc |= add_ulong(a, CKA_CLASS, cls);
	rc |= add_ulong(a, CKA_KEY_TYPE, kt);
	rc |= object_common(a, k->name, k->name_len, id, idn, subject);
	rc |= add_bool(a, CKA_DERIVE, CK_FALSE);
	rc |= add_bool(a, CKA_LOCAL, CK_FALSE);
	/* Not known here: the key was made, or imported, behind the agent. */
	rc |= add_ulong(a, CKA_KEY_GEN_MECHANISM, CK_UNAVAILABLE_INFORMATION);
	rc |= attr_add(a, CKA_PUBLIC_KEY_INFO, spki.p, spki.n);
	const CK_MECHANISM_TYPE *m = k->family == SG_FAM_EC ? ec_mechs : k->family == SG_FAM_RSA ? rsa_mechs : ed_mechs;
	size_t nm = k->family == SG_FAM_EC ? sizeof ec_mechs : k->family == SG_FAM_RSA ? sizeof rsa_mechs : sizeof ed_mechs;
	rc |= attr_add(a, CKA_ALLOWED_MECHANISMS, m, nm);
	if (cls == CKO_PRIVATE_KEY) {
		rc |= add_bool(a, CKA_SENSITIVE, CK_TRUE);
		rc |= add_bool(a, CKA_ALWAYS_SENSITIVE, CK_TRUE);
		rc |= add_bool(a, CKA_EXTRACTABLE, CK_FALSE);
		rc |= add_bool(a, CKA_NEVER_EXTRACTABLE, CK_TRUE);
		rc |= add_bool(a, CKA_SIGN, CK_TRUE);
		rc |= add_bool(a, CKA_SIGN_RECOVER, CK_FALSE);
		rc |= add_bool(a, CKA_DECRYPT, CK_FALSE);
		rc |= add_bool(a, CKA_UNWRAP, CK_FALSE);
		rc |= add_bool(a, CKA_WRAP_WITH_TRUSTED, CK_FALSE);
		rc |= attr_add(a, CKA_UNWRAP_TEMPLATE, "", 0); /* an empty template: no unwrapping */
		rc |= add_bool(a, CKA_ALWAYS_AUTHENTICATE, CK_FALSE);
	} else {
		rc |= add_bool(a, CKA_VERIFY, CK_TRUE);
		rc |= add_bool(a, CKA_VERIFY_RECOVER, CK_FALSE);
		rc |= add_bool(a, CKA_ENCRYPT, CK_FALSE);
		rc |= add_bool(a, CKA_WRAP, CK_FALSE);
		rc |= add_bool(a, CKA_TRUSTED, CK_FALSE);
		rc |= attr_add(a, CKA_WRAP_TEMPLATE, "", 0);
	}
	return rc ? -1 : 0;
}

/* tlv reads one DER element's header at *p: its tag and class, the start of
 * the whole element (header included) in *el and its end in *elend; *p is
 * left at its contents. */
static int tlv(const unsigned char **p, const unsigned char *end, int *tag, int *cls, const unsigned char **el, const unsigned char **elend)
{
	long len;
	*el = *p;
	if (*p >= end || ASN1_get_object(p, &len, tag, cls, end - *p) & 0x80 || len < 0 || len > end - *p)
		return -1;
	*elend = *p + len;
	return 0;
}

/* cert_parts finds the serial number, issuer and subject (each a whole DER
 * element) in a DER X.509 certificate by walking its TBSCertificate, without
 * decoding the key (see sg_key_build on why). */
static int cert_parts(sg_bytes der, sg_bytes *serial, sg_bytes *issuer, sg_bytes *subject)
{
	const unsigned char *p = der.p, *end = der.p + der.n, *el, *elend;
	int tag, cls;
	if (tlv(&p, end, &tag, &cls, &el, &elend) || tag != V_ASN1_SEQUENCE || elend != end) /* Certificate */
		return -1;
	if (tlv(&p, end, &tag, &cls, &el, &elend) || tag != V_ASN1_SEQUENCE) /* TBSCertificate */
		return -1;
	end = elend;
	if (tlv(&p, end, &tag, &cls, &el, &elend))
		return -1;
	if (cls == V_ASN1_CONTEXT_SPECIFIC && tag == 0) { /* [0] version */
		p = elend;
		if (tlv(&p, end, &tag, &cls, &el, &elend))
			return -1;
	}
	if (tag != V_ASN1_INTEGER || cls != V_ASN1_UNIVERSAL)
		return -1;
	*serial = (sg_bytes){el, (size_t)(elend - el)};
	p = elend;
	sg_bytes *names[] = {NULL, issuer, NULL, subject}; /* signature, issuer, validity, subject */
	for (int i = 0; i < 4; i++) {
		if (tlv(&p, end, &tag, &cls, &el, &elend) || tag != V_ASN1_SEQUENCE || cls != V_ASN1_UNIVERSAL)
			return -1;
		if (names[i])
			*names[i] = (sg_bytes){el, (size_t)(elend - el)};
		p = elend;
	}
	return 0;
}

/* cert_object builds a certificate object. The key's own has the key's
 * label and CKA_ID, which is how Java's SunPKCS11 keystore and NSS pair a key
 * with its certificate; an intermediate has its own label, no CKA_ID (it
 * pairs with no key) and category "authority": programs building a chain
 * find it by CKA_SUBJECT. */
static int cert_object(sg_attrs *a, const char *label, size_t labeln, const uint8_t *id, size_t idn, CK_ULONG category, sg_bytes der)
{
	sg_bytes serial, issuer, subject;
	if (cert_parts(der, &serial, &issuer, &subject))
		return -1;
	int rc = 0;
	rc |= add_ulong(a, CKA_CLASS, CKO_CERTIFICATE);
	rc |= add_ulong(a, CKA_CERTIFICATE_TYPE, CKC_X_509);
	rc |= object_common(a, label, labeln, id, idn, subject);
	rc |= add_bool(a, CKA_TRUSTED, CK_FALSE);
	rc |= add_ulong(a, CKA_CERTIFICATE_CATEGORY, category);
	rc |= add_ulong(a, CKA_JAVA_MIDP_SECURITY_DOMAIN, 0);
	rc |= attr_add(a, CKA_URL, "", 0);
	rc |= attr_add(a, CKA_ISSUER, issuer.p, issuer.n);
	rc |= attr_add(a, CKA_SERIAL_NUMBER, serial.p, serial.n);
	rc |= attr_add(a, CKA_VALUE, der.p, der.n);
	return rc ? -1 : 0;
}

/* der_integer reads one DER INTEGER's magnitude (leading zero dropped). */
static int der_integer(const unsigned char **p, long avail, const uint8_t **v, size_t *n)
{
	long len;
	int tag, cls;
	if (ASN1_get_object(p, &len, &tag, &cls, avail) & 0x80 || tag != V_ASN1_INTEGER || cls != V_ASN1_UNIVERSAL || len <= 0)
		return -1;
	*v = *p;
	*n = (size_t)len;
	*p += len;
	while (*n > 1 && **v == 0) {
		(*v)++;
		(*n)--;
	}
	return 0;
}

/* rsa_parts splits DER RSAPublicKey (RFC 8017 A.1.1) into n and e. */
static int rsa_parts(const uint8_t *der, size_t dn, const uint8_t **mod, size_t *modn, const uint8_t **exp, size_t *expn)
{
	const unsigned char *p = der, *end = der + dn;
	long len;
	int tag, cls;
	if (ASN1_get_object(&p, &len, &tag, &cls, (long)dn) & 0x80 || tag != V_ASN1_SEQUENCE || p + len != end)
		return -1;
	if (der_integer(&p, end - p, mod, modn) || der_integer(&p, end - p, exp, expn) || p != end)
		return -1;
	return 0;
}

/* Public parts on both objects: libp11 and OpenSSH read them from the
 * private key object when they look for a key's size or curve. */
static int key_material(sg_attrs *a, const sg_key *k, const uint8_t *pt, size_t ptn, CK_OBJECT_CLASS cls)
{
	int rc = 0;
	switch (k->family) {
	case SG_FAM_RSA: {
		const uint8_t *mod, *exp;
		size_t modn, expn;
		if (rsa_parts(pt, ptn, &mod, &modn, &exp, &expn))
			return -1;
		rc |= attr_add(a, CKA_MODULUS, mod, modn);
		rc |= attr_add(a, CKA_PUBLIC_EXPONENT, exp, expn);
		rc |= add_ulong(a, CKA_MODULUS_BITS, k->bits);
		break;
	}
	case SG_FAM_EC:
		if (k->bits == 256)
			rc |= attr_add(a, CKA_EC_PARAMS, oid_p256, sizeof oid_p256);
		else
			rc |= attr_add(a, CKA_EC_PARAMS, oid_p384, sizeof oid_p384);
		rc |= add_ec_point(a, pt, ptn);
		break;
	case SG_FAM_ED:
		rc |= attr_add(a, CKA_EC_PARAMS, oid_ed25519, sizeof oid_ed25519);
		rc |= add_ec_point(a, pt, ptn);
		if (cls == CKO_PUBLIC_KEY)
			rc |= attr_add(a, CKA_VALUE, pt, ptn);
		break;
	}
	return rc ? -1 : 0;
}

static int same_bytes(const uint8_t *p, size_t n, sg_bytes b)
{
	return n == b.n && (n == 0 || memcmp(p, b.p, n) == 0);
}

int sg_key_same(const sg_key *k, const sg_key_entry *e)
{
	if (!same_bytes((const uint8_t *)k->name, k->name_len, e->name) ||
	    !same_bytes((const uint8_t *)k->kid, k->kid_len, e->kid) ||
	    !same_bytes(k->cert_der, k->cert_len, e->cert) || k->nchain_der != e->nchain)
		return 0;
	for (uint32_t i = 0; i < e->nchain; i++)
		if (!same_bytes(k->chain_der[i], k->chain_len[i], e->chain[i]))
			return 0;
	return 1;
}

/* copy_der keeps a copy of b in *p and *n. */
static int copy_der(uint8_t **p, size_t *n, sg_bytes b)
{
	*p = NULL;
	*n = b.n;
	if (!b.n)
		return 0;
	if (!(*p = malloc(b.n)))
		return -1;
	memcpy(*p, b.p, b.n);
	return 0;
}

/* chain_objects builds the objects of the certificate's intermediates,
 * labelled "KEY-ca1", "KEY-ca2"... in the order the config file gave them.
 * One the module cannot read is left out. */
static int chain_objects(sg_key *k, const sg_key_entry *e)
{
	k->nchain_der = e->nchain;
	for (uint32_t i = 0; i < e->nchain; i++)
		if (copy_der(&k->chain_der[i], &k->chain_len[i], e->chain[i]))
			return -1;
	if (!k->has_cert)
		return 0;
	for (uint32_t i = 0; i < e->nchain; i++) {
		char label[300];
		int n = snprintf(label, sizeof label, "%.*s-ca%u", (int)k->name_len, k->name, i + 1);
		if (n < 0 || (size_t)n >= sizeof label)
			continue;
		sg_attrs a = {0};
		if (cert_object(&a, label, (size_t)n, NULL, 0, 2 /* authority */, e->chain[i])) {
			attrs_free(&a);
			continue;
		}
		k->chain[k->nchain++] = a;
	}
	return 0;
}

/*
 * key_build reads the SubjectPublicKeyInfo with X509_PUBKEY alone, never
 * as an EVP_PKEY: in a host that set an ENGINE as its default (openssl
 * -engine pkcs11, which loads this very module) an EVP_PKEY's parameters
 * can be out of reach, and the key must not vanish from the token for it.
 */
static int key_build(sg_key *k, const sg_key_entry *e)
{
	const unsigned char *p = e->pub.p;
	X509_PUBKEY *xpk = d2i_X509_PUBKEY(NULL, &p, (long)e->pub.n);
	ASN1_OBJECT *alg;
	const unsigned char *pt;
	int ptn, ptype;
	const void *pval;
	X509_ALGOR *algor;
	CK_KEY_TYPE kt;
	int rc = -1;
	memset(k, 0, sizeof *k);
	if (!xpk)
		return -1;
	if (p != e->pub.p + e->pub.n || !X509_PUBKEY_get0_param(&alg, &pt, &ptn, &algor, xpk))
		goto out;
	switch (OBJ_obj2nid(alg)) {
	case NID_X9_62_id_ecPublicKey: {
		X509_ALGOR_get0(NULL, &ptype, &pval, algor);
		int curve = ptype == V_ASN1_OBJECT ? OBJ_obj2nid(pval) : NID_undef;
		if (curve == NID_X9_62_prime256v1)
			k->bits = 256;
		else if (curve == NID_secp384r1)
			k->bits = 384;
		else
			goto out;
		k->field_len = k->bits / 8;
		/* An uncompressed point: 0x04 || x || y. */
		if (ptn != (int)(1 + 2 * k->field_len) || pt[0] != 0x04)
			goto out;
		k->family = SG_FAM_EC;
		k->sig_len = 2 * k->field_len;
		kt = CKK_EC;
		break;
	}
	case NID_rsaEncryption: {
		const uint8_t *mod, *exp;
		size_t modn, expn;
		if (rsa_parts(pt, (size_t)ptn, &mod, &modn, &exp, &expn) || modn < 128 || modn > 1024)
			goto out;
		unsigned top = 0;
		for (uint8_t b = mod[0]; b; b >>= 1)
			top++;
		k->bits = (unsigned)(modn - 1) * 8 + top;
		k->family = SG_FAM_RSA;
		k->sig_len = modn;
		kt = CKK_RSA;
		break;
	}
	case NID_ED25519:
		if (ptn != 32)
			goto out;
		k->family = SG_FAM_ED;
		k->bits = 256;
		k->sig_len = 64;
		kt = CKK_EC_EDWARDS;
		break;
	default:
		goto out;
	}
	k->name = dup_bytes(e->name);
	k->kid = dup_bytes(e->kid);
	if (!k->name || !k->kid)
		goto out;
	k->name_len = e->name.n;
	k->kid_len = e->kid.n;
	uint8_t id[64];
	size_t idn = kid_to_id(e->kid, id, sizeof id);
	if (copy_der(&k->cert_der, &k->cert_len, e->cert))
		goto out;
	sg_bytes serial, issuer, subject = {0};
	/* A certificate the module cannot read is left out, not the key. */
	k->has_cert = e->cert.n > 0 && cert_parts(e->cert, &serial, &issuer, &subject) == 0;
	if (!k->has_cert)
		subject = (sg_bytes){0};
	if (common(&k->priv, CKO_PRIVATE_KEY, kt, k, id, idn, e->pub, subject) ||
	    key_material(&k->priv, k, pt, (size_t)ptn, CKO_PRIVATE_KEY) ||
	    common(&k->pub, CKO_PUBLIC_KEY, kt, k, id, idn, e->pub, subject) ||
	    key_material(&k->pub, k, pt, (size_t)ptn, CKO_PUBLIC_KEY))
		goto out;
	if (k->has_cert && cert_object(&k->cert, k->name, k->name_len, id, idn, 0 /* unspecified */, e->cert))
		goto out;
	if (chain_objects(k, e))
		goto out;
	k->present = 1;
	rc = 0;
out:
	X509_PUBKEY_free(xpk);
	return rc;
}

/* The error queue is the host thread's: a DER parse that fails here (a
 * key or certificate the module leaves out) must not leave errors a host
 * using OpenSSL itself, such as the pkcs11 engine, would take for its own. */
int sg_key_build(sg_key *k, const sg_key_entry *e)
{
	ERR_set_mark();
	int rc = key_build(k, e);
	ERR_pop_to_mark();
	return rc;
}
