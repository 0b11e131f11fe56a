package journal

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"go.uber.org/zap"
)

// walFS wraps the FS given to Pebble to decide what a WAL sync does.
//
// Pebble's WriteOptions offer two behaviours. With pebble.NoSync a commit
// returns once the batch is copied into the WAL writer's in-process 32 KiB
// block buffer, and the flush goroutine writes what is new to the file when
// it next runs (record/log_writer.go, flushLoop, v2.1.7): a SIGKILL before
// then loses it. `wal` mode makes such commits kill-safe with its tail log
// (tail.go). With pebble.Sync the commit waits for write(2) and then
// fsync. Commits that wait (every commit in `fsync` mode; in `wal` mode
// the head checkpoint, state changes, prunes and Close) use pebble.Sync,
// and in `wal` mode this wrapper turns the WAL file's sync into a no-op:
// the commit returns after write(2) handed the bytes to the kernel, which
// keeps them through a process kill but not a power cut. Syncs of
// everything else (sstables, MANIFEST, directories) pass through
// unchanged, so Pebble's own consistency is untouched.
type walFS struct {
	vfs.FS
	// skipWALSync is true in `wal` mode; Close clears it so that a clean
	// shutdown syncs the WAL for real.
	skipWALSync atomic.Bool
	walSyncs    atomic.Uint64 // fsyncs issued on WAL files
	walSkipped  atomic.Uint64 // WAL syncs turned into no-ops (`wal` mode)
	// walFailed is set when a write to a WAL file fails; openDB clears it.
	// Pebble's WAL writer keeps such an error to itself until its next
	// block fills, and then the commit after that panics inside Pebble
	// holding Pebble's commit lock (commitWrite, v2.1.7), which nothing
	// can recover from in-process. A `wal`-mode commit does not wait for
	// the WAL writer (tail.go), so the committer checks this first.
	walFailed atomic.Bool
	// readOnly: the journal was opened ReadOnly, and may be on a mount
	// that refuses to open its LOCK file for writing (see Lock).
	readOnly bool
}

// Lock takes the directory lock Pebble's way: an exclusive fcntl lock on
// the LOCK file, opened for writing. A read-only journal whose LOCK file
// cannot be opened for writing (a read-only mount, an evidence copy) takes
// a shared lock on it opened for reading instead, which a writer in another
// process refuses as it refuses the exclusive one. That cannot meet a
// writer in this process (whose fcntl lock the shared one would not see,
// and whose lock closing the file would drop), since that writer opened the
// same file for writing.
func (fs *walFS) Lock(name string) (io.Closer, error) {
	c, err := fs.FS.Lock(name)
	if err == nil || !fs.readOnly || !cannotOpenForWriting(err) {
		return c, err
	}
	f, err := fs.FS.Open(name)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return noLock{}, nil // no LOCK file: no writer ever opened the directory
		}
		return nil, err
	}
	spec := syscall.Flock_t{Type: syscall.F_RDLCK, Whence: io.SeekStart}
	if err := syscall.FcntlFlock(f.Fd(), syscall.F_SETLK, &spec); err != nil {
		_ = f.Close()
		return nil, err
	}
	return f, nil
}

type noLock struct{}

func (noLock) Close() error { return nil }

// cannotOpenForWriting: the LOCK file's open failed for want of write
// access. A held lock is fcntl's bare errno, never a *fs.PathError.
func cannotOpenForWriting(err error) bool {
	var pathErr *fs.PathError
	return errors.As(err, &pathErr) &&
		(errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM))
}

func isWALFile(name string, category vfs.DiskWriteCategory) bool {
	return category == "pebble-wal" || strings.HasSuffix(name, ".log")
}

func (fs *walFS) wrap(f vfs.File, name string, category vfs.DiskWriteCategory) vfs.File {
	if !isWALFile(name, category) {
		return f
	}
	return &walFile{File: f, fs: fs}
}

func (fs *walFS) Create(name string, category vfs.DiskWriteCategory) (vfs.File, error) {
	f, err := fs.FS.Create(name, category)
	if err != nil {
		return nil, err
	}
	return fs.wrap(f, name, category), nil
}

func (fs *walFS) ReuseForWrite(oldname, newname string, category vfs.DiskWriteCategory) (vfs.File, error) {
	f, err := fs.FS.ReuseForWrite(oldname, newname, category)
	if err != nil {
		return nil, err
	}
	return fs.wrap(f, newname, category), nil
}

func (fs *walFS) OpenReadWrite(name string, category vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	f, err := fs.FS.OpenReadWrite(name, category, opts...)
	if err != nil {
		return nil, err
	}
	return fs.wrap(f, name, category), nil
}

// Unwrap lets Pebble see through to the underlying FS where it checks for
// one (for example for disk-usage queries).
func (fs *walFS) Unwrap() vfs.FS { return fs.FS }

// walFile counts and, in `wal` mode, elides the syncs of one WAL file.
type walFile struct {
	vfs.File
	fs *walFS
}

func (f *walFile) Write(p []byte) (int, error) {
	n, err := f.File.Write(p)
	if err != nil {
		f.fs.walFailed.Store(true)
	}
	return n, err
}

func (f *walFile) WriteAt(p []byte, off int64) (int, error) {
	n, err := f.File.WriteAt(p, off)
	if err != nil {
		f.fs.walFailed.Store(true)
	}
	return n, err
}

func (f *walFile) Sync() error {
	if f.fs.skipWALSync.Load() {
		f.fs.walSkipped.Add(1)
		return nil
	}
	f.fs.walSyncs.Add(1)
	return f.File.Sync()
}

func (f *walFile) SyncData() error {
	if f.fs.skipWALSync.Load() {
		f.fs.walSkipped.Add(1)
		return nil
	}
	f.fs.walSyncs.Add(1)
	return f.File.SyncData()
}

func (f *walFile) SyncTo(length int64) (fullSync bool, err error) {
	if f.fs.skipWALSync.Load() {
		f.fs.walSkipped.Add(1)
		return false, nil
	}
	f.fs.walSyncs.Add(1)
	return f.File.SyncTo(length)
}

// pebbleFatal is what pebbleLogger.Fatalf panics with. Pebble requires
// Fatalf not to return (db.go: after "fatal commit error" it would
// otherwise report the failed commit as a success). On the committer
// goroutine the journal recovers this panic and turns it into
// ErrUnavailable; on Pebble's own background goroutines (a failed MANIFEST
// write, say) it ends the process, which is what Pebble asks for.
type pebbleFatal struct{ msg string }

func (p pebbleFatal) Error() string { return "pebble fatal: " + p.msg }

// pebbleLogger sends Pebble's log lines through zap.
type pebbleLogger struct{ z *zap.SugaredLogger }

var _ pebble.Logger = pebbleLogger{}

func (l pebbleLogger) Infof(format string, args ...any)  { l.z.Infof(format, args...) }
func (l pebbleLogger) Errorf(format string, args ...any) { l.z.Errorf(format, args...) }
func (l pebbleLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	l.z.Errorw("pebble fatal error", "message", msg)
	panic(pebbleFatal{msg: msg})
}
