"""PyTorch models and optimizers to and from the one checkpoint format (stage 5, and the torch
paths of later stages), and spike rates recorded by forward hooks. Imports torch only here."""
import os
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from spikelib.checkpoint import check_shapes
from spikelib.cli import check_choices, check_fields

RUN_CHOICES = {"kernels": ("auto", "triton", "torch"), "device": ("auto", "cuda", "cpu"),
               "dtype": ("auto", "bfloat16", "float32")}


def check_run(rc):
    """Stage 5's RunConfig: each choice among RUN_CHOICES, chunk and grad_accum at least 1
    (ValueError, one line, otherwise)."""
    check_choices(rc, RUN_CHOICES)
    check_fields(rc, {"chunk": ">= 1", "grad_accum": ">= 1"})


def resolve_run(rc, have_triton):
    """A run config (kernels, device, dtype) with its "auto" choices made for this machine."""
    if rc.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this torch sees no CUDA GPU; use --device cpu")
    device = rc.device if rc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    kernels = rc.kernels
    if kernels == "auto":
        kernels = "triton" if device == "cuda" and have_triton else "torch"
    if kernels == "triton" and not have_triton:
        raise ValueError("--kernels triton needs the triton package; use --kernels torch")
    if kernels == "triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--kernels triton needs a CUDA GPU (or TRITON_INTERPRET=1 for slow CPU checks)")
    dtype = rc.dtype if rc.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return replace(rc, kernels=kernels, device=device, dtype=dtype)


def load_params(model, params, shapes):
    """Copy {name: array} into the model's parameters of the same names; shapes must match."""
    check_shapes("parameters", params, shapes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.as_tensor(np.asarray(params[name], dtype=np.float32)))


def export_params(model):
    """{name: float32 array} of every parameter, the checkpoint's layout."""
    return {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters()}


def load_adam_moments(opt, opt_state, step):
    """Put a checkpoint's AdamW moments {"m": {name: array}, "v": {...}} into a torch AdamW whose
    groups each hold one parameter and its "name", as if it had taken `step` steps."""
    fused = opt.defaults.get("fused")                  # a fused AdamW keeps its step count on the GPU
    for group in opt.param_groups:
        p, name = group["params"][0], group["name"]
        opt.state[p] = {"step": torch.tensor(float(step), device=p.device if fused else "cpu"),
                        "exp_avg": torch.as_tensor(opt_state["m"][name], device=p.device).clone(),
                        "exp_avg_sq": torch.as_tensor(opt_state["v"][name], device=p.device).clone()}


def export_adam_moments(opt):
    """{"m": {name: array}, "v": {...}}, the checkpoint layout (zeros before the first step)."""
    out = {"m": {}, "v": {}}
    for group in opt.param_groups:
        p, name = group["params"][0], group["name"]
        st = opt.state.get(p) or {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        out["m"][name] = st["exp_avg"].cpu().numpy()
        out["v"][name] = st["exp_avg_sq"].cpu().numpy()
    return out


@contextmanager
def record_spike_rates(blocks, where):
    """Per block {site: fraction of nonzero outputs of the submodule at where[site]}, filled in by
    forward hooks during the forwards run inside `with`; the hooks are removed when it ends."""
    rates = [dict.fromkeys(where) for _ in blocks]
    hooks = []
    for block, layer in zip(blocks, rates):
        for site, path in where.items():
            def hook(module, inputs, out, layer=layer, site=site):
                layer[site] = float((out != 0).float().mean())
            hooks.append(block.get_submodule(path).register_forward_hook(hook))
    try:
        yield rates
    finally:
        for h in hooks:
            h.remove()
