"""Stage 0: spiking neurons, surrogate gradients, spike encodings and spike-driven attention in NumPy.

Everything a spiking transformer is made of, small enough to read in one sitting, with every
gradient written by hand (backpropagation through time over T spike timesteps) and checked
against finite differences:

  surrogates   the hard step H(u) forward, a smooth derivative S'(u) backward
  neurons      LIF, PLIF, ALIF, ternary LIF and a non-spiking LI readout, input (T, ...)
  encodings    rate, latency and direct coding of static data into spike trains (T, ...)
  attention    causal multi-head spike-driven self-attention, linear and Hadamard forms
  toy model    a one-block spiking transformer that learns a task only attention can solve:
               "an object is named somewhere in the sentence; at the end, say its colour"

    python 0_spike_transformer.py                  # train the toy model (~30 s on 2 CPU cores)
    python 0_spike_transformer.py --gradcheck      # hand gradients vs finite differences
    python 0_spike_transformer.py --plot           # also write a PNG raster and loss curve
    python 0_spike_transformer.py --neuron alif --attention hadamard --reset hard

Every config field is a command-line flag (`--help`).
"""
import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

if __name__ == "__main__":  # the matrices are tiny: one BLAS thread beats several waiting on each other
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from spikelib.cli import add_config_options, check_fields, fail, given_options  # noqa: E402

# ----------------------------------------------------------------------------- config

NEURONS = ("lif", "plif", "alif", "ternary")
SITES = ("sn1", "attn.sn_q", "attn.sn_k", "attn.sn_v", "attn.sn_o", "sn2", "mlp.sn_h")


@dataclass
class Config:
    # the task: one of n_objects is named at a random place; the answer is its colour
    n_objects: int = 16           # distinct objects that can be named
    n_colours: int = 4            # colours to choose from (the answer classes)
    n_fillers: int = 16           # distractor words
    seq_len: int = 12             # positions; the last one holds the question token

    # the model
    n_layer: int = 1              # transformer blocks
    n_head: int = 2               # attention heads (must divide d_model)
    d_model: int = 32             # width of the residual stream
    d_ff: int = 64                # hidden width of the MLP
    T: int = 4                    # spike timesteps
    neuron: str = "lif"           # lif | plif | alif | ternary
    surrogate: str = "arctan"     # arctan | sigmoid | fast_sigmoid | triangle
    alpha: float = 2.0            # surrogate sharpness (triangle: half-width 1/alpha)
    beta: float = 0.5             # membrane leak (PLIF: initial value)
    theta: float = 1.0            # threshold (PLIF: initial value)
    reset: str = "soft"           # soft (subtract theta) | hard (to zero)
    detach_reset: bool = False    # backward treats the spike in the reset term as a constant
    alif_rho: float = 0.9         # ALIF: decay of the threshold adaptation
    alif_kappa: float = 0.5       # ALIF: threshold increase per spike
    attention: str = "linear"     # linear | hadamard
    readout_beta: float = 0.8     # leak of the LI readout neurons

    # training
    steps: int = 300              # optimizer steps (Adam)
    batch_size: int = 64          # sequences per step
    lr: float = 1e-2              # Adam's first learning rate; it decays along a cosine to 0
    n_test: int = 1000            # fresh sequences for the test accuracy
    seed: int = 0                 # seeds the weights, the training batches and the test set

    # what to do
    gradcheck: bool = False       # print hand gradients vs finite differences and exit
    plot: bool = False            # write spike_raster.png and loss_curve.png (needs matplotlib)
    raster_neurons: int = 8       # query neurons shown in the spike raster

    def __post_init__(self):
        choices = {"neuron": NEURONS, "surrogate": tuple(SURROGATES), "reset": ("soft", "hard"),
                   "attention": ("linear", "hadamard")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        leak = "in (0, 1)" if self.neuron == "plif" else "in [0, 1] (1: no leak)"
        check_fields(self, {**FIELD_RULES, "beta": leak})
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")

    def neuron_spec(self):
        return Neuron(self.neuron, self.reset, self.detach_reset, self.surrogate, self.alpha,
                      self.alif_rho, self.alif_kappa)


# what each number may be, as --help would say it; beta's rule depends on the neuron (PLIF learns
# it through a logit, so it starts strictly inside (0, 1))
FIELD_RULES = {"n_objects": ">= 1", "n_colours": ">= 1", "n_fillers": ">= 1", "seq_len": ">= 2",
               "n_layer": ">= 1", "n_head": ">= 1", "d_model": ">= 1", "d_ff": ">= 1", "T": ">= 1",
               "alpha": "> 0", "theta": "> 0", "alif_rho": "in [0, 1]",
               "alif_kappa": ">= 0", "readout_beta": "in [0, 1]", "steps": ">= 1", "batch_size": ">= 1",
               "lr": "> 0", "n_test": ">= 1", "seed": ">= 0", "raster_neurons": ">= 1"}

PRESETS = {
    "default": {},
    "tiny": dict(n_objects=8, n_fillers=8, seq_len=8, steps=60, n_test=300),  # tests, seconds
}

# ----------------------------------------------------------------------------- surrogates
# A spike is the Heaviside step s = H(u) of u = v - threshold. Its derivative is zero almost
# everywhere, so the backward pass uses the derivative S'(u) of a smooth step S instead.
# Each function returns (S(u), S'(u)); alpha sets the sharpness.


def arctan(u, alpha):
    """S = atan(pi/2 * alpha * u) / pi + 1/2,   S' = (alpha/2) / (1 + (pi/2 * alpha * u)^2)."""
    z = np.pi / 2 * alpha * u
    return np.arctan(z) / np.pi + 0.5, (alpha / 2) / (1 + z * z)


def sigmoid(u, alpha):
    """S = sigmoid(alpha * u),   S' = alpha * S * (1 - S)."""
    s = 0.5 * (1 + np.tanh(0.5 * alpha * u))  # = 1 / (1 + exp(-alpha u)), without overflow
    return s, alpha * s * (1 - s)


def fast_sigmoid(u, alpha):
    """S = 1/2 + alpha*u / (2 (1 + alpha|u|)),   S' = alpha / (2 (1 + alpha|u|)^2)."""
    d = 1 + alpha * np.abs(u)
    return 0.5 + alpha * u / (2 * d), alpha / (2 * d * d)


def triangle(u, alpha):
    """Half-width g = 1/alpha.  S' = max(0, 1 - |u|/g) / g,  S = its integral:
    0 below -g, (u+g)^2 / (2g^2) on [-g, 0), 1 - (g-u)^2 / (2g^2) on [0, g), 1 above g."""
    g = 1.0 / alpha
    c = np.clip(u, -g, g)
    s = np.where(c < 0, (c + g) ** 2, 2 * g * g - (g - c) ** 2) / (2 * g * g)
    return s, np.maximum(0.0, 1 - np.abs(u) / g) / g


SURROGATES = {"arctan": arctan, "sigmoid": sigmoid, "fast_sigmoid": fast_sigmoid, "triangle": triangle}


def spike(u, surrogate, alpha, smooth=False):
    """Forward spike: the hard step H(u) (1 where the membrane reaches threshold), or S(u) in
    smooth mode, the gradient check's forward whose exact derivative is the surrogate."""
    if smooth:
        return SURROGATES[surrogate](u, alpha)[0]
    return (u >= 0).astype(u.dtype)


# ----------------------------------------------------------------------------- neurons


@dataclass
class Neuron:
    kind: str = "lif"             # lif | plif | alif | ternary (plif = lif with learned beta, theta)
    reset: str = "soft"
    detach: bool = False
    surrogate: str = "arctan"
    alpha: float = 2.0
    rho: float = 0.9              # ALIF adaptation decay
    kappa: float = 0.5            # ALIF threshold increase per spike


def neuron_forward(x, nrn, beta, theta, smooth=False, frozen=None):
    """Run a spiking neuron over T. x (T, ...) input current; beta, theta scalars or per channel
    (last axis). With p the membrane after reset (p_0 = 0):
        v_t = beta * p_{t-1} + x_t                              integrate with leak
        LIF/PLIF: s_t = H(v_t - theta)
        ALIF:     s_t = H(v_t - theta_t), theta_t = theta + a_t, a_t = rho a_{t-1} + kappa s_{t-1}
        ternary:  s_t = H(v_t - theta) - H(-v_t - theta)       in {-1, 0, +1}
        soft reset: p_t = v_t - theta_t s_t                     keeps the overshoot
        hard reset: p_t = v_t (1 - |s_t|)                       back to zero
    frozen = (S, F) from an earlier run puts those spikes s and |s| into the reset term as
    constants: the function whose gradient detach_reset computes (used by the gradient check).
    Returns spikes (T, ...) and the cache for neuron_backward."""
    shape = x.shape[1:]
    p, a, s = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    V, A, P_prev, S, F = (np.empty(x.shape) for _ in range(5))
    for t in range(x.shape[0]):
        if nrn.kind == "alif":
            a = nrn.rho * a + nrn.kappa * s
        th = theta + a
        P_prev[t], A[t] = p, a
        v = beta * p + x[t]
        if nrn.kind == "ternary":
            sp = spike(v - th, nrn.surrogate, nrn.alpha, smooth)
            sn = spike(-v - th, nrn.surrogate, nrn.alpha, smooth)
            s, fired = sp - sn, sp + sn
        else:
            s = fired = spike(v - th, nrn.surrogate, nrn.alpha, smooth)
        V[t], S[t], F[t] = v, s, fired
        rs, rf = (s, fired) if frozen is None else (frozen[0][t], frozen[1][t])
        p = v - th * rs if nrn.reset == "soft" else v * (1 - rf)
    return S, (nrn, beta, theta, smooth, V, A, P_prev, S, F)


def _sum_to(g, like):
    """Sum a gradient over the broadcast axes of a scalar or per-channel (C,) parameter."""
    return g.sum() if np.ndim(like) == 0 else g.reshape(-1, g.shape[-1]).sum(0)


def neuron_backward(gs, cache):
    """Backpropagation through time. gs (T, ...) = dL/ds. Returns (dL/dx, dL/dbeta, dL/dtheta).
    Walking t = T-1 .. 0 we carry gp = dL/dp_t (from v_{t+1} = beta p_t + x_{t+1}) and, for
    ALIF, ga = dL/da_{t+1}. The spike gets its gradient from outside, from the reset
    (unless detached) and from the next threshold; H' is replaced by the surrogate S'."""
    nrn, beta, theta, smooth, V, A, P_prev, S, _ = cache
    surr = SURROGATES[nrn.surrogate]
    gx, gbeta, gth_sum = np.empty(V.shape), np.zeros(V.shape[1:]), np.zeros(V.shape[1:])
    gp, ga = np.zeros(V.shape[1:]), np.zeros(V.shape[1:])
    soft, keep = nrn.reset == "soft", not nrn.detach
    for t in reversed(range(V.shape[0])):
        v, th = V[t], theta + A[t]
        g = gs[t] + nrn.kappa * ga if nrn.kind == "alif" else gs[t]
        if nrn.kind == "ternary":
            # s = sp - sn, soft: p = v - th (sp - sn), hard: p = v (1 - sp - sn)
            sp = spike(v - th, nrn.surrogate, nrn.alpha, smooth)
            sn = spike(-v - th, nrn.surrogate, nrn.alpha, smooth)
            dp, dn = surr(v - th, nrn.alpha)[1], surr(-v - th, nrn.alpha)[1]
            gsp = g + keep * (-th * gp if soft else -v * gp)
            gsn = -g + keep * (th * gp if soft else -v * gp)
            gv = (gp if soft else gp * (1 - sp - sn)) + gsp * dp - gsn * dn
            gth = -gsp * dp - gsn * dn - (S[t] * gp if soft else 0)
        else:
            # s = H(v - th), soft: p = v - th s, hard: p = v (1 - s)
            d = surr(v - th, nrn.alpha)[1]
            gst = g + keep * (-th * gp if soft else -v * gp)
            gv = (gp if soft else gp * (1 - S[t])) + gst * d
            gth = -gst * d - (S[t] * gp if soft else 0)
        gth_sum += gth
        if nrn.kind == "alif":
            ga = gth + nrn.rho * ga              # a_t feeds theta_t and a_{t+1} = rho a_t + ...
        gx[t] = gv
        gbeta += gv * P_prev[t]
        gp = gv * beta
    return gx, _sum_to(gbeta, beta), _sum_to(gth_sum, theta)


def li_forward(x, beta):
    """Leaky integrator (LI) readout, no spikes, no reset: m_t = beta m_{t-1} + x_t. (T, ...)"""
    m, out = np.zeros(x.shape[1:]), np.empty(x.shape)
    for t in range(x.shape[0]):
        m = beta * m + x[t]
        out[t] = m
    return out


def li_backward(gm, beta):
    """dL/dx_t = gm_t + beta dL/dx_{t+1}: the membrane trace carries gradient back in time."""
    gx, g = np.empty(gm.shape), np.zeros(gm.shape[1:])
    for t in reversed(range(gm.shape[0])):
        g = gm[t] + beta * g
        gx[t] = g
    return gx


def plif_beta(w):
    """PLIF decay beta_c = sigmoid(w_c), always in (0, 1); dbeta/dw = beta (1 - beta)."""
    return 1 / (1 + np.exp(-w))


# ----------------------------------------------------------------------------- encodings


def rate_encode(x, T, seed=0):
    """Rate coding: at each step fire with probability x in [0, 1] (Bernoulli, seeded). (T, ...)"""
    x = np.clip(np.asarray(x, dtype=np.float64), 0, 1)
    return (np.random.default_rng(seed).random((T,) + x.shape) < x).astype(np.float64)


def latency_encode(x, T):
    """Latency coding: one spike at t_f = round((1 - x)(T - 1)); stronger input fires earlier,
    x <= 0 never fires. (T, ...)"""
    x = np.clip(np.asarray(x, dtype=np.float64), 0, 1)
    t_fire = np.rint((1 - x) * (T - 1))
    out = (np.arange(T).reshape((T,) + (1,) * x.ndim) == t_fire).astype(np.float64)
    return out * (x > 0)


def direct_encode(x, T):
    """Direct coding: the same real value at every step; the first neuron layer makes spikes."""
    x = np.asarray(x, dtype=np.float64)
    return np.broadcast_to(x, (T,) + x.shape).copy()


class SpikeDataset:
    """Wrap any iterable of (x, y) so that it yields (spikes (T, ...), y)."""

    def __init__(self, pairs, T, encoding="rate", seed=0):
        if encoding not in ("rate", "latency", "direct"):
            raise ValueError(f"encoding={encoding!r}; choose rate, latency or direct")
        self.pairs, self.T, self.encoding, self.seed = pairs, T, encoding, seed

    def __iter__(self):
        for i, (x, y) in enumerate(self.pairs):
            if self.encoding == "rate":  # a different, reproducible draw for every sample
                yield rate_encode(x, self.T, seed=[self.seed, i]), y
            elif self.encoding == "latency":
                yield latency_encode(x, self.T), y
            else:
                yield direct_encode(x, self.T), y


# ----------------------------------------------------------------------------- spike-driven attention


def rmsnorm(x, eps=1e-5):
    """y = x / sqrt(mean(x^2) + eps) over the last axis. Returns y and r = 1/sqrt(...)."""
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r, r


def rmsnorm_backward(gy, y, r):
    """dL/dx = r (gy - y mean(gy y))."""
    return r * (gy - y * np.mean(gy * y, axis=-1, keepdims=True))


def split_heads(x, H):
    """(T, B, L, D) -> (T, B, H, L, dh)"""
    T, B, L, D = x.shape
    return x.reshape(T, B, L, H, D // H).transpose(0, 1, 3, 2, 4)


def merge_heads(x):
    """(T, B, H, L, dh) -> (T, B, L, D)"""
    T, B, H, L, dh = x.shape
    return x.transpose(0, 1, 3, 2, 4).reshape(T, B, L, H * dh)


def sdsa_forward(q, k, v, n_head, form, nrn, beta, theta, smooth=False):
    """Causal spike-driven self-attention on spikes q, k, v (T, B, L, D), each head of dh channels:
        linear:   y_l = sum_{j<=l} (q_l . k_j) v_j  = ((Q K^T) * M) V,  M the causal mask
                  = q_l S_l with the running state S_l = sum_{j<=l} k_j^T v_j     (dh x dh)
        hadamard: y_l = sum_{j<=l} k_j * v_j                 a per-channel running count
    No softmax: with binary q, k, v every product is an AND and every sum an accumulate.
    y is normalised per head (RMS over dh) and turned back into spikes z = SN(n); the output is
    z (linear) or the mask q * z (hadamard). Returns out (T, B, L, D) and the cache."""
    qh, kh, vh = (split_heads(a, n_head) for a in (q, k, v))      # (T, B, H, L, dh)
    if form == "linear":
        L = q.shape[2]
        A = (qh @ kh.swapaxes(-1, -2)) * np.tril(np.ones((L, L)))  # (T, B, H, L, L)
        y = A @ vh
    else:
        A = None
        y = np.cumsum(kh * vh, axis=-2)
    n, r = rmsnorm(y)
    z, cz = neuron_forward(merge_heads(n), nrn, beta, theta, smooth)
    out = z if form == "linear" else q * z
    return out, (form, n_head, q, qh, kh, vh, A, n, r, z, cz)


def sdsa_backward(gout, cache):
    """Returns dL/dq, dL/dk, dL/dv and the grads of SN_o's beta and theta."""
    form, n_head, q, qh, kh, vh, A, n, r, z, cz = cache
    gz = gout if form == "linear" else gout * q
    gn, gbeta, gtheta = neuron_backward(gz, cz)
    gy = rmsnorm_backward(split_heads(gn, n_head), n, r)          # (T, B, H, L, dh)
    if form == "linear":
        L = q.shape[2]
        gA = (gy @ vh.swapaxes(-1, -2)) * np.tril(np.ones((L, L)))
        gq, gk, gv = gA @ kh, gA.swapaxes(-1, -2) @ qh, A.swapaxes(-1, -2) @ gy
        gq = merge_heads(gq)
    else:
        gkv = np.cumsum(gy[..., ::-1, :], axis=-2)[..., ::-1, :]  # reverse cumsum over positions
        gk, gv = gkv * vh, gkv * kh
        gq = gout * z
    return gq, merge_heads(gk), merge_heads(gv), gbeta, gtheta


# ----------------------------------------------------------------------------- the toy task


def make_task(cfg, n, rng):
    """Token ids: objects 0..N-1, fillers N..N+F-1, question mark N+F. One object sits at a
    random position among the first seq_len-1, the rest are random fillers, the last token asks
    "colour?". The target is that object's colour, colour(o) = o mod n_colours. The question
    position sees no object itself and neurons carry no state across positions, so attention
    is the only way the answer can get there."""
    N, F, L = cfg.n_objects, cfg.n_fillers, cfg.seq_len
    idx = rng.integers(N, N + F, size=(n, L))
    obj = rng.integers(0, N, size=n)
    idx[np.arange(n), rng.integers(0, L - 1, size=n)] = obj
    idx[:, -1] = N + F
    return idx, obj % cfg.n_colours


# ----------------------------------------------------------------------------- the toy model


def init_params(cfg, seed=0):
    """Weights stored (in, out). Spike inputs have rate ~0.2-0.5, so linear layers fed by spikes
    start with std 1/sqrt(0.25 fan_in) to give their neurons unit-scale drive."""
    rng = np.random.default_rng(seed)
    D, F, V, C = cfg.d_model, cfg.d_ff, cfg.n_objects + cfg.n_fillers + 1, cfg.n_colours
    g = lambda *shape: rng.standard_normal(shape) / np.sqrt(0.25 * shape[0])  # noqa: E731
    p = {"embed.weight": rng.standard_normal((V, D)), "head.weight": g(D, C) / 2}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        p.update({b + "attn.wq": g(D, D), b + "attn.wk": g(D, D), b + "attn.wv": g(D, D),
                  b + "attn.wo": g(D, D) * 0.1, b + "mlp.w1": g(D, F), b + "mlp.w2": g(F, D) * 0.1})
        if cfg.neuron == "plif":
            for site in SITES:
                c = F if site == "mlp.sn_h" else D
                p[b + site + ".w"] = np.full(c, np.log(cfg.beta / (1 - cfg.beta)))
                p[b + site + ".theta"] = np.full(c, cfg.theta)
    return p


def site_params(params, cfg, name):
    """(beta, theta) of one neuron site: learned per channel for PLIF, else the config scalars."""
    if cfg.neuron == "plif":
        return plif_beta(params[name + ".w"]), params[name + ".theta"]
    return cfg.beta, cfg.theta


def sn_forward(params, cfg, name, x, smooth, stats):
    beta, theta = site_params(params, cfg, name)
    s, cache = neuron_forward(x, cfg.neuron_spec(), beta, theta, smooth)
    stats[name] = float(np.abs(s).mean())
    return s, cache


def add_site_grads(grads, cfg, name, params, gbeta, gtheta):
    """PLIF: chain dL/dbeta through beta = sigmoid(w)."""
    if cfg.neuron == "plif":
        beta = plif_beta(params[name + ".w"])
        grads[name + ".w"] = gbeta * beta * (1 - beta)
        grads[name + ".theta"] = gtheta


def block_forward(params, cfg, i, h, smooth, stats):
    """One block on the real residual stream h (T, B, L, D); every matmul eats spikes:
        s = SN(rmsnorm(h)); q, k, v = SN(s Wq), SN(s Wk), SN(s Wv); h += SDSA(q, k, v) Wo
        s2 = SN(rmsnorm(h)); h += SN(s2 W1) W2"""
    b, nrn = f"blocks.{i}.", cfg.neuron_spec()
    n1, r1 = rmsnorm(h)
    s, c1 = sn_forward(params, cfg, b + "sn1", n1, smooth, stats)
    q, cq = sn_forward(params, cfg, b + "attn.sn_q", s @ params[b + "attn.wq"], smooth, stats)
    k, ck = sn_forward(params, cfg, b + "attn.sn_k", s @ params[b + "attn.wk"], smooth, stats)
    v, cv = sn_forward(params, cfg, b + "attn.sn_v", s @ params[b + "attn.wv"], smooth, stats)
    beta_o, theta_o = site_params(params, cfg, b + "attn.sn_o")
    o, ca = sdsa_forward(q, k, v, cfg.n_head, cfg.attention, nrn, beta_o, theta_o, smooth)
    stats[b + "attn.sn_o"] = float(np.abs(ca[9]).mean())      # ca[9] = z, the SN_o spikes
    stats[b + "attn.out"] = float(np.abs(o).mean())
    h = h + o @ params[b + "attn.wo"]
    n2, r2 = rmsnorm(h)
    s2, c2 = sn_forward(params, cfg, b + "sn2", n2, smooth, stats)
    u, ch = sn_forward(params, cfg, b + "mlp.sn_h", s2 @ params[b + "mlp.w1"], smooth, stats)
    h = h + u @ params[b + "mlp.w2"]
    return h, (n1, r1, s, c1, q, cq, k, ck, v, cv, o, ca, n2, r2, s2, c2, u, ch)


def block_backward(params, cfg, i, gh, cache, grads):
    b = f"blocks.{i}."
    n1, r1, s, c1, q, cq, k, ck, v, cv, o, ca, n2, r2, s2, c2, u, ch = cache
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731  (T, B, L, C) -> (TBL, C)
    # MLP: h_out = h_mid + u W2, u = SN(s2 W1), s2 = SN(rmsnorm(h_mid))
    grads[b + "mlp.w2"] = flat(u).T @ flat(gh)
    gu, gbh, gth = neuron_backward(gh @ params[b + "mlp.w2"].T, ch)
    add_site_grads(grads, cfg, b + "mlp.sn_h", params, gbh, gth)
    grads[b + "mlp.w1"] = flat(s2).T @ flat(gu)
    gs2, gb2, gt2 = neuron_backward(gu @ params[b + "mlp.w1"].T, c2)
    add_site_grads(grads, cfg, b + "sn2", params, gb2, gt2)
    gh = gh + rmsnorm_backward(gs2, n2, r2)
    # attention: h_mid = h_in + SDSA(q, k, v) Wo
    grads[b + "attn.wo"] = flat(o).T @ flat(gh)
    gq, gk, gv, gbo, gto = sdsa_backward(gh @ params[b + "attn.wo"].T, ca)
    add_site_grads(grads, cfg, b + "attn.sn_o", params, gbo, gto)
    gs = np.zeros(s.shape)
    for name, g, c in (("q", gq, cq), ("k", gk, ck), ("v", gv, cv)):
        gx, gb_, gt_ = neuron_backward(g, c)
        add_site_grads(grads, cfg, b + "attn.sn_" + name, params, gb_, gt_)
        grads[b + "attn.w" + name] = flat(s).T @ flat(gx)
        gs += gx @ params[b + "attn.w" + name].T
    gn1, gb1, gt1 = neuron_backward(gs, c1)
    add_site_grads(grads, cfg, b + "sn1", params, gb1, gt1)
    return gh + rmsnorm_backward(gn1, n1, r1)


def forward(params, cfg, idx, smooth=False):
    """idx (B, L) token ids -> logits (B, C) for the question (last) position.
    The embedding is copied to every timestep; the readout is an LI neuron per class, fed by
    the normalised residual stream at the last position, averaged over T."""
    stats = {}
    x = params["embed.weight"][idx]                                # (B, L, D)
    h = np.broadcast_to(x, (cfg.T,) + x.shape)                     # (T, B, L, D)
    caches = []
    for i in range(cfg.n_layer):
        h, c = block_forward(params, cfg, i, h, smooth, stats)
        caches.append(c)
    hn, rn = rmsnorm(h[:, :, -1])                                  # (T, B, D)
    m = li_forward(hn @ params["head.weight"], cfg.readout_beta)   # (T, B, C)
    return m.mean(0), (idx, h.shape, caches, hn, rn, stats)


def cross_entropy(logits, y):
    """Mean cross-entropy and dL/dlogits = (softmax - onehot) / B."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y] + 1e-300).mean()
    p[np.arange(n), y] -= 1
    return loss, p / n


def backward(params, cfg, glogits, cache):
    idx, hshape, caches, hn, rn, _ = cache
    grads = {}
    gm = np.broadcast_to(glogits / cfg.T, (cfg.T,) + glogits.shape)   # mean over T
    gz = li_backward(gm, cfg.readout_beta)                             # (T, B, C)
    grads["head.weight"] = np.einsum("tbd,tbc->dc", hn, gz)
    gh = np.zeros(hshape)
    gh[:, :, -1] = rmsnorm_backward(gz @ params["head.weight"].T, hn, rn)
    for i in reversed(range(cfg.n_layer)):
        gh = block_backward(params, cfg, i, gh, caches[i], grads)
    gx = gh.sum(0)                                                     # (B, L, D)
    grads["embed.weight"] = np.zeros(params["embed.weight"].shape)
    np.add.at(grads["embed.weight"], idx, gx)
    return grads


def loss_and_grads(params, cfg, idx, y, smooth=False):
    logits, cache = forward(params, cfg, idx, smooth)
    loss, glogits = cross_entropy(logits, y)
    return loss, backward(params, cfg, glogits, cache), logits, cache[-1]


# ----------------------------------------------------------------------------- operations and energy

E_AC, E_MAC = 0.9, 4.6   # pJ per accumulate / multiply-accumulate, 45 nm CMOS (Horowitz 2014)


def op_counts(cfg, stats):
    """Operations per sequence. A linear layer fed by spikes at rate r costs r * in * out * T
    accumulates per position (only active inputs add a weight row); in the ANN twin (relu, one
    timestep) the same layer costs in * out multiply-accumulates. Attention on spikes is counted
    in its recurrent form per position and head: linear adds a v row into the dh x dh state per
    k spike and reads a state row per q spike; hadamard adds v where k spikes and gates by q
    (counted as one accumulate per q spike, to be conservative). The readout head
    is fed real values: MACs in both (T times in the spiking net). Norms and neuron updates are
    O(D) per position in both networks and are left out."""
    D, F, L, T, C = cfg.d_model, cfg.d_ff, cfg.seq_len, cfg.T, cfg.n_colours
    dh = D // cfg.n_head
    ac = mac = ann = 0.0
    for i in range(cfg.n_layer):
        r = {k.split(".", 2)[2]: val for k, val in stats.items() if k.startswith(f"blocks.{i}.")}
        ac += L * T * (3 * r["sn1"] * D * D + r["attn.out"] * D * D
                       + r["sn2"] * D * F + r["mlp.sn_h"] * F * D)
        ann += L * (4 * D * D + 2 * D * F)
        if cfg.attention == "linear":
            ac += L * T * (r["attn.sn_k"] + r["attn.sn_q"]) * D * dh
            ann += L * 2 * D * dh
        else:
            ac += L * T * (r["attn.sn_k"] + r["attn.sn_q"]) * D
            ann += L * 2 * D
    mac = T * D * C
    ann += D * C
    return ac, mac, ann


def energy_report(cfg, stats):
    ac, mac, ann = op_counts(cfg, stats)
    e_snn, e_ann = (ac * E_AC + mac * E_MAC) / 1e3, ann * E_MAC / 1e3  # nJ
    return (f"energy per sequence (45 nm: AC {E_AC} pJ, MAC {E_MAC} pJ)\n"
            f"  spiking  {ac:10.0f} AC + {mac:6.0f} MAC = {e_snn:8.2f} nJ\n"
            f"  ANN twin {ann:10.0f} MAC            = {e_ann:8.2f} nJ   "
            f"(spiking uses {e_snn / e_ann:.2f}x the energy of the ANN twin)\n"
            f"  counting: a spike-fed layer costs rate x in x out x T accumulates per position,\n"
            f"  the ANN twin in x out MACs; attention in its recurrent form; readout in MACs.")


# ----------------------------------------------------------------------------- training


def evaluate(params, cfg, idx, y, batch=500):
    """Accuracy with hard spikes, and the spike rates of the last batch."""
    correct, stats = 0, {}
    for a in range(0, len(y), batch):
        logits, cache = forward(params, cfg, idx[a:a + batch])
        correct += int((logits.argmax(-1) == y[a:a + batch]).sum())
        stats = cache[-1]
    return correct / len(y), stats


def train(cfg, params=None, progress=True):
    """Adam with a cosine learning-rate decay; batches drawn from rng([seed, step]).
    Returns params, the loss history and the test set."""
    params = init_params(cfg, cfg.seed) if params is None else params
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    b1, b2, eps = 0.9, 0.99, 1e-8
    losses = []
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, ncols=100)
    for step in bar:
        idx, y = make_task(cfg, cfg.batch_size, np.random.default_rng([cfg.seed, step]))
        loss, grads, logits, _ = loss_and_grads(params, cfg, idx, y)
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            mhat, vhat = m[k] / (1 - b1 ** (step + 1)), v[k] / (1 - b2 ** (step + 1))
            params[k] -= lr * mhat / (np.sqrt(vhat) + eps)
        losses.append(loss)
        if step % 10 == 0:
            acc = float((logits.argmax(-1) == y).mean())
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", acc=f"{acc:.2f}")
    return params, losses


# ----------------------------------------------------------------------------- gradient check


def numerical_grad(f, x, eps=1e-5):
    """Central differences (f(x + eps) - f(x - eps)) / 2eps, element by element, in place."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


def rel_error(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-300))


def gradcheck(cfg):
    """Hand backward vs finite differences of the smooth forward (spikes = S(u)), float64.
    Loss = sum(out * R) with a fixed random R, so dL/dout = R."""
    rng = np.random.default_rng(0)
    rows = []
    x = rng.normal(0.8, 1.0, (5, 3, 4))
    R = rng.standard_normal(x.shape)
    for kind in NEURONS:
        for reset in ("soft", "hard"):
            for detach in (False, True):
                for surr in SURROGATES:
                    nrn = Neuron(kind, reset, detach, surr, 2.0, 0.9, 0.5)
                    beta, theta = np.array([0.3, 0.5, 0.7, 0.9]), np.array([0.6, 0.8, 1.0, 1.2])
                    cache = neuron_forward(x, nrn, beta, theta, True)[1]
                    frozen = cache[7:] if detach else None
                    f = lambda: float((neuron_forward(x, nrn, beta, theta, True, frozen)[0] * R).sum())  # noqa: E731
                    gx, gb, gt = neuron_backward(R, cache)
                    err = max(rel_error(gx, numerical_grad(f, x)), rel_error(gb, numerical_grad(f, beta)),
                              rel_error(gt, numerical_grad(f, theta)))
                    rows.append((f"{kind:7s} {reset:4s} detach={int(detach)} {surr}", err))
    rows.append(("LI readout", rel_error(li_backward(R, 0.7), numerical_grad(
        lambda: float((li_forward(x, 0.7) * R).sum()), x))))
    for form in ("linear", "hadamard"):
        q, k, v = (rng.uniform(0, 1, (2, 2, 5, 4)) for _ in range(3))
        Ro = rng.standard_normal(q.shape)
        nrn = Neuron("lif", "soft", False, "sigmoid", 2.0)
        f = lambda: float((sdsa_forward(q, k, v, 2, form, nrn, 0.5, 0.4, True)[0] * Ro).sum())  # noqa: E731
        gq, gk, gv, _, _ = sdsa_backward(Ro, sdsa_forward(q, k, v, 2, form, nrn, 0.5, 0.4, True)[1])
        err = max(rel_error(g, numerical_grad(f, a)) for g, a in ((gq, q), (gk, k), (gv, v)))
        rows.append((f"SDSA {form}", err))
    for neuron, attention in (("lif", "linear"), ("plif", "hadamard"), ("alif", "linear"),
                              ("ternary", "hadamard")):
        small = Config(**{**asdict(cfg), "d_model": 8, "d_ff": 8, "n_head": 2, "seq_len": 4,
                          "neuron": neuron, "attention": attention, "theta": 0.5})
        params = init_params(small, 1)
        idx, y = make_task(small, 3, rng)
        _, grads, _, _ = loss_and_grads(params, small, idx, y, smooth=True)
        f = lambda: float(loss_and_grads(params, small, idx, y, smooth=True)[0])  # noqa: E731
        err = max(rel_error(grads[k], numerical_grad(f, params[k])) for k in params)
        rows.append((f"toy model {neuron} {attention}", err))
    return rows


# ----------------------------------------------------------------------------- raster and plots


def ascii_raster(spikes, title):
    """spikes (T, L, N) of one sequence: a row per neuron, a |...| group of T steps per position.
    '#' = spike, '-' = negative spike (ternary), '.' = silent."""
    T, L, N = spikes.shape
    lines = [title, "neuron   " + "".join(f"p{p}".ljust(T + 2) for p in range(L))]
    for n in range(N):
        cells = ["".join("#" if s > 0 else "-" if s < 0 else "." for s in spikes[:, p, n]) for p in range(L)]
        lines.append(f"{n:6d}  " + " ".join(f"|{c}" for c in cells) + "|")
    return "\n".join(lines)


def write_plots(spikes, losses):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[plots]')")
        return
    T, L, N = spikes.shape
    fig, ax = plt.subplots(figsize=(8, 3))
    per_position = spikes.transpose(1, 0, 2).reshape(L * T, N)     # columns: position, then step
    ax.imshow(per_position.T, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_title("query spikes of block 0, first test sequence")
    ax.set_xlabel(f"position x timestep (T={T} per position)")
    ax.set_ylabel("neuron")
    fig.savefig("spike_raster.png", dpi=120, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    fig.savefig("loss_curve.png", dpi=120, bbox_inches="tight")
    print("wrote spike_raster.png and loss_curve.png")


# ----------------------------------------------------------------------------- main


def parse_config(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS),
                    help="named settings (tiny: a smaller task for tests); the options below change "
                         "single fields of it")
    add_config_options(ap, Config, "settings (Config)", {k: {"config": v} for k, v in PRESETS.items()},
                       "config")
    args = ap.parse_args(argv)
    return Config(**{**PRESETS[args.preset], **given_options(args, Config)})    # a bad value: ValueError


def main(argv=None):
    try:
        cfg = parse_config(argv)
    except ValueError as err:
        return fail(err)
    if cfg.gradcheck:
        print("hand backward vs central finite differences of the smooth forward (float64)")
        rows = gradcheck(cfg)
        for name, err in rows:
            print(f"  {name:42s} rel. error {err:.1e}  {'ok' if err < 1e-6 else 'FAIL'}")
        print("all ok" if all(e < 1e-6 for _, e in rows) else "SOME CHECKS FAILED")
        return 0
    print(f"task: name one of {cfg.n_objects} objects among {cfg.seq_len - 1} words, "
          f"then ask its colour ({cfg.n_colours} colours, chance {1 / cfg.n_colours:.0%})")
    print(f"model: {cfg.n_layer} block, d_model {cfg.d_model}, {cfg.n_head} heads, T {cfg.T}, "
          f"{cfg.neuron} neurons, {cfg.surrogate} surrogate, {cfg.attention} attention")
    t0 = time.time()
    params, losses = train(cfg)
    test_idx, test_y = make_task(cfg, cfg.n_test, np.random.default_rng([cfg.seed, 10**9]))
    acc, stats = evaluate(params, cfg, test_idx, test_y)
    print(f"trained {cfg.steps} steps in {time.time() - t0:.1f} s; final loss "
          f"{np.mean(losses[-20:]):.4f}; test accuracy {acc:.1%} (hard spikes)")
    print("spike rates (fraction of neurons x timesteps firing):")
    for name in sorted(stats):
        print(f"  {name:24s} {stats[name]:.3f}")
    print(energy_report(cfg, stats))
    _, cache = forward(params, cfg, test_idx[:1])
    q = cache[2][0][4][:, 0, :, :cfg.raster_neurons]     # attn.sn_q spikes of sequence 0: (T, L, N)
    print(ascii_raster(q, f"query spikes of block 0, first test sequence {test_idx[0].tolist()}"))
    if cfg.plot:
        write_plots(q, losses)


if __name__ == "__main__":
    sys.exit(main())
