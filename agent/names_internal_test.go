package agent

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestShortName(t *testing.T) {
	cases := []struct {
		name, in, want string
	}{
		{"short", "release", "release"},
		{"64 bytes", strings.Repeat("a", 64), strings.Repeat("a", 64)},
		{"65 bytes", strings.Repeat("a", 65), strings.Repeat("a", 64) + "…"},
		// "é" is two bytes: the 64-byte cut falls inside the 32nd one.
		{"cut inside a character", "x" + strings.Repeat("é", 40), "x" + strings.Repeat("é", 31) + "…"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := shortName(tc.in)
			if got != tc.want {
				t.Errorf("shortName = %q, want %q", got, tc.want)
			}
			if !utf8.ValidString(got) {
				t.Errorf("shortName(%q) is not valid UTF-8", tc.in)
			}
		})
	}
}
