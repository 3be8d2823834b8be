"""How low a rank does full fine-tuning's update need? The best rank-r part of each update.

LoRA trains W + s B A with B (in, r), A (r, out): the update it can make to a matrix has rank r at
most. Full fine-tuning's own update, D = W_tuned - W_base, is not limited. Cut each D of the
matrices LoRA adapts (stage 6's --lora_targets) to its best rank-r approximation in the Frobenius
norm (the SVD's r largest singular values, Eckart-Young) and keep every other array (the
embedding, the norm gains) at the base's: that is the most a rank-r adapter placed there could
carry over from the full run. If exact match survives the cut at r = 1, LoRA rank 1 fails at
finding such an update, not at holding one; if it does not, full fine-tuning's answer needs more.

Rows: the base, the fine-tuned model, the target matrices alone tuned (their whole update), the other
arrays alone tuned, the matrices with the embedding or with the rest but the embedding, then each
rank r of the matrices with the other arrays at the base's and, to see what rank the matrices need
once the rest is tuned, at the tuned ones, and each rank r of the embedding's update: exact match
(held-out, stage 6's scoring, span and free decoding), the share of the update's squared norm
kept, and the parameters a rank-r LoRA of those arrays trains. With --parts 1, where the update
lives: each block's matrices (with the embedding's update, without which they answer nothing),
every block but one, each kind of matrix, attention and MLP; and the largest 1% (--sparse) of all
its entries, what a sparse adapter of as many values as a 1% LoRA could carry over.

    python benchmarks/bench_lora_rank.py --base out/c/base.npz --tuned out/NAME/full/full.npz \\
        --context_chars 128 --prompt_order question_first --out lora_rank.md
    python benchmarks/bench_lora_rank.py ... --ranks 1 --decodings span --parts 1   # where it lives
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.files import write_text_atomic  # noqa: E402
from spikelib.hardware import cpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

F = load_stage("6_finetune")


def best_rank(delta, r):
    """The rank-r matrix nearest to delta (Frobenius norm): U_r S_r V_r^T of its SVD, float64."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def with_rank(start, base, tuned, names, r):
    """Parameters: start's (the base's or the tuned ones), with W_base + (the best rank-r part of
    W_tuned - W_base) at every name. Also the share of the updates' squared norm kept."""
    params, kept, total = dict(start), 0.0, 0.0
    for n in names:
        delta = tuned[n].astype(np.float64) - base[n]
        part = best_rank(delta, r)
        params[n] = (base[n] + part).astype(base[n].dtype)
        kept, total = kept + float((part ** 2).sum()), total + float((delta ** 2).sum())
    return params, kept / total if total else 1.0


def lora_size(base, names, r):
    """Parameters a rank-r LoRA trains on these matrices: r (in + out) each."""
    return sum(r * sum(base[n].shape) for n in names)


def tuned_at(base, tuned, keys):
    """The base's parameters with the tuned arrays at keys."""
    return dict(base, **{k: tuned[k] for k in keys})


def variants(base, tuned, names, ranks):
    """(row name, parameters, squared-norm share kept or None, LoRA parameters or None): which
    arrays' updates answer, then each rank r of the target matrices' updates with the other arrays
    at the base's (what LoRA can change) and at the tuned ones, and each rank r of the embedding's
    update (with the readout, when it is a matrix of its own) with every other array tuned."""
    embedding = [n for n in ("embed.weight", "head.weight") if n in base]
    norms = [n for n in base if n not in names and n not in embedding]
    rows = [("base", base, None, None), ("fine-tuned (every array)", tuned, None, None),
            ("target matrices tuned, the rest base", tuned_at(base, tuned, names), None, None),
            ("the rest tuned, target matrices base", tuned_at(base, tuned, embedding + norms), None, None),
            ("target matrices and embedding tuned, the rest base", tuned_at(base, tuned, names + embedding),
             None, None),
            ("target matrices and the rest but the embedding tuned", tuned_at(base, tuned, names + norms),
             None, None)]
    for rest, start in (("base", base), ("tuned", tuned)):
        for r in ranks:
            params, kept = with_rank(start, base, tuned, names, r)
            rows.append((f"rank {r} of each target update, the rest {rest}", params, kept,
                         lora_size(base, names, r)))
    for r in ranks:
        params, kept = with_rank(tuned, base, tuned, embedding, r)
        rows.append((f"rank {r} of the embedding's update, the rest tuned", params, kept,
                     lora_size(base, embedding, r)))
    return rows


def largest_entries(base, tuned, share):
    """The base's parameters plus the largest share of the update's entries by |W_tuned - W_base|,
    over every array at once (what a sparse adapter of that many values could carry over), and
    how many entries that is."""
    delta = {n: tuned[n].astype(np.float64) - base[n] for n in base}
    k = max(1, int(share * sum(d.size for d in delta.values())))
    size = np.concatenate([np.abs(d).ravel() for d in delta.values()])
    cut = np.partition(size, -k)[-k]                     # the k-th largest |update|
    params = {n: (base[n] + np.where(np.abs(d) >= cut, d, 0.0)).astype(base[n].dtype)
              for n, d in delta.items()}
    return params, int((size >= cut).sum())


def block_and_kind(name):
    """'blocks.2.attn.wq' -> ('2', 'attn.wq'): a target matrix's block and kind."""
    _, block, kind = name.split(".", 2)
    return block, kind


def part_variants(base, tuned, names, sparse_share):
    """Rows that say where full fine-tuning's update lives, each with the embedding's update (without
    it the matrices answer nothing): each block's target matrices alone, every block but one, each
    kind of matrix in every block, attention and MLP; then the largest entries of the whole update."""
    embedding = [n for n in ("embed.weight", "head.weight") if n in base]
    where = {n: block_and_kind(n) for n in names}
    blocks = sorted({b for b, _ in where.values()}, key=int)
    kinds = list(dict.fromkeys(k for _, k in where.values()))          # attn.wq, ..., mlp.w2
    in_block = {b: [n for n in names if where[n][0] == b] for b in blocks}
    groups = [(f"block {b}'s target matrices", in_block[b]) for b in blocks]
    groups += [(f"every block's target matrices but block {b}'s", [n for n in names if n not in in_block[b]])
               for b in blocks]
    groups += [(f"every block's {k}", [n for n in names if where[n][1] == k]) for k in kinds]
    for part in ("attn", "mlp"):
        picked = [n for n in names if where[n][1].startswith(part + ".")]
        if picked:
            groups.append((f"every block's {part} matrices", picked))
    rows = [(f"{name} and the embedding tuned, the rest base", tuned_at(base, tuned, keys + embedding),
             None, None) for name, keys in groups]
    params, k = largest_entries(base, tuned, sparse_share)
    rows.append((f"the largest {100 * sparse_share:g}% of the update's entries (every array), the rest base",
                 params, None, k))
    return rows


def check_pair(base, tuned, mcfg, tuned_mcfg):
    """Same model, same arrays: else one ValueError naming the difference."""
    if mcfg != tuned_mcfg:
        raise ValueError("--tuned is not a fine-tuned copy of --base: their model configs differ")
    if set(base) != set(tuned) or any(base[n].shape != tuned[n].shape for n in base):
        raise ValueError("--tuned is not a fine-tuned copy of --base: their arrays differ")


def table(rows, n_total, decodings):
    heads = [f"EM {d}" for d in decodings]
    lines = ["| parameters | " + " | ".join(heads) + " | update kept (squared norm) | adapter parameters |",
             "|" + "---|" * (len(heads) + 3)]
    for name, scores, kept, size in rows:
        ems = [f"{100 * s['em']:.1f}% ± {100 * s['em_se']:.1f}" for s in scores]
        kept_cell = f"{100 * kept:.1f}%" if kept is not None else "-"
        size_cell = f"{size:,} ({100 * size / n_total:.2f}%)" if size else "-"
        lines.append(f"| {name} | " + " | ".join(ems) + f" | {kept_cell} | {size_cell} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the pretrained checkpoint fine-tuning started from")
    ap.add_argument("--tuned", required=True, help="stage 6's full fine-tuning of it (OUT_DIR/full.npz)")
    ap.add_argument("--ranks", default="1,2,4,8,16,32", help="comma-separated ranks r to cut each update to")
    ap.add_argument("--lora_targets", default=F.FinetuneConfig.lora_targets,
                    help="the block matrices LoRA adapts (stage 6's --lora_targets without embed: the "
                         "embedding has rows of its own)")
    ap.add_argument("--context_chars", type=int, default=0,
                    help="stage 6's --context_chars of the fine-tuning run (the held-out questions)")
    ap.add_argument("--prompt_order", default="question_first", choices=list(F.PROMPT_ORDERS),
                    help="stage 6's --prompt_order of the fine-tuning run")
    ap.add_argument("--qa", default="", help="stage 6's --qa: a Q&A file of your own (default: the pairs "
                    "generated from the base's corpus, as fine-tuning made them)")
    ap.add_argument("--eval_questions", type=int, default=400, help="held-out questions scored")
    ap.add_argument("--decodings", default="span,free", help=f"comma-separated, of {', '.join(F.DECODINGS)}")
    ap.add_argument("--parts", type=int, default=0, choices=[0, 1],
                    help="1: also rows that say where the update lives (each block's matrices, every block "
                         "but one, each kind of matrix, all with the embedding) and the largest --sparse "
                         "share of its entries (default 0)")
    ap.add_argument("--sparse", type=float, default=None,
                    help="with --parts 1: the share of the update's entries kept by size (default 0.01, "
                         "as many values as 1%% of the model)")
    ap.add_argument("--out", default="", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        ap.error(f"--ranks must be comma-separated whole numbers, got {args.ranks!r}")
    decodings = [d.strip() for d in args.decodings.split(",")]
    if min(ranks) < 1 or not set(decodings) <= set(F.DECODINGS):
        ap.error(f"--ranks must be >= 1 and --decodings of {', '.join(F.DECODINGS)}")
    if args.sparse is not None and not args.parts:
        ap.error("--sparse is a row of --parts 1: give both")
    sparse = 0.01 if args.sparse is None else args.sparse
    if not 0 < sparse <= 1:
        ap.error(f"--sparse must be in (0, 1], got {sparse:g}")
    if "embed" in [t.strip() for t in args.lora_targets.split(",")]:
        ap.error("--lora_targets: the block matrices only (the embedding has rows of its own)")
    try:
        cfg = F.FinetuneConfig(base=args.base, context_chars=args.context_chars, qa=args.qa,
                               prompt_order=args.prompt_order, eval_questions=args.eval_questions,
                               lora_targets=args.lora_targets)
        base, mcfg, config, tok = F.load_base(args.base)
        tuned, tuned_mcfg, _, _ = F.load_base(args.tuned)
        check_pair(base, tuned, mcfg, tuned_mcfg)
        pairs, source = F.qa_pairs(cfg, config, mcfg)
        _, test, _ = F.split_pairs(cfg, tok, pairs, source, cfg.max_len or max(128, mcfg.context))
    except F.S3.ERRORS as err:
        return F.fail(err)
    names = F.lora_names(base, args.lora_targets)
    todo = variants(base, tuned, names, ranks)
    if args.parts:
        todo += part_variants(base, tuned, names, sparse)
    rows = []
    for name, params, kept, size in tqdm(todo, desc="rows", unit="row"):
        scores = [F.qa_scores(params, mcfg, tok, test, cfg.max_answer_tokens, d, cfg.prompt_order)
                  for d in decodings]
        ems = ", ".join(f"{d} {100 * s['em']:.1f}%" for d, s in zip(decodings, scores))
        tqdm.write(f"{name}: {ems}")
        rows.append((name, scores, kept, size))
    n_total = sum(p.size for p in base.values())
    text = (f"{args.tuned} against {args.base}: {len(test)} held-out questions, stage 6's scoring (NumPy); "
            f"{cpu_model()}, {usable_cpus()} CPU cores\n\n" + table(rows, n_total, decodings))
    print(text)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
