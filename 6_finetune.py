r"""Stage 6: question answering by fine-tuning the pretrained spiking LLM -- full, frozen layers, LoRA.

A model pretrained by stage 3 (or 4, 5: one checkpoint format) learns to answer extractive
questions whose answer is a span of a short context from its own corpus.

    1. Q&A pairs: a deterministic generator turns sentences of the stage 1 corpus into
       questions ("X is Y" definitions, what a function returns, versions, dates, places, who
       speaks a line, what follows three words), data/<name>/qa.jsonl, split by question, with
       --copy_questions N - 1 more copy questions per sentence for training, --fresh_copies a share
       of each batch drawn anew every step (nothing to learn by heart); or --qa FILE of your own, or
       --qa DIR: the pairs of another dataset's text (replay and BPC stay on the base's corpus).
    2. Prompts use the tokenizer's role tokens, <q> question \n context <a> answer <eos> (or context
       first, or the question before and after it); the loss is the cross-entropy of the answer
       tokens (and <eos>) only.
    3. Methods: full, freeze (embedding and the first k blocks fixed), lora (W + s B A on the
       projections, s = alpha / r: dB = s dW A^T, dA = s B^T dW, from any backend's dW; with
       --lora_tokens the rows of new tokens train in full too: dr_i = dE[i]; with the target norm
       every RMSNorm gain does: dd = dg).
    4. Backends (numpy, mlx, triton) only return gradients; the AdamW update is stage 3's. Answers and
       BPC are scored with stage 3's model, or with stage 5's for triton (a GPU's parallel prefill).
    5. Results: exact match and token F1 on held-out questions (--decode span keeps an answer a
       span of its context; free and majority decoding beside it: any tokens, <eos> the argmax or
       over half the probability), and the corpus BPC before and after.

    python 3_spike_llm_numpy.py                           # pretrain first: out/numpy/ckpt.npz
    python 6_finetune.py --method full                    # -> out/finetune/full.npz
    python 6_finetune.py --method full --resume 1         # continue it exactly after Ctrl-C
    python 6_finetune.py --method full --base out/finetune/full.npz --context_chars 256 \
        --out_dir out/finetune256                         # carry it on to longer contexts
    python 6_finetune.py --method lora --lora_rank 8      # -> out/finetune/lora.npz (adapters only)
    python 6_finetune.py --method lora --merge 1          # base + adapters -> lora_merged.npz
    python 6_finetune.py --method lora --ask "What does json.dumps return?"
"""
import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.checkpoint import data_ref, load_checkpoint, save_checkpoint, tokenizer_path  # noqa: E402
from spikelib.cli import add_config_options, fail, given_options, parse_bool, preset_configs  # noqa: E402
from spikelib.finetune_backends import TorchReader, mlx_backend, triton_backend  # noqa: E402
from spikelib.finetune_io import (EMBED_ROW, GAIN_DELTA, append_result, load_lora, normalize,  # noqa: E402, F401
                                  print_result, print_table, read_qa, save_lora, stable_hash)
from spikelib.loop import interrupts_between_steps, progress_fields  # noqa: E402
from spikelib.qa_data import fresh_drills, write_qa  # noqa: E402
from spikelib.report import print_stream  # noqa: E402
from spikelib.runs import load_tokenizer  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

S3 = load_stage("3_spike_llm_numpy")      # the reference model, optimizer, checkpoints, eval
SPECIAL_TOKENS = load_stage("2_tokenizer").SPECIAL_TOKENS   # <pad> <bos> <eos> <q> <a> ...: ids 0, 1, ...

# ----------------------------------------------------------------------------- config

METHODS = ("full", "freeze", "lora")
BACKENDS = ("numpy", "mlx", "triton")
DECODINGS = ("span", "free", "majority")
PROMPT_ORDERS = ("question_first", "context_first", "question_twice")
LORA_SITES = {w: f"attn.{w}" for w in ("wq", "wk", "wv", "wo")} | {w: f"mlp.{w}" for w in ("w1", "w2")}
LORA_TARGETS = (*LORA_SITES, "embed", "norm")   # embed: the token embedding (tied: the readout too);
                                                # norm: every RMSNorm gain, trained in full


@dataclass
class FinetuneConfig:
    base: str = "out/numpy/ckpt.npz"   # pretrained checkpoint of stage 3, 4 or 5 (stage 3's default output)
    out_dir: str = "out/finetune"      # where <method>.npz, lora.npz (adapters) and results.jsonl go
    qa: str = ""                   # your own Q&A file (JSONL or SQuAD JSON), or a dataset dir of stage 1
                                   # whose text gives the generated pairs (DIR/qa.jsonl); "" = the base's
                                   # corpus. Replay and BPC stay on the base's corpus
    method: str = "lora"           # what trains: full (every weight) | freeze (upper blocks) | lora
    backend: str = "numpy"         # gradients from numpy | mlx | triton (torch on a CPU); triton also scores
    freeze_layers: int = -1        # freeze: blocks 0..k-1 (and the embedding) fixed; -1 = half
    lora_rank: int = 8             # lora: rank r of the adapters B (in, r) and A (r, out)
    lora_alpha: float = 16.0       # lora: W_eff = W + s B A with scale s = alpha / rank
    lora_targets: str = "wq,wk,wv,wo,w1,w2"   # lora: the matrices of every block that get adapters;
                                              # embed adds the token embedding (the tied readout too),
                                              # norm trains every RMSNorm gain in full (d numbers each)
    lora_tokens: str = ""          # lora: special tokens whose embedding rows also train, in full, e.g.
                                   # <q>,<a>,<eos>: pretraining never read them, and a rank-r adapter
                                   # moves every row of the embedding along the same r directions
    max_steps: int = 300           # optimizer steps of fine-tuning (the schedule ends here)
    batch_size: int = 16           # Q&A pairs per step (GPU: 64+; spiking models need many pairs to learn)
    grad_accum: int = 1            # micro-batches per step: the same batch in 1/grad_accum of the memory
    lr: float = 0.0                # peak learning rate (AdamW); 0 = the method's default (METHOD_LR)
    min_lr: float = 0.0            # learning rate at the end of the cosine decay; 0 = lr / 10
    warmup: int = 20               # steps of linear warm-up
    weight_decay: float = 0.0      # AdamW decoupled weight decay on matrices
    grad_clip: float = 1.0         # clip the global gradient norm to this
    layer_lr_decay: float = 1.0    # < 1: lower learning rates for layers nearer the input
    seed: int = 0                  # LoRA initialization, the batches, fresh questions, replay windows
    save_interval: int = 500       # save the run's state (OUT_DIR/<method>.state.npz) every N steps and on
                                   # Ctrl-C or SIGTERM; 0 = on those only. A finished run deletes it
    resume: bool = False           # continue the stopped run of --method in OUT_DIR from its state,
                                   # exactly as if it had not stopped (the batches are drawn by step)
    max_len: int = 0               # longest prompt + answer in tokens (longer: skipped); 0 = max(128, ctx)
    max_questions: int = 20000     # generator: at most this many answerable pairs (a spread-out subset)
    test_fraction: float = 0.1     # generator: share of questions held out
    context_chars: int = 0         # generator: contexts widened to ~this many chars; 0 = 2 x context
    no_answer: float = 0.2         # generator: share of questions also asked of another text (no answer)
    copy_questions: int = 1        # generator: "What follows" questions per sentence; past the first,
                                   # training only, from sentences that hold no held-out question
    fresh_copies: float = 0.0      # share of each batch that is "What follows" questions drawn anew every
                                   # step (FreshDrills; generated pairs only): nothing to learn by heart
    prompt_order: str = "question_first"   # question_first: <q> question \n context <a> | context_first
                                           # | question_twice: <q> question \n context \n question <a>
    replay: float = 0.0            # corpus windows per Q&A pair in a batch (next-token loss): keeps the LM
    eval_questions: int = 400      # held-out questions scored (a fixed subset)
    max_answer_tokens: int = 24    # greedy decoding stops here if <eos> does not come first
    decode: str = "span"           # span: the answer is kept a span of the context (extractive); free: any
                                   # tokens, greedy; majority: any tokens, <eos> only when p(<eos>) > 1/2
    eval_tokens: int = 0           # validation tokens of the corpus for BPC; 0 = the whole validation split

    def __post_init__(self):
        """Check every option before any work starts; a bad one is a ValueError naming it."""
        for name, allowed in (("method", METHODS), ("backend", BACKENDS), ("decode", DECODINGS),
                              ("prompt_order", PROMPT_ORDERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not all(t in LORA_TARGETS for t in names_in(self.lora_targets)):
            raise ValueError(f"--lora_targets must be a comma-separated list of {', '.join(LORA_TARGETS)}, "
                             f"got {self.lora_targets!r}")
        if not all(t in SPECIAL_TOKENS for t in names_in(self.lora_tokens)):
            raise ValueError(f"--lora_tokens must be a comma-separated list of {', '.join(SPECIAL_TOKENS)}, "
                             f"got {self.lora_tokens!r}")
        for name, (allowed, words) in NUMBER_OPTIONS.items():
            if not allowed(getattr(self, name)):         # comparisons with NaN are false: refused too
                raise ValueError(f"--{name} must be {words}, got {getattr(self, name)}")
        if self.fresh_copies and Path(self.qa).is_file():
            raise ValueError("--fresh_copies draws questions from the text of the generated pairs, held out "
                             "as they are; it does not go with --qa FILE")
        if self.grad_accum > self.batch_size:
            raise ValueError(f"--grad_accum {self.grad_accum} is more micro-batches than --batch_size "
                             f"{self.batch_size} has pairs")


def at_least(low):
    return lambda v: v >= low


def names_in(option):
    """The names listed in a comma-separated option such as --lora_targets, blanks dropped."""
    return [t.strip() for t in option.split(",") if t.strip()]


# Each numeric option: the test of an allowed value, and the allowed values in words.
NUMBER_OPTIONS = {
    "freeze_layers": (at_least(-1), "-1 (half the blocks) or a number of blocks >= 0"),
    "lora_rank": (at_least(1), ">= 1"), "lora_alpha": (lambda v: v > 0, "> 0"),
    "max_steps": (at_least(1), ">= 1"), "batch_size": (at_least(1), ">= 1"),
    "grad_accum": (at_least(1), ">= 1"),
    "lr": (at_least(0), ">= 0 (0 = the method's default)"), "min_lr": (at_least(0), ">= 0 (0 = lr / 10)"),
    "warmup": (at_least(0), ">= 0"), "weight_decay": (at_least(0), ">= 0"),
    "grad_clip": (at_least(0), ">= 0 (0 = no clipping)"), "layer_lr_decay": (lambda v: v > 0, "> 0"),
    "max_len": (at_least(0), ">= 0 (0 = the model's context, at least 128)"),
    "max_questions": (at_least(1), ">= 1"), "context_chars": (at_least(0), ">= 0 (0 = 2 x the context)"),
    "no_answer": (lambda v: 0 <= v <= 1, "in [0, 1]"), "copy_questions": (at_least(1), ">= 1"),
    "replay": (at_least(0), ">= 0"), "fresh_copies": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (at_least(0), ">= 0 (numpy's generators take no negative seed)"),
    "save_interval": (at_least(0), ">= 0 (0 = on Ctrl-C or SIGTERM only)"),
    "test_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"), "eval_questions": (at_least(1), ">= 1"),
    "max_answer_tokens": (at_least(1), ">= 1"), "eval_tokens": (at_least(0), ">= 0"),
}

# The best of a sweep on `small` at batch 16 (README); at batch 64 with 6,000 steps full answers more at 3e-3.
METHOD_LR = {"full": 1e-3, "freeze": 1e-3, "lora": 1e-2}
PRESETS = {"default": {"finetune": {}},     # quick: a smoke run
           "quick": {"finetune": dict(max_steps=60, eval_questions=50, eval_tokens=2048)},
           "keep_lm": {"finetune": dict(replay=1.0)},     # corpus replay: BPC stays where it was (LoRA too)
           # the best measured recipe (README: 80.8% span, 74.2% free EM, BPC 1.920 -> 1.855; 8 minutes
           # on an H200) for a ternary base with the token shift, as bench_finetune.py's best command;
           # with two heads of 64 (--n_head 2 --decay_start 1 --decay_step 7) 85.0% and 79.5%
           "gpu": {"finetune": dict(method="full", backend="triton", batch_size=64, replay=0.5,
                                    fresh_copies=0.5, prompt_order="question_first", context_chars=128,
                                    max_steps=6000, lr=3e-3)}}


def resolved_lr(cfg):
    """(peak, final) learning rate: the method's default and a tenth of it unless given."""
    lr = cfg.lr or METHOD_LR[cfg.method]
    return lr, cfg.min_lr or lr / 10

# ----------------------------------------------------------------------------- prompts and the loss
# The questions come from spikelib/qa_data.py (write_qa): rules turn sentences of the corpus into
# extractive pairs ("X is Y" definitions, returns, versions, dates, places, speakers, next words),
# each answer a span of its context, some asked of another article's context with no answer ("").


def prompt_ids(tok, question, context="", order="question_first"):
    """<q> question \\n context <a> (question_first), <q> context \\n question <a> (context_first) or
    <q> question \\n context \\n question <a> (question_twice); the model writes the answer, then <eos>,
    or <eos> at once for no answer. A recurrent model reads its prompt once, left to right: told the
    question first, it knows what to keep while it reads the context; asked again at the end, the
    question sits next to the answer it cues."""
    parts = {"question_first": (question, context), "context_first": (context, question),
             "question_twice": (question, context, question) if context else (question,)}[order]
    text = "\n".join(t for t in parts if t)
    return [tok.token_id("<q>")] + tok.encode(text) + [tok.token_id("<a>")]


def encode_pair(tok, pair, order="question_first"):
    """(prompt ids, answer ids + <eos>). The answer starts with a space, as it does inside text;
    no answer ("") is <eos> alone. The 8 special ids of stage 2 are all taken, and a new one
    would move every byte id of existing tokenizers, so no-answer is spelled with <eos>."""
    prompt = prompt_ids(tok, pair["question"], pair.get("context", ""), order)
    return prompt, (tok.encode(" " + pair["answer"]) if pair["answer"] else []) + [tok.eos_id]


def make_batch(examples, pad_id, windows=0):
    """x, y (B, L) next-token pairs, right-padded, and the loss weights mask (B, L): 1 on every answer
    token and <eos>. Weighing each pair 1 / len(answer) instead would give a no-answer pair's lone
    <eos> the weight of a whole answer: at <a>, where the model cannot yet tell the two apart,
    p(<eos>) goes to about 1/2 and every answer comes out empty. The last `windows` examples are
    corpus windows for replay, (first token, the rest): each weighs as much as the mean Q&A pair,
    spread over its tokens, so replay x batch windows hold that share of the loss."""
    L = max(len(p) + len(a) for p, a in examples) - 1
    x = np.full((len(examples), L), pad_id, np.int64)
    y = np.full((len(examples), L), pad_id, np.int64)
    mask = np.zeros((len(examples), L))
    n_qa = len(examples) - windows
    per_pair = np.mean([len(a) for _, a in examples[:n_qa]]) if n_qa else 1.0
    for b, (p, a) in enumerate(examples):
        seq = p + a
        x[b, :len(seq) - 1], y[b, :len(seq) - 1] = seq[:-1], seq[1:]
        mask[b, len(p) - 1:len(seq) - 1] = 1.0 if b < n_qa else per_pair / len(a)   # y[t] = seq[t+1]
    return x, y, mask


def replay_windows(tokens, n, length, rng):
    """n random windows of length + 1 corpus tokens as (first token, rest) examples for make_batch."""
    starts = rng.integers(0, len(tokens) - length - 1, size=n)
    return [([int(tokens[i])], [int(t) for t in tokens[i + 1:i + length + 1]]) for i in starts]


def masked_cross_entropy(logits, y, mask):
    """loss = sum_i m_i (-log softmax(z_i)[y_i]) / sum_i m_i, m the weights of make_batch;
    dL/dz_i = m_i (softmax(z_i) - onehot(y_i)) / sum_i m_i."""
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    sumexp = e.sum(-1, keepdims=True)
    nll = np.log(sumexp[..., 0]) - np.take_along_axis(z, y[..., None], -1)[..., 0]
    n = float(mask.sum())          # a Python float: float32 logits keep float32 dlogits
    p = e / sumexp
    np.put_along_axis(p, y[..., None], np.take_along_axis(p, y[..., None], -1) - 1, -1)
    m = mask.astype(logits.dtype)
    return float((nll * m).sum() / n), p * (m / n)[..., None]

# ----------------------------------------------------------------------------- methods


def lora_names(params, targets):
    """The (in, out) matrices that get adapters, e.g. blocks.0.attn.wq for target "wq", and
    embed.weight (vocab, d) for "embed": full fine-tuning's answers need its change to the
    embedding (benchmarks/bench_lora_rank.py), which with tied weights is the readout as well."""
    wanted = names_in(targets)
    sites = [LORA_SITES[t] for t in wanted if t in LORA_SITES]
    names = [n for n in params if n.startswith("blocks.") and n.split(".", 2)[2] in sites]
    return names + (["embed.weight"] if "embed" in wanted else [])


def norm_names(params):
    """The RMSNorm gains g (d,) that the target "norm" trains in full: every block's norm1,
    attn.norm and norm2, and norm_f. The first three scale what a neuron reads (sn1, attn.sn_o, sn2)
    channel by channel: g_c x_c >= theta is x_c >= theta / g_c, a threshold of its own for each
    channel, which no low-rank change of the matrices gives."""
    return [n for n in params if "norm" in n]


def init_lora(params, names, rank, seed=0, token_ids=(), gains=()):
    """B (in, r) ~ N(0, 1/in), A (r, out) = 0, so W_eff = W + s B A starts equal to W.
    x @ B projects the input down to r channels, @ A brings it back up. Each token id also gets
    a row delta r_i (d,) = 0: E_eff[i] = E[i] + r_i trains that row in full; each gain in gains a
    delta d (d,) = 0: g_eff = g + d."""
    rng = np.random.default_rng(seed)
    lora = {}
    for n in names:
        d_in, d_out = params[n].shape
        lora[n + ".B"] = rng.normal(0.0, 1.0 / math.sqrt(d_in), (d_in, rank)).astype(params[n].dtype)
        lora[n + ".A"] = np.zeros((rank, d_out), params[n].dtype)
    embed = params["embed.weight"]                        # (V, D)
    for i in token_ids:
        lora[EMBED_ROW + str(i)] = np.zeros(embed.shape[1], embed.dtype)
    for n in gains:
        lora[n + GAIN_DELTA] = np.zeros_like(params[n])
    return lora


def token_rows(lora):
    """{token id: key} of the trained embedding rows among the adapters."""
    return {int(k[len(EMBED_ROW):]): k for k in lora if k.startswith(EMBED_ROW)}


def apply_lora(params, lora, scale):
    """Parameters with W_eff = W + s B A for every adapted W, g_eff = g + d for every trained gain
    and E_eff[i] = E[i] + r_i for every trained row (the others shared, not copied)."""
    out = dict(params)
    for key in lora:
        if key.endswith(".B"):
            n = key[:-2]
            out[n] = params[n] + scale * (lora[n + ".B"] @ lora[n + ".A"])
        elif key.endswith(GAIN_DELTA):
            n = key[:-len(GAIN_DELTA)]
            out[n] = params[n] + lora[key]
    rows = token_rows(lora)
    if rows:
        embed = out["embed.weight"].copy()               # (V, D): the base's own array stays as it was
        for i, key in rows.items():
            embed[i] += lora[key]
        out["embed.weight"] = embed
    return out


def lora_grads(grads, lora, scale):
    """Chain rule through W_eff = W + s B A:  dB = s dW_eff A^T,  dA = s B^T dW_eff;
    through g_eff = g + d:  dd = dg_eff;  through E_eff[i] = E[i] + r_i:  dr_i = dE_eff[i]."""
    out = {}
    for key in lora:
        if key.endswith(".B"):
            n = key[:-2]
            out[n + ".B"] = scale * (grads[n] @ lora[n + ".A"].T)
            out[n + ".A"] = scale * (lora[n + ".B"].T @ grads[n])
        elif key.endswith(GAIN_DELTA):
            out[key] = grads[key[:-len(GAIN_DELTA)]].copy()
    for i, key in token_rows(lora).items():
        out[key] = grads["embed.weight"][i].copy()
    return out


def frozen_names(params, k):
    """freeze: the embedding (tied to the readout) and blocks 0..k-1."""
    return [n for n in params
            if n == "embed.weight" or (n.startswith("blocks.") and int(n.split(".")[1]) < k)]


def trainable_params(params, cfg, mcfg):
    """The dict the optimizer updates: the model's own arrays (full, freeze) or new adapters (lora)."""
    if cfg.method == "full":
        return dict(params)
    if cfg.method == "freeze":
        k = mcfg.n_layer // 2 if cfg.freeze_layers < 0 else cfg.freeze_layers
        frozen = set(frozen_names(params, k))
        return {n: p for n, p in params.items() if n not in frozen}
    names = lora_names(params, cfg.lora_targets)
    gains = norm_names(params) if "norm" in names_in(cfg.lora_targets) else []
    if not names and not gains:
        raise ValueError(f"lora_targets={cfg.lora_targets!r} selects nothing to adapt; "
                         f"use names from {list(LORA_TARGETS)}")
    token_ids = [SPECIAL_TOKENS.index(t) for t in names_in(cfg.lora_tokens)]
    return init_lora(params, names, cfg.lora_rank, cfg.seed, token_ids, gains)

# ----------------------------------------------------------------------------- backends
# A backend turns (parameters, batch) into (masked loss, dL/dparam for every model parameter).
# mlx (stage 4) and triton (stage 5) wrap those stages' models: spikelib/finetune_backends.py.


def numpy_backend(mcfg):
    """Stage 3: forward, the masked loss's dlogits, the hand-written backward."""
    def grad_fn(params, x, y, mask):
        logits, cache = S3.forward(params, mcfg, x)
        loss, dlogits = masked_cross_entropy(logits, y, mask)
        return loss, S3.backward(params, mcfg, cache, dlogits)
    return grad_fn


BACKEND = {"numpy": numpy_backend, "mlx": mlx_backend, "triton": triton_backend}

# ----------------------------------------------------------------------------- training


def micro_grads(params, trainable, cfg, grad_fn, x, y, mask):
    """(loss, grads of the trainable set) of one micro-batch; LoRA maps the model's dW to dA, dB."""
    if cfg.method == "lora":
        scale = cfg.lora_alpha / cfg.lora_rank
        loss, grads = grad_fn(apply_lora(params, trainable, scale), x, y, mask)
        return loss, lora_grads(grads, trainable, scale)
    loss, grads = grad_fn(params, x, y, mask)
    return loss, {n: grads[n].astype(trainable[n].dtype) for n in trainable}


def accumulated_grads(params, trainable, cfg, grad_fn, x, y, mask):
    """The batch's loss and grads from cfg.grad_accum micro-batches of its rows. The loss is
    sum_i m_i nll_i / N over the batch (N = sum of all weights m); micro-batch k returns its own
    mean over N_k = sum of its weights, so loss = sum_k (N_k / N) loss_k and the same for the
    grads. Each micro-batch drops the columns after its last weighted token: the model is causal,
    so the positions before them are unchanged."""
    total = float(mask.sum())
    loss, grads = 0.0, {n: np.zeros_like(v) for n, v in trainable.items()}
    for rows in np.array_split(np.arange(len(x)), cfg.grad_accum):
        end = int(np.nonzero(mask[rows].any(0))[0][-1]) + 1            # last column with a weight, + 1
        xk, yk, mk = x[rows, :end], y[rows, :end], mask[rows, :end]
        loss_k, grads_k = micro_grads(params, trainable, cfg, grad_fn, xk, yk, mk)
        share = float(mk.sum()) / total                                 # N_k / N
        loss += share * loss_k
        for n in grads:
            grads[n] += share * grads_k[n]
    return loss, grads


def finetune(params, mcfg, cfg, train_examples, grad_fn, progress=True, corpus=None, fresh=None, state=None):
    """AdamW on the trainable set; returns (trainable dict, losses, seconds spent training, a stopped
    part included). full/freeze update params in place.
    With cfg.fresh_copies and fresh (rng -> one new encoded pair), that share of each batch is pairs
    never seen before. With cfg.replay and corpus (train split token ids), each batch also holds
    round(replay x batch) windows of the corpus, their loss the pretraining loss: the model keeps
    modelling language. With state (a path) the run is saved there every cfg.save_interval steps
    and on Ctrl-C or SIGTERM (after the step under way), and cfg.resume continues from it."""
    trainable = trainable_params(params, cfg, mcfg)
    lr, min_lr = resolved_lr(cfg)
    sched = S3.TrainConfig(lr=lr, min_lr=min_lr, warmup=cfg.warmup, max_steps=cfg.max_steps,
                           weight_decay=cfg.weight_decay, layer_lr_decay=cfg.layer_lr_decay)
    opt = S3.init_opt_state(trainable)
    start, losses, before = load_state(state, trainable, opt, cfg) if cfg.resume else (0, [], 0.0)
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=f"finetune {cfg.method}",
               dynamic_ncols=True, disable=not progress)
    n_fresh = round(cfg.fresh_copies * cfg.batch_size) if fresh else 0           # new pairs a batch
    n_win = round(cfg.replay * cfg.batch_size) if corpus is not None else 0       # corpus windows a batch
    t0 = time.time()
    with interrupts_between_steps() as stop:
        for step in bar:
            pick = S3.batch_rng(cfg.seed, step).integers(0, len(train_examples), cfg.batch_size - n_fresh)
            batch = [train_examples[i] for i in pick]
            if n_fresh:
                drill_rng = S3.batch_rng(cfg.seed + 2, step)
                batch += [fresh(drill_rng) for _ in range(n_fresh)]
            if n_win:
                batch += replay_windows(corpus, n_win, mcfg.context, S3.batch_rng(cfg.seed + 1, step))
            x, y, mask = make_batch(batch, pad_id=0, windows=n_win)
            loss, grads = accumulated_grads(params, trainable, cfg, grad_fn, x, y, mask)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; try a lower --lr")
            grads, norm = S3.clip_grads(grads, cfg.grad_clip)
            stats = {"lr": S3.adamw_step(trainable, grads, opt, step, sched, mcfg.n_layer), "grad_norm": norm}
            losses.append(float(loss))
            bar.set_postfix(progress_fields(loss, stats, (step + 1 - start) * x.size / (time.time() - t0)))
            done = step + 1
            due = cfg.save_interval and done % cfg.save_interval == 0 and done < cfg.max_steps
            if state and (due or stop.requested):
                save_state(state, trainable, opt, cfg, done, losses, before + time.time() - t0)
            if stop.requested:
                tqdm.write(f"interrupted: saved step {done} to {state}; continue with --resume 1" if state
                           else f"interrupted at step {done}")
                raise KeyboardInterrupt
    return trainable, losses, before + time.time() - t0


# What fine-tuning computes depends on every option but these (scoring, where files go, saving):
# a resumed run must have the same values of all the others.
NOT_TRAINING = ("out_dir", "backend", "save_interval", "resume", "eval_questions", "max_answer_tokens",
                "decode", "eval_tokens")


def training_fields(cfg):
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_TRAINING}


def state_path(cfg):
    return Path(cfg.out_dir) / f"{cfg.method}.state.npz"


def save_state(path, trainable, opt, cfg, done, losses, seconds):
    """The run after `done` steps: the trained arrays, AdamW's moments, the losses so far, the
    seconds spent training and the options that made them, in one checkpoint file written atomically."""
    config = {"finetune": training_fields(cfg), "step": done, "losses": losses, "seconds": seconds}
    save_checkpoint(path, trainable, config, opt)


def load_state(path, trainable, opt, cfg):
    """Put a saved run's arrays and moments in place (for full and freeze, into the model itself);
    returns (completed steps, losses so far, seconds so far). A state saved with other options is
    refused."""
    saved, config, moments = load_checkpoint(path, {n: v.shape for n, v in trainable.items()})
    was = config.get("finetune", {})
    for name, value in training_fields(cfg).items():
        if was.get(name) != value:
            raise ValueError(f"--resume: {path} was saved with --{name} {was.get(name)!r}, not {value!r}; "
                             f"a resumed run keeps its options (or delete the file to start anew)")
    if moments is None:
        raise ValueError(f"--resume: {path} holds no optimizer moments; delete it to start anew")
    for n, v in trainable.items():
        v[...] = saved[n]
        opt["m"][n][...], opt["v"][n][...] = moments["m"][n], moments["v"][n]
    return config["step"], config["losses"], config["seconds"]

# ----------------------------------------------------------------------------- evaluation


def logsumexp(z):
    """log sum_i exp(z_i), computed without overflow."""
    return z.max() + np.log(np.exp(z - z.max()).sum())


def pick_token(logits, source, nexts, eos_id, started, majority=False):
    """The greedy next token: the argmax (source None), or extractive decoding, which keeps the
    answer a span of source.

    nexts holds every position k where the answer so far ends in source (answer = source[k-j:k]);
    the answer may go on with source[k] for those k. An extractive reader points at a start and an
    end in its context; this lets the language model do the same with its own distribution. The
    start is the best token of the source. After that the answer ends when p(<eos>) > 1/2, i.e.
    z_eos > logsumexp(z without eos), or when no continuation is left; else it goes on with the
    best continuation. Comparing p(<eos>) with one continuation token, as a plain argmax does,
    stops too early whenever a small model is unsure which word comes next: its "go on" mass is
    spread over many words. Before the start, <eos> (no answer) wins when p(<eos>) beats the
    probability of starting any span, z_eos > logsumexp(z of the source's tokens), as a SQuAD 2.0
    reader weighs the null score against the spans: against the single best start, <eos> would win
    whenever the model is unsure where the answer starts. Returns (token, the positions after it).

    majority (source None) is free decoding with that end rule everywhere: any token may come, and
    <eos> (the end, or no answer at the start) only when p(<eos>) > 1/2; else the best other token.
    It differs from span decoding only in not keeping the answer in the context."""
    if not source and not majority:
        return int(logits.argmax()), None
    if not source:
        if logits[eos_id] > logsumexp(np.delete(logits, eos_id)):
            return eos_id, None
        others = logits.copy()
        others[eos_id] = -np.inf                                     # the best token that is not <eos>
        return int(others.argmax()), None
    cont = sorted({source[k] for k in nexts if k < len(source)})
    rest = np.delete(logits, eos_id) if started else logits[cont]      # go on: any token; start: a span
    if not cont or logits[eos_id] > logsumexp(rest):
        return eos_id, []
    token = cont[int(np.argmax(logits[cont]))]
    return token, [k + 1 for k in nexts if k < len(source) and source[k] == token]


class NumpyReader:
    """Stage 3's recurrent form, forward only, for scoring (backends numpy and mlx): start(B) is a zero
    state, read(state, ids (B, L)) feeds the L positions one decode_step each and returns the
    next-token logits after the last, (B, V). TorchReader (spikelib/finetune_backends.py) is stage 5's."""

    def __init__(self, params, mcfg):
        self.params, self.mcfg = params, mcfg

    def start(self, batch):
        return S3.init_decode_state(self.mcfg, batch, self.params["embed.weight"].dtype)

    def read(self, state, ids):
        for t in range(ids.shape[1]):
            logits = S3.decode_step(self.params, self.mcfg, state, ids[:, t])      # (B, V)
        return logits

    def eval_report(self, val, max_tokens, decode):
        """Stage 3's validation figures of the first max_tokens tokens of val (the parallel form)."""
        return S3.eval_report(self.params, self.mcfg, val, self.mcfg.context, max_tokens, decode)


READER = {"numpy": NumpyReader, "mlx": NumpyReader, "triton": TorchReader}    # scoring, per backend


def span_source(tok, context):
    """The tokens a span-decoded answer is kept a span of: the context's words, one space before each,
    as an answer is trained (" " + answer). A word that starts a line, or the context, is encoded
    without a space ("ELBOW:" after a line break, a speaker's name in a play), and the trained form of
    that answer would be no span of the context's own tokens. The model still reads the context as
    it is; only the set of allowed spans changes."""
    return tok.encode(" " + " ".join(context.split()))


def greedy_answers(params, mcfg, prompts, eos_id, max_new=24, batch=64, sources=None, reader=NumpyReader,
                   majority=False):
    """Greedy answers for many prompts at once: each sequence reads its own prompt, then feeds back its
    choice until <eos>; sequences of different lengths share the steps. Batches hold prompts of
    similar lengths (sorted; answers come back in the order given) and read the m tokens every
    prompt of the batch has in one call, a parallel prefill for stage 5, then go a position at a time.
    sources[i] (token ids, or None = free decoding) keeps answer i a span of it (pick_token);
    majority: free answers end only when p(<eos>) > 1/2."""
    model = reader(params, mcfg)                                     # forward only
    sources = sources or [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        group, srcs = [prompts[i] for i in rows], [sources[i] for i in rows]
        m = len(group[0])                                             # the batch's shortest prompt
        state = model.start(len(group))
        logits = model.read(state, np.array([p[:m] for p in group]))  # (B, V): what follows token m - 1
        out, done = [[] for _ in group], [False] * len(group)
        nexts = [range(len(src)) if src else None for src in srcs]   # every start is open
        cur = [0] * len(group)                                        # each row sets its own at pos m - 1
        for pos in range(m - 1, len(group[-1]) + max_new):            # logits follow token pos; longest last
            for b, p in enumerate(group):
                if pos + 1 < len(p):                                  # still reading its prompt
                    cur[b] = p[pos + 1]
                elif not done[b]:
                    nxt, nexts[b] = pick_token(logits[b], srcs[b], nexts[b], eos_id, bool(out[b]), majority)
                    done[b] = nxt == eos_id or len(out[b]) >= max_new
                    if not done[b]:
                        out[b].append(nxt)
                    cur[b] = nxt                                      # done rows feed anything
            if all(done):
                break
            logits = model.read(state, np.array(cur)[:, None])        # (B, 1) -> (B, V)
        for i, answer in zip(rows, out):
            answers[i] = answer
    return answers


def stream_answer(params, mcfg, prompt, eos_id, max_new, source=None, reader=NumpyReader, majority=False):
    """One prompt's greedy answer, a token at a time (for printing as it comes), ending before <eos>;
    kept a span of source when one is given, or free with majority's end rule (pick_token)."""
    model = reader(params, mcfg)
    state = model.start(1)
    logits = model.read(state, np.array([prompt]))[0]              # (V,): what follows the prompt
    nexts = range(len(source)) if source else None
    for j in range(max_new):
        cur, nexts = pick_token(logits, source, nexts, eos_id, j > 0, majority)
        if cur == eos_id:
            return
        yield cur
        if j + 1 < max_new:                                         # no read after the last token
            logits = model.read(state, np.array([[cur]]))[0]


def token_f1(pred, gold):
    """Harmonic mean of word precision and recall (words counted with multiplicity)."""
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if not p or not g or common == 0:
        return float(p == g)
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def golds(pair):
    """The gold answers of a pair: all of SQuAD's, else its one; [""] for no answer."""
    return pair.get("answers") or [pair["answer"]]


def exact(pred, pair):
    """SQuAD 2.0 exact match: 1 if the normalized prediction equals any gold; "" only matches ""."""
    return float(any(normalize(pred) == normalize(g) for g in golds(pair)))


def standard_error(p, n):
    """sqrt(p (1 - p) / n): one standard error of a rate p measured on n questions."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def qa_scores(params, mcfg, tok, pairs, max_new=24, decode="free", order="question_first",
              reader=NumpyReader):
    """SQuAD 2.0 scores of greedy answers: exact match (with its standard error) and F1 (the best
    over the gold answers), also on the answerable (has) and unanswerable (none) questions, and
    the answers. decode="span" keeps the answer to a question with a context a span of it, "majority"
    ends a free answer only when p(<eos>) > 1/2 (pick_token); reader: the forward-only model (READER)."""
    if not pairs:
        return {"em": float("nan"), "f1": float("nan"), "n": 0, "answers": []}
    prompts = [prompt_ids(tok, p["question"], p.get("context", ""), order) for p in pairs]
    spans = decode == "span"
    sources = [span_source(tok, p["context"]) if spans and p.get("context") else None for p in pairs]
    ids = greedy_answers(params, mcfg, prompts, tok.eos_id, max_new, sources=sources, reader=reader,
                         majority=decode == "majority")
    answers = [tok.decode(a, skip_special=True).strip() for a in ids]
    em = np.array([exact(a, p) for a, p in zip(answers, pairs)])
    f1 = np.array([max(token_f1(a, g) for g in golds(p)) for a, p in zip(answers, pairs)])
    none = np.array([not p["answer"] for p in pairs])
    out = {"em": float(em.mean()), "f1": float(f1.mean()), "n": len(pairs), "answers": answers,
           "em_se": standard_error(em.mean(), len(pairs))}
    for name, rows in (("has", ~none), ("none", none)):
        nan = float("nan")
        out |= {f"em_{name}": float(em[rows].mean()) if rows.any() else nan,
                f"f1_{name}": float(f1[rows].mean()) if rows.any() else nan, f"n_{name}": int(rows.sum())}
    return out


def matches_by_kind(pairs, answers):
    """{kind: [exact matches, questions]}: which rules of the generator the model has learned."""
    hits = {}
    for p, a in zip(pairs, answers):
        hits.setdefault(p.get("kind", "-"), []).append(exact(a, p))
    return {kind: [int(sum(h)), len(h)] for kind, h in sorted(hits.items())}


def val_bpc(params, mcfg, tok, data_dir, eval_tokens, reader=NumpyReader):
    """Bits per character on the corpus's validation split: its first eval_tokens, or all of it
    (eval_tokens 0); NaN without one. The reader's parallel form scores it (stage 5's on a GPU)."""
    if not data_dir or not (Path(data_dir) / "val.bin").exists():
        return float("nan")
    val = S3.open_split(data_dir, "val")
    report = reader(params, mcfg).eval_report(val, eval_tokens or len(val), tok.decode)
    return report["bpc"] if report else float("nan")

# ----------------------------------------------------------------------------- files


def load_base(path):
    """(params, ModelConfig, config, tokenizer) of the pretrained checkpoint, with a clear message
    and the command to make one when it is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no pretrained checkpoint at {path}; pretrain one first "
                                f"(python 3_spike_llm_numpy.py --preset small --ckpt {path}) "
                                "or point --base at a checkpoint of stage 3, 4 or 5")
    params, mcfg, _, _, _, config = S3.load_model(path)
    return params, mcfg, config, load_tokenizer(config, path)


def save_finetuned(path, params, mcfg, config, cfg):
    """The same checkpoint format as every stage: the base's config plus a "finetune" record, its
    dataset folder recorded anew from this file's folder (data_ref), so it finds its tokenizer."""
    doc = dict(config, model=asdict(mcfg), finetune=asdict(cfg))
    doc.pop("format", None), doc.pop("version", None)
    doc["data"] = data_ref(tokenizer_path(config, cfg.base).parent, path)
    return save_checkpoint(path, params, doc)


def qa_text_dir(cfg, config):
    """The dataset whose text gives the generated pairs: --qa DIR, else the base model's corpus."""
    return cfg.qa or config.get("data", {}).get("dir", "")


def qa_pairs(cfg, config, mcfg):
    """The user's Q&A file (validated) or the generated pairs of a dataset's text (qa_text_dir). The
    replay and BPC stay on the base's corpus either way: the language model kept is the base's."""
    if cfg.qa and not Path(cfg.qa).is_dir():
        return read_qa(cfg.qa, cfg.test_fraction), cfg.qa
    data_dir = qa_text_dir(cfg, config)
    if not data_dir or not (Path(data_dir) / "train.txt").exists():
        where = f"--qa {data_dir}" if cfg.qa else f"the base checkpoint's corpus ({data_dir!r})"
        raise FileNotFoundError(f"{where} has no train.txt; pass --qa FILE or a dataset dir of stage 1")
    path, pairs = write_qa(data_dir, cfg, mcfg.context)
    return pairs, str(path)

# ----------------------------------------------------------------------------- main


def split_pairs(cfg, tok, pairs, source, max_len):
    """(train examples, held-out pairs scored, train pairs scored) among the pairs that fit max_len;
    the scored ones are a fixed subset spread over the corpus and the kinds (by hash). The held-out
    ones are the same in every --prompt_order: they are the ones that fit with the question first
    (question_twice's longer prompts are read whole all the same)."""
    encoded = [(p, encode_pair(tok, p, cfg.prompt_order)) for p in pairs]
    fits = [(p, e) for p, e in encoded if len(e[0]) + len(e[1]) <= max_len]
    train = [e for p, e in fits if p["split"] == "train"]
    held_out = [p for p in pairs if p["split"] == "test" and sum(map(len, encode_pair(tok, p))) <= max_len]

    def scored(chosen):
        chosen = sorted(chosen, key=lambda p: stable_hash(p["question"] + p.get("context", "")))
        return chosen[:cfg.eval_questions]
    test, train_eval = scored(held_out), scored([p for p, e in fits if p["split"] == "train"])
    if not train or not test:
        raise ValueError(f"{source}: {len(train)} train and {len(test)} test pairs fit "
                         f"max_len={max_len}; need both")
    print(f"Q&A: {len(pairs)} pairs from {source}; {len(train)} train, {len(test)} held out scored "
          f"({len(encoded) - len(fits)} longer than {max_len} tokens skipped)")
    return train, test, train_eval


def fresh_pairs(cfg, data_dir, mcfg, tok, max_len):
    """rng -> one encoded "What follows" pair drawn anew that fits max_len (--fresh_copies)."""
    drills = fresh_drills(data_dir, cfg, mcfg.context)

    def draw(rng):
        for _ in range(100):
            prompt, answer = encode_pair(tok, drills.draw(rng), cfg.prompt_order)
            if len(prompt) + len(answer) <= max_len:
                return prompt, answer
        raise ValueError(f"100 fresh copy questions in a row are longer than max_len={max_len} tokens; "
                         "raise --max_len or lower --context_chars")
    draw(np.random.default_rng(cfg.seed))          # a setting that cannot work fails before training
    return draw


def memory_note(mcfg, examples):
    """A warning line when the median prompt is longer than the model's memory. The slowest head
    decays as gamma = 1 - 2^-a, a = decay_start + decay_step (H - 1), and gamma^(2^a) ~ 1/e: a token
    2^a positions back keeps about a third of its weight, one 4 x 2^a back about 2%. With the
    question first, the question must survive the whole context to reach <a>."""
    memory = 2 ** (mcfg.decay_start + mcfg.decay_step * (mcfg.n_head - 1))
    median = float(np.median([len(prompt) for prompt, _ in examples]))
    if median > memory:
        print(f"note: the median prompt is {median:.0f} tokens, but this model's slowest attention head "
              f"remembers about {memory:.0f} positions; shorter contexts (--context_chars) or a base "
              f"with slower decays (stage 3's --decay_step) let it see question and context together")


def run(cfg, progress=True):
    """Fine-tune the base with cfg.method, evaluate before and after, write the outputs; a results dict."""
    state = state_path(cfg)
    if cfg.resume and not state.is_file():
        raise ValueError(f"--resume 1: no stopped run to continue at {state}; start one without --resume")
    if not cfg.resume and state.is_file():
        raise ValueError(f"{state} holds a stopped run: continue it with --resume 1, or delete the file to "
                         "start anew")
    params, mcfg, config, tok = load_base(cfg.base)
    pairs, source = qa_pairs(cfg, config, mcfg)
    data_dir = config.get("data", {}).get("dir", "")
    max_len = cfg.max_len or max(128, mcfg.context)
    train, test, train_eval = split_pairs(cfg, tok, pairs, source, max_len)
    memory_note(mcfg, train)
    fresh = fresh_pairs(cfg, qa_text_dir(cfg, config), mcfg, tok, max_len) if cfg.fresh_copies else None
    corpus = S3.open_split(data_dir, "train") if cfg.replay and data_dir else None
    if cfg.replay and (corpus is None or len(corpus) < mcfg.context + 2):
        raise ValueError(f"--replay {cfg.replay} needs the base's corpus train split ({data_dir!r})")

    reader = READER[cfg.backend]                  # every scoring pass: the backend's forward-only model

    def score(p, questions, decode=cfg.decode):
        return qa_scores(p, mcfg, tok, questions, cfg.max_answer_tokens, decode, cfg.prompt_order, reader)

    def bpc(p):
        return val_bpc(p, mcfg, tok, data_dir, cfg.eval_tokens, reader)

    n_total = sum(p.size for p in params.values())
    bpc_before = bpc(params)
    before = score(params, test)
    print(f"before: held-out EM {100 * before['em']:.1f}%, F1 {100 * before['f1']:.1f}%, "
          f"val BPC {bpc_before:.3f}")
    grad_fn = BACKEND[cfg.backend](mcfg)
    trainable, losses, seconds = finetune(params, mcfg, cfg, train, grad_fn, progress, corpus, fresh, state)
    if cfg.method == "lora":       # the adapters alone are saved
        tuned = apply_lora(params, trainable, cfg.lora_alpha / cfg.lora_rank)
        saved = save_lora(Path(cfg.out_dir) / "lora.npz", trainable, cfg, cfg.base)
    else:
        tuned = params
        saved = save_finetuned(Path(cfg.out_dir) / f"{cfg.method}.npz", params, mcfg, config, cfg)
    state.unlink(missing_ok=True)              # finished: the outputs replace the stopped run's state
    n_trained = sum(p.size for p in trainable.values())
    decoded = {d: score(tuned, test, d) for d in DECODINGS}
    after, free = decoded[cfg.decode], decoded["free"]
    # The answerable held-out questions that have a context, without it: what is recalled
    # (generated questions come from the pretraining corpus), not read. Free decoding: no span.
    blind = [dict(p, context="") for p in test if p["answer"] and p.get("context")]
    blind_em = score(tuned, blind, "free")["em"] if blind else 0.0
    keep = ("em", "f1", "em_se", "em_has", "f1_has", "n_has", "em_none", "f1_none", "n_none")
    result = {"method": cfg.method, "backend": cfg.backend, "qa": source, "trained": int(n_trained),
              "fraction": n_trained / n_total, "seconds": seconds, "steps": cfg.max_steps,
              "replay": cfg.replay, "fresh_copies": cfg.fresh_copies, "prompt_order": cfg.prompt_order,
              "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])), "decode": cfg.decode,
              "em_before": before["em"], "em_test": after["em"], "f1_test": after["f1"],
              "em_test_free": free["em"], "f1_test_free": free["f1"],
              "em_blind": blind_em, "n_blind": len(blind),
              "em_train": score(tuned, train_eval)["em"], "n_test": after["n"],
              "bpc_before": bpc_before, "bpc_after": bpc(tuned),
              "output": str(saved), "em_by_kind": matches_by_kind(test, after["answers"]),
              "em_by_kind_free": matches_by_kind(test, free["answers"]),
              "em_by_kind_majority": matches_by_kind(test, decoded["majority"]["answers"]),
              "scores": {d: {k: r[k] for k in keep} for d, r in decoded.items()}}
    print_result(result, test, after["answers"])
    append_result(Path(cfg.out_dir) / "results.jsonl", result)
    return result


def merge(cfg, adapters):
    """Fold adapters into the base weights: a full checkpoint any stage can load."""
    params, mcfg, config, _ = load_base(cfg.base)
    lora, scale = load_lora(adapters, params)
    path = Path(cfg.out_dir) / "lora_merged.npz"
    save_finetuned(path, apply_lora(params, lora, scale), mcfg, config, cfg)
    n_gains = sum(k.endswith(GAIN_DELTA) for k in lora)
    print(f"merged {sum(k.endswith('.B') for k in lora)} adapters (s = {scale:g}), {len(token_rows(lora))} "
          f"embedding rows and {n_gains} norm gains into {path}")
    return path


def ask(cfg, question, context="", ckpt=None, adapters=None, out=None):
    """Answer one question greedily, printing each piece of the answer as it is decoded."""
    base = ckpt or (cfg.base if cfg.method == "lora" else str(Path(cfg.out_dir) / f"{cfg.method}.npz"))
    params, mcfg, _, tok = load_base(base)
    if not adapters and cfg.method == "lora" and not ckpt:
        adapters = str(Path(cfg.out_dir) / "lora.npz")
    if adapters:
        lora, scale = load_lora(adapters, params)
        params = apply_lora(params, lora, scale)
    ids = prompt_ids(tok, question, context, cfg.prompt_order)
    source = span_source(tok, context) if context and cfg.decode == "span" else None
    answer = stream_answer(params, mcfg, ids, tok.eos_id, cfg.max_answer_tokens, source, READER[cfg.backend],
                           cfg.decode == "majority")
    return print_stream(tok, "", [], answer, out).strip()


def generate_only(cfg):
    """Write the Q&A file of the base's corpus (or check --qa) and count its pairs by kind."""
    _, mcfg, config, _ = load_base(cfg.base)
    pairs, path = qa_pairs(cfg, config, mcfg)
    kinds = {k: sum(p.get("kind") == k for p in pairs) for k in sorted({p.get("kind") for p in pairs})}
    print(f"{path}: {len(pairs)} pairs, {sum(p['split'] == 'test' for p in pairs)} held out; kinds {kinds}")


def build_parser():
    """--help lists every field of FinetuneConfig, explained by its comment above; see spikelib.cli."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=list(PRESETS),
                    help="a named schedule (quick: a smoke run; keep_lm: replay 1.0; gpu: the best measured "
                         "recipe, full fine-tuning on a GPU); the options below change fields of it")
    ap.add_argument("--ask", metavar="QUESTION", help="only answer QUESTION, streaming (default: fine-tune)")
    ap.add_argument("--context", default="", help="with --ask: a passage holding the answer (default: none)")
    ap.add_argument("--ckpt", help="with --ask: a full checkpoint to answer with (default: from --method)")
    ap.add_argument("--adapters", help="LoRA adapter file for --ask and --merge (default: OUT_DIR/lora.npz)")
    ap.add_argument("--merge", type=parse_bool, default=False, metavar="0|1",
                    help="only fold the adapters into the base, writing OUT_DIR/lora_merged.npz (default 0)")
    ap.add_argument("--generate_only", type=parse_bool, default=False, metavar="0|1",
                    help="only write the generated data/<name>/qa.jsonl and count it (default 0)")
    add_config_options(ap, FinetuneConfig, "fine-tuning (FinetuneConfig)", PRESETS, "finetune")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        overrides = given_options(args, FinetuneConfig)
        cfg = preset_configs(PRESETS, args.preset, overrides, finetune=FinetuneConfig)[0]
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if args.ask is not None:
            ask(cfg, args.ask, args.context, args.ckpt, args.adapters)
        elif args.merge:
            merge(cfg, args.adapters or str(Path(cfg.out_dir) / "lora.npz"))
        elif args.generate_only:
            generate_only(cfg)
        else:
            run(cfg)
    except S3.ERRORS as err:        # ValueError (CheckpointError too), OSError, FloatingPointError
        return fail(err)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
