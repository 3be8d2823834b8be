"""Stage 0b's 32 neuron layers (4 output families x 8 prefix sets) and a plain LIF on a timing task.

    python benchmarks/bench_neuron_families.py                    # interval task, seeds 0 and 1
    python benchmarks/bench_neuron_families.py --task recall --seeds 0 --steps 300

Each family x prefix is trained from scratch with stage 0b's defaults (projection -> layer ->
LI readout, hand BPTT, Adam) for every seed; the runs are spread over --workers processes of one
BLAS thread each. The table gives the mean test accuracy over the seeds (and each seed's), the
mean spike rate (fraction of neurons x timesteps with a non-zero output; LI has none) and the
mean training seconds of one run.
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spikelib.hardware import cpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="interval", help="interval | recall (stage 0b's tasks)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds; the table averages them")
    ap.add_argument("--steps", type=int, default=600, help="Adam steps per run")
    ap.add_argument("--quant", default="round_ste", help="quantizer of the spiking families")
    ap.add_argument("--workers", type=int, default=min(2, usable_cpus()), help="processes")
    args = ap.parse_args(argv)
    nf = load_stage("0b_neuron_families")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        base = nf.Config(task=args.task, steps=args.steps, quant=args.quant)
        if args.workers < 1:
            raise ValueError(f"workers={args.workers} must be >= 1")
        if min(seeds) < 0:
            raise ValueError(f"seeds={args.seeds}: each must be >= 0")
    except ValueError as e:
        ap.error(str(e))
    runs = nf.table_runs()
    jobs = [(family, prefix, learn, replace(base, seed=seed)) for family, prefix, learn in runs
            for seed in seeds]
    print(f"# {cpu_model()}, {usable_cpus()} usable CPUs, {args.workers} worker processes x 1 BLAS thread")
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(tqdm(pool.map(nf.table_row, *zip(*jobs)), total=len(jobs), desc="runs",
                            ncols=100))
    rows = []
    for i, (family, prefix, learn) in enumerate(runs):
        mine = results[i * len(seeds):(i + 1) * len(seeds)]             # (name, prefix, acc, rate, s)
        accs = [r[2] for r in mine]
        rows.append((mine[0][0], mine[0][1], float(np.mean(accs)), float(np.mean([r[3] for r in mine])),
                     float(np.mean([r[4] for r in mine])), accs))
    print(nf.format_table(rows, base))


if __name__ == "__main__":
    main()
