"""Benchmarks without a test file of their own: a bad option is one argparse error line, before any
timing starts (no preset process launched, no tokenizer trained in place of a missing one)."""
import importlib.util

import pytest

from conftest import ROOT


def bench(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_one_error_line(module, argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()        # argparse: the usage, then one error line
    assert ": error: " in err[-1] and words in err[-1]
    assert not any(": error: " in line or "Traceback" in line for line in err[:-1])


@pytest.mark.parametrize("argv, words", [
    (["--presets", "small,bogus"], "--presets: unknown bogus"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bench_numpy(argv, words, capsys, monkeypatch):
    B = bench("bench_numpy")
    monkeypatch.setattr(B.subprocess, "run", lambda *a, **k: pytest.fail("a preset was launched"))
    assert_one_error_line(B, argv, words, capsys)


def test_bench_tokenizer(tmp_path, capsys, monkeypatch):
    B = bench("bench_tokenizer")
    monkeypatch.setattr(B.tk.Tokenizer, "train", lambda *a, **k: pytest.fail("a tokenizer was trained"))
    text = tmp_path / "text.txt"
    text.write_text("a few words of text\n")
    assert_one_error_line(B, ["--file", str(tmp_path / "absent.txt")], "absent.txt", capsys)
    assert_one_error_line(B, ["--file", str(text), "--tokenizer", str(tmp_path / "absent.json")],
                          "--tokenizer", capsys)
    assert_one_error_line(B, ["--file", str(text), "--repeat", "0"], "--repeat must be >= 1", capsys)
    monkeypatch.undo()                                       # training is allowed to start, and refuses
    assert_one_error_line(B, ["--file", str(text), "--vocab-size", "10"], "vocab_size must be in", capsys)


def test_bench_mlx(capsys):
    pytest.importorskip("mlx.core")
    assert_one_error_line(bench("bench_mlx"), ["--rounds", "0"], "--rounds must be >= 1", capsys)


def test_bench_neuron_families(capsys, monkeypatch):
    B = bench("bench_neuron_families")
    monkeypatch.setattr(B, "ProcessPoolExecutor", lambda *a: pytest.fail("a run was launched"))
    assert_one_error_line(B, ["--seeds", "0,-1"], "each must be >= 0", capsys)
