"""--repeat: a share of the training windows read one passage twice, so that their second half is
best predicted by copying the first. The batches are checked against windows built by hand from
the same draws, and stages 3, 4 and 5 each train on them: the loss of a step equals stage 3's loss
on the hand-built batch."""
import numpy as np
import pytest
import torch

from spikelib.runs import batch_rng, get_batch
from spikelib.stages import load_stage
from stage5 import load_stage5

S3 = load_stage("3_spike_llm_numpy")
DATA = np.arange(3000, dtype=np.uint16) % 997          # every window of 998 tokens or fewer is distinct


def windows_by_hand(data, batch_size, context, seed, step, repeat):
    """The (x, y) get_batch should give: the same starts, then the same draw of which rows repeat."""
    rng = batch_rng(seed, step)
    starts = rng.integers(0, len(data) - context, size=batch_size)
    twice = rng.random(batch_size) < repeat if repeat > 0 else np.zeros(batch_size, bool)
    half = (context + 1) // 2
    rows = []
    for i, again in zip(starts, twice):
        if again:
            rows.append(list(data[i:i + half]) + list(data[i:i + context + 1 - half]))
        else:
            rows.append(list(data[i:i + context + 1]))
    rows = np.array(rows, dtype=np.int64)                  # (B, L+1)
    return rows[:, :-1], rows[:, 1:], twice


@pytest.mark.parametrize("context", [8, 9])
@pytest.mark.parametrize("repeat", [0.0, 0.5, 1.0])
def test_windows_read_their_passage_twice_as_often_as_asked(context, repeat):
    x, y = get_batch(DATA, 64, context, batch_rng(5, 3), repeat)
    x_ref, y_ref, twice = windows_by_hand(DATA, 64, context, 5, 3, repeat)
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)
    assert twice.all() if repeat == 1 else (0 < twice.sum() < 64 if repeat == 0.5 else not twice.any())
    half = (context + 1) // 2
    window = np.concatenate([x, y[:, -1:]], axis=1)        # (B, L+1)
    copied = (window[:, half:2 * half] == window[:, :half]).all(axis=1)
    np.testing.assert_array_equal(copied, twice)           # a fresh window never repeats itself here


def test_without_the_drill_the_generator_is_left_as_before():
    """repeat 0 draws nothing more, so the dropout masks stage 3 draws next are those of before."""
    rng, ref = batch_rng(7, 1), batch_rng(7, 1)
    get_batch(DATA, 16, 32, rng)
    ref.integers(0, len(DATA) - 32, size=16)
    assert rng.random() == ref.random()


def tiny(repeat):
    mcfg, tcfg = S3.make_configs("tiny", vocab_size=997, context=16, repeat=repeat, batch_size=4, max_steps=4)
    return mcfg, tcfg, S3.init_params(mcfg, 0)


def loss_by_hand(params, mcfg, tcfg, step):
    x, y, _ = windows_by_hand(DATA, tcfg.batch_size, mcfg.context, tcfg.seed, step, tcfg.repeat)
    return S3.loss_and_grads(params, mcfg, x, y)[0]


def test_stage_3_trains_on_the_drill():
    mcfg, tcfg, params = tiny(1.0)
    want = loss_by_hand(params, mcfg, tcfg, 2)
    loss, _ = S3.train_step(params, S3.init_opt_state(params), mcfg, tcfg, DATA, 2)
    assert abs(loss - want) < 1e-9


def test_stage_4_trains_on_the_drill():
    pytest.importorskip("mlx.core")
    m4 = load_stage("4_spike_llm_mlx")
    mcfg, tcfg, params = tiny(1.0)
    want = loss_by_hand(params, mcfg, tcfg, 2)
    model = m4.build_model(mcfg, params)
    opt = m4.AdamW(model, tcfg)
    loss, _ = m4.train_step(model, opt, m4.make_train_step(model, opt, tcfg), mcfg, tcfg, DATA, 2)
    assert abs(loss - want) < 1e-4


def test_stage_5_trains_on_the_drill():
    S5 = load_stage5()
    mcfg, tcfg, params = tiny(1.0)
    want = loss_by_hand(params, mcfg, tcfg, 2)
    model = S5.build_model(mcfg, S5.RunConfig(kernels="torch", device="cpu", dtype="float32"), params)
    loss, _ = S5.train_step(model, S5.make_optimizer(model, tcfg), mcfg, tcfg, DATA, 2, torch.device("cpu"))
    assert abs(loss - want) < 1e-4
