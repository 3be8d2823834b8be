"""Stage 4 tests: the MLX port against the NumPy reference (stage 3), tensor by tensor.

Same parameters and batch -> same logits, loss, gradients and spikes; the recurrent form equals
the parallel form; checkpoints move between the stages both ways, optimizer state included,
and training continues as if it had never switched. Dropout acts only inside a training step,
where and with the scale stage 3 uses, with fresh masks every step, and never at evaluation."""
import math
import os
import signal

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from mlx.utils import tree_flatten  # noqa: E402

from spikelib import mlx_io  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

ref = load_stage("3_spike_llm_numpy")
m4 = load_stage("4_spike_llm_mlx")


VARIANTS = [
    {}, {"attention": "hadamard"},
    {"neuron": "plif"}, {"neuron": "plif", "attention": "hadamard"},
    {"neuron": "alif"}, {"neuron": "alif", "attention": "hadamard"},
    {"neuron": "ternary"}, {"neuron": "ternary", "attention": "hadamard"},
    {"spiking": False}, {"spiking": False, "attention": "hadamard"},
    {"reset": "hard"}, {"reset": "hard", "neuron": "alif"}, {"reset": "hard", "neuron": "ternary"},
    {"detach_reset": True}, {"detach_reset": True, "reset": "hard", "neuron": "alif"},
    {"detach_reset": True, "neuron": "plif"},
    {"surrogate": "sigmoid"}, {"surrogate": "fast_sigmoid"}, {"surrogate": "triangle"},
    {"tie_embeddings": False}, {"decay_start": 5.0, "decay_step": 1.0},
    {"neuron": "lits"}, {"neuron": "lits", "attention": "hadamard", "reset": "hard"},
    {"spike_fn": "sigmoid4x", "quant": "identity"}, {"spike_fn": "sigmoid4x", "quant": "round_ste"},
    {"syn_alpha": 0.5}, {"syn_alpha": 0.5, "neuron": "lits", "spike_fn": "sigmoid4x", "quant": "round_ste"},
]


def name(overrides):
    return "-".join(f"{k}={v}" for k, v in overrides.items()) or "lif"


def perturbed_params(cfg, seed=0):
    """float32 params with noise on every tensor, so every block (not just the embedding)
    shapes the logits and no gradient is trivially zero."""
    rng = np.random.default_rng(seed)
    params = ref.init_params(cfg, seed)
    return {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in params.items()}


def rel(a, b):
    """||a - b|| / ||b||."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("overrides", VARIANTS, ids=name)
def test_same_logits_loss_gradients_and_spikes_as_numpy(overrides):
    cfg = ref.make_configs("tiny", **overrides)[0]
    params = perturbed_params(cfg, seed=1)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, cfg.vocab_size, (2, 4, cfg.context))
    logits_np, cache = ref.forward(params, cfg, x)
    loss_np, grads_np, _ = ref.loss_and_grads(params, cfg, x, y)

    model = m4.build_model(cfg, params)
    logits, spikes, _ = model(mx.array(x))
    loss, grads = nn.value_and_grad(model, m4.loss_fn)(model, mx.array(x), mx.array(y))
    grads = dict(tree_flatten(grads))

    assert set(grads) == set(grads_np) == set(params)
    assert rel(logits, logits_np) < 1e-4
    assert abs(loss.item() - loss_np) < 1e-5
    worst = max(grads_np, key=lambda k: rel(grads[k], grads_np[k]))
    assert rel(grads[worst], grads_np[worst]) < 1e-3, worst
    assert all(np.linalg.norm(g) > 0 for g in grads_np.values())      # every path is exercised

    total, differ, exact = 0, 0, cfg.neuron != "lits" and cfg.quant != "identity"
    for i, layer in enumerate(spikes):
        for site in ref.SITES + ("wo_input",):
            c = cache["blocks"][i]
            a, b = np.array(layer[site]), (c[site]["s"] if site in ref.SITES else c[site])
            assert a.shape == b.shape, site
            if cfg.spiking:      # spikes: count the ones that differ (a float32 difference can flip one)
                if exact:        # lits: {-s-, 0, s+} per channel; quant identity: rates p
                    assert set(np.unique(a)) <= {-1.0, 0.0, 1.0}
                total, differ = total + a.size, differ + int(np.count_nonzero(~np.isclose(a, b, 1e-5, 1e-6)))
            else:                # ANN twin: relu activations, equal within float32 rounding
                assert rel(a, b) < 1e-5, site
    if cfg.spiking:
        print(f"{name(overrides)}: logits {rel(logits, logits_np):.1e}, worst gradient {worst} "
              f"{rel(grads[worst], grads_np[worst]):.1e}; {differ} of {total} spikes differ")
        assert differ <= 1e-3 * total
        sn1_rate = np.mean([r["sn1"] for r in mlx_io.spike_rates(spikes)])
        assert 0.01 < sn1_rate < (0.99 if exact else 1.01)                # the neurons do fire


@pytest.mark.parametrize("overrides", [{}, {"attention": "hadamard"}, {"neuron": "plif"}, {"neuron": "alif"},
                                       {"neuron": "ternary", "reset": "hard"}, {"spiking": False},
                                       {"attention": "hadamard", "neuron": "alif", "reset": "hard"},
                                       {"decay_start": 5.0, "decay_step": 1.0}], ids=name)
def test_recurrent_generation_equals_parallel_forward(overrides):
    """Token by token with the constant-size state == the parallel logits at every position,
    past the training context too."""
    cfg = ref.make_configs("tiny", **overrides)[0]
    model = m4.build_model(cfg, perturbed_params(cfg, seed=3))
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context + 8))
    parallel = np.array(model(mx.array(idx))[0])
    state = model.init_state(2)
    shapes = [s.shape for s in state]
    steps = []
    for pos in range(idx.shape[1]):
        logits, _, state = model(mx.array(idx[:, pos:pos + 1]), state)
        steps.append(np.array(logits[:, 0]))
    assert [s.shape for s in state] == shapes                 # the state does not grow
    np.testing.assert_allclose(np.stack(steps, 1), parallel, rtol=0, atol=1e-4 * np.abs(parallel).max())
    assert np.abs(parallel).max() > 1e-2
    # and the MLX recurrent form equals stage 3's recurrent form
    state_np = ref.init_decode_state(cfg, 2)
    first = ref.decode_step(perturbed_params(cfg, seed=3), cfg, state_np, idx[:, 0])
    np.testing.assert_allclose(steps[0], first, rtol=0, atol=1e-4 * np.abs(first).max())


def synthetic_tokens(n=4000, vocab=64, seed=0):
    """A learnable token stream (a noisy repeating pattern), uint16 like the .bin files."""
    rng = np.random.default_rng(seed)
    base = np.tile(rng.integers(0, vocab, 37), n // 37 + 1)[:n]
    return np.where(rng.random(n) < 0.1, rng.integers(0, vocab, n), base).astype(np.uint16)


TOK = {"path": "tok.json", "sha256": "ab" * 32, "vocab_size": 64}
K = 3     # steps before and after the switch


def configs(**overrides):
    return ref.make_configs("tiny", max_steps=2 * K, warmup=2, layer_lr_decay=0.8, **overrides)


def numpy_steps(params, opt, mcfg, tcfg, data, start, stop):
    for step in range(start, stop):
        ref.train_step(params, opt, mcfg, tcfg, data, step)


def mlx_steps(model, opt, mcfg, tcfg, data, start, stop):
    step_fn = m4.make_train_step(model, opt, tcfg)
    losses = [m4.train_step(model, opt, step_fn, mcfg, tcfg, data, step)[0] for step in range(start, stop)]
    assert all(math.isfinite(loss) for loss in losses)
    return losses


def assert_close_run(params, reference, start):
    """Each parameter's distance travelled matches the reference run's within 2%: a float32
    difference can move a spike, so runs agree closely but not bit for bit."""
    for k in reference:
        moved = np.linalg.norm(reference[k] - start[k])
        assert np.linalg.norm(params[k] - reference[k]) <= 0.02 * moved + 1e-6, k
    assert all(np.linalg.norm(reference[k] - start[k]) > 0 for k in reference if reference[k].ndim == 2)


@pytest.mark.parametrize("overrides", [{}, {"neuron": "plif", "attention": "hadamard"}], ids=name)
def test_checkpoints_move_between_stages_with_optimizer_state(tmp_path, overrides):
    """MLX k steps -> checkpoint -> NumPy k steps, and NumPy -> MLX, both equal to 2k NumPy steps."""
    mcfg, tcfg = configs(**overrides)
    data = synthetic_tokens()
    start = perturbed_params(mcfg, tcfg.seed)          # firing neurons in every layer
    straight = {k: v.copy() for k, v in start.items()}
    numpy_steps(straight, ref.init_opt_state(straight), mcfg, tcfg, data, 0, 2 * K)

    # MLX first, NumPy after
    model = m4.build_model(mcfg, start)
    opt = m4.AdamW(model, tcfg)
    mlx_steps(model, opt, mcfg, tcfg, data, 0, K)
    mlx_io.save(tmp_path / "mlx.npz", model, opt, mcfg, tcfg, K, TOK, "data/x")
    params, mcfg2, _, step, opt_np, config = ref.load_model(tmp_path / "mlx.npz")
    assert (mcfg2, step, config["tokenizer"]) == (mcfg, K, TOK)
    for k, p in mlx_io.numpy_params(model).items():
        np.testing.assert_array_equal(params[k], p)
        np.testing.assert_array_equal(opt_np["m"][k], np.array(opt.state["m"][k]))
        np.testing.assert_array_equal(opt_np["v"][k], np.array(opt.state["v"][k]))
    numpy_steps(params, opt_np, mcfg, tcfg, data, K, 2 * K)
    assert_close_run(params, straight, start)

    # NumPy first, MLX after
    params = {k: v.copy() for k, v in start.items()}
    opt_np = ref.init_opt_state(params)
    numpy_steps(params, opt_np, mcfg, tcfg, data, 0, K)
    ref.save_model(tmp_path / "numpy.npz", params, mcfg, tcfg, K, opt_np, TOK)
    model, _, step, opt_state, _ = m4.load(tmp_path / "numpy.npz")
    assert step == K and model.cfg == mcfg
    opt = m4.AdamW(model, tcfg, opt_state)
    mlx_steps(model, opt, mcfg, tcfg, data, K, 2 * K)
    assert_close_run(mlx_io.numpy_params(model), straight, start)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_mlx_resume_equals_uninterrupted_mlx_run(tmp_path, dropout):
    """Within MLX, k steps + save + load + k steps == 2k steps, bit for bit: with dropout too,
    since each step's masks are fixed by (seed, step) like its batch."""
    mcfg, tcfg = configs(dropout=dropout)
    data = synthetic_tokens()
    model = m4.build_model(mcfg, ref.init_params(mcfg, tcfg.seed))
    opt = m4.AdamW(model, tcfg)
    mlx_steps(model, opt, mcfg, tcfg, data, 0, 2 * K)

    first = m4.build_model(mcfg, ref.init_params(mcfg, tcfg.seed))
    opt1 = m4.AdamW(first, tcfg)
    mlx_steps(first, opt1, mcfg, tcfg, data, 0, K)
    mlx_io.save(tmp_path / "ckpt.npz", first, opt1, mcfg, tcfg, K, TOK, "data/x")
    second, _, step, opt_state, _ = m4.load(tmp_path / "ckpt.npz")
    assert second.cfg == mcfg                          # the checkpoint carries the dropout rate
    opt2 = m4.AdamW(second, tcfg, opt_state)
    mlx_steps(second, opt2, mcfg, tcfg, data, step, 2 * K)
    for k, p in mlx_io.numpy_params(model).items():
        np.testing.assert_array_equal(mlx_io.numpy_params(second)[k], p)


def test_compiled_training_learns():
    """The compiled step lowers the loss on a learnable stream."""
    mcfg, tcfg = ref.make_configs("tiny", max_steps=60, warmup=5)
    data = synthetic_tokens()
    model = m4.build_model(mcfg, ref.init_params(mcfg, tcfg.seed))
    opt = m4.AdamW(model, tcfg)
    losses = mlx_steps(model, opt, mcfg, tcfg, data, 0, 60)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses


P = 0.25   # dropout rate of the dropout tests


@pytest.mark.parametrize("overrides", [{}, {"attention": "hadamard", "neuron": "plif"}], ids=name)
def test_dropout_is_off_at_evaluation_so_stage_3_parity_holds(overrides):
    """With dropout in the config, the model is built in evaluation mode and a training step
    leaves it there: logits equal stage 3's forward without an rng (no dropout), before and after."""
    mcfg, tcfg = configs(dropout=P, **overrides)
    model = m4.build_model(mcfg, perturbed_params(mcfg, seed=1))
    x, y = np.random.default_rng(2).integers(0, mcfg.vocab_size, (2, 4, mcfg.context))

    def assert_parity():
        assert not model.training
        assert rel(model(mx.array(x))[0], ref.forward(mlx_io.numpy_params(model), mcfg, x)[0]) < 1e-4

    assert_parity()
    before = mlx_io.numpy_params(model)
    step = m4.make_train_step(model, m4.AdamW(model, tcfg), tcfg)
    mx.eval(step(mx.array(x), mx.array(y), mx.array(1e-2), mx.array(1.0)))
    assert not np.array_equal(mlx_io.numpy_params(model)["blocks.0.attn.wq"], before["blocks.0.attn.wq"])
    assert_parity()


def assert_dropped(out, full, p):
    """out is inverted dropout of full: each entry either 0 or full / (1 - p), about p of them 0."""
    out, full = np.array(out), np.array(full)
    big = np.abs(full) > 1e-2 * np.abs(full).max()               # entries whose fate is unambiguous
    zero = np.abs(out) < 1e-5 * np.abs(full).max()
    np.testing.assert_allclose(out[big & ~zero], full[big & ~zero] / (1 - p), rtol=1e-4)
    assert abs(zero[big].mean() - p) < 0.05, zero[big].mean()
    return zero


def test_dropout_drops_p_of_each_residual_branch_and_scales_the_rest():
    """In training mode a block adds drop(o @ wo) and drop(u @ w2): with the other branch zeroed,
    the change of the residual stream is the branch with ~p of it zeroed and the rest / (1 - p);
    the masks differ across timesteps."""
    cfg = ref.make_configs("tiny", dropout=P)[0]
    h = mx.array(np.random.default_rng(5).normal(0, 1, (cfg.T, 2, 16, cfg.d_model)).astype(np.float32))
    for zeroed, branch in (("mlp.w2", lambda b, s: s["wo_input"] @ b.attn.wo),
                           ("attn.wo", lambda b, s: s["mlp.sn_h"] @ b.mlp.w2)):
        params = perturbed_params(cfg, seed=4)
        params["blocks.0." + zeroed][:] = 0
        block = m4.build_model(cfg, params).train().blocks[0]
        out, _, _, spikes = block(h)                              # (T, B, L, D)
        zero = assert_dropped(out - h, branch(block, spikes), P)
        assert not np.array_equal(zero[0], zero[1])               # a fresh mask per timestep


def test_dropout_on_the_embedding_uses_one_mask_for_all_timesteps():
    """With both branches of every block zeroed and an identity readout, the logits are
    mean_t h = drop(embed[idx]): 0 or embed / (1 - p), which a mask per timestep would break."""
    cfg = ref.make_configs("tiny", dropout=P, tie_embeddings=False)[0]
    params = perturbed_params(cfg, seed=6)
    params.update({k: np.zeros_like(v) for k, v in params.items() if k.endswith(("attn.wo", "mlp.w2"))})
    params["head.weight"] = np.eye(cfg.d_model, cfg.vocab_size, dtype=np.float32)
    model = m4.build_model(cfg, params).train()
    model.norm_f = nn.Identity()
    idx = np.random.default_rng(7).integers(0, cfg.vocab_size, (4, cfg.context))
    logits = model(mx.array(idx))[0][..., :cfg.d_model]          # (B, L, D)
    assert_dropped(logits, params["embed.weight"][idx], P)


@pytest.mark.parametrize("dropout", [0.0, P])
def test_compiled_step_draws_fresh_dropout_masks_every_call(dropout):
    """Compiled steps on the same batch from the same parameters (lr = 0 leaves them as they
    are) draw different masks, hence different losses; with dropout 0 the losses are equal.
    A random state left out of mx.compile's inputs and outputs replays the traced mask."""
    mcfg, tcfg = configs(dropout=dropout)
    model = m4.build_model(mcfg, perturbed_params(mcfg, seed=8))
    step = m4.make_train_step(model, m4.AdamW(model, tcfg), tcfg)
    x, y = (mx.array(a) for a in np.random.default_rng(9).integers(0, mcfg.vocab_size, (2, 4, mcfg.context)))
    mx.random.seed(0)
    losses = [step(x, y, mx.array(0.0), mx.array(t + 1.0))[0].item() for t in range(3)]
    assert len(set(losses)) == (3 if dropout else 1), losses


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The offline builtin corpus, tokenized (stages 1 and 2), in a temporary data root."""
    return ref.prepare_dataset("builtin", tmp_path_factory.mktemp("data"))


def test_command_line_trains_resumes_from_numpy_and_generates(dataset, tmp_path, capsys):
    """The whole program: a NumPy run continued by the MLX program, then --generate streams."""
    common = ["--preset", "tiny", "--data_root", str(dataset.parent),
              "--eval_interval", "2", "--eval_tokens", "256", "--ckpt", str(tmp_path / "ckpt.npz")]
    assert ref.main(common + ["--max_steps", "2"]) == 0
    assert m4.main(common + ["--max_steps", "4", "--resume", "1"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 2" in out and "bits/char" in out and "mean spike rate" in out
    params, _, _, step, opt, _ = ref.load_model(tmp_path / "ckpt.npz")
    assert step == 4 and opt is not None
    assert m4.main(common + ["--generate", "The", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_nan_loss_stops_without_overwriting_the_checkpoint(dataset, tmp_path, monkeypatch):
    mcfg, tcfg = ref.make_configs("tiny", max_steps=3, eval_interval=1, eval_tokens=256)
    ckpt = tmp_path / "ckpt.npz"
    m4.train(mcfg, tcfg, dataset, ckpt)
    saved = ckpt.read_bytes()
    loss_fn = m4.loss_fn
    monkeypatch.setattr(m4, "loss_fn", lambda model, x, y: loss_fn(model, x, y) * math.nan)
    tcfg.max_steps = 6
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        m4.train(mcfg, tcfg, dataset, ckpt, resume=True)
    assert ckpt.read_bytes() == saved


def test_ctrl_c_saves_the_last_finished_step_and_resume_continues_exactly(dataset, tmp_path, monkeypatch):
    """A SIGINT that arrives inside step 2 lets it finish, saves step 3 and stops; resuming from there
    ends exactly where an uninterrupted run does, optimizer moments included."""
    mcfg, tcfg = ref.make_configs("tiny", max_steps=5, eval_interval=100, eval_tokens=256)
    m4.train(mcfg, tcfg, dataset, tmp_path / "straight.npz")
    train_step = m4.train_step

    def interrupted(model, opt, step_fn, mcfg, tcfg, data, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(model, opt, step_fn, mcfg, tcfg, data, step)

    monkeypatch.setattr(m4, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        m4.train(mcfg, tcfg, dataset, tmp_path / "ckpt.npz")
    monkeypatch.setattr(m4, "train_step", train_step)
    assert ref.load_model(tmp_path / "ckpt.npz")[3] == 3
    m4.train(mcfg, tcfg, dataset, tmp_path / "ckpt.npz", resume=True)
    resumed, straight = ref.load_model(tmp_path / "ckpt.npz"), ref.load_model(tmp_path / "straight.npz")
    assert resumed[3] == straight[3] == 5
    for k in straight[0]:
        np.testing.assert_array_equal(resumed[0][k], straight[0][k])
        np.testing.assert_array_equal(resumed[4]["v"][k], straight[4]["v"][k])


@pytest.mark.parametrize("quant", ref.NOISY)
def test_random_quantizers_draw_in_training_round_in_evaluation_and_pass_straight_through(quant):
    """One timestep: training spikes at rate p = sigmoid(4u) (5 standard errors of 20,000 draws),
    evaluation fires exactly when u >= 0, and dL/dx = dL/ds * 4 p (1 - p) (d out/dp = 1)."""
    cfg = ref.make_configs("tiny", spike_fn="sigmoid4x", quant=quant)[0]
    neuron = m4.Neuron(cfg, 5)
    u = np.array([-0.4, -0.1, 0.0, 0.2, 0.5], np.float32)
    x = mx.array(np.broadcast_to(cfg.theta + u, (1, 20000, 5)))
    p = 1 / (1 + np.exp(-4 * u))
    neuron.train()
    s = np.array(neuron(x))
    assert set(np.unique(s)) == {0.0, 1.0} and np.abs(s.mean((0, 1)) - p).max() < 5 * 0.5 / 20000 ** 0.5
    g = np.array(mx.grad(lambda x: neuron(x).sum())(x))
    np.testing.assert_allclose(g[0, 0], 4 * p * (1 - p), rtol=1e-5)
    neuron.eval()
    np.testing.assert_array_equal(np.array(neuron(x))[0, 0], (u >= 0).astype(np.float32))
