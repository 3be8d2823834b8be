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
import zipfile
from pathlib import Path

import numpy as np

from spikelib.files import atomic_write

FORMAT = "spike-transformer-checkpoint"
VERSION = 4
# Version 1 predates the per-head decay fields: its heads all decayed as gamma_h = 1 - 2^-(5 + h),
# which version 2 writes as decay_start 5, decay_step 1. Version 1 files load with those values.
# Version 3 adds the neuron options spike_fn, quant, syn_alpha and the lits neuron (with its
# per-site parameters scale_pos, scale_neg). Versions 1 and 2 lack them and load with their
# defaults (heaviside, round_ste, 0), which are the model those files were trained as.
V1_DECAYS = {"decay_start": 5.0, "decay_step": 1.0}
# Version 3 also adds the model field rate_coding (stage 7's converted networks; false for versions 1
# and 2). Code that reads only version 2 refuses version 3 files rather than running a rate-coded or
# lits network as a plain one.
# Version 4 adds the model field token_shift (keys and values read, in half the channels, the previous
# position's spikes);
# versions 1 to 3 lack it and load with token_shift false, the model they were. Code that reads only
# version 3 refuses version 4 files rather than running a shifted network as an unshifted one.
READABLE = (1, 2, 3, VERSION)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, or does not fit the model."""


def save_checkpoint(path, params: dict, config: dict, opt_state: dict | None = None) -> Path:
    """Write params (+ optional {"m": {...}, "v": {...}}) and config atomically.

    The file is written next to its destination and renamed into place
    (spikelib.files.atomic_write), so a crash or a full disk mid-write leaves
    the previous checkpoint untouched.
    """
    path = Path(path)
    doc = dict(config, format=FORMAT, version=VERSION)
    arrays = {"config.json": np.frombuffer(json.dumps(doc, indent=1).encode(), dtype=np.uint8)}
    for name, value in params.items():
        arrays["param/" + name] = np.asarray(value, dtype=np.float32)
    for moment, values in (opt_state or {}).items():
        for name, value in values.items():
            arrays[f"opt/{moment}/{name}"] = np.asarray(value, dtype=np.float32)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def read_npz(path) -> dict:
    """Every array of an .npz file, never unpickling. A file that is not a complete .npz archive
    is a ValueError saying so (numpy's own error for one would suggest loading it with pickle)."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a complete .npz archive")
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def load_checkpoint(path, expected_shapes: dict | None = None):
    """Return (params, config, opt_state or None) from a checkpoint file.

    expected_shapes, when given, maps every parameter name to its shape; a
    missing, extra or misshapen parameter raises CheckpointError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        arrays = read_npz(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from None
    if "config.json" not in arrays:
        raise CheckpointError(f"checkpoint {path} has no config.json entry")
    try:
        config = json.loads(arrays.pop("config.json").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable config: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: config.json holds a JSON {type(config).__name__}, "
                              f"not an object")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (format={config.get('format')!r})")
    version = config.get("version")
    if isinstance(version, str):
        raise CheckpointError(f"{path} has format version {version!r}, a string; this code reads "
                              f"the number {VERSION}")
    if isinstance(version, bool) or version not in READABLE:
        raise CheckpointError(f"{path} has format version {version!r}, this code reads {VERSION}")
    if not isinstance(config.get("model", {}), dict):
        raise CheckpointError(f"checkpoint {path}: \"model\" must be a JSON object")
    if version == 1 and "model" in config:
        config["model"] = dict(V1_DECAYS, **config["model"])
    params, opt = {}, {}
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"checkpoint {path}: {key} holds {value.dtype} values; "
                                  f"parameters and optimizer moments must be floating point")
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
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {path}: {name} has shape {arrays[name].shape}, "
                                  f"the model needs {tuple(shape)}")


def check_vocab(model_vocab_size, tokenizer_vocab_size, path="checkpoint"):
    """A model must have a row for every id its tokenizer can produce: refuse a smaller vocab.

    Without this check an id >= model_vocab_size indexes past the embedding: an IndexError in
    NumPy, garbage or a crash on other backends. A larger model vocab is fine (unused rows).
    """
    if int(model_vocab_size) < int(tokenizer_vocab_size):
        raise CheckpointError(f"{path}: the model's vocab_size {model_vocab_size} is smaller than its "
                              f"tokenizer's {tokenizer_vocab_size}; token ids would fall outside the "
                              f"embedding. Train with --vocab_size {tokenizer_vocab_size} or more.")


def tokenizer_info(config, path="checkpoint"):
    """The checkpoint's "tokenizer" record ({"path", "sha256", "vocab_size"}), or a CheckpointError."""
    info = config.get("tokenizer")
    if not isinstance(info, dict) or not isinstance(info.get("path"), str) or "sha256" not in info:
        raise CheckpointError(f"{path} records no tokenizer (its config lacks \"tokenizer\" with a "
                              f"path and sha256), so its token ids cannot be decoded")
    return info


def data_ref(data_dir, ckpt_path) -> dict:
    """How a checkpoint refers to its dataset folder, stored under config["data"].

    dir:             as given (relative to the working folder at training time, as before)
    absolute:        the full path: found from any working folder while nothing moves
    from_checkpoint: relative to the checkpoint's folder: found after moving both together
                     (None when there is no relative path, e.g. another drive on Windows)
    """
    data_dir, ckpt_dir = Path(data_dir), Path(ckpt_path).resolve().parent
    try:
        relative = Path(os.path.relpath(data_dir.resolve(), ckpt_dir)).as_posix()
    except ValueError:
        relative = None
    return {"dir": str(data_dir), "absolute": str(data_dir.resolve()), "from_checkpoint": relative}


def tokenizer_path(config, ckpt_path, data_dir=None, hint="pass the dataset folder that holds "
                   "tokenizer.json") -> Path:
    """The checkpoint's tokenizer.json: the first of these that exists, else a CheckpointError.

    1. data_dir/tokenizer.json, when the caller names a dataset folder
    2. the tokenizer path stored in the checkpoint, as given (the working folder of training)
    3. the dataset folder relative to the checkpoint (data_ref's from_checkpoint)
    4. the stored path relative to the checkpoint's folder
    5. the dataset folder's absolute path at training time
    The caller still compares the file's sha256 with the checkpoint's (a folder may be rebuilt).
    """
    info = tokenizer_info(config, ckpt_path)
    ckpt_dir = Path(ckpt_path).parent
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    stored = Path(info["path"])
    candidates = [Path(data_dir) / "tokenizer.json"] if data_dir else []
    candidates.append(stored)
    if isinstance(data.get("from_checkpoint"), str):
        candidates.append(ckpt_dir / data["from_checkpoint"] / "tokenizer.json")
    if not stored.is_absolute():
        candidates.append(ckpt_dir / stored)
    if isinstance(data.get("absolute"), str):
        candidates.append(Path(data["absolute"]) / "tokenizer.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise CheckpointError(f"{ckpt_path}: its tokenizer is not at {tried}; {hint}")
