"""The one checkpoint format shared by every backend (stages 3, 4, 5 and 6).

A checkpoint is a single `.npz` file (a zip of `.npy` arrays, read with
`allow_pickle=False`, so loading it can never run code):

    config.json        uint8 bytes of a UTF-8 JSON document (see below)
    param/<name>       float32 model parameter, e.g. param/blocks.0.attn.wq
    opt/m/<name>       float32 AdamW first moment   (optional)
    opt/v/<name>       float32 AdamW second moment  (optional)

The JSON document holds {"format": FORMAT, "version": VERSION, "model": {...},
...}: every model hyperparameter under "model", and whatever else the writer
wants to keep (tokenizer identity, training step, optimizer settings).
Parameter names and shapes are listed in README.md.
"""
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT = "spike-transformer-checkpoint"
VERSION = 2
# Version 1 predates the per-head decay fields: its heads all decayed as gamma_h = 1 - 2^-(5 + h),
# which version 2 writes as decay_start 5, decay_step 1. Version 1 files load with those values.
V1_DECAYS = {"decay_start": 5.0, "decay_step": 1.0}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit the model."""


def save_checkpoint(path, params: dict, config: dict, opt_state: dict | None = None) -> Path:
    """Write params (+ optional {"m": {...}, "v": {...}}) and config atomically.

    The file is written next to its destination and renamed into place, so a
    crash mid-write leaves the previous checkpoint untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(config, format=FORMAT, version=VERSION)
    arrays = {"config.json": np.frombuffer(json.dumps(doc, indent=1).encode(), dtype=np.uint8)}
    for name, value in params.items():
        arrays["param/" + name] = np.asarray(value, dtype=np.float32)
    for moment, values in (opt_state or {}).items():
        for name, value in values.items():
            arrays[f"opt/{moment}/{name}"] = np.asarray(value, dtype=np.float32)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, expected_shapes: dict | None = None):
    """Return (params, config, opt_state or None) from a checkpoint file.

    expected_shapes, when given, maps every parameter name to its shape; a
    missing, extra or misshapen parameter raises CheckpointError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from None
    if "config.json" not in arrays:
        raise CheckpointError(f"checkpoint {path} has no config.json entry")
    try:
        config = json.loads(arrays.pop("config.json").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable config: {err}") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (format={config.get('format')!r})")
    if config.get("version") == 1 and isinstance(config.get("model"), dict):
        config["model"] = dict(V1_DECAYS, **config["model"])
    elif config.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {config.get('version')}, this code reads {VERSION}")
    params, opt = {}, {}
    for key, value in arrays.items():
        kind, _, name = key.partition("/")
        if kind == "param":
            params[name] = value
        elif kind == "opt":
            moment, _, pname = name.partition("/")
            opt.setdefault(moment, {})[pname] = value
    if expected_shapes is not None:
        check_shapes(path, params, expected_shapes)
        for moment in opt.values():
            check_shapes(path, moment, expected_shapes)
    return params, config, (opt or None)


def check_shapes(path, arrays: dict, expected: dict):
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {path}: {name} has shape {arrays[name].shape}, the model needs {tuple(shape)}")
