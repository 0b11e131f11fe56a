/* A PKCS#11 module whose C_Initialize says the device failed, as a network
 * HSM's client library does while its appliance is unreachable: it loads,
 * so the agent restarts on it rather than call it the configuration's
 * fault. Built by the tests (cc -shared -fPIC). No header: the function
 * list is a CK_VERSION and then pointers, C_Initialize and C_Finalize
 * first (PKCS#11 v2.40 pkcs11f.h), and nothing past them is called. */

typedef unsigned long ck_rv;

#define CKR_DEVICE_ERROR 0x30UL

static ck_rv initialize(void *args) {
	(void)args;
	return CKR_DEVICE_ERROR;
}

static ck_rv finalize(void *reserved) {
	(void)reserved;
	return 0;
}

static struct {
	unsigned char major, minor;
	ck_rv (*fn[68])(void *);
} list = {2, 40, {initialize, finalize}};

ck_rv C_GetFunctionList(void **out) {
	*out = &list;
	return 0;
}
