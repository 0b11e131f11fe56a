package pkcs11module

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// The rules of PKCS#11 v2.40 that a careful host relies on, each checked
// by testdata/conformance.c against the fake agent: C_GetAttributeValue's
// per-attribute answers and codes, the variable-length output convention
// of C_Sign and C_SignFinal (the length query and the short buffer answered
// without the agent, so each signature is still one Sign request), which
// errors end an operation, session and login states, search templates and
// mechanism info. The module runs under AddressSanitizer where the
// toolchain has it.
func TestSpecRulesAHostReliesOn(t *testing.T) {
	fake := startFake(t, newFakeKeys(t))
	mod, flags := asanBuild(t) // the odd paths (short buffers, refusals) under AddressSanitizer
	bin := ccProgram(t, "conformance", flags...)
	t.Setenv(proto.SocketEnv, fake.sock)
	t.Setenv("SIGIL_PKCS11_CONF", "")
	out := runBounded(t, 2*time.Minute, nil, bin, mod)
	var n int64
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "signatures "); ok {
			fmt.Sscan(v, &n)
		}
	}
	if got := fake.ops[proto.OpSign].Load(); n == 0 || got != n {
		t.Fatalf("%d Sign requests for %d signatures: length queries and short buffers must not ask the agent\n%s", got, n, out)
	}
}
