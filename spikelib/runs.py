"""What a training run reads and writes around its model: the prepared dataset (stages 1 and 2),
the tokenizer a checkpoint belongs to, and model checkpoints in the one format of
spikelib.checkpoint. Shared by stages 3-6."""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from spikelib.evaluation import eval_windows
from spikelib.checkpoint import (CheckpointError, check_shapes, check_vocab, data_ref, load_checkpoint,
                                 save_checkpoint, tokenizer_path)
from spikelib.stages import load_stage


def prepare_dataset(source="builtin", root="data"):
    """Dataset dir with train/val .bin and tokens.json: runs stage 1 and stage 2 (no-ops when done)."""
    data_dir = Path(load_stage("1_data").prepare(source, root))
    load_stage("2_tokenizer").build(data_dir)
    return data_dir


def open_split(data_dir, split):
    """The token ids of a split as a read-only memory map (uint16)."""
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.uint16, mode="r")


def batch_rng(seed, step):
    """A generator fixed by (seed, step): a resumed run draws exactly the same batches."""
    return np.random.default_rng([seed, step])


def get_batch(data, batch_size, context, rng, repeat=0.0):
    """Random windows: x = data[i:i+L], y = data[i+1:i+L+1]; both (B, L) int64. repeat: the chance
    that a window is a passage read twice, data[i:i+h] then data[i:i+L+1-h] with h = (L+1)//2, so
    its second half is predicted best by copying the first (a drill for copying from context)."""
    if len(data) < context + 2:
        raise ValueError(f"split has {len(data)} tokens, fewer than context+2 = {context + 2}")
    starts = rng.integers(0, len(data) - context, size=batch_size)
    windows = np.stack([data[i:i + context + 1] for i in starts]).astype(np.int64)   # (B, L+1)
    if repeat > 0:                             # drawn only then: other runs keep their batches
        half = (context + 1) // 2
        twice = rng.random(batch_size) < repeat                                       # (B,)
        windows[twice, half:] = windows[twice, :context + 1 - half]   # the right side is a copy
    return windows[:, :-1].copy(), windows[:, 1:].copy()     # contiguous, as callers may view them


def load_dataset_info(data_dir):
    """(tokens.json dict, tokenizer, tokenizer_info) of a prepared dataset dir."""
    data_dir = Path(data_dir)
    load_stage("2_tokenizer").check_token_ids(data_dir)     # whole uint16 ids, all inside the vocabulary
    meta = json.loads((data_dir / "tokens.json").read_text())
    tok = load_stage("2_tokenizer").Tokenizer.load(data_dir / "tokenizer.json")
    info = {"path": str(data_dir / "tokenizer.json"), "sha256": meta["tokenizer_sha256"],
            "vocab_size": meta["vocab_size"]}
    return meta, tok, info


def check_tokenizer(config, sha256, path="checkpoint"):
    """Refuse to pair a checkpoint with a tokenizer other than the one it was trained with."""
    have = config.get("tokenizer", {}).get("sha256")
    if have != sha256:
        raise CheckpointError(f"{path} was trained with tokenizer sha256 {str(have)[:12]}..., "
                              f"but the dataset's tokenizer is {sha256[:12]}...; use the matching data dir")


def load_tokenizer(config, ckpt):
    """The tokenizer a checkpoint was trained with, found where the checkpoint says (tokenizer_path)
    and checked: the same hash, and no id the model has no embedding row for."""
    tok = load_stage("2_tokenizer").Tokenizer.load(tokenizer_path(config, ckpt))
    check_tokenizer(config, tok.sha256(), ckpt)
    check_vocab(config["model"]["vocab_size"], tok.vocab_size, ckpt)
    return tok


def save_model(path, params, mcfg, tcfg, step, opt_state=None, tokenizer_info=None, data_dir=None):
    """Atomic checkpoint: params, optimizer moments, and the model, training and tokenizer
    settings as the config document (README: checkpoint format)."""
    tok = dict(tokenizer_info or {})
    if data_dir is None and tok.get("path"):
        data_dir = Path(tok["path"]).parent
    config = {"model": asdict(mcfg), "train": dict(asdict(tcfg), step=int(step)), "tokenizer": tok,
              "data": data_ref(data_dir, path) if data_dir else {"dir": ""}}
    return save_checkpoint(path, params, config, opt_state)


def load_model(path, config_cls, shapes_of):
    """(params, model config, train dict, step, opt_state or None, config) of a checkpoint whose
    model config builds config_cls and whose parameters have the shapes shapes_of(config) gives;
    CheckpointError on any problem."""
    params, config, opt = load_checkpoint(path)
    try:
        mcfg = config_cls(**config["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {err}") from None
    shapes = shapes_of(mcfg)
    check_shapes(path, params, shapes)
    if opt is not None and set(opt) != {"m", "v"}:
        raise CheckpointError(f"checkpoint {path}: optimizer state needs m and v, found {sorted(opt)}")
    for moment in (opt or {}).values():
        check_shapes(path, moment, shapes)
    for name, p in params.items():
        if not np.all(np.isfinite(p)):
            raise CheckpointError(f"checkpoint {path}: parameter {name} has non-finite values")
    train = config.get("train", {})
    return params, mcfg, train, int(train.get("step", 0)), opt, config


def summary_inputs(data_dir, context, tok):
    """What a finished run reports on: 8 validation windows for the spike statistics, and as the
    sample's prompt the opening words of the first line of prose in the validation text."""
    val = open_split(data_dir, "val")
    x, _ = eval_windows(val, context, 8 * context)
    return x, prose_prompt(tok.decode(np.asarray(val[:4096]).tolist()))


def prose_prompt(text, words=5):
    """The first `words` words of the first line that reads as prose (a capital, six or more words,
    no table or markup characters), else of the text: a small model asked to go on from a sentence
    writes sentences, where a heading or a table row would have it write markup."""
    for line in text.splitlines():
        if len(line.split()) >= 6 and line[:1].isupper() and not set("|*=:<>{}[]#") & set(line):
            return " ".join(line.split()[:words])
    return " ".join(text.split()[:words])
