"""Multi-query associative recall (MQAR): can stage 5's decayed linear attention fetch a value
stored earlier in the context, and how does that depend on the distance, the number of stored
pairs, spikes against the ANN twin, and the heads' decays?

Each sequence is n key-value pairs, an optional gap of filler tokens, then q queries:

    k1 v1 k2 v2 ... kn vn | f f ... f (gap) | ki vi  kj vj ...   (keys of the queries: stored ones)

or, with --query_first 1 (stage 6's question first), the queried keys before the pairs and a cue
token c (the first filler id) where each key stood:

    ki kj ... | k1 v1 k2 v2 ... kn vn | f f ... f (gap) | c vi  c vj ...

Keys are distinct within a sequence, values uniform; keys, values and fillers use three disjoint
ranges of token ids, so the vocabulary is KEYS + VALUES + FILLERS (every sequence has the same
length: nothing is padded). The loss and the accuracy count only the positions whose next token is
a queried value (as stage 6 counts only answer tokens); accuracy is the greedy argmax there, on
held-out sequences of another seed; chance is 1 / VALUES. A model that remembers which values the
sequence stored but not which key each came with scores about 1 / n, and up to the mean of
1/n, 1/(n-1), ..., 1 when q = n if it also rules out the values already asked for.
A query's recall distance is the gap plus up to 2 (n + q) positions.

Every row trains stage 5's PyTorch model from scratch (the `small` preset unless --preset, fields
changed with --set NAME=VALUE), AdamW with a linear warm-up and a cosine decay, clip 1.0:

    python benchmarks/bench_recall.py --models lif,twin --pairs 8 --gap 0,64,192 --decay_step 1.5,2.33
    python benchmarks/bench_recall.py --models sigmoid4x --set theta=0.5 --set n_layer=2
    python benchmarks/bench_recall.py --device cuda --batch 64 --steps 4000 ...     # a GPU (Triton)
    python benchmarks/bench_recall.py --train_seqs 1024 ...     # one fixed training set, not fresh sequences

Models: lif (the default spiking model), twin (--spiking 0: ReLU, one timestep), sigmoid4x
(--spike_fn sigmoid4x --quant round_ste), rates (sigmoid4x's firing probabilities themselves,
--quant identity: not spikes, a diagnostic of what rounding them to spikes costs). The Markdown
table goes to stdout and to --out.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.cli import field_setting  # noqa: E402
from spikelib.files import atomic_write  # noqa: E402
from spikelib.hardware import cpu_model, gpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402
from spikelib.torch_io import resolve_run  # noqa: E402

S5 = load_stage("5_spike_llm_triton")
S3 = S5.S3
MODELS = {"lif": {}, "twin": {"spiking": False},
          "sigmoid4x": {"spike_fn": "sigmoid4x", "quant": "round_ste"},
          "rates": {"spike_fn": "sigmoid4x", "quant": "identity"}}

# ----------------------------------------------------------------------------- the task


def token_ranges(keys, values, fillers):
    """The three disjoint id ranges: keys [0, K), values [K, K+V), fillers [K+V, K+V+F)."""
    return range(0, keys), range(keys, keys + values), range(keys + values, keys + values + fillers)


def make_batch(rng, batch, pairs, queries, gap, keys, values, fillers, sep=0, query_first=False):
    """(x, y, mask), each (batch, L) with L = 2 pairs + gap + (2 + sep) queries - 1: x the tokens, y the
    next tokens, mask 1 where y is the value of a queried key (at the query key itself, or at the last
    of the sep separator tokens that follow it: the first filler id). query_first: the queried keys
    open the sequence (L grows by queries) and a cue token, the first filler id, stands for each key
    at the end: the model is told what to look for before it reads the pairs."""
    key_ids, value_ids, filler_ids = token_ranges(keys, values, fillers)
    k = np.stack([rng.choice(keys, pairs, replace=False) for _ in range(batch)]) + key_ids.start  # (B, n)
    v = rng.integers(value_ids.start, value_ids.stop, (batch, pairs))                             # (B, n)
    f = rng.integers(filler_ids.start, filler_ids.stop, (batch, gap))                             # (B, gap)
    # which stored pair each query asks for: all of them in random order, or with repeats if q > n
    pick = np.stack([rng.choice(pairs, queries, replace=queries > pairs) for _ in range(batch)])  # (B, q)
    rows = np.arange(batch)[:, None]
    stored = np.stack([k, v], axis=2).reshape(batch, 2 * pairs)                      # k1 v1 k2 v2 ...
    seps = np.full((batch, queries, sep), filler_ids.start)                          # (B, q, sep)
    first = k[rows, pick] if query_first else k[:, :0]                              # (B, q) or (B, 0)
    cue = np.full_like(first, filler_ids.start) if query_first else k[rows, pick]    # (B, q)
    asked = np.concatenate([cue[..., None], seps, v[rows, pick][..., None]], axis=2)
    seq = np.concatenate([first, stored, f, asked.reshape(batch, -1)], axis=1)       # (B, L + 1)
    mask = np.zeros(seq.shape, np.float32)
    start = first.shape[1] + 2 * pairs + gap + 1 + sep
    mask[:, start::2 + sep] = 1.0                         # the queried values' positions in seq...
    return seq[:, :-1], seq[:, 1:], mask[:, 1:]           # ...are the targets of the tokens before them


def recall_accuracy(logits, y, mask):
    """(share of masked positions whose argmax is the target, positions scored); logits (B, L, V)."""
    hit = (logits.argmax(-1) == y) & (mask > 0)
    n = int((mask > 0).sum())
    return float(hit.sum()) / n, n


def std_error(p, n):
    """The binomial standard error sqrt(p (1 - p) / n) of an accuracy p over n positions."""
    return math.sqrt(p * (1 - p) / n)

# ----------------------------------------------------------------------------- training


def masked_loss(logits, y, mask):
    """Mean cross-entropy over the masked positions; logits (B, L, V), y and mask (B, L)."""
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")    # (B L,)
    return (nll * mask.flatten()).sum() / mask.sum()


def lr_at(step, args):
    """Linear warm-up to --lr over --warmup steps, then a cosine decay to lr / 10 at --steps."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def run_row(args, model_name, pairs, gap, decay_step):
    """Train one model on the task and score it on held-out sequences; returns the row's dict."""
    queries = args.queries or pairs
    task = dict(pairs=pairs, queries=queries, gap=gap, keys=args.keys, values=args.values,
                fillers=args.fillers, sep=args.query_sep, query_first=args.query_first)
    length = 2 * pairs + gap + (2 + args.query_sep + args.query_first) * queries - 1
    mcfg = S3.make_configs(args.preset, **dict(args.set, **MODELS[model_name], decay_step=decay_step,
                                               vocab_size=args.keys + args.values + args.fillers,
                                               context=args.context))[0]
    run = resolve_run(S5.RunConfig(device=args.device), have_triton=S5.triton is not None)
    torch.manual_seed(args.seed)                   # dropout's masks (when --set dropout=...)
    model = S5.build_model(mcfg, run, seed=args.seed)                 # training mode
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args))
    rng = np.random.default_rng(args.seed)         # training sequences; held-out ones use seed + 1
    pool = make_batch(rng, args.train_seqs, **task) if args.train_seqs else None   # a fixed training set
    to_dev = lambda a: torch.from_numpy(a).to(run.device)  # noqa: E731
    start, losses = time.time(), []
    for _ in tqdm(range(args.steps), desc=f"{model_name} pairs {pairs} gap {gap} decay {decay_step}",
                  leave=False):
        if pool is None:                           # fresh sequences every step
            x, y, mask = map(to_dev, make_batch(rng, args.batch, **task))
        else:                                      # a batch drawn from the fixed set, with replacement
            pick = rng.integers(0, args.train_seqs, args.batch)
            x, y, mask = (to_dev(a[pick]) for a in pool)
        loss = masked_loss(model(x), y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    held_out = np.random.default_rng(args.seed + 1)
    hits = scored = 0
    with torch.no_grad():
        for _ in range(math.ceil(args.eval_seqs / args.batch)):
            x, y, mask = make_batch(held_out, args.batch, **task)
            acc, n = recall_accuracy(model(to_dev(x)).cpu().numpy(), y, mask)
            hits, scored = hits + round(acc * n), scored + n
    acc = hits / scored
    return {"model": model_name, "pairs": pairs, "gap": gap, "decay_step": decay_step, "length": length,
            "slowest": 2 ** (mcfg.decay_start + decay_step * (mcfg.n_head - 1)), "steps": args.steps,
            "loss": float(np.mean(losses[-20:])), "acc": acc, "se": std_error(acc, scored), "n": scored,
            "seconds": time.time() - start}

# ----------------------------------------------------------------------------- command line


def int_list(text):
    return [int(t) for t in text.split(",")]


def float_list(text):
    return [float(t) for t in text.split(",")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lif,twin", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--pairs", type=int_list, default=[4], help="comma-separated numbers of stored pairs")
    ap.add_argument("--gap", type=int_list, default=[0], help="comma-separated filler lengths")
    ap.add_argument("--decay_step", type=float_list, default=[1.5],
                    help="comma-separated decay steps of the heads (1.5: the model's default)")
    ap.add_argument("--queries", type=int, default=0, help="queries per sequence (0: as many as pairs)")
    ap.add_argument("--keys", type=int, default=64, help="key token ids")
    ap.add_argument("--values", type=int, default=64, help="value token ids (chance is 1 / VALUES)")
    ap.add_argument("--fillers", type=int, default=32, help="filler token ids of the gap")
    ap.add_argument("--query_sep", type=int, default=0,
                    help="separator tokens between a queried key and its value (0: the value follows "
                         "the key, as in the stored pairs; stage 6's '?' and <a> stand so between a cue "
                         "and its answer)")
    ap.add_argument("--query_first", type=int, default=0, choices=(0, 1),
                    help="1: the queried keys come before the pairs and a cue token stands for each at the "
                         "end (stage 6's --prompt_order question_first)")
    ap.add_argument("--preset", default="small", choices=list(S3.PRESETS), help="stage 3 model preset")
    ap.add_argument("--set", type=field_setting(S3.ModelConfig), action="append", default=[],
                    metavar="NAME=VALUE",
                    help="change a model field of every row, e.g. --set theta=1.0 (repeatable)")
    ap.add_argument("--context", type=int, default=256, help="the model's context; sequences must fit")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per row")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (and per scoring batch)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, no weight decay)")
    ap.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    ap.add_argument("--eval_seqs", type=int, default=256, help="held-out sequences scored per row")
    ap.add_argument("--train_seqs", type=int, default=0,
                    help="0: fresh training sequences every step; N: batches drawn from one fixed set of N "
                         "(can the model learn N sequences by heart instead of the rule?)")
    ap.add_argument("--seed", type=int, default=0, help="parameters and training sequences")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                    help="cpu: torch ops; cuda: stage 5's Triton kernels")
    ap.add_argument("--out", default="out/recall.md", help="the Markdown table")
    args = ap.parse_args(argv)
    args.set = dict(args.set)
    args.models = args.models.split(",")
    return args


def check_args(args):
    """The first problem with the options, as one sentence, or None."""
    taken = sorted(set(args.set) & {"vocab_size", "context", "decay_step", "spiking", "spike_fn", "quant"})
    if taken:
        return f"--set {taken[0]}: every row sets it (from --keys, --context, --decay_step or --models)"
    if any(m not in MODELS for m in args.models):
        return f"--models {','.join(args.models)}: choose from {', '.join(MODELS)}"
    if min(args.steps, args.batch, args.keys, args.values, args.fillers, args.eval_seqs, args.warmup) < 1:
        return "--steps, --batch, --keys, --values, --fillers, --eval_seqs and --warmup must be >= 1"
    if args.train_seqs < 0:
        return "--train_seqs must be >= 0 (0: fresh sequences every step)"
    if not args.lr > 0 or args.seed < 0:                        # not > 0: NaN is refused too
        return "--lr must be > 0 and --seed >= 0"
    sizes_ok = min(args.pairs) >= 1 and min(args.gap + [args.queries, args.query_sep]) >= 0
    if not sizes_ok or not all(d > 0 for d in args.decay_step):      # not > 0: NaN is refused too
        return "--pairs must be >= 1, --gap, --queries and --query_sep >= 0, --decay_step > 0"
    if max(args.pairs) > args.keys:
        return f"--pairs {max(args.pairs)} is more than the {args.keys} keys (keys are distinct per sequence)"
    asked = 2 + args.query_sep + args.query_first  # tokens per query: key (and cue), separators, value
    longest = max(2 * p + g + asked * (args.queries or p) - 1 for p in args.pairs for g in args.gap)
    if longest > args.context:
        return f"sequences of {longest} tokens are longer than --context {args.context}"
    try:
        S3.make_configs(args.preset, **args.set)
        resolve_run(S5.RunConfig(device=args.device), have_triton=S5.triton is not None)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def table(args, rows):
    """The Markdown table of the rows, its header saying the task, the chance level and the machine."""
    machine = f"CPU {cpu_model()} ({usable_cpus()} usable cores)"
    if args.device != "cpu" and gpu_model():
        machine = f"GPU {gpu_model()}, " + machine
    lines = [f"MQAR on stage 5's `{args.preset}` model, batch {args.batch}, lr {args.lr}, "
             f"{args.keys} keys, {args.values} values, {args.fillers} fillers, queries "
             f"{args.queries or 'as many as pairs'}{', asked before the pairs' if args.query_first else ''}, "
             f"{args.query_sep} separators between a queried key and its value, "
             f"training sequences {args.train_seqs or 'fresh every step'}, "
             f"{args.eval_seqs} held-out sequences; "
             f"chance = 1/{args.values} = {1 / args.values:.3f} (the stored values without their keys: "
             f"about 1/pairs); {machine}"
             + (f"; set {args.set}" if args.set else ""), "",
             "| model | pairs | gap | decay_step | slowest head | length | steps | train loss | "
             "recall acc ± se | scored | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pairs']} | {r['gap']} | {r['decay_step']} | {r['slowest']:.0f} | "
                     f"{r['length']} | {r['steps']} | {r['loss']:.3f} | {r['acc']:.3f} ± {r['se']:.3f} | "
                     f"{r['n']} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    err = check_args(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    grid = [(m, p, g, d) for m in args.models for p in args.pairs for g in args.gap for d in args.decay_step]
    rows = []
    for m, p, g, d in tqdm(grid, desc="rows"):
        rows.append(run_row(args, m, p, g, d))
        text = table(args, rows)                   # rewritten after every row: a stopped grid keeps its rows
        atomic_write(args.out, lambda f: f.write(text.encode()))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
