/*
 * sigil.h: what the module's C files share. The PKCS#11 types come from
 * p11-kit's pkcs11.h (v2.40, permissive licence), which is on every
 * machine that has p11-kit's development files.
 */
#ifndef SIGIL_MODULE_H
#define SIGIL_MODULE_H

#include <p11-kit/pkcs11.h>
#include <stddef.h>
#include <stdint.h>

#include "wire.h"

/* CK_EDDSA_PARAMS (PKCS#11 v3.0 section 2.3.14), absent from v2.40 headers. */
typedef struct {
	CK_BBOOL phFlag;
	CK_ULONG ulContextDataLen;
	CK_BYTE_PTR pContextData;
} sg_eddsa_params;

typedef struct {
	CK_ATTRIBUTE_TYPE type;
	CK_ULONG len;
	uint8_t *val;
} sg_attr;

typedef struct {
	sg_attr *v;
	size_t n, cap;
} sg_attrs;

enum { SG_FAM_EC = 1, SG_FAM_RSA = 2, SG_FAM_ED = 3 };

/*
 * sg_key is one key the agent lists: a private key object, a public key
 * object and, when the agent has the key's certificate, a certificate
 * object. Read, and freed, only under the module lock: a search frees the
 * keys the agent stopped listing past a few (module.c, forget_absent).
 */
typedef struct {
	char *name, *kid;
	size_t name_len, kid_len;
	int family;
	unsigned bits;
	size_t sig_len;   /* the PKCS#11 signature's length: answers length queries locally */
	size_t field_len; /* ECDSA: bytes of r and of s */
	int present;      /* listed by the agent's last ListKeys */
	uint64_t listed;  /* the number of the last search that listed it */
	uint32_t slot;    /* its place in the numbering of object handles */
	int has_cert;     /* the certificate object exists */
	uint8_t *cert_der; /* the agent's certificate bytes, as listed (NULL: none) */
	size_t cert_len;
	sg_attrs priv, pub, cert;
	/* The certificate's intermediates: nchain objects, built from the
	 * listed ones that parse; chain_der keeps every listed one (for
	 * sg_key_same). */
	int nchain;
	sg_attrs chain[SG_MAX_CHAIN];
	uint32_t nchain_der;
	uint8_t *chain_der[SG_MAX_CHAIN];
	size_t chain_len[SG_MAX_CHAIN];
} sg_key;

/* The objects of the key table's entry i have handles b+7i+1 (private),
 * b+7i+2 (public), b+7i+3 (certificate, when the key has one) and b+7i+4 to
 * b+7i+7 (its intermediates, as many as it has), b being the
 * initialization's first handle less one (module.c, object_handle). */
enum { SG_OBJ_PRIVATE = 0, SG_OBJ_PUBLIC = 1, SG_OBJ_CERT = 2, SG_OBJ_CHAIN = 3, SG_OBJS_PER_KEY = 3 + SG_MAX_CHAIN };

/* keys.c */
int sg_key_build(sg_key *k, const sg_key_entry *e);
/* sg_key_same: e lists k as it was built (name, kid, certificate and
 * intermediates). */
int sg_key_same(const sg_key *k, const sg_key_entry *e);
void sg_key_free(sg_key *k);
const sg_attr *sg_attrs_find(const sg_attrs *a, CK_ATTRIBUTE_TYPE t);
int sg_attr_sensitive(int family, CK_ATTRIBUTE_TYPE t);

/* crypto.c */
int sg_crypto_init(void);
void sg_crypto_free(void);
/* md for a wire hash number; NULL for SG_HASH_NONE or unknown */
const void *sg_md(int hash);
size_t sg_hash_len(int hash);
int sg_digest(int hash, const uint8_t *p, size_t n, uint8_t *out);
void *sg_md_ctx_new(int hash);
int sg_md_ctx_update(void *ctx, const uint8_t *p, size_t n);
int sg_md_ctx_final(void *ctx, uint8_t *out);
void sg_md_ctx_free(void *ctx);
int sg_ecdsa_der_to_raw(const uint8_t *der, size_t n, size_t field_len, uint8_t *out);
int sg_digestinfo_split(const uint8_t *p, size_t n, int *hash, const uint8_t **digest);

#endif
