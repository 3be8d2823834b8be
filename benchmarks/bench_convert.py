"""Conversion against direct training (stage 7): train the ANN twin, convert it, fine-tune it at T = 4,
and train the same-size SNN directly, on TinyShakespeare; one table of bits/char, spike rate, energy
per token and wall-clock, written to OUT/bench_convert.json.

    python benchmarks/bench_convert.py --source files:path/to/tinyshakespeare.txt          # CPU, small
    python benchmarks/bench_convert.py --source files:path/to/tinyshakespeare.txt \\
        --backend triton --preset base --batch_size 32 --steps 1300 --eval_tokens 0 --two_gpus 1 \\
        --sweep 1,2,4,8,16,32,64 --extra "--compile 1 --lr 3e-4 --min_lr 3e-5 --dropout 0.2 --warmup 200"

CPU defaults (preset small, batch 8, 120 ANN and 120 SNN steps, fine-tuning 20% of those, scoring the
first 1,024 validation tokens) are sized for a 2-core machine; the GPU line scores the whole split.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spikelib.files import atomic_write  # noqa: E402
from spikelib.hardware import cpu_model, gpu_model, usable_cpus  # noqa: E402
from spikelib.runs import prepare_dataset  # noqa: E402


def timed(cmd, gpu=None):
    """Run a stage as a subprocess (on GPU `gpu` alone if given); its wall-clock seconds (it must
    succeed)."""
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}))
    t0 = time.time()
    if subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env).returncode:
        raise SystemExit(f"error: {cmd[0]} failed (its own message is above): {' '.join(cmd)}")
    return time.time() - t0


def gpu_count():
    """CUDA GPUs torch sees here (0 without torch)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="dataset for stage 1, e.g. files:PATH")
    ap.add_argument("--preset", default="small", help="model size (stage 3 preset)")
    ap.add_argument("--backend", default="numpy", choices=["numpy", "torch", "triton"],
                    help="numpy: stage 3; torch/triton: stage 5 (training, conversion scoring, fine-tuning)")
    ap.add_argument("--steps", type=int, default=120, help="training steps of the ANN and of the direct SNN")
    ap.add_argument("--batch_size", type=int, default=8, help="sequences per training step")
    ap.add_argument("--finetune_frac", type=float, default=0.2, help="fine-tuning steps / --steps")
    ap.add_argument("--eval_tokens", type=int, default=1024, help="validation tokens scored (0: all)")
    ap.add_argument("--sweep", default="1,2,4,8,16,32", help="T of the converted model to score")
    ap.add_argument("--extra", default="", help="more options for both training runs, as one string")
    ap.add_argument("--two_gpus", type=int, default=0, choices=(0, 1),
                    help="1: train the ANN on GPU 0 and the direct SNN on GPU 1 at the same time (each "
                         "timed on its own GPU)")
    ap.add_argument("--out", default="out/bench_convert", help="folder for checkpoints and results")
    args = ap.parse_args()
    if args.two_gpus and (args.backend == "numpy" or gpu_count() < 2):
        ap.error("--two_gpus 1 needs --backend torch or triton and two CUDA GPUs")
    out = Path(args.out)
    stage = ["3_spike_llm_numpy.py"] if args.backend == "numpy" else ["5_spike_llm_triton.py", "--kernels",
                                                                       args.backend]
    common = ["--preset", args.preset, "--source", args.source, "--data_root", str(out / "data"),
              "--batch_size", str(args.batch_size), "--max_steps", str(args.steps), "--max_minutes", "0",
              "--eval_interval", str(10 * args.steps), "--max_new_tokens", "0", "--overwrite", "1",
              *shlex.split(args.extra)]
    try:
        prepare_dataset(args.source, str(out / "data"))      # once, untimed: both runs then only train
    except (OSError, ValueError) as err:
        ap.exit(2, f"error: {err}\n")
    runs = [(stage + common + ["--spiking", "0", "--out_dir", str(out / "ann")], 0),
            (stage + common + ["--out_dir", str(out / "snn")], 1)]
    if args.two_gpus:                # both at once, each timed by its own thread on its own GPU
        with ThreadPoolExecutor(2) as pool:
            ann_s, snn_s = pool.map(lambda run: timed(*run), runs)
    else:
        ann_s, snn_s = (timed(cmd) for cmd, _ in runs)
    ft = max(1, int(args.finetune_frac * args.steps))
    convert_s = timed(["7_convert.py", "--ckpt", str(out / "ann" / "ckpt.npz"),
                       "--out", str(out / "conv.npz"),
                       "--report", str(out / "report.json"), "--sweep", args.sweep, "--eval_tokens",
                       str(args.eval_tokens), "--finetune_steps", str(ft), "--backend", args.backend,
                       "--compare", str(out / "snn" / "ckpt.npz"), "--plot", "1", "--overwrite", "1"])
    report = json.loads((out / "report.json").read_text())
    gpu = gpu_model() if args.backend != "numpy" else ""
    hardware = (f"{gpu} + " if gpu else "") + f"{cpu_model()} ({usable_cpus()} cores)"
    result = {"hardware": hardware, "args": vars(args), "ann_train_s": ann_s,
              "snn_train_s": snn_s, "convert_and_finetune_s": convert_s, "report": report}
    atomic_write(out / "bench_convert.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    ann = report["ann"]["bpc"]
    print(f"\n{'model':30} {'T':>3} {'bits/char':>9} {'vs ANN':>8} {'spikes':>7} {'nJ/token':>9}")
    rows = [("ANN twin", report["ann"])] + [("converted", r) for r in report["converted"]]
    rows += [(f"converted + {ft} steps", report["finetuned"]),
             (f"direct SNN, {args.steps} steps", report["direct"])]
    for name, r in rows:
        print(f"{name:30} {r['T']:>3} {r['bpc']:9.4f} {r['bpc'] - ann:+8.4f} {r['spike_rate']:7.3f} "
              f"{r['energy_nj']:9.2f}")
    calib_s, ft_s = report["calibration_seconds"], report["finetuned"]["seconds"]
    made = ann_s + calib_s + ft_s
    print(f"wall-clock to a T = 4 model: ANN {ann_s:.0f} s + calibration {calib_s:.0f} s"
          f" + fine-tuning {ft_s:.0f} s = {made:.0f} s against the direct SNN's "
          f"{snn_s:.0f} s (stage 7 as a whole, with scoring every swept T: {convert_s:.0f} s)")


if __name__ == "__main__":
    main()
