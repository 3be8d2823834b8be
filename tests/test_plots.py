"""The quick start's preset, the metrics log and --plot: the quick-start configuration trains and
samples, each picture is a small PNG, and without matplotlib --plot says so in one line."""
import json
import math
import sys

import numpy as np
import pytest

from spikelib import plots
from spikelib.metrics import MetricsLog, read_metrics
from spikelib.stages import load_stage

m = load_stage("3_spike_llm_numpy")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    """A small English-like text (stages 1 and 2 prepare it in a second or two)."""
    rng = np.random.default_rng(0)
    words = "the king and queen walked to a small garden where every flower was bright".split()
    lines = [" ".join(rng.choice(words, size=int(rng.integers(5, 12)))).capitalize() + "."
             for _ in range(400)]
    path = tmp_path_factory.mktemp("text") / "garden.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_main(source, root, out="out", *extra):
    args = ["--source", f"files:{source}", "--data_root", str(root / "data"), "--out_dir", str(root / out),
            "--eval_tokens", "256", "--max_new_tokens", "8"]
    return m.main(args + [str(a) for a in extra])


@pytest.fixture(scope="module")
def tiny_runs(text_source, tmp_path_factory):
    """A tiny spiking run with --plot 1 and its ANN twin in the sibling folder out_ann."""
    pytest.importorskip("matplotlib")                             # an optional extra (dev installs it)
    root = tmp_path_factory.mktemp("runs")
    steps = ("--preset", "tiny", "--max_steps", 4, "--eval_interval", 2)
    assert run_main(text_source, root, "out_ann", *steps, "--spiking", 0) == 0
    assert run_main(text_source, root, "out", *steps, "--plot", 1) == 0
    return root


def test_quick_preset_trains_and_samples(text_source, tmp_path, capsys):
    """The quick start's configuration (its model, a few of its steps) trains, evaluates, logs
    and samples; the preset itself ends its schedule in steps, not at a wall-clock limit."""
    _, tcfg = m.make_configs("quick")
    assert tcfg.max_minutes == 0 and tcfg.max_steps <= 300
    # the vocabulary is raised to this small corpus's tokenizer (the preset's 2000 would let the
    # sampler draw ids the tokenizer lacks), and a smaller batch keeps the test fast
    assert run_main(text_source, tmp_path, "out", "--preset", "quick", "--max_steps", 2,
                    "--eval_interval", 1, "--vocab_size", 64, "--batch_size", 4) == 0
    out = capsys.readouterr().out
    assert "bits/char" in out and "sample" in out
    records = read_metrics(tmp_path / "out/metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(e["bpc"]) and e["bpc"] > 0 for r in records for e in r["evals"])
    assert records[1]["seconds"] >= records[0]["seconds"] > 0
    assert set(records[0]["rates"]) == set(m.SITES)


def test_resumed_log_keeps_lines_up_to_its_step_and_counts_time_on(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "seconds": 10.0 * s, "lr": 0.1, "evals": []} for s in (2, 4, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    log = MetricsLog(tmp_path / "ckpt.npz", 4)                 # the checkpoint holds step 4
    log.add(5, 3.0, [{"context": 8, "bpc": 2.0}], {"lr": 0.05})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [2, 4, 5]
    assert records[-1]["seconds"] == 43.0 and records[-1]["evals"][0]["bpc"] == 2.0
    MetricsLog(tmp_path / "ckpt.npz", 0).add(1, 1.0, [], {})   # a new run starts the log afresh
    assert [r["step"] for r in read_metrics(path)] == [1]


def test_each_plot_is_a_small_png(tiny_runs):
    for name in ("curves", "rates", "raster", "decay"):
        data = (tiny_runs / "out" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and 1000 < len(data) < 150_000, name
    assert not (tiny_runs / "out_ann/curves.png").exists()       # only the run asked for pictures


def test_plot_alone_draws_an_existing_checkpoint_and_finds_the_twin(tiny_runs, capsys, monkeypatch):
    for name in ("curves", "rates", "raster", "decay"):
        (tiny_runs / "out" / f"{name}.png").unlink()
    drawn, real = [], plots.curve_points

    def counted(records, index):
        drawn.append(len(records))
        return real(records, index)

    monkeypatch.setattr(plots, "curve_points", counted)
    assert m.main(["--out_dir", str(tiny_runs / "out_ann"), "--plot", "1"]) == 0
    assert "plots:" in capsys.readouterr().out
    assert all((tiny_runs / "out_ann" / f"{n}.png").exists() for n in ("curves", "rates", "raster", "decay"))
    assert drawn == [2, 2, 2, 2]       # both contexts of the twin's own log and of the spiking run's
    assert m.load_model(tiny_runs / "out_ann/ckpt.npz")[3] == 4    # drawing did not train


def test_twin_folders_and_half_lives():
    assert plots.twin_folder("out/numpy").as_posix() == "out/numpy_ann"
    assert plots.twin_folder("out/numpy_ann").as_posix() == "out/numpy"
    for gamma in (0.5, 0.9, 1 - 2.0 ** -7):
        assert gamma ** plots.half_life(gamma) == pytest.approx(0.5)


def test_without_matplotlib_plot_is_one_line(text_source, tmp_path, monkeypatch, capsys):
    assert run_main(text_source, tmp_path, "done", "--preset", "tiny", "--max_steps", 2) == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)         # import matplotlib now fails
    capsys.readouterr()
    assert m.main(["--out_dir", str(tmp_path / "done"), "--plot", "1"]) == 1
    assert capsys.readouterr().err == "error: --plot needs matplotlib: pip install matplotlib\n"
    assert run_main(text_source, tmp_path, "out", "--preset", "tiny", "--max_steps", 2, "--plot", 1) == 1
    assert capsys.readouterr().err == "error: --plot needs matplotlib: pip install matplotlib\n"
    assert not (tmp_path / "out/ckpt.npz").exists()              # refused before training
