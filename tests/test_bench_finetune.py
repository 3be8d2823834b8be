"""benchmarks/bench_finetune.py: every option reaches the base it pretrains and the stage 6 runs,
and a bad one is one error line before any work (no pretraining, no fine-tuning)."""
import importlib.util
from dataclasses import replace

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_finetune", ROOT / "benchmarks" / "bench_finetune.py")
B = importlib.util.module_from_spec(spec)
spec.loader.exec_module(B)


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Pretraining and fine-tuning replaced by recorders: what they would have been given."""
    seen = {"pretrain": [], "run": []}

    def pretrain(args, mcfg, tcfg, resume=False):
        seen["pretrain"].append((mcfg, tcfg))
        seen.setdefault("resumed", []).append(resume)
    monkeypatch.setattr(B, "pretrain", pretrain)
    monkeypatch.setattr(B.F, "run", lambda cfg, progress=True: seen["run"].append(cfg) or {})
    monkeypatch.setattr(B, "write_tables", lambda args, rows: None)
    monkeypatch.chdir(tmp_path)                     # out/bench_finetune/base.npz does not exist here
    return seen


def test_options_reach_the_base_and_every_method(calls):
    B.main(["--preset", "tiny", "--pretrain_lr", "1e-3", "--pretrain_set", "neuron=ternary",
            "--pretrain_token_shift", "1", "--pretrain_decay_step", "2.33", "--pretrain_repeat", "0.25",
            "--methods", "full,lora:4",
            "--copy_questions", "8", "--fresh_copies", "0.25", "--batch_size", "64", "--grad_accum", "2",
            "--replay", "1.0", "--seed", "3", "--prompt_order", "question_twice",
            "--lora_targets", "wq,embed", "--lora_tokens", "<q>,<a>", "--no_answer", "0"])
    [(mcfg, tcfg)] = calls["pretrain"]
    assert (tcfg.lr, tcfg.min_lr, tcfg.repeat) == (1e-3, 1e-4, 0.25)
    assert (mcfg.neuron, mcfg.token_shift, mcfg.decay_step) == ("ternary", True, 2.33)
    full, lora = calls["run"]
    assert (full.method, lora.method, lora.lora_rank, lora.lora_alpha) == ("full", "lora", 4, 8.0)
    assert (lora.lora_targets, lora.lora_tokens) == ("wq,embed", "<q>,<a>")
    for cfg in (full, lora):
        assert (cfg.copy_questions, cfg.fresh_copies, cfg.batch_size, cfg.grad_accum, cfg.replay, cfg.seed,
                cfg.prompt_order, cfg.no_answer) == (8, 0.25, 64, 2, 1.0, 3, "question_twice", 0.0)


def test_resume_continues_only_the_stopped_method(calls, tmp_path):
    """--resume 1: the method whose stage 6 state lies in its folder (stopped by Ctrl-C) continues
    from it; the others run anew. Without --resume every method runs anew (and stage 6 refuses
    to start over the stopped one)."""
    argv = ["--preset", "tiny", "--methods", "full,lora:4", "--out_dir", str(tmp_path / "b")]
    (tmp_path / "b" / "lora_r4").mkdir(parents=True)
    (tmp_path / "b" / "lora_r4" / "lora.state.npz").write_bytes(b"a stopped run")
    B.main(argv + ["--resume", "1"])
    B.main(argv)
    assert [cfg.resume for cfg in calls["run"]] == [False, True, False, False]


def test_the_presets_learning_rate_by_default(calls):
    B.main(["--preset", "tiny", "--methods", "full"])
    [(_, tcfg)] = calls["pretrain"]
    assert tcfg.lr == B.S3.PRESETS["tiny"]["train"]["lr"]


@pytest.mark.parametrize("argv, words", [
    (["--methods", "lora:x"], "whole number"),
    (["--pretrain_lr", "-1"], "--pretrain_lr"),
    (["--copy_questions", "0"], "--copy_questions"),
    (["--pretrain_set", "bogus=1"], "bogus"),
    (["--pretrain_set", "d_model=abc"], "d_model must be a whole number"),
    (["--pretrain_repeat", "2"], "the base to pretrain (--preset, --pretrain_*): --repeat must be in [0, 1]"),
    (["--pretrain_steps", "0"], "the base to pretrain (--preset, --pretrain_*): --max_steps"),
    (["--batch_size", "0"], "batch_size"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--no_answer", "1.5"], "--no_answer must be in [0, 1]"),
    (["--lora_targets", "wq,head"], "--lora_targets must be a comma-separated list"),
])
def test_bad_option_is_one_line_before_any_work(argv, words, calls, capsys):
    with pytest.raises(SystemExit) as stop:
        B.main(["--preset", "tiny"] + argv)
    assert stop.value.code == 2 and calls == {"pretrain": [], "run": []}
    err = capsys.readouterr().err.strip().splitlines()        # argparse: the usage, then one error line
    assert err[0].startswith("usage:") and ": error: " in err[-1] and words in err[-1]
    assert not any(": error: " in line for line in err[:-1])


def test_stage_6s_gpu_preset_is_the_best_command(calls):
    """python 6_finetune.py --preset gpu fine-tunes as the best command of the README and of this
    script's docstring does (its fine-tuning options): the same stage 6 config, field for field."""
    tuning = ["--prompt_order", "question_first", "--batch_size", "64", "--replay", "0.5", "--fresh_copies",
              "0.5", "--context_chars", "128", "--methods", "full", "--max_steps", "6000", "--lr", "3e-3"]
    doc = " ".join(word for word in B.__doc__.split() if word != "\\")
    assert all(f"{name} {value}" in doc for name, value in zip(tuning[::2], tuning[1::2]))
    B.main(["--pretrain", "triton", "--backend", "triton", "--pretrain_set", "neuron=ternary"] + tuning)
    [bench] = calls["run"]
    paths = {"base": bench.base, "out_dir": bench.out_dir}
    assert B.F.preset_configs(B.F.PRESETS, "gpu", paths, finetune=B.F.FinetuneConfig)[0] == bench


def saved_base(path, step, max_minutes=0.0):
    """A tiny byte-level base saved at `step` of a 4-step pretraining, as stages 3 to 5 save it."""
    tok = B.F.load_stage("2_tokenizer").Tokenizer([])
    info = {"path": str(path.parent / "tokenizer.json"), "sha256": tok.sha256(), "vocab_size": tok.vocab_size}
    mcfg, tcfg = B.S3.make_configs("tiny", vocab_size=tok.vocab_size, max_steps=4, max_minutes=max_minutes)
    B.S3.save_model(path, B.S3.init_params(mcfg, 0), mcfg, tcfg, step, None, info)


@pytest.mark.parametrize("step, max_minutes", [(4, 0.0), (2, 1.0)])
def test_a_finished_base_or_one_stopped_by_its_time_limit_is_fine_tuned_as_it_is(step, max_minutes, calls,
                                                                                 tmp_path):
    saved_base(tmp_path / "base.npz", step, max_minutes)
    assert B.main(["--preset", "tiny", "--base", str(tmp_path / "base.npz"), "--methods", "full"]) == 0
    assert calls["pretrain"] == [] and len(calls["run"]) == 1


def test_a_stopped_method_ends_the_run_with_130_and_keeps_the_rows_before_it(calls, monkeypatch):
    """Ctrl-C or SIGTERM in a method (stage 6 has saved its state and said so, then raised
    KeyboardInterrupt): exit status 130 and no traceback; the methods finished before it keep their
    rows in the tables, and the methods after it do not run."""
    tables = []
    monkeypatch.setattr(B, "write_tables", lambda args, rows: tables.append(list(rows)))

    def run(cfg, progress=True):
        calls["run"].append(cfg)
        if cfg.method == "lora":
            raise KeyboardInterrupt
        return {"method": cfg.method}
    monkeypatch.setattr(B.F, "run", run)
    try:
        rc = B.main(["--base", "ckpt.npz", "--methods", "full,lora:1,freeze"])
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt reached the caller: a traceback, not exit status 130")
    assert rc == 130
    assert [cfg.method for cfg in calls["run"]] == ["full", "lora"]
    assert tables == [[{"method": "full"}]]


def test_a_pretraining_cut_short_is_one_line_and_resume_pretrains_it_on(calls, tmp_path, capsys):
    """A base saved before its last step with no time limit (the run was killed) is not fine-tuned:
    one line says so; --resume 1 pretrains it on with its own schedule (4 steps, not the 500 of
    --pretrain_steps' default), then fine-tunes."""
    saved_base(tmp_path / "base.npz", 2)
    argv = ["--preset", "tiny", "--base", str(tmp_path / "base.npz"), "--methods", "full"]
    assert B.main(argv) == 1 and calls == {"pretrain": [], "run": []}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'base.npz'} stopped pretraining at step 2 of 4: pretrain it on "
                   "with --resume 1, or remove it to pretrain anew"]
    assert B.main(argv + ["--resume", "1"]) == 0
    [(_, tcfg)] = calls["pretrain"]
    assert calls["resumed"] == [True] and tcfg.max_steps == 4 and len(calls["run"]) == 1


def test_pretrain_passes_resume_to_the_stage(tmp_path, monkeypatch):
    """pretrain(..., resume=True) hands resume to stage 3's train (the data folder already made)."""
    seen = []
    monkeypatch.setattr(B.S3, "train", lambda mcfg, tcfg, data, ckpt, resume=False: seen.append(resume))
    (tmp_path / "tokens.json").write_text("{}")
    args = B.argparse.Namespace(data=str(tmp_path), pretrain="numpy", base=str(tmp_path / "base.npz"))
    B.pretrain(args, None, None, resume=True)
    B.pretrain(args, None, None)
    assert seen == [True, False]


def test_a_base_that_does_not_load_is_one_line(tmp_path, monkeypatch, capsys):
    """An error met during the work (here an unreadable --base) ends the run with one line, no traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.npz").write_text("not a checkpoint\n")
    assert B.main(["--base", "base.npz", "--methods", "full", "--out", "table.md"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "base.npz" in err[0]
    assert not (tmp_path / "table.md").exists()


def readme_command(start, until=" # "):
    """The README's command that begins with start, as argv after the script, up to `until` (its
    comment, or the next command)."""
    readme = " ".join(word for word in (ROOT / "README.md").read_text().split() if word != "\\")
    assert readme.count(start) == 1
    return start.split()[2:] + readme.split(start)[1].split(until)[0].split()


def test_the_readmes_stage_5_command_pretrains_the_two_head_base_of_this_script(calls):
    """The README's stage 5 command for the two-head base of the 512-character targets gives the
    model, training and run configs that this script pretrains for them, field for field."""
    B.main(["--pretrain", "triton", "--backend", "triton", "--pretrain_steps", "1500",
            "--pretrain_batch", "64", "--pretrain_context", "256", "--pretrain_token_shift", "1",
            "--pretrain_set", "neuron=ternary", "--pretrain_decay_step", "7", "--pretrain_set", "n_head=2",
            "--pretrain_set", "decay_start=1", "--base", "out/qa_base/ckpt.npz"])
    [(mcfg, tcfg)] = calls["pretrain"]
    argv = readme_command("python 5_spike_llm_triton.py --preset small --max_steps 1500", until=" python ")
    S5 = B.load_stage("5_spike_llm_triton")
    args = S5.build_parser().parse_args(argv)
    assert S5.S3.run_configs(args, out_dir="out/triton")[:2] == (mcfg, tcfg)
    assert S5.config_from_args(S5.RunConfig, args) == S5.RunConfig()       # as pretrain() runs stage 5


@pytest.mark.parametrize("start, row", [
    ("python 6_finetune.py --preset gpu --base out/finetune/full.npz --context_chars 256 --max_steps 4500",
     ["--methods", "full", "--lr", "3e-3", "--context_chars", "256", "--max_steps", "4500"]),
    ("python 6_finetune.py --preset gpu --base out/finetune256/full.npz --method lora",
     ["--methods", "lora:1", "--lora_targets", "wq,wk,wv,wo,w2,embed", "--lr", "1e-2",
      "--context_chars", "512", "--max_steps", "4000"]),
    ("python 6_finetune.py --preset gpu --base out/reader/full.npz --method lora",
     ["--methods", "lora:1", "--lora_targets", "wq,wk,wv,wo,w2,embed", "--lr", "3e-2",
      "--context_chars", "128", "--max_steps", "5000"]),
    ("python 6_finetune.py --preset gpu --base out/reader_mix/full.npz --method lora",
     ["--methods", "lora:1", "--lora_targets", "wq,wk,wv,wo,w2,embed", "--lr", "3e-2",
      "--context_chars", "128", "--max_steps", "5000"]),
    ("python 6_finetune.py --preset gpu --base out/reader_docs/full.npz --method lora",
     ["--methods", "lora:1", "--lora_targets", "wq,wk,wv,wo,w2,embed", "--lr", "3e-2",
      "--context_chars", "128", "--max_steps", "5000"])])
def test_the_readmes_carry_on_commands_fine_tune_as_the_two_head_rows(start, row, calls):
    """The README's stage 6 commands for the two-head path (128 -> 256 in full, then LoRA rank 1
    at 512) and for LoRA rank 1 from a reader of other text give the stage 6 config this script ran
    for those rows, field for field, but for the paths it reads and writes."""
    B.main(["--pretrain", "triton", "--backend", "triton", "--batch_size", "64", "--replay", "0.5",
            "--fresh_copies", "0.5", "--prompt_order", "question_first"] + row)
    [bench] = calls["run"]
    args = B.F.build_parser().parse_args(readme_command(start))
    stage6 = B.F.preset_configs(B.F.PRESETS, args.preset, B.F.given_options(args, B.F.FinetuneConfig),
                                finetune=B.F.FinetuneConfig)[0]
    assert replace(stage6, base=bench.base, out_dir=bench.out_dir) == bench


@pytest.mark.parametrize("start, qa, save_interval", [
    ("python 6_finetune.py --preset gpu --base out/qa_base/ckpt.npz --qa", "data/wikitext2_test", 0),
    ("python 6_finetune.py --preset gpu --base out/reader/full.npz --qa", "data/mix", 500),
    ("python 6_finetune.py --preset gpu --base out/reader_mix/full.npz --qa", "data/docs", 500)])
def test_the_readmes_reader_commands_are_the_runs_of_the_results_file(start, qa, save_interval):
    """The README's stage 6 commands for a reader of other text and for its courses on the mixed
    text and on API docs (the gpu preset, --qa DIR, 5,000 steps) give the configs of the runs in
    h200x2_qa_reader_base.md, field for field, but for the paths and how often they save."""
    def stage6(argv):
        args = B.F.build_parser().parse_args(argv)
        return B.F.preset_configs(B.F.PRESETS, args.preset, B.F.given_options(args, B.F.FinetuneConfig),
                                  finetune=B.F.FinetuneConfig)[0]
    run = stage6("--base out/h2/base.npz --method full --backend triton --batch_size 64 --replay 0.5 "
                 "--fresh_copies 0.5 --context_chars 128 --prompt_order question_first --lr 3e-3 "
                 f"--max_steps 5000 --save_interval {save_interval} --qa {qa} --out_dir out/run".split())
    readme = stage6(readme_command(start))
    assert replace(readme, base=run.base, out_dir=run.out_dir, save_interval=save_interval) == run
