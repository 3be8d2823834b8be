"""Training throughput and peak memory of the NumPy spiking LLM (stage 3) on this CPU.

    python benchmarks/bench_numpy.py                    # presets small and seed
    python benchmarks/bench_numpy.py --presets small --steps 5

Each preset runs in its own process (so peak memory is its own): one warm-up step, then
--steps timed training steps (forward, backward, clipping, AdamW) on random tokens with the
preset's batch size and context. Peak memory: ru_maxrss of that process and the tracemalloc
peak of the timed steps (NumPy reports its array allocations to tracemalloc).
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spikelib.hardware import cpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402


def measure(preset, steps, vocab):
    """Timed training steps of one preset in this process; returns a result dict."""
    m = load_stage("3_spike_llm_numpy")
    mcfg, tcfg = m.make_configs(preset, vocab_size=vocab)
    data = np.random.default_rng(0).integers(0, vocab, 200_000).astype(np.uint16)
    params = m.init_params(mcfg, tcfg.seed)
    opt = m.init_opt_state(params)
    m.train_step(params, opt, mcfg, tcfg, data, 0)              # warm-up (caches, BLAS threads)
    tracemalloc.start()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        m.train_step(params, opt, mcfg, tcfg, data, step)
    seconds = (time.perf_counter() - t0) / steps
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tokens = tcfg.batch_size * mcfg.context
    return {"preset": preset, "params_M": sum(p.size for p in params.values()) / 1e6,
            "batch": tcfg.batch_size, "context": mcfg.context, "T": mcfg.T,
            "s_per_step": seconds, "tokens_per_s": tokens / seconds,
            "traced_peak_MB": traced_peak / 2**20,
            "max_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,seed",
                    help="stage 3 presets, comma-separated, each in its own process (default small,seed)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per preset (default 3)")
    ap.add_argument("--vocab", type=int, default=2000,
                    help="vocabulary size of the random tokens (default 2000)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one preset, print JSON
    args = ap.parse_args(argv)
    presets = load_stage("3_spike_llm_numpy").PRESETS
    unknown = [p for p in args.presets.split(",") if p not in presets]
    if unknown:
        ap.error(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(presets)}")
    if args.steps < 1 or args.vocab < 2:
        ap.error("--steps must be >= 1 and --vocab >= 2")
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.vocab)))
        return
    print(f"CPU: {cpu_model()} ({usable_cpus()} usable cores), Python {platform.python_version()}, "
          f"NumPy {np.__version__}")
    print(f"{'preset':8} {'params':>8} {'batch x ctx':>12} {'T':>2} {'s/step':>8} {'tokens/s':>9} "
          f"{'tracemalloc peak':>17} {'max RSS':>9}")
    for preset in args.presets.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", preset, "--steps", str(args.steps),
                              "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['preset']:8} {r['params_M']:7.2f}M {r['batch']:>5} x {r['context']:<5} {r['T']:>2} "
              f"{r['s_per_step']:8.2f} {r['tokens_per_s']:9.0f} {r['traced_peak_MB']:14.0f} MB "
              f"{r['max_rss_MB']:6.0f} MB")


if __name__ == "__main__":
    main()
