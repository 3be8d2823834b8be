"""Training throughput of the MLX port (stage 4) against the NumPy reference (stage 3).

    python benchmarks/bench_mlx.py                      # preset small, this machine's CPU
    python benchmarks/bench_mlx.py --preset tiny --rounds 3 --steps 4
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/bench_mlx.py   # Linux
    python benchmarks/bench_mlx.py --device cpu         # Apple Silicon: MLX on the CPU cores

On Apple Silicon MLX's default device is the Metal GPU, so the plain command compares NumPy on
the CPU with MLX on the GPU (the header names the device). On Linux the mlx[cpu] wheel links the
reference BLAS, which multiplies matrices about 10x slower than the OpenBLAS inside NumPy; the
header says which BLAS MLX used, and preloading OpenBLAS (apt install libopenblas0) fixes it.
Both stages then spend most of a step in the same sgemm calls, so on a CPU expect similar
speeds; on a busy machine multi-threaded BLAS in NumPy suffers most, and OPENBLAS_NUM_THREADS=1
(read by both OpenBLAS copies) gives a comparison that other load disturbs least.

Both stages run the same preset, the same parameters and the same batches (random tokens of
the preset's vocabulary, batch size and context) in one process. One full training step is
forward, backward, gradient clipping and AdamW. After a warm-up step each (stage 4's warm-up
includes tracing and compiling its step), the two are timed in alternating rounds, so that
any other load on the machine slows both alike; the table gives the median round of each.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spikelib.hardware import cpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

ref = load_stage("3_spike_llm_numpy")
m4 = load_stage("4_spike_llm_mlx")



def mlx_blas():
    """Which BLAS MLX's CPU matmuls go to (Linux: read from the libraries mapped into us)."""
    if sys.platform != "linux":
        return "the platform BLAS"
    return "the wheel's reference BLAS" if m4.blas_hint() else "OpenBLAS"


def timed(run_steps, start, steps):
    t0 = time.perf_counter()
    run_steps(start, start + steps)
    return (time.perf_counter() - t0) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=list(ref.PRESETS),
                    help="model preset (default small)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and stage")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is reported)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default=None, help="MLX device (default: MLX's own)")
    ap.add_argument("--skip_numpy", action="store_true", help="time stage 4 only (large presets)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    if args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)

    mcfg, tcfg = ref.make_configs(args.preset)                # vocabulary: the preset's (small: 2000)
    data = np.random.default_rng(0).integers(0, mcfg.vocab_size, 200_000).astype(np.uint16)
    params = ref.init_params(mcfg, tcfg.seed)
    tokens = tcfg.batch_size * mcfg.context

    np_params = {k: v.copy() for k, v in params.items()}
    np_opt = ref.init_opt_state(np_params)

    def numpy_steps(start, stop):
        for step in range(start, stop):
            ref.train_step(np_params, np_opt, mcfg, tcfg, data, step)

    model = m4.build_model(mcfg, params)
    opt = m4.AdamW(model, tcfg)
    step_fn = m4.make_train_step(model, opt, tcfg)

    def mlx_steps(start, stop):
        for step in range(start, stop):
            m4.train_step(model, opt, step_fn, mcfg, tcfg, data, step)

    stages = {"stage 3 NumPy": numpy_steps, "stage 4 MLX": mlx_steps}
    if args.skip_numpy:
        del stages["stage 3 NumPy"]
    seconds = {name: [] for name in stages}
    warmup = {name: timed(fn, 0, 1) for name, fn in stages.items()}
    for r in range(args.rounds):
        for name, fn in stages.items():
            seconds[name].append(timed(fn, 1 + r * args.steps, args.steps))

    n_params = sum(p.size for p in params.values())
    print(f"\npreset {args.preset}: {n_params / 1e6:.2f} M params, "
          f"batch {tcfg.batch_size} x context {mcfg.context} = {tokens} tokens/step, "
          f"T={mcfg.T}, {mcfg.neuron}, {mcfg.attention} attention")
    print(f"CPU: {cpu_model()} ({platform.machine()}, {usable_cpus()} usable cores), numpy {np.__version__}, "
          f"mlx {mx.__version__} on {mx.default_device()} with {mlx_blas()}; "
          f"{args.rounds} rounds x {args.steps} steps, median round\n")
    print(f"{'':14} {'s/step':>8} {'tokens/s':>10} {'first step s':>13} {'speed-up':>9}")
    base = statistics.median(seconds["stage 3 NumPy"]) if "stage 3 NumPy" in seconds else None
    for name, s in seconds.items():
        med = statistics.median(s)
        speed = f"{base / med:8.1f}x" if base else "        -"
        print(f"{name:14} {med:8.3f} {tokens / med:10.0f} {warmup[name]:13.2f} {speed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
