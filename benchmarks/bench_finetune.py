"""Stage 6 results table: pretrain a preset on a corpus (if no base checkpoint), then fine-tune it
with every method (corpus replay in the batches) and write exact match / F1 with span, free and
majority decoding, answerable and unanswerable questions apart, and the corpus BPC before and after.
A base whose pretraining was cut short (stopped before its last step with no time limit) is not
fine-tuned: --resume 1 pretrains it on from where it stopped, with its own schedule.

    python benchmarks/bench_finetune.py                                  # numpy everywhere (slow on 2 cores)
    python benchmarks/bench_finetune.py --pretrain triton --backend triton --pretrain_steps 1500 \
        --pretrain_batch 64 --pretrain_context 256 --pretrain_decay_step 2.33 --pretrain_token_shift 1 \
        --pretrain_set neuron=ternary --batch_size 64 --replay 0.5 --fresh_copies 0.5 \
        --prompt_order question_first --context_chars 128 --methods full --max_steps 6000 --lr 3e-3 \
        --out qa_results.md                                    # the best (8 minutes on a shared H200)
    python benchmarks/bench_finetune.py --base out/numpy/ckpt.npz --max_steps 200
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.cli import field_setting, parse_bool, resumed_config  # noqa: E402
from spikelib.files import write_text_atomic  # noqa: E402
from spikelib.finetune_io import qa_table  # noqa: E402
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


def pretrain_configs(args):
    """Stage 3's (model, train) configs of the base to pretrain; a bad field is a ValueError."""
    more = {"context": args.pretrain_context} if args.pretrain_context else {}
    more.update({"decay_step": args.pretrain_decay_step} if args.pretrain_decay_step else {})
    more.update({"token_shift": True} if args.pretrain_token_shift else {})
    more.update(dict(args.pretrain_set))
    more.update({"lr": args.pretrain_lr, "min_lr": args.pretrain_lr / 10} if args.pretrain_lr else {})
    return S3.make_configs(args.preset, max_steps=args.pretrain_steps, batch_size=args.pretrain_batch,
                           max_minutes=args.pretrain_minutes, repeat=args.pretrain_repeat,
                           out_dir=str(Path(args.base).parent), **more)


def method_configs(args):
    """(spec, stage 6 config) of every --methods entry; a bad option is a ValueError."""
    configs = []
    for spec in args.methods.split(","):
        method, _, rank = spec.partition(":")
        if rank and not rank.isdigit():
            raise ValueError(f"--methods: {spec!r}: the rank R of lora:R must be a whole number")
        cfg = F.FinetuneConfig(base=args.base, out_dir=f"{args.out_dir}/{spec.replace(':', '_r')}",
                               method=method, backend=args.backend, max_steps=args.max_steps,
                               batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                               replay=args.replay, eval_questions=args.eval_questions, seed=args.seed,
                               prompt_order=args.prompt_order, context_chars=args.context_chars,
                               copy_questions=args.copy_questions, fresh_copies=args.fresh_copies,
                               no_answer=args.no_answer, lora_targets=args.lora_targets,
                               lora_tokens=args.lora_tokens)
        configs.append((spec, replace(cfg, lora_rank=int(rank), lora_alpha=2.0 * int(rank)) if rank else cfg))
    return configs


def cut_short(path):
    """The saved pretraining record (a dict, its step included) of the checkpoint at path when that
    pretraining stopped before its last step with no time limit (killed, Ctrl-C or SIGTERM), else None.
    Stages 3 to 5 save at every evaluation, so such a file exists, and fine-tuning it would start
    from part of a base. A base stopped by its own time limit (--pretrain_minutes) is done."""
    if not Path(path).is_file():
        return None
    train = S3.load_model(path)[2]
    cut = train.get("step", 0) < train.get("max_steps", 0) and not train.get("max_minutes")
    return train if cut else None


def pretrain(args, mcfg, tcfg, resume=False):
    """Stage 3 (numpy) or stage 5 (triton) training of args.preset on args.data; resume: from the
    base's own checkpoint, its model config and step."""
    data = Path(args.data)
    if not (data / "tokens.json").exists():           # stages 1 and 2 for data/builtin, data/shakespeare
        S3.prepare_dataset(data.name, str(data.parent))
    t0 = time.time()
    if args.pretrain == "triton":
        S5 = load_stage("5_spike_llm_triton")
        from spikelib.torch_io import resolve_run
        run = resolve_run(S5.RunConfig(), have_triton=S5.triton is not None)
        S5.train(mcfg, tcfg, run, Path(args.data), Path(args.base), resume=resume)
    else:
        S3.train(mcfg, tcfg, Path(args.data), Path(args.base), resume=resume)
    print(f"pretrained {args.base} in {time.time() - t0:.0f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="out/bench_finetune/base.npz",
                    help="the pretrained checkpoint every method starts from (pretrained here if missing; "
                         "if its pretraining was cut short, see --resume)")
    ap.add_argument("--data", default="data/builtin", help="a prepared dataset dir (stages 1 and 2)")
    ap.add_argument("--pretrain", default="numpy", choices=["numpy", "triton"],
                    help="stage that pretrains a missing base: 3 (numpy) or 5 (triton)")
    ap.add_argument("--pretrain_steps", type=int, default=500, help="steps of the pretraining schedule")
    ap.add_argument("--pretrain_minutes", type=float, default=0.0,
                    help="stop pretraining after this wall time (0 = no limit)")
    ap.add_argument("--pretrain_batch", type=int, default=16, help="sequences per pretraining step")
    ap.add_argument("--preset", default="small", help="stage 3 preset pretrained when --base is missing")
    ap.add_argument("--pretrain_context", type=int, default=0, help="its context in tokens; 0 = the preset's")
    ap.add_argument("--pretrain_token_shift", type=int, choices=(0, 1), default=0,
                    help="1: the base it pretrains has stage 3's --token_shift (keys and values also "
                         "read the previous position's spikes: one-layer key-value binding)")
    ap.add_argument("--pretrain_decay_step", type=float, default=0.0,
                    help="stage 3's --decay_step of a base it pretrains (0 = the preset's): head h "
                         "remembers about 2^(decay_start + decay_step h) positions")
    ap.add_argument("--pretrain_set", type=field_setting(S3.ModelConfig), action="append", default=[],
                    metavar="NAME=VALUE", help="any other model field of a base it pretrains, e.g. "
                    "--pretrain_set neuron=ternary (repeatable)")
    ap.add_argument("--pretrain_lr", type=float, default=0.0,
                    help="peak learning rate of a base it pretrains, the cosine ending at a tenth (0 = the "
                         "preset's)")
    ap.add_argument("--pretrain_repeat", type=float, default=0.0,
                    help="stage 3's --repeat of a base it pretrains: the share of windows that read a "
                         "passage twice, a drill for copying from the context")
    ap.add_argument("--backend", default="numpy", choices=list(F.BACKENDS),
                    help="stage 6's --backend: the model that gives gradients and scores the answers")
    ap.add_argument("--context_chars", type=int, default=0,
                    help="stage 6's --context_chars for the generated pairs (0 = 2 x the model's context)")
    ap.add_argument("--prompt_order", default="question_first", choices=list(F.PROMPT_ORDERS),
                    help="stage 6's --prompt_order: <q> question \\n context <a>, the context first, or the "
                         "question before and after the context")
    ap.add_argument("--copy_questions", type=int, default=1,
                    help="stage 6's --copy_questions: \"What follows\" questions per sentence (past the "
                         "first: training only, from sentences without a held-out question)")
    ap.add_argument("--fresh_copies", type=float, default=0.0,
                    help="stage 6's --fresh_copies: the share of each batch that is \"What follows\" "
                         "questions drawn anew every step")
    ap.add_argument("--no_answer", type=float, default=F.FinetuneConfig.no_answer,
                    help="stage 6's --no_answer: the share of questions also asked of another text, "
                         "whose answer is none")
    ap.add_argument("--methods", default="full,freeze,lora:8,lora:1",
                    help="lora:R = LoRA of rank R with alpha 2R (scale alpha / R = 2 at every rank)")
    ap.add_argument("--lora_targets", default=F.FinetuneConfig.lora_targets,
                    help=f"stage 6's --lora_targets: what LoRA adapts, of {', '.join(F.LORA_TARGETS)}")
    ap.add_argument("--lora_tokens", default=F.FinetuneConfig.lora_tokens,
                    help="stage 6's --lora_tokens: special tokens whose embedding rows LoRA also trains "
                         "in full, e.g. <q>,<a>,<eos>")
    ap.add_argument("--max_steps", type=int, default=300, help="fine-tuning steps of every method")
    ap.add_argument("--batch_size", type=int, default=16, help="Q&A pairs per fine-tuning step")
    ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (less memory)")
    ap.add_argument("--lr", type=float, default=0.0, help="0 = each method's default")
    ap.add_argument("--replay", type=float, default=0.5, help="corpus windows per Q&A pair in each batch")
    ap.add_argument("--eval_questions", type=int, default=400, help="held-out questions scored")
    ap.add_argument("--seed", type=int, default=0,
                    help="stage 6's --seed: the order of the batches, the fresh questions and LoRA's start")
    ap.add_argument("--out", default="", help="also write the markdown tables to this file")
    ap.add_argument("--out_dir", default="out/bench_finetune", help="outputs of each method: OUT_DIR/METHOD")
    ap.add_argument("--resume", type=parse_bool, default=False, metavar="0|1",
                    help="1: a method stopped by Ctrl-C or SIGTERM continues from its saved state (stage 6's "
                         "--resume), the others run anew; a base whose pretraining was cut short is "
                         "pretrained on with its own schedule first (default 0)")
    args = ap.parse_args(argv)
    if min(args.context_chars, args.pretrain_decay_step, args.pretrain_lr) < 0 or args.copy_questions < 1:
        ap.error("--context_chars, --pretrain_decay_step and --pretrain_lr must be >= 0, "
                 "--copy_questions >= 1")
    try:                                         # every option checked before any work: one line
        base_configs = pretrain_configs(args)
    except ValueError as e:                      # stage 3's names: --max_steps is --pretrain_steps here
        ap.error(f"the base to pretrain (--preset, --pretrain_*): {e}")
    try:
        configs = method_configs(args)
    except ValueError as e:
        ap.error(str(e))
    rows = []
    try:                  # a base or dataset that does not fit (its tokenizer, a missing file): one line
        cut = cut_short(args.base)
        if cut and not args.resume:
            raise ValueError(f"{args.base} stopped pretraining at step {cut['step']} of {cut['max_steps']}: "
                             "pretrain it on with --resume 1, or remove it to pretrain anew")
        if cut:                  # as stage 3's --resume 1: the run keeps its own schedule, its step on
            mcfg, tcfg = base_configs
            pretrain(args, mcfg, resumed_config(S3.TrainConfig, cut, {"out_dir": tcfg.out_dir}, tcfg),
                     resume=True)
        elif not Path(args.base).is_file():
            pretrain(args, *base_configs)
        for spec, cfg in configs:
            print(f"\n=== {spec}")
            row = F.run(replace(cfg, resume=args.resume and F.state_path(cfg).is_file()), progress=True)
            row["method"] = spec
            rows.append(row)
            write_tables(args, rows)                    # after every method: a cut-short run keeps its rows
    except F.S3.ERRORS as err:
        return F.fail(err)
    except KeyboardInterrupt:    # Ctrl-C or SIGTERM: stage 6 has saved the method and said how to go on
        return 130
    return 0


def write_tables(args, rows):
    head = (f"stage 6 on {args.data}, base {args.base}, {args.max_steps} steps of {args.batch_size} pairs "
            f"each, replay {args.replay}, fresh copies {args.fresh_copies}, context_chars "
            f"{args.context_chars}, backend {args.backend}; {hardware()}")
    text = f"{head}\n\n{F.print_table(rows)}\n\n{qa_table(rows)}\n"
    print("\n" + text)
    if args.out:
        write_text_atomic(args.out, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
