package pkcs11

// The signing hot path calls the module through this shim instead of miekg's
// Ctx.SignInit/Ctx.Sign. miekg's Sign asks the module for the signature
// length (C_Sign with a NULL buffer), mallocs, then signs (a second C_Sign),
// and SignInit builds the mechanism in a Go-allocated arena: three module calls,
// two cgo crossings and several allocations per signature. The signature length
// is known from the key (ECDSA 2×coordinate, RSA modulus, Ed25519 64 bytes), so
// sigilSign does C_SignInit and exactly one C_Sign into the caller's buffer, in a
// single cgo crossing, with the mechanism and PSS parameters on the C stack.
//
// The shim reaches the module through its own dlopen of the same path: the
// dynamic loader hands back the library miekg already loaded (same handle,
// reference counted), so C_GetFunctionList returns the very function table
// miekg calls through and the two share one Cryptoki state.

/*
#cgo linux LDFLAGS: -ldl
#cgo freebsd LDFLAGS:
#cgo noescape sigilSign
#cgo nocallback sigilSign

#include <dlfcn.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned long sigil_ulong;
typedef sigil_ulong sigil_rv;

typedef struct {
	sigil_ulong mechanism;
	void *pParameter;
	sigil_ulong ulParameterLen;
} sigil_mechanism;

typedef struct {
	sigil_ulong hashAlg;
	sigil_ulong mgf;
	sigil_ulong sLen;
} sigil_pss_params;

typedef sigil_rv (*sigil_sign_init_fn)(sigil_ulong session, sigil_mechanism *mech, sigil_ulong key);
typedef sigil_rv (*sigil_sign_fn)(sigil_ulong session, unsigned char *data, sigil_ulong dataLen,
	unsigned char *sig, sigil_ulong *sigLen);

// The head of CK_FUNCTION_LIST as far as C_Sign. Its layout is the Cryptoki
// ABI (PKCS#11 v2.40 pkcs11f.h: a CK_VERSION, then the function pointers in
// a fixed order, C_SignInit the 43rd); TestFunctionListLayout checks it
// against dlsym on SoftHSM.
typedef struct {
	unsigned char versionMajor;
	unsigned char versionMinor;
	void *before[42]; // C_Initialize .. C_DigestFinal
	sigil_sign_init_fn C_SignInit;
	sigil_sign_fn C_Sign;
} sigil_function_list;

typedef sigil_rv (*sigil_get_function_list_fn)(sigil_function_list **list);

// What sigilOpen found: the library loaded with its function list, or
// which step failed.
enum {
	sigilLoaded,
	sigilNoLibrary,      // dlopen failed; *why is dlerror's text (malloc'd)
	sigilNoFunctionList, // the library exports no C_GetFunctionList
	sigilListFailed,     // C_GetFunctionList returned *rv, or no list
};

// sigilOpen copies dlerror's text in the call that failed: it is per
// thread, and the goroutine may run on another after the call returns.
static int sigilOpen(const char *path, void **handle, sigil_function_list **list, char **why, sigil_rv *rv) {
	*handle = NULL;
	*why = NULL;
	*rv = 0;
	void *h = dlopen(path, RTLD_LAZY);
	if (h == NULL) {
		const char *e = dlerror();
		if (e != NULL) {
			*why = strdup(e);
		}
		return sigilNoLibrary;
	}
	sigil_get_function_list_fn get = (sigil_get_function_list_fn)dlsym(h, "C_GetFunctionList");
	if (get == NULL) {
		dlclose(h);
		return sigilNoFunctionList;
	}
	*rv = get(list);
	if (*rv != 0 || *list == NULL) {
		dlclose(h);
		return sigilListFailed;
	}
	*handle = h;
	return sigilLoaded;
}

static void sigilClose(void *h) {
	if (h != NULL) {
		dlclose(h);
	}
}

static void *sigilSym(void *h, const char *name) {
	return dlsym(h, name);
}

// failedInit tells the caller which of the two calls failed, for the log.
static sigil_rv sigilSign(sigil_function_list *list, sigil_ulong session, sigil_ulong key,
	sigil_ulong mech, sigil_ulong pssHash, sigil_ulong pssMGF, sigil_ulong pssSaltLen,
	unsigned char *data, sigil_ulong dataLen, unsigned char *sig, sigil_ulong *sigLen, int *failedInit) {
	sigil_pss_params pss = { pssHash, pssMGF, pssSaltLen };
	sigil_mechanism m = { mech, NULL, 0 };
	if (pssHash != 0) {
		m.pParameter = &pss;
		m.ulParameterLen = sizeof(pss);
	}
	sigil_rv rv = list->C_SignInit(session, &m, key);
	if (rv != 0) {
		*failedInit = 1;
		return rv;
	}
	*failedInit = 0;
	return list->C_Sign(session, data, dataLen, sig, sigLen);
}
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"

	p11 "github.com/miekg/pkcs11"
)

// library is the shim's own reference to a loaded module.
type library struct {
	handle unsafe.Pointer
	list   *C.sigil_function_list
}

// openLibrary loads the module at path. A file the dynamic loader refuses
// (missing, not a shared object for this machine, a dependency missing, on
// a noexec mount) and a library without C_GetFunctionList are
// ErrModuleLoad.
func openLibrary(path string) (*library, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var (
		h    unsafe.Pointer
		list *C.sigil_function_list
		why  *C.char
		rv   C.sigil_rv
	)
	switch C.sigilOpen(cpath, &h, &list, &why, &rv) {
	case C.sigilLoaded:
		return &library{handle: h, list: list}, nil
	case C.sigilNoLibrary:
		detail := "dlopen failed"
		if why != nil {
			detail = C.GoString(why)
			C.free(unsafe.Pointer(why))
		}
		return nil, fmt.Errorf("%w: %s", ErrModuleLoad, detail)
	case C.sigilNoFunctionList:
		return nil, fmt.Errorf("%w: it exports no C_GetFunctionList", ErrModuleLoad)
	}
	if rv == 0 {
		return nil, errors.New("C_GetFunctionList gave no function list")
	}
	return nil, fmt.Errorf("C_GetFunctionList: %w", p11.Error(rv))
}

func (l *library) close() {
	if l != nil && l.handle != nil {
		C.sigilClose(l.handle)
		l.handle = nil
		l.list = nil
	}
}

// signParams is the mechanism of one signature. pssHash is zero except for
// CKM_RSA_PKCS_PSS.
type signParams struct {
	mech, pssHash, pssMGF, pssSaltLen uint
}

// sign runs C_SignInit and one C_Sign. sig must have the exact signature
// length; n is the length the module wrote. data must not be empty
// (CheckRequest guarantees that for digests; an empty Ed25519 message is
// passed with a one-byte stub and length zero).
func (l *library) sign(session, key uint, p *signParams, data, sig []byte) (rv uint, n int, failedInit bool) {
	var dataPtr *C.uchar
	if len(data) > 0 {
		dataPtr = (*C.uchar)(unsafe.Pointer(&data[0]))
	} else {
		dataPtr = &emptyMessage
	}
	sigLen := C.sigil_ulong(len(sig))
	var fi C.int
	r := C.sigilSign(l.list, C.sigil_ulong(session), C.sigil_ulong(key),
		C.sigil_ulong(p.mech), C.sigil_ulong(p.pssHash), C.sigil_ulong(p.pssMGF), C.sigil_ulong(p.pssSaltLen),
		dataPtr, C.sigil_ulong(len(data)), (*C.uchar)(unsafe.Pointer(&sig[0])), &sigLen, &fi)
	return uint(r), int(sigLen), fi != 0
}

// emptyMessage gives an empty Ed25519 message a valid pointer: modules may
// reject a NULL pData even with a zero length.
var emptyMessage C.uchar

// symbolsMatch reports whether the shim's function table entries for
// C_SignInit and C_Sign are the library's exported symbols of those names.
func (l *library) symbolsMatch() bool {
	si := C.CString("C_SignInit")
	defer C.free(unsafe.Pointer(si))
	s := C.CString("C_Sign")
	defer C.free(unsafe.Pointer(s))
	return unsafe.Pointer(l.list.C_SignInit) == C.sigilSym(l.handle, si) &&
		unsafe.Pointer(l.list.C_Sign) == C.sigilSym(l.handle, s)
}
