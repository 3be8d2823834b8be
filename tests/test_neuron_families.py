"""Stage 0b: every family x prefix against central finite differences (float64, quant identity,
relative error < 1e-6), the parameter constraints and options, the quantizers' outputs and their
straight-through rule, plain LIF against stage 0, and the errors a wrong layer gives."""
import itertools

import numpy as np
import pytest

from numerics import finite_diff, rel_error
from spikelib.stages import load_stage

nf = load_stage("0b_neuron_families")
s0 = load_stage("0_spike_transformer")
TOL = 1e-6
LAYERS = list(itertools.product(nf.FAMILIES, nf.PREFIXES))


def assert_close(hand, numeric, what):
    err = rel_error(hand, numeric)
    assert np.linalg.norm(numeric) > 0, f"{what}: the numerical gradient is zero, nothing is checked"
    assert err < TOL, f"{what}: relative error {err:.2e}"


def check_layer_gradients(layer, x, seed=0):
    """L = sum(out * R): dL/dx and dL/draw of every learnable parameter, hand vs central FD."""
    R = np.random.default_rng(seed).standard_normal(layer_forward_shape(layer, x))
    gx, grads = nf.layer_backward(layer, R, nf.layer_forward(layer, x)[1])
    f = lambda: float((nf.layer_forward(layer, x)[0] * R).sum())  # noqa: E731
    assert_close(gx, finite_diff(f, x), "dL/dx")
    assert set(grads) == set(layer.learn)
    for name in grads:
        assert grads[name].shape == layer.raw[name].shape
        if layer.family == "LIB" and name == "gamma_neg":   # out >= 0: the negative rec trace is 0
            assert np.all(grads[name] == 0) and np.all(finite_diff(f, layer.raw[name]) == 0)
            continue
        assert_close(grads[name], finite_diff(f, layer.raw[name]), f"dL/d{name}")


def layer_forward_shape(layer, x):
    return nf.layer_forward(layer, x)[0].shape


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("family,prefix", LAYERS, ids=[f"{p or 'none'}-{f}" for f, p in LAYERS])
def test_layer_backward(family, prefix):
    rng = np.random.default_rng(3)
    layer = nf.random_layer(family, prefix, rng)
    check_layer_gradients(layer, rng.normal(0.5, 1.0, (5, 2, 3)))            # (T, B, N)


@pytest.mark.parametrize("family,prefix", [("LI", ""), ("LI", "DSR"), ("LIB", "DS"), ("LITS", "SR")])
def test_ema_membrane_backward(family, prefix):
    """LIEMA (LI with ema) and the ema option of the spiking families."""
    rng = np.random.default_rng(4)
    layer = nf.random_layer(family, prefix, rng, ema=True)
    check_layer_gradients(layer, rng.normal(0.5, 1.0, (5, 2, 3)))


def test_fast_sigmoid_backward():
    rng = np.random.default_rng(5)
    layer = nf.random_layer("LIT", "DSR", rng, spike_fn="fast_sigmoid", spike_bias=0.2)
    check_layer_gradients(layer, rng.normal(0.5, 1.0, (5, 2, 3)))


@pytest.mark.parametrize("name", sorted(nf.SPIKE_FNS))
def test_spike_fn_derivative(name):
    u = np.linspace(-3, 3, 61) + 0.01
    p, dp = nf.SPIKE_FNS[name](u)
    eps = 1e-6
    numeric = (nf.SPIKE_FNS[name](u + eps)[0] - nf.SPIKE_FNS[name](u - eps)[0]) / (2 * eps)
    np.testing.assert_allclose(dp, numeric, rtol=1e-6, atol=1e-10)
    assert np.all((p > 0) & (p < 1)) and np.all(np.diff(p) > 0)
    assert abs(nf.SPIKE_FNS[name](np.zeros(1))[0][0] - 0.5) < 1e-15


def test_rank0_mixed_ranks_and_fixed_parameters():
    """Scalars, per-neuron values and given tensors side by side; fixed ones get no gradient."""
    rng = np.random.default_rng(6)
    init = {"beta_pos": 0.8, "beta_neg": np.array([0.5, 0.6, 0.7]), "alpha_pos": np.array(0.4),
            "theta_pos": 0.9, "scale_neg": 0.7}
    layer = nf.make_layer("LITS", "DS", 3, init=init, rank={"beta_pos": 0, "theta_pos": 0},
                          learn=("beta_pos", "beta_neg", "alpha_pos", "theta_pos", "scale_neg"))
    assert layer.raw["beta_pos"].shape == () and layer.raw["beta_neg"].shape == (3,)
    assert layer.raw["alpha_pos"].shape == () and layer.raw["alpha_neg"].shape == (3,)
    assert abs(nf.values(layer)["beta_pos"] - 0.8) < 1e-12
    np.testing.assert_allclose(nf.values(layer)["beta_neg"], [0.5, 0.6, 0.7], atol=1e-12)
    check_layer_gradients(layer, rng.normal(0.5, 1.0, (5, 2, 3)))


def test_neurons_on_another_axis():
    """dim=1: the same layer on x (T, N, B) gives the moved output and the moved gradients."""
    rng = np.random.default_rng(7)
    a = nf.random_layer("LIT", "DSR", np.random.default_rng(8))
    b = nf.random_layer("LIT", "DSR", np.random.default_rng(8), dim=1)
    x = rng.normal(0.5, 1.0, (5, 2, 3))                                     # (T, B, N)
    R = rng.standard_normal(x.shape)
    out_a, cache_a = nf.layer_forward(a, x)
    out_b, cache_b = nf.layer_forward(b, x.transpose(0, 2, 1))             # (T, N, B)
    np.testing.assert_allclose(out_b, out_a.transpose(0, 2, 1), rtol=0, atol=1e-14)
    gx_a, g_a = nf.layer_backward(a, R, cache_a)
    gx_b, g_b = nf.layer_backward(b, R.transpose(0, 2, 1), cache_b)
    np.testing.assert_allclose(gx_b, gx_a.transpose(0, 2, 1), rtol=1e-12, atol=1e-14)
    for k in g_a:
        np.testing.assert_allclose(g_b[k], g_a[k], rtol=1e-12, atol=1e-14)
    check_layer_gradients(b, x.transpose(0, 2, 1).copy())


def test_model_backward():
    """The small model (projection -> DSR LITS -> LI readout), smooth, against FD."""
    cfg = nf.Config(family="lits", prefix="DSR", hidden=4, T=20)
    model = nf.init_model(cfg, quant="identity")
    x, y = nf.make_task(cfg, 3, np.random.default_rng(9))
    _, grads, _, _ = nf.loss_and_grads(model, x, y)
    f = lambda: nf.loss_and_grads(model, x, y)[0]  # noqa: E731
    for k, a in model["params"].items():
        assert_close(grads[k], finite_diff(f, a), f"dL/d{k}")


# ----------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("family", nf.FAMILIES)
def test_constraints_hold_after_large_steps(family):
    """Decays stay in (0, 1) and thresholds > 0 however far gradient steps push the raw values."""
    rng = np.random.default_rng(10)
    layer = nf.random_layer(family, "DSR", rng)
    x = rng.normal(0.5, 1.0, (5, 2, 3))
    R = rng.standard_normal(x.shape)
    for lr in (1e2, 1e4, 1e6):
        for sign in (1, -1):
            grads = nf.layer_backward(layer, sign * R, nf.layer_forward(layer, x)[1])[1]
            for k, g in grads.items():
                layer.raw[k] -= lr * np.sign(g) - (g == 0) * lr          # big steps both ways
            v = nf.values(layer)
            for k, val in v.items():
                if nf.kind_of(k) == "decay":
                    assert np.all((val > 0) & (val < 1)), (k, val)
                if nf.kind_of(k) == "positive":
                    assert np.all(val > 0), (k, val)
            assert np.all(np.isfinite(nf.layer_forward(layer, x)[0]))


# ----------------------------------------------------------------------------- outputs and quantizers


@pytest.mark.parametrize("quant", ["round_ste", "stochastic_round_ste", "probabilistic_ste"])
@pytest.mark.parametrize("prefix", ["", "DSR"])
def test_discrete_outputs(quant, prefix):
    rng = np.random.default_rng(11)
    x = rng.normal(0.5, 2.0, (20, 4, 3))
    lit = nf.make_layer("LIT", prefix, 3, quant_fn=quant, init={"w_rec": 0.5} if "R" in prefix else None)
    out = nf.layer_forward(lit, x, np.random.default_rng(0))[0]
    assert set(np.unique(out)) == {-1.0, 0.0, 1.0}
    lib = nf.make_layer("LIB", prefix, 3, quant_fn=quant)
    out = nf.layer_forward(lib, x, np.random.default_rng(0))[0]
    assert set(np.unique(out)) == {0.0, 1.0}
    lits = nf.make_layer("LITS", prefix, 3, quant_fn=quant, init={"scale_pos": 2.0, "scale_neg": 0.5})
    assert set(np.unique(nf.layer_forward(lits, x, np.random.default_rng(0))[0])) == {-0.5, 0.0, 2.0}


def test_lib_smooth_output_is_nonnegative():
    x = np.random.default_rng(12).normal(0, 3.0, (20, 4, 3))
    for prefix in nf.PREFIXES:
        out = nf.layer_forward(nf.make_layer("LIB", prefix, 3), x)[0]
        assert np.all(out >= 0) and np.all(out <= 1)


def test_lib_with_round_ste_is_stage0_lif():
    """LIB, no prefix, round_ste: out = H(mem - theta) with soft reset, i.e. stage 0's LIF."""
    x = np.random.default_rng(13).normal(0.6, 1.0, (12, 4, 3))
    beta, theta = np.array([0.5, 0.8, 0.95]), np.array([0.7, 1.0, 1.3])
    layer = nf.make_layer("LIB", "", 3, init={"beta": beta, "theta": theta}, quant_fn="round_ste")
    ours = nf.layer_forward(layer, x)[0]
    ref = s0.neuron_forward(x, s0.Neuron("lif", "soft"), beta, theta)[0]
    assert ref.sum() > 0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=0)


def test_lit_with_round_ste_is_stage0_ternary():
    x = np.random.default_rng(14).normal(0.0, 1.5, (12, 4, 3))
    layer = nf.make_layer("LIT", "", 3, init={"beta": 0.8, "theta_pos": 1.0, "theta_neg": 1.0},
                          quant_fn="round_ste")
    ref = s0.neuron_forward(x, s0.Neuron("ternary", "soft"), 0.8, 1.0)[0]
    assert (ref < 0).any() and (ref > 0).any()
    np.testing.assert_allclose(nf.layer_forward(layer, x)[0], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("quant", ["round_ste", "stochastic_round_ste", "probabilistic_ste"])
def test_straight_through_rule(quant):
    """One step (no dynamics): d out / d p = 1, so dL/dx = R f'(x - theta) for LIB and
    R (f'(x - th+) + f'(-x - th-)) for LIT, whatever the quantizer drew."""
    rng = np.random.default_rng(15)
    x = rng.normal(1.0, 1.0, (1, 5, 3))
    R = rng.standard_normal(x.shape)
    lib = nf.make_layer("LIB", "", 3, init={"theta": 0.8}, quant_fn=quant)
    gx = nf.layer_backward(lib, R, nf.layer_forward(lib, x, np.random.default_rng(0))[1])[0]
    np.testing.assert_allclose(gx, R * nf.sigmoid4x(x - 0.8)[1], rtol=1e-12)
    lit = nf.make_layer("LIT", "", 3, init={"theta_pos": 0.8, "theta_neg": 0.6}, quant_fn=quant)
    gx = nf.layer_backward(lit, R, nf.layer_forward(lit, x, np.random.default_rng(0))[1])[0]
    np.testing.assert_allclose(gx, R * (nf.sigmoid4x(x - 0.8)[1] + nf.sigmoid4x(-x - 0.6)[1]),
                               rtol=1e-12)


@pytest.mark.parametrize("quant", ["stochastic_round_ste", "probabilistic_ste"])
def test_noisy_quantizers_are_reproducible(quant):
    """The draws come from the rng (or a given noise array): same draws, same forward; with the
    noise fixed the forward is piecewise constant (its FD is 0, hence the straight-through rule)."""
    x = np.random.default_rng(16).normal(0.8, 1.0, (6, 3, 3))
    layer = nf.make_layer("LIT", "SR", 3, quant_fn=quant)
    a = nf.layer_forward(layer, x, np.random.default_rng(1))[0]
    b = nf.layer_forward(layer, x, np.random.default_rng(1))[0]
    np.testing.assert_array_equal(a, b)
    noise = np.random.default_rng(1).random((2,) + x.shape)
    np.testing.assert_array_equal(nf.layer_forward(layer, x, noise=noise)[0], a)
    c = nf.layer_forward(layer, x, np.random.default_rng(2))[0]
    assert not np.array_equal(a, c)
    R = np.ones(x.shape)
    f = lambda: float((nf.layer_forward(layer, x, noise=noise)[0] * R).sum())  # noqa: E731
    assert np.all(finite_diff(f, x, eps=1e-7) == 0)
    gx = nf.layer_backward(layer, R, nf.layer_forward(layer, x, noise=noise)[1])[0]
    assert np.linalg.norm(gx) > 0


def test_probabilistic_ste_fires_at_rate_p():
    p = np.full(200_000, 0.3)
    n = np.random.default_rng(17).random(p.shape)
    for q in (nf.probabilistic_ste, nf.stochastic_round_ste):
        assert abs(q(p, n).mean() - 0.3) < 0.005


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_neurons=0), "num_neurons=0 must be a positive integer"),
    (dict(num_neurons=2.5), "must be a positive integer"),
    (dict(num_neurons=True), "must be a positive integer"),
    (dict(rank=2), "rank=2"),
    (dict(rank={"theta": -1}), "rank=-1"),
    (dict(init={"theta": np.ones(4)}), r"given shape \(4,\)"),
    (dict(init={"theta": np.ones((3, 3))}), r"given shape \(3, 3\)"),
    (dict(init={"beta": 1.0}), "a decay must lie in"),
    (dict(init={"beta": 0.0}), "a decay must lie in"),
    (dict(init={"beta": np.array([0.5, 0.5, 1.5])}), "a decay must lie in"),
    (dict(init={"theta": 0.0}), "a threshold must be positive"),
    (dict(init={"theta": -1.0}), "a threshold must be positive"),
    (dict(init={"alpha": 0.5}), "unknown parameters"),
    (dict(learn=("gamma",)), "learn names"),
    (dict(family="LIX"), "family="),
    (dict(prefix="DX"), "prefix="),
    (dict(prefix="DD"), "prefix="),
    (dict(dim=0), "axis 0 is time"),
])
def test_clear_errors(kwargs, message):
    args = {"family": "LIB", "prefix": "", "num_neurons": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        nf.make_layer(**args)


def test_input_errors():
    layer = nf.make_layer("LIB", "S", 3)
    with pytest.raises(ValueError, match="has 4 features on dim=-1 but the layer has num_neurons=3"):
        nf.layer_forward(layer, np.zeros((5, 2, 4)))
    with pytest.raises(ValueError, match="no axis dim"):
        nf.layer_forward(nf.make_layer("LIB", "", 3, dim=3), np.zeros((5, 2, 3)))
    noisy = nf.make_layer("LIT", "", 3, quant_fn="probabilistic_ste")
    with pytest.raises(ValueError, match="pass rng="):
        nf.layer_forward(noisy, np.zeros((5, 2, 3)))


def test_command_line_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        nf.main(["--family", "xyz"])
    assert e.value.code != 0
    assert "error: family='XYZ'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nf.main(["--prefix", "Q"])
    assert "error: prefix='Q'" in capsys.readouterr().err
    for argv, words in ((["--lr", "nan"], "--lr must be > 0"), (["--seed", "-1"], "--seed must be >= 0"),
                        (["--T", "5"], "--T must be >= 20"),
                        (["--spike_bias", "nan"], "--spike_bias must be")):
        with pytest.raises(SystemExit) as e:
            nf.main(argv)                           # refused before training: a run would take seconds
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1] and not any("Traceback" in line for line in err)


def test_training_learns_the_recall_task():
    cfg = nf.Config(family="lib", prefix="R", task="recall", steps=150, n_test=300)
    model, losses = nf.train(cfg, progress=False)
    acc, rate = nf.evaluate(model, cfg)
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) and acc > 0.6, (acc, losses[-1])
    assert 0 < rate < 1


def test_stage_is_under_1000_lines():
    assert len(open(nf.__file__).read().splitlines()) < 1000
