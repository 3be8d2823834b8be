"""Stage 6's generated Q&A prompts against a model's memory: how far the question (or the answer)
sits from <a>, and how many pairs a model that sees only its last MEMORY prompt tokens cannot tell
apart. No training: the pairs are generated as stage 6 generates them (its defaults) and tokenized.

    python benchmarks/bench_qa_memory.py                           # builtin corpus, small's memory
    python benchmarks/bench_qa_memory.py --data data/shakespeare --context_chars 1,512

MEMORY defaults to the slowest head of a preset, about 2^(decay_start + decay_step (H - 1))
positions (small: 2^5.5 ~ 45). Per --context_chars value: the median pair length (prompt and
answer), with the question first the median distance from the question's end to <a>, with the
context first the median distance from the answer's start to <a> and the share within MEMORY, and
for each order the share of pairs whose last MEMORY prompt tokens equal those of a pair with
another answer. Then the held-out answers that span decoding cannot give in the form they are
trained in: no span of stage 6's span_source, and of the context's own tokens.
"""
import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.qa_data import corpus_text, generate_qa  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

S3 = load_stage("3_spike_llm_numpy")
F = load_stage("6_finetune")


def clash_share(encoded, memory):
    """Share of pairs whose last `memory` prompt tokens are shared by a pair with another answer."""
    answers = defaultdict(set)
    for prompt, answer in encoded:
        answers[tuple(prompt[-memory:])].add(tuple(answer))
    return float(np.mean([len(answers[tuple(prompt[-memory:])]) > 1 for prompt, _ in encoded]))


def is_span(part, tokens):
    return any(tokens[i:i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def no_spans(tok, pairs):
    """{kind: [held-out answers, no span of stage 6's span_source, no span of the context's own
    tokens]}: answers, in the form they are trained (" " + answer), that span decoding cannot give."""
    out = {}
    for p in pairs:
        if p["split"] == "test" and p["answer"]:
            trained = tok.encode(" " + p["answer"])
            row = out.setdefault(p["kind"], [0, 0, 0])
            row[0] += 1
            row[1] += not is_span(trained, F.span_source(tok, p["context"]))
            row[2] += not is_span(trained, tok.encode(p["context"]))
    return out


def measure(tok, text, separator, context_chars, memory):
    """One row of figures for pairs generated with context_chars."""
    cfg = F.FinetuneConfig()
    pairs = generate_qa(text, separator, "", cfg.max_questions, cfg.test_fraction, context_chars,
                        cfg.no_answer)
    q_first = [F.encode_pair(tok, p, "question_first") for p in pairs]
    c_first = [F.encode_pair(tok, p, "context_first") for p in pairs]
    question_gap = [len(tok.encode(p["context"])) + 1 for p in pairs]          # context and "\n"
    answer_gap = []                                  # context first: the answer's start -> <a>
    for p, (prompt, _) in zip(pairs, c_first):
        if p["answer"]:
            start = p["context"].find(p["answer"])
            answer_gap.append(len(prompt) - 2 - len(tok.encode(p["context"][:start])))   # <q> ... <a>
    kinds = Counter(p["kind"] for p in pairs).most_common()
    return {"pairs": len(pairs), "kinds": kinds, "held_out": sum(p["split"] == "test" for p in pairs),
            "no_spans": no_spans(tok, pairs),
            "median_tokens": float(np.median([len(a) + len(b) for a, b in q_first])),
            "question_gap": float(np.median(question_gap)), "answer_gap": float(np.median(answer_gap)),
            "answer_within": float(np.mean(np.array(answer_gap) <= memory)),
            "clash_q": clash_share(q_first, memory), "clash_c": clash_share(c_first, memory)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/builtin", help="a dataset dir of stages 1 and 2 (prepared if "
                                                              "it is data/builtin or data/shakespeare)")
    ap.add_argument("--preset", default="small", choices=list(S3.PRESETS),
                    help="the stage 3 preset whose slowest head sets MEMORY")
    ap.add_argument("--memory", type=int, default=0, help="MEMORY in tokens (0: the preset's slowest head)")
    ap.add_argument("--context_chars", default="1,128,512", help="comma-separated stage 6 --context_chars")
    args = ap.parse_args()
    try:
        widths = [int(c) for c in args.context_chars.split(",")]
    except ValueError:
        ap.error(f"--context_chars {args.context_chars!r}: give numbers such as 1,128,512")
    if args.memory < 0 or any(c < 1 for c in widths):
        ap.error("--memory must be >= 0 and every --context_chars >= 1")
    data = Path(args.data)
    if not (data / "tokens.json").exists():
        if data.name not in ("builtin", "shakespeare"):
            ap.error(f"--data {data}: not a prepared dataset (run stages 1 and 2 on it first)")
        S3.prepare_dataset(data.name, str(data.parent))
    mcfg = S3.make_configs(args.preset)[0]
    memory = args.memory or round(2 ** (mcfg.decay_start + mcfg.decay_step * (mcfg.n_head - 1)))
    tok = S3.load_dataset_info(data)[1]
    text, separator = corpus_text(data)                             # as stage 6 reads the corpus
    print(f"{data}, MEMORY {memory} tokens\n")
    print("| --context_chars | pairs | median tokens | question -> <a> (question first) "
          "| answer start -> <a> (context first) | within MEMORY | clash, question first "
          "| clash, context first |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {c: measure(tok, text, separator, c, memory) for c in widths}
    for c, r in rows.items():
        print(f"| {c} | {r['pairs']:,} | {r['median_tokens']:.0f} | {r['question_gap']:.0f} | "
              f"{r['answer_gap']:.0f} | {100 * r['answer_within']:.0f}% | {100 * r['clash_q']:.1f}% | "
              f"{100 * r['clash_c']:.1f}% |")
    print()
    for c, r in rows.items():   # "none" depends on the width: a wider context holds the answer more often
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in r["kinds"])
        print(f"pairs by kind at --context_chars {c}: {kinds}; {r['held_out']:,} held out")
    print("\n| --context_chars | held-out answers | no span of span_source | no span of the context's own "
          "tokens | by kind: answers, no span of either |")
    print("|---|---|---|---|---|")
    for c, r in rows.items():
        total = [sum(row[i] for row in r["no_spans"].values()) for i in range(3)]
        kinds = ", ".join(f"{kind} {n:,}: {a:,}, {b:,}" for kind, (n, a, b) in sorted(r["no_spans"].items()))
        print(f"| {c} | {total[0]:,} | {total[1]:,} | {total[2]:,} | {kinds} |")


if __name__ == "__main__":
    main()
