# Sigil's build. Two commands set a fresh Debian machine up: `make run` and
# `make test` (see README.md). cgo is required (miekg/pkcs11).

GO        ?= go
BIN       := bin/sigil
PKGS      := ./...
FUZZTIME  ?= 30s
TESTFLAGS ?=
PREFIX    ?= /usr/local
DESTDIR   ?=
UNITDIR   ?= /etc/systemd/system
UNITS     := systemd/sigil.service systemd/sigil.socket systemd/sigil-admin.socket
export CGO_ENABLED := 1

.PHONY: all build run test test-deps ensure-cc systemd-verify install bench bench-full bench-go fuzz soak lint clean

all: build

include client/pkcs11module/module.mk

# bin/sigil and the PKCS#11 front bin/libsigil-pkcs11.so.
build: ensure-cc $(PKCS11_MODULE)
	$(GO) build -o $(BIN) ./cmd/sigil

ensure-cc:
	@bash .ci/ensure-cc

# The agent on its embedded default: software keys in $XDG_STATE_HOME/sigil
# (else ~/.local/state/sigil), socket under $XDG_RUNTIME_DIR/sigil (else
# /tmp/sigil-$UID). Ctrl-C stops it.
run: build
	./$(BIN) agent

# Installs SoftHSM2, OpenSC, p11-kit, OpenSSH and OpenSSL's PKCS#11 engine
# when missing and running as root, then runs every test with the race
# detector. The PKCS#11 front's tests load bin/libsigil-pkcs11.so.
# Then the wire codec once more on a 32-bit platform, where msgpack reads a
# length from 2^31 up as a negative int (proto/messages.go, lenFits).
test: test-deps systemd-verify $(PKCS11_MODULE)
	$(GO) test -race -count=1 -timeout 25m $(TESTFLAGS) $(PKGS)
	CGO_ENABLED=0 GOARCH=386 $(GO) test -count=1 ./proto/

# `systemd-analyze verify` on the units, with ExecStart pointed at the built
# bin/sigil (verify wants the binary to exist). Warnings about the units
# (unknown keys, bad values) fail too. Skipped, visibly, without systemd.
systemd-verify: build
	@if ! command -v systemd-analyze >/dev/null 2>&1; then \
		echo "systemd-verify: SKIPPED: systemd-analyze not installed (apt-get install systemd)"; exit 0; fi; \
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for u in $(UNITS); do \
		sed 's|/usr/local/bin/sigil|$(CURDIR)/$(BIN)|' $$u > $$tmp/$$(basename $$u); \
	done; \
	out=$$(cd $$tmp && systemd-analyze verify $(notdir $(UNITS)) 2>&1) || { echo "$$out"; exit 1; }; \
	if echo "$$out" | grep -q "$$tmp"; then echo "$$out"; echo "systemd-verify: warnings in the units"; exit 1; fi; \
	echo "systemd-verify: $(notdir $(UNITS)) OK"

# The binary to $(PREFIX)/bin, the PKCS#11 front to $(PREFIX)/lib (where
# docs/pkcs11-module.md loads it from), the units to $(UNITDIR) (ExecStart
# rewritten to $(PREFIX)/bin/sigil), and an example config (the embedded
# default, with the unit's data and socket paths) to
# /etc/sigil/sigil.yaml.example; DESTDIR for packaging.
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(UNITDIR) $(DESTDIR)/etc/sigil
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/sigil
	install -m 0755 $(PKCS11_MODULE) $(DESTDIR)$(PREFIX)/lib/libsigil-pkcs11.so
	for u in $(UNITS); do \
		sed 's|/usr/local/bin/sigil|$(PREFIX)/bin/sigil|' $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$u); \
	done
	{ echo '# For sigil.service: its StateDirectory and the sockets its socket units pass'; \
	  echo '# (sigil audit --config and the admin commands find the agent through them).'; \
	  echo 'data_dir: /var/lib/sigil'; \
	  echo 'socket: /run/sigil/agent.sock'; \
	  echo 'admin_socket: /run/sigil/admin.sock'; \
	  echo; ./$(BIN) agent --print-default-config; } > $(DESTDIR)/etc/sigil/sigil.yaml.example
	chmod 0644 $(DESTDIR)/etc/sigil/sigil.yaml.example

test-deps: ensure-cc
	@bash .ci/install-test-deps

# The latency harness on a throwaway SoftHSM2 token, agent process and p11-kit
# server (under a minute); bench-full writes docs/BENCHMARKS.md; bench-go runs
# the Go micro-benchmarks of the hot path with allocation counts.
bench: build test-deps
	./$(BIN) bench --quick

bench-full: build test-deps
	./$(BIN) bench --doc docs/BENCHMARKS.md --json docs/benchmarks.json
	bash .ci/bench-micro >> docs/BENCHMARKS.md

bench-go:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2000x $(PKGS)

# Each fuzz target (the wire decoders, the policy and config loaders, and the
# PKCS#11 front's C codec) for FUZZTIME; new crashers land in testdata/fuzz
# and fail `make test`. docs/security.md has the exec counts of the last long run.
FUZZ_GO := ./proto:FuzzDecodeRequest ./proto:FuzzDecodeResponse ./proto:FuzzReadFrame \
	./policy:FuzzParse ./agent:FuzzParseConfig
fuzz:
	@set -e; for pt in $(FUZZ_GO); do \
		p=$${pt%%:*}; t=$${pt##*:}; \
		echo "== $$t in $$p ($(FUZZTIME))"; \
		$(GO) test -timeout 0 -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $$p; \
	done
	@set -e; for t in FuzzWireDecodeResponse FuzzWireResponseRoundTrip FuzzWireEncodeRequest; do \
		echo "== $$t ($(FUZZTIME), the PKCS#11 front's C codec)"; \
		$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) ./client/pkcs11module; \
	done

# 1000 connections for 5 minutes (well-behaved signers, slow-loris, junk and
# never-reading clients) against a throwaway agent process; exit 1 on a crash,
# a bad signature, a missing audit record or growth after warm-up. SOAKFLAGS
# for e.g. --conns 200 --duration 1m --json soak.json. docs/security.md has
# the last run.
SOAKFLAGS ?=
soak: build test-deps
	./$(BIN) soak $(SOAKFLAGS)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

clean:
	rm -rf bin
