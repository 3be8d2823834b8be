"""Stage 0b: neuron families, spiking as a configurable part of a layer, in NumPy.

Read after stage 0, whose neurons (LIF, PLIF, ALIF, ternary, LI) are fixed kinds with hard spikes.
Here a layer is composed from parts, each updated one timestep at a time:

  prefixes   traces added in front of the membrane, composed freely (any subset of D, S, R):
               S  synaptic trace    syn = a syn + (1 - a) x                  mem = b mem + syn
               R  recurrent trace   rec = g rec + (1 - g) out_prev           mem = b mem + x + w_rec rec
               D  dual traces       every trace splits into a positive and a negative part, fed the
                                    positive / negative part of its input, each with its own decay;
                                    the trace is their sum (LIB never emits a negative
                                    output, so its negative recurrent trace stays 0)
  membrane   mem = b mem + drive;  ema=True: mem = b mem + (1 - b) drive (bounded by the drive)
  family     what leaves the layer:
               LI    out = mem, no spikes (with ema=True this is LIEMA)
               LIB   one threshold th: out = q(f(mem - th)) >= 0, reset mem -= out th
               LIT   two thresholds: out = q(f(mem - th+)) - q(f(-mem - th-)) in {-1, 0, +1}
               LITS  LIT with output scales: out = s+ q(f(mem - th+)) - s- q(f(-mem - th-))
  firing     f = spike_fn: distance to threshold -> firing probability p, sigmoid4x(u) = sigmoid(4u)
             q = quant_fn: identity (p leaves: smooth) or a discrete forward with a straight-through
             backward: round_ste, stochastic_round_ste, probabilistic_ste

Four output families (LI, LIB, LIT, LITS; LIEMA is LI's ema option) times eight prefix sets
(none, D, S, R, DS, DR, SR, DSR) give the 32 layers, all from one forward and one backward.
Decays are sigmoids of raw values, thresholds softplus: they stay in (0, 1) and positive while
learning. Every parameter is a scalar, per neuron or a given array, learnable or fixed.

    python 0b_neuron_families.py --family lit --prefix DS     # train one layer on the timing task
    python 0b_neuron_families.py --gradcheck                  # 32 layers vs finite differences
    python 0b_neuron_families.py --table                      # all 32 layers on the task (~12 min)

Every config field is a command-line flag (`--help`).
"""
import argparse
import inspect
import os
import re
import time
from dataclasses import dataclass, fields, replace

if __name__ == "__main__":  # small matrices: one BLAS thread beats several waiting on each other
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from spikelib.cli import check_fields  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

# ----------------------------------------------------------------------------- config

FAMILIES = ("LI", "LIB", "LIT", "LITS")
PREFIXES = ("", "D", "S", "R", "DS", "DR", "SR", "DSR")
TASKS = ("interval", "recall")


@dataclass
class Config:
    # the layer
    family: str = "lib"              # output family: li | lib | lit | lits (LIEMA = li with --ema)
    prefix: str = "S"                # traces in front of the membrane: any of D, S, R, or none
    ema: bool = False                # membrane update mem = b mem + (1 - b) drive (LIEMA for li)
    spike_fn: str = "sigmoid4x"      # distance to threshold -> probability: sigmoid4x | fast_sigmoid
    spike_bias: float = 0.0          # added to the distance to threshold before spike_fn
    quant: str = "round_ste"         # identity | round_ste | stochastic_round_ste | probabilistic_ste
    rank: int = 1                    # 0: one value per parameter, 1: one per neuron
    learn: bool = True               # decays, thresholds, scales and w_rec are trained
    hidden: int = 32                 # neurons in the layer
    readout_beta: float = 0.8        # decay of the LI readout (fixed); logits = its last membrane
    # the task
    task: str = "interval"           # interval: order and gap of two pulses | recall: delayed cue
    T: int = 30                      # timesteps per sequence; the answer is read at the last one
    noise: float = 0.1               # std of the Gaussian noise on every input channel
    # training
    steps: int = 600                 # Adam steps
    batch_size: int = 64             # sequences per step
    lr: float = 0.02                 # Adam learning rate (cosine decay to zero)
    n_test: int = 1000               # test sequences
    seed: int = 0                    # seeds the task, the initial weights and the quantizer noise
    # what to do
    gradcheck: bool = False          # hand gradients of all 32 layers vs finite differences, then exit
    table: bool = False              # train every family x prefix and print a table, then exit

    def __post_init__(self):
        self.family, self.prefix = self.family.upper(), canonical_prefix(self.prefix)
        choices = {"family": FAMILIES, "spike_fn": tuple(SPIKE_FNS), "quant": tuple(QUANT_FNS),
                   "task": TASKS, "rank": (0, 1)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
        check_fields(self, {"T": ">= 20 (the tasks need at least 20 timesteps)", "hidden": ">= 1",
                            "steps": ">= 1", "batch_size": ">= 1", "n_test": ">= 1", "noise": ">= 0",
                            "readout_beta": "in [0, 1]", "lr": "> 0", "seed": ">= 0"})
        if not np.isfinite(self.spike_bias):
            raise ValueError(f"--spike_bias must be a finite number, got {self.spike_bias}")


def canonical_prefix(prefix):
    """'none', '', 'sd', 'RSD' ... -> the letters in the order D, S, R ('' for none)."""
    letters = "" if prefix.lower() == "none" else prefix.upper()
    if set(letters) - set("DSR") or len(set(letters)) != len(letters):
        raise ValueError(f"prefix={prefix!r}: use each of the letters D, S, R at most once, or none")
    return "".join(c for c in "DSR" if c in letters)


# ----------------------------------------------------------------------------- spike functions
# spike_fn maps the distance to threshold u to a firing probability p and returns (p, dp/du).


def sigmoid4x(u):
    """p = sigmoid(4u) = (1 + tanh(2u)) / 2 (no overflow),   dp/du = 4 p (1 - p)."""
    p = 0.5 * (1 + np.tanh(2 * u))
    return p, 4 * p * (1 - p)


def fast_sigmoid(u):
    """p = 1/2 + u / (1 + 2|u|): sigmoid4x's slope 1 at u = 0, heavier tails (no exp);
    dp/du = 1 / (1 + 2|u|)^2."""
    d = 1 + 2 * np.abs(u)
    return 0.5 + u / d, 1 / (d * d)


SPIKE_FNS = {"sigmoid4x": sigmoid4x, "fast_sigmoid": fast_sigmoid}

# ----------------------------------------------------------------------------- quantizers
# quant_fn decides what leaves the layer from p in [0, 1] and uniform noise n in [0, 1).
# The backward of every quantizer is d out / d p = 1: exact for identity, and the straight-through
# rule for the three discrete ones (the step they take has derivative zero almost everywhere).
# The noise is drawn once per forward from an rng, so a forward is reproducible and the gradient
# check can hold the noise fixed.


def identity(p, n):
    """out = p: a smooth output (a rate, not a spike)."""
    return p


def round_ste(p, n):
    """out = 1 if p >= 1/2 else 0: with sigmoid4x, a spike exactly when mem reaches threshold."""
    return np.floor(p + 0.5)


def stochastic_round_ste(p, n):
    """out = floor(p + n): rounds up with probability equal to the fractional part of p."""
    return np.floor(p + n)


def probabilistic_ste(p, n):
    """out = 1 if n < p: a Bernoulli(p) spike. For p in [0, 1] it has stochastic rounding's law;
    the two differ only in which draws fire."""
    return (n < p).astype(p.dtype)


QUANT_FNS = {"identity": identity, "round_ste": round_ste,
             "stochastic_round_ste": stochastic_round_ste, "probabilistic_ste": probabilistic_ste}
NOISY = ("stochastic_round_ste", "probabilistic_ste")

# ----------------------------------------------------------------------------- parameters
# A layer stores an unconstrained raw value per parameter and uses value = c(raw):
#   decay      b = EPS + (1 - 2 EPS) sigmoid(raw)   stays in (0, 1) even in float64 at |raw| = 1e3
#   positive   th = EPS + softplus(raw)              thresholds stay > 0
#   real       w = raw                              w_rec and the LITS output scales
# Gradients are returned for the raw values: dL/draw = dL/dvalue * c'(raw).

EPS = 1e-6
DEFAULTS = {"beta": 0.9, "alpha": 0.5, "gamma": 0.5, "w_rec": 0.1, "theta": 1.0, "scale": 1.0}


def kind_of(name):
    return {"beta": "decay", "alpha": "decay", "gamma": "decay", "theta": "positive"}.get(
        name.split("_")[0], "real")


def constrain(kind, raw):
    """value = c(raw) and c'(raw)."""
    if kind == "decay":
        s = 0.5 * (1 + np.tanh(0.5 * raw))
        return EPS + (1 - 2 * EPS) * s, (1 - 2 * EPS) * s * (1 - s)
    if kind == "positive":
        return EPS + np.logaddexp(0.0, raw), 0.5 * (1 + np.tanh(0.5 * raw))
    return raw, np.ones_like(raw)


def unconstrain(name, value):
    """raw = c^-1(value), with a clear error for a value c cannot reach."""
    kind, v = kind_of(name), np.asarray(value, dtype=np.float64)
    if kind == "decay":
        if not np.all((v > EPS) & (v < 1 - EPS)):
            raise ValueError(f"{name}={value}: a decay must lie in (0, 1), strictly inside "
                             f"[{EPS:g}, 1 - {EPS:g}]")
        s = (v - EPS) / (1 - 2 * EPS)
        return np.log(s) - np.log1p(-s)
    if kind == "positive":
        if not np.all(v > EPS):
            raise ValueError(f"{name}={value}: a threshold must be positive (> {EPS:g})")
        return (v - EPS) + np.log(-np.expm1(-(v - EPS)))      # softplus^-1, stable for small v
    return v.copy()


def param_names(family, prefix):
    """The parameters of a layer; D gives every decay a _pos and a _neg version."""
    traces = ["beta"] + ["alpha"] * ("S" in prefix) + ["gamma"] * ("R" in prefix)
    names = [f"{t}_{s}" for t in traces for s in ("pos", "neg")] if "D" in prefix else traces
    names += ["w_rec"] * ("R" in prefix)
    names += {"LI": [], "LIB": ["theta"], "LIT": ["theta_pos", "theta_neg"],
              "LITS": ["theta_pos", "theta_neg", "scale_pos", "scale_neg"]}[family]
    return names


@dataclass
class Layer:
    family: str                      # LI | LIB | LIT | LITS
    prefix: str                      # canonical prefix letters, '' for none
    num_neurons: int
    raw: dict                        # name -> raw value, () or (num_neurons,)
    learn: frozenset                 # names of the learnable parameters
    ema: bool = False
    spike_fn: str = "sigmoid4x"
    spike_bias: float = 0.0
    quant_fn: str = "identity"
    dim: int = -1                    # axis of the input that holds the neurons (axis 0 is time)


def make_layer(family, prefix="", num_neurons=1, init=None, rank=1, learn=True, ema=False,
               spike_fn="sigmoid4x", spike_bias=0.0, quant_fn="identity", dim=-1):
    """Build a layer. init: name -> float (filled to the parameter's rank) or array (a given
    tensor, its own rank); names default to DEFAULTS by their stem (theta_pos <- theta).
    rank: 0 or 1 for every parameter, or a dict name -> rank. learn: True/False for every
    parameter, or the collection of names that learn."""
    family, prefix = str(family).upper(), canonical_prefix(prefix)
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; choose one of {FAMILIES}")
    if isinstance(num_neurons, bool) or not isinstance(num_neurons, (int, np.integer)) or num_neurons < 1:
        raise ValueError(f"num_neurons={num_neurons!r} must be a positive integer")
    if spike_fn not in SPIKE_FNS or quant_fn not in QUANT_FNS:
        raise ValueError(f"spike_fn={spike_fn!r}, quant_fn={quant_fn!r}; choose from "
                         f"{tuple(SPIKE_FNS)} and {tuple(QUANT_FNS)}")
    if not isinstance(dim, (int, np.integer)) or dim == 0:
        raise ValueError(f"dim={dim!r}: axis 0 is time; the neurons sit on another axis")
    names, init = param_names(family, prefix), dict(init or {})
    unknown = set(init) - set(names) | (set(rank) - set(names) if isinstance(rank, dict) else set())
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)} for {prefix}{family}; it has {names}")
    raw = {}
    for name in names:
        value = init.get(name, DEFAULTS[name.split("_")[0] if name != "w_rec" else name])
        r = rank.get(name, 1) if isinstance(rank, dict) else rank
        if isinstance(value, np.ndarray):        # a given tensor: its own rank
            if value.ndim > 1 or (value.ndim == 1 and value.shape != (num_neurons,)):
                raise ValueError(f"{name}: given shape {value.shape}; a parameter is a scalar () "
                                 f"or per neuron ({num_neurons},)")
        elif r not in (0, 1):
            raise ValueError(f"{name}: rank={r!r}; a parameter is a scalar (0) or per neuron (1)")
        else:
            value = np.full((num_neurons,) if r == 1 else (), float(value))
        raw[name] = np.array(unconstrain(name, value))          # an array even for rank 0
    learnable = frozenset(names if learn is True else () if learn is False else learn)
    if learnable - set(names):
        raise ValueError(f"learn names {sorted(learnable - set(names))} not in {names}")
    return Layer(family, prefix, int(num_neurons), raw, learnable, ema, spike_fn, float(spike_bias),
                 quant_fn, int(dim))


def values(layer):
    """name -> constrained value (decays in (0, 1), thresholds > 0)."""
    return {name: constrain(kind_of(name), r)[0] for name, r in layer.raw.items()}


# ----------------------------------------------------------------------------- forward
# Notation for one step t (all elementwise over (..., N)); sign s runs over ("all",) or, with D,
# ("pos", "neg"); m_all(z) = z, m_pos(z) = max(z, 0), m_neg(z) = min(z, 0):
#   S:  A_s = a_s A_s' + (1 - a_s) m_s(x)        base = sum_s A_s          (else base = x)
#   R:  C_s = g_s C_s' + (1 - g_s) m_s(out')     drive = base + w_rec sum_s C_s   (else base)
#       M_s = b_s P_s' + c_s m_s(drive)          u = sum_s M_s,  c_s = 1 - b_s (ema) or 1
#   family: out, r+, r- = fire(u)                P_all = M_all - r+ + r-,  P_pos = M_pos - r+,
#                                                P_neg = M_neg + r-        (the reset)
# where ' marks the previous step and P is the membrane after reset.

SIGNS = {False: ("all",), True: ("pos", "neg")}


def split(sign, z):
    """m_s(z) and dm_s/dz."""
    if sign == "pos":
        return np.maximum(z, 0), (z > 0).astype(z.dtype)
    if sign == "neg":
        return np.minimum(z, 0), (z < 0).astype(z.dtype)
    return z, 1.0


def decays(layer, v, trace):
    """sign -> decay of one trace ('beta', 'alpha' or 'gamma')."""
    dual = "D" in layer.prefix
    return {s: v[f"{trace}_{s}" if dual else trace] for s in SIGNS[dual]}


def trace_step(prev, inp, d, ema):
    """One step of a (dual) trace: part_s = d_s part_s' + c_s m_s(inp)."""
    return {s: d[s] * prev[s] + (1 - d[s] if ema else 1.0) * split(s, inp)[0] for s in prev}


def fire(layer, v, u, noise):
    """Membrane u -> (out, r+ taken off the positive membrane, r- given back to the negative one,
    what the backward needs). noise (2, ...) uniform draws for the quantizer, or None."""
    if layer.family == "LI":
        return u, 0.0, 0.0, None
    f, q = SPIKE_FNS[layer.spike_fn], QUANT_FNS[layer.quant_fn]
    n_pos, n_neg = (None, None) if noise is None else noise
    if layer.family == "LIB":
        p, dp = f(u - v["theta"] + layer.spike_bias)
        o = q(p, n_pos)
        return o, o * v["theta"], 0.0, (dp, o)
    p_pos, dp_pos = f(u - v["theta_pos"] + layer.spike_bias)
    p_neg, dp_neg = f(-u - v["theta_neg"] + layer.spike_bias)
    o_pos, o_neg = q(p_pos, n_pos), q(p_neg, n_neg)
    s_pos, s_neg = (v["scale_pos"], v["scale_neg"]) if layer.family == "LITS" else (1.0, 1.0)
    out = s_pos * o_pos - s_neg * o_neg
    return out, o_pos * v["theta_pos"], o_neg * v["theta_neg"], (dp_pos, o_pos, dp_neg, o_neg)


def to_last(layer, x):
    """Check the input and move the neuron axis last: (T, ..., N)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or not -x.ndim <= layer.dim < x.ndim or layer.dim % x.ndim == 0:
        raise ValueError(f"input of shape {x.shape} has no axis dim={layer.dim} besides time (axis 0)")
    if x.shape[layer.dim] != layer.num_neurons:
        raise ValueError(f"input has {x.shape[layer.dim]} features on dim={layer.dim} but the "
                         f"layer has num_neurons={layer.num_neurons}")
    return np.moveaxis(x, layer.dim, -1)


def draw_noise(layer, shape, rng, noise):
    """Uniform draws (2, T, ..., N) for a noisy quantizer; None for the others."""
    if layer.family == "LI" or layer.quant_fn not in NOISY:
        return None
    if noise is not None:
        return noise
    if rng is None:
        raise ValueError(f"quant_fn={layer.quant_fn} draws noise: pass rng= (or noise=)")
    return rng.random((2,) + shape)


def layer_forward(layer, x, rng=None, noise=None):
    """Run the layer over time. x (T, ..., N, ...) with the neurons on axis layer.dim.
    Returns out (the shape of x) and the cache for layer_backward. noise (2, T, ..., N) fixes the
    quantizer's uniform draws (neurons last); otherwise they come from rng."""
    x = to_last(layer, x)                                              # (T, ..., N)
    T, shape, dual = x.shape[0], x.shape[1:], "D" in layer.prefix
    v, noise = values(layer), draw_noise(layer, x.shape, rng, noise)
    syn, rec, mem = ({s: np.zeros(shape) for s in SIGNS[dual]} for _ in range(3))
    out, outs, steps = np.zeros(shape), np.empty(x.shape), []
    for t in range(T):
        st = {"x": x[t], "syn_prev": syn, "rec_prev": rec, "mem_prev": mem, "out_prev": out}
        base = x[t]
        if "S" in layer.prefix:
            syn = trace_step(syn, x[t], decays(layer, v, "alpha"), ema=True)
            base = sum(syn.values())
        drive = base
        if "R" in layer.prefix:
            rec = trace_step(rec, out, decays(layer, v, "gamma"), ema=True)
            st["rec"] = sum(rec.values())
            drive = base + v["w_rec"] * st["rec"]
        mem = trace_step(mem, drive, decays(layer, v, "beta"), layer.ema)
        u = sum(mem.values())
        out, r_pos, r_neg, st["fire"] = fire(layer, v, u, None if noise is None else noise[:, t])
        if dual:
            mem = {"pos": mem["pos"] - r_pos, "neg": mem["neg"] + r_neg}
        else:
            mem = {"all": mem["all"] - r_pos + r_neg}
        st["drive"] = drive
        steps.append(st)
        outs[t] = out
    return np.moveaxis(outs, -1, layer.dim), (v, steps)


# ----------------------------------------------------------------------------- backward
# Walking t = T-1 .. 0 we carry the gradients that step t+1 sends back to step t:
#   fP_s = dL/dP_s (through M_s of t+1),  fA_s = dL/dA_s,  fC_s = dL/dC_s,  f_out = dL/dout (via R).


def trace_step_backward(g, prev, inp, d, ema):
    """Backward of part_s = d_s part_s' + c_s m_s(inp), c_s = 1 - d_s (ema) or 1, given
    g_s = dL/dpart_s. Returns dL/dinp, {s: dL/dd_s}, {s: dL/dpart_s'}."""
    g_inp, g_d, g_prev = 0.0, {}, {}
    for s in g:
        m, dm = split(s, inp)
        c = 1 - d[s] if ema else 1.0
        g_inp = g_inp + g[s] * c * dm                         # term: c_s m_s'(inp)
        g_d[s] = g[s] * (prev[s] - m if ema else prev[s])     # term: part_s' (- m_s(inp) with ema)
        g_prev[s] = g[s] * d[s]                               # term: d_s, carried to t-1
    return g_inp, g_d, g_prev


def fire_backward(layer, v, saved, g_out, g_rpos, g_rneg, gv):
    """Backward of fire: from dL/dout, dL/dr+, dL/dr- to dL/du, adding dL/dtheta and dL/dscale
    into gv. Each quantizer's d out / d p is 1 (exact or straight-through)."""
    if layer.family == "LI":
        return g_out                                          # out = u
    if layer.family == "LIB":
        dp, o = saved
        go = g_out + v["theta"] * g_rpos                      # out = o;  r+ = o theta
        gv["theta"] += o * g_rpos - go * dp                   # r+ = o theta;  p = f(u - theta)
        return go * dp                                        # o = q(p), q' = 1;  p' = f'
    dp_pos, o_pos, dp_neg, o_neg = saved
    s_pos, s_neg = (v["scale_pos"], v["scale_neg"]) if layer.family == "LITS" else (1.0, 1.0)
    go_pos = s_pos * g_out + v["theta_pos"] * g_rpos          # out = s+ o+ - s- o-;  r+ = o+ th+
    go_neg = -s_neg * g_out + v["theta_neg"] * g_rneg         # r- = o- th-
    if layer.family == "LITS":
        gv["scale_pos"] += g_out * o_pos
        gv["scale_neg"] -= g_out * o_neg
    gv["theta_pos"] += o_pos * g_rpos - go_pos * dp_pos       # p+ = f(u - th+)
    gv["theta_neg"] += o_neg * g_rneg - go_neg * dp_neg       # p- = f(-u - th-)
    return go_pos * dp_pos - go_neg * dp_neg                  # du through p+ and (sign -1) p-


def reduce_to(g, raw):
    """Sum a gradient (..., N) over the axes a scalar or per-neuron parameter was broadcast over."""
    return g.sum() if raw.ndim == 0 else g.reshape(-1, g.shape[-1]).sum(0)


def layer_backward(layer, g_out, cache):
    """Backpropagation through time. g_out = dL/dout (the shape of the output). Returns dL/dx
    (the shape of x) and {name: dL/draw} for every learnable parameter."""
    v, steps = cache
    g_out = np.moveaxis(g_out, layer.dim, -1)                         # (T, ..., N)
    dual, shape = "D" in layer.prefix, g_out.shape[1:]
    signs = SIGNS[dual]
    gv = {name: np.zeros(shape) for name in layer.raw}                # dL/dvalue, elementwise
    fP, fA, fC = ({s: 0.0 for s in signs} for _ in range(3))
    f_out, gx = 0.0, np.empty(g_out.shape)
    for t in reversed(range(len(steps))):
        st = steps[t]
        # reset: P_all = M_all - r+ + r-, or P_pos = M_pos - r+, P_neg = M_neg + r-
        g_rpos = -fP["pos" if dual else "all"]
        g_rneg = fP["neg" if dual else "all"]
        gu = fire_backward(layer, v, st["fire"], g_out[t] + f_out, g_rpos, g_rneg, gv)
        gM = {s: fP[s] + gu for s in signs}                   # P_s = M_s + reset;  u = sum_s M_s
        g_drive, g_b, fP = trace_step_backward(gM, st["mem_prev"], st["drive"],
                                               decays(layer, v, "beta"), layer.ema)
        for s in signs:
            gv["beta_" + s if dual else "beta"] += g_b[s]
        g_base = g_drive                                      # drive = base (+ w_rec rec)
        if "R" in layer.prefix:
            gv["w_rec"] += g_drive * st["rec"]                # term: rec
            gC = {s: fC[s] + g_drive * v["w_rec"] for s in signs}   # rec = sum_s C_s
            f_out, g_g, fC = trace_step_backward(gC, st["rec_prev"], st["out_prev"],
                                                 decays(layer, v, "gamma"), ema=True)
            for s in signs:
                gv["gamma_" + s if dual else "gamma"] += g_g[s]
        if "S" in layer.prefix:
            gA = {s: fA[s] + g_base for s in signs}           # base = sum_s A_s
            gx[t], g_a, fA = trace_step_backward(gA, st["syn_prev"], st["x"],
                                                 decays(layer, v, "alpha"), ema=True)
            for s in signs:
                gv["alpha_" + s if dual else "alpha"] += g_a[s]
        else:
            gx[t] = g_base                                    # base = x
    grads = {name: reduce_to(gv[name], layer.raw[name]) * constrain(kind_of(name), layer.raw[name])[1]
             for name in sorted(layer.learn)}                 # chain rule through value = c(raw)
    return np.moveaxis(gx, -1, layer.dim), grads


# ----------------------------------------------------------------------------- the temporal task
# Both tasks put their evidence in the first few steps and ask at the last one, so whatever the
# layer needs must survive a delay; the readout (an LI layer with a short memory) sees only its
# last few outputs.
#   interval  channels A and B pulse once each; the class is which came first and whether the gap
#             was short (2-4 steps) or long (6-8): 4 classes, timing and order must be measured
#             and then held for >= T - 14 steps
#   recall    one of 4 cue channels pulses in the first 5 steps: 4 classes, held for >= T - 5 steps


def make_task(cfg, n, rng):
    """n sequences: x (T, n, C) pulses of height 1 plus Gaussian noise, y (n,) in 0..3."""
    rows = np.arange(n)
    if cfg.task == "interval":
        x = rng.normal(0, cfg.noise, (cfg.T, n, 2))
        first, b_first, long = rng.integers(0, 6, n), rng.integers(0, 2, n), rng.integers(0, 2, n)
        gap = np.where(long == 1, rng.integers(6, 9, n), rng.integers(2, 5, n))
        x[first, rows, b_first] += 1                                   # the first pulse ...
        x[first + gap, rows, 1 - b_first] += 1                         # ... and the other one
        return x, 2 * b_first + long
    x = rng.normal(0, cfg.noise, (cfg.T, n, 4))
    cue = rng.integers(0, 4, n)
    x[rng.integers(0, 5, n), rows, cue] += 1
    return x, cue


# ----------------------------------------------------------------------------- model
# input projection -> the neuron layer -> linear -> LI readout (a fixed LI layer of this stage);
# logits = the readout membrane at the last step + bias.


def init_model(cfg, quant=None):
    """Weights and the two layers; params holds the layer's learnable raw values by reference."""
    rng = np.random.default_rng([cfg.seed, 1])
    C = 2 if cfg.task == "interval" else 4
    layer = make_layer(cfg.family, cfg.prefix, cfg.hidden, rank=cfg.rank, learn=cfg.learn,
                       ema=cfg.ema, spike_fn=cfg.spike_fn, spike_bias=cfg.spike_bias,
                       quant_fn=quant or (cfg.quant if cfg.family != "LI" else "identity"))
    readout = make_layer("LI", "", 4, init={"beta": cfg.readout_beta}, rank=0, learn=False)
    params = {"W_in": rng.normal(0, 1.5, (C, cfg.hidden)), "b_in": np.zeros(cfg.hidden),
              "W_out": rng.normal(0, cfg.hidden ** -0.5, (cfg.hidden, 4)), "b_out": np.zeros(4)}
    params.update({"n." + name: layer.raw[name] for name in sorted(layer.learn)})
    return {"layer": layer, "readout": readout, "params": params}


def forward(model, x, rng=None, noise=None):
    """x (T, B, C) -> logits (B, 4) and the cache."""
    p = model["params"]
    h = x @ p["W_in"] + p["b_in"]                                      # (T, B, N)
    out, c_layer = layer_forward(model["layer"], h, rng, noise)        # (T, B, N)
    z = out @ p["W_out"]                                               # (T, B, 4)
    m, c_read = layer_forward(model["readout"], z)                     # (T, B, 4)
    return m[-1] + p["b_out"], (x, out, c_layer, c_read)


def loss_and_grads(model, x, y, rng=None, noise=None):
    """Cross-entropy and its gradient for every trained parameter, by hand."""
    p = model["params"]
    logits, (x, out, c_layer, c_read) = forward(model, x, rng, noise)
    z = logits - logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    B = len(y)
    loss = -float(np.log(prob[np.arange(B), y]).mean())
    g_logits = prob.copy()
    g_logits[np.arange(B), y] -= 1
    g_logits /= B                                                      # dL/dlogits = (p - onehot)/B
    g_m = np.zeros((x.shape[0], B, 4))
    g_m[-1] = g_logits                                                 # only the last membrane
    g_z, _ = layer_backward(model["readout"], g_m, c_read)
    g_h, g_layer = layer_backward(model["layer"], g_z @ p["W_out"].T, c_layer)
    grads = {"W_in": np.einsum("tbc,tbn->cn", x, g_h), "b_in": g_h.sum((0, 1)),
             "W_out": np.einsum("tbn,tbk->nk", out, g_z), "b_out": g_logits.sum(0)}
    grads.update({"n." + name: g for name, g in g_layer.items()})
    return loss, grads, logits, out


# ----------------------------------------------------------------------------- training


def train(cfg, progress=True):
    """Adam with a cosine learning-rate decay; batch and quantizer noise from rng([seed, step])."""
    model = init_model(cfg)
    params = model["params"]
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(a) for k, a in params.items()}
    b1, b2, eps, losses = 0.9, 0.99, 1e-8, []
    bar = tqdm(range(cfg.steps), desc=f"{cfg.prefix}{cfg.family}", disable=not progress, ncols=100)
    for step in bar:
        x, y = make_task(cfg, cfg.batch_size, np.random.default_rng([cfg.seed, step]))
        loss, grads, _, _ = loss_and_grads(model, x, y, np.random.default_rng([cfg.seed, step, 1]))
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            mhat, vhat = m[k] / (1 - b1 ** (step + 1)), v[k] / (1 - b2 ** (step + 1))
            params[k] -= lr * mhat / (np.sqrt(vhat) + eps)            # in place: the layer sees it
        losses.append(loss)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    return model, losses


def evaluate(model, cfg):
    """Test accuracy and spike rate (fraction of neurons x steps whose output is not 0; nan for LI,
    whose output is its membrane)."""
    x, y = make_task(cfg, cfg.n_test, np.random.default_rng([cfg.seed, 10**9]))
    logits, (_, out, _, _) = forward(model, x, np.random.default_rng([cfg.seed, 10**9, 1]))
    rate = float("nan") if cfg.family == "LI" else float((out != 0).mean())
    return float((logits.argmax(-1) == y).mean()), rate


def table_runs():
    """(family, prefix, learn) of every table row: the 32 layers, then a plain LIF (LIB without
    prefix, decay and threshold fixed; with round_ste exactly stage 0's LIF with a soft reset)."""
    return [(f, p, True) for f in FAMILIES for p in PREFIXES] + [("LIB", "", False)]


def table_row(family, prefix, learn, cfg):
    """Train one layer: (name, prefix, accuracy, spike rate, training seconds)."""
    c = replace(cfg, family=family, prefix=prefix, learn=learn and cfg.learn)
    t0 = time.perf_counter()
    model, _ = train(c, progress=False)
    seconds = time.perf_counter() - t0
    return (family if learn else "LIF (fixed LIB)", prefix or "none", *evaluate(model, c), seconds)


def run_table(cfg, progress=True):
    """Every row of table_runs for cfg.seed: (name, prefix, accuracy, rate, seconds, [accuracy])."""
    rows = [table_row(*run, cfg) for run in tqdm(table_runs(), desc="table", disable=not progress,
                                                  ncols=100)]
    return [(*r, [r[2]]) for r in rows]


def format_table(rows, cfg):
    """A Markdown table; accuracy is the mean over seeds, each seed's in brackets."""
    lines = [(f"task {cfg.task}, T {cfg.T}, {cfg.hidden} neurons, quant {cfg.quant} (LI: smooth), "
              f"{cfg.steps} Adam steps x {cfg.batch_size}, test {cfg.n_test}, chance 25%"),
             "| family | prefix | accuracy (per seed) | spike rate | train s |", "|---|---|---|---|---|"]
    for family, prefix, acc, rate, secs, accs in rows:
        r = "-" if np.isnan(rate) else f"{rate:.3f}"
        each = " / ".join(f"{a:.1%}" for a in accs)
        lines.append(f"| {family} | {prefix} | {acc:.1%} ({each}) | {r} | {secs:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- gradient check


def random_layer(family, prefix, rng, num_neurons=3, **kw):
    """A layer with per-neuron initial values drawn in their ranges, every parameter learnable."""
    init = {}
    for name in param_names(family, prefix):
        kind = kind_of(name)
        init[name] = (rng.uniform(0.3, 0.9, num_neurons) if kind == "decay" else
                      rng.uniform(0.4, 1.2, num_neurons) if kind == "positive" else
                      rng.uniform(0.3, 1.2, num_neurons) * rng.choice([-1, 1], num_neurons))
    return make_layer(family, prefix, num_neurons, init=init, **kw)


def gradcheck(cfg):
    """Hand BPTT vs central finite differences in float64, quant identity (the smooth path):
    every family x prefix (and LI with ema, i.e. LIEMA), dL/dx and dL/draw of every parameter,
    L = sum(out * R); then the whole model. Returns (name, max relative error) rows."""
    s0 = load_stage("0_spike_transformer")
    rng, rows = np.random.default_rng(0), []
    for family, prefix, ema in [(f, p, False) for f in FAMILIES for p in PREFIXES] + [("LI", "DSR", True)]:
        layer = random_layer(family, prefix, rng, ema=ema)
        x = rng.normal(0.5, 1.0, (5, 2, 3))                            # (T, B, N)
        R = rng.standard_normal(x.shape)
        f = lambda layer=layer, x=x, R=R: float((layer_forward(layer, x)[0] * R).sum())  # noqa: E731
        gx, grads = layer_backward(layer, R, layer_forward(layer, x)[1])
        err = max([s0.rel_error(gx, s0.numerical_grad(f, x))] +
                  [s0.rel_error(grads[k], s0.numerical_grad(f, layer.raw[k])) for k in grads])
        rows.append((f"{prefix}{'LIEMA' if ema else family}", err))
    small = replace(cfg, hidden=4, T=20, family="LITS", prefix="DSR")
    model = init_model(small, quant="identity")
    x, y = make_task(small, 3, rng)
    _, grads, _, _ = loss_and_grads(model, x, y)
    f = lambda: loss_and_grads(model, x, y)[0]                         # noqa: E731
    rows.append(("model (DSR LITS, smooth)", max(s0.rel_error(grads[k], s0.numerical_grad(f, a))
                                                  for k, a in model["params"].items())))
    return rows


# ----------------------------------------------------------------------------- main


def field_help():
    """The comment beside each Config field: its --help text."""
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(Config), re.MULTILINE))


def parse_config(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help()
    for f in fields(Config):
        if f.type in (bool, "bool"):
            ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                            help=helps[f.name])
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            ap.add_argument(f"--{f.name}", type=typ, default=f.default, help=helps[f.name])
    try:
        return Config(**vars(ap.parse_args(argv)))
    except ValueError as e:
        ap.error(str(e))


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.gradcheck:
        print("hand BPTT vs central finite differences, float64, quant identity (max rel. error)")
        rows = gradcheck(cfg)
        for name, err in rows:
            print(f"  {name or 'LI':28s} {err:.1e}  {'ok' if err < 1e-6 else 'FAIL'}")
        print("all ok" if all(e < 1e-6 for _, e in rows) else "SOME CHECKS FAILED")
        return
    if cfg.table:
        print(format_table(run_table(cfg), cfg))
        return
    t0 = time.time()
    model, losses = train(cfg)
    acc, rate = evaluate(model, cfg)
    spikes = "no spikes (LI)" if np.isnan(rate) else f"spike rate {rate:.3f}"
    print(f"{cfg.prefix or 'no prefix'} {cfg.family}, quant {cfg.quant}, task {cfg.task}: trained "
          f"{cfg.steps} steps in {time.time() - t0:.1f} s, final loss {np.mean(losses[-20:]):.3f}, "
          f"test accuracy {acc:.1%} (chance 25%), {spikes}")
    for name, v in values(model["layer"]).items():
        print(f"  {name:10s} mean {np.mean(v):.3f}  range [{np.min(v):.3f}, {np.max(v):.3f}]")


if __name__ == "__main__":
    main()
