"""Stage 6: question answering by fine-tuning the pretrained spiking LLM -- full, frozen layers, LoRA.

A model pretrained by stage 3 (or 4, 5: one checkpoint format) is taught to answer extractive
questions: the answer is a span of a short context from the corpus it was trained on.

    1. Q&A pairs. A deterministic generator reads the stage 1 corpus, splits it into documents
       and sections and turns suitable sentences into questions ("X is Y" definitions, what a
       function returns, the version a feature was added in, dates, places, who speaks a line
       in a play), writing data/<name>/qa.jsonl with a fixed train/test split by question.
       Or bring your own JSONL with --qa FILE: {"question", "answer", "context"?} per line.
    2. Prompts use the tokenizer's role tokens:  <q> context \\n question <a> answer <eos>
       and the loss is the cross-entropy of the answer tokens (and <eos>) only.
    3. Methods: full (every parameter), freeze (embedding and the first k blocks fixed),
       lora (W_eff = W + s B A on the attention and MLP projections, s = alpha / r; only
       B and A train: dB = s dW_eff A^T, dA = s B^T dW_eff, from any backend's dW_eff).
    4. Backends: numpy (stage 3's hand backward), mlx (stage 4), triton (stage 5); each only
       returns the gradients of the loss, the update (AdamW) is stage 3's.
    5. Results: exact match and token F1 of greedy answers on held-out questions, and the
       validation bits per character on the original corpus before and after (forgetting).
       --decode span (default) keeps each answer a span of its context, as an extractive
       reader's start and end pointers do; free decoding is reported beside it.

    python 3_spike_llm_numpy.py                           # pretrain first: out/numpy/ckpt.npz
    python 6_finetune.py --method full                    # -> out/finetune/full.npz
    python 6_finetune.py --method lora --lora_rank 8      # -> out/finetune/lora.npz (adapters only)
    python 6_finetune.py --method lora --merge 1          # base + adapters -> lora_merged.npz
    python 6_finetune.py --method lora --ask "What does json.dumps return?"
"""
import argparse
import hashlib
import json
import math
import re
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.checkpoint import CheckpointError, data_ref, save_checkpoint, tokenizer_path  # noqa: E402
from spikelib.files import atomic_write  # noqa: E402
from spikelib.report import print_stream  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

S3 = load_stage("3_spike_llm_numpy")      # the reference model, optimizer, checkpoints, eval

# ----------------------------------------------------------------------------- config

METHODS = ("full", "freeze", "lora")
BACKENDS = ("numpy", "mlx", "triton")
DECODINGS = ("span", "free")
LORA_SITES = {"wq": "attn.wq", "wk": "attn.wk", "wv": "attn.wv", "wo": "attn.wo", "w1": "mlp.w1", "w2": "mlp.w2"}


@dataclass
class FinetuneConfig:
    base: str = "out/numpy/ckpt.npz"   # pretrained checkpoint (stage 3's default output)
    out_dir: str = "out/finetune"      # <method>.npz, lora.npz (adapters), results.jsonl
    qa: str = ""                   # your own JSONL; "" = generate data/<name>/qa.jsonl from the corpus
    method: str = "lora"           # full | freeze | lora
    backend: str = "numpy"         # numpy | mlx | triton (triton falls back to torch kernels on CPU)
    freeze_layers: int = -1        # freeze: blocks 0..k-1 (and the embedding) fixed; -1 = half
    lora_rank: int = 8
    lora_alpha: float = 16.0       # scale s = alpha / rank
    lora_targets: str = "wq,wk,wv,wo,w1,w2"
    max_steps: int = 300
    batch_size: int = 16
    lr: float = 0.0                # 0 = the method's default (METHOD_LR)
    min_lr: float = 0.0            # 0 = lr / 10
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    layer_lr_decay: float = 1.0    # stage 3's AdamW reads it
    seed: int = 0
    max_len: int = 128             # longest prompt + answer in tokens; longer pairs are skipped
    max_questions: int = 4000      # generator: at most this many pairs (a fixed, spread-out subset)
    test_fraction: float = 0.1     # generator: share of questions held out
    eval_questions: int = 200      # held-out questions scored (the first n, fixed)
    max_answer_tokens: int = 24    # greedy decoding stops here if <eos> does not come first
    decode: str = "span"           # span: the answer is kept a span of the context (extractive); free: any tokens
    eval_tokens: int = 8192        # validation tokens of the corpus for BPC

    def __post_init__(self):
        """Check every option before any work starts; a bad one is a ValueError naming it."""
        for name, allowed in (("method", METHODS), ("backend", BACKENDS), ("decode", DECODINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        targets = [t.strip() for t in self.lora_targets.split(",")]
        if not all(t in LORA_SITES for t in targets):
            raise ValueError(f"--lora_targets must be a comma-separated list of {', '.join(LORA_SITES)}, "
                             f"got {self.lora_targets!r}")
        for name, (allowed, words) in NUMBER_OPTIONS.items():
            if not allowed(getattr(self, name)):         # comparisons with NaN are false: refused too
                raise ValueError(f"--{name} must be {words}, got {getattr(self, name)}")


def at_least(low):
    return lambda v: v >= low


# Each numeric option: the test of an allowed value, and the allowed values in words.
NUMBER_OPTIONS = {
    "freeze_layers": (at_least(-1), "-1 (half the blocks) or a number of blocks >= 0"),
    "lora_rank": (at_least(1), ">= 1"), "lora_alpha": (lambda v: v > 0, "> 0"),
    "max_steps": (at_least(1), ">= 1"), "batch_size": (at_least(1), ">= 1"),
    "lr": (at_least(0), ">= 0 (0 = the method's default)"), "min_lr": (at_least(0), ">= 0 (0 = lr / 10)"),
    "warmup": (at_least(0), ">= 0"), "weight_decay": (at_least(0), ">= 0"),
    "grad_clip": (at_least(0), ">= 0 (0 = no clipping)"), "layer_lr_decay": (lambda v: v > 0, "> 0"),
    "max_len": (at_least(1), ">= 1"), "max_questions": (at_least(1), ">= 1"),
    "test_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"), "eval_questions": (at_least(1), ">= 1"),
    "max_answer_tokens": (at_least(1), ">= 1"), "eval_tokens": (at_least(0), ">= 0"),
}

METHOD_LR = {"full": 1e-3, "freeze": 1e-3, "lora": 1e-2}     # the best of a sweep on `small` (README)
PRESETS = {
    "default": {},
    "quick": {"max_steps": 60, "eval_questions": 50, "eval_tokens": 2048},   # a smoke run in a minute
}


def resolved_lr(cfg):
    lr = cfg.lr or METHOD_LR[cfg.method]
    return lr, cfg.min_lr or lr / 10

# ----------------------------------------------------------------------------- Q&A generation

WORD = re.compile(r"\S+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
DOTTED_NAME = re.compile(r"^(?:class )?([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)$")
UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{1,30}):$")
NOT_SUBJECTS = {"this", "it", "there", "that", "which", "he", "she", "they", "these", "those", "what", "here", "its",
                "one", "each", "such", "all", "both", "some", "any", "none", "if", "when", "while", "since", "because",
                "although", "unless", "otherwise", "so", "but", "and", "or", "as", "where", "whether", "once", "then"}
DEFINITION = re.compile(r"^((?:The |An? )?[\"\w.()]+(?: [\"\w.()-]+){0,3}) (is|are|was|were) "
                        r"((?:an?|the) [^,;:()]+?)(?:[,;:(]| and | which | that |\.$|$)")
RETURNS = re.compile(r"^Returns? (.+?)\.?$")
VERSION = re.compile(r"\b(?:New|Added) in version (\d+\.\d+)")
BORN = re.compile(r"^([A-Z][\w.'-]+(?: [A-Z][\w.'-]+){0,3})\b[^.]*? was born (?:on |in )?([^,.;()]+)")
PLACE = re.compile(r"^([A-Z]\w+(?: [A-Z]\w+){0,2}) is an? (?:city|town|village|country|region|river|island) "
                   r"in ([A-Z][\w]+(?: [A-Z]\w+){0,2})")
YEAR = re.compile(r"^In (\d{3,4}), ([^.]{10,120})\.$")


def sentences(paragraph):
    """A paragraph's sentences, lines joined: a sentence ends at . ! ? before a capital."""
    return [s.strip() for s in SENTENCE_END.split(" ".join(paragraph.split())) if s.strip()]


def short_span(text, max_words=8):
    """text if it has 1..max_words words (answers are short so exact match is meaningful)."""
    text = text.strip().rstrip(".")
    if re.search(r"\b(?:e\.g|i\.e|etc)\b", text):      # a sentence split at an abbreviation
        return None
    return text if 1 <= len(WORD.findall(text)) <= max_words else None


def sections(doc):
    """Paragraphs of a document with the title they sit under: (title, paragraph, starts_with_title).

    A title is the document's first line, a heading (a line over *** / === / ---), or the dotted
    name that opens a docstring in the builtin corpus ("json.dumps" then its docstring).
    """
    title = doc.strip().split("\n", 1)[0].strip()
    out = []
    for para in doc.split("\n\n"):
        lines = [ln.rstrip() for ln in para.strip().split("\n") if ln.strip()]
        if len(lines) >= 2 and UNDERLINE.match(lines[1].strip()):
            title, lines = lines[0].strip(), lines[2:]
        starts = bool(lines) and bool(DOTTED_NAME.match(lines[0].strip()))
        if starts:
            title = DOTTED_NAME.match(lines[0].strip()).group(1)
        if lines:
            out.append((title, "\n".join(lines), starts))
    return out


def questions_from_paragraph(title, para, starts_with_title):
    """(kind, question, answer, context) for every sentence a rule fits; the answer is a span of
    the context, and the context is a short piece of corpus text."""
    out = []
    body = para.split("\n", 1)[1] if starts_with_title and "\n" in para else ("" if starts_with_title else para)
    sents = sentences(body)
    if starts_with_title and sents:
        m = RETURNS.match(sents[0])
        if m and short_span(m.group(1)):
            out.append(("returns", f"What does {title} return?", short_span(m.group(1)), f"{title}\n{sents[0]}"))
    for s in sents:
        if len(s) > 300:
            continue
        m = DEFINITION.match(s)
        if m and not NOT_SUBJECTS & {m.group(1).split()[0].lower(), m.group(1).lower().removeprefix("the ")}:
            ans = short_span(m.group(3))
            subject = m.group(1)[0].lower() + m.group(1)[1:] if m.group(1)[:4] in ("The ", "An ", "A ") \
                or m.group(1)[:2] == "A " else m.group(1)
            if ans:
                out.append(("definition", f"What {m.group(2)} {subject}?", ans, s))
        m = VERSION.search(s)
        if m and title and len(title) <= 60:
            out.append(("version", f"In which version was {title} added?", m.group(1), f"{title}\n{s}"))
        m = BORN.match(s)
        if m and short_span(m.group(2), 6):
            word = "When" if re.search(r"\d", m.group(2)) else "Where"
            out.append(("person", f"{word} was {m.group(1)} born?", short_span(m.group(2), 6), s))
        m = PLACE.match(s)
        if m:
            out.append(("place", f"Where is {m.group(1)}?", m.group(2), s))
        m = YEAR.match(s)
        if m:
            out.append(("date", f"In which year: {m.group(2)}?", m.group(1), s))
    return out


def speaker_questions(doc, max_chars=300):
    """Plays (TinyShakespeare): "Who says: <first line of a speech>?" -> the speaker's name, with
    the previous speech and this one as context, so two names compete and the answer is a span."""
    speeches = []
    for para in doc.split("\n\n"):
        lines = para.strip().split("\n")
        m = SPEAKER.match(lines[0].strip())
        if m and len(lines) >= 2:
            speeches.append((m.group(1), lines[1].strip(), para.strip()))
    out = []
    for (prev_name, _, prev), (name, first, speech) in zip(speeches, speeches[1:]):
        if prev_name == name or len(first) < 12 or len(prev) + len(speech) > max_chars:
            continue
        out.append(("speaker", f"Who says: {first.rstrip('.,;:!?-')}?", name, prev + "\n\n" + speech))
    return out


def stable_hash(text):
    """A number in [0, 1) fixed by the text (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64


def generate_qa(text, separator="\n\n\n", category="", max_questions=4000, test_fraction=0.1):
    """Deterministic extractive Q&A pairs from a corpus: a list of dicts with question, answer,
    context, split ("train"/"test", fixed by the question's hash), kind, article, section, category.
    A question asked twice keeps its first answer, so every question has one answer."""
    pairs, seen = [], set()
    for d, doc in enumerate(text.split(separator)):
        article = doc.strip().split("\n", 1)[0].strip()[:80]
        found = [(k, q, a, c, f"d{d}.s0") for k, q, a, c in speaker_questions(doc)]
        for s, (title, para, starts) in enumerate(sections(doc)):
            found += [(k, q, a, c, f"d{d}.s{s}") for k, q, a, c in questions_from_paragraph(title, para, starts)]
        for kind, q, a, c, sec in found:
            if q in seen or a not in c:
                continue
            seen.add(q)
            cat = category or ("help topic" if article.startswith("Python help topic") else
                               "module" if article.startswith("Module ") else "")
            pairs.append({"question": q, "answer": a, "context": c, "kind": kind, "article": article,
                          "section": sec, "category": cat})
    if len(pairs) > max_questions:       # a fixed subset spread over the corpus, kept in corpus order
        keep = set(sorted(range(len(pairs)), key=lambda i: stable_hash(pairs[i]["question"]))[:max_questions])
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    for p in pairs:
        p["split"] = "test" if stable_hash("split:" + p["question"]) < test_fraction else "train"
    return pairs


def write_qa(data_dir, cfg):
    """data/<name>/qa.jsonl from the dataset's train.txt (rewritten each time: it is cheap and fixed)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text()) if (data_dir / "meta.json").exists() else {}
    text = (data_dir / "train.txt").read_text(encoding="utf-8")
    pairs = generate_qa(text, meta.get("doc_separator", "\n\n\n"), "", cfg.max_questions, cfg.test_fraction)
    path = data_dir / "qa.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path, pairs


def read_qa(path, test_fraction=0.1):
    """Validate a user JSONL file line by line; raises ValueError listing every bad line.

    Each non-empty line: a JSON object with non-empty strings "question" and "answer", optional
    string "context", optional "split" in {train, test} (default: fixed by the question's hash).
    """
    pairs, errors = [], []
    if not Path(path).is_file():
        raise FileNotFoundError(f"--qa {path}: no such file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); "
                         f"save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"line {n}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"line {n}: expected a JSON object, got {type(obj).__name__}")
            continue
        problems = [f'"{k}" must be a non-empty string' for k in ("question", "answer")
                    if not isinstance(obj.get(k), str) or not obj.get(k).strip()]
        if "context" in obj and not isinstance(obj["context"], str):
            problems.append('"context" must be a string')
        if obj.get("split", "train") not in ("train", "test"):
            problems.append('"split" must be "train" or "test"')
        if problems:
            errors.append(f"line {n}: " + "; ".join(problems))
            continue
        obj.setdefault("split", "test" if stable_hash("split:" + obj["question"]) < test_fraction else "train")
        pairs.append(obj)
    if errors:
        more = f"; ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{path}: {len(errors)} bad line(s): " + "; ".join(errors[:20]) + more)
    if not pairs:
        raise ValueError(f"{path}: no question-answer pairs")
    return pairs

# ----------------------------------------------------------------------------- prompts and the loss


def prompt_ids(tok, question, context=""):
    """<q> context \\n question <a>  (the model writes the answer, then <eos>)."""
    text = f"{context}\n{question}" if context else question
    return [tok.token_id("<q>")] + tok.encode(text) + [tok.token_id("<a>")]


def encode_pair(tok, pair):
    """(prompt ids, answer ids + <eos>). The answer starts with a space, as it does inside text."""
    return prompt_ids(tok, pair["question"], pair.get("context", "")), tok.encode(" " + pair["answer"]) + [tok.eos_id]


def make_batch(examples, pad_id):
    """x, y (B, L) next-token pairs, right-padded, and mask (B, L): 1 where y is an answer token or <eos>."""
    L = max(len(p) + len(a) for p, a in examples) - 1
    x = np.full((len(examples), L), pad_id, np.int64)
    y = np.full((len(examples), L), pad_id, np.int64)
    mask = np.zeros((len(examples), L))
    for b, (p, a) in enumerate(examples):
        seq = p + a
        x[b, :len(seq) - 1], y[b, :len(seq) - 1] = seq[:-1], seq[1:]
        mask[b, len(p) - 1:len(seq) - 1] = 1.0       # y[t] = seq[t+1] is an answer token from t = len(p)-1
    return x, y, mask


def masked_cross_entropy(logits, y, mask):
    """loss = sum_i m_i (-log softmax(z_i)[y_i]) / sum_i m_i;  dL/dz_i = m_i (softmax(z_i) - onehot(y_i)) / sum m."""
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
    """The (in, out) matrices that get adapters, e.g. blocks.0.attn.wq for target "wq"."""
    sites = [LORA_SITES[t.strip()] for t in targets.split(",") if t.strip()]
    return [n for n in params if n.startswith("blocks.") and n.split(".", 2)[2] in sites]


def init_lora(params, names, rank, seed=0):
    """B (in, r) ~ N(0, 1/in), A (r, out) = 0, so W_eff = W + s B A starts equal to W.
    x @ B projects the input down to r channels, @ A brings it back up."""
    rng = np.random.default_rng(seed)
    lora = {}
    for n in names:
        d_in, d_out = params[n].shape
        lora[n + ".B"] = rng.normal(0.0, 1.0 / math.sqrt(d_in), (d_in, rank)).astype(params[n].dtype)
        lora[n + ".A"] = np.zeros((rank, d_out), params[n].dtype)
    return lora


def apply_lora(params, lora, scale):
    """Parameters with W_eff = W + s B A for every adapted W (the others shared, not copied)."""
    out = dict(params)
    for key in lora:
        if key.endswith(".B"):
            n = key[:-2]
            out[n] = params[n] + scale * (lora[n + ".B"] @ lora[n + ".A"])
    return out


def lora_grads(grads, lora, scale):
    """Chain rule through W_eff = W + s B A:  dB = s dW_eff A^T,  dA = s B^T dW_eff."""
    out = {}
    for key in lora:
        if key.endswith(".B"):
            n = key[:-2]
            out[n + ".B"] = scale * (grads[n] @ lora[n + ".A"].T)
            out[n + ".A"] = scale * (lora[n + ".B"].T @ grads[n])
    return out


def frozen_names(params, k):
    """freeze: the embedding (tied to the readout) and blocks 0..k-1."""
    return [n for n in params if n == "embed.weight" or (n.startswith("blocks.") and int(n.split(".")[1]) < k)]


def trainable_params(params, cfg, mcfg):
    """The dict the optimizer updates: the model's own arrays (full, freeze) or new adapters (lora)."""
    if cfg.method == "full":
        return dict(params)
    if cfg.method == "freeze":
        k = mcfg.n_layer // 2 if cfg.freeze_layers < 0 else cfg.freeze_layers
        frozen = set(frozen_names(params, k))
        return {n: p for n, p in params.items() if n not in frozen}
    names = lora_names(params, cfg.lora_targets)
    if not names:
        raise ValueError(f"lora_targets={cfg.lora_targets!r} selects no matrix; use names from {list(LORA_SITES)}")
    return init_lora(params, names, cfg.lora_rank, cfg.seed)

# ----------------------------------------------------------------------------- backends
# A backend turns (parameters, batch) into (masked loss, dL/dparam for every model parameter).


def numpy_backend(mcfg):
    """Stage 3: forward, the masked loss's dlogits, the hand-written backward."""
    def grad_fn(params, x, y, mask):
        logits, cache = S3.forward(params, mcfg, x)
        loss, dlogits = masked_cross_entropy(logits, y, mask)
        return loss, S3.backward(params, mcfg, cache, dlogits)
    return grad_fn


def mlx_backend(mcfg):
    """Stage 4: the MLX model holds the parameters, nn.value_and_grad gives the gradients."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    S4 = load_stage("4_spike_llm_mlx")
    model = S4.build_model(mcfg, S3.init_params(mcfg))

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
    S5 = load_stage("5_spike_llm_triton")
    run = S5.resolve(S5.RunConfig(dtype="float32"))
    model = S5.build_model(mcfg, run).eval()          # no dropout: every backend, the same gradients

    def grad_fn(params, x, y, mask):
        S5.load_params(model, params)
        model.zero_grad(set_to_none=True)
        logits = model(torch.from_numpy(x).to(run.device))                     # (B, L, V)
        nll = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).to(run.device).flatten(), reduction="none")
        m = torch.from_numpy(mask.astype(np.float32)).to(run.device).flatten()
        loss = (nll * m).sum() / m.sum()
        loss.backward()
        return loss.item(), {n: p.grad.float().cpu().numpy() for n, p in model.named_parameters()}
    return grad_fn


BACKEND = {"numpy": numpy_backend, "mlx": mlx_backend, "triton": triton_backend}

# ----------------------------------------------------------------------------- training


def finetune(params, mcfg, cfg, train_examples, grad_fn, progress=True):
    """AdamW on the trainable set; returns (trainable dict, losses). full/freeze update params in place."""
    trainable = trainable_params(params, cfg, mcfg)
    lr, min_lr = resolved_lr(cfg)
    sched = S3.TrainConfig(lr=lr, min_lr=min_lr, warmup=cfg.warmup, max_steps=cfg.max_steps,
                           weight_decay=cfg.weight_decay, layer_lr_decay=cfg.layer_lr_decay)
    opt = S3.init_opt_state(trainable)
    scale = cfg.lora_alpha / cfg.lora_rank
    pad = 0
    losses = []
    bar = tqdm(range(cfg.max_steps), desc=f"finetune {cfg.method}", dynamic_ncols=True, disable=not progress)
    for step in bar:
        pick = S3.batch_rng(cfg.seed, step).integers(0, len(train_examples), cfg.batch_size)
        x, y, mask = make_batch([train_examples[i] for i in pick], pad)
        if cfg.method == "lora":
            loss, grads = grad_fn(apply_lora(params, trainable, scale), x, y, mask)
            grads = lora_grads(grads, trainable, scale)
        else:
            loss, grads = grad_fn(params, x, y, mask)
            grads = {n: grads[n].astype(trainable[n].dtype) for n in trainable}
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; try a lower --lr")
        grads, _ = S3.clip_grads(grads, cfg.grad_clip)
        S3.adamw_step(trainable, grads, opt, step, sched, mcfg.n_layer)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
    return trainable, losses

# ----------------------------------------------------------------------------- evaluation


def pick_token(logits, source, nexts, eos_id, started):
    """The greedy next token: the argmax (source None), or extractive decoding, which keeps the
    answer a span of source.

    nexts holds every position k where the answer so far ends in source (answer = source[k-j:k]);
    the answer may go on with source[k] for those k. An extractive reader points at a start and an
    end in its context; this lets the language model do the same with its own distribution. The
    start is the best token of the source. After that the answer ends when p(<eos>) > 1/2, i.e.
    z_eos > logsumexp(z without eos), or when no continuation is left; else it goes on with the
    best continuation. Comparing p(<eos>) with one continuation token, as a plain argmax does,
    stops too early whenever a small model is unsure which word comes next: its "go on" mass is
    spread over many words. Returns (token, the positions after it)."""
    if not source:
        return int(logits.argmax()), None
    cont = sorted({source[k] for k in nexts if k < len(source)})
    if started:
        others = np.delete(logits, eos_id)
        if not cont or logits[eos_id] > others.max() + np.log(np.exp(others - others.max()).sum()):
            return eos_id, []
    token = cont[int(np.argmax(logits[cont]))]
    return token, [k + 1 for k in nexts if k < len(source) and source[k] == token]


def greedy_answers(params, mcfg, prompts, eos_id, max_new=24, batch=64, sources=None):
    """Greedy answers for many prompts at once with the recurrent form: each sequence reads its own
    prompt, then feeds back its choice until <eos>; sequences of different lengths share the steps.
    sources[i] (token ids, or None = free decoding) keeps answer i a span of it (pick_token)."""
    sources = sources or [None] * len(prompts)
    answers = []
    for s in range(0, len(prompts), batch):
        group, srcs = prompts[s:s + batch], sources[s:s + batch]
        state = S3.init_decode_state(mcfg, len(group), params["embed.weight"].dtype)
        out, done = [[] for _ in group], [False] * len(group)
        nexts = [range(len(src)) if src else None for src in srcs]   # every start is open
        cur = [p[0] for p in group]
        for pos in range(max(len(p) for p in group) + max_new):
            logits = S3.decode_step(params, mcfg, state, cur)          # (B, V)
            for b, p in enumerate(group):
                if pos + 1 < len(p):
                    cur[b] = p[pos + 1]
                elif not done[b]:
                    nxt, nexts[b] = pick_token(logits[b], srcs[b], nexts[b], eos_id, bool(out[b]))
                    done[b] = nxt == eos_id or len(out[b]) >= max_new
                    if not done[b]:
                        out[b].append(nxt)
                    cur[b] = nxt
            if all(done):
                break
        answers += out
    return answers


def stream_answer(params, mcfg, prompt, eos_id, max_new, source=None):
    """One prompt's greedy answer, a token at a time (for printing as it comes), ending before <eos>;
    kept a span of source when one is given (pick_token)."""
    state = S3.init_decode_state(mcfg, 1, params["embed.weight"].dtype)
    for t in prompt[:-1]:
        S3.decode_step(params, mcfg, state, [t])
    cur, nexts = prompt[-1], range(len(source)) if source else None
    for j in range(max_new):
        cur, nexts = pick_token(S3.decode_step(params, mcfg, state, [cur])[0], source, nexts, eos_id, j > 0)
        if cur == eos_id:
            return
        yield cur


def normalize(text):
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def token_f1(pred, gold):
    """Harmonic mean of word precision and recall (words counted with multiplicity)."""
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    if not p or not g or common == 0:
        return float(p == g)
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def qa_scores(params, mcfg, tok, pairs, max_new=24, decode="free"):
    """Exact match and mean token F1 of greedy answers, and the answers themselves. decode="span"
    keeps the answer to a question with a context a span of that context (pick_token)."""
    if not pairs:
        return {"em": float("nan"), "f1": float("nan"), "n": 0, "answers": []}
    prompts = [prompt_ids(tok, p["question"], p.get("context", "")) for p in pairs]
    sources = [tok.encode(p["context"]) if decode == "span" and p.get("context") else None for p in pairs]
    answers = [tok.decode(a, skip_special=True).strip()
               for a in greedy_answers(params, mcfg, prompts, tok.eos_id, max_new, sources=sources)]
    em = np.mean([normalize(a) == normalize(p["answer"]) for a, p in zip(answers, pairs)])
    f1 = np.mean([token_f1(a, p["answer"]) for a, p in zip(answers, pairs)])
    return {"em": float(em), "f1": float(f1), "n": len(pairs), "answers": answers}


def matches_by_kind(pairs, answers):
    """{kind: [exact matches, questions]}: which rules of the generator the model has learned."""
    out = {}
    for p, a in zip(pairs, answers):
        counts = out.setdefault(p.get("kind", "-"), [0, 0])
        counts[0] += normalize(a) == normalize(p["answer"])
        counts[1] += 1
    return dict(sorted(out.items()))


def val_bpc(params, mcfg, tok, data_dir, eval_tokens):
    """Bits per character on the corpus's validation split (stage 3's fixed slice)."""
    val = S3.open_split(data_dir, "val")
    report = S3.eval_report(params, mcfg, val, mcfg.context, eval_tokens, tok.decode)
    return report["bpc"] if report else float("nan")

# ----------------------------------------------------------------------------- files


def load_base(path):
    """(params, ModelConfig, config, tokenizer) of the pretrained checkpoint, with a clear message
    and the command to make one when it is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no pretrained checkpoint at {path}. Pretrain one first, e.g.\n"
                                f"  python 3_spike_llm_numpy.py --preset small --source builtin --ckpt {path}\n"
                                f"or point --base at a checkpoint of stage 3, 4 or 5.")
    params, mcfg, _, _, _, config = S3.load_model(path)
    tok = load_stage("2_tokenizer").Tokenizer.load(config["tokenizer"]["path"])
    S3.check_tokenizer(config, tok.sha256(), path)
    return params, mcfg, config, tok


def save_lora(path, lora, cfg, base_path):
    """Adapters as a small npz: lora/<name>.B, lora/<name>.A and a JSON config (no pickle)."""
    doc = {"format": "spike-transformer-lora", "version": 1, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
           "targets": cfg.lora_targets, "base": str(base_path)}
    arrays = {"config.json": np.frombuffer(json.dumps(doc).encode(), np.uint8)}
    arrays.update({"lora/" + k: np.asarray(v, np.float32) for k, v in lora.items()})
    return atomic_write(path, lambda f: np.savez(f, **arrays))    # a failed save keeps the old file


def load_lora(path, params):
    """(adapters, scale) from save_lora's file; checks each adapter against the base's shapes.
    Anything else (a missing, truncated or foreign file) is a CheckpointError naming the file."""
    if not Path(path).is_file():
        raise CheckpointError(f"no LoRA adapters at {path}: train them with --method lora, "
                              f"or pass --adapters FILE")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        doc = json.loads(arrays.pop("config.json").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is not a readable LoRA adapter file ({type(err).__name__}: {err}); "
                              f"retrain the adapters") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: its config.json is a JSON {type(doc).__name__}, not an object")
    if doc.get("format") != "spike-transformer-lora":
        raise CheckpointError(f"{path} is not a LoRA adapter file (format={doc.get('format')!r})")
    rank, alpha = doc.get("rank"), doc.get("alpha")
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float))):
        raise CheckpointError(f"{path}: its config needs an integer rank >= 1 and a number alpha")
    lora = {k[len("lora/"):]: v for k, v in arrays.items()}
    for key, v in lora.items():
        if not key.endswith((".A", ".B")) or not np.issubdtype(v.dtype, np.floating):
            raise CheckpointError(f"{path}: lora/{key} is not a floating-point .A or .B adapter")
        n = key[:-2]
        d_in, d_out = params[n].shape if n in params and params[n].ndim == 2 else (None, None)
        want = {".B": (d_in, rank), ".A": (rank, d_out)}.get(key[-2:])
        if d_in is None or v.shape != want or {n + ".A", n + ".B"} - set(lora):     # each B needs its A
            raise CheckpointError(f"{path}: adapter {key} {v.shape} does not fit the base model")
    return lora, alpha / rank


def save_finetuned(path, params, mcfg, config, cfg):
    """The same checkpoint format as every stage: the base's config plus a "finetune" record, its
    dataset folder recorded anew from this file's folder (data_ref), so it finds its tokenizer."""
    doc = dict(config, model=asdict(mcfg), finetune=asdict(cfg))
    doc.pop("format", None), doc.pop("version", None)
    doc["data"] = data_ref(tokenizer_path(config, cfg.base).parent, path)
    return save_checkpoint(path, params, doc)


def qa_pairs(cfg, config):
    """The user's JSONL (validated) or the generated pairs of the base model's corpus."""
    if cfg.qa:
        return read_qa(cfg.qa, cfg.test_fraction), cfg.qa
    data_dir = config.get("data", {}).get("dir")
    if not data_dir or not (Path(data_dir) / "train.txt").exists():
        raise FileNotFoundError(f"the base checkpoint's corpus ({data_dir!r}) has no train.txt; pass --qa FILE")
    path, pairs = write_qa(data_dir, cfg)
    return pairs, str(path)

# ----------------------------------------------------------------------------- main


def print_table(rows):
    """Markdown table of results rows (dicts from run())."""
    head = ("| method | backend | trained params | time | steps | decode | EM test | F1 test | EM test, free | "
            "EM train | BPC before | BPC after |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['method']} | {r['backend']} | {r['trained']:,} ({100 * r['fraction']:.2f}%) | "
                     f"{r['seconds']:.0f} s | {r['steps']} | {r['decode']} | {100 * r['em_test']:.1f}% | "
                     f"{100 * r['f1_test']:.1f}% | {100 * r['em_test_free']:.1f}% | {100 * r['em_train']:.1f}% | "
                     f"{r['bpc_before']:.3f} | {r['bpc_after']:.3f} |")
    return "\n".join(lines)


def run(cfg, progress=True):
    """Fine-tune the base with cfg.method, evaluate before and after, write the outputs; a results dict."""
    params, mcfg, config, tok = load_base(cfg.base)
    pairs, source = qa_pairs(cfg, config)
    data_dir = config.get("data", {}).get("dir", "")
    encoded = [(p, encode_pair(tok, p)) for p in pairs]
    fits = [(p, e) for p, e in encoded if len(e[0]) + len(e[1]) <= cfg.max_len]
    train = [e for p, e in fits if p["split"] == "train"]
    test = [p for p, e in fits if p["split"] == "test"][:cfg.eval_questions]
    train_eval = [p for p, e in fits if p["split"] == "train"][:cfg.eval_questions]
    if not train or not test:
        raise ValueError(f"{source}: {len(train)} train and {len(test)} test pairs fit max_len={cfg.max_len}; need both")
    print(f"Q&A: {len(pairs)} pairs from {source}; {len(train)} train, {len(test)} held out scored "
          f"({len(encoded) - len(fits)} longer than {cfg.max_len} tokens skipped)")
    n_total = sum(p.size for p in params.values())
    has_val = bool(data_dir) and (Path(data_dir) / "val.bin").exists()
    bpc_before = val_bpc(params, mcfg, tok, data_dir, cfg.eval_tokens) if has_val else float("nan")
    before = qa_scores(params, mcfg, tok, test, cfg.max_answer_tokens, cfg.decode)
    print(f"before: held-out EM {100 * before['em']:.1f}%, F1 {100 * before['f1']:.1f}%, val BPC {bpc_before:.3f}")
    t0 = time.time()
    trainable, losses = finetune(params, mcfg, cfg, train, BACKEND[cfg.backend](mcfg), progress)
    seconds = time.time() - t0
    out = Path(cfg.out_dir)
    if cfg.method == "lora":
        lora, scale = trainable, cfg.lora_alpha / cfg.lora_rank
        tuned = apply_lora(params, lora, scale)
        saved = save_lora(out / "lora.npz", lora, cfg, cfg.base)
    else:
        tuned = params
        saved = save_finetuned(out / f"{cfg.method}.npz", params, mcfg, config, cfg)
    n_trained = sum(p.size for p in trainable.values())
    after = qa_scores(tuned, mcfg, tok, test, cfg.max_answer_tokens, cfg.decode)
    free = after if cfg.decode == "free" else qa_scores(tuned, mcfg, tok, test, cfg.max_answer_tokens)
    on_train = qa_scores(tuned, mcfg, tok, train_eval, cfg.max_answer_tokens, cfg.decode)
    bpc_after = val_bpc(tuned, mcfg, tok, data_dir, cfg.eval_tokens) if has_val else float("nan")
    result = {"method": cfg.method, "backend": cfg.backend, "trained": int(n_trained), "fraction": n_trained / n_total,
              "seconds": seconds, "steps": cfg.max_steps, "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])),
              "decode": cfg.decode, "em_before": before["em"], "em_test": after["em"], "f1_test": after["f1"],
              "em_test_free": free["em"], "em_train": on_train["em"],
              "n_test": after["n"], "bpc_before": bpc_before, "bpc_after": bpc_after, "output": str(saved)}
    result["em_by_kind"] = matches_by_kind(test, after["answers"])
    print("held-out exact matches by kind: " + ", ".join(f"{k} {r}/{n}" for k, (r, n) in result["em_by_kind"].items()))
    for p, a in list(zip(test, after["answers"]))[:5]:
        print(f"  Q: {p['question']}\n     gold: {p['answer']!r}  model: {a!r}")
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({k: None if v != v else v for k, v in result.items()}) + "\n")   # NaN -> null
    print(print_table([result]))
    print(f"saved {saved}")
    return result


def merge(cfg, adapters):
    """Fold adapters into the base weights: a full checkpoint any stage can load."""
    params, mcfg, config, _ = load_base(cfg.base)
    lora, scale = load_lora(adapters, params)
    path = Path(cfg.out_dir) / "lora_merged.npz"
    save_finetuned(path, apply_lora(params, lora, scale), mcfg, config, cfg)
    print(f"merged {len(lora) // 2} adapters (s = {scale:g}) into {path}")
    return path


def ask(cfg, question, context="", ckpt=None, adapters=None, out=None):
    """Answer one question greedily, printing each piece of the answer as it is decoded."""
    base = ckpt or (cfg.base if cfg.method == "lora" else str(Path(cfg.out_dir) / f"{cfg.method}.npz"))
    params, mcfg, _, tok = load_base(base)
    adapters = adapters or (str(Path(cfg.out_dir) / "lora.npz") if cfg.method == "lora" and not ckpt else None)
    if adapters:
        lora, scale = load_lora(adapters, params)
        params = apply_lora(params, lora, scale)
    ids = prompt_ids(tok, question, context)
    source = tok.encode(context) if context and cfg.decode == "span" else None
    answer = stream_answer(params, mcfg, ids, tok.eos_id, cfg.max_answer_tokens, source)
    return print_stream(tok, "", [], answer, out).strip()


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="default", choices=list(PRESETS))
    ap.add_argument("--ask", default=None, metavar="QUESTION", help="answer a question (streaming) and exit")
    ap.add_argument("--context", default="", help="with --ask: a passage the answer comes from")
    ap.add_argument("--ckpt", default=None, help="with --ask: a full checkpoint to answer with")
    ap.add_argument("--adapters", default=None, help="LoRA adapters for --ask / --merge (default OUT_DIR/lora.npz)")
    ap.add_argument("--merge", type=S3.parse_bool, default=False, help="fold adapters into OUT_DIR/lora_merged.npz")
    ap.add_argument("--generate_only", type=S3.parse_bool, default=False, help="only write qa.jsonl and exit")
    g = ap.add_argument_group("fine-tuning (FinetuneConfig)", "preset values are used unless given")
    for f in fields(FinetuneConfig):
        g.add_argument(f"--{f.name}", type=type(f.default), default=None, help=f"default {f.default!r}")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    over = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if getattr(args, f.name) is not None}
    try:
        cfg = FinetuneConfig(**dict(PRESETS[args.preset], **over))
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if args.ask is not None:
            ask(cfg, args.ask, args.context, args.ckpt, args.adapters)
        elif args.merge:
            merge(cfg, args.adapters or str(Path(cfg.out_dir) / "lora.npz"))
        elif args.generate_only:
            _, _, config, _ = load_base(cfg.base)
            pairs, path = qa_pairs(cfg, config)
            kinds = {k: sum(p.get("kind") == k for p in pairs) for k in sorted({p.get("kind") for p in pairs})}
            print(f"{path}: {len(pairs)} pairs, {sum(p['split'] == 'test' for p in pairs)} held out; kinds {kinds}")
        else:
            run(cfg)
    except (CheckpointError, FloatingPointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
