"""benchmarks/bench_copy_probe.py: the repeat and fresh rows against their definition, the scores
against hand-made logits, a model that copies against one that does not, and bad options as one
error line."""
import importlib.util

import numpy as np
import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_copy_probe", ROOT / "benchmarks" / "bench_copy_probe.py")
B = importlib.util.module_from_spec(spec)
spec.loader.exec_module(B)
S3 = B.S3
F = B.F
TK = F.load_stage("2_tokenizer")


def test_rows_end_in_the_same_passage_after_the_same_gap():
    val = np.arange(1000, dtype=np.uint16)
    repeat, fresh = B.probe_rows(val, n=4, length=5, gap=3)
    stride = (1000 - 13) // 4
    assert repeat.shape == fresh.shape == (4, 13)
    for i in range(4):
        p = np.arange(i * stride, i * stride + 5)
        q = np.arange(((i + 2) % 4) * stride, ((i + 2) % 4) * stride + 5)
        gap = np.arange(i * stride + 5, i * stride + 8)
        np.testing.assert_array_equal(repeat[i], np.concatenate([p, gap, p]))
        np.testing.assert_array_equal(fresh[i], np.concatenate([q, gap, p]))


def test_a_split_too_short_is_a_value_error():
    with pytest.raises(ValueError, match="too short"):
        B.probe_rows(np.arange(20, dtype=np.uint16), n=4, length=5, gap=3)


def test_scores_of_hand_made_logits():
    """Logits that give the right next token probability 1/2 (the rest spread evenly over the other
    V - 1 tokens) at every scored position: 1 bit per token; the argmax is right exactly where the
    right token's logit is the largest. Positions before the last passage are not scored."""
    V, length = 6, 4
    idx = np.array([[0, 1, 2, 3, 4, 5, 0, 1]])                   # (1, 8): the last passage is 4 5 0 1
    logits = np.full((1, 8, V), -50.0)                           # unscored positions: nonsense
    for t in range(8 - length, 7):                               # t predicts idx[t + 1]
        logits[0, t] = np.log(0.5 / (V - 1))
        logits[0, t, idx[0, t + 1]] = np.log(0.5)
    logits[0, 5, 3] = 10.0                                       # one wrong argmax (its bits change too)
    bits, hits, count = B.last_passage_scores(logits, idx, length)
    assert count == length - 1 and hits == 2
    z = logits[0, 5] - logits[0, 5].max()
    wrong = (np.log(np.exp(z).sum()) - z[idx[0, 6]]) / np.log(2)
    assert bits == pytest.approx(2 + wrong, rel=1e-12)


def checkpoint(tmp_path, val):
    """A tiny byte-level model saved with its dataset folder: tokenizer.json and val.bin side by side."""
    tok = TK.Tokenizer([])
    tok.save(tmp_path / "tokenizer.json")
    np.asarray(val, np.uint16).tofile(tmp_path / "val.bin")
    info = {"path": str(tmp_path / "tokenizer.json"), "sha256": tok.sha256(), "vocab_size": tok.vocab_size}
    mcfg, tcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size)
    return S3.save_model(tmp_path / "m.npz", S3.init_params(mcfg, 0), mcfg, tcfg, 0, None, info), mcfg


def test_a_model_that_copies_gains_and_one_that_does_not_does_not(tmp_path, monkeypatch):
    """The real probe with stage 3's forward replaced by two oracles on random tokens: one that
    predicts the token that followed the current one earlier in the row (copies), one uniform.
    The split is 5 + 7 i mod 250: no token comes twice within 250 positions, so the copier is sure
    of every repeated token and of no fresh one; the uniform one gains nothing."""
    path, mcfg = checkpoint(tmp_path, 5 + 7 * np.arange(4000) % 250)
    V = mcfg.vocab_size

    def copier(params, cfg, idx):
        logits = np.zeros(idx.shape + (V,), np.float32)
        for b, row in enumerate(idx):
            for t in range(len(row)):
                earlier = np.flatnonzero(row[:t] == row[t])
                if len(earlier):
                    logits[b, t, row[earlier[0] + 1]] = 100.0
        return logits, None

    monkeypatch.setattr(S3, "forward", copier)
    [(gap, fresh_bits, repeat_bits, fresh_acc, repeat_acc)] = B.probe(path, 8, [4], 16, 5)
    assert gap == 4 and repeat_bits == pytest.approx(0.0, abs=1e-6) and repeat_acc == 1.0
    assert fresh_bits > 5 and fresh_acc < 0.2
    monkeypatch.setattr(S3, "forward", lambda params, cfg, idx: (np.zeros(idx.shape + (V,)), None))
    [(_, fresh_bits, repeat_bits, _, _)] = B.probe(path, 8, [4], 16, 5)
    assert fresh_bits == pytest.approx(np.log2(V)) and repeat_bits == pytest.approx(np.log2(V))


def test_the_real_model_runs_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(1)
    path, mcfg = checkpoint(tmp_path, rng.integers(10, 200, 3000))
    out = tmp_path / "probe.md"
    assert B.main(["--ckpts", str(path), "--passage", "8", "--gaps", "0,4", "--sequences", "6",
                   "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith(f"| {path}")]
    assert [row.split(" | ")[1] for row in rows] == ["0", "4"]
    assert f"- {path}: pretrained 0 of 200 steps\n" in out.read_text()


def test_the_steps_line_names_the_pretraining_step_and_a_fine_tuning(tmp_path):
    """A checkpoint saved partway (step 0 of tiny's 200 here) says so; a stage 6 model adds its steps."""
    path, _ = checkpoint(tmp_path, np.arange(300) % 200 + 10)
    assert B.trained(path) == f"{path}: pretrained 0 of 200 steps"
    params, mcfg, _, _, _, config = S3.load_model(path)
    tuned = tmp_path / "full.npz"
    F.save_finetuned(tuned, params, mcfg, config, F.FinetuneConfig(base=str(path), max_steps=30))
    assert B.trained(tuned) == f"{tuned}: pretrained 0 of 200 steps, then fine-tuned 30 steps (stage 6)"


@pytest.mark.parametrize("argv, words", [
    (["--gaps", "a"], "--gaps must be comma-separated"),
    (["--gaps", "-1"], "--gaps must be >= 0"),
    (["--passage", "1"], "--passage >= 2"),
    (["--sequences", "0"], "--sequences and --batch >= 1"),
])
def test_bad_option_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        B.main(["--ckpts", "x.npz"] + argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()        # argparse: the usage, then one error line
    assert err[0].startswith("usage:") and ": error: " in err[-1] and words in err[-1]


def test_a_missing_checkpoint_or_a_gap_past_the_context_is_one_line(tmp_path, capsys):
    assert B.main(["--ckpts", str(tmp_path / "none.npz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none.npz" in err[0]
    path, mcfg = checkpoint(tmp_path, np.arange(3000) % 200)
    assert B.main(["--ckpts", str(path), "--passage", "8", "--gaps", str(mcfg.context)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must fit" in err[0]
