"""Stages 3, 4 and 5 share their command line, progress bar, evaluation and reports through
spikelib: one behaviour in every stage, and --help that explains every option."""
import re
from dataclasses import fields

import numpy as np
import pytest

from spikelib.cli import field_comments
from spikelib.stages import load_stage

S3 = load_stage("3_spike_llm_numpy")


def stage(name):
    """A training stage's module; stage 4 and 5 skip cleanly where MLX or torch is missing."""
    if name == "4_spike_llm_mlx":
        pytest.importorskip("mlx.core")
    if name == "5_spike_llm_triton":
        pytest.importorskip("torch")
    return load_stage(name)


STAGES = {"3_spike_llm_numpy": [], "4_spike_llm_mlx": ["--device", "cpu"],
          "5_spike_llm_triton": ["--kernels", "torch", "--device", "cpu"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return S3.prepare_dataset("builtin", tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("name", list(STAGES))
def test_help_explains_every_config_field(name):
    """Every field of every config a stage reads is an option whose help is the field's comment."""
    module = stage(name)
    text = " ".join(module.build_parser().format_help().split())      # argparse wraps lines
    configs = [S3.SampleConfig, S3.ModelConfig, S3.TrainConfig]
    if hasattr(module, "RunConfig"):
        configs.append(module.RunConfig)
    for cls in configs:
        comments = field_comments(cls)
        for f in fields(cls):
            assert comments.get(f.name), f"{cls.__name__}.{f.name} has no comment to explain it"
            assert f"--{f.name}" in text
            assert " ".join(comments[f.name].split()) in text, f.name


@pytest.mark.parametrize("name", list(STAGES))
def test_progress_bar_shows_the_same_fields_in_every_stage(name, dataset, tmp_path, capsys):
    """loss, lr, gradient norm and tokens/s (stages 3 and 4 once showed a spike rate instead)."""
    module = stage(name)
    args = ["--preset", "tiny", "--data_root", str(dataset.parent), "--max_steps", "2",
            "--eval_interval", "2", "--eval_tokens", "256", "--max_new_tokens", "4",
            "--out_dir", str(tmp_path)] + STAGES[name]
    assert module.main(args) == 0
    err = capsys.readouterr().err
    fields_shown = set(re.findall(r"(\w+)=", err))
    assert {"loss", "lr", "gnorm", "tok_s"} <= fields_shown, err[-300:]
    assert "spikes" not in fields_shown


def test_stage5_evaluates_in_stage3_batches_with_stage3_figures(dataset):
    """Stage 5 scores the same windows in the same batch sizes as stage 3 (fewer windows per batch
    at 4x the context, as the (L x L) attention grows), and gets stage 3's figures."""
    torch = pytest.importorskip("torch")
    S5 = stage("5_spike_llm_triton")
    vocab_size = S3.load_dataset_info(dataset)[2]["vocab_size"]
    cfg = S3.ModelConfig(**dict(S3.PRESETS["tiny"]["model"], vocab_size=vocab_size))
    params = S3.init_params(cfg, 3)
    model = S5.build_model(cfg, S5.RunConfig(kernels="torch", device="cpu", dtype="float32"), params).eval()
    _, tok, _ = S3.load_dataset_info(dataset)
    val = S3.open_split(dataset, "val")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    for context in (cfg.context, 4 * cfg.context):
        seen.clear()
        r5 = S5.eval_report(model, val, context, 2048, tok.decode)
        r3 = S3.eval_report(params, cfg, val, context, 2048, tok.decode)
        assert max(seen) == S3.eval_batch(cfg.context, context)
        assert r5["tokens"] == r3["tokens"] and r5["chars"] == r3["chars"]
        assert abs(r5["bpc"] - r3["bpc"]) < 1e-4 * r3["bpc"]
    assert torch.is_grad_enabled()


def test_energy_report_labels_the_ann_twin_in_every_stage():
    """The twin's report says what its rates are (nonzero activations), not "mean spike rate"."""
    cfg = S3.ModelConfig(**dict(S3.PRESETS["tiny"]["model"], spiking=False))
    params = S3.init_params(cfg, 4)
    x = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 16))
    texts = [S3.energy_report(params, cfg, x)[0]]
    try:
        m4 = stage("4_spike_llm_mlx")
        texts.append(m4.energy_report(m4.build_model(cfg, params), x)[0])
    except pytest.skip.Exception:
        pass
    try:
        torch = pytest.importorskip("torch")
        S5 = stage("5_spike_llm_triton")
        run = S5.RunConfig(kernels="torch", device="cpu", dtype="float32")
        model = S5.build_model(cfg, run, params).eval()
        texts.append(S5.energy_report(model, torch.from_numpy(x))[0])
    except pytest.skip.Exception:
        pass
    for text in texts:
        assert "ANN twin: fraction of nonzero activations" in text and "mean spike rate" not in text
    assert len({t.splitlines()[-1] for t in texts}) == 1          # the same energy line everywhere


def test_evaluation_scores_every_token_of_the_split_and_labels_a_slice(dataset):
    """--eval_tokens 0 (the default) scores each target of the validation split exactly once: the
    windows at the context, then the shorter rest. An independent sum over the same windows agrees.
    A slice is labelled as such in the printed line."""
    from spikelib.report import eval_line
    _, tok, info = S3.load_dataset_info(dataset)
    cfg = S3.ModelConfig(**dict(S3.PRESETS["tiny"]["model"], vocab_size=info["vocab_size"]))
    params = S3.init_params(cfg, 5)
    val = np.asarray(S3.open_split(dataset, "val"), dtype=np.int64)
    L = 3 * cfg.context
    whole = S3.eval_report(params, cfg, val, L, 0, tok.decode)
    assert whole["whole"] and whole["tokens"] == len(val) - 1 and len(val) % L != 1   # a rest exists
    nats = 0.0
    for start in range(0, len(val) - 1, L):                  # each window, the last one shorter
        x, y = val[start:start + L][None], val[start + 1:start + L + 1][None]
        x = x[:, :y.shape[1]]
        logits, _ = S3.forward(params, cfg, x)
        nats += S3.cross_entropy(logits, y)[0] * y.size
    assert abs(whole["nats"] * whole["tokens"] - nats) < 1e-6 * nats
    assert whole["chars"] == len(tok.decode(val[1:].tolist()))
    assert "whole val split" in eval_line(1, whole)
    part = S3.eval_report(params, cfg, val, L, 2 * L, tok.decode)
    assert not part["whole"] and part["tokens"] == 2 * L
    assert f"slice: first {2 * L:,} of {len(val) - 1:,} val tokens" in eval_line(1, part)


EARLY = {"0_spike_transformer": ("parse_config", "Config"), "1_data": ("parse_args", "DataConfig"),
         "2_tokenizer": ("parse_args", "TokenizerConfig")}


@pytest.mark.parametrize("name", list(EARLY))
def test_help_of_stages_0_1_2_explains_every_config_field(name, capsys, monkeypatch):
    """Stages 0, 1 and 2 too: each field's comment is its option's help, with its default."""
    monkeypatch.setenv("COLUMNS", "1000")                  # no wrapping, which could split a word at "-"
    module = load_stage(name)
    parse, cls = (getattr(module, attr) for attr in EARLY[name])
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    comments = field_comments(cls)
    for f in fields(cls):
        assert comments.get(f.name), f"{cls.__name__}.{f.name} has no comment to explain it"
        assert f"--{f.name}" in text
        assert " ".join(comments[f.name].split()) in text, f.name
        assert f"default {f.default!r}" in text, f.name


def test_command_lines_of_stages_0_1_2_keep_working():
    """Bare bools (--plot), --no-X, 0|1 values and dashed spellings (--vocab-size) all still parse."""
    s0, s1, s2 = (load_stage(n) for n in EARLY)
    cfg = s0.parse_config(["--gradcheck", "--plot", "0", "--no-detach_reset", "--preset", "tiny"])
    assert (cfg.gradcheck, cfg.plot, cfg.detach_reset, cfg.steps) == (True, False, False, 60)
    cfg = s1.parse_args(["--val-fraction", "0.2", "--force", "--max_bytes", "7", "--preset", "small"])
    assert (cfg.val_fraction, cfg.force, cfg.max_bytes, cfg.per_category) == (0.2, True, 7, 20)
    cfg = s2.parse_args(["--vocab-size", "300", "--force", "1", "--no-force", "--preset", "large"])
    assert (cfg.vocab_size, cfg.force) == (300, False)
    assert s2.parse_args(["--preset", "large"]).vocab_size == 8192
