"""Stage 5 data parallel: training tokens/s of one GPU and of two GPUs of one host (DDP, torchrun).

    python benchmarks/bench_ddp.py --out bench_ddp.md                 # base, batch 32, Triton + compile
    python benchmarks/bench_ddp.py --preset tiny --device cpu --kernels torch --compile 0 --steps 3

Each measurement runs in fresh processes (one: `python`, two: `torchrun --nproc_per_node 2`) that
time stage 5's own train_step on random tokens after warm-up steps (compilation, autotuning).
Rows: one process with global batch B; two processes with the same global batch B (B/2 each:
the same steps, so the same loss curve per token, up to float rounding); two processes with 2B
(B each: the per-GPU work of one GPU). Scaling efficiency = tokens/s / (GPUs x one GPU's tokens/s).
"loss gap" is the largest relative difference of the per-step losses from the one-process run
with the same global batch. Two-process rows need torch.cuda.device_count() >= 2.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spikelib.distributed import check_batch, join_group  # noqa: E402
from spikelib.files import atomic_write  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402
from spikelib.torch_io import resolve_run  # noqa: E402

S5 = load_stage("5_spike_llm_triton")
S3 = S5.S3


def measure(args):
    """In each process of a run: time args.steps training steps after args.warmup; rank 0 writes
    {"tokens_per_s", "losses", "device"} to args.result."""
    rc = S5.RunConfig(kernels=args.kernels, device=args.device, compile=bool(args.compile))
    run = resolve_run(rc, have_triton=S5.triton is not None)
    group, run = join_group(run)
    mcfg, tcfg = S3.make_configs(args.preset, batch_size=args.batch, dropout=0.0,
                                 max_steps=args.warmup + args.steps)
    check_batch(tcfg.batch_size, group.world, 1)
    data = np.random.default_rng(0).integers(0, mcfg.vocab_size, 1 << 22).astype(np.uint16)
    model = S5.build_model(mcfg, run)
    opt = S5.make_optimizer(model, tcfg)
    ddp = group.wrap(model) if group.world > 1 else None
    fwd = torch.compile(model if ddp is None else ddp) if run.compile else ddp

    def step(i):             # train_step reads its loss back (.item()): the GPU has finished the step
        return S5.train_step(model, opt, mcfg, tcfg, data, i, run.device, fwd, 1, group, ddp)[0]

    losses = [step(i) for i in range(args.warmup)]
    t0 = time.perf_counter()
    losses += [step(i) for i in range(args.warmup, args.warmup + args.steps)]
    seconds = time.perf_counter() - t0
    if group.main:
        name = torch.cuda.get_device_name(run.device) if run.device.startswith("cuda") else "CPU"
        result = {"tokens_per_s": args.steps * tcfg.batch_size * mcfg.context / seconds,
                  "losses": losses, "device": name}
        atomic_write(args.result, lambda f: f.write(json.dumps(result).encode()))
    group.leave()


def launch(args, procs, batch, result):
    """Run `measure` in fresh processes: one with python, several with torchrun; its result."""
    mine = ["--worker", "1", "--result", str(result), "--batch", str(batch), "--preset", args.preset,
            "--device", args.device, "--kernels", args.kernels, "--compile", str(args.compile),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    head = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                "--standalone", "--nproc_per_node", str(procs)]
    subprocess.run(head + [str(Path(__file__).resolve())] + mine, check=True)
    return json.loads(Path(result).read_text())


def table(args, rows):
    """The markdown table: one line per (processes, global batch)."""
    one = rows[0][2]
    lines = [f"stage 5 data parallel, preset {args.preset}, kernels {args.kernels}, compile {args.compile}, "
             f"{args.steps} timed steps after {args.warmup}, on {one['device']}", "",
             "| processes | global batch | tokens/s | speed-up | scaling efficiency "
             "| loss gap vs 1 process |",
             "|---|---|---|---|---|---|"]
    for procs, batch, r in rows:
        speedup = r["tokens_per_s"] / one["tokens_per_s"]
        gap = "-"
        if batch == args.batch and procs > 1:
            a, b = np.array(r["losses"]), np.array(one["losses"])
            gap = f"{np.abs(a - b).max() / np.abs(b).max():.1e}"
        lines.append(f"| {procs} | {batch} | {r['tokens_per_s']:,.0f} | {speedup:.2f}x | "
                     f"{speedup / procs:.0%} | {gap} |")
    if len(rows) == 1:
        lines += ["", "two processes: not measured (needs two CUDA GPUs on this host)"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", choices=list(S3.PRESETS), help="preset (default base)")
    ap.add_argument("--batch", type=int, default=32, help="global batch of the one-process run (default 32)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default auto")
    ap.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"), help="default auto")
    ap.add_argument("--compile", type=int, default=1, choices=(0, 1), help="torch.compile (default 1)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--out", default="bench_ddp.md", help="markdown table file (default bench_ddp.md)")
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("--steps >= 1, --warmup >= 0 and --batch >= 1")
    if args.worker:
        return measure(args)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(1, args.batch, launch(args, 1, args.batch, Path(tmp) / "one.json"))]
        on_gpus = args.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() >= 2
        for batch in ((args.batch, 2 * args.batch) if on_gpus else ()):
            rows.append((2, batch, launch(args, 2, batch, Path(tmp) / f"two_{batch}.json")))
    text = table(args, rows)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    print(text, end="")


if __name__ == "__main__":
    sys.exit(main())
