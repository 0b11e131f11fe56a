# libsigil-pkcs11.so: the PKCS#11 front (docs/pkcs11-module.md). Included by
# the top Makefile; needs a C compiler, libssl-dev (libcrypto) and p11-kit's
# pkcs11.h (libp11-kit-dev), which .ci/ensure-cc installs as root.

PKCS11_MODULE  := bin/libsigil-pkcs11.so
PKCS11_DIR     := client/pkcs11module/csrc
PKCS11_SRCS    := $(wildcard $(PKCS11_DIR)/*.c)
PKCS11_HDRS    := $(wildcard $(PKCS11_DIR)/*.h)
CC             ?= cc
PKCS11_CFLAGS  ?= -O2 -g
PKCS11_P11KIT  := $(shell pkg-config --cflags p11-kit-1 2>/dev/null || echo -I/usr/include/p11-kit-1)

# -z defs: every symbol resolved at link time, so a missing library fails
# the build rather than a host's dlopen. -Bsymbolic: our own calls never
# bind to a same-named symbol in the host.
$(PKCS11_MODULE): $(PKCS11_SRCS) $(PKCS11_HDRS) $(PKCS11_DIR)/exports.map client/pkcs11module/module.mk | ensure-cc
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -fPIC -shared -fvisibility=hidden \
		-Wall -Wextra -Wno-unused-parameter -Werror=implicit-function-declaration \
		-fstack-protector-strong -D_FORTIFY_SOURCE=2 $(PKCS11_CFLAGS) $(PKCS11_P11KIT) \
		-o $@ $(PKCS11_SRCS) \
		-Wl,--version-script=$(PKCS11_DIR)/exports.map -Wl,-z,defs -Wl,-z,relro -Wl,-z,now -Wl,-Bsymbolic \
		-lcrypto -lpthread
