/* A PKCS#11 module that passes every call to the module named by
 * $SIGIL_TEST_FINDONE_TARGET, but for C_FindObjects, which returns at most
 * one handle a call. PKCS#11 lets a token return fewer handles than asked
 * for while more match (only a count of 0 ends the search); some do.
 * Built by the tests (cc -shared -fPIC -ldl). No header: the function list
 * is a CK_VERSION and then 68 pointers in pkcs11f.h's order (v2.40),
 * C_FindObjects the 28th. */

#include <dlfcn.h>
#include <stdlib.h>

typedef unsigned long ck_ulong;
typedef ck_ulong ck_rv;

#define CKR_GENERAL_ERROR 0x5UL
#define FIND_OBJECTS 27

struct function_list {
	unsigned char major, minor;
	void *fn[68];
};

static struct function_list list;
static ck_rv (*target_find)(ck_ulong, ck_ulong *, ck_ulong, ck_ulong *);

static ck_rv find_one(ck_ulong session, ck_ulong *objs, ck_ulong max, ck_ulong *count) {
	return target_find(session, objs, max > 1 ? 1 : max, count);
}

ck_rv C_GetFunctionList(struct function_list **out) {
	const char *path = getenv("SIGIL_TEST_FINDONE_TARGET");
	void *lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
	ck_rv (*get)(struct function_list **) = lib ? (ck_rv (*)(struct function_list **))dlsym(lib, "C_GetFunctionList") : NULL;
	struct function_list *target;
	if (get == NULL || get(&target) != 0)
		return CKR_GENERAL_ERROR;
	list = *target;
	target_find = (ck_rv (*)(ck_ulong, ck_ulong *, ck_ulong, ck_ulong *))target->fn[FIND_OBJECTS];
	list.fn[FIND_OBJECTS] = (void *)find_one;
	*out = &list;
	return 0;
}
