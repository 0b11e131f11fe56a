/*
 * keytable: what the module keeps of the agent's key lists. It searches
 * the token ROUNDS times (each search is one ListKeys) and prints each
 * search's result code and object count, then the C heap in use after
 * the first search and after the last (glibc's mallinfo2), so that the
 * test can hold the module's memory to what one reply justifies.
 *
 * usage: keytable MODULE ROUNDS
 */
#include <dlfcn.h>
#include <malloc.h>
#include <p11-kit/pkcs11.h>
#include <stdio.h>
#include <stdlib.h>

static size_t heap(void)
{
	struct mallinfo2 mi = mallinfo2();
	return mi.uordblks + mi.hblkhd;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: keytable MODULE ROUNDS\n");
		return 2;
	}
	void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
	CK_C_GetFunctionList get = h ? (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList") : NULL;
	CK_FUNCTION_LIST_PTR f = NULL;
	if (!get || get(&f) != CKR_OK) {
		fprintf(stderr, "cannot load %s\n", argv[1]);
		return 1;
	}
	int rounds = atoi(argv[2]);
	CK_RV rv = f->C_Initialize(NULL);
	if (rv != CKR_OK) {
		fprintf(stderr, "C_Initialize: %#lx\n", (unsigned long)rv);
		return 1;
	}
	CK_SESSION_HANDLE s;
	if ((rv = f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK) {
		fprintf(stderr, "C_OpenSession: %#lx\n", (unsigned long)rv);
		return 1;
	}
	size_t first = 0;
	for (int i = 0; i < rounds; i++) {
		CK_OBJECT_HANDLE found[64];
		CK_ULONG n = 0, total = 0;
		rv = f->C_FindObjectsInit(s, NULL, 0);
		if (rv == CKR_OK) {
			while ((rv = f->C_FindObjects(s, found, 64, &n)) == CKR_OK && n > 0)
				total += n;
			f->C_FindObjectsFinal(s);
		}
		printf("search %d: %#lx, %lu objects\n", i, (unsigned long)rv, (unsigned long)total);
		if (i == 0)
			first = heap();
	}
	printf("heap %zu %zu\n", first, heap());
	f->C_CloseSession(s);
	f->C_Finalize(NULL);
	return 0;
}
