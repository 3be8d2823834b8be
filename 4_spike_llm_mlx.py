"""Stage 4: the stage 3 spiking language model in MLX, fast on a Mac and on a Linux CPU.

The same model as stage 3 (same parameters, same checkpoint file, same logits), written the way
MLX code is written: one `nn.Module` per idea, the surrogate spike as an `mx.custom_function`
with its own vjp, dropout as `nn.Dropout` (active only in training mode), gradients from
`nn.value_and_grad`, the whole training step (forward, backward, clipping, AdamW) traced once
by `mx.compile`, and `mx.eval` once per step. MLX runs on the GPU of Apple Silicon when there
is one and on the CPU otherwise.

Everything that is not the model comes from stage 3 by import: ModelConfig, TrainConfig,
PRESETS, initial parameters, batches, the learning-rate schedule, checkpoint I/O, BPC, sampling
and the operation counts of the energy report; spikelib/mlx_io.py holds the MLX glue (arrays to
and from the checkpoint, validation nats, spike rates, --device). A checkpoint written here
continues training in stage 3 and the other way round, optimizer moments included
(tests/test_mlx.py proves it).

    python 4_spike_llm_mlx.py                         # stage 3's quick start, in MLX
    python 4_spike_llm_mlx.py --preset seed --source files:path/to/text.txt
    python 4_spike_llm_mlx.py --resume 1              # continue exactly where a run stopped
    python 4_spike_llm_mlx.py --ckpt out/numpy/ckpt.npz --resume 1   # continue a NumPy run
    python 4_spike_llm_mlx.py --generate "To be"      # stream text from out/mlx/ckpt.npz

The options are stage 3's (`--help`); the default out_dir here is out/mlx.
"""
import math
import sys
from functools import lru_cache, partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.cli import config_from_args, fail, stage_parser  # noqa: E402
from spikelib.hardware import blas_hint  # noqa: E402
from spikelib.loop import run_steps  # noqa: E402
from spikelib.mlx_io import eval_report, save, spike_rates, use_device  # noqa: E402
from spikelib.plots import plot_checkpoint, plot_only  # noqa: E402
from spikelib.report import energy_summary, model_line, print_evals, print_summary, stream_sample  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

ref = load_stage("3_spike_llm_numpy")          # the reference stage: config, data, schedule, I/O
ModelConfig, TrainConfig, PRESETS = ref.ModelConfig, ref.TrainConfig, ref.PRESETS

# ----------------------------------------------------------------------------- surrogate spike


def surrogate_grad(u, cfg):
    """S'(u) for u = v - threshold (SPEC): the gradient used in place of the step's delta."""
    a = cfg.alpha
    if cfg.surrogate == "arctan":
        z = (math.pi / 2 * a) * u
        return (a / 2) / (1 + z * z)
    if cfg.surrogate == "sigmoid":
        sig = mx.sigmoid(a * u)
        return a * sig * (1 - sig)
    if cfg.surrogate == "fast_sigmoid":
        d = 1 + a * mx.abs(u)
        return a / (2 * d * d)
    g = 1.0 / a                                            # triangle of half-width g
    return mx.maximum(0, 1 - mx.abs(u) / g) / g


@lru_cache(maxsize=None)
def spike_function(surrogate, alpha):
    """H(u) = [u > 0] forward, dL/du = dL/ds * S'(u) backward: a custom-gradient function."""
    cfg = ModelConfig(surrogate=surrogate, alpha=alpha)

    @mx.custom_function
    def spike(u):
        return (u > 0).astype(u.dtype)

    @spike.vjp
    def spike_vjp(u, ds, s):
        return ds * surrogate_grad(u, cfg)

    return spike


def sigmoid4x_spike(u, cfg, noisy):
    """Stage 3's sigmoid4x: p = sigmoid(4u) quantized by cfg.quant (noisy: uniform draws, training;
    else rounding [u >= 0]) as q + (p - stop_gradient(p)): exactly q forward, d out/dp = 1 backward."""
    p = mx.sigmoid(4 * u)
    if cfg.quant == "identity":
        return p
    if noisy:
        n = mx.random.uniform(shape=p.shape)
        q = (n >= 1 - p) if cfg.quant == "stochastic_round_ste" else (n < p)
    else:
        q = u >= 0
    return q.astype(p.dtype) + (p - mx.stop_gradient(p))

# ----------------------------------------------------------------------------- model


class Neuron(nn.Module):
    """Multi-step spiking neuron over axis 0 (T) of x (T, ..., C), per channel C.

    v_t = beta*v+_{t-1} + x_t,  s_t = H(v_t - thr_t),  v+_t = v_t - thr_t*r_t (soft) or
    v_t*(1 - r_t) (hard), v+_0 = 0, r_t = s_t (ternary hard: |s_t|).  LIF: fixed beta, theta.
    PLIF: beta = sigmoid(w), thr = theta per channel, both learned.  ALIF: thr_t = theta + a_t,
    a_t = rho*a_{t-1} + kappa*s_{t-1}.  Ternary: s = H(v - theta) - H(-v - theta); lits: the two
    spikes times learned per-channel scales s+, s-.  S trace: syn_t = a syn_{t-1} + (1 - a) x_t
    replaces x_t.  H: heaviside or sigmoid4x (spike_fn, quant).
    ANN twin: relu(x).  Autodiff through this loop is backprop through time.
    """

    def __init__(self, cfg, channels):
        super().__init__()
        self.cfg = cfg
        if cfg.neuron == "plif":
            self.w = mx.full((channels,), math.log(cfg.beta / (1 - cfg.beta)))
            self.theta = mx.full((channels,), cfg.theta)
        if cfg.neuron == "lits":
            self.scale_pos, self.scale_neg = mx.ones((channels,)), mx.ones((channels,))

    def __call__(self, x):
        cfg = self.cfg
        if not cfg.spiking:
            return nn.relu(x)
        spike = spike_function(cfg.surrogate, cfg.alpha)
        if cfg.spike_fn == "sigmoid4x":
            noisy = self.training and cfg.quant in ref.NOISY
            spike = partial(sigmoid4x_spike, cfg=cfg, noisy=noisy)
        beta = mx.sigmoid(self.w) if cfg.neuron == "plif" else cfg.beta
        theta = self.theta if cfg.neuron == "plif" else cfg.theta
        scales = (self.scale_pos, self.scale_neg) if cfg.neuron == "lits" else (1.0, 1.0)
        v_plus, a, syn, out, a_syn = 0.0, 0.0, 0.0, [], cfg.syn_alpha
        for x_t in mx.split(x, x.shape[0]):                # (1, ..., C); x[t] would make the
            syn = a_syn * syn + (1 - a_syn) * x_t if a_syn else x_t   # backward scatter T arrays
            v = beta * v_plus + syn
            thr = theta + a
            if cfg.neuron in ref.TERNARY:
                s_pos, s_neg = spike(v - thr), spike(-v - thr)
                s = scales[0] * s_pos - scales[1] * s_neg
                r = s_pos - s_neg if cfg.reset == "soft" else s_pos + s_neg
            else:
                s = r = spike(v - thr)
            if cfg.detach_reset:
                r = mx.stop_gradient(r)
            v_plus = v - thr * r if cfg.reset == "soft" else v * (1 - r)
            if cfg.neuron == "alif":
                a = cfg.alif_rho * a + cfg.alif_kappa * s
            out.append(s)
        return mx.concatenate(out)                         # (T, ..., C)


def running_mean(x, on):
    """Stage 3's running_mean over axis 0 (T) when rate coding is on: mean_{tau<=t} x_tau."""
    if not on:
        return x
    return mx.cumsum(x, axis=0) / mx.arange(1, x.shape[0] + 1).reshape((-1,) + (1,) * (x.ndim - 1))


def token_shift(s, prev=None):
    """Stage 3's token_shift: out[:, :, l, :D/2] = s[:, :, l-1, :D/2] (at l = 0 the decode state's prev
    (T, B, D/2), or zeros), the rest of s unchanged. Returns out and the last position's first half."""
    half = s.shape[-1] // 2
    first = mx.zeros_like(s[:, :, :1, :half]) if prev is None else prev[:, :, None]
    out = mx.concatenate([mx.concatenate([first, s[:, :, :-1, :half]], 2), s[..., half:]], -1)
    return out, s[:, :, -1, :half]


@lru_cache(maxsize=16)
def decay_mask(H, L, start, step):
    """Dmask[h, l, j] = gamma_h^(l-j) for j <= l else 0, (H, L, L): stage 3's table, in MLX."""
    return mx.array(ref.decay_mask(H, L, np.dtype(np.float32), start, step))


class HeadNorm(nn.Module):
    """RMS-normalise each head's dh channels, then scale by a gain over all D channels."""

    def __init__(self, dims, eps):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, y):                                 # (T, B, H, L, dh) -> (T, B, L, D)
        T, B, H, L, dh = y.shape
        y = y.transpose(0, 1, 3, 2, 4)
        y = y * mx.rsqrt((y * y).mean(-1, keepdims=True) + self.eps)
        return y.reshape(T, B, L, H * dh) * self.weight


class Attention(nn.Module):
    """Spike-driven causal attention with a decay gamma_h = 1 - 2^-(decay_start + decay_step h) per head.

    linear:   y_l = sum_{j<=l} gamma^(l-j) (q_l . k_j) v_j   parallel: (Q K^T * Dmask) V
    hadamard: y_l = sum_{j<=l} gamma^(l-j) k_j * v_j         parallel: Dmask (K * V)
    Recurrent (one position): S = gamma S + k^T v, y = q S  |  c = gamma c + k * v, y = c.
    """

    def __init__(self, cfg):
        super().__init__()
        D = cfg.d_model
        self.cfg = cfg
        self.wq, self.wk, self.wv, self.wo = (mx.zeros((D, D)) for _ in range(4))   # (in, out)
        self.sn_q, self.sn_k, self.sn_v, self.sn_o = (Neuron(cfg, D) for _ in range(4))
        self.norm = HeadNorm(D, cfg.norm_eps)

    def split_heads(self, x):                              # (T, B, L, D) -> (T, B, H, L, dh)
        T, B, L, D = x.shape
        H = self.cfg.n_head
        return x.reshape(T, B, L, H, D // H).transpose(0, 1, 3, 2, 4)

    def parallel(self, Q, K, V):
        cfg = self.cfg
        Dm = decay_mask(cfg.n_head, Q.shape[3], cfg.decay_start, cfg.decay_step)     # (H, L, L)
        if cfg.attention == "linear":
            return ((Q @ K.swapaxes(-1, -2)) * Dm) @ V
        return Dm @ (K * V)

    def recurrent(self, Q, K, V, S):
        """One position; S (T, B, H, dh, dh) linear or (T, B, H, dh) hadamard."""
        cfg = self.cfg
        gamma = mx.array(ref.head_decays(cfg.n_head, cfg.decay_start, cfg.decay_step).astype(np.float32))
        Q, K, V = Q[:, :, :, 0], K[:, :, :, 0], V[:, :, :, 0]            # (T, B, H, dh)
        if cfg.attention == "linear":
            S = gamma[:, None, None] * S + K[..., :, None] * V[..., None, :]
            y = (Q[..., None, :] @ S)[..., 0, :]
        else:
            S = gamma[:, None] * S + K * V
            y = S
        return y[:, :, :, None], S

    def __call__(self, s, x, state=None):                  # spikes (T, B, L, D): q reads s, k and v read x
        q, k, v = self.sn_q(s @ self.wq), self.sn_k(x @ self.wk), self.sn_v(x @ self.wv)
        Q, K, V = (self.split_heads(running_mean(a, self.cfg.rate_coding)) for a in (q, k, v))
        if state is None:
            y = self.parallel(Q, K, V)
        else:
            y, state = self.recurrent(Q, K, V, state)
        z = self.sn_o(self.norm(y))
        o = z if self.cfg.attention == "linear" else q * z  # hadamard: gate by the query spikes
        spikes = {"attn.sn_q": q, "attn.sn_k": k, "attn.sn_v": v, "attn.sn_o": z, "wo_input": o}
        return o @ self.wo, state, spikes


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = mx.zeros((cfg.d_model, cfg.d_ff))
        self.w2 = mx.zeros((cfg.d_ff, cfg.d_model))
        self.sn_h = Neuron(cfg, cfg.d_ff)

    def __call__(self, s):                                 # (T, B, L, D) spikes -> (T, B, L, D)
        u = self.sn_h(s @ self.w1)                         # (T, B, L, F) spikes
        return u @ self.w2, u


class Block(nn.Module):
    """h += drop(SDSA(SN(rmsnorm(h))));  h += drop(MLP(SN(rmsnorm(h)))): every matmul is fed by
    spikes. Dropout acts on the real branch outputs only, so the spikes stay binary/ternary."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model, cfg.norm_eps), nn.RMSNorm(cfg.d_model, cfg.norm_eps)
        self.sn1, self.sn2 = Neuron(cfg, cfg.d_model), Neuron(cfg, cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)                # a fresh mask per call, over all of (T, B, L, D)

    def __call__(self, h, state=None, prev=None):          # h (T, B, L, D) real residual stream
        """prev: token_shift's slot when decoding; returns h, the attention state, the new slot (the
        last position's spikes of the shifted half; None without token_shift) and the spikes."""
        rate = self.attn.cfg.rate_coding                    # norms read running means (stage 3)
        s = self.sn1(self.norm1(running_mean(h, rate)))
        x, last = token_shift(s, prev) if self.attn.cfg.token_shift else (s, None)   # what wk, wv read
        o, state, spikes = self.attn(s, x, state)
        h = h + self.drop(o)
        s2 = self.sn2(self.norm2(running_mean(h, rate)))
        m, u = self.mlp(s2)
        spikes = {"sn1": s, **spikes, "sn2": s2, "mlp.sn_h": u}
        return h + self.drop(m), state, last, spikes


class Head(nn.Module):
    """The untied readout, stored (D, V) like every weight here: logits = x @ weight."""

    def __init__(self, dims, vocab):
        super().__init__()
        self.weight = mx.zeros((dims, vocab))


class SpikeLM(nn.Module):
    """Tokens (B, L) -> logits (B, L, V), the spikes of every site, and the decoding state.

    x = drop(embed[idx]), h = x repeated over T, blocks, hbar = mean_t h, logits = rmsnorm(hbar) @ W_out.
    With state=None the parallel form runs (training); with a state (list per layer) each call
    takes one position (B, 1) and returns the updated constant-size state (generation).
    Dropout acts only in training mode (model.train()); build_model returns evaluation mode.
    Since MLX is lazy, the spikes cost nothing unless someone evaluates them.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = [Block(cfg) for _ in range(cfg.n_layer)]
        self.norm_f = nn.RMSNorm(cfg.d_model, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        if not cfg.tie_embeddings:
            self.head = Head(cfg.d_model, cfg.vocab_size)

    def __call__(self, idx, state=None):
        T = ref.timesteps(self.cfg)                        # 1 for the ANN twin
        x = self.drop(self.embed(idx))                     # (B, L, D): one mask for all T
        h = mx.broadcast_to(x, (T,) + x.shape)             # (T, B, L, D)
        n, shift = self.cfg.n_layer, self.cfg.token_shift
        spikes, new_state, new_shift = [], [], []
        for i, block in enumerate(self.blocks):
            prev = state[n + i] if state is not None and shift else None             # layer i's slot
            h, layer_state, last, layer_spikes = block(h, None if state is None else state[i], prev)
            spikes.append(layer_spikes)
            new_state.append(layer_state)
            new_shift += [last] if shift else []
        xf = self.norm_f(h.mean(0))                        # (B, L, D)
        w_out = self.embed.weight.T if self.cfg.tie_embeddings else self.head.weight
        return xf @ w_out, spikes, (None if state is None else new_state + new_shift)

    def init_state(self, batch):
        """Stage 3's init_decode_state as one list: the zero attention state per layer, (T, B, H, dh, dh)
        linear or (T, B, H, dh) hadamard, then token_shift's slot per layer, each (T, B, D//2)."""
        state = ref.init_decode_state(self.cfg, batch)
        return [mx.array(s) for s in state["layers"] + state["shift"]]


def build_model(cfg, params):
    """An MLX SpikeLM holding the given {name: array} parameters (names as in the checkpoint), in
    evaluation mode, so evaluation, generation and the energy report never drop; the training
    step switches training mode on for itself."""
    model = SpikeLM(cfg)
    model.load_weights([(k, mx.array(np.asarray(v, np.float32))) for k, v in params.items()], strict=True)
    return model.eval()


def loss_fn(model, x, y):
    """Mean cross-entropy over B*L."""
    logits, _, _ = model(x)
    return nn.losses.cross_entropy(logits, y, reduction="mean")

# ----------------------------------------------------------------------------- optimizer


class AdamW:
    """Stage 3's AdamW with flat {name: array} moments, so they round-trip through the checkpoint.

    m = b1 m + (1-b1) g,  v = b2 v + (1-b2) g^2,  p -= lr_p*wd*p (ndim >= 2 only),
    p -= lr_p * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps),  t = completed steps + 1,
    lr_p = lr_at(step) * layer_lr_decay^(n_layer+1-depth).  (mlx.optimizers.AdamW decays
    every parameter and has one learning rate, hence these few lines.)
    """

    def __init__(self, model, tcfg, opt_state=None, b1=0.9, b2=0.95, eps=1e-8):
        n_layer = model.cfg.n_layer
        params = dict(tree_flatten(model.parameters()))
        self.b1, self.b2, self.eps, self.wd = b1, b2, eps, tcfg.weight_decay
        depth = {k: ref.layer_depth(k, n_layer) for k in params}
        self.lr_scale = {k: tcfg.layer_lr_decay ** (n_layer + 1 - depth[k]) for k in params}
        self.state = {moment: {k: mx.array(opt_state[moment][k]) if opt_state else mx.zeros_like(p)
                               for k, p in params.items()} for moment in ("m", "v")}

    def update(self, model, grads, lr, t):
        """Apply one step with base learning rate lr and step count t (mx scalars)."""
        b1, b2, m, v = self.b1, self.b2, self.state["m"], self.state["v"]
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new = []
        for name, p in tree_flatten(model.parameters()):
            g = grads[name]
            m[name] = b1 * m[name] + (1 - b1) * g
            v[name] = b2 * v[name] + (1 - b2) * g * g
            lr_p = lr * self.lr_scale[name]
            if p.ndim >= 2:
                p = p * (1 - lr_p * self.wd)
            new.append((name, p - lr_p * (m[name] / c1) / (mx.sqrt(v[name] / c2) + self.eps)))
        model.update(tree_unflatten(new))


# ----------------------------------------------------------------------------- training step


def make_train_step(model, opt, tcfg):
    """The compiled step: loss and gradients, global-norm clipping, AdamW. Model parameters,
    optimizer moments and MLX's random state are declared as the state the compiled function
    reads and writes: without the random key among them, the dropout masks drawn while tracing
    would be baked into the graph as constants and replayed at every step."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y, lr, t):
        model.train()       # Dropout reads the mode while the step is traced: the graph drops...
        loss, grads = loss_and_grad(model, x, y)
        model.eval()        # ...and the model is back in evaluation mode for everything else
        grads = dict(tree_flatten(grads))
        norm = mx.sqrt(sum((g * g).sum() for g in grads.values()))      # global L2 norm, before clipping
        if tcfg.grad_clip > 0:     # g *= max_norm / ||g|| when the global norm ||g|| exceeds it
            grads, _ = optim.clip_grad_norm(grads, tcfg.grad_clip)
        opt.update(model, grads, lr, t)
        return loss, norm

    return step


def train_step(model, opt, step_fn, mcfg, tcfg, data, step):
    """One step on the batch and dropout masks fixed by (seed, step), so a resumed run draws what
    an uninterrupted one would; returns (loss, stats)."""
    rng = ref.batch_rng(tcfg.seed, step)
    x, y = ref.get_batch(data, tcfg.batch_size, mcfg.context, rng, tcfg.repeat)         # (B, L)
    mx.random.seed(tcfg.seed * 1_000_003 + step)      # the step's dropout key (stage 5 seeds alike)
    lr = ref.lr_at(step, tcfg)
    x, y = mx.array(x, mx.int32), mx.array(y, mx.int32)
    loss, norm = step_fn(x, y, mx.array(lr, mx.float32), mx.array(step + 1, mx.float32))
    mx.eval(loss, norm, model.state, opt.state)       # one evaluation per step
    return loss.item(), {"lr": lr, "grad_norm": norm.item()}

# ----------------------------------------------------------------------------- checkpoints
# save (parameters and AdamW moments to stage 3's format) and the validation figures are MLX glue
# in spikelib/mlx_io.py; loading builds this stage's model.


def load(path):
    """(model, train dict, step, opt_state|None, config) from any stage's checkpoint."""
    params, mcfg, train, step, opt_state, config = ref.load_model(path)
    return build_model(mcfg, params), train, step, opt_state, config

# ----------------------------------------------------------------------------- generation


def generate(model, prompt_ids, max_new_tokens, rng, temperature=1.0, top_k=0, top_p=1.0):
    """Yield new token ids one at a time with the recurrent form (constant cost per token)."""
    state = model.init_state(1)
    for t in prompt_ids:
        logits, _, state = model(mx.array([[t]]), state)
    for _ in range(max_new_tokens):
        nxt = ref.sample_token(np.array(logits[0, 0]), rng, temperature, top_k, top_p)
        yield nxt
        logits, _, state = model(mx.array([[nxt]]), state)


def stream_text(tok, model, prompt, sc, out=None):
    """Sample sc.max_new_tokens after the prompt and print them as they come."""
    return stream_sample(tok, prompt, sc, partial(generate, model), out)

# ----------------------------------------------------------------------------- spikes and energy


def energy_report(model, x):
    """Spike rates per layer and site from the MLX forward, counted and reported as stage 3 does."""
    rates = spike_rates(model(mx.array(x, mx.int32))[1])
    return energy_summary(model.cfg, ref.synaptic_ops(model.cfg, rates), rates)

# ----------------------------------------------------------------------------- training loop


def train(mcfg, tcfg, data_dir, ckpt_path, resume=False):
    """Train from scratch or from any stage's checkpoint; spikelib.loop runs train_step with a
    progress bar, periodic evaluation and checkpoints, the time limit, the NaN guard and Ctrl-C."""
    _, tok, tok_info = ref.load_dataset_info(data_dir)
    train_data, val = ref.open_split(data_dir, "train"), ref.open_split(data_dir, "val")
    params, mcfg, step, opt_state = ref.start_params(mcfg, tcfg, ckpt_path, resume, tok_info)
    model = build_model(mcfg, params)                 # the same start as stage 3
    opt = AdamW(model, tcfg, opt_state)
    mx.eval(model.parameters(), opt.state)
    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    print(model_line(n_params, mcfg, len(train_data), len(val), f"MLX on {mx.default_device()}"))
    if mx.default_device().type == mx.cpu and blas_hint():
        print(blas_hint())

    def evaluate_now(done):
        report = partial(eval_report, model, val, max_tokens=tcfg.eval_tokens, decode=tok.decode)
        return print_evals(done, report, mcfg.context)

    def save_now(done):
        save(ckpt_path, model, opt, mcfg, tcfg, done, tok_info, data_dir)

    step_fn = make_train_step(model, opt, tcfg)

    def one_step(step):
        return train_step(model, opt, step_fn, mcfg, tcfg, train_data, step)

    run_steps(one_step, step, tcfg, tcfg.batch_size * mcfg.context, evaluate_now, save_now, ckpt_path)
    return model, tok

# ----------------------------------------------------------------------------- main


def build_parser():
    """Stage 3's command line (every config field, presets, sampling) plus --device."""
    ap = stage_parser(__doc__, PRESETS, ref.SampleConfig, ModelConfig, TrainConfig)
    ap.add_argument("--device", choices=("gpu", "cpu"), default=None,
                    help="MLX device (default: the GPU when MLX has one, e.g. Apple Silicon)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        sc = config_from_args(ref.SampleConfig, args)
        use_device(args.device)                       # --device gpu without a GPU: a ValueError
        mcfg, tcfg, ckpt = ref.run_configs(args, out_dir="out/mlx")
        if plot_only(args, ckpt):
            plot_checkpoint(ckpt)
            return 0
        if args.generate is not None:
            model, _, _, _, config = load(ckpt)
            stream_text(ref.load_tokenizer(config, ckpt), model, args.generate, sc)
            return 0
        data_dir = ref.prepare_dataset(tcfg.source, tcfg.data_root)
        model, tok = train(mcfg, tcfg, data_dir, ckpt, args.resume)
    except ref.ERRORS as err:
        return fail(err)
    except KeyboardInterrupt:
        return 130
    x, prompt = ref.summary_inputs(data_dir, model.cfg.context, tok)
    print_summary(energy_report(model, x)[0], lambda: stream_text(tok, model, prompt, sc), sc, ckpt)
    if args.plot:
        plot_checkpoint(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
