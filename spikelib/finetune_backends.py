"""Stage 6's gradients from the other backends: the MLX model of stage 4 and the PyTorch model
of stage 5 (Triton kernels on a GPU, torch ops on a CPU). Each turns (parameters, batch) into
(the masked answer loss, dL/dparam for every model parameter), as stage 6's numpy_backend does
with stage 3's hand-written backward; the loss is the same: the mean cross-entropy of the tokens
where mask is 1. The fine-tuning itself (LoRA's chain rule, AdamW) stays in stage 6.
TorchReader is stage 5's model forward only, for scoring answers and validation text on a GPU."""
import numpy as np

from spikelib.stages import load_stage


def mlx_backend(mcfg):
    """Stage 4: the MLX model holds the parameters, nn.value_and_grad gives the gradients."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    S4 = load_stage("4_spike_llm_mlx")
    model = S4.build_model(mcfg, load_stage("3_spike_llm_numpy").init_params(mcfg))

    def loss_fn(model, x, y, m):
        logits = model(x)[0]
        return (nn.losses.cross_entropy(logits, y, reduction="none") * m).sum() / m.sum()
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def grad_fn(params, x, y, mask):
        model.load_weights([(k, mx.array(np.asarray(v, np.float32))) for k, v in params.items()])
        loss, grads = value_and_grad(model, mx.array(x), mx.array(y), mx.array(mask.astype(np.float32)))
        return loss.item(), {k: np.array(g) for k, g in tree_flatten(grads)}
    return grad_fn


def triton_backend(mcfg):
    """Stage 5: the PyTorch model (Triton kernels on a GPU, torch ops on a CPU), autograd."""
    import torch
    import torch.nn.functional as F

    from spikelib.torch_io import resolve_run
    S5 = load_stage("5_spike_llm_triton")
    run = resolve_run(S5.RunConfig(dtype="float32"), have_triton=S5.triton is not None)
    shapes = S5.S3.param_shapes(mcfg)
    model = S5.build_model(mcfg, run).eval()          # no dropout: every backend, the same gradients

    def grad_fn(params, x, y, mask):
        S5.load_params(model, params, shapes)
        model.zero_grad(set_to_none=True)
        logits = model(torch.from_numpy(x).to(run.device))                     # (B, L, V)
        targets = torch.from_numpy(y).to(run.device).flatten()
        nll = F.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        m = torch.from_numpy(mask.astype(np.float32)).to(run.device).flatten()
        loss = (nll * m).sum() / m.sum()
        loss.backward()
        return loss.item(), {n: p.grad.float().cpu().numpy() for n, p in model.named_parameters()}
    return grad_fn


class TorchReader:
    """Stage 5's model, forward only, as stage 6's NumpyReader is stage 3's: start(B) is a zero state
    (stage 5's init_state: per-layer attention states, then any token shift slots); read(state, ids
    (B, L)) reads the L positions from the state, a
    chunked parallel prefill for L > 1 and one step of the Triton decoding kernel for L == 1 on a GPU
    (torch ops on a CPU), updating the list's entries, and returns the next-token logits after the
    last position, (B, V) float32 NumPy. Built from the parameters of one scoring pass."""

    def __init__(self, params, mcfg):
        import torch

        from spikelib.torch_io import resolve_run
        S5 = load_stage("5_spike_llm_triton")
        self.torch = torch
        self.run = resolve_run(S5.RunConfig(dtype="float32"), have_triton=S5.triton is not None)
        self.model = S5.build_model(mcfg, self.run, params).eval()

    def start(self, batch):
        return self.model.init_state(batch)

    def read(self, state, ids):
        with self.torch.no_grad():
            logits = self.model(self.torch.as_tensor(ids, device=self.run.device), state)   # (B, L, V)
        return logits[:, -1].float().cpu().numpy()

    def eval_report(self, val, max_tokens, decode):
        """Stage 5's validation figures (spikelib/torch_run.py): stage 3's windows, on the device."""
        from spikelib.torch_run import eval_report
        return eval_report(self.model, val, self.model.cfg.context, max_tokens, decode)
