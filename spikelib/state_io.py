"""Conversation state files (stage 8): a model's recurrent state saved to disk and read back.

A state file is one `.npz` (read with `allow_pickle=False`, so loading it can never run code):

    state.json     uint8 bytes of a UTF-8 JSON header: format, version, the model's fingerprint
                   and whatever the writer adds (positions per conversation, open replies ...)
    <name>         float32 / int arrays of the state (stage 8 writes layer/<i>, logits and, for a
                   model with token_shift, shift/<k>: the previous position's shifted spikes)

The fingerprint is the sha256 of the model config and of every parameter's name, shape and
bytes, so a state is refused by any other model, even one of the same shapes. Writes are
atomic: a temporary file in the same folder, fsync, then os.replace.
"""
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from spikelib.checkpoint import CheckpointError, read_npz

FORMAT = "spike-transformer-chat-state"
VERSION = 1


class StateFileError(CheckpointError):
    """A state file that is missing, corrupt, or belongs to another model."""


def model_fingerprint(params: dict, model_config: dict) -> str:
    """sha256 of the model config (JSON, sorted keys) and of each parameter (name, shape, float32 bytes)."""
    h = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
    for name in sorted(params):
        p = np.ascontiguousarray(np.asarray(params[name], dtype=np.float32))
        h.update(f"{name}{p.shape}".encode())
        h.update(p.tobytes())
    return h.hexdigest()


def save_state(path, arrays: dict, header: dict) -> Path:
    """Write arrays and the JSON header atomically (a crash mid-write keeps the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(header, format=FORMAT, version=VERSION)
    out = {"state.json": np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)}
    out.update({name: np.asarray(a) for name, a in arrays.items()})
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_state(path, fingerprint: str):
    """(arrays, header) of a state file written for the model with this fingerprint; StateFileError
    (one line) when the file is missing, unreadable, of another format or of another model."""
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"state file {path} does not exist")
    try:
        arrays = read_npz(path)
        doc = json.loads(arrays.pop("state.json").tobytes().decode())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, UnicodeDecodeError) as err:
        raise StateFileError(f"state file {path} is corrupt or not a state file: {str(err)[:80]}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise StateFileError(f"{path} is not a {FORMAT} file of version {VERSION}")
    if doc.get("fingerprint") != fingerprint:
        raise StateFileError(f"state file {path} belongs to another model (fingerprint "
                             f"{str(doc.get('fingerprint'))[:12]}..., this model {fingerprint[:12]}...)")
    return arrays, doc
