"""Stage 3 tests: hand gradients vs finite differences, recurrent vs parallel form,
checkpoints and exact resume, optimizer and schedule vs hand computations, overfitting."""
import math
import os
import signal
import time

import numpy as np
import pytest

from spikelib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from spikelib.loop import interrupts_between_steps
from spikelib.stages import load_stage

m = load_stage("3_spike_llm_numpy")


def tiny_cfg(**overrides):
    """The tiny preset shrunk further for finite differences (every code path is the same)."""
    base = dict(vocab_size=11, d_model=8, d_ff=12, n_head=2)
    return m.make_configs("tiny", **dict(base, **overrides))[0]


def perturbed_params(cfg, seed=0):
    """float64 params with noise on every tensor, so no gradient is trivially tiny or zero."""
    rng = np.random.default_rng(seed)
    params = m.init_params(cfg, seed)
    return {k: v.astype(np.float64) + rng.normal(0, 0.1, v.shape) for k, v in params.items()}


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
    {"dropout": 0.3}, {"dropout": 0.3, "tie_embeddings": False, "attention": "hadamard"},
    {"neuron": "lits"}, {"neuron": "lits", "reset": "hard", "attention": "hadamard"},
    {"spike_fn": "sigmoid4x", "quant": "identity"}, {"syn_alpha": 0.5}, {"syn_alpha": 0.5, "neuron": "plif"},
    {"spike_fn": "sigmoid4x", "quant": "identity", "neuron": "lits", "syn_alpha": 0.3},
]


def overrides_id(overrides):
    return "-".join(f"{k}={v}" for k, v in overrides.items()) or "lif"


@pytest.mark.parametrize("overrides", GRADCHECK, ids=overrides_id)
def test_gradients_match_finite_differences(overrides, monkeypatch):
    """Every parameter tensor, 4 entries each (its largest-gradient entry and 3 random ones):
    ||hand - fd|| / (||hand|| + ||fd||) < 1e-5 with central differences (h = 1e-6) of the smooth
    forward in float64. Tensors whose sampled gradients are all below 1e-6 (round-off level of
    the differences) are held to an absolute 1e-10 instead. Dropout draws the same masks at
    every evaluation (a generator of fixed seed), so the loss is a fixed function of params."""
    cfg = tiny_cfg(**overrides)
    params = perturbed_params(cfg)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, cfg.vocab_size, (2, 5)), rng.integers(0, cfg.vocab_size, (2, 5))
    frozen = FrozenReset(monkeypatch) if cfg.detach_reset else None
    loss, grads, _ = m.loss_and_grads(params, cfg, x, y, smooth=True, rng=np.random.default_rng(7))
    assert set(grads) == set(params)

    def loss_at():
        if frozen:
            frozen.replay()
        return m.loss_and_grads(params, cfg, x, y, smooth=True, rng=np.random.default_rng(7))[0]

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


@pytest.mark.parametrize("overrides", [{}, {"attention": "hadamard"}, {"neuron": "alif"}, {"neuron": "plif"},
                                       {"neuron": "ternary", "reset": "hard"}, {"spiking": False},
                                       {"attention": "hadamard", "neuron": "alif", "reset": "hard"},
                                       {"decay_start": 5.0, "decay_step": 1.0}])
@pytest.mark.parametrize("smooth", [False, True])
def test_recurrent_decoding_equals_parallel_forward(overrides, smooth):
    """Decoding token by token with the constant-size state gives the parallel logits at every
    position, past the training context too (float64, within 1e-5)."""
    cfg = m.make_configs("tiny", **overrides)[0]
    params = perturbed_params(cfg, seed=3)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context + 8))
    parallel, _ = m.forward(params, cfg, idx, smooth)
    state = m.init_decode_state(cfg, 2, np.float64)
    shapes = [s.shape for s in state["layers"]]
    steps = []
    for pos in range(idx.shape[1]):
        if smooth:
            steps.append(m.forward(params, cfg, idx[:, pos:pos + 1], True, state=state)[0][:, 0])
        else:
            steps.append(m.decode_step(params, cfg, state, idx[:, pos]))
    assert [s.shape for s in state["layers"]] == shapes          # the state does not grow
    np.testing.assert_allclose(np.stack(steps, 1), parallel, rtol=0, atol=1e-5)
    assert np.abs(parallel).max() > 1e-3                          # not trivially zero


@pytest.mark.parametrize("start, step", [(1.0, 1.5), (5.0, 1.0), (0.5, 0.0)])
def test_each_head_forgets_at_its_configured_rate(start, step):
    """One key at position 0 (hadamard: y_l = sum_j gamma^(l-j) k_j v_j): head h reads
    gamma_h^l at position l, gamma_h = 1 - 2^-(start + step h), in both the parallel and the
    recurrent form."""
    cfg = m.make_configs("tiny", attention="hadamard", n_head=4, d_model=16,
                         decay_start=start, decay_step=step)[0]
    L = 12
    kv = np.zeros((1, 1, L, cfg.d_model))
    kv[:, :, 0] = 1.0
    y = m.attention(np.ones_like(kv), kv, kv, cfg)[0][0, 0, :, :, 0]              # (H, L)
    gamma = 1.0 - 0.5 ** (start + step * np.arange(4))
    np.testing.assert_allclose(y, gamma[:, None] ** np.arange(L), rtol=1e-12)
    state = m.init_decode_state(cfg, 1, np.float64)
    steps = []
    for pos in range(L):
        kv_pos = kv[:, :, pos:pos + 1]
        steps.append(m.attention_recurrent(kv_pos, kv_pos, kv_pos, cfg, state, 0))
    np.testing.assert_allclose(np.concatenate(steps, 3)[0, 0, :, :, 0], y, rtol=1e-12)


@pytest.mark.parametrize("bad", [{"decay_start": 0.0}, {"decay_start": -1.0}, {"decay_step": -0.5}])
def test_decays_outside_zero_to_one_are_refused(bad):
    with pytest.raises(ValueError, match="decay"):
        m.make_configs("tiny", **bad)


def test_dropout_acts_only_in_training_and_keeps_the_mean():
    """With a generator (training) a fraction p of the units is zeroed and the rest scaled by
    1/(1 - p); without one (evaluation, generation) the model is exactly the dropout-free one."""
    cfg, plain = m.make_configs("tiny", dropout=0.25)[0], m.make_configs("tiny")[0]
    params = m.init_params(cfg, 0)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context))
    evaluated = m.forward(params, cfg, idx)[0]
    np.testing.assert_array_equal(evaluated, m.forward(params, plain, idx)[0])
    trained, cache = m.forward(params, cfg, idx, rng=np.random.default_rng(1))
    assert np.abs(trained - evaluated).max() > 1e-3
    for mask in (cache["drop_embed"], cache["blocks"][0]["drop_attn"], cache["blocks"][1]["drop_mlp"]):
        assert set(np.unique(mask).tolist()) == {0.0, np.float32(1 / 0.75)}
        assert abs(np.mean(mask == 0) - 0.25) < 0.03 and abs(mask.mean() - 1) < 0.04


def synthetic_tokens(n=4000, vocab=64, seed=0):
    """A learnable token stream: a noisy repeating pattern, as uint16 like the .bin files."""
    rng = np.random.default_rng(seed)
    base = np.tile(rng.integers(0, vocab, 37), n // 37 + 1)[:n]
    noise = rng.random(n) < 0.1
    return np.where(noise, rng.integers(0, vocab, n), base).astype(np.uint16)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_equals_uninterrupted_run(tmp_path, dropout):
    """k steps, save, load, continue == the same number of steps straight (bit-identical):
    batches and dropout masks both come from the generator fixed by (seed, step)."""
    mcfg, tcfg = m.make_configs("tiny", max_steps=6, warmup=2, dropout=dropout)
    data = synthetic_tokens()
    straight = m.init_params(mcfg, tcfg.seed)
    opt = m.init_opt_state(straight)
    for step in range(6):
        m.train_step(straight, opt, mcfg, tcfg, data, step)

    params = m.init_params(mcfg, tcfg.seed)
    opt = m.init_opt_state(params)
    for step in range(3):
        m.train_step(params, opt, mcfg, tcfg, data, step)
    tok = {"path": "tok.json", "sha256": "ab" * 32, "vocab_size": 64}
    m.save_model(tmp_path / "ckpt.npz", params, mcfg, tcfg, 3, opt, tok)
    params2, mcfg2, train2, step2, opt2, config = m.load_model(tmp_path / "ckpt.npz")
    assert mcfg2 == mcfg and step2 == 3 and config["tokenizer"] == tok
    assert m.TrainConfig(**{k: v for k, v in train2.items() if k != "step"}) == tcfg
    for name in params:
        assert params2[name].dtype == np.float32
        np.testing.assert_array_equal(params2[name], params[name])
        np.testing.assert_array_equal(opt2["m"][name], opt["m"][name])
    for step in range(step2, 6):
        m.train_step(params2, opt2, mcfg2, tcfg, data, step)
    for name in straight:
        np.testing.assert_array_equal(params2[name], straight[name])
    initial = m.init_params(mcfg, tcfg.seed)
    assert all(not np.array_equal(params2[n], initial[n]) for n in params2)      # training moved them


def saved_tiny(tmp_path, **overrides):
    mcfg, tcfg = m.make_configs("tiny", **overrides)
    params = m.init_params(mcfg, 0)
    path = m.save_model(tmp_path / "ckpt.npz", params, mcfg, tcfg, 0, m.init_opt_state(params),
                        {"path": "t.json", "sha256": "0" * 64, "vocab_size": 64})
    return path, params, mcfg, tcfg


def test_corrupt_and_truncated_checkpoints_raise_clear_errors(tmp_path):
    path, *_ = saved_tiny(tmp_path)
    blob = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        m.load_model(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        m.load_model(tmp_path / "junk.npz")
    assert "pickle" not in str(err.value)          # numpy's hint to load it unsafely is not passed on
    with pytest.raises(CheckpointError, match="does not exist"):
        m.load_model(tmp_path / "missing.npz")


def test_mismatched_checkpoints_raise_clear_errors(tmp_path):
    path, params, mcfg, tcfg = saved_tiny(tmp_path)
    _, config, _ = load_checkpoint(path)
    wider = dict(config, model=dict(config["model"], d_model=48))            # shapes disagree
    save_checkpoint(tmp_path / "wide.npz", params, wider)
    with pytest.raises(CheckpointError, match="shape"):
        m.load_model(tmp_path / "wide.npz")
    plif = dict(config, model=dict(config["model"], neuron="plif"))          # parameters missing
    save_checkpoint(tmp_path / "plif.npz", params, plif)
    with pytest.raises(CheckpointError, match="missing"):
        m.load_model(tmp_path / "plif.npz")
    bad = dict(config, model=dict(config["model"], neuron="izhikevich"))      # unknown neuron
    save_checkpoint(tmp_path / "bad.npz", params, bad)
    with pytest.raises(CheckpointError, match="invalid model config"):
        m.load_model(tmp_path / "bad.npz")
    nan = dict(params, **{"norm_f.weight": np.full_like(params["norm_f.weight"], np.nan)})
    save_checkpoint(tmp_path / "nan.npz", nan, config)
    with pytest.raises(CheckpointError, match="non-finite"):
        m.load_model(tmp_path / "nan.npz")
    with pytest.raises(CheckpointError, match="tokenizer sha256"):
        m.check_tokenizer(config, "f" * 64, path)
    m.check_tokenizer(config, "0" * 64, path)                                # the matching one passes


def test_lr_schedule_matches_hand_computation():
    tcfg = m.TrainConfig(lr=1.0, min_lr=0.1, warmup=4, max_steps=14)
    assert [m.lr_at(s, tcfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert m.lr_at(4, tcfg) == pytest.approx(1.0)
    assert m.lr_at(9, tcfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))   # halfway: 0.55
    assert m.lr_at(14, tcfg) == pytest.approx(0.1) and m.lr_at(100, tcfg) == pytest.approx(0.1)


def test_adamw_matches_hand_computation():
    """Two steps on a matrix, a vector and a block matrix, written out from the AdamW equations."""
    tcfg = m.TrainConfig(lr=0.1, min_lr=0.1, warmup=1, max_steps=10, weight_decay=0.5, layer_lr_decay=0.5)
    params = {"embed.weight": np.array([[1.0, -2.0]]), "norm_f.weight": np.array([3.0]),
              "blocks.0.attn.wq": np.array([[0.5]])}
    grads = [{"embed.weight": np.array([[0.1, 0.2]]), "norm_f.weight": np.array([-1.0]),
              "blocks.0.attn.wq": np.array([[2.0]])},
             {"embed.weight": np.array([[0.3, -0.1]]), "norm_f.weight": np.array([0.5]),
              "blocks.0.attn.wq": np.array([[-1.0]])}]
    mult = {"embed.weight": 0.5 ** 2, "blocks.0.attn.wq": 0.5 ** 1, "norm_f.weight": 1.0}   # n_layer = 1
    expect = {k: v.copy() for k, v in params.items()}
    mom = {k: (0.0, 0.0) for k in params}
    for t, g in enumerate(grads, start=1):
        for k in params:
            m1 = 0.9 * mom[k][0] + 0.1 * g[k]
            v1 = 0.95 * mom[k][1] + 0.05 * g[k] ** 2
            mom[k] = (m1, v1)
            lr = 0.1 * mult[k]
            decay = 0.5 if expect[k].ndim == 2 else 0.0
            m_hat, v_hat = m1 / (1 - 0.9 ** t), v1 / (1 - 0.95 ** t)
            expect[k] = expect[k] * (1 - lr * decay) - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    opt = m.init_opt_state(params)
    for step, g in enumerate(grads):
        m.adamw_step(params, g, opt, step, tcfg, n_layer=1)
    for k in params:
        np.testing.assert_allclose(params[k], expect[k], rtol=1e-12)


def test_gradient_clipping_scales_the_global_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    clipped, norm = m.clip_grads(grads, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [3.0 / (5.0 + 1e-6), 0.0])
    same, _ = m.clip_grads(grads, 10.0)
    np.testing.assert_array_equal(same["b"], grads["b"])


def test_tiny_preset_overfits_a_batch_with_hard_spikes():
    """Hard (Heaviside) spikes, surrogate gradients: loss on one fixed batch falls from
    ln(64) = 4.16 to below 0.5 nats/token in 150 steps."""
    mcfg, tcfg = m.make_configs("tiny", lr=1e-2, min_lr=1e-2, warmup=10, max_steps=150, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, (4, 32))
    y = np.roll(x, -1, axis=1)
    params = m.init_params(mcfg, 0)
    opt = m.init_opt_state(params)
    first = None
    for step in range(tcfg.max_steps):
        loss, grads, stats = m.loss_and_grads(params, mcfg, x, y)
        first = first if first is not None else loss
        grads, _ = m.clip_grads(grads, tcfg.grad_clip)
        m.adamw_step(params, grads, opt, step, tcfg, mcfg.n_layer)
    assert first > 4.0
    assert loss < 0.5, loss
    rates = [r for layer in stats["rates"] for r in layer.values()]
    assert 0.0 < min(rates) and max(rates) < 1.0                  # the neurons really spike


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    """A small English-like text file for the end-to-end runs (stages 1 and 2 prepare it)."""
    rng = np.random.default_rng(0)
    words = ("the king and queen walked to a small garden where every flower was bright and "
             "the birds sang songs of summer rain over quiet hills").split()
    sentences = [" ".join(rng.choice(words, size=int(rng.integers(5, 12)))) for _ in range(600)]
    lines = [s.capitalize() + "." for s in sentences]
    path = tmp_path_factory.mktemp("text") / "garden.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_main(source, root, *extra):
    args = ["--preset", "tiny", "--source", f"files:{source}", "--data_root", str(root / "data"),
            "--out_dir", str(root / "out"), "--eval_interval", "4", "--eval_tokens", "256",
            "--max_new_tokens", "6", "--max_steps", "12"]
    return m.main(args + [str(a) for a in extra])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_main_interrupt_resume_and_generate(text_source, tmp_path, monkeypatch, capsys, sig):
    """End to end: Ctrl-C (a real SIGINT), or a SIGTERM as a job scheduler sends, arriving in the
    middle of step 6, between the backward pass and the optimizer update, lets the step finish and
    saves step 7 whole; --resume finishes with the same parameters as an uninterrupted run;
    --generate streams text from the checkpoint."""
    assert run_main(text_source, tmp_path / "straight") == 0
    straight, _, _, step, _, _ = m.load_model(tmp_path / "straight/out/ckpt.npz")
    assert step == 12
    out = capsys.readouterr().out
    assert "bits/char" in out and "nJ" in out and "sample" in out

    real_update = m.adamw_step

    def interrupted_update(params, grads, opt, step, *args):
        if step == 6:
            os.kill(os.getpid(), sig)                   # the handler runs here, mid-step
        return real_update(params, grads, opt, step, *args)

    monkeypatch.setattr(m, "adamw_step", interrupted_update)
    assert run_main(text_source, tmp_path / "cut") == 130
    assert m.load_model(tmp_path / "cut/out/ckpt.npz")[3] == 7
    monkeypatch.setattr(m, "adamw_step", real_update)
    assert run_main(text_source, tmp_path / "cut", "--resume", 1) == 0
    resumed, _, _, step, _, _ = m.load_model(tmp_path / "cut/out/ckpt.npz")
    assert step == 12
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    capsys.readouterr()
    assert run_main(text_source, tmp_path / "cut", "--generate", "The king") == 0
    assert capsys.readouterr().out.startswith("The king")


def test_a_second_signal_quits_at_once_and_the_handlers_come_back():
    """Inside the loop's block the first SIGINT or SIGTERM only asks to stop; a second one raises
    KeyboardInterrupt at once; after the block both signals have their handlers of before."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in before:
        with interrupts_between_steps() as stop:
            os.kill(os.getpid(), sig)
            time.sleep(0.01)                             # Python runs the handler between bytecodes
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(0.01)
        assert {s: signal.getsignal(s) for s in before} == before


def test_nan_loss_stops_and_keeps_last_checkpoint(text_source, tmp_path, monkeypatch, capsys):
    real, calls = m.loss_and_grads, []

    def nan_from_step_5(params, cfg, x, y, smooth=False, rng=None):
        calls.append(1)
        loss, grads, stats = real(params, cfg, x, y, smooth, rng)
        return (float("nan") if len(calls) > 5 else loss), grads, stats

    monkeypatch.setattr(m, "loss_and_grads", nan_from_step_5)
    assert run_main(text_source, tmp_path) == 1
    assert "loss is nan at step 5" in capsys.readouterr().err
    assert m.load_model(tmp_path / "out/ckpt.npz")[3] == 4            # the step-4 checkpoint is kept


# ----------------------------------------------------------------------------- neuron options


@pytest.mark.parametrize("neuron, quant", [("lif", "round_ste"), ("lits", "round_ste"),
                                           ("lif", "probabilistic_ste"), ("lits", "stochastic_round_ste"),
                                           ("alif", "round_ste")])
def test_straight_through_backward_is_the_gradient_of_the_forward_with_frozen_jumps(monkeypatch, neuron,
                                                                                      quant):
    """A straight-through quantizer's output is p + (q(p) - p) whose jump q(p) - p the backward holds
    constant. So over T steps (resets included) the hand backward must equal central differences
    (h = 1e-6, float64) of the forward in which every jump is frozen at its value at the point."""
    cfg = tiny_cfg(neuron=neuron, spike_fn="sigmoid4x", quant=quant, T=4)
    rng = np.random.default_rng(0)
    x, R = rng.normal(0.6, 0.8, (4, 3, 5)), rng.normal(size=(4, 3, 5))
    scales = (rng.uniform(0.5, 1.5, 5), rng.uniform(0.5, 1.5, 5))
    real, jumps, replay = m.step_fn, [], []

    def frozen_step(u, cfg, smooth, n=None):
        if replay:
            return real(u, cfg, True) + jumps[replay.pop(0)]
        jumps.append(real(u, cfg, False, n) - real(u, cfg, True))
        return real(u, cfg, False, n)

    monkeypatch.setattr(m, "step_fn", frozen_step)
    s, cache = m.neuron_forward(x, cfg, scales=scales, rng=np.random.default_rng(1))
    unit = s / np.where(s > 0, scales[0], scales[1]) if neuron == "lits" else s
    assert set(np.unique(unit)) <= {-1.0, 0.0, 1.0}                    # spikes: {0, 1} or {-s-, 0, s+}
    assert any(np.any(j != 0) for j in jumps)                          # the jumps are really there
    dx, grads = m.neuron_backward(R, cache, cfg)

    def loss(x):
        replay.extend(range(len(jumps)))
        return float((m.neuron_forward(x, cfg, scales=scales)[0] * R).sum())
    fd = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[ix] += 1e-6
        down[ix] -= 1e-6
        fd[ix] = (loss(up) - loss(down)) / 2e-6
    assert np.linalg.norm(dx - fd) / (np.linalg.norm(dx) + np.linalg.norm(fd)) < 1e-6


@pytest.mark.parametrize("quant", m.NOISY)
def test_random_quantizers_fire_with_probability_p_in_training_and_round_in_evaluation(quant):
    """One timestep (v = x): 40,000 draws per channel fire at rate p = sigmoid(4u) within 5 standard
    errors (1/80 at most); without an rng (evaluation) the neuron fires exactly when u >= 0."""
    cfg = tiny_cfg(spike_fn="sigmoid4x", quant=quant)
    u = np.array([-0.4, -0.1, 0.0, 0.2, 0.5])
    x = np.broadcast_to(cfg.theta + u, (1, 40000, 5))
    s, _ = m.neuron_forward(x, cfg, rng=np.random.default_rng(0))
    assert set(np.unique(s)) == {0.0, 1.0}
    assert np.abs(s.mean((0, 1)) - 1 / (1 + np.exp(-4 * u))).max() < 5 * 0.5 / math.sqrt(40000)
    np.testing.assert_array_equal(m.neuron_forward(x, cfg)[0][0, 0], (u >= 0).astype(float))


def test_outputs_that_are_not_spikes_are_counted_as_multiply_accumulates():
    """sigmoid4x with quant identity emits rates p: every synaptic operation becomes a MAC; the
    binary quantizers and lits (scales folded into the weights) keep their accumulates."""
    rates = [dict({site: 0.3 for site in m.SITES}, wo_input=0.3)] * 2
    spikes = m.synaptic_ops(tiny_cfg(spike_fn="sigmoid4x", quant="round_ste"), rates)
    smooth = m.synaptic_ops(tiny_cfg(spike_fn="sigmoid4x", quant="identity"), rates)
    assert spikes["ac"] > 0 and smooth["ac"] == 0 and smooth["mac"] == spikes["mac"] + spikes["ac"]
    assert m.synaptic_ops(tiny_cfg(neuron="lits"), rates) == spikes == m.synaptic_ops(tiny_cfg(), rates)
    cfg = tiny_cfg(spike_fn="sigmoid4x", quant="identity")
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8))
    ops = m.energy_report(m.init_params(cfg), cfg, x)[1]["ops"]
    assert ops["ac"] == 0 and ops["mac"] > cfg.d_model * cfg.vocab_size


def test_version_2_checkpoints_load_as_the_model_they_were_and_lits_scales_round_trip(tmp_path, monkeypatch):
    """A version-2 file (no spike_fn, quant, syn_alpha) loads with the defaults that reproduce it;
    a lits model saves and loads its scale_pos and scale_neg."""
    import spikelib.checkpoint as ck
    path, params, mcfg, tcfg = saved_tiny(tmp_path)
    _, config, _ = load_checkpoint(path)
    old = {k: v for k, v in config["model"].items() if k not in ("spike_fn", "quant", "syn_alpha")}
    monkeypatch.setattr(ck, "VERSION", 2)
    save_checkpoint(tmp_path / "v2.npz", params, dict(config, model=old))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "v2.npz")[1]["version"] == 2
    loaded, cfg2, *_ = m.load_model(tmp_path / "v2.npz")
    assert cfg2 == mcfg and (cfg2.spike_fn, cfg2.quant, cfg2.syn_alpha) == ("heaviside", "round_ste", 0.0)
    path, params, mcfg, _ = saved_tiny(tmp_path / "lits", neuron="lits")
    params["blocks.0.sn1.scale_neg"] += 0.25
    m.save_model(path, params, mcfg, tcfg, 0)
    loaded, cfg3, *_ = m.load_model(path)
    assert cfg3.neuron == "lits" and np.all(loaded["blocks.0.sn1.scale_neg"] == 1.25)
