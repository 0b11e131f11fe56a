// Package awskmstest runs the AWS KMS emulator github.com/nsmithuk/local-kms
// for tests and for `sigil bench`: a real KMS wire protocol server, reached by
// the real SDK client over loopback, with keys created through the SDK. Start
// puts a Front before it, which adds the Ed25519 keys local-kms lacks.
// Nothing here is for production. It does not import testing (TB is the part
// of testing.TB the helpers use), so the sigil binary can link it.
package awskmstest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
)

// Module is the local-kms version installed when no binary is found. The
// project has no release tags; this is the proxy's latest pseudo-version.
const Module = "github.com/nsmithuk/local-kms@v0.0.0-20260228092603-2a5e92d09ab6"

// Region and AccountID are what the emulator is started with.
const (
	Region    = "eu-west-1"
	AccountID = "111122223333"
)

// Credentials are static test credentials; local-kms does not check them.
func Credentials() aws.CredentialsProvider {
	return credentials.NewStaticCredentialsProvider("AKIDLOCALKMSTEST", "local-kms-test-secret", "")
}

// TB is the part of testing.TB the helpers use; *testing.T and *testing.B
// satisfy it.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
}

// ErrNotInstalled is returned by Find when no local-kms binary exists.
var ErrNotInstalled = errors.New("local-kms not installed")

var (
	installOnce sync.Once
	installBin  string
	installErr  error
)

// Find locates an installed local-kms without installing it: $LOCAL_KMS_BIN,
// else PATH, else $(go env GOBIN) or $(go env GOPATH)/bin. The error wraps
// ErrNotInstalled when there is none.
func Find() (string, error) {
	if p := os.Getenv("LOCAL_KMS_BIN"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("LOCAL_KMS_BIN: %w", err)
		}
		return p, nil
	}
	if p, err := exec.LookPath("local-kms"); err == nil {
		return p, nil
	}
	p, err := goInstallPath()
	if err != nil {
		return "", fmt.Errorf("%w (set LOCAL_KMS_BIN or run `go install %s`): %v", ErrNotInstalled, Module, err)
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%w (set LOCAL_KMS_BIN or run `go install %s`)", ErrNotInstalled, Module)
	}
	return p, nil
}

// Binary is Find, and when nothing is installed and the go command is
// available it runs `go install Module` once per process (minutes on a cold
// module cache: for tests, not for `sigil bench`).
func Binary() (string, error) {
	if p, err := Find(); err == nil || !errors.Is(err, ErrNotInstalled) {
		return p, err
	}
	installOnce.Do(func() {
		goBin, err := exec.LookPath("go")
		if err != nil {
			installErr = errors.New("local-kms not found and no go command to install it")
			return
		}
		if installBin, installErr = goInstallPath(); installErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, goBin, "install", Module).CombinedOutput()
		if err != nil {
			installErr = errors.New("go install " + Module + ": " + err.Error() + ": " + strings.TrimSpace(string(out)))
			return
		}
		if _, err := os.Stat(installBin); err != nil {
			installErr = errors.New("go install " + Module + " left no binary at " + installBin)
		}
	})
	return installBin, installErr
}

// goInstallPath is where `go install` puts local-kms.
func goInstallPath() (string, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return "", errors.New("no go command to ask for GOBIN and GOPATH")
	}
	dir, err := goBinDir(goBin)
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "local-kms"), nil
}

func goBinDir(goBin string) (string, error) {
	out, err := exec.Command(goBin, "env", "GOBIN", "GOPATH").Output()
	if err != nil {
		return "", err
	}
	// One line each; an unset GOBIN is an empty first line, so the output
	// must not be trimmed before it is split.
	lines := strings.Split(string(out), "\n")
	if strings.TrimSpace(lines[0]) != "" {
		return strings.TrimSpace(lines[0]), nil
	}
	if len(lines) < 2 || strings.TrimSpace(lines[1]) == "" {
		return "", errors.New("go env GOPATH is empty")
	}
	// GOPATH may list several directories; go install uses the first.
	return filepath.Join(filepath.SplitList(strings.TrimSpace(lines[1]))[0], "bin"), nil
}

var startedRE = regexp.MustCompile(`Local KMS started on [^\s"]*:(\d+)`)

// Emulator is a running local-kms.
type Emulator struct {
	// Endpoint is its loopback endpoint, http://127.0.0.1:PORT. The emulator
	// binds all interfaces; clients must use this address only.
	Endpoint string
	cmd      *exec.Cmd
	exited   chan struct{}
	dir      string
}

// StartEmulator runs a fresh local-kms from bin with its data in a new
// temporary directory, on a port it picks itself (PORT=0), and waits until it
// reports that port. Close stops it.
func StartEmulator(bin string) (*Emulator, error) {
	dir, err := os.MkdirTemp("", "local-kms-")
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(),
		"KMS_DATA_PATH="+filepath.Join(dir, "data"),
		"KMS_SEED_PATH="+filepath.Join(dir, "no-seed.yaml"),
		"KMS_REGION="+Region,
		"KMS_ACCOUNT_ID="+AccountID,
		"PORT=0",
	)
	// Gone with the process that started it (a killed test or bench), and
	// out of its process group, so a terminal's Ctrl-C to a bench stops
	// the bench alone, which then reports and stops the emulator itself.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start local-kms: %w", err)
	}
	e := &Emulator{cmd: cmd, exited: make(chan struct{}), dir: dir}
	go func() {
		cmd.Wait()
		pw.Close()
		close(e.exited)
	}()

	port := make(chan string, 1)
	var logMu sync.Mutex
	var tail []string
	go func() {
		sc := bufio.NewScanner(pr)
		found := false
		for sc.Scan() {
			line := sc.Text()
			if !found {
				logMu.Lock()
				tail = append(tail, line)
				logMu.Unlock()
				if m := startedRE.FindStringSubmatch(line); m != nil {
					found = true
					port <- m[1]
				}
			}
		}
		io.Copy(io.Discard, pr) // keep draining so the emulator never blocks on its log
	}()
	select {
	case p := <-port:
		e.Endpoint = "http://127.0.0.1:" + p
		return e, nil
	case <-e.exited:
	case <-time.After(30 * time.Second):
	}
	e.Close()
	logMu.Lock()
	defer logMu.Unlock()
	return nil, fmt.Errorf("local-kms did not report its port; output:\n%s", strings.Join(tail, "\n"))
}

// PID is the emulator's process id, for CPU accounting.
func (e *Emulator) PID() int { return e.cmd.Process.Pid }

// Close kills the emulator and removes its data.
func (e *Emulator) Close() {
	e.cmd.Process.Kill()
	<-e.exited
	os.RemoveAll(e.dir)
}

// Start runs a fresh local-kms (StartEmulator) behind a Front, which adds
// Ed25519 keys, for the test's lifetime, and returns the front's loopback
// endpoint. The test is skipped, with the reason, when the emulator cannot
// be installed.
func Start(t TB) string {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		t.Skipf("local-kms emulator unavailable (set LOCAL_KMS_BIN or run `go install %s`): %v", Module, err)
	}
	e, err := StartEmulator(bin)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(e.Close)
	f, err := StartFront(e.Endpoint)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(f.Close)
	return f.Endpoint
}

// Client is a KMS client for the emulator at endpoint, for creating and
// managing test keys.
func Client(endpoint string) *kms.Client {
	return kms.New(kms.Options{
		Region:       Region,
		BaseEndpoint: aws.String(endpoint),
		Credentials:  Credentials(),
	})
}

// CreateKey creates a SIGN_VERIFY key of the given spec and returns its key id.
func CreateKey(t TB, c *kms.Client, spec types.KeySpec) string {
	t.Helper()
	out, err := c.CreateKey(context.Background(), &kms.CreateKeyInput{
		KeySpec:  spec,
		KeyUsage: types.KeyUsageTypeSignVerify,
	})
	if err != nil {
		t.Fatalf("create %s key: %v", spec, err)
	}
	return aws.ToString(out.KeyMetadata.KeyId)
}

// CreateAlias points alias ("alias/name") at keyID.
func CreateAlias(t TB, c *kms.Client, alias, keyID string) {
	t.Helper()
	if _, err := c.CreateAlias(context.Background(), &kms.CreateAliasInput{
		AliasName:   aws.String(alias),
		TargetKeyId: aws.String(keyID),
	}); err != nil {
		t.Fatalf("create alias %s: %v", alias, err)
	}
}

// DisableKey disables keyID.
func DisableKey(t TB, c *kms.Client, keyID string) {
	t.Helper()
	if _, err := c.DisableKey(context.Background(), &kms.DisableKeyInput{KeyId: aws.String(keyID)}); err != nil {
		t.Fatalf("disable key: %v", err)
	}
}

// DescribeKey returns the metadata of the key keyID (a key id, key ARN,
// alias or alias ARN) names.
func DescribeKey(t TB, c *kms.Client, keyID string) types.KeyMetadata {
	t.Helper()
	out, err := c.DescribeKey(context.Background(), &kms.DescribeKeyInput{KeyId: aws.String(keyID)})
	if err != nil {
		t.Fatalf("describe key %s: %v", keyID, err)
	}
	if out.KeyMetadata == nil {
		t.Fatalf("describe key %s: no metadata", keyID)
	}
	return *out.KeyMetadata
}
