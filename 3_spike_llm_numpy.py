"""Stage 3: a spiking transformer language model in NumPy, every gradient derived by hand.

The reference model of the project. Tokens are embedded into a real-valued residual stream
that is carried over T spike timesteps, shape (T, B, L, D). Inside each block every linear
layer is fed binary (or ternary) spikes from spiking neurons; attention is a causal,
spike-driven linear attention with a per-head decay, trained in its parallel form
(Q K^T * D) V and decoded in its recurrent form with a constant-size state. The readout
averages the residual stream over T. Backward passes are written next to their forwards and
checked against finite differences (tests/test_stage3.py).

    python 3_spike_llm_numpy.py                       # quick start: builtin data, `small`, minutes
    python 3_spike_llm_numpy.py --preset seed --source files:path/to/text.txt
    python 3_spike_llm_numpy.py --resume 1            # continue exactly where a run stopped
    python 3_spike_llm_numpy.py --generate "To be"    # stream text from out/numpy/ckpt.npz

Command-line overrides use the field names: `--n_layer 6 --neuron alif --spiking 0 --lr 1e-3`.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.checkpoint import CheckpointError, check_shapes, load_checkpoint, save_checkpoint  # noqa: E402
from spikelib.report import print_stream  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

# ----------------------------------------------------------------------------- config

NEURONS = ("lif", "plif", "alif", "ternary")
SURROGATES = ("arctan", "sigmoid", "fast_sigmoid", "triangle")
SITES = ("sn1", "attn.sn_q", "attn.sn_k", "attn.sn_v", "attn.sn_o", "sn2", "mlp.sn_h")


@dataclass
class ModelConfig:
    vocab_size: int = 2000
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    T: int = 4                    # spike timesteps
    context: int = 128            # training context (positions); decoding is not capped by it
    neuron: str = "lif"           # lif | plif | alif | ternary
    surrogate: str = "arctan"     # arctan | sigmoid | fast_sigmoid | triangle
    alpha: float = 2.0            # surrogate sharpness
    beta: float = 0.5             # membrane leak (PLIF: initial value)
    theta: float = 1.0            # threshold (PLIF: initial value)
    reset: str = "soft"           # soft (subtract) | hard (to zero)
    detach_reset: bool = False    # backward treats the spike in the reset term as a constant
    alif_rho: float = 0.9         # ALIF adaptation decay
    alif_kappa: float = 0.5       # ALIF threshold increase per spike
    attention: str = "linear"     # linear | hadamard
    decay_start: float = 1.0      # head h decays as gamma_h = 1 - 2^-(decay_start + decay_step * h),
    decay_step: float = 1.5       # so it remembers about 2^(decay_start + decay_step * h) positions
    spiking: bool = True          # False: the ANN twin (relu instead of spikes, one timestep)
    dropout: float = 0.0          # training only: on the embedding and on each residual branch
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self):
        choices = {"neuron": NEURONS, "surrogate": SURROGATES, "reset": ("soft", "hard"),
                   "attention": ("linear", "hadamard")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if min(self.vocab_size, self.n_layer, self.n_head, self.d_ff, self.T, self.context) < 1:
            raise ValueError("sizes must be positive")
        if self.decay_start <= 0 or self.decay_step < 0:
            raise ValueError("decay_start must be positive and decay_step non-negative (0 < gamma < 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")


@dataclass
class TrainConfig:
    source: str = "builtin"       # dataset for stage 1: builtin | shakespeare | wikipedia | files:PATH
    data_root: str = "data"
    out_dir: str = "out/numpy"    # the checkpoint is out_dir/ckpt.npz
    batch_size: int = 16
    max_steps: int = 400
    max_minutes: float = 0.0      # stop (and save) after this wall time; 0 = no limit
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    layer_lr_decay: float = 1.0   # < 1: lower learning rates for layers nearer the input
    seed: int = 1337
    eval_interval: int = 100
    eval_tokens: int = 16384      # validation tokens per evaluation (a fixed slice from the start)


# Presets: threshold 0.5 (spike rates near 0.25 rather than 0.13 at theta = 1, and lower loss),
# norm_eps 1e-2 (a head whose query spikes are all zero has y = 0, where the head norm's gradient
# is g/sqrt(eps): 316x at 1e-5, enough to swamp training with surrogate-gradient noise).
SPIKING = dict(theta=0.5, norm_eps=1e-2)
PRESETS = {
    "tiny": {"model": dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, T=4, context=32,
                           **SPIKING),
             "train": dict(batch_size=4, max_steps=200, lr=3e-3, min_lr=3e-4, warmup=10,
                           eval_interval=50, eval_tokens=2048)},
    "small": {"model": dict(n_layer=4, n_head=4, d_model=128, d_ff=512, T=4, context=64, **SPIKING),
              "train": dict(batch_size=16, max_steps=500, lr=3e-3, min_lr=3e-4, warmup=30,
                            max_minutes=5.0, eval_interval=100)},
    "seed": {"model": dict(n_layer=12, n_head=8, d_model=256, d_ff=1024, T=4, context=256, **SPIKING),
             "train": dict(batch_size=16, max_steps=20000, lr=1e-3, min_lr=1e-4, warmup=500,
                           eval_interval=500, layer_lr_decay=0.9)},
    "base": {"model": dict(n_layer=12, n_head=8, d_model=512, d_ff=2048, T=4, context=512, **SPIKING),
             "train": dict(batch_size=32, max_steps=50000, lr=6e-4, min_lr=6e-5, warmup=1000,
                           eval_interval=1000)},
}


def make_configs(preset="small", **overrides):
    """(ModelConfig, TrainConfig) for a preset, with any field of either overridden by name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    model_names = {f.name for f in fields(ModelConfig)}
    train_names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - model_names - train_names
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    m = dict(PRESETS[preset]["model"], **{k: v for k, v in overrides.items() if k in model_names})
    t = dict(PRESETS[preset]["train"], **{k: v for k, v in overrides.items() if k in train_names})
    return ModelConfig(**m), TrainConfig(**t)


def param_shapes(cfg):
    """Every parameter name -> shape (the checkpoint contract; README has the table)."""
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = {"embed.weight": (V, D)}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        shapes[b + "norm1.weight"] = (D,)
        for w in ("wq", "wk", "wv", "wo"):
            shapes[b + "attn." + w] = (D, D)
        shapes[b + "attn.norm.weight"] = (D,)
        shapes[b + "norm2.weight"] = (D,)
        shapes[b + "mlp.w1"] = (D, F)
        shapes[b + "mlp.w2"] = (F, D)
        if cfg.neuron == "plif":
            for site in SITES:
                C = F if site == "mlp.sn_h" else D
                shapes[b + site + ".w"] = (C,)
                shapes[b + site + ".theta"] = (C,)
    shapes["norm_f.weight"] = (D,)
    if not cfg.tie_embeddings:
        shapes["head.weight"] = (D, V)
    return shapes


def init_params(cfg, seed=0, dtype=np.float32):
    """Random initial parameters.

    Layers fed by spikes (wq, wk, wv, w1) get std 2/sqrt(fan_in): with input spike rates near
    1/4 the pre-activations then have unit scale, so the neurons fire from the first step.
    Residual projections (wo, w2) get the GPT-2 std 0.02/sqrt(2 n_layer); norms start at 1;
    the embedding std 0.1 (tied: initial logits of rms 0.1 sqrt(D)).
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if "norm" in name:
            p = np.ones(shape)
        elif name.endswith(".w"):       # PLIF leak logit: sigmoid(w) = beta
            p = np.full(shape, math.log(cfg.beta / (1 - cfg.beta)))
        elif name.endswith(".theta"):
            p = np.full(shape, cfg.theta)
        elif name.endswith(("wq", "wk", "wv", "w1")):
            p = rng.normal(0.0, 2.0 / math.sqrt(shape[0]), shape)
        elif name.endswith(("wo", "w2")):
            p = rng.normal(0.0, 0.02 / math.sqrt(2 * cfg.n_layer), shape)
        elif name == "embed.weight":    # residual stream rms 0.1, comparable to norm_eps
            p = rng.normal(0.0, 0.1, shape)
        else:                           # head.weight
            p = rng.normal(0.0, 0.02, shape)
        params[name] = p.astype(dtype)
    return params


def timesteps(cfg):
    """The ANN twin has no dynamics, so its T copies would be identical: it runs one step."""
    return cfg.T if cfg.spiking else 1

# ----------------------------------------------------------------------------- neurons


def surrogate(u, cfg):
    """The smooth spike S(u), u = v - threshold (used as the spike in the gradient check)."""
    a = cfg.alpha
    if cfg.surrogate == "arctan":
        return np.arctan((math.pi / 2 * a) * u) / math.pi + 0.5
    if cfg.surrogate == "sigmoid":
        return 0.5 * (1 + np.tanh(0.5 * a * u))            # = sigmoid(a u), without overflow
    if cfg.surrogate == "fast_sigmoid":
        return 0.5 + a * u / (2 * (1 + a * np.abs(u)))
    g = 1.0 / a                                            # triangle of half-width g
    return np.where(u < 0, np.maximum(u + g, 0) ** 2 / (2 * g * g),
                    1 - np.maximum(g - u, 0) ** 2 / (2 * g * g))


def surrogate_grad(u, cfg):
    """S'(u), the gradient used for the step H(u) in the backward pass (SPEC formulas)."""
    a = cfg.alpha
    if cfg.surrogate == "arctan":
        z = (math.pi / 2 * a) * u
        return (a / 2) / (1 + z * z)
    if cfg.surrogate == "sigmoid":
        sig = 0.5 * (1 + np.tanh(0.5 * a * u))
        return a * sig * (1 - sig)
    if cfg.surrogate == "fast_sigmoid":
        d = 1 + a * np.abs(u)
        return a / (2 * d * d)
    g = 1.0 / a
    return np.maximum(0, 1 - np.abs(u) / g) / g


def step_fn(u, cfg, smooth):
    """The spike: Heaviside H(u) = [u > 0], or S(u) in smooth (gradient-check) mode."""
    return surrogate(u, cfg) if smooth else (u > 0).astype(u.dtype)


def fire(v, thr, cfg, smooth):
    """Spikes s and the reset amount r for membrane v and threshold thr.

    binary: s = H(v - thr), r = s.  ternary: s = H(v - thr) - H(-v - thr) in {-1, 0, 1};
    its soft reset subtracts thr*s (r = s), its hard reset zeroes v if either side fired.
    """
    if cfg.neuron != "ternary":
        s = step_fn(v - thr, cfg, smooth)
        return s, s
    sp, sn = step_fn(v - thr, cfg, smooth), step_fn(-v - thr, cfg, smooth)
    return sp - sn, (sp - sn if cfg.reset == "soft" else sp + sn)


def reset_membrane(v, r, thr, reset):
    """v+ = v - thr*r (soft)  or  v+ = v*(1 - r) (hard)."""
    return v - thr * r if reset == "soft" else v * (1 - r)


def neuron_forward(x, cfg, smooth=False, w=None, th=None):
    """Multi-step neuron over axis 0 (T) of x (T, ..., C); C = channels (last axis).

    v_t = beta*v+_{t-1} + x_t,  s_t = H(v_t - thr_t),  v+_t = reset(v_t, s_t),  v+_0 = 0.
    LIF: beta, thr fixed. PLIF: beta = sigmoid(w), thr = th per channel (learned).
    ALIF: thr_t = theta + a_t, a_{t+1} = rho*a_t + kappa*s_t, a_1 = 0.
    ANN twin (cfg.spiking False): relu(x).
    """
    if not cfg.spiking:
        return np.maximum(x, 0), {"x": x}
    beta = 1 / (1 + np.exp(-w)) if cfg.neuron == "plif" else cfg.beta
    theta = th if cfg.neuron == "plif" else cfg.theta
    v, s = np.empty_like(x), np.empty_like(x)
    vp, a = 0.0, 0.0
    for t in range(x.shape[0]):
        v[t] = beta * vp + x[t]
        thr = theta + a
        s[t], r = fire(v[t], thr, cfg, smooth)
        vp = reset_membrane(v[t], r, thr, cfg.reset)
        if cfg.neuron == "alif":
            a = cfg.alif_rho * a + cfg.alif_kappa * s[t]
    return s, {"v": v, "s": s, "beta": beta, "theta": theta, "smooth": smooth}


def thresholds(s, theta, cfg):
    """thr_t for every t (ALIF recomputes its adaptation a_t from the spikes)."""
    if cfg.neuron != "alif":
        return [theta] * s.shape[0]
    thr, a = [], 0.0
    for t in range(s.shape[0]):
        thr.append(theta + a)
        a = cfg.alif_rho * a + cfg.alif_kappa * s[t]
    return thr


def neuron_backward(ds, cache, cfg):
    """Backprop through time of neuron_forward: returns (dx, dw, dth); dw, dth only for PLIF.

    Going backwards, g_v = dL/dv_{t+1} and g_a = dL/da_{t+1} carry the recurrence:
      dL/dv+_t = beta*g_v;  soft: dv += dL/dv+, dthr -= dL/dv+ * r, dr = -dL/dv+ * thr
                            hard: dv += dL/dv+ * (1 - r),           dr = -dL/dv+ * v
      (detach_reset: dr = 0);  ds_t += kappa*g_a (ALIF);  du = (ds + dr) S'(u), dv += du, dthr -= du
      ALIF: g_a = rho*g_a + dthr.  PLIF: dbeta += g_v * v+_t, dtheta += dthr.
    """
    if not cfg.spiking:
        return ds * (cache["x"] > 0), None, None
    v, s, beta, theta, smooth = cache["v"], cache["s"], cache["beta"], cache["theta"], cache["smooth"]
    C = v.shape[-1]
    thrs = thresholds(s, theta, cfg)
    dx = np.empty_like(v)
    g_v, g_a, dbeta, dtheta = 0.0, 0.0, 0.0, 0.0
    for t in reversed(range(v.shape[0])):
        thr = thrs[t]
        _, r = fire(v[t], thr, cfg, smooth)
        g_vp = beta * g_v
        if cfg.neuron == "plif":
            dbeta = dbeta + (g_v * reset_membrane(v[t], r, thr, cfg.reset)).reshape(-1, C).sum(0)
        dst = ds[t] + cfg.alif_kappa * g_a if cfg.neuron == "alif" else ds[t]
        if cfg.reset == "soft":
            dv, dthr, dr = g_vp, -g_vp * r, -g_vp * thr
        else:
            dv, dthr, dr = g_vp * (1 - r), 0.0, -g_vp * v[t]
        if cfg.detach_reset:
            dr = 0.0
        if cfg.neuron == "ternary":
            dsp, dsn = (dst + dr, -dst - dr) if cfg.reset == "soft" else (dst + dr, dr - dst)
            dv = dv + dsp * surrogate_grad(v[t] - thr, cfg) - dsn * surrogate_grad(-v[t] - thr, cfg)
        else:
            du = (dst + dr) * surrogate_grad(v[t] - thr, cfg)
            dv, dthr = dv + du, dthr - du
        if cfg.neuron == "alif":
            g_a = cfg.alif_rho * g_a + dthr
        if cfg.neuron == "plif":
            dtheta = dtheta + np.broadcast_to(dthr, v[t].shape).reshape(-1, C).sum(0)
        dx[t] = dv
        g_v = dv
    if cfg.neuron != "plif":
        return dx, None, None
    return dx, dbeta * beta * (1 - beta), dtheta

# ----------------------------------------------------------------------------- layers


def linear(x, W):
    """y = x @ W over the last axis, x (..., in), W (in, out)."""
    return (x.reshape(-1, x.shape[-1]) @ W).reshape(x.shape[:-1] + (W.shape[1],))


def linear_backward(dy, x, W):
    """dx = dy @ W^T, dW = x^T dy (summed over every leading axis)."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    return (dy2 @ W.T).reshape(x.shape), x.reshape(-1, x.shape[-1]).T @ dy2


def rmsnorm(x, g, eps):
    """y = x / sqrt(mean(x^2) + eps) * g over the last axis."""
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat = x * r
    return xhat * g, (xhat, r, g)


def rmsnorm_backward(dy, cache):
    """dx = r (dxhat - xhat mean(dxhat xhat)), dxhat = dy g;  dg = sum dy xhat."""
    xhat, r, g = cache
    dxhat = dy * g
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).reshape((-1,) + g.shape).sum(0)


def split_heads(x, H):
    """(T, B, L, D) -> (T, B, H, L, dh)."""
    T, B, L, D = x.shape
    return x.reshape(T, B, L, H, D // H).transpose(0, 1, 3, 2, 4)


def merge_heads(y):
    """(T, B, H, L, dh) -> (T, B, L, D)."""
    T, B, H, L, dh = y.shape
    return y.transpose(0, 1, 3, 2, 4).reshape(T, B, L, H * dh)


def headnorm(y, g, eps):
    """RMS-normalise each head's dh channels, then scale by the gain g (D,): y (T,B,H,L,dh)."""
    H, dh = y.shape[2], y.shape[4]
    n, cache = rmsnorm(y.transpose(0, 1, 3, 2, 4), g.reshape(H, dh), eps)   # (T, B, L, H, dh)
    return n.reshape(n.shape[:3] + (H * dh,)), cache


def headnorm_backward(dn, cache):
    """Returns dy (T, B, H, L, dh) and dg (D,)."""
    xhat = cache[0]
    dy, dg = rmsnorm_backward(dn.reshape(xhat.shape), cache)
    return dy.transpose(0, 1, 3, 2, 4), dg.reshape(-1)


def head_decays(H, start, step):
    """gamma_h = 1 - 2^-(start + step h): head h remembers about 2^(start + step h) positions. The decays
    are the only sense of order (no position embeddings): gamma = 1/2 tells the last few tokens apart."""
    return 1.0 - 2.0 ** -(start + step * np.arange(H))


@lru_cache(maxsize=16)
def decay_mask(H, L, dtype, start, step):
    """Dmask[h, l, j] = gamma_h^(l-j) for j <= l, else 0.  Shape (H, L, L), read-only."""
    lag = np.arange(L)[:, None] - np.arange(L)[None, :]
    D = np.where(lag >= 0, head_decays(H, start, step)[:, None, None] ** np.maximum(lag, 0), 0.0).astype(dtype)
    D.flags.writeable = False
    return D


def attention(q, k, v, cfg):
    """Causal spike-driven attention, parallel form. q, k, v: spikes (T, B, L, D).

    linear:   Y = (Q K^T * Dmask) V       y_l = sum_{j<=l} gamma^(l-j) (q_l . k_j) v_j
    hadamard: Y = Dmask (K * V)           y_l = sum_{j<=l} gamma^(l-j) k_j * v_j
    Returns Y (T, B, H, L, dh).
    """
    H = cfg.n_head
    Q, K, V = split_heads(q, H), split_heads(k, H), split_heads(v, H)
    Dm = decay_mask(H, q.shape[2], np.dtype(q.dtype), cfg.decay_start, cfg.decay_step)
    if cfg.attention == "linear":
        A = (Q @ K.swapaxes(-1, -2)) * Dm                   # (T, B, H, L, L)
        return A @ V, (Q, K, V, A, Dm)
    return Dm @ (K * V), (Q, K, V, None, Dm)


def attention_backward(dY, cache, cfg):
    """Gradients of attention() for q, k, v, each (T, B, L, D)."""
    Q, K, V, A, Dm = cache
    if cfg.attention == "linear":
        dV = A.swapaxes(-1, -2) @ dY
        dA = (dY @ V.swapaxes(-1, -2)) * Dm
        dQ, dK = dA @ K, dA.swapaxes(-1, -2) @ Q
    else:
        dKV = Dm.swapaxes(-1, -2) @ dY
        dQ, dK, dV = np.zeros_like(Q), dKV * V, dKV * K
    return merge_heads(dQ), merge_heads(dK), merge_heads(dV)


def attention_recurrent(q, k, v, cfg, state, i):
    """One position of attention with a constant-size state per layer, timestep and head.

    linear:   S = gamma S + k^T v (dh x dh),  y = q S
    hadamard: c = gamma c + k * v (dh),       y = c
    q, k, v: (T, B, 1, D); returns Y (T, B, H, 1, dh) and updates state["layers"][i].
    """
    H = cfg.n_head
    Q, K, V = (split_heads(a, H)[:, :, :, 0] for a in (q, k, v))     # (T, B, H, dh)
    gamma = head_decays(H, cfg.decay_start, cfg.decay_step).astype(q.dtype)
    if cfg.attention == "linear":
        S = gamma[:, None, None] * state["layers"][i] + K[..., :, None] * V[..., None, :]
        y = (Q[..., None, :] @ S)[..., 0, :]
    else:
        S = gamma[:, None] * state["layers"][i] + K * V
        y = S
    state["layers"][i] = S
    return y[:, :, :, None, :]

# ----------------------------------------------------------------------------- model


def dropout_mask(shape, p, rng):
    """Inverted dropout: keep each unit with probability 1 - p and scale it by 1/(1 - p), so the
    expected residual stream is the one evaluation sees (1.0: keep all). Backward: dy * mask."""
    if rng is None or p == 0:
        return 1.0
    return (rng.random(shape, dtype=np.float32) >= p) / np.float32(1 - p)


def neuron_site(params, prefix, site, x, cfg, smooth):
    """Run the neuron at a named site, with its PLIF parameters when the neuron is PLIF."""
    return neuron_forward(x, cfg, smooth, params.get(f"{prefix}{site}.w"), params.get(f"{prefix}{site}.theta"))


def block_forward(params, i, h, cfg, smooth=False, state=None, rng=None):
    """One block on the residual stream h (T, B, L, D); state=None: parallel form; rng: dropout."""
    p, b, eps = params, f"blocks.{i}.", cfg.norm_eps
    c = {"h": h}
    n1, c["norm1"] = rmsnorm(h, p[b + "norm1.weight"], eps)
    c["s"], c["sn1"] = neuron_site(p, b, "sn1", n1, cfg, smooth)
    for name, w in (("q", "wq"), ("k", "wk"), ("v", "wv")):
        c[name], c["sn_" + name] = neuron_site(p, b, "attn.sn_" + name, linear(c["s"], p[b + "attn." + w]), cfg, smooth)
    if state is None:
        y, c["att"] = attention(c["q"], c["k"], c["v"], cfg)
    else:
        y = attention_recurrent(c["q"], c["k"], c["v"], cfg, state, i)
    nrm, c["hnorm"] = headnorm(y, p[b + "attn.norm.weight"], eps)
    c["z"], c["sn_o"] = neuron_site(p, b, "attn.sn_o", nrm, cfg, smooth)
    c["o"] = c["z"] if cfg.attention == "linear" else c["q"] * c["z"]
    c["drop_attn"] = dropout_mask(h.shape, cfg.dropout, rng)
    h = h + linear(c["o"], p[b + "attn.wo"]) * c["drop_attn"]
    n2, c["norm2"] = rmsnorm(h, p[b + "norm2.weight"], eps)
    c["s2"], c["sn2"] = neuron_site(p, b, "sn2", n2, cfg, smooth)
    c["u"], c["sn_h"] = neuron_site(p, b, "mlp.sn_h", linear(c["s2"], p[b + "mlp.w1"]), cfg, smooth)
    c["drop_mlp"] = dropout_mask(h.shape, cfg.dropout, rng)
    return h + linear(c["u"], p[b + "mlp.w2"]) * c["drop_mlp"], c


def neuron_site_backward(ds, c, key, b, site, cfg, grads):
    dx, dw, dth = neuron_backward(ds, c[key], cfg)
    if dw is not None:
        grads[f"{b}{site}.w"] = dw
        grads[f"{b}{site}.theta"] = dth
    return dx


def block_backward(dh, c, params, i, cfg, grads):
    """Backward of block_forward: returns dL/dh_in and writes the block's grads."""
    p, b = params, f"blocks.{i}."
    # MLP: h_out = h_mid + (u @ w2) * m, u = SN_h(s2 @ w1), s2 = SN_2(rmsnorm(h_mid)), m dropout
    du, grads[b + "mlp.w2"] = linear_backward(dh * c["drop_mlp"], c["u"], p[b + "mlp.w2"])
    da = neuron_site_backward(du, c, "sn_h", b, "mlp.sn_h", cfg, grads)
    ds2, grads[b + "mlp.w1"] = linear_backward(da, c["s2"], p[b + "mlp.w1"])
    dn2 = neuron_site_backward(ds2, c, "sn2", b, "sn2", cfg, grads)
    dx, grads[b + "norm2.weight"] = rmsnorm_backward(dn2, c["norm2"])
    dh = dh + dx
    # attention: h_mid = h + (o @ wo) * m
    do, grads[b + "attn.wo"] = linear_backward(dh * c["drop_attn"], c["o"], p[b + "attn.wo"])
    dz, dq_gate = (do, 0.0) if cfg.attention == "linear" else (do * c["q"], do * c["z"])
    dnrm = neuron_site_backward(dz, c, "sn_o", b, "attn.sn_o", cfg, grads)
    dy, grads[b + "attn.norm.weight"] = headnorm_backward(dnrm, c["hnorm"])
    dq, dk, dv = attention_backward(dy, c["att"], cfg)
    ds = 0.0
    for name, w, d in (("q", "wq", dq + dq_gate), ("k", "wk", dk), ("v", "wv", dv)):
        da = neuron_site_backward(d, c, "sn_" + name, b, "attn.sn_" + name, cfg, grads)
        dsw, grads[b + "attn." + w] = linear_backward(da, c["s"], p[b + "attn." + w])
        ds = ds + dsw
    dn1 = neuron_site_backward(ds, c, "sn1", b, "sn1", cfg, grads)
    dx, grads[b + "norm1.weight"] = rmsnorm_backward(dn1, c["norm1"])
    return dh + dx


def readout_weight(params, cfg):
    return params["embed.weight"].T if cfg.tie_embeddings else params["head.weight"]


def forward(params, cfg, idx, smooth=False, rng=None, state=None):
    """Tokens idx (B, L) -> logits (B, L, V) and the cache for backward. The parallel (training)
    form; with a decode state, the recurrent one. rng: draw dropout masks (training)."""
    T = timesteps(cfg)
    drop_embed = dropout_mask(idx.shape + (cfg.d_model,), cfg.dropout, rng)
    x = params["embed.weight"][idx] * drop_embed                 # (B, L, D)
    h = np.broadcast_to(x, (T,) + x.shape)                        # (T, B, L, D) residual stream
    caches = []
    for i in range(cfg.n_layer):
        h, c = block_forward(params, i, h, cfg, smooth, state, rng)
        caches.append(c)
    hbar = h.mean(0)                                              # (B, L, D)
    xf, fcache = rmsnorm(hbar, params["norm_f.weight"], cfg.norm_eps)
    logits = linear(xf, readout_weight(params, cfg))             # (B, L, V)
    return logits, {"idx": idx, "blocks": caches, "norm_f": fcache, "xf": xf, "T": T, "drop_embed": drop_embed}


def backward(params, cfg, cache, dlogits):
    """Gradients of every parameter given dL/dlogits (B, L, V)."""
    grads = {}
    dxf, dW = linear_backward(dlogits, cache["xf"], readout_weight(params, cfg))
    dhbar, grads["norm_f.weight"] = rmsnorm_backward(dxf, cache["norm_f"])
    T = cache["T"]
    dh = np.broadcast_to(dhbar / T, (T,) + dhbar.shape)           # hbar = mean_t h_t
    for i in reversed(range(cfg.n_layer)):
        dh = block_backward(dh, cache["blocks"][i], params, i, cfg, grads)
    E = params["embed.weight"]
    dE = np.zeros_like(E)
    np.add.at(dE, cache["idx"].ravel(), (dh.sum(0) * cache["drop_embed"]).reshape(-1, E.shape[1]))
    if cfg.tie_embeddings:
        dE += dW.T
    else:
        grads["head.weight"] = dW
    grads["embed.weight"] = dE
    return grads


def cross_entropy(logits, y):
    """loss = mean over B*L of -log softmax(logits)[y];  dloss/dlogits = (softmax - onehot)/N."""
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    sumexp = e.sum(-1, keepdims=True)
    nll = np.log(sumexp[..., 0]) - np.take_along_axis(z, y[..., None], -1)[..., 0]
    dlogits = e / sumexp
    np.put_along_axis(dlogits, y[..., None], np.take_along_axis(dlogits, y[..., None], -1) - 1, -1)
    return float(nll.mean()), dlogits / y.size


def spike_rates(cache, cfg):
    """Per layer: fraction of nonzero outputs at each neuron site, and of wo's input o."""
    names = {"s": "sn1", "q": "attn.sn_q", "k": "attn.sn_k", "v": "attn.sn_v", "z": "attn.sn_o",
             "s2": "sn2", "u": "mlp.sn_h", "o": "wo_input"}
    return [{site: float(np.count_nonzero(c[key]) / c[key].size) for key, site in names.items()}
            for c in cache["blocks"]]


def loss_and_grads(params, cfg, x, y, smooth=False, rng=None):
    """(loss, grads, stats) for inputs x and targets y, both (B, L) ints; rng: dropout masks."""
    logits, cache = forward(params, cfg, x, smooth, rng)
    loss, dlogits = cross_entropy(logits, y)
    grads = backward(params, cfg, cache, dlogits)
    return loss, grads, {"rates": spike_rates(cache, cfg)}


def init_decode_state(cfg, batch, dtype=np.float32):
    """Zero attention state per layer: (T, B, H, dh, dh) linear or (T, B, H, dh) hadamard."""
    H, dh = cfg.n_head, cfg.d_model // cfg.n_head
    shape = (timesteps(cfg), batch, H, dh) + ((dh,) if cfg.attention == "linear" else ())
    return {"pos": 0, "layers": [np.zeros(shape, dtype) for _ in range(cfg.n_layer)]}


def decode_step(params, cfg, state, token_ids):
    """Recurrent form: feed one token per sequence (B,), return next-token logits (B, V)."""
    logits, _ = forward(params, cfg, np.asarray(token_ids).reshape(-1, 1), state=state)
    state["pos"] += 1
    return logits[:, 0]

# ----------------------------------------------------------------------------- optimizer


def lr_at(step, tcfg):
    """Linear warmup lr*(step+1)/warmup, then cosine from lr down to min_lr at max_steps."""
    if step < tcfg.warmup:
        return tcfg.lr * (step + 1) / tcfg.warmup
    progress = min(1.0, (step - tcfg.warmup) / max(1, tcfg.max_steps - tcfg.warmup))
    return tcfg.min_lr + 0.5 * (tcfg.lr - tcfg.min_lr) * (1 + math.cos(math.pi * progress))


def layer_depth(name, n_layer):
    """0 for the embedding, i+1 for blocks.i, n_layer+1 for the final norm and head."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return 0 if name.startswith("embed") else n_layer + 1


def init_opt_state(params):
    return {moment: {k: np.zeros_like(v) for k, v in params.items()} for moment in ("m", "v")}


def clip_grads(grads, max_norm):
    """Scale all gradients by min(1, max_norm / (||g|| + 1e-6)), ||g|| the global L2 norm."""
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    scale = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
    return {k: g * g.dtype.type(scale) for k, g in grads.items()}, norm


def adamw_step(params, grads, opt, step, tcfg, n_layer, b1=0.9, b2=0.95, eps=1e-8):
    """One AdamW update in place (step = completed steps before it, bias correction uses step+1).

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr_p * wd * p  (matrices only);
    p -= lr_p * mhat / (sqrt(vhat) + eps),  lr_p = lr_at(step) * layer_lr_decay^(n_layer+1-depth).
    """
    lr = lr_at(step, tcfg)
    c1, c2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)
    for name, p in params.items():
        g, m, v = grads[name], opt["m"][name], opt["v"][name]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        lr_p = lr * tcfg.layer_lr_decay ** (n_layer + 1 - layer_depth(name, n_layer))
        if p.ndim >= 2:
            p *= p.dtype.type(1 - lr_p * tcfg.weight_decay)
        p -= (lr_p * (m / c1) / (np.sqrt(v / c2) + eps)).astype(p.dtype)
    return lr

# ----------------------------------------------------------------------------- data, eval, checkpoints


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


def get_batch(data, batch_size, context, rng):
    """Random windows: x = data[i:i+L], y = data[i+1:i+L+1]; both (B, L) int64."""
    if len(data) < context + 2:
        raise ValueError(f"split has {len(data)} tokens, fewer than context+2 = {context + 2}")
    starts = rng.integers(0, len(data) - context, size=batch_size)
    windows = np.stack([data[i:i + context + 1] for i in starts]).astype(np.int64)   # (B, L+1)
    return windows[:, :-1].copy(), windows[:, 1:].copy()     # contiguous, as callers may view them


def bits_per_char(total_nats, n_chars):
    """BPC = total loss in nats / ln 2 / characters of the evaluated text."""
    return total_nats / math.log(2) / n_chars


def eval_windows(val, context, max_tokens):
    """The fixed evaluation slice: the first n non-overlapping windows of val, x and y (n, L)."""
    n = min(max_tokens // context, (len(val) - 1) // context)
    ids = np.asarray(val[:n * context + 1], dtype=np.int64)
    return ids[:-1].reshape(n, context), ids[1:].reshape(n, context)


def evaluate(params, cfg, x, y, batch=8):
    """Total nats over all targets y (n, L), forward only."""
    total = 0.0
    for b in range(0, len(x), batch):
        logits, _ = forward(params, cfg, x[b:b + batch])
        total += cross_entropy(logits, y[b:b + batch])[0] * y[b:b + batch].size
    return total


def eval_report(params, cfg, val, context, max_tokens, decode):
    """nats/token, perplexity and BPC on the fixed slice; BPC counts the characters of the
    evaluated target tokens exactly, by decoding them: len(decode(y))."""
    x, y = eval_windows(val, context, max_tokens)
    if len(x) == 0:
        return None
    batch = max(1, 8 * cfg.context ** 2 // context ** 2)   # keep the (L x L) attention small
    nats = evaluate(params, cfg, x, y, batch)
    n_chars = len(decode(y.ravel().tolist()))
    return {"nats": nats / y.size, "ppl": math.exp(nats / y.size), "bpc": bits_per_char(nats, n_chars),
            "tokens": int(y.size), "chars": n_chars, "context": context}


def save_model(path, params, mcfg, tcfg, step, opt_state=None, tokenizer_info=None, data_dir=None):
    """Atomic checkpoint: params, optimizer moments and the config JSON of SPEC."""
    tok = dict(tokenizer_info or {})
    config = {"model": asdict(mcfg), "train": dict(asdict(tcfg), step=int(step)), "tokenizer": tok,
              "data": {"dir": str(data_dir if data_dir else Path(tok["path"]).parent if tok.get("path") else "")}}
    return save_checkpoint(path, params, config, opt_state)


def load_model(path):
    """(params, ModelConfig, train dict, step, opt_state|None, config); CheckpointError on any problem."""
    params, config, opt = load_checkpoint(path)
    try:
        mcfg = ModelConfig(**config["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {err}") from None
    shapes = param_shapes(mcfg)
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


def check_tokenizer(config, sha256, path="checkpoint"):
    """Refuse to pair a checkpoint with a tokenizer other than the one it was trained with."""
    have = config.get("tokenizer", {}).get("sha256")
    if have != sha256:
        raise CheckpointError(f"{path} was trained with tokenizer sha256 {str(have)[:12]}..., "
                              f"but the dataset's tokenizer is {sha256[:12]}...; use the matching data dir")


def load_dataset_info(data_dir):
    """(tokens.json dict, tokenizer, tokenizer_info) of a prepared dataset dir."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "tokens.json").read_text())
    tok = load_stage("2_tokenizer").Tokenizer.load(data_dir / "tokenizer.json")
    info = {"path": str(data_dir / "tokenizer.json"), "sha256": meta["tokenizer_sha256"],
            "vocab_size": meta["vocab_size"]}
    return meta, tok, info

# ----------------------------------------------------------------------------- generation


def sample_token(logits, rng, temperature=1.0, top_k=0, top_p=1.0):
    """Sample from softmax(logits / temperature), keeping the top_k tokens and the smallest set
    whose probability reaches top_p; temperature 0 picks the argmax."""
    logits = logits.astype(np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k > 0:
        logits[logits < np.sort(logits)[-min(top_k, len(logits))]] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p   # always keeps the most likely
        probs[order[~keep]] = 0.0
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def generate(params, cfg, prompt_ids, max_new_tokens, rng, temperature=1.0, top_k=0, top_p=1.0):
    """Yield new token ids one at a time with the recurrent form (constant cost per token)."""
    state = init_decode_state(cfg, 1, params["embed.weight"].dtype)
    for t in prompt_ids:
        logits = decode_step(params, cfg, state, [t])
    for _ in range(max_new_tokens):
        nxt = sample_token(logits[0], rng, temperature, top_k, top_p)
        yield nxt
        logits = decode_step(params, cfg, state, [nxt])


def stream_text(tok, params, cfg, prompt, max_new_tokens, seed=0, temperature=0.8, top_k=40, top_p=0.95, out=None):
    """Sample max_new_tokens after the prompt and print them as they come."""
    ids = tok.encode(prompt) or [tok.bos_id]
    new = generate(params, cfg, list(ids), max_new_tokens, np.random.default_rng(seed), temperature, top_k, top_p)
    return print_stream(tok, prompt, ids, new, out)

# ----------------------------------------------------------------------------- spikes, synaptic ops, energy

E_AC, E_MAC = 0.9e-12, 4.6e-12    # joules per accumulate / multiply-accumulate, 45 nm (Horowitz 2014)


def synaptic_ops(cfg, rates):
    """Per-token operation counts of the spiking model (ACs on spikes, MACs on reals) and of
    its ANN twin (all MACs). A layer fed by spikes: rate_in * in * out * T accumulates.
    Attention per timestep and head: linear form S += k^T v, y = q S -> (rate_k + rate_q) dh^2
    ACs (twin: 2 dh^2 MACs); hadamard c += k * v -> rate_k dh ACs (twin: 2 dh MACs, k*v and q*z).
    The readout (real-valued, D*V) is a MAC in both; norms and neuron updates are not counted."""
    D, F, V, T, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.T, cfg.n_head
    dh = D // H
    ac, ann = 0.0, 0.0
    for r in rates:
        ac += T * (3 * r["sn1"] * D * D + r["wo_input"] * D * D + r["sn2"] * D * F + r["mlp.sn_h"] * F * D)
        ann += 4 * D * D + 2 * D * F
        if cfg.attention == "linear":
            ac += T * H * (r["attn.sn_k"] + r["attn.sn_q"]) * dh * dh
            ann += 2 * H * dh * dh
        else:
            ac += T * H * r["attn.sn_k"] * dh
            ann += 2 * H * dh
    return {"ac": ac, "mac": D * V, "ann_mac": ann + D * V}


def energy_report(params, cfg, x):
    """Spike rates per layer and site on a batch, operation counts and 45 nm energy per token."""
    _, cache = forward(params, cfg, x)
    rates = spike_rates(cache, cfg)
    ops = synaptic_ops(cfg, rates)
    if not cfg.spiking:       # the twin itself: every layer is dense multiply-accumulates
        ops.update(ac=0.0, mac=ops["ann_mac"])
    e_snn = ops["ac"] * E_AC + ops["mac"] * E_MAC
    e_ann = ops["ann_mac"] * E_MAC
    sites = list(rates[0])
    lines = ["layer " + " ".join(f"{s.replace('attn.', ''):>9}" for s in sites)]
    lines += [f"{i:5d} " + " ".join(f"{r[s]:9.3f}" for s in sites) for i, r in enumerate(rates)]
    mean = float(np.mean([r[s] for r in rates for s in SITES if s in r]))
    lines.append(f"mean spike rate {mean:.3f} over {cfg.T} timesteps" if cfg.spiking else
                 "(ANN twin: fraction of nonzero activations)")
    lines.append(f"per token: spiking {ops['ac'] / 1e6:.2f} M AC + {ops['mac'] / 1e6:.2f} M MAC"
                 f" = {e_snn * 1e9:.2f} nJ;  ANN twin {ops['ann_mac'] / 1e6:.2f} M MAC = {e_ann * 1e9:.2f} nJ"
                 f"  (x{e_ann / e_snn:.2f}, 45 nm: AC 0.9 pJ, MAC 4.6 pJ)")
    return "\n".join(lines), {"rates": rates, "ops": ops, "energy_snn": e_snn, "energy_ann": e_ann}

# ----------------------------------------------------------------------------- training


def train_step(params, opt, mcfg, tcfg, data, step):
    """One optimisation step on the batch fixed by (seed, step); returns (loss, stats)."""
    rng = batch_rng(tcfg.seed, step)           # the batch, then the dropout masks: resume is exact
    x, y = get_batch(data, tcfg.batch_size, mcfg.context, rng)
    loss, grads, stats = loss_and_grads(params, mcfg, x, y, rng=rng)
    if not math.isfinite(loss):
        return loss, stats                     # the caller stops; params stay untouched
    grads, stats["grad_norm"] = clip_grads(grads, tcfg.grad_clip)
    stats["lr"] = adamw_step(params, grads, opt, step, tcfg, mcfg.n_layer)
    return loss, stats


def train(mcfg, tcfg, data_dir, ckpt_path, resume=False):
    """The training loop: tqdm, periodic eval + checkpoint, exact resume, Ctrl-C saves."""
    meta, tok, tok_info = load_dataset_info(data_dir)
    train_data, val = open_split(data_dir, "train"), open_split(data_dir, "val")
    step, opt = 0, None
    if resume:
        params, mcfg, _, step, opt, config = load_model(ckpt_path)
        check_tokenizer(config, tok_info["sha256"], ckpt_path)
        print(f"resuming {ckpt_path} at step {step}")
    else:
        if mcfg.vocab_size < meta["vocab_size"]:
            mcfg = ModelConfig(**dict(asdict(mcfg), vocab_size=meta["vocab_size"]))
        params = init_params(mcfg, tcfg.seed)
    opt = opt or init_opt_state(params)
    n_params = sum(p.size for p in params.values())
    print(f"model: {n_params / 1e6:.2f} M parameters, {mcfg.n_layer} layers, d={mcfg.d_model}, T={mcfg.T}, "
          f"context {mcfg.context}, {mcfg.neuron if mcfg.spiking else 'ANN twin'}; "
          f"data: {len(train_data):,} train / {len(val):,} val tokens")

    def save(done):
        save_model(ckpt_path, params, mcfg, tcfg, done, opt, tok_info, data_dir)

    def evaluate_now(done):
        for ctx in (mcfg.context, 4 * mcfg.context):
            r = eval_report(params, mcfg, val, ctx, tcfg.eval_tokens, tok.decode)
            if r:
                tqdm.write(f"step {done}: val @ context {ctx}: {r['nats']:.4f} nats/token, ppl {r['ppl']:.2f}, "
                           f"{r['bpc']:.4f} bits/char ({r['tokens']} tokens, {r['chars']} chars)")

    t0, tokens_seen, done = time.time(), 0, step
    bar = tqdm(range(step, tcfg.max_steps), initial=step, total=tcfg.max_steps, desc="train", dynamic_ncols=True)
    try:
        for step in bar:
            loss, stats = train_step(params, opt, mcfg, tcfg, train_data, step)
            if not math.isfinite(loss):
                bar.close()
                raise FloatingPointError(f"loss is {loss} at step {step}: stopping without saving; the last good "
                                         f"checkpoint ({ckpt_path}, if any) is kept. Try a lower --lr.")
            done, tokens_seen = step + 1, tokens_seen + tcfg.batch_size * mcfg.context
            rate = np.mean([r["sn1"] for r in stats["rates"]])
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{stats['lr']:.1e}", spikes=f"{rate:.2f}",
                            tok_s=f"{tokens_seen / (time.time() - t0):.0f}")
            out_of_time = tcfg.max_minutes > 0 and time.time() - t0 > 60 * tcfg.max_minutes
            if done % tcfg.eval_interval == 0 or done == tcfg.max_steps or out_of_time:
                evaluate_now(done)
                save(done)
            if out_of_time:
                tqdm.write(f"max_minutes={tcfg.max_minutes} reached at step {done}; resume with --resume 1")
                break
    except KeyboardInterrupt:
        bar.close()
        save(done)
        print(f"\ninterrupted: saved step {done} to {ckpt_path}; continue with --resume 1")
        raise
    bar.close()
    return params, mcfg, tok

# ----------------------------------------------------------------------------- main


def parse_bool(text):
    if str(text).lower() not in ("0", "1", "true", "false"):
        raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {text!r}")
    return str(text).lower() in ("1", "true")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--resume", type=parse_bool, default=False, help="continue from the checkpoint")
    ap.add_argument("--ckpt", default=None, help="checkpoint path (default: OUT_DIR/ckpt.npz)")
    ap.add_argument("--generate", default=None, metavar="PROMPT", help="only generate from the checkpoint")
    ap.add_argument("--max_new_tokens", type=int, default=120)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=40)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--sample_seed", type=int, default=0)
    for group, cls in (("model (ModelConfig)", ModelConfig), ("training (TrainConfig)", TrainConfig)):
        g = ap.add_argument_group(group, "preset values are used unless given")
        for f in fields(cls):
            kind = parse_bool if f.type in (bool, "bool") else type(f.default)
            g.add_argument(f"--{f.name}", type=kind, default=None, help=f"default {f.default!r} or the preset's")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    names = {f.name for f in fields(ModelConfig)} | {f.name for f in fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    mcfg, tcfg = make_configs(args.preset, **overrides)
    ckpt = Path(args.ckpt or Path(tcfg.out_dir) / "ckpt.npz")
    try:
        if args.resume:       # the run's own training config, with only the options given here changed
            saved = load_model(ckpt)[2]
            tcfg = TrainConfig(**{f.name: overrides.get(f.name, saved.get(f.name, getattr(tcfg, f.name)))
                                  for f in fields(TrainConfig)})
        if args.generate is not None:
            params, mcfg, _, step, _, config = load_model(ckpt)
            tok = load_stage("2_tokenizer").Tokenizer.load(config["tokenizer"]["path"])
            check_tokenizer(config, tok.sha256(), ckpt)
            stream_text(tok, params, mcfg, args.generate, args.max_new_tokens, args.sample_seed,
                        args.temperature, args.top_k, args.top_p)
            return 0
        data_dir = prepare_dataset(tcfg.source, tcfg.data_root)
        params, mcfg, tok = train(mcfg, tcfg, data_dir, ckpt, args.resume)
    except (CheckpointError, FloatingPointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    x, _ = eval_windows(open_split(data_dir, "val"), mcfg.context, 8 * mcfg.context)
    print("\nspike statistics on validation windows (rate = fraction of neurons firing per timestep):")
    print(energy_report(params, mcfg, x)[0])
    print(f"\nsample (recurrent form, temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}):")
    prompt = tok.decode(np.asarray(open_split(data_dir, "val")[:8]).tolist())
    stream_text(tok, params, mcfg, prompt, args.max_new_tokens, args.sample_seed, args.temperature, args.top_k, args.top_p)
    print(f"\ncheckpoint: {ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
