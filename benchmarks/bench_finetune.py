"""Stage 6 results table: pretrain `small` on a corpus (if no base checkpoint), then fine-tune it
with every method and print exact match / token F1 on held-out questions and the corpus BPC.

    python benchmarks/bench_finetune.py                                  # numpy everywhere (slow on 2 cores)
    python benchmarks/bench_finetune.py --backend triton --pretrain triton --pretrain_steps 6000 \
        --pretrain_batch 64 --pretrain_minutes 4                             # a CUDA GPU
    python benchmarks/bench_finetune.py --base out/numpy/ckpt.npz --max_steps 200
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.hardware import cpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

S3 = load_stage("3_spike_llm_numpy")
F = load_stage("6_finetune")


def hardware():
    cpu = f"{cpu_model()}, {usable_cpus()} CPU cores"
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} + {cpu}"
    except ImportError:
        pass
    return cpu


def pretrain(args):
    """Stage 3 (numpy) or stage 5 (triton) training of the `small` preset on args.data."""
    mcfg, tcfg = S3.make_configs("small", max_steps=args.pretrain_steps, max_minutes=args.pretrain_minutes,
                                 batch_size=args.pretrain_batch, out_dir=str(Path(args.base).parent))
    data = Path(args.data)
    if not (data / "tokens.json").exists():           # stages 1 and 2 for data/builtin, data/shakespeare
        S3.prepare_dataset(data.name, str(data.parent))
    t0 = time.time()
    if args.pretrain == "triton":
        S5 = load_stage("5_spike_llm_triton")
        from spikelib.torch_io import resolve_run
        run = resolve_run(S5.RunConfig(), have_triton=S5.triton is not None)
        S5.train(mcfg, tcfg, run, Path(args.data), Path(args.base))
    else:
        S3.train(mcfg, tcfg, Path(args.data), Path(args.base))
    print(f"pretrained {args.base} in {time.time() - t0:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="out/bench_finetune/base.npz")
    ap.add_argument("--data", default="data/builtin", help="a prepared dataset dir (stages 1 and 2)")
    ap.add_argument("--pretrain", default="numpy", choices=["numpy", "triton"])
    ap.add_argument("--pretrain_steps", type=int, default=500)
    ap.add_argument("--pretrain_minutes", type=float, default=0.0)
    ap.add_argument("--pretrain_batch", type=int, default=16)
    ap.add_argument("--backend", default="numpy", choices=list(F.BACKENDS))
    ap.add_argument("--methods", default="full,freeze,lora:8,lora:1", help="lora:R = LoRA of rank R")
    ap.add_argument("--max_steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.0, help="0 = each method's default")
    ap.add_argument("--out_dir", default="out/bench_finetune")
    args = ap.parse_args()
    if not Path(args.base).is_file():
        pretrain(args)
    rows = []
    for spec in args.methods.split(","):
        method, _, rank = spec.partition(":")
        cfg = F.FinetuneConfig(base=args.base, out_dir=f"{args.out_dir}/{spec.replace(':', '_r')}", method=method,
                               backend=args.backend, max_steps=args.max_steps, lr=args.lr)
        if rank:
            cfg = replace(cfg, lora_rank=int(rank), lora_alpha=2.0 * int(rank))
        print(f"\n=== {spec}")
        row = F.run(cfg, progress=True)
        row["method"] = spec
        rows.append(row)
    print(f"\nstage 6 on {args.data}, base {args.base}, {args.max_steps} steps each, backend {args.backend}; {hardware()}")
    print(F.print_table(rows))


if __name__ == "__main__":
    main()
