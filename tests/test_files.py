"""spikelib.files.atomic_write: a failed write keeps the old file, leaves no temp, honours the umask."""
import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from spikelib.checkpoint import save_checkpoint
from spikelib.files import atomic_write, stale_temps, write_bytes_atomic


def disk_full(f):
    f.write(b"partial data")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, error):
    path = write_bytes_atomic(tmp_path / "lora.npz", b"the previous adapters")

    def failing(f):
        f.write(b"half of the new file")
        raise error
    with pytest.raises(type(error)):
        atomic_write(path, failing)
    assert path.read_bytes() == b"the previous adapters"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.npz"]


def test_savez_running_out_of_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    params = {"w": np.ones((3, 2))}
    path = save_checkpoint(tmp_path / "ckpt.npz", params, {"model": {}})
    before = path.read_bytes()

    def savez_disk_full(f, **arrays):
        f.write(b"PK\x03\x04 a torn zip")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", savez_disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"w": np.zeros((3, 2))}, {"model": {}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "ckpt.npz", {"w": np.ones(2)}, {"model": {}})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def dead_pid():
    """The id of a process that has exited (and been reaped), so it names no running process."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temps_of_interrupted_saves_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "ckpt.npz"
    leftovers = [tmp_path / "ckpt.npz.tmp",                      # older stage 1/2 writers
                 tmp_path / "ckpt.npz.k2x_9abc.tmp",             # older mkstemp names
                 tmp_path / f"ckpt.npz.{dead_pid()}.0badc0de.tmp"]  # a writer killed outright
    running = tmp_path / f"ckpt.npz.{os.getppid()}.00c0ffee.tmp"  # a writer still at work
    other = tmp_path / "val.bin.tmp"                              # another file's temp
    for p in leftovers + [running, other]:
        p.write_bytes(b"x" * 100)
    assert sorted(stale_temps(path)) == sorted(leftovers)
    save_checkpoint(path, {"w": np.ones(2)}, {"model": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt.npz", running.name, other.name])
