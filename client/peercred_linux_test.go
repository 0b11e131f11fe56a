package client

import (
	"bufio"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// An agent found in the default socket directory is trusted only if the
// kernel says it runs as this user or root (SO_PEERCRED): another user who
// made the directory and a socket between the client's directory check and
// its connect is refused. The listener here runs as another uid.
func TestPeerOfAnotherUserIsRefused(t *testing.T) {
	if os.Getenv("SIGIL_TEST_LISTEN_AS_OTHER") != "" {
		ln, err := net.Listen("unix", os.Getenv("SIGIL_TEST_LISTEN_AS_OTHER"))
		if err != nil {
			os.Exit(1)
		}
		os.Stdout.WriteString("listening\n")
		for {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(0)
			}
			defer c.Close()
		}
	}
	if os.Getuid() != 0 {
		t.Skip("running a listener as another uid needs root")
	}
	dir, err := os.MkdirTemp("", "sigil-t")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o777)
	path := filepath.Join(dir, "agent.sock")
	// The test binary, where the other user can run it.
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "client.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestPeerOfAnotherUserIsRefused$")
	cmd.Env = append(os.Environ(), "SIGIL_TEST_LISTEN_AS_OTHER="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 4242, Gid: 4242}}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	ready := make(chan bool, 1)
	go func() { line, _ := bufio.NewReader(out).ReadString('\n'); ready <- line == "listening\n" }()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatal("the other user's listener did not start")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the other user's listener did not start")
	}
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := checkPeerUID(nc); !errors.Is(err, proto.ErrUntrustedSocketDir) {
		t.Fatalf("checkPeerUID of uid 4242's listener: %v, want ErrUntrustedSocketDir", err)
	}
}
