"""Stage 3: a spiking transformer language model in NumPy, every gradient derived by hand.

The reference model of the project. Tokens are embedded into a real-valued residual stream
that is carried over T spike timesteps, shape (T, B, L, D). Inside each block every linear
layer is fed binary (or ternary) spikes from spiking neurons; attention is a causal,
spike-driven linear attention with a per-head decay, trained in its parallel form
(Q K^T * D) V and decoded in its recurrent form with a constant-size state. The readout
averages the residual stream over T. Backward passes are written next to their forwards and
checked against finite differences (tests/test_stage3.py).

    python 3_spike_llm_numpy.py                       # quick start: builtin data, preset `quick`, minutes
    python 3_spike_llm_numpy.py --preset seed --source files:path/to/text.txt
    python 3_spike_llm_numpy.py --resume 1            # continue exactly where a run stopped
    python 3_spike_llm_numpy.py --generate "To be"    # stream text from out/numpy/ckpt.npz
    python 3_spike_llm_numpy.py --n_layer 6 --neuron alif --spiking 0   # any config field, see --help
"""
import math
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.evaluation import eval_batch, validation_report  # noqa: E402, F401
from spikelib.cli import check_choices, config_from_args, fail, preset_configs, stage_parser  # noqa: E402
from spikelib.loop import run_steps  # noqa: E402
from spikelib.plots import plot_checkpoint, plot_only  # noqa: E402
from spikelib.report import (energy_summary, model_line, print_evals, print_summary,  # noqa: E402
                             stream_sample)
from spikelib.runs import (batch_rng, check_tokenizer, get_batch, load_dataset_info,  # noqa: E402, F401
                           load_model as read_model, load_tokenizer, open_split, prepare_dataset, save_model,
                           summary_inputs)
from spikelib.sampling import sample_token  # noqa: E402, F401
from spikelib.stage_run import (ERRORS, SampleConfig, check_model_config, check_train_config,  # noqa: E402
                                resolve_configs, start_run)
from spikelib.synops import synaptic_ops  # noqa: E402

# ----------------------------------------------------------------------------- config

NEURONS = ("lif", "plif", "alif", "ternary", "lits")
TERNARY = ("ternary", "lits")                 # neurons that fire on both sides of zero
SURROGATES = ("arctan", "sigmoid", "fast_sigmoid", "triangle")
SPIKE_FNS = ("heaviside", "sigmoid4x")
QUANTS = ("identity", "round_ste", "stochastic_round_ste", "probabilistic_ste")
NOISY = ("stochastic_round_ste", "probabilistic_ste")
SITES = ("sn1", "attn.sn_q", "attn.sn_k", "attn.sn_v", "attn.sn_o", "sn2", "mlp.sn_h")


@dataclass
class ModelConfig:
    vocab_size: int = 2000        # tokens in the vocabulary (a new run takes its tokenizer's)
    n_layer: int = 4              # transformer blocks
    n_head: int = 4               # attention heads per block (must divide d_model)
    d_model: int = 128            # width of the residual stream
    d_ff: int = 512               # hidden width of the MLP
    T: int = 4                    # spike timesteps per token
    context: int = 128            # training context (positions); decoding is not capped by it
    neuron: str = "lif"           # lif | plif (learned leak, threshold) | alif (adaptive) | ternary | lits
                                  # (ternary times learned per-channel output scales)
    spike_fn: str = "heaviside"   # heaviside (H forward, surrogate backward) | sigmoid4x (p = sigmoid(4u),
                                  # then quant)
    quant: str = "round_ste"      # sigmoid4x's output: identity (p: not a spike) | round_ste |
                                  # stochastic_round_ste | probabilistic_ste (random in training only)
    syn_alpha: float = 0.0        # S trace: syn = a syn + (1 - a) x drives the membrane (0: off, x directly)
    surrogate: str = "arctan"     # gradient of heaviside's spike: arctan | sigmoid | fast_sigmoid | triangle
    alpha: float = 2.0            # surrogate sharpness
    beta: float = 0.5             # membrane leak (PLIF: initial value)
    theta: float = 1.0            # firing threshold (PLIF: initial value)
    reset: str = "soft"           # after a spike: soft (subtract the threshold) | hard (to zero)
    detach_reset: bool = False    # backward treats the spike in the reset term as a constant
    alif_rho: float = 0.9         # ALIF adaptation decay
    alif_kappa: float = 0.5       # ALIF threshold increase per spike
    attention: str = "linear"     # linear (q (K^T V)) | hadamard (k * v, gated by q)
    decay_start: float = 1.0      # head h decays as gamma_h = 1 - 2^-(decay_start + decay_step * h)
    decay_step: float = 1.5       # so head h remembers about 2^(decay_start + decay_step * h) positions
    spiking: bool = True          # 0: the ANN twin (relu instead of spikes, one timestep)
    dropout: float = 0.0          # training only: on the embedding and on each residual branch
    tie_embeddings: bool = True   # the readout reuses the embedding matrix
    norm_eps: float = 1e-5        # epsilon of the RMS norms
    rate_coding: bool = False     # norms and attention read running means over the timesteps so far
    # (stage 7: a converted network then approaches its ANN as T grows)
    token_shift: bool = False     # the attention's k and v read, in the first half of the channels, the
                                  # previous position's spikes (s_{l-1}); q reads s_l as it is

    def __post_init__(self):
        check_choices(self, {"neuron": NEURONS, "surrogate": SURROGATES, "spike_fn": SPIKE_FNS,
                             "quant": QUANTS, "reset": ("soft", "hard"), "attention": ("linear", "hadamard")})
        check_model_config(self)      # sizes and ranges, one error naming the option (spikelib.stage_run)


@dataclass
class TrainConfig:
    source: str = "builtin"       # dataset for stage 1: builtin | shakespeare | wikipedia | files:PATH
    data_root: str = "data"       # folder that holds the prepared datasets
    out_dir: str = "out/numpy"    # the checkpoint is out_dir/ckpt.npz
    batch_size: int = 16          # sequences per step
    max_steps: int = 400          # optimizer steps of the whole run (the schedule ends here)
    max_minutes: float = 0.0      # stop (and save) after this wall time; 0 = no limit
    lr: float = 2e-3              # peak learning rate (AdamW)
    min_lr: float = 2e-4          # learning rate at the end of the cosine decay
    warmup: int = 30              # steps of linear warm-up
    weight_decay: float = 0.1     # AdamW decoupled weight decay on matrices
    grad_clip: float = 1.0        # clip the global gradient norm to this
    layer_lr_decay: float = 1.0   # < 1: lower learning rates for layers nearer the input
    seed: int = 1337              # parameters and batches (a resumed run draws the same batches)
    eval_interval: int = 100      # evaluate and save every this many steps
    eval_tokens: int = 0          # validation tokens per evaluation: 0 = the whole split, N = the first N
    repeat: float = 0.0           # share of windows that read a passage twice (a drill for copying)

    def __post_init__(self):
        check_train_config(self)      # sizes and rates, one error naming the option (spikelib.stage_run)


# Presets: threshold 0.5 (spike rates near 0.25 rather than 0.13 at theta = 1, and lower loss),
# norm_eps 1e-2 (a head whose query spikes are all zero has y = 0, where the head norm's gradient
# is g/sqrt(eps): 316x at 1e-5, enough to swamp training with surrogate-gradient noise).
# The CPU presets evaluate on a slice of the validation split while training (labelled as one).
# quick, the README's quick start, is `small` with a schedule that ends in 300 steps (its cosine
# decay completes on any machine; a busy 2-core laptop still finishes in minutes).
SPIKING = dict(T=4, theta=0.5, norm_eps=1e-2)
SMALL = dict(n_layer=4, n_head=4, d_model=128, d_ff=512, context=64, **SPIKING)
PRESETS = {
    "tiny": {"model": dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, context=32, **SPIKING),
             "train": dict(batch_size=4, max_steps=200, lr=3e-3, min_lr=3e-4, warmup=10, eval_interval=50,
                           eval_tokens=2048)},
    "quick": {"model": SMALL, "train": dict(batch_size=16, max_steps=300, lr=3e-3, min_lr=3e-4, warmup=20,
                                             eval_interval=100, eval_tokens=8192)},
    "small": {"model": SMALL, "train": dict(batch_size=16, max_steps=500, lr=3e-3, min_lr=3e-4, warmup=30,
                                             max_minutes=5.0, eval_interval=100, eval_tokens=16384)},
    "seed": {"model": dict(n_layer=12, n_head=8, d_model=256, d_ff=1024, context=256, **SPIKING),
             "train": dict(batch_size=16, max_steps=20000, lr=1e-3, min_lr=1e-4, warmup=500,
                           eval_interval=500, layer_lr_decay=0.9)},
    "base": {"model": dict(n_layer=12, n_head=8, d_model=512, d_ff=2048, context=512, **SPIKING),
             "train": dict(batch_size=32, max_steps=50000, lr=6e-4, min_lr=6e-5, warmup=1000,
                           eval_interval=1000)},
}


def make_configs(preset="small", **overrides):
    """(ModelConfig, TrainConfig) for a preset, with any field of either overridden by name."""
    return preset_configs(PRESETS, preset, overrides, model=ModelConfig, train=TrainConfig)


def param_shapes(cfg):
    """Every parameter name -> shape (the checkpoint contract; README has the table)."""
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = {"embed.weight": (V, D)}
    for i in range(cfg.n_layer):
        block = {"norm1.weight": (D,), "attn.wq": (D, D), "attn.wk": (D, D), "attn.wv": (D, D),
                 "attn.wo": (D, D), "attn.norm.weight": (D,),
                 "norm2.weight": (D,), "mlp.w1": (D, F), "mlp.w2": (F, D)}
        for site in SITES:              # per-channel neuron parameters: PLIF's leak logit and threshold,
            C = F if site == "mlp.sn_h" else D   # LITS's output scales
            for name in {"plif": ("w", "theta"), "lits": ("scale_pos", "scale_neg")}.get(cfg.neuron, ()):
                block[site + "." + name] = (C,)
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
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
        if "norm" in name or name.endswith(("scale_pos", "scale_neg")):   # LITS: ternary at start
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


def step_fn(u, cfg, smooth, n=None):
    """The spike H(u) for u = v - threshold. heaviside: [u > 0] (smooth mode: S(u)). sigmoid4x: the
    firing probability p = sigmoid(4u), then quant: identity p (a rate, not a spike), round_ste
    [p >= 1/2] = [u >= 0], stochastic_round_ste floor(p + n) = [n >= 1 - p], probabilistic_ste
    [n < p] (Bernoulli(p)), n uniform in [0, 1); without n (evaluation) the random two round.
    Smooth mode: p itself (the function whose derivative the backward uses)."""
    if cfg.spike_fn == "heaviside":
        return surrogate(u, cfg) if smooth else (u > 0).astype(u.dtype)
    p = 0.5 * (1 + np.tanh(2 * u))                        # sigmoid(4u) without overflow
    if smooth or cfg.quant == "identity":
        return p
    if n is None or cfg.quant == "round_ste":
        return (u >= 0).astype(u.dtype)
    return ((n >= 1 - p) if cfg.quant == "stochastic_round_ste" else (n < p)).astype(u.dtype)


def spike_grad(u, cfg):
    """dH/du in the backward: heaviside S'(u); sigmoid4x dp/du = 4 p (1 - p) times d out/dp = 1
    (exact for identity; the straight-through rule for the discrete quantizers)."""
    if cfg.spike_fn == "heaviside":
        return surrogate_grad(u, cfg)
    p = 0.5 * (1 + np.tanh(2 * u))
    return 4 * p * (1 - p)


def fire(v, thr, cfg, smooth, noise=(None, None), scales=(1.0, 1.0)):
    """Output s, reset amount r and the unscaled spikes (sp, sn) for membrane v and threshold thr.

    binary: s = r = sp = H(v - thr).  ternary: sp = H(v - thr), sn = H(-v - thr), s = sp - sn in
    {-1, 0, 1}; its soft reset subtracts thr (sp - sn) (r = sp - sn), its hard reset zeroes v if
    either side fired (r = sp + sn).  lits: s = s+ sp - s- sn in {-s-, 0, s+}, scales (s+, s-)
    learned per channel; the reset is ternary's. noise: the quantizer's draws for sp and sn.
    """
    if cfg.neuron not in TERNARY:
        s = step_fn(v - thr, cfg, smooth, noise[0])
        return s, s, s, 0.0
    sp, sn = step_fn(v - thr, cfg, smooth, noise[0]), step_fn(-v - thr, cfg, smooth, noise[1])
    return scales[0] * sp - scales[1] * sn, (sp - sn if cfg.reset == "soft" else sp + sn), sp, sn


def syn_trace(x, a):
    """The S trace over T (axis 0): syn_t = a syn_{t-1} + (1 - a) x_t, syn_0 = 0; a = 0: x itself."""
    if a == 0:
        return x
    syn, prev = np.empty_like(x), 0.0
    for t in range(x.shape[0]):
        prev = syn[t] = a * prev + (1 - a) * x[t]
    return syn


def syn_trace_backward(dsyn, a):
    """dL/dx_t = (1 - a) g_t with g_t = dL/dsyn_t + a g_{t+1}: the same filter run backwards in time."""
    return syn_trace(dsyn[::-1], a)[::-1] if a else dsyn


def reset_membrane(v, r, thr, reset):
    """v+ = v - thr*r (soft)  or  v+ = v*(1 - r) (hard)."""
    return v - thr * r if reset == "soft" else v * (1 - r)


def neuron_forward(x, cfg, smooth=False, w=None, th=None, scales=(1.0, 1.0), rng=None):
    """Multi-step neuron over axis 0 (T) of x (T, ..., C); C = channels (last axis).

    v_t = beta*v+_{t-1} + x_t,  s_t = H(v_t - thr_t),  v+_t = reset(v_t, s_t),  v+_0 = 0.
    LIF: beta, thr fixed. PLIF: beta = sigmoid(w), thr = th per channel (learned).
    ALIF: thr_t = theta + a_t, a_{t+1} = rho*a_t + kappa*s_t, a_1 = 0. LITS: scales (s+, s-).
    S trace (syn_alpha > 0): syn_trace(x) replaces x. rng (training): a random quantizer's draws.
    ANN twin (cfg.spiking False): relu(x). The cache always holds the output as "s".
    """
    if not cfg.spiking:
        return np.maximum(x, 0), {"s": np.maximum(x, 0)}
    beta = 1 / (1 + np.exp(-w)) if cfg.neuron == "plif" else cfg.beta
    theta = th if cfg.neuron == "plif" else cfg.theta
    x = syn_trace(x, cfg.syn_alpha)
    noisy = rng is not None and cfg.spike_fn == "sigmoid4x" and cfg.quant in NOISY
    noise = rng.random((x.shape[0], 2) + x.shape[1:]) if noisy else [(None, None)] * x.shape[0]
    v, s = np.empty_like(x), np.empty_like(x)
    ternary = cfg.neuron in TERNARY        # a binary neuron's reset amount and spikes are s itself
    r, sp, sn = (np.empty_like(x) for _ in range(3)) if ternary else (s, s, None)
    vp, a = 0.0, 0.0
    for t in range(x.shape[0]):
        v[t] = beta * vp + x[t]
        thr = theta + a
        s[t], r[t], sp[t], sn_t = fire(v[t], thr, cfg, smooth, noise[t], scales)
        if ternary:
            sn[t] = sn_t
        vp = reset_membrane(v[t], r[t], thr, cfg.reset)
        if cfg.neuron == "alif":
            a = cfg.alif_rho * a + cfg.alif_kappa * s[t]
    return s, {"v": v, "s": s, "r": r, "sp": sp, "sn": sn, "beta": beta, "theta": theta, "scales": scales}


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
    """Backprop through time of neuron_forward: returns dx and {name: grad} of the site's
    per-channel parameters (PLIF: w, theta; LITS: scale_pos, scale_neg; else none).

    The forward at step t, with thr_t = theta + a_t and r_t the reset amount (r = s):
      (1) charge  v_t     = beta v+_{t-1} + x_t
      (2) fire    s_t     = H(u_t), u_t = v_t - thr_t      (ternary: H(v_t - thr) - H(-v_t - thr),
                                                         lits: s+ H(v_t - thr) - s- H(-v_t - thr))
      (3) reset   v+_t    = v_t - thr_t r_t   (soft)   or   v_t (1 - r_t)   (hard)
      (4) adapt   a_{t+1} = rho a_t + kappa s_t            (ALIF only)
    H has no useful derivative: backward uses spike_grad(u) (S'(u), or sigmoid4x's) in its place.
    Walking t backwards, g_v = dL/dv_{t+1} and g_a = dL/da_{t+1} carry the gradient through time;
    the S trace adds its own backward filter at the end.
    """
    if not cfg.spiking:
        return ds * (cache["s"] > 0), {}                       # relu'(x) = [x > 0]
    v, s, beta, theta, (sc_p, sc_n) = cache["v"], cache["s"], cache["beta"], cache["theta"], cache["scales"]
    C = v.shape[-1]
    thrs = thresholds(s, theta, cfg)
    dx = np.empty_like(v)
    g_v, g_a, dbeta, dtheta, dsc_p, dsc_n = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for t in reversed(range(v.shape[0])):
        thr, r = thrs[t], cache["r"][t]
        g_vp = beta * g_v                                      # dL/dv+_t, through (1) at t+1
        if cfg.neuron == "plif":                               # dL/dbeta += g_v v+_t, through (1) at t+1
            dbeta = dbeta + (g_v * reset_membrane(v[t], r, thr, cfg.reset)).reshape(-1, C).sum(0)
        dst = ds[t]                                            # dL/ds_t from the layers above ...
        if cfg.neuron == "alif":
            dst = dst + cfg.alif_kappa * g_a                   # ... and through (4): da_{t+1}/ds_t = kappa
        if cfg.reset == "soft":                                # (3) soft: v+ = v - thr r
            dv = g_vp                                          #   dv+/dv = 1
            dthr = -g_vp * r                                   #   dv+/dthr = -r
            dr = -g_vp * thr                                   #   dv+/dr = -thr
        else:                                                  # (3) hard: v+ = v (1 - r)
            dv = g_vp * (1 - r)                                #   dv+/dv = 1 - r
            dthr = 0.0                                         #   no threshold in the hard reset
            dr = -g_vp * v[t]                                  #   dv+/dr = -v
        if cfg.detach_reset:
            dr = 0.0                                           # the reset's spike counts as a constant
        if cfg.neuron in TERNARY:                              # s = s+ sp - s- sn; r = sp -/+ sn (soft/hard)
            dsp = sc_p * dst + dr                              # dL/dsp
            dsn = -sc_n * dst - dr if cfg.reset == "soft" else dr - sc_n * dst   # dL/dsn
            dv = dv + dsp * spike_grad(v[t] - thr, cfg)        # dsp/dv = S'(v - thr)
            dv = dv - dsn * spike_grad(-v[t] - thr, cfg)       # dsn/dv = -S'(-v - thr)
            if cfg.neuron == "lits":                           # ds/ds+ = sp, ds/ds- = -sn
                dsc_p = dsc_p + (dst * cache["sp"][t]).reshape(-1, C).sum(0)
                dsc_n = dsc_n - (dst * cache["sn"][t]).reshape(-1, C).sum(0)
        else:
            du = (dst + dr) * spike_grad(v[t] - thr, cfg)      # (2) with r = s: dL/du = (dL/ds + dL/dr) S'(u)
            dv = dv + du                                       #   du/dv = 1
            dthr = dthr - du                                   #   du/dthr = -1
        if cfg.neuron == "alif":
            g_a = cfg.alif_rho * g_a + dthr                    # dL/da_t: (4) at t, and thr_t = theta + a_t
        if cfg.neuron == "plif":
            dtheta = dtheta + np.broadcast_to(dthr, v[t].shape).reshape(-1, C).sum(0)   # thr = theta
        dx[t] = dv                                             # (1): dv_t/dx_t = 1 (x_t: syn_t with S)
        g_v = dv
    dx = syn_trace_backward(dx, cfg.syn_alpha)
    if cfg.neuron == "lits":
        return dx, {"scale_pos": dsc_p, "scale_neg": dsc_n}
    if cfg.neuron != "plif":
        return dx, {}
    return dx, {"w": dbeta * beta * (1 - beta), "theta": dtheta}   # dsigmoid(w)/dw = beta (1 - beta)

# ----------------------------------------------------------------------------- layers


def linear(x, W):
    """y = x @ W over the last axis, x (..., in), W (in, out)."""
    return (x.reshape(-1, x.shape[-1]) @ W).reshape(x.shape[:-1] + (W.shape[1],))


def linear_backward(dy, x, W):
    """dx = dy @ W^T, dW = x^T dy (summed over every leading axis)."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    return (dy2 @ W.T).reshape(x.shape), x.reshape(-1, x.shape[-1]).T @ dy2


def running_mean(x):
    """xbar_t = (1/t) sum_{tau<=t} x_tau over axis 0 (T): a rate estimate that sharpens with t."""
    t = np.arange(1, x.shape[0] + 1, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.cumsum(x, 0) / t


def running_mean_backward(dxbar):
    """Adjoint: dx_tau = sum_{t>=tau} dxbar_t / t (a reversed cumulative sum)."""
    t = np.arange(1, dxbar.shape[0] + 1, dtype=dxbar.dtype).reshape((-1,) + (1,) * (dxbar.ndim - 1))
    return np.flip(np.cumsum(np.flip(dxbar / t, 0), 0), 0)


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
    gamma = head_decays(H, start, step)[:, None, None]                 # (H, 1, 1)
    D = np.where(lag >= 0, gamma ** np.maximum(lag, 0), 0.0).astype(dtype)
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


def token_shift(s, prev=None):
    """Half the channels one position late: out[:, :, l, :D/2] = s[:, :, l-1, :D/2] (at l = 0: prev
    (T, B, D/2), the decode state's last spikes, or zeros), out[..., D/2:] = s[..., D/2:]. A key or value
    read from out sees tokens l-1 and l together, so one attention layer binds a token to the one after
    it (induction), which per-head decays alone cannot. Still exactly the spikes. (Queries read s_l
    unshifted: they ask about the current token; shifting them too made spiking training diverge.)
    s (T, B, L, D); returns out and the last position's s[..., :D/2] (the next call's prev)."""
    half = s.shape[-1] // 2
    first = np.zeros_like(s[:, :, :1, :half]) if prev is None else prev[:, :, None].astype(s.dtype)
    out = np.concatenate([np.concatenate([first, s[:, :, :-1, :half]], 2), s[..., half:]], -1)
    return out, s[:, :, -1, :half].copy()


def token_shift_backward(dout):
    """out[l, :D/2] = s[l-1, :D/2], so ds[:, :, l, :D/2] = dout[:, :, l+1, :D/2] (0 at the last position:
    no later position reads it; prev is a constant); out[..., D/2:] = s[..., D/2:], so that half of
    dout passes through."""
    half = dout.shape[-1] // 2
    late = np.concatenate([dout[:, :, 1:, :half], np.zeros_like(dout[:, :, :1, :half])], 2)
    return np.concatenate([late, dout[..., half:]], -1)


def shift_site(s, on, state, slot):
    """token_shift(s) when on (else s); decoding reads and replaces (never writes into) the decode
    state's shift slot: its previous position's spikes."""
    if not on:
        return s
    if state is None:
        return token_shift(s)[0]
    out, state["shift"][slot] = token_shift(s, state["shift"][slot])
    return out

# ----------------------------------------------------------------------------- model


def dropout_mask(shape, p, rng):
    """Inverted dropout: keep each unit with probability 1 - p and scale it by 1/(1 - p), so the
    expected residual stream is the one evaluation sees (1.0: keep all). Backward: dy * mask."""
    if rng is None or p == 0:
        return 1.0
    return (rng.random(shape, dtype=np.float32) >= p) / np.float32(1 - p)


def neuron_site(params, b, site, x, cfg, smooth, c, rng=None):
    """Run the neuron at a named site of block prefix b (with its PLIF or LITS parameters), keep its
    cache as c[site] and return its spikes; rng: a random quantizer's draws (training)."""
    names = ("w", "theta", "scale_pos", "scale_neg")
    w, th, s_pos, s_neg = (params.get(f"{b}{site}.{n}", 1.0) for n in names)
    s, c[site] = neuron_forward(x, cfg, smooth, w, th, (s_pos, s_neg), rng)
    return s


def block_forward(params, i, h, cfg, smooth=False, state=None, rng=None):
    """One block on the residual stream h (T, B, L, D); state=None: parallel form; rng: dropout.

    The cache names each tensor once: a neuron site's cache under the site's name (its spikes
    are c[site]["s"]), the norms, the attention, wo's input and the dropout masks."""
    p, b, eps = params, f"blocks.{i}.", cfg.norm_eps
    c = {}
    rate = running_mean if cfg.rate_coding else (lambda x: x)    # rate coding: products of rates
    n1, c["norm1"] = rmsnorm(rate(h), p[b + "norm1.weight"], eps)
    s1 = neuron_site(p, b, "sn1", n1, cfg, smooth, c, rng)                        # (T, B, L, D) spikes
    x1 = c["kv_input"] = shift_site(s1, cfg.token_shift, state, i)   # (T, B, L, D) spikes, k and v read
    q = neuron_site(p, b, "attn.sn_q", linear(s1, p[b + "attn.wq"]), cfg, smooth, c, rng)
    k = neuron_site(p, b, "attn.sn_k", linear(x1, p[b + "attn.wk"]), cfg, smooth, c, rng)
    v = neuron_site(p, b, "attn.sn_v", linear(x1, p[b + "attn.wv"]), cfg, smooth, c, rng)
    if state is None:
        y, c["attn"] = attention(rate(q), rate(k), rate(v), cfg)                   # (T, B, H, L, dh)
    else:
        y = attention_recurrent(rate(q), rate(k), rate(v), cfg, state, i)
    nrm, c["attn.norm"] = headnorm(y, p[b + "attn.norm.weight"], eps)
    z = neuron_site(p, b, "attn.sn_o", nrm, cfg, smooth, c, rng)
    c["wo_input"] = z if cfg.attention == "linear" else q * z                     # hadamard: gated by q
    c["drop_attn"] = dropout_mask(h.shape, cfg.dropout, rng)
    h = h + linear(c["wo_input"], p[b + "attn.wo"]) * c["drop_attn"]
    n2, c["norm2"] = rmsnorm(rate(h), p[b + "norm2.weight"], eps)
    s2 = neuron_site(p, b, "sn2", n2, cfg, smooth, c, rng)
    u = neuron_site(p, b, "mlp.sn_h", linear(s2, p[b + "mlp.w1"]), cfg, smooth, c, rng)  # (T, B, L, F)
    c["drop_mlp"] = dropout_mask(h.shape, cfg.dropout, rng)
    return h + linear(u, p[b + "mlp.w2"]) * c["drop_mlp"], c


def neuron_site_backward(ds, c, b, site, cfg, grads):
    """Backward of neuron_site: dL/dx, writing the site's PLIF or LITS gradients."""
    dx, site_grads = neuron_backward(ds, c[site], cfg)
    grads.update({f"{b}{site}.{name}": g for name, g in site_grads.items()})
    return dx


def block_backward(dh, c, params, i, cfg, grads):
    """Backward of block_forward: returns dL/dh_in and writes the block's grads."""
    p, b = params, f"blocks.{i}."
    rate_bwd = running_mean_backward if cfg.rate_coding else (lambda d: d)
    # MLP: h_out = h_mid + (u @ w2) * m, u = SN_h(s2 @ w1), s2 = SN_2(rmsnorm(h_mid)), m dropout
    du, grads[b + "mlp.w2"] = linear_backward(dh * c["drop_mlp"], c["mlp.sn_h"]["s"], p[b + "mlp.w2"])
    da = neuron_site_backward(du, c, b, "mlp.sn_h", cfg, grads)
    ds2, grads[b + "mlp.w1"] = linear_backward(da, c["sn2"]["s"], p[b + "mlp.w1"])
    dn2 = neuron_site_backward(ds2, c, b, "sn2", cfg, grads)
    dx, grads[b + "norm2.weight"] = rmsnorm_backward(dn2, c["norm2"])
    dh = dh + rate_bwd(dx)
    # attention: h_mid = h + (o @ wo) * m, o = z (linear) or q * z (hadamard), z = SN_o(headnorm(y))
    do, grads[b + "attn.wo"] = linear_backward(dh * c["drop_attn"], c["wo_input"], p[b + "attn.wo"])
    dz, dq_gate = do, 0.0
    if cfg.attention == "hadamard":
        dz, dq_gate = do * c["attn.sn_q"]["s"], do * c["attn.sn_o"]["s"]
    dnrm = neuron_site_backward(dz, c, b, "attn.sn_o", cfg, grads)
    dy, grads[b + "attn.norm.weight"] = headnorm_backward(dnrm, c["attn.norm"])
    dq, dk, dv = (rate_bwd(d) for d in attention_backward(dy, c["attn"], cfg))
    # q = SN(s1 @ wq); k, v = SN(x1 @ w), x1 = shift(s1) (token_shift) or s1: dL/ds1 = q's share +
    # the un-shifted sum of k's and v's shares (dL/dx1)
    da = neuron_site_backward(dq + dq_gate, c, b, "attn.sn_q", cfg, grads)
    ds1, grads[b + "attn.wq"] = linear_backward(da, c["sn1"]["s"], p[b + "attn.wq"])
    dx1 = 0.0
    for name, d in (("k", dk), ("v", dv)):
        da = neuron_site_backward(d, c, b, "attn.sn_" + name, cfg, grads)
        dsw, grads[b + "attn.w" + name] = linear_backward(da, c["kv_input"], p[b + "attn.w" + name])
        dx1 = dx1 + dsw
    ds1 = ds1 + (token_shift_backward(dx1) if cfg.token_shift else dx1)
    dn1 = neuron_site_backward(ds1, c, b, "sn1", cfg, grads)
    dx, grads[b + "norm1.weight"] = rmsnorm_backward(dn1, c["norm1"])
    return dh + rate_bwd(dx)


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
    cache = {"idx": idx, "blocks": caches, "norm_f": fcache, "xf": xf, "T": T, "drop_embed": drop_embed}
    return logits, cache


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
    """Per layer: the fraction of nonzero outputs at each neuron site, and of wo's input."""
    def rate(a):
        return float(np.count_nonzero(a) / a.size)
    return [dict({site: rate(c[site]["s"]) for site in SITES}, wo_input=rate(c["wo_input"]))
            for c in cache["blocks"]]


def energy_report(params, cfg, x):
    """(report text, figures): spike rates per layer and site on a batch x (B, L), and energy per token."""
    _, cache = forward(params, cfg, x)
    rates = spike_rates(cache, cfg)
    return energy_summary(cfg, synaptic_ops(cfg, rates), rates)


def loss_and_grads(params, cfg, x, y, smooth=False, rng=None):
    """(loss, grads, stats) for inputs x and targets y, both (B, L) ints; rng: dropout masks."""
    logits, cache = forward(params, cfg, x, smooth, rng)
    loss, dlogits = cross_entropy(logits, y)
    grads = backward(params, cfg, cache, dlogits)
    return loss, grads, {"rates": spike_rates(cache, cfg)}


def init_decode_state(cfg, batch, dtype=np.float32):
    """Zero attention state per layer: (T, B, H, dh, dh) linear or (T, B, H, dh) hadamard; with
    token_shift also one slot per layer, the previous position's spikes of the shifted half of k's
    and v's input, (T, B, D//2) (zeros: nothing before position 0)."""
    H, dh, T = cfg.n_head, cfg.d_model // cfg.n_head, timesteps(cfg)
    shape = (T, batch, H, dh) + ((dh,) if cfg.attention == "linear" else ())
    slots = cfg.n_layer if cfg.token_shift else 0
    shift = [np.zeros((T, batch, cfg.d_model // 2), dtype) for _ in range(slots)]
    return {"pos": 0, "layers": [np.zeros(shape, dtype) for _ in range(cfg.n_layer)], "shift": shift}


def decode_step(params, cfg, state, token_ids):
    """Recurrent form: feed one token per sequence (B,), return next-token logits (B, V)."""
    logits, _ = forward(params, cfg, np.asarray(token_ids).reshape(-1, 1), state=state)
    state["pos"] += 1
    return logits[:, 0]


def generate(params, cfg, prompt_ids, max_new_tokens, rng, temperature=1.0, top_k=0, top_p=1.0):
    """Yield new token ids one at a time with the recurrent form (constant cost per token)."""
    state = init_decode_state(cfg, 1, params["embed.weight"].dtype)
    for t in prompt_ids:
        logits = decode_step(params, cfg, state, [t])
    for _ in range(max_new_tokens):
        nxt = sample_token(logits[0], rng, temperature, top_k, top_p)
        yield nxt
        logits = decode_step(params, cfg, state, [nxt])

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

# ----------------------------------------------------------------------------- training


def eval_report(params, cfg, val, context, max_tokens, decode):
    """Validation figures on the fixed slice of val at the given context (None if it is empty)."""
    def batch_nats(x, y):           # total nats of the targets y (B, L): parallel form, forward only
        return cross_entropy(forward(params, cfg, x)[0], y)[0] * y.size
    return validation_report(batch_nats, val, context, cfg.context, max_tokens, decode)


def load_model(path):
    """(params, ModelConfig, train dict, step, opt_state or None, config); CheckpointError if bad."""
    return read_model(path, ModelConfig, param_shapes)


def start_params(mcfg, tcfg, ckpt_path, resume, tok_info):
    """(params, mcfg, step, opt_state or None): the checkpoint's when resuming, else init_params'
    for the tokenizer's vocabulary (spikelib.stage_run). Stages 4 and 5 start from the same numbers."""
    return start_run(mcfg, tcfg.seed, ckpt_path, resume, tok_info, load_model, init_params)


def train_step(params, opt, mcfg, tcfg, data, step):
    """One optimisation step on the batch fixed by (seed, step); returns (loss, stats)."""
    rng = batch_rng(tcfg.seed, step)           # the batch, then the dropout masks: resume is exact
    x, y = get_batch(data, tcfg.batch_size, mcfg.context, rng, tcfg.repeat)
    loss, grads, stats = loss_and_grads(params, mcfg, x, y, rng=rng)
    if not math.isfinite(loss):
        return loss, stats                     # the caller stops; params stay untouched
    grads, stats["grad_norm"] = clip_grads(grads, tcfg.grad_clip)
    stats["lr"] = adamw_step(params, grads, opt, step, tcfg, mcfg.n_layer)
    return loss, stats


def train(mcfg, tcfg, data_dir, ckpt_path, resume=False):
    """Train from scratch or from the checkpoint; spikelib.loop runs train_step with a progress bar,
    periodic evaluation and checkpoints, the time limit, the NaN guard and Ctrl-C."""
    _, tok, tok_info = load_dataset_info(data_dir)
    train_data, val = open_split(data_dir, "train"), open_split(data_dir, "val")
    params, mcfg, step, opt = start_params(mcfg, tcfg, ckpt_path, resume, tok_info)
    opt = opt or init_opt_state(params)
    print(model_line(sum(p.size for p in params.values()), mcfg, len(train_data), len(val)))
    report = partial(eval_report, params, mcfg, val, max_tokens=tcfg.eval_tokens, decode=tok.decode)
    evaluate_now = partial(print_evals, report=report, context=mcfg.context)    # (step) -> its results
    save = partial(save_model, ckpt_path, params, mcfg, tcfg, opt_state=opt, tokenizer_info=tok_info,
                   data_dir=data_dir)                                           # (step): the checkpoint
    one_step = partial(train_step, params, opt, mcfg, tcfg, train_data)         # (step) -> (loss, stats)
    run_steps(one_step, step, tcfg, tcfg.batch_size * mcfg.context, evaluate_now, save, ckpt_path)
    return params, mcfg, tok

# ----------------------------------------------------------------------------- main


def build_parser():
    """--help lists every field of the configs, explained by its comment above; see spikelib.cli."""
    return stage_parser(__doc__, PRESETS, SampleConfig, ModelConfig, TrainConfig)


def run_configs(args, out_dir="out/numpy"):
    """(ModelConfig, TrainConfig, checkpoint path) from the options and checkpoint (spikelib.stage_run)."""
    return resolve_configs(args, out_dir, PRESETS, ModelConfig, TrainConfig, param_shapes)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        sc = config_from_args(SampleConfig, args)
        mcfg, tcfg, ckpt = run_configs(args)
        if plot_only(args, ckpt):
            plot_checkpoint(ckpt)
            return 0
        if args.generate is not None:
            params, mcfg, _, _, _, config = load_model(ckpt)
            stream_sample(load_tokenizer(config, ckpt), args.generate, sc, partial(generate, params, mcfg))
            return 0
        data_dir = prepare_dataset(tcfg.source, tcfg.data_root)
        params, mcfg, tok = train(mcfg, tcfg, data_dir, ckpt, args.resume)
    except ERRORS as err:
        return fail(err)
    except KeyboardInterrupt:
        return 130
    x, prompt = summary_inputs(data_dir, mcfg.context, tok)
    energy = energy_report(params, mcfg, x)[0]
    print_summary(energy, lambda: stream_sample(tok, prompt, sc, partial(generate, params, mcfg)), sc, ckpt)
    if args.plot:
        plot_checkpoint(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
