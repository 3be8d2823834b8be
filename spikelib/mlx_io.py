"""MLX models to and from the one checkpoint format (stage 4, and the MLX paths of later stages),
validation figures and spike rates from an MLX model, and the --device choice. Imports mlx only here."""
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from spikelib.evaluation import validation_report
from spikelib.runs import save_model


def numpy_params(model):
    """{name: float32 array} in the checkpoint's names, e.g. blocks.0.attn.wq."""
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def save(path, model, opt, cfg, tcfg, step, tok_info, data_dir):
    """Stage 3's checkpoint: float32 params, the AdamW moments (opt.state, flat {name: array}
    per moment), config JSON with the step."""
    opt_state = {m: {k: np.array(a) for k, a in arrays.items()} for m, arrays in opt.state.items()}
    return save_model(path, numpy_params(model), cfg, tcfg, step, opt_state, tok_info, data_dir)


def batch_nats(model, x, y):
    """Total nats of the targets y (B, L) under the parallel form, forward only."""
    logits, _, _ = model(mx.array(x, mx.int32))
    return nn.losses.cross_entropy(logits, mx.array(y, mx.int32), reduction="sum").item()


def eval_report(model, val, context, max_tokens, decode):
    """Stage 3's validation figures on the same windows, in the same batches."""
    return validation_report(partial(batch_nats, model), val, context, model.cfg.context, max_tokens, decode)


def spike_rates(spikes):
    """Per layer: the fraction of nonzero outputs of every site (stage 3's layout), from the
    spikes an MLX forward returns ([{site: array}] per layer)."""
    return [{site: (s != 0).mean().item() for site, s in layer.items()} for layer in spikes]


def use_device(device):
    """Make --device gpu | cpu MLX's default device (None: leave MLX's own choice); asking for a
    GPU this MLX lacks is a ValueError."""
    if device == "gpu" and not mx.is_available(mx.gpu):
        raise ValueError("--device gpu, but this MLX has no GPU backend (Linux mlx[cpu]); use --device cpu")
    if device:
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
