"""Stage 5: the stage 3 spiking LLM in PyTorch, with fused Triton kernels for NVIDIA GPUs.

The model is exactly stage 3's (same equations, parameter names and checkpoint file), written
as torch nn.Modules. The file reads reference first: the PyTorch reference of the two spiking
hot spots (a loop over the T timesteps of a neuron, differentiated by autograd; attention in
its chunked form: masked matmuls inside a chunk, a decayed state carried between chunks), the
model, then the Triton fast path that must equal it (--kernels triton): a neuron kernel that
runs all T timesteps in registers and recomputes the membrane in its backward, an attention
kernel with its state in registers (forward and backward, saving only the spikes), and a step
kernel for decoding. Matmuls run in bf16 (spikes are exact in bf16) with fp32 accumulation;
parameters, residual stream and AdamW stay fp32. --compile 1 adds torch.compile on either path.

    python 5_spike_llm_triton.py --preset base --source files:path/to/input.txt --compile 1
    python 5_spike_llm_triton.py --resume 1
    python 5_spike_llm_triton.py --generate "ROMEO:"      # stream from out/triton/ckpt.npz
    python 5_spike_llm_triton.py --kernels torch --device cpu --preset tiny   # no GPU needed
    torchrun --nproc_per_node 2 5_spike_llm_triton.py --preset base --compile 1   # two GPUs, DDP

Checkpoints move freely between stages 3, 4 and 5 (optimizer state included).
"""
import math
import sys
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.cli import add_config_options, config_from_args, stage_parser  # noqa: E402
from spikelib.distributed import SOLO, check_batch, join_group  # noqa: E402
from spikelib.loop import run_steps  # noqa: E402
from spikelib.plots import plot_checkpoint, plot_only  # noqa: E402
from spikelib.report import model_line  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402
from spikelib.torch_io import (check_run, export_params, load_adam_moments, load_params,  # noqa: E402, F401
                               resolve_run)
from spikelib.torch_run import (energy_report, eval_report, evaluate_on_main,  # noqa: E402, F401
                                layerwise_groups, print_run_summary, save_torch_model, set_layerwise_lr,
                                stream_text)

try:
    import triton
    import triton.language as tl
except ImportError:          # macOS, or a torch install without Triton: only --kernels torch
    triton = None

S3 = load_stage("3_spike_llm_numpy")      # the reference: configs, presets, data, schedule, I/O

# ----------------------------------------------------------------------------- config


@dataclass
class RunConfig:
    """What stage 5 adds to stage 3's ModelConfig and TrainConfig (not stored in checkpoints)."""
    kernels: str = "auto"        # auto (triton on CUDA, else torch) | triton | torch
    device: str = "auto"         # auto | cuda | cpu
    dtype: str = "auto"          # matmul dtype: auto (bfloat16 on CUDA, else float32) | bfloat16 | float32
    compile: bool = False        # torch.compile the model (either kernels; first steps compile)
    chunk: int = 64              # attention chunk length for the training form
    grad_accum: int = 1          # micro-batches per step and process: the same global --batch_size
    # in smaller pieces (less memory, the same step up to float rounding)

    def __post_init__(self):
        check_run(self)              # the choices listed above; chunk and grad_accum >= 1

# ----------------------------------------------------------------------------- PyTorch reference


def surrogate_grad(u, cfg):
    """S'(u), u = v - threshold: the gradient given to the step H(u) (stage 3's formulas)."""
    a = cfg.alpha
    if cfg.surrogate == "arctan":
        return (a / 2) / (1 + (math.pi / 2 * a * u) ** 2)
    if cfg.surrogate == "sigmoid":
        sig = torch.sigmoid(a * u)
        return a * sig * (1 - sig)
    if cfg.surrogate == "fast_sigmoid":
        return a / (2 * (1 + a * u.abs()) ** 2)
    return (1 - u.abs() * a).clamp(min=0) * a


class Heaviside(torch.autograd.Function):
    """Forward H(u) = [u > 0]; backward the surrogate derivative S'(u)."""

    @staticmethod
    def forward(ctx, u, cfg):
        ctx.save_for_backward(u)
        ctx.cfg = cfg
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g * surrogate_grad(u, ctx.cfg), None


def spike_torch(u, cfg, noisy):
    """Stage 3's step_fn. heaviside: H(u), surrogate backward. sigmoid4x: p = sigmoid(4u) quantized
    (noisy: with uniform draws, training) as out = q + (p - p.detach()): exactly q forward (p - p is
    0), and d out/dp = 1 backward (the straight-through rule); identity: p itself."""
    if cfg.spike_fn == "heaviside":
        return Heaviside.apply(u, cfg)
    p = torch.sigmoid(4 * u)
    if cfg.quant == "identity":
        return p
    n = torch.rand_like(p) if noisy else None
    q = u >= 0 if n is None else (n >= 1 - p) if cfg.quant == "stochastic_round_ste" else (n < p)
    return q.to(p.dtype) + (p - p.detach())


def neuron_torch(x, beta, theta, cfg, scales=(1.0, 1.0), noisy=False):
    """The eager loop over T: v_t = beta v+_{t-1} + syn_t, spike, reset; autograd does BPTT.
    syn_t = a syn_{t-1} + (1 - a) x_t (the S trace; x_t when a = 0); lits scales its output."""
    x, a_syn = x.float(), cfg.syn_alpha
    vp, a, syn, out = 0.0, 0.0, 0.0, []
    for t in range(x.shape[0]):
        syn = a_syn * syn + (1 - a_syn) * x[t] if a_syn else x[t]
        v = beta * vp + syn
        thr = theta + a
        if cfg.neuron in S3.TERNARY:
            sp, sn = spike_torch(v - thr, cfg, noisy), spike_torch(-v - thr, cfg, noisy)
            s = scales[0] * sp - scales[1] * sn
            r = sp - sn if cfg.reset == "soft" else sp + sn
        else:
            s = r = spike_torch(v - thr, cfg, noisy)
        if cfg.detach_reset:
            r = r.detach()
        vp = v - thr * r if cfg.reset == "soft" else v * (1 - r)
        if cfg.neuron == "alif":
            a = cfg.alif_rho * a + cfg.alif_kappa * s
        out.append(s)
    return torch.stack(out)


def attention_chunked(q, k, v, linear, chunk, decay, state=None, want_state=False):
    """Causal decayed attention, q, k, v: (N, H, L, dh) fp32 or fp64 (N = T*B), in chunks of c positions.

    linear:   y_l = sum_{j<=l} gamma^(l-j) (q_l . k_j) v_j    hadamard: y_l = sum_{j<=l} gamma^(l-j) k_j*v_j
    Inside a chunk: (Q K^T * Dc) V with Dc[i, j] = gamma^(i-j). Across chunks: the state before
    chunk m, S_m = gamma^(c m) S_0 + sum_{m'<m} gamma^(c (m-1-m')) K_m'^T diag(gamma^(c-1-j)) V_m',
    reaches position i of chunk m as gamma^(i+1) q_i S_m. state: S_0, (N, H, dh, dh) or (N, H, dh).
    Returns y (N, H, L, dh) and, if want_state, the state after the last position.
    """
    N, H, L, dh = q.shape
    g = torch.from_numpy(S3.head_decays(H, *decay)).to(q.device)             # (H,) float64
    c = min(chunk, L)
    n = -(-L // c)
    pad = (0, 0, 0, n * c - L)
    qc, kc, vc = (F.pad(a, pad).view(N, H, n, c, dh) for a in (q, k, v))
    i = torch.arange(c, device=q.device, dtype=torch.float64)
    lag = i[:, None] - i[None, :]
    Dc = torch.where(lag >= 0, g[:, None, None] ** lag.clamp(min=0), 0.0)
    Dc = Dc.to(q.dtype)[None, :, None]                                       # (1, H, 1, c, c)
    into = (g[:, None] ** (i + 1)).to(q.dtype)[None, :, None, :, None]       # (1, H, 1, c, 1)
    outof = (g[:, None] ** (c - 1 - i)).to(q.dtype)[None, :, None, :, None]  # (1, H, 1, c, 1)
    m = torch.arange(n, device=q.device, dtype=torch.float64)
    lagm = m[:, None] - m[None, :] - 1
    Dn = torch.where(lagm >= 0, g[:, None, None] ** (c * lagm.clamp(min=0)), 0.0).to(q.dtype)   # (H, n, n)
    init = (g[:, None] ** (c * m)).to(q.dtype)                               # (H, n)
    if linear:
        y = ((qc @ kc.transpose(-1, -2)) * Dc) @ vc                      # (N, H, n, c, dh)
        S = torch.einsum("hmp,nhpde->nhmde", Dn, (kc * outof).transpose(-1, -2) @ vc)
        if state is not None:
            S = S + init[None, :, :, None, None] * state[:, :, None]
        y = y + (qc * into) @ S
    else:
        kv = kc * vc
        y = Dc @ kv
        S = torch.einsum("hmp,nhpd->nhmd", Dn, (kv * outof).sum(-2))
        if state is not None:
            S = S + init[None, :, :, None] * state[:, :, None]
        y = y + into * S[:, :, :, None, :]
    y = y.reshape(N, H, n * c, dh)[:, :, :L]
    if not want_state:
        return y, None
    lags = L - 1 - torch.arange(L, device=q.device, dtype=torch.float64)
    kw = k * (g[:, None] ** lags).to(q.dtype)[None, :, :, None]            # k_j gamma^(L-1-j)
    new = kw.transpose(-1, -2) @ v if linear else (kw * v).sum(2)
    if state is not None:
        new = new + (g ** L).to(q.dtype).view(1, H, *([1] * (new.dim() - 2))) * state
    return y, new


def rmsnorm(x, g, eps):
    """x / sqrt(mean(x^2) + eps) * g over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

# ----------------------------------------------------------------------------- model


def matmul(x, W, dt):
    """x @ W in the matmul dtype dt (bf16 inputs, fp32 accumulation inside the GEMM)."""
    return x.to(dt) @ W.to(dt)


def running_mean(x, on):
    """Stage 3's running_mean over axis 0 (T) when rate coding is on (autograd differentiates it)."""
    if not on:
        return x
    t = torch.arange(1, x.shape[0] + 1, device=x.device, dtype=torch.float32)
    return x.float().cumsum(0) / t.view((-1,) + (1,) * (x.dim() - 1))


def token_shift(s, prev=None):
    """Stage 3's token_shift: out[:, :, l, :D/2] = s[:, :, l-1, :D/2] (at l = 0 the decode state's prev
    (T*B, D/2), or zeros), the rest of s unchanged; autograd differentiates it. s (T, B, L, D) spikes;
    decoding (prev given) also returns the last position's first half (T*B, D/2) fp32, the next call's
    prev; training (prev None) returns None there and copies nothing."""
    T, B, L, D = s.shape
    half = D // 2
    if prev is None:
        early = F.pad(s[:, :, :-1, :half], (0, 0, 1, 0))                      # zeros before position 0
        return torch.cat([early, s[..., half:]], -1), None
    early = torch.cat([prev.view(T, B, 1, half).to(s.dtype), s[:, :, :-1, :half]], 2)
    return torch.cat([early, s[..., half:]], -1), s[:, :, -1, :half].reshape(T * B, half).float()


def norm(x, g, eps, kernels):
    """The triton path uses the lean rmsnorm; the torch path lets autograd differentiate it."""
    return LeanRMSNorm.apply(x, g, eps) if kernels == "triton" else rmsnorm(x, g, eps)


class Weight(nn.Module):
    """A module holding one parameter named `weight` (norm gains, the untied head)."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(*shape))


class Neuron(nn.Module):
    """A spiking neuron site: fixed beta, theta, or PLIF's learnable w (beta = sigmoid(w)) and theta,
    or LITS's learnable output scales. Its spikes come out in the matmul dtype, ready for the linear
    layer that reads them. A random quantizer draws only in training mode (evaluation rounds)."""

    def __init__(self, cfg, C, run):
        super().__init__()
        self.cfg, self.kernels, self.dt = cfg, run.kernels, getattr(torch, run.dtype)
        if cfg.neuron == "plif":
            self.w = nn.Parameter(torch.full((C,), math.log(cfg.beta / (1 - cfg.beta))))
            self.theta = nn.Parameter(torch.full((C,), cfg.theta))
        if cfg.neuron == "lits":
            self.scale_pos, self.scale_neg = nn.Parameter(torch.ones(C)), nn.Parameter(torch.ones(C))

    def forward(self, x):                              # x (T, ..., C) -> spikes (T, ..., C)
        cfg = self.cfg
        if not cfg.spiking:
            return torch.relu(x).to(self.dt)
        if cfg.neuron == "plif":
            beta, theta = torch.sigmoid(self.w), self.theta
        else:
            beta, theta = cfg.beta, cfg.theta
        scales = (self.scale_pos, self.scale_neg) if cfg.neuron == "lits" else (1.0, 1.0)
        noisy = self.training and cfg.spike_fn == "sigmoid4x" and cfg.quant in S3.NOISY
        if self.kernels == "triton":
            return neuron_triton(x, beta, theta, scales, cfg, self.dt, noisy)
        return neuron_torch(x, beta, theta, cfg, scales, noisy).to(self.dt)


class Attention(nn.Module):
    def __init__(self, cfg, run):
        super().__init__()
        D = cfg.d_model
        self.cfg, self.run, self.dt = cfg, run, getattr(torch, run.dtype)
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self, name, nn.Parameter(torch.zeros(D, D)))    # stored (in, out): y = x @ W
        self.norm = Weight(D)
        self.sn_q, self.sn_k, self.sn_v, self.sn_o = (Neuron(cfg, D, run) for _ in range(4))
        self.wo_input = nn.Identity()      # passes o on unchanged: where record_spike_rates measures it

    def forward(self, s, x, state=None):               # spikes (T, B, L, D): q reads s, k and v read x
        cfg, run = self.cfg, self.run
        T, B, L, D = s.shape
        H, dh = cfg.n_head, D // cfg.n_head
        q = self.sn_q(matmul(s, self.wq, self.dt))
        k = self.sn_k(matmul(x, self.wk, self.dt))
        v = self.sn_v(matmul(x, self.wv, self.dt))
        linear = cfg.attention == "linear"
        decay = (cfg.decay_start, cfg.decay_step)
        qkv = [running_mean(a, cfg.rate_coding).reshape(T * B, L, H, dh) for a in (q, k, v)]  # (TB,L,H,dh)
        # Triton: heads of 16 to 64 channels (a power of two). A dh x dh fp32 state and the chunk's
        # tiles of a 128-channel head ask 352 KB of shared memory, more than an H200's 227 KB.
        fused = run.kernels == "triton" and 16 <= dh <= 64 and dh == triton.next_power_of_2(dh)
        fused = fused and not cfg.rate_coding            # rates are reals: the torch path, in fp32
        if fused and state is None:                                             # training form
            y = attention_triton(*qkv, linear, run.chunk, decay)
        elif fused and L == 1:                                                  # one decoding step
            y = attention_step_triton(*qkv, state, linear, decay)
        else:
            heads = [a.float().transpose(1, 2) for a in qkv]                    # (T*B, H, L, dh)
            want_state = state is not None                                       # prefill: keep it
            y, state = attention_chunked(*heads, linear, run.chunk, decay, state, want_state)
            y = y.transpose(1, 2)                                               # (T*B, L, H, dh)
        n = norm(y, self.norm.weight.view(H, dh), cfg.norm_eps, run.kernels).reshape(T, B, L, D)
        z = self.sn_o(n)
        o = self.wo_input(z if linear else q * z)        # hadamard: q * z, products of spikes
        return matmul(o, self.wo, self.dt), state


class MLP(nn.Module):
    def __init__(self, cfg, run):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_ff))
        self.w2 = nn.Parameter(torch.zeros(cfg.d_ff, cfg.d_model))
        self.sn_h = Neuron(cfg, cfg.d_ff, run)
        self.dt = getattr(torch, run.dtype)

    def forward(self, s):                              # s (T, B, L, D) spikes -> (T, B, L, D)
        return matmul(self.sn_h(matmul(s, self.w1, self.dt)), self.w2, self.dt)


class Block(nn.Module):
    def __init__(self, cfg, run):
        super().__init__()
        D = cfg.d_model
        self.cfg, self.kernels = cfg, run.kernels
        self.norm1, self.norm2 = Weight(D), Weight(D)
        self.sn1, self.sn2 = Neuron(cfg, D, run), Neuron(cfg, D, run)
        self.attn, self.mlp = Attention(cfg, run), MLP(cfg, run)
        self.drop = nn.Dropout(cfg.dropout)              # on the branch outputs, in training only

    def forward(self, h, state=None, prev=None):       # h (T, B, L, D) real residual stream
        """prev: token_shift's slot from decoding; returns h, the attention state and the new slot (the
        last position's spikes of the shifted half; None without token_shift)."""
        eps, rate = self.cfg.norm_eps, self.cfg.rate_coding
        s = self.sn1(norm(running_mean(h, rate), self.norm1.weight, eps, self.kernels))   # (T,B,L,D) spikes
        x, last = token_shift(s, prev) if self.cfg.token_shift else (s, None)    # what wk and wv read
        o, state = self.attn(s, x, state)
        h = h + self.drop(o)
        s2 = self.sn2(norm(running_mean(h, rate), self.norm2.weight, eps, self.kernels))
        h = h + self.drop(self.mlp(s2))
        return h, state, last


class SpikeLM(nn.Module):
    """Stage 3's model; state_dict() keys are SPEC's parameter names, weights stored (in, out)."""

    def __init__(self, cfg, run):
        super().__init__()
        self.cfg, self.dt = cfg, getattr(torch, run.dtype)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, run) for _ in range(cfg.n_layer))
        self.norm_f = Weight(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        if not cfg.tie_embeddings:
            self.head = Weight(cfg.d_model, cfg.vocab_size)

    def forward(self, idx, state=None):
        """idx (B, L) -> logits (B, L, V) fp32; with state (init_state's list, its entries replaced):
        recurrent/prefill form."""
        cfg = self.cfg
        T, n = S3.timesteps(cfg), cfg.n_layer
        x = self.drop(self.embed(idx))                                # (B, L, D), one mask for all T
        h = x.unsqueeze(0).expand(T, *x.shape)                        # (T, B, L, D)
        for i, block in enumerate(self.blocks):
            if state is None:
                h, _, _ = block(h)
            elif cfg.token_shift:                                     # each layer's own state and slot
                h, state[i], state[n + i] = block(h, state[i], state[n + i])
            else:
                h, state[i], _ = block(h, state[i])
        xf = rmsnorm(h.mean(0), self.norm_f.weight, cfg.norm_eps)     # (B, L, D)
        W = self.embed.weight.t() if cfg.tie_embeddings else self.head.weight
        return matmul(xf, W, self.dt).float()

    def init_state(self, batch):
        """Stage 3's init_decode_state as one list, timesteps and sequences in one axis: the zero
        attention state per layer, (T*B, H, dh, dh) linear or (T*B, H, dh) hadamard, then token_shift's
        slot per layer (the shifted half of the previous position's spikes), each (T*B, D//2)."""
        cfg, device = self.cfg, self.embed.weight.device
        H, dh, TB = cfg.n_head, cfg.d_model // cfg.n_head, S3.timesteps(cfg) * batch
        shape = (TB, H, dh) + ((dh,) if cfg.attention == "linear" else ())
        slots = cfg.n_layer if cfg.token_shift else 0
        shift = [torch.zeros(TB, cfg.d_model // 2, device=device) for _ in range(slots)]
        return [torch.zeros(shape, device=device) for _ in range(cfg.n_layer)] + shift


def build_model(mcfg, run, params=None, seed=0):
    """A SpikeLM on run.device with stage 3's initial parameters (or the given numpy params)."""
    model = SpikeLM(mcfg, run)
    load_params(model, params if params is not None else S3.init_params(mcfg, seed), S3.param_shapes(mcfg))
    return model.to(run.device)


# ----------------------------------------------------------------------------- Triton fast path
# Neuron kinds and surrogates are compile-time constants, so each combination compiles to a
# kernel with no branches. Input x is (T, R, C): T timesteps of R rows of C channels.

NEURON_ID = {name: i for i, name in enumerate(S3.NEURONS)}        # lif plif alif ternary lits
SURROGATE_ID = {name: i for i, name in enumerate(S3.SURROGATES)}  # arctan sigmoid fast_sigmoid triangle
SPIKE_ID = {"heaviside": 0, "identity": 1, "round_ste": 2, "stochastic_round_ste": 3, "probabilistic_ste": 4}

if triton is not None:
    @triton.jit
    def surrogate_grad_tl(u, alpha, SURROGATE: tl.constexpr, SPIKE: tl.constexpr):
        """dH/du for u = v - threshold: heaviside S'(u) (stage 3's surrogate_grad), sigmoid4x 4 p (1 - p)."""
        if SPIKE > 0:                                      # sigmoid4x, d out/dp = 1 (straight through)
            p = tl.sigmoid(4.0 * u)
            g = 4.0 * p * (1.0 - p)
        elif SURROGATE == 0:                               # arctan
            z = 1.5707963267948966 * alpha * u
            g = 0.5 * alpha / (1.0 + z * z)
        elif SURROGATE == 1:                               # sigmoid
            sig = tl.sigmoid(alpha * u)
            g = alpha * sig * (1.0 - sig)
        elif SURROGATE == 2:                               # fast sigmoid
            d = 1.0 + alpha * tl.abs(u)
            g = alpha / (2.0 * d * d)
        else:                                              # triangle of half-width 1/alpha
            g = tl.maximum(0.0, 1.0 - tl.abs(u) * alpha) * alpha
        return g

    @triton.jit
    def spike_tl(u, n, SPIKE: tl.constexpr):
        """Stage 3's step_fn: H(u) = [u > 0]; sigmoid4x p = sigmoid(4u) as identity p, round [u >= 0],
        stochastic round [n >= 1 - p] or probabilistic [n < p] with the uniform draw n."""
        if SPIKE == 0:
            out = (u > 0).to(tl.float32)
        elif SPIKE == 1:
            out = tl.sigmoid(4.0 * u)
        elif SPIKE == 2:
            out = (u >= 0).to(tl.float32)
        elif SPIKE == 3:
            out = (n >= 1.0 - tl.sigmoid(4.0 * u)).to(tl.float32)
        else:
            out = (n < tl.sigmoid(4.0 * u)).to(tl.float32)
        return out

    @triton.jit
    def fire_tl(v, thr, seed, offs, t, RC, T: tl.constexpr, NEURON: tl.constexpr, HARD: tl.constexpr,
                SPIKE: tl.constexpr):
        """(sp, sn, r): the spikes H(v - thr), H(-v - thr) (sn = 0 unless ternary or lits) and the
        reset amount r. A random quantizer draws tl.rand(seed, element index): the backward's
        recomputation draws the same numbers."""
        n_pos, n_neg = v, v
        if SPIKE >= 3:
            n_pos, n_neg = tl.rand(seed, t * RC + offs), tl.rand(seed, (T + t) * RC + offs)
        sp = spike_tl(v - thr, n_pos, SPIKE)
        sn = tl.zeros_like(sp)
        r = sp
        if NEURON >= 3:
            sn = spike_tl(-v - thr, n_neg, SPIKE)
            r = sp + sn if HARD else sp - sn
        return sp, sn, r

    @triton.jit
    def reset_tl(v, r, thr, HARD: tl.constexpr):
        """v+ = v * (1 - r) (hard) or v - thr * r (soft)."""
        return v * (1.0 - r) if HARD else v - thr * r

    @triton.jit
    def tile_tl(R, C, BR: tl.constexpr, BC: tl.constexpr):
        """Offsets (BR, BC) of this program's tile inside one timestep, its mask and columns."""
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        return rows[:, None] * C + cols[None, :], mask, cols

    @triton.jit
    def neuron_fwd_kernel(x_ptr, s_ptr, beta_ptr, theta_ptr, scale_ptr, R, C, alif_rho, alif_kappa, syn_alpha,
                          seed, T: tl.constexpr, NEURON: tl.constexpr, HARD: tl.constexpr,
                          SPIKE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """All T steps of syn_t = a syn_{t-1} + (1 - a) x_t, v_t = beta v+_{t-1} + syn_t,
        s_t = H(v_t - thr_t) (lits: s+ H(v_t - thr) - s- H(-v_t - thr)), v+_t = reset: x read once."""
        offs, mask, cols = tile_tl(R, C, BR, BC)
        beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)[None, :]
        theta = tl.load(theta_ptr + cols, mask=cols < C, other=0.0)[None, :]
        scale_p = tl.load(scale_ptr + cols, mask=cols < C, other=0.0)[None, :]       # (2, C): s+, s-
        scale_n = tl.load(scale_ptr + C + cols, mask=cols < C, other=0.0)[None, :]
        xs = ()
        for t in tl.static_range(T):                       # every load in flight before any store
            xs = xs + (tl.load(x_ptr + t * R * C + offs, mask=mask, other=0.0),)
        vp = tl.zeros([BR, BC], tl.float32)
        a = tl.zeros([BR, BC], tl.float32)                 # ALIF adaptation
        syn = tl.zeros([BR, BC], tl.float32)               # S trace (x itself when syn_alpha = 0)
        for t in tl.static_range(T):
            syn = syn_alpha * syn + (1.0 - syn_alpha) * xs[t].to(tl.float32)
            v = beta * vp + syn
            thr = theta + a
            sp, sn, r = fire_tl(v, thr, seed, offs, t, R * C, T, NEURON, HARD, SPIKE)
            vp = reset_tl(v, r, thr, HARD)
            if NEURON == 2:
                a = alif_rho * a + alif_kappa * sp
            s = scale_p * sp - scale_n * sn if NEURON >= 3 else sp
            tl.store(s_ptr + t * R * C + offs, s.to(s_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def neuron_bwd_kernel(x_ptr, gs_ptr, gx_ptr, beta_ptr, theta_ptr, scale_ptr, g1_ptr, g2_ptr,
                          R, C, alif_rho, alif_kappa, alpha, syn_alpha, seed,
                          T: tl.constexpr, NEURON: tl.constexpr, SURROGATE: tl.constexpr, SPIKE: tl.constexpr,
                          HARD: tl.constexpr, DETACH: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """Backprop through time (stage 3's neuron_backward), the forward recomputed from x.

        The membrane trajectory v_1..v_T (and ALIF thresholds) live in registers, not memory.
        PLIF (LITS): each program writes its tile's column sums of dL/dbeta and dL/dtheta
        (dL/ds+ and dL/ds-) to row program_id(0) of (n_row_tiles, C) buffers g1, g2, summed by
        the caller (one small pass).
        """
        offs, mask, cols = tile_tl(R, C, BR, BC)
        beta = tl.load(beta_ptr + cols, mask=cols < C, other=0.0)[None, :]
        theta = tl.load(theta_ptr + cols, mask=cols < C, other=0.0)[None, :]
        scale_p = tl.load(scale_ptr + cols, mask=cols < C, other=0.0)[None, :]
        scale_n = tl.load(scale_ptr + C + cols, mask=cols < C, other=0.0)[None, :]
        vp = tl.zeros([BR, BC], tl.float32)
        a = tl.zeros([BR, BC], tl.float32)
        syn = tl.zeros([BR, BC], tl.float32)
        vs, thrs, gss = (), (), ()                         # x_t then v_t, ALIF thresholds, dL/ds_t
        for t in tl.static_range(T):                       # every load in flight before any store
            vs = vs + (tl.load(x_ptr + t * R * C + offs, mask=mask, other=0.0),)
            gss = gss + (tl.load(gs_ptr + t * R * C + offs, mask=mask, other=0.0),)
        for t in tl.static_range(T):                       # recompute the forward: v_t replaces x_t
            syn = syn_alpha * syn + (1.0 - syn_alpha) * vs[t].to(tl.float32)
            v = beta * vp + syn
            thr = theta + a
            sp, sn, r = fire_tl(v, thr, seed, offs, t, R * C, T, NEURON, HARD, SPIKE)
            vp = reset_tl(v, r, thr, HARD)
            vs = vs[:t] + (v,) + vs[t + 1:]
            if NEURON == 2:
                thrs = thrs + (thr,)
                a = alif_rho * a + alif_kappa * sp
        g_v = tl.zeros([BR, BC], tl.float32)               # dL/dv_{t+1}
        g_a = tl.zeros([BR, BC], tl.float32)               # dL/da_{t+1} (ALIF)
        g_syn = tl.zeros([BR, BC], tl.float32)             # dL/dsyn_{t+1} (S trace)
        g1 = tl.zeros([BR, BC], tl.float32)                # dL/dbeta (PLIF), dL/ds+ (LITS)
        g2 = tl.zeros([BR, BC], tl.float32)                # dL/dtheta (PLIF), dL/ds- (LITS)
        for t in tl.static_range(T - 1, -1, -1):
            v = vs[t]
            if NEURON == 2:
                thr = thrs[t]
            else:
                thr = theta + tl.zeros([BR, BC], tl.float32)
            sp, sn, r = fire_tl(v, thr, seed, offs, t, R * C, T, NEURON, HARD, SPIKE)
            g_vp = beta * g_v                              # dL/dv+_t
            if NEURON == 1:
                g1 += g_v * reset_tl(v, r, thr, HARD)
            ds = gss[t].to(tl.float32)
            if NEURON == 2:
                ds = ds + alif_kappa * g_a
            if HARD:
                dv = g_vp * (1.0 - r)
                dthr = tl.zeros([BR, BC], tl.float32)
                dr = -g_vp * v
            else:
                dv = g_vp
                dthr = -g_vp * r
                dr = -g_vp * thr
            if DETACH:
                dr = tl.zeros([BR, BC], tl.float32)
            if NEURON >= 3:                                # s = s+ sp - s- sn (ternary: s+ = s- = 1)
                dsp = scale_p * ds + dr
                dsn = dr - scale_n * ds if HARD else -scale_n * ds - dr
                dv = dv + dsp * surrogate_grad_tl(v - thr, alpha, SURROGATE, SPIKE) \
                    - dsn * surrogate_grad_tl(-v - thr, alpha, SURROGATE, SPIKE)
                if NEURON == 4:
                    g1 += ds * sp
                    g2 -= ds * sn
            else:
                du = (ds + dr) * surrogate_grad_tl(v - thr, alpha, SURROGATE, SPIKE)
                dv = dv + du
                dthr = dthr - du
            if NEURON == 2:
                g_a = alif_rho * g_a + dthr
            if NEURON == 1:
                g2 += dthr
            g_syn = syn_alpha * g_syn + dv                 # syn_t feeds v_t and syn_{t+1}
            gx = (1.0 - syn_alpha) * g_syn                 # syn_t = ... + (1 - a) x_t
            tl.store(gx_ptr + t * R * C + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            g_v = dv
        if NEURON == 1 or NEURON == 4:
            out = tl.program_id(0) * C + cols
            tl.store(g1_ptr + out, tl.sum(tl.where(mask, g1, 0.0), 0), mask=cols < C)
            tl.store(g2_ptr + out, tl.sum(tl.where(mask, g2, 0.0), 0), mask=cols < C)


def neuron_blocks(T, C):
    """Tile shape (rows, channels): fewer elements per program for long T (registers)."""
    bc = min(64, triton.next_power_of_2(C))
    return max(1, (2048 if T <= 4 else 1024 if T <= 8 else 512) // bc), bc


class TritonNeuron(torch.autograd.Function):
    """Fused multi-step neuron: x (T, ..., C) -> spikes in out_dtype. beta, theta: (C,) fp32;
    scales (2, C) fp32: lits's s+, s- (ones otherwise); noisy: a random quantizer draws (training)."""

    @staticmethod
    def forward(ctx, x, beta, theta, scales, cfg, out_dtype, noisy=False):
        x = x.contiguous()
        T, C = x.shape[0], x.shape[-1]
        R = x[0].numel() // C
        s = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        quant = cfg.quant if noisy or cfg.quant not in S3.NOISY else "round_ste"     # evaluation rounds
        ctx.spike = SPIKE_ID["heaviside" if cfg.spike_fn == "heaviside" else quant]
        ctx.seed = int(torch.randint(0, 2**31 - 1, ())) if ctx.spike >= 3 else 0
        br, bc = neuron_blocks(T, C)
        neuron_fwd_kernel[(triton.cdiv(R, br), triton.cdiv(C, bc))](
            x, s, beta, theta, scales, R, C, cfg.alif_rho, cfg.alif_kappa, cfg.syn_alpha, ctx.seed,
            T=T, NEURON=NEURON_ID[cfg.neuron], HARD=cfg.reset == "hard", SPIKE=ctx.spike, BR=br, BC=bc,
            num_warps=4)
        ctx.save_for_backward(x, beta, theta, scales)
        ctx.cfg, ctx.shape = cfg, (T, R, C)
        return s

    @staticmethod
    def backward(ctx, gs):
        x, beta, theta, scales = ctx.saved_tensors
        cfg, (T, R, C) = ctx.cfg, ctx.shape
        br, bc = neuron_blocks(2 * T, C)
        grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
        gx = torch.empty_like(x)
        g1 = torch.empty((grid[0], C), dtype=torch.float32, device=x.device)
        g2 = torch.empty_like(g1)
        neuron_bwd_kernel[grid](
            x, gs.contiguous(), gx, beta, theta, scales, g1, g2, R, C, cfg.alif_rho, cfg.alif_kappa,
            cfg.alpha, cfg.syn_alpha, ctx.seed, T=T, NEURON=NEURON_ID[cfg.neuron],
            SURROGATE=SURROGATE_ID[cfg.surrogate], SPIKE=ctx.spike, HARD=cfg.reset == "hard",
            DETACH=cfg.detach_reset, BR=br, BC=bc, num_warps=4)
        plif, lits = cfg.neuron == "plif", cfg.neuron == "lits"
        dscales = torch.stack([g1.sum(0), g2.sum(0)]) if lits else None      # (2, C): dL/ds+, dL/ds-
        return gx, g1.sum(0) if plif else None, g2.sum(0) if plif else None, dscales, None, None, None


def neuron_triton(x, beta, theta, scales, cfg, out_dtype, noisy=False):
    """A neuron site through TritonNeuron; fixed (float) beta, theta and scales become vectors, filled
    on the device (a Python float copied to a GPU would make the host wait for the GPU at every call)."""
    C = x.shape[-1:]
    if cfg.neuron != "plif":
        beta, theta = torch.full(C, beta, device=x.device), torch.full(C, theta, device=x.device)
    if cfg.neuron == "lits":
        scales = torch.stack(scales).float()                                      # (2, C): s+, s-
    else:
        scales = torch.ones((2,) + C, device=x.device)                            # (2, C): unscaled
    return TritonNeuron.apply(x, beta, theta, scales, cfg, out_dtype, noisy)


if triton is not None:
    @triton.jit
    def dot_tl(a, b, PRECISION: tl.constexpr):
        """a @ b with fp32 accumulation; PRECISION: how fp32 inputs are multiplied (ieee, tf32, tf32x3)."""
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def chunk_decays_tl(h, decay_start, decay_step, CHUNK: tl.constexpr):
        """For head h (gamma = 1 - 2^-(decay_start + decay_step h)): Dc[i, j] = gamma^(i-j) for
        j <= i (else 0), into_i = gamma^(i+1), outof_j = gamma^(CHUNK-1-j) and gamma^CHUNK
        (attention_chunked's factors)."""
        lg = tl.log2(1.0 - tl.exp2(-(decay_start + decay_step * h).to(tl.float32)))   # fp32, not fp64
        i = tl.arange(0, CHUNK).to(tl.float32)
        lag = i[:, None] - i[None, :]
        Dc = tl.where(lag >= 0, tl.exp2(tl.maximum(lag, 0.0) * lg), 0.0)
        into = tl.exp2((i + 1) * lg)[:, None]
        outof = tl.exp2((CHUNK - 1 - i) * lg)[:, None]
        return Dc, into, outof, tl.exp2(CHUNK * lg)

    @triton.jit
    def chunk_tl(ptr, base, m, L, H, CHUNK: tl.constexpr, DH: tl.constexpr):
        """Chunk m (CHUNK positions, zero past L) of one head of (N, L, H*DH): fp32, offsets, mask."""
        rows = m * CHUNK + tl.arange(0, CHUNK)
        offs = base + rows[:, None] * (H * DH) + tl.arange(0, DH)[None, :]
        mask = rows[:, None] < L
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), offs, mask

    @triton.jit
    def attention_fwd_kernel(q_ptr, k_ptr, v_ptr, y_ptr, L, H, decay_start, decay_step, LINEAR: tl.constexpr,
                             CHUNK: tl.constexpr, DH: tl.constexpr, PRECISION: tl.constexpr):
        """attention_chunked for one (timestep*sequence, head), the state carried in registers:
        linear    y = (Q K^T * Dc) V + (Q * into) S,   S <- gamma^C S + (K * outof)^T V
        hadamard  y = Dc (K * V) + into * s,          s <- gamma^C s + sum_j outof_j k_j v_j"""
        pid = tl.program_id(0).to(tl.int64)                # over N * H
        base = (pid // H) * L * H * DH + (pid % H) * DH
        Dc, into, outof, gc = chunk_decays_tl(pid % H, decay_start, decay_step, CHUNK)
        S = tl.zeros([DH, DH] if LINEAR else [1, DH], tl.float32)
        for m in range(0, tl.cdiv(L, CHUNK)):
            k, offs, mask = chunk_tl(k_ptr, base, m, L, H, CHUNK, DH)
            v, _, _ = chunk_tl(v_ptr, base, m, L, H, CHUNK, DH)
            if LINEAR:
                q, _, _ = chunk_tl(q_ptr, base, m, L, H, CHUNK, DH)
                A = dot_tl(q, tl.trans(k), PRECISION) * Dc
                y = dot_tl(A, v, PRECISION) + dot_tl(q * into, S, PRECISION)
                S = gc * S + dot_tl(tl.trans(k * outof), v, PRECISION)
            else:
                y = dot_tl(Dc, k * v, PRECISION) + into * S
                S = gc * S + tl.sum(outof * k * v, 0)[None, :]
            tl.store(y_ptr + offs, y, mask=mask)

    @triton.jit
    def attention_bwd_kernel(q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, dk_ptr, dv_ptr, L, H,
                             decay_start, decay_step, LINEAR: tl.constexpr, CHUNK: tl.constexpr,
                             DH: tl.constexpr, PRECISION: tl.constexpr):
        """Backward of attention_fwd_kernel; states are recomputed, never stored. Linear: a forward
        sweep gives dQ = (dY V^T * Dc) K + (dY * into) S^T; a backward sweep carries dS, the
        gradient of the state leaving the chunk: dK = (dY V^T * Dc)^T Q + (V * outof) dS^T,
        dV = (Q K^T * Dc)^T dY + (K * outof) dS, then dS <- gamma^C dS + (Q * into)^T dY.
        Hadamard: d(KV) = Dc^T dY + outof * ds, ds <- gamma^C ds + sum_i into_i dy_i."""
        pid = tl.program_id(0).to(tl.int64)
        base = (pid // H) * L * H * DH + (pid % H) * DH
        Dc, into, outof, gc = chunk_decays_tl(pid % H, decay_start, decay_step, CHUNK)
        n = tl.cdiv(L, CHUNK)
        if LINEAR:
            S = tl.zeros([DH, DH], tl.float32)
            for m in range(0, n):
                k, offs, mask = chunk_tl(k_ptr, base, m, L, H, CHUNK, DH)
                v, _, _ = chunk_tl(v_ptr, base, m, L, H, CHUNK, DH)
                dy, _, _ = chunk_tl(dy_ptr, base, m, L, H, CHUNK, DH)
                dA = dot_tl(dy, tl.trans(v), PRECISION) * Dc
                dq = dot_tl(dA, k, PRECISION) + dot_tl(dy * into, tl.trans(S), PRECISION)
                tl.store(dq_ptr + offs, dq, mask=mask)
                S = gc * S + dot_tl(tl.trans(k * outof), v, PRECISION)
        dS = tl.zeros([DH, DH] if LINEAR else [1, DH], tl.float32)
        for r in range(0, n):
            m = n - 1 - r
            k, offs, mask = chunk_tl(k_ptr, base, m, L, H, CHUNK, DH)
            v, _, _ = chunk_tl(v_ptr, base, m, L, H, CHUNK, DH)
            dy, _, _ = chunk_tl(dy_ptr, base, m, L, H, CHUNK, DH)
            if LINEAR:
                q, _, _ = chunk_tl(q_ptr, base, m, L, H, CHUNK, DH)
                dA = dot_tl(dy, tl.trans(v), PRECISION) * Dc
                A = dot_tl(q, tl.trans(k), PRECISION) * Dc
                dk = dot_tl(tl.trans(dA), q, PRECISION) + dot_tl(v * outof, tl.trans(dS), PRECISION)
                dv = dot_tl(tl.trans(A), dy, PRECISION) + dot_tl(k * outof, dS, PRECISION)
                dS = gc * dS + dot_tl(tl.trans(q * into), dy, PRECISION)
            else:
                dkv = dot_tl(tl.trans(Dc), dy, PRECISION) + outof * dS
                dk, dv = dkv * v, dkv * k
                dS = gc * dS + tl.sum(into * dy, 0)[None, :]
            tl.store(dk_ptr + offs, dk, mask=mask)
            tl.store(dv_ptr + offs, dv, mask=mask)


class TritonAttention(torch.autograd.Function):
    """Causal decayed attention of spikes q, k, v (N, L, H, dh) -> y (N, L, H, dh) fp32.
    Saves only its inputs (spikes, compact): the chunk matrices live in registers, not memory.
    Products with decays run in fp32 for fp32 spikes. For bf16 spikes the forward takes three
    TF32 products (about fp32: y decides spikes downstream) and the backward one (10-bit mantissa,
    finer than the bf16 its gradients are handed back in)."""

    @staticmethod
    def forward(ctx, q, k, v, linear, chunk, decay):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        N, L, H, dh = q.shape
        y = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        exact = q.dtype == torch.float32
        attention_fwd_kernel[(N * H,)](q, k, v, y, L, H, *decay, LINEAR=linear, CHUNK=chunk, DH=dh,
                                       PRECISION="ieee" if exact else "tf32x3", num_warps=4)
        ctx.meta = (linear, chunk, decay, "ieee" if exact else "tf32")
        ctx.save_for_backward(q, k, v)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v = ctx.saved_tensors
        linear, chunk, decay, precision = ctx.meta
        N, L, H, dh = q.shape
        dk, dv = (torch.empty(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
        dq = torch.empty_like(dk) if linear else dk        # hadamard: y does not depend on q
        attention_bwd_kernel[(N * H,)](q, k, v, dy.contiguous(), dq, dk, dv, L, H, *decay, LINEAR=linear,
                                       CHUNK=chunk, DH=dh, PRECISION=precision, num_warps=8)
        return (dq if linear else None), dk, dv, None, None, None


def attention_triton(q, k, v, linear, chunk, decay):
    """The training form through TritonAttention, q, k, v (N, L, H, dh); the chunk becomes a power
    of two of at least 16 (the smallest tile tl.dot takes)."""
    return TritonAttention.apply(q, k, v, linear, max(16, triton.next_power_of_2(chunk)), decay)


if triton is not None:
    @triton.jit
    def attention_step_kernel(q_ptr, k_ptr, v_ptr, state_ptr, y_ptr, H, decay_start, decay_step,
                              LINEAR: tl.constexpr, DH: tl.constexpr):
        """One position for one (timestep, sequence, head): S = gamma S + k^T v, y = q S
        (linear; S is dh x dh) or c = gamma c + k * v, y = c (hadamard). State updated in place."""
        pid = tl.program_id(0).to(tl.int64)                # over T * B * H
        gamma = 1.0 - tl.exp2(-(decay_start + decay_step * (pid % H)).to(tl.float32))   # decays may be fp64
        i = tl.arange(0, DH)
        k = tl.load(k_ptr + pid * DH + i).to(tl.float32)
        v = tl.load(v_ptr + pid * DH + i).to(tl.float32)
        if LINEAR:
            q = tl.load(q_ptr + pid * DH + i).to(tl.float32)
            at = state_ptr + pid * DH * DH + i[:, None] * DH + i[None, :]
            S = gamma * tl.load(at) + k[:, None] * v[None, :]
            tl.store(at, S)
            y = tl.sum(q[:, None] * S, 0)
        else:
            y = gamma * tl.load(state_ptr + pid * DH + i) + k * v
            tl.store(state_ptr + pid * DH + i, y)
        tl.store(y_ptr + pid * DH + i, y)


def attention_step_triton(q, k, v, state, linear, decay):
    """One position (L = 1), q, k, v (N, 1, H, dh) -> y (N, 1, H, dh) fp32; state updated in place."""
    N, _, H, dh = q.shape
    y = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    attention_step_kernel[(N * H,)](q.contiguous(), k.contiguous(), v.contiguous(), state, y, H, *decay,
                                    LINEAR=linear, DH=dh)
    return y


class LeanRMSNorm(torch.autograd.Function):
    """rmsnorm saving only x and r = 1/rms (autograd's version keeps three full-size tensors).

    Backward (stage 3's rmsnorm_backward): xhat = x r, dx = r (dy g - xhat mean(dy g xhat)),
    dg = sum of dy xhat over every leading axis."""

    @staticmethod
    def forward(ctx, x, g, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, g, r)
        return x * r * g

    @staticmethod
    def backward(ctx, dy):
        x, g, r = ctx.saved_tensors
        xhat = x * r
        dxhat = dy * g
        dx = r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dx, (dy * xhat).reshape(-1, *g.shape).sum(0), None

# ----------------------------------------------------------------------------- optimizer


def make_optimizer(model, tcfg, opt_state=None, step=0):
    """AdamW (b1 0.9, b2 0.95, eps 1e-8), decoupled decay on matrices only, one group per
    parameter carrying its layer-wise lr multiplier; m and v loaded from a stage 3/4/5 checkpoint."""
    groups = layerwise_groups(model, tcfg, S3.layer_depth)
    fused = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    if opt_state is not None:
        load_adam_moments(opt, opt_state, step)
    return opt


def train_step(model, opt, mcfg, tcfg, data, step, device, fwd=None, accum=1, group=SOLO, ddp=None):
    """One step on the global batch of B sequences fixed by (seed, step), the same on every rank:
    rank r of W takes rows [r B/W, (r+1) B/W), in `accum` micro-batches of B/(W accum) rows. Each
    micro-batch's mean loss is scaled by 1/accum and DDP averages gradients over the W ranks, so
    the gradient is that of the mean loss over all B rows: W ranks x accum micro-batches compute
    the step of one process with batch B. (loss, stats); params untouched on NaN."""
    rng = S3.batch_rng(tcfg.seed, step)
    x, y = S3.get_batch(data, tcfg.batch_size, mcfg.context, rng, tcfg.repeat)          # (B, L)
    rows = tcfg.batch_size // (group.world * accum)
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for i in range(accum):
        part = group.rank * accum + i                     # this micro-batch's place in the batch
        torch.manual_seed(tcfg.seed * 1_000_003 + step + (part << 40))   # dropout masks: (seed, step, part)
        xb, yb = (torch.from_numpy(a[part * rows:(part + 1) * rows]).to(device) for a in (x, y))
        last = i == accum - 1                             # DDP all-reduces during the last backward only
        with ddp.no_sync() if ddp is not None and not last else nullcontext():
            logits = (model if fwd is None else fwd)(xb)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), yb.view(-1)) / accum
            loss.backward()
        loss_sum = loss_sum + loss.detach()
    clip = tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    loss_value = group.mean(loss_sum)                     # the batch's loss, the same on every rank
    lr = S3.lr_at(step, tcfg)
    if math.isfinite(loss_value):
        set_layerwise_lr(opt, lr)
        opt.step()
    return loss_value, {"lr": lr, "grad_norm": grad_norm}

# ----------------------------------------------------------------------------- training


def train(mcfg, tcfg, run, data_dir, ckpt_path, resume=False, group=SOLO):
    """Train from scratch or from any stage's checkpoint; spikelib.loop runs train_step with a
    progress bar, periodic evaluation and checkpoints, the time limit, the NaN guard and Ctrl-C.
    Under torchrun (group of W > 1) every rank trains the DDP-wrapped model; rank 0 alone
    evaluates (the others wait) and saves the plain model's parameters."""
    _, tok, tok_info = S3.load_dataset_info(data_dir)
    train_data, val = S3.open_split(data_dir, "train"), S3.open_split(data_dir, "val")
    params, mcfg, step, opt_state = S3.start_params(mcfg, tcfg, ckpt_path, resume, tok_info)
    model = build_model(mcfg, run, params)
    opt = make_optimizer(model, tcfg, opt_state, step)
    ddp = group.wrap(model) if group.world > 1 else None
    fwd = torch.compile(model if ddp is None else ddp) if run.compile else ddp
    n_params = sum(p.numel() for p in model.parameters())
    backend = f"kernels {run.kernels}, {run.dtype} matmuls on {run.device}"
    print(model_line(n_params, mcfg, len(train_data), len(val), backend))

    report = partial(eval_report, model, val, max_tokens=tcfg.eval_tokens, decode=tok.decode)
    evaluate_now = partial(evaluate_on_main, group, model, report=report, context=mcfg.context)

    def save_now(done):
        if group.main:
            save_torch_model(ckpt_path, model, opt, mcfg, tcfg, done, tok_info, data_dir)

    one_step = partial(train_step, model, opt, mcfg, tcfg, train_data, device=run.device, fwd=fwd,
                       accum=run.grad_accum, group=group, ddp=ddp)                 # one_step(step)

    run_steps(one_step, step, tcfg, tcfg.batch_size * mcfg.context, evaluate_now, save_now, ckpt_path,
              group if group.world > 1 else None)
    return model.eval(), tok

# ----------------------------------------------------------------------------- main


def build_parser():
    """Stage 3's command line (every config field, presets, sampling) plus RunConfig."""
    ap = stage_parser(__doc__, S3.PRESETS, S3.SampleConfig, S3.ModelConfig, S3.TrainConfig)
    add_config_options(ap, RunConfig, "stage 5 (RunConfig)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    group = SOLO
    try:
        sc = config_from_args(S3.SampleConfig, args)
        run = resolve_run(config_from_args(RunConfig, args), have_triton=triton is not None)
        group, run = join_group(run)                      # under torchrun: one process of several
        mcfg, tcfg, ckpt = S3.run_configs(args, out_dir="out/triton")
        if plot_only(args, ckpt):
            plot_checkpoint(ckpt)
            return 0
        if args.generate is not None:
            params, mcfg, _, _, _, config = S3.load_model(ckpt)
            model = build_model(mcfg, run, params).eval()
            stream_text(S3.load_tokenizer(config, ckpt), model, args.generate, sc)
            return 0
        check_batch(tcfg.batch_size, group.world, run.grad_accum)
        with group.main_first():
            data_dir = S3.prepare_dataset(tcfg.source, tcfg.data_root)
        model, tok = train(mcfg, tcfg, run, data_dir, ckpt, args.resume, group)
    except S3.ERRORS as err:
        return group.fail(err)
    except KeyboardInterrupt:
        return 130
    finally:
        group.leave()
    if not group.main:
        return 0
    print_run_summary(model, tok, data_dir, sc, ckpt)
    if args.plot:
        plot_checkpoint(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
