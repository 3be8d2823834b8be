"""Writing files so that nothing is lost: every file a stage writes goes through atomic_write.

    atomic_write(path, lambda f: f.write(data))

The bytes go to a temp file in the destination's folder, named <name>.<pid>.<random>.tmp, which
is flushed to disk (fsync) and then renamed over the destination (os.replace, atomic on one file
system). A failure at any point, a full disk or Ctrl-C included, removes the temp file and leaves
the previous file as it was. The final file gets the mode the user's umask gives a new file
(0644 under umask 022), as open() would, not the 0600 of tempfile.mkstemp.

A process killed outright (SIGKILL, power loss) cannot clean up: its temp file stays. The next
save of the same destination removes such leftovers: temp files of that name whose process is
gone, and the names older versions used (<name>.tmp, <name>.<random>.tmp).
"""
import glob
import os
import secrets
from pathlib import Path


def atomic_write(path, write_fn):
    """Call write_fn(f) on a binary file that becomes `path` only once it is complete; return path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # mode 0o666 is narrowed by the umask, as for any new file; O_EXCL never follows a symlink
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:          # KeyboardInterrupt too: never leave a half-written temp behind
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return path


def write_bytes_atomic(path, data: bytes):
    return atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path, text: str):
    """UTF-8 text with "\\n" line ends on every platform."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def sync_folder(folder):
    """fsync a folder so the rename itself survives a crash (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:                # some file systems cannot sync a folder; the data is synced
        pass
    finally:
        os.close(fd)


def stale_temps(path):
    """Temp files left by interrupted saves of `path` whose writer is no longer running."""
    path = Path(path)
    prefix = glob.escape(str(path))
    found = glob.glob(prefix + ".tmp") + glob.glob(prefix + ".*.tmp")
    stale = []
    for name in found:
        middle = name[len(str(path)) + 1:-len(".tmp")].split(".")   # "", [pid, random] or [random]
        pid = middle[0] if len(middle) == 2 and middle[0].isdigit() else None
        if pid is None or not process_alive(int(pid)):
            stale.append(Path(name))
    return stale


def remove_stale_temps(path):
    for tmp in stale_temps(path):
        tmp.unlink(missing_ok=True)


def process_alive(pid):
    """Whether a process with this id runs (signal 0 checks without sending anything; POSIX)."""
    if os.name != "posix":
        return True                # cannot tell: keep the file rather than break a running save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # it exists, under another user
        return True
    return True
