"""Token shift (ModelConfig.token_shift): half the channels of a block's attention input (and, at 2,
of its MLP input) read the previous position's spikes. Stage 3's hand backward against finite
differences, its recurrent form against its parallel one, stages 4 and 5 against stage 3, the
decode states of stages 5, 6 and 8 (prefill, steps, saved files) and the checkpoint field."""
from dataclasses import asdict

import numpy as np
import pytest

from numerics import finite_diff
from spikelib.checkpoint import FORMAT, load_checkpoint
from spikelib.stages import load_stage
from test_checkpoint import write_raw
from test_stage3 import perturbed_params, saved_tiny
from test_stage3 import test_gradients_match_finite_differences as gradient_check

S3 = load_stage("3_spike_llm_numpy")


def test_shift_moves_the_first_half_one_position_and_its_backward_is_the_adjoint():
    """shift(s)[l, :D/2] = s[l-1, :D/2] (zeros at l = 0, prev when given), the other half unchanged;
    token_shift_backward equals finite differences of sum(shift(s) * g) (float64, 1e-8)."""
    rng = np.random.default_rng(0)
    s = (rng.random((2, 3, 5, 6)) < 0.4).astype(np.float64)                    # (T, B, L, D) spikes
    out, last = S3.token_shift(s)
    np.testing.assert_array_equal(out[:, :, 1:, :3], s[:, :, :-1, :3])
    np.testing.assert_array_equal(out[:, :, 0, :3], 0.0)
    np.testing.assert_array_equal(out[..., 3:], s[..., 3:])
    np.testing.assert_array_equal(last, s[:, :, -1, :3])
    prev = rng.random((2, 3, 3))
    np.testing.assert_array_equal(S3.token_shift(s, prev)[0][:, :, 0, :3], prev)
    g = rng.normal(size=s.shape)
    x = rng.normal(size=s.shape)
    fd = finite_diff(lambda: float((S3.token_shift(x)[0] * g).sum()), x)
    np.testing.assert_allclose(S3.token_shift_backward(g), fd, rtol=0, atol=1e-8)


@pytest.mark.parametrize("overrides", [
    {"token_shift": 1}, {"token_shift": 2}, {"token_shift": 2, "attention": "hadamard", "neuron": "plif"},
    {"token_shift": 2, "rate_coding": True}, {"token_shift": 1, "spiking": False}, {"token_shift": 1, "dropout": 0.3}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_hand_backward_matches_finite_differences(overrides, monkeypatch):
    """test_stage3's gradient check (every tensor, float64 central differences, 1e-5) on shifted models."""
    gradient_check(overrides, monkeypatch)


@pytest.mark.parametrize("overrides", [{"token_shift": 1}, {"token_shift": 2},
                                       {"token_shift": 2, "attention": "hadamard", "rate_coding": True}])
def test_recurrent_decoding_equals_parallel_forward(overrides):
    """Stage 3 decoding token by token (the state keeps the last position's spikes of each shifted
    input) gives the parallel logits at every position, past the training context (float64, 1e-9);
    the model differs from the unshifted one, and its state does not grow."""
    cfg = S3.make_configs("tiny", **overrides)[0]
    params = perturbed_params(cfg, seed=3)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context + 4))
    parallel, _ = S3.forward(params, cfg, idx)
    state = S3.init_decode_state(cfg, 2, np.float64)
    assert len(state["shift"]) == cfg.n_layer * cfg.token_shift
    steps = np.stack([S3.decode_step(params, cfg, state, idx[:, j]) for j in range(idx.shape[1])], 1)
    np.testing.assert_allclose(steps, parallel, rtol=0, atol=1e-9)
    assert [a.shape for a in state["shift"]] == [(cfg.T, 2, cfg.d_model // 2)] * len(state["shift"])
    unshifted = S3.forward(params, S3.make_configs("tiny", **dict(overrides, token_shift=0))[0], idx)[0]
    assert np.abs(unshifted - parallel).max() > 0.1


def test_token_shift_is_kept_by_checkpoints_and_older_versions_load_unshifted(tmp_path):
    """token_shift round-trips through the JSON model config; a version-3 file (no token_shift)
    loads as the unshifted model it was."""
    path, params, mcfg, _ = saved_tiny(tmp_path, token_shift=2)
    assert load_checkpoint(path)[1]["model"]["token_shift"] == 2
    assert S3.load_model(path)[1] == mcfg and mcfg.token_shift == 2
    model = {k: v for k, v in asdict(mcfg).items() if k != "token_shift"}
    old = write_raw(tmp_path / "v3.npz", {"format": FORMAT, "version": 3, "model": model}, params)
    assert S3.load_model(old)[1].token_shift == 0


@pytest.mark.parametrize("value", [3, -1, True])
def test_other_token_shifts_are_refused(value):
    with pytest.raises(ValueError, match="--token_shift must be 0, 1 or 2"):
        S3.make_configs("tiny", token_shift=value)
