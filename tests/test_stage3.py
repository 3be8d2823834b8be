"""Stage 3 tests: hand gradients vs finite differences, recurrent vs parallel form,
checkpoints and exact resume, optimizer and schedule vs hand computations, overfitting."""
import math

import numpy as np
import pytest

from spikelib.checkpoint import CheckpointError
from spikelib.stages import load_stage

m = load_stage("3_spike_llm_numpy")


def tiny_cfg(**overrides):
    """The tiny preset shrunk further for finite differences (every code path is the same)."""
    base = dict(vocab_size=11, d_model=8, d_ff=12, n_head=2, norm_eps=1e-2)
    return m.make_configs("tiny", **dict(base, **overrides))[0]


def perturbed_params(cfg, seed=0):
    """float64 params with noise on every tensor, so no gradient is trivially tiny or zero."""
    rng = np.random.default_rng(seed)
    return {k: v.astype(np.float64) + rng.normal(0, 0.1, v.shape) for k, v in m.init_params(cfg, seed).items()}


class FrozenReset:
    """Replays the reset amounts r of a first forward pass in every later one.

    With detach_reset the backward treats the spike in the reset term as a constant; the
    function whose true gradient that is keeps r fixed at its value at the evaluation point.
    Finite differences of the forward with r frozen therefore check the detached backward."""

    def __init__(self, monkeypatch):
        self.original, self.recorded, self.calls = m.reset_membrane, [], None
        monkeypatch.setattr(m, "reset_membrane", self)

    def __call__(self, v, r, thr, reset):
        if self.calls is None:
            self.recorded.append(np.array(r, copy=True))
        else:
            r = self.recorded[self.calls]
            self.calls += 1
        return self.original(v, r, thr, reset)

    def replay(self):
        self.calls = 0


GRADCHECK = [
    {}, {"neuron": "plif"}, {"neuron": "alif"}, {"neuron": "ternary"},
    {"attention": "hadamard"}, {"attention": "hadamard", "neuron": "plif"},
    {"spiking": False}, {"spiking": False, "attention": "hadamard"},
    {"reset": "hard"}, {"reset": "hard", "neuron": "alif"}, {"reset": "hard", "neuron": "ternary"},
    {"reset": "hard", "neuron": "plif"},
    {"detach_reset": True}, {"detach_reset": True, "reset": "hard", "neuron": "alif"},
    {"detach_reset": True, "neuron": "ternary", "reset": "hard"}, {"detach_reset": True, "neuron": "plif"},
    {"tie_embeddings": False}, {"surrogate": "sigmoid"}, {"surrogate": "fast_sigmoid"},
    {"surrogate": "triangle"}, {"surrogate": "triangle", "neuron": "alif", "attention": "hadamard"},
]


@pytest.mark.parametrize("overrides", GRADCHECK, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "lif")
def test_gradients_match_finite_differences(overrides, monkeypatch):
    """Every parameter tensor, 4 entries each (its largest-gradient entry and 3 random ones):
    ||hand - fd|| / (||hand|| + ||fd||) < 1e-5 with central differences (h = 1e-6) of the smooth
    forward in float64. Tensors whose sampled gradients are all below 1e-6 (round-off level of
    the differences) are held to an absolute 1e-10 instead."""
    cfg = tiny_cfg(**overrides)
    params = perturbed_params(cfg)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, cfg.vocab_size, (2, 5)), rng.integers(0, cfg.vocab_size, (2, 5))
    frozen = FrozenReset(monkeypatch) if cfg.detach_reset else None
    loss, grads, _ = m.loss_and_grads(params, cfg, x, y, smooth=True)
    assert set(grads) == set(params)

    def loss_at():
        if frozen:
            frozen.replay()
        return m.loss_and_grads(params, cfg, x, y, smooth=True)[0]

    h = 1e-6
    for name, p in params.items():
        assert grads[name].shape == p.shape and grads[name].dtype == np.float64
        entries = [np.unravel_index(np.argmax(np.abs(grads[name])), p.shape)]
        entries += [tuple(int(rng.integers(0, s)) for s in p.shape) for _ in range(3)]
        hand, fd = [], []
        for ix in entries:
            old = p[ix]
            p[ix] = old + h
            up = loss_at()
            p[ix] = old - h
            down = loss_at()
            p[ix] = old
            hand.append(grads[name][ix])
            fd.append((up - down) / (2 * h))
        hand, fd = np.array(hand), np.array(fd)
        scale = np.linalg.norm(hand) + np.linalg.norm(fd)
        if scale < 1e-6:
            assert np.abs(hand - fd).max() < 1e-10, (name, hand, fd)
        else:
            assert np.linalg.norm(hand - fd) / scale < 1e-5, (name, hand, fd)
