"""TinyShakespeare bits per character of each neuron option of the LLM beside LIF and the ANN twin.

Every option trains the same preset for the same steps on the same batches (one seed), then is
evaluated on the WHOLE validation split (--eval_tokens 0, the stage's default, scores every token
of it, the tail window too) at the training context. Rows: LIF (the baseline), lits
(ternary with learned output scales), sigmoid4x with each quantizer (identity: the outputs are
probabilities, not spikes, and count as MACs), the S trace (syn_alpha 0.5), and the ANN twin.
--parallel N runs N rows at once (on a GPU with room for several models; figures are unchanged,
only the wall-clock is shared). --vocab_size V trains every row on a tokenizer of V pieces, built
first in a data root of its own (data_vV), so runs of different vocabularies never share files;
bits per character compare across vocabularies. The energy column is the stage's own report
(45 nm, per token; outputs that are not exactly binary or ternary counted as MACs).

    python benchmarks/bench_neuron_options.py --text tinyshakespeare.txt                 # small, CPU
    python benchmarks/bench_neuron_options.py --text tinyshakespeare.txt --backend triton --preset base \\
        --steps 1300 --extra "--kernels triton --compile 1 --lr 3e-4 --min_lr 3e-5 --dropout 0.2 --warmup 200"
    python benchmarks/bench_neuron_options.py --text tinyshakespeare.txt --vocab_size 1000 --only 0,2,7

The table goes to --out (Markdown) and to stdout; each run's log to --out_dir/NAME.log.
"""
import argparse
import platform
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spikelib.hardware import cpu_model, gpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

OPTIONS = [("LIF (baseline)", []),
           ("lits", ["--neuron", "lits"]),
           ("sigmoid4x + round_ste", ["--spike_fn", "sigmoid4x", "--quant", "round_ste"]),
           ("sigmoid4x + stochastic_round_ste",
            ["--spike_fn", "sigmoid4x", "--quant", "stochastic_round_ste"]),
           ("sigmoid4x + probabilistic_ste", ["--spike_fn", "sigmoid4x", "--quant", "probabilistic_ste"]),
           ("sigmoid4x + identity (not spikes)", ["--spike_fn", "sigmoid4x", "--quant", "identity"]),
           ("S trace 0.5", ["--syn_alpha", "0.5"]),
           ("ANN twin", ["--spiking", "0"])]
STAGES = {"numpy": "3_spike_llm_numpy.py", "triton": "5_spike_llm_triton.py"}
EVAL = re.compile(r"step (\d+): val @ context (\d+): .* ([\d.]+) bits/char")
ENERGY = re.compile(r"per token: spiking .* = ([\d.]+) nJ;\s+ANN twin .* = ([\d.]+) nJ")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--text", required=True, help="the TinyShakespeare text file")
    ap.add_argument("--backend", default="numpy", choices=list(STAGES),
                    help="numpy: stage 3 on this CPU; triton: stage 5 (give --extra its kernels/device)")
    ap.add_argument("--preset", default="small", help="model and schedule preset of the stage")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of every run (its schedule)")
    ap.add_argument("--eval_tokens", type=int, default=0, help="validation tokens (0: the whole split)")
    ap.add_argument("--vocab_size", type=int, default=0,
                    help="tokenizer vocabulary of every run, built first in data_vN (0: the stage's data "
                         "root and its tokenizer, 2,000 pieces unless built otherwise)")
    ap.add_argument("--only", default="", help="comma-separated row numbers to run (0-based), default all")
    ap.add_argument("--parallel", type=int, default=1, help="rows trained at the same time")
    ap.add_argument("--extra", default="", help="more options passed to every run, as one string")
    ap.add_argument("--out_dir", default="out/neuron_options", help="checkpoints and logs of the runs")
    ap.add_argument("--out", default="out/neuron_options/table.md", help="the Markdown table")
    args = ap.parse_args(argv)
    if not Path(args.text).is_file():
        ap.exit(2, f"error: --text {args.text}: no such file\n")
    if args.steps < 1 or args.parallel < 1 or args.eval_tokens < 0 or args.vocab_size < 0:
        ap.exit(2, "error: --steps and --parallel must be >= 1, --eval_tokens and --vocab_size >= 0\n")
    try:
        args.only = [int(i) for i in args.only.split(",")] if args.only else list(range(len(OPTIONS)))
    except ValueError:
        ap.exit(2, f"error: --only {args.only!r}: give row numbers such as 0,2,5\n")
    if any(not 0 <= i < len(OPTIONS) for i in args.only):
        ap.exit(2, f"error: --only: rows are 0..{len(OPTIONS) - 1}\n")
    return args


def vocab_options(args):
    """The stage options that point a run at the --vocab_size dataset (none without one)."""
    if not args.vocab_size:
        return []
    return ["--data_root", f"data_v{args.vocab_size}", "--vocab_size", str(args.vocab_size)]


def build_vocab_dataset(args):
    """Stages 1 and 2 for --text in data_vN with a tokenizer of N pieces (a no-op when built)."""
    data_dir = load_stage("1_data").prepare(f"files:{args.text}", f"data_v{args.vocab_size}")
    load_stage("2_tokenizer").build(data_dir, args.vocab_size)


def run_option(args, name, options):
    """Train and evaluate one row: (bits/char at the training context, its step, energy nJ, log)."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = Path(args.out_dir) / slug
    cmd = [sys.executable, str(ROOT / STAGES[args.backend]), "--preset", args.preset,
           "--source", f"files:{args.text}", "--max_steps", str(args.steps),
           "--eval_interval", str(args.steps),
           "--eval_tokens", str(args.eval_tokens), "--max_minutes", "0", "--max_new_tokens", "0",
           "--out_dir", str(out), "--overwrite", "1", *vocab_options(args),
           *shlex.split(args.extra), *options]
    log = Path(args.out_dir) / f"{slug}.log"
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    evals = [(int(s), int(c), float(b)) for s, c, b in EVAL.findall(proc.stdout)]
    if proc.returncode or not evals:
        return None, None, None, log
    context = min(c for _, c, _ in evals)
    step, _, bpc = [e for e in evals if e[1] == context][-1]
    energy = ENERGY.search(proc.stdout)
    nj = float(energy.group(2 if "--spiking" in options else 1)) if energy else None
    return bpc, step, nj, log


def main(argv=None):
    args = parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.vocab_size:
        try:
            build_vocab_dataset(args)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    rows = []
    with ThreadPoolExecutor(args.parallel) as pool:                 # each row is its own process
        results = pool.map(lambda i: run_option(args, *OPTIONS[i]), args.only)
        for i, (bpc, step, nj, log) in zip(args.only, tqdm(results, total=len(args.only), desc="options")):
            name, options = OPTIONS[i]
            if bpc is None:
                print(f"error: {name} failed; see {log}", file=sys.stderr)
            rows.append((name, " ".join(options) or "-", bpc, step, nj))
    machine = f"CPU {cpu_model()} ({usable_cpus()} usable cores)"
    if args.backend != "numpy" and gpu_model():
        machine = f"GPU {gpu_model()}, " + machine
    if args.parallel > 1:
        machine += f", {args.parallel} runs at a time"
    text = f"first {args.eval_tokens} validation tokens" if args.eval_tokens else "whole validation split"
    vocab = f", vocabulary {args.vocab_size}" if args.vocab_size else ""
    lines = [f"{args.preset}, {args.backend}, {args.steps} steps{vocab}, {text}; "
             f"{machine}, Python {platform.python_version()}"
             + (f"; options {args.extra}" if args.extra else ""), "",
             "| option | flags | val bits/char | step | energy nJ/token |", "|---|---|---|---|---|"]
    for name, flags, bpc, step, nj in rows:
        lines.append(f"| {name} | `{flags}` | {'failed' if bpc is None else f'{bpc:.4f}'} | {step or '-'} | "
                     f"{'-' if nj is None else f'{nj:.2f}'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r[2] is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
