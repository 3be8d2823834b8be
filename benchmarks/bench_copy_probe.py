"""Does a checkpoint copy from its context? A repeated-passage probe of a trained model, no training.

A passage p of the validation split, L tokens, is read twice with G tokens of other text between
(the text that follows p), and, as the control, the same passage at the same position after
another passage q of the split:

    repeat:  p1 p2 ... pL | g1 ... gG | p1 p2 ... pL
    fresh:   q1 q2 ... qL | g1 ... gG | p1 p2 ... pL

A model that only models language predicts the last L tokens about equally well in both rows; a
model that copies from its context predicts them far better the second time. Per checkpoint and
gap: bits per token of the last passage (p2..pL, each from everything before it) in the fresh and
the repeat rows, their difference (the copy gain), and the share of those tokens that the greedy
argmax gets right in each. Stage 6 needs this ability: an answer is copied from its context.

    python benchmarks/bench_copy_probe.py --ckpts out/c/base.npz,out/NAME/full/full.npz --gaps 0,64,128

Every checkpoint is read by stage 3's NumPy model in float32 on the CPU, on its own corpus's
validation split (the dataset folder its tokenizer is in); 2 L + G must fit its context. The
report first names how far each checkpoint was trained: a run still training is read at the last
step it saved.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.checkpoint import tokenizer_path  # noqa: E402
from spikelib.files import write_text_atomic  # noqa: E402
from spikelib.hardware import cpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

F = load_stage("6_finetune")
S3 = F.S3


def probe_rows(val, n, length, gap):
    """(repeat, fresh): two (n, 2 length + gap) int64 arrays that end in the same n passages at the
    same positions after the same gap text. Passage i starts at i x stride (spread over the split,
    no two windows of passage and gap overlapping); fresh row i opens with passage (i + n // 2) mod
    n, another part of the split."""
    need = 2 * length + gap
    stride = (len(val) - need) // n
    if stride < length + gap:
        raise ValueError(f"the validation split ({len(val)} tokens) is too short for {n} passages of "
                         f"{length} tokens and their gaps of {gap} apart: lower --sequences or --passage")
    starts = np.arange(n) * stride
    passages = np.stack([val[s:s + length] for s in starts]).astype(np.int64)          # (n, L)
    gaps = np.stack([val[s + length:s + length + gap] for s in starts]).astype(np.int64)  # (n, G)
    others = np.roll(passages, -(n // 2), axis=0)
    repeat = np.concatenate([passages, gaps, passages], axis=1)
    fresh = np.concatenate([others, gaps, passages], axis=1)
    return repeat, fresh


def last_passage_scores(logits, idx, length):
    """(summed bits, greedy hits, count) of the last passage's predictions: position t predicts
    idx[t + 1], for t from N - length to N - 2 (p2..pL given everything before), in float64."""
    N = idx.shape[1]
    z = logits[:, N - length:N - 1].astype(np.float64)            # (B, L - 1, V)
    y = idx[:, N - length + 1:]                                     # (B, L - 1)
    z = z - z.max(-1, keepdims=True)
    nats = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, y[..., None], -1)[..., 0]
    hits = z.argmax(-1) == y
    return float(nats.sum() / np.log(2)), int(hits.sum()), y.size


def score(params, mcfg, rows, length, batch):
    """(bits per token, accuracy) of the last passage over all rows, in batches of `batch`."""
    bits = hits = count = 0
    for i in range(0, len(rows), batch):
        idx = rows[i:i + batch]
        logits, _ = S3.forward(params, mcfg, idx)
        b, h, c = last_passage_scores(logits, idx, length)
        bits, hits, count = bits + b, hits + h, count + c
    return bits / count, hits / count


def probe(path, length, gaps, n, batch):
    """Table rows of one checkpoint: (gap, fresh bits, repeat bits, fresh accuracy, repeat accuracy)."""
    params, mcfg, config, _ = F.load_base(path)
    if 2 * length + max(gaps) > mcfg.context:
        raise ValueError(f"2 x --passage + the largest gap ({2 * length + max(gaps)} tokens) must fit "
                         f"{path}'s context of {mcfg.context}")
    val = S3.open_split(tokenizer_path(config, path).parent, "val")
    out = []
    for gap in tqdm(gaps, desc=Path(path).name, unit="gap"):
        repeat, fresh = probe_rows(val, n, length, gap)
        fresh_bits, fresh_acc = score(params, mcfg, fresh, length, batch)
        repeat_bits, repeat_acc = score(params, mcfg, repeat, length, batch)
        out.append((gap, fresh_bits, repeat_bits, fresh_acc, repeat_acc))
    return out


def trained(path):
    """How far the checkpoint was trained: its pretraining step against its schedule's, then stage 6's
    steps if it was fine-tuned. A checkpoint of a run still training is its last saved step (stages
    3 to 5 save at every evaluation), so a probe that reads it early says so here."""
    config = S3.load_model(path)[-1]
    train = config.get("train", {})
    text = f"{path}: pretrained {train.get('step', 0):,} of {train.get('max_steps', 0):,} steps"
    if "finetune" in config:
        text += f", then fine-tuned {config['finetune']['max_steps']:,} steps (stage 6)"
    return text


def table(results):
    lines = ["| checkpoint | gap | bits/token, fresh | bits/token, repeat | copy gain | top-1 fresh | "
             "top-1 repeat |", "|---|---|---|---|---|---|---|"]
    for path, rows in results:
        for gap, fb, rb, fa, ra in rows:
            lines.append(f"| {path} | {gap} | {fb:.3f} | {rb:.3f} | {fb - rb:+.3f} | {100 * fa:.1f}% | "
                         f"{100 * ra:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpts", required=True, help="comma-separated checkpoints of stage 3, 4, 5 or 6")
    ap.add_argument("--passage", type=int, default=32, help="tokens L of the passage read twice")
    ap.add_argument("--gaps", default="0,64,128", help="comma-separated tokens G of other text between")
    ap.add_argument("--sequences", type=int, default=256, help="passages, spread over the validation split")
    ap.add_argument("--batch", type=int, default=32, help="sequences per forward pass (memory)")
    ap.add_argument("--out", default="", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    try:
        gaps = [int(g) for g in args.gaps.split(",")]
    except ValueError:
        ap.error(f"--gaps must be comma-separated whole numbers, got {args.gaps!r}")
    if min(gaps) < 0 or args.passage < 2 or args.sequences < 1 or args.batch < 1:
        ap.error("--gaps must be >= 0, --passage >= 2, --sequences and --batch >= 1")
    try:
        results = [(path, probe(path, args.passage, gaps, args.sequences, args.batch))
                   for path in args.ckpts.split(",")]
    except S3.ERRORS as err:
        return F.fail(err)
    steps = "\n".join(f"- {trained(path)}" for path, _ in results)         # one line per checkpoint
    text = (f"{args.sequences} passages of {args.passage} tokens from each checkpoint's validation split, "
            f"stage 3's NumPy model; {cpu_model()}, {usable_cpus()} CPU cores\n\n"
            f"{steps}\n\n{table(results)}")
    print(text)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
