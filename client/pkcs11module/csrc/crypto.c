/*
 * crypto.c: hashing for the mechanisms that include it (CKM_ECDSA_SHA256,
 * CKM_SHA256_RSA_PKCS, ...), ECDSA signature conversion and DigestInfo
 * parsing, all through OpenSSL's libcrypto.
 */
#include "sigil.h"

#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <string.h>

/* Fetched once at C_Initialize: OpenSSL 3's implicit fetch on every
 * EVP_DigestInit (EVP_sha256()) takes a lock on the provider store, which
 * concurrent signers would contend on. */
static EVP_MD *mds[4];

static int fetch_mds(void)
{
	static const char *names[4] = {NULL, "SHA256", "SHA384", "SHA512"};
	for (int i = 1; i < 4; i++) {
		if (!mds[i])
			mds[i] = EVP_MD_fetch(NULL, names[i], NULL);
		if (!mds[i])
			return -1;
	}
	return 0;
}

/* The fetch runs on the host's thread, against the host's library context:
 * one it cannot satisfy (default properties such as "fips=yes" with no FIPS
 * provider) leaves an error on the host's queue, which a host using OpenSSL
 * itself would take for its own. The module answers CKR_GENERAL_ERROR. */
int sg_crypto_init(void)
{
	ERR_set_mark();
	int rc = fetch_mds();
	ERR_pop_to_mark();
	return rc;
}

void sg_crypto_free(void)
{
	for (int i = 1; i < 4; i++) {
		EVP_MD_free(mds[i]);
		mds[i] = NULL;
	}
}

const void *sg_md(int hash)
{
	return hash >= 1 && hash <= 3 ? mds[hash] : NULL;
}

size_t sg_hash_len(int hash)
{
	switch (hash) {
	case SG_HASH_SHA256: return 32;
	case SG_HASH_SHA384: return 48;
	case SG_HASH_SHA512: return 64;
	}
	return 0;
}

int sg_digest(int hash, const uint8_t *p, size_t n, uint8_t *out)
{
	const EVP_MD *md = sg_md(hash);
	return md && EVP_Digest(p, n, out, NULL, md, NULL) == 1 ? 0 : -1;
}

void *sg_md_ctx_new(int hash)
{
	const EVP_MD *md = sg_md(hash);
	EVP_MD_CTX *ctx = md ? EVP_MD_CTX_new() : NULL;
	if (ctx && EVP_DigestInit_ex(ctx, md, NULL) != 1) {
		EVP_MD_CTX_free(ctx);
		ctx = NULL;
	}
	return ctx;
}

int sg_md_ctx_update(void *ctx, const uint8_t *p, size_t n)
{
	return EVP_DigestUpdate(ctx, p, n) == 1 ? 0 : -1;
}

int sg_md_ctx_final(void *ctx, uint8_t *out)
{
	return EVP_DigestFinal_ex(ctx, out, NULL) == 1 ? 0 : -1;
}

void sg_md_ctx_free(void *ctx) { EVP_MD_CTX_free(ctx); }

/* The agent answers ECDSA as ASN.1 DER SEQUENCE{r, s}; PKCS#11 wants r||s,
 * each left-padded to the curve's field size (v2.40 section 2.3.1). */
int sg_ecdsa_der_to_raw(const uint8_t *der, size_t n, size_t field_len, uint8_t *out)
{
	const unsigned char *p = der;
	ECDSA_SIG *sig = d2i_ECDSA_SIG(NULL, &p, (long)n);
	int rc = -1;
	if (!sig)
		return -1;
	if (p == der + n) {
		const BIGNUM *r, *s;
		ECDSA_SIG_get0(sig, &r, &s);
		if (BN_bn2binpad(r, out, (int)field_len) == (int)field_len &&
		    BN_bn2binpad(s, out + field_len, (int)field_len) == (int)field_len)
			rc = 0;
	}
	ECDSA_SIG_free(sig);
	return rc;
}

/* DER DigestInfo prefixes (RFC 8017 section 9.2 note 1) of the hashes the
 * agent signs with. */
static const struct {
	int hash;
	uint8_t prefix[19];
} digest_infos[] = {
	{SG_HASH_SHA256, {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}},
	{SG_HASH_SHA384, {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30}},
	{SG_HASH_SHA512, {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40}},
};

/* CKM_RSA_PKCS signs a DigestInfo the caller built; the agent builds its
 * own from (hash, digest), so the input must be exactly one it would build. */
int sg_digestinfo_split(const uint8_t *p, size_t n, int *hash, const uint8_t **digest)
{
	for (size_t i = 0; i < sizeof digest_infos / sizeof digest_infos[0]; i++) {
		size_t dl = sg_hash_len(digest_infos[i].hash);
		if (n == sizeof digest_infos[i].prefix + dl && memcmp(p, digest_infos[i].prefix, sizeof digest_infos[i].prefix) == 0) {
			*hash = digest_infos[i].hash;
			*digest = p + sizeof digest_infos[i].prefix;
			return 0;
		}
	}
	return -1;
}
