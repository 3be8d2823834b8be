"""benchmarks/bench_recall.py: the recall task's sequences checked against a reading of their own
tokens (each masked target is the value stored with that key earlier), the accuracy on hand-made
logits, bad options as one error line, and a short run of the tiny preset."""
import importlib.util
import math

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip("torch")
from stage5 import load_stage5  # noqa: E402

load_stage5()        # first, as stage 5's tests load it (Triton interpreted without a GPU): the benchmark
#                      then finds that module, and test_triton.py still has its interpreted kernels
spec = importlib.util.spec_from_file_location("bench_recall", ROOT / "benchmarks" / "bench_recall.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)

TASK = dict(pairs=6, queries=9, gap=11, keys=10, values=7, fillers=5)


def stored_pairs(seq, pairs):
    """{key: value} read from the first 2 pairs tokens of one sequence, independently of the generator."""
    return {int(seq[2 * i]): int(seq[2 * i + 1]) for i in range(pairs)}


def test_sequences_recall_their_own_pairs():
    x, y, mask = R.make_batch(np.random.default_rng(3), 32, **TASK)
    n, q, gap = TASK["pairs"], TASK["queries"], TASK["gap"]
    length = 2 * n + gap + 2 * q - 1
    assert x.shape == y.shape == mask.shape == (32, length)
    keys, values, fillers = R.token_ranges(TASK["keys"], TASK["values"], TASK["fillers"])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])                     # y is x shifted by one
    assert mask.sum() == 32 * q
    for xs, ys, ms in zip(x, y, mask):
        seq = np.append(xs, ys[-1])
        table = stored_pairs(seq, n)
        assert len(table) == n                                              # keys distinct
        assert all(k in keys for k in table) and all(v in values for v in table.values())
        assert all(f in fillers for f in seq[2 * n:2 * n + gap])
        scored = np.flatnonzero(ms)
        assert len(scored) == q and scored.min() >= 2 * n + gap
        for pos in scored:                          # the input there is a stored key, the target its value
            assert xs[pos] in table and ys[pos] == table[xs[pos]]
        # every unmasked query-section target is a query key, never a value
        assert all(ys[p] in keys for p in range(2 * n + gap, length) if not ms[p])


def test_separated_queries_ask_for_the_value_after_their_separators():
    """--query_sep 2: each query is key, separator, separator, value; the scored inputs are the last
    separators, the key two places before is a stored one, and the target is its value."""
    x, y, mask = R.make_batch(np.random.default_rng(5), 16, **dict(TASK, sep=2))
    n, q, gap = TASK["pairs"], TASK["queries"], TASK["gap"]
    assert x.shape == (16, 2 * n + gap + 4 * q - 1) and mask.sum() == 16 * q
    sep = R.token_ranges(TASK["keys"], TASK["values"], TASK["fillers"])[2].start
    for xs, ys, ms in zip(x, y, mask):
        table = stored_pairs(np.append(xs, ys[-1]), n)
        for pos in np.flatnonzero(ms):
            assert xs[pos] == xs[pos - 1] == sep and ys[pos] == table[xs[pos - 2]]


def test_keys_asked_first_are_answered_in_their_order_after_a_cue():
    """--query_first 1: the q keys open the sequence, the pairs follow, and the i-th scored input is
    the cue token whose target is the value stored with the i-th key asked."""
    x, y, mask = R.make_batch(np.random.default_rng(6), 16, **dict(TASK, query_first=True))
    n, q, gap = TASK["pairs"], TASK["queries"], TASK["gap"]
    assert x.shape == (16, q + 2 * n + gap + 2 * q - 1) and mask.sum() == 16 * q
    cue = R.token_ranges(TASK["keys"], TASK["values"], TASK["fillers"])[2].start
    for xs, ys, ms in zip(x, y, mask):
        seq = np.append(xs, ys[-1])
        table = stored_pairs(seq[q:], n)
        scored = np.flatnonzero(ms)
        assert all(xs[pos] == cue for pos in scored)
        assert [ys[pos] for pos in scored] == [table[k] for k in seq[:q]]


def test_queries_are_spread_over_the_stored_keys():
    x, _, mask = R.make_batch(np.random.default_rng(4), 16, pairs=5, queries=5, gap=0, keys=8,
                              values=8, fillers=1)
    for xs, ms in zip(x, mask):       # q = n: each stored key is asked exactly once, in some order
        assert sorted(xs[ms > 0]) == sorted(xs[0:10:2])


def test_accuracy_on_hand_made_logits():
    rng = np.random.default_rng(0)
    V = 12
    y = rng.integers(0, V, (3, 8))
    mask = np.zeros((3, 8))
    mask[:, [2, 4, 7]] = 1
    perfect = np.eye(V)[y]                                               # (B, L, V): argmax = y
    assert R.recall_accuracy(perfect, y, mask) == (1.0, 9)
    shifted = np.roll(perfect, 1, axis=1)          # each position predicts the previous target
    expected = float(((y == np.roll(y, 1, axis=1)) & (mask > 0)).sum()) / 9
    assert R.recall_accuracy(shifted, y, mask) == (expected, 9)
    y[:, 2] = (y[:, 1] + 1) % V                    # position 2 now differs from position 1...
    y[:, 4] = y[:, 3]                              # ...position 4 equals position 3
    y[:, 7] = (y[:, 6] + 1) % V
    assert R.recall_accuracy(np.roll(np.eye(V)[y], 1, axis=1), y, mask) == (3 / 9, 9)
    assert math.isclose(R.std_error(0.25, 48), 0.0625)


@pytest.mark.parametrize("argv, words", [
    (["--pairs", "70"], "more than the 64 keys"),
    (["--gap", "300"], "longer than --context 256"),
    (["--models", "lif,gru"], "--models"),
    (["--steps", "0"], "must be >= 1"),
    (["--set", "n_head=3"], "n_head"),
    (["--set", "decay_step=2"], "--decay_step"),
    (["--query_sep", "-1"], "--query_sep"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--seed", "-1"], "--seed >= 0"),
    (["--decay_step", "1.5,nan"], "--decay_step > 0"),
])
def test_bad_options_give_one_error_line(argv, words, capsys, tmp_path):
    small = ["--preset", "tiny", "--steps", "2", "--batch", "2", "--eval_seqs", "2",
             "--out", str(tmp_path / "t.md")]
    assert R.main(small + argv) == 2           # (tiny and short: a broken check costs seconds, not minutes)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_tiny_run_gives_a_finite_row(tmp_path):
    args = R.parse_args(["--preset", "tiny", "--pairs", "2", "--gap", "3", "--steps", "30", "--batch", "4",
                         "--warmup", "5", "--eval_seqs", "8", "--context", "32",
                         "--out", str(tmp_path / "t.md")])
    row = R.run_row(args, "lif", 2, 3, 1.5)
    assert math.isfinite(row["loss"]) and row["n"] == 8 * 2 and 0 <= row["acc"] <= 1
    assert row["length"] == 2 * 2 + 3 + 2 * 2 - 1


@pytest.mark.parametrize("train_seqs", [0, 3])
def test_fixed_training_set_is_the_only_source_of_batches(train_seqs, tmp_path, monkeypatch):
    """--train_seqs 3: every training batch's rows are among the 3 sequences made once from the
    training seed; 0: fresh sequences, no row seen twice in 10 steps."""
    args = R.parse_args(["--preset", "tiny", "--pairs", "2", "--steps", "10", "--batch", "4", "--warmup", "2",
                         "--eval_seqs", "4", "--context", "32", "--train_seqs", str(train_seqs),
                         "--out", str(tmp_path / "t.md")])
    seen, loss = [], R.masked_loss

    def recording_loss(logits, y, mask):
        seen.append(y.cpu().numpy())
        return loss(logits, y, mask)
    monkeypatch.setattr(R, "masked_loss", recording_loss)
    R.run_row(args, "twin", 2, 0, 1.5)
    rows = {tuple(r) for batch in seen[:10] for r in batch}                    # the 10 training batches
    if train_seqs:
        pool = R.make_batch(np.random.default_rng(0), 3, pairs=2, queries=2, gap=0, keys=64, values=64,
                            fillers=32)[1]
        assert 1 < len(rows) and rows <= {tuple(r) for r in pool}
    else:
        assert len(rows) == 40
