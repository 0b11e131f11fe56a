package agent

import (
	"errors"
	"fmt"
	"testing"

	"github.com/sigil-agent/sigil/proto"
)

// What a caller is told: the agent's own *proto.Error messages, INTERNAL
// ones included; never the text of an unclassified error, which may carry
// paths or library output.
func TestClientMessage(t *testing.T) {
	cases := []struct {
		name string
		err  error
		want string
	}{
		{"unclassified", errors.New("open /var/lib/sigil/keys/default.key: permission denied"), "internal error; see the agent's log"},
		{"unclassified, wrapped", fmt.Errorf("sign: %w", errors.New("libsofthsm2.so: CKR_GENERAL_ERROR at 0x7f3a")), "internal error; see the agent's log"},
		{"the agent's INTERNAL", &proto.Error{Code: proto.Internal, Msg: "prune refused: the chain is broken at seq 3"}, "prune refused: the chain is broken at seq 3"},
		{"the agent's refusal, wrapped", fmt.Errorf("decide: %w", &proto.Error{Code: proto.Paused, Msg: "slot acme/release is paused"}), "slot acme/release is paused"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := clientMessage(codeOf(tc.err), tc.err); got != tc.want {
				t.Fatalf("clientMessage = %q, want %q", got, tc.want)
			}
		})
	}
}
