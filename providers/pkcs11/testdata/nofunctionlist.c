/* A shared object that is no PKCS#11 module: it exports no
 * C_GetFunctionList. Built by the tests (cc -shared -fPIC). */

int sigil_not_a_pkcs11_module = 1;
