"""Stage 0: every hand backward against central finite differences (float64, smooth forward),
neuron semantics on hand-computed cases, encodings, op counting and a short training run."""
import itertools

import numpy as np
import pytest

from numerics import finite_diff, rel_error
from spikelib.stages import load_stage

s0 = load_stage("0_spike_transformer")
SURROGATES = ("arctan", "sigmoid", "fast_sigmoid", "triangle")
TOL = 1e-6


def assert_close(hand, numeric, what):
    err = rel_error(hand, numeric)
    assert np.linalg.norm(numeric) > 0, f"{what}: the numerical gradient is zero, nothing is checked"
    assert err < TOL, f"{what}: relative error {err:.2e}"


# ----------------------------------------------------------------------------- surrogates


@pytest.mark.parametrize("name", SURROGATES)
def test_surrogate_is_the_derivative_of_its_smooth_step(name):
    u = np.linspace(-2.3, 2.3, 41) + 0.013  # avoid the triangle's kinks at 0 and +-1/alpha
    smooth, deriv = s0.SURROGATES[name](u, 2.0)
    eps = 1e-6
    numeric = (s0.SURROGATES[name](u + eps, 2.0)[0] - s0.SURROGATES[name](u - eps, 2.0)[0]) / (2 * eps)
    np.testing.assert_allclose(deriv, numeric, rtol=1e-6, atol=1e-9)
    assert np.all(np.diff(smooth) >= 0) and smooth[0] < 0.2 and smooth[-1] > 0.8
    hard = s0.spike(u, name, 2.0)
    np.testing.assert_array_equal(hard, (u >= 0).astype(float))


# ----------------------------------------------------------------------------- neuron gradients


@pytest.mark.parametrize("kind,reset,detach,surrogate",
                         list(itertools.product(s0.NEURONS, ("soft", "hard"), (False, True), SURROGATES)))
def test_neuron_backward(kind, reset, detach, surrogate):
    rng = np.random.default_rng(1)
    x = rng.normal(0.8, 1.0, (6, 2, 3))                      # (T, B, C)
    beta, theta = np.array([0.3, 0.6, 0.9]), np.array([0.7, 1.0, 1.3])   # per channel, as PLIF
    R = rng.standard_normal(x.shape)
    nrn = s0.Neuron(kind, reset, detach, surrogate, 2.0, 0.85, 0.4)
    out, cache = s0.neuron_forward(x, nrn, beta, theta, smooth=True)
    # detach_reset differentiates the forward whose reset term holds the spikes as constants
    frozen = (out.copy(), cache[8].copy()) if detach else None
    f = lambda: float((s0.neuron_forward(x, nrn, beta, theta, True, frozen)[0] * R).sum())  # noqa: E731
    gx, gbeta, gtheta = s0.neuron_backward(R, cache)
    assert_close(gx, finite_diff(f, x), "dL/dx")
    assert_close(gbeta, finite_diff(f, beta), "dL/dbeta")
    assert_close(gtheta, finite_diff(f, theta), "dL/dtheta")


def test_detach_changes_the_gradient():
    x = np.random.default_rng(2).normal(1.0, 1.0, (6, 4))
    grads = []
    for detach in (False, True):
        nrn = s0.Neuron("lif", "soft", detach, "arctan", 2.0)
        grads.append(s0.neuron_backward(np.ones(x.shape), s0.neuron_forward(x, nrn, 0.7, 1.0)[1])[0])
    assert not np.allclose(grads[0], grads[1])


def test_alif_gradient_flows_through_adaptation():
    """With kappa > 0 a spike raises the later thresholds, so an early input changes later spikes."""
    x = np.full((6, 1), 1.3)
    R = np.zeros(x.shape)
    R[-1] = 1.0                                              # only the last spike matters
    grads = {}
    for kappa in (0.0, 0.6):
        nrn = s0.Neuron("alif", "soft", True, "sigmoid", 2.0, 0.9, kappa)
        out, cache = s0.neuron_forward(x, nrn, 0.0, 1.0, smooth=True)   # beta 0: no membrane path
        f = lambda: float((s0.neuron_forward(x, nrn, 0.0, 1.0, True, (out, cache[8]))[0] * R).sum())  # noqa: E731,B023
        grads[kappa] = s0.neuron_backward(R, cache)[0]
        assert_close(grads[kappa], finite_diff(f, x), f"ALIF kappa={kappa}")
    assert np.all(grads[0.0][:-1] == 0)                     # no leak, no adaptation: no past
    assert np.all(grads[0.6][:-1] < 0)                      # earlier spikes raise the threshold


def test_li_readout_backward():
    rng = np.random.default_rng(3)
    x, R = rng.standard_normal((5, 3, 2)), rng.standard_normal((5, 3, 2))
    f = lambda: float((s0.li_forward(x, 0.7) * R).sum())  # noqa: E731
    assert_close(s0.li_backward(R, 0.7), finite_diff(f, x), "LI readout")


@pytest.mark.parametrize("form", ["linear", "hadamard"])
def test_sdsa_backward(form):
    rng = np.random.default_rng(4)
    q, k, v = (rng.uniform(0, 1, (2, 2, 5, 6)) for _ in range(3))   # (T, B, L, D), 2 heads
    beta, theta = np.full(6, 0.5), rng.uniform(0.2, 0.6, 6)
    R = rng.standard_normal(q.shape)
    nrn = s0.Neuron("lif", "hard", False, "arctan", 2.0)
    f = lambda: float((s0.sdsa_forward(q, k, v, 2, form, nrn, beta, theta, True)[0] * R).sum())  # noqa: E731
    cache = s0.sdsa_forward(q, k, v, 2, form, nrn, beta, theta, True)[1]
    gq, gk, gv, gbeta, gtheta = s0.sdsa_backward(R, cache)
    checks = (("q", gq, q), ("k", gk, k), ("v", gv, v), ("beta", gbeta, beta), ("theta", gtheta, theta))
    for name, hand, arr in checks:
        assert_close(hand, finite_diff(f, arr), f"SDSA {form} d/d{name}")


def test_sdsa_is_causal_and_matches_its_recurrent_form():
    rng = np.random.default_rng(5)
    q, k, v = ((rng.random((1, 1, 6, 4)) < 0.5).astype(float) for _ in range(3))
    qh, kh, vh = (a[0, 0] for a in (q, k, v))               # (L, dh), one head
    state, rows = np.zeros((4, 4)), []
    for pos in range(6):                                     # y_l = q_l S_l, S_l = S_{l-1} + k_l^T v_l
        state += np.outer(kh[pos], vh[pos])
        rows.append(qh[pos] @ state)
    _, cache = s0.sdsa_forward(q, k, v, 1, "linear", s0.Neuron(), 0.5, 1.0)
    y_from_norm = cache[7] / cache[8]                        # undo the per-head RMS normalisation
    np.testing.assert_allclose(y_from_norm[0, 0, 0], np.array(rows), atol=1e-9)
    k2 = k.copy()
    k2[:, :, -1] = 1 - k2[:, :, -1]                          # change only the last position
    for form in ("linear", "hadamard"):
        a = s0.sdsa_forward(q, k, v, 1, form, s0.Neuron(), 0.5, 0.5)[0]
        b = s0.sdsa_forward(q, k2, v, 1, form, s0.Neuron(), 0.5, 0.5)[0]
        np.testing.assert_array_equal(a[:, :, :-1], b[:, :, :-1])


# ----------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("neuron,attention,reset", [
    ("lif", "linear", "soft"), ("plif", "hadamard", "hard"), ("alif", "linear", "hard"),
    ("ternary", "hadamard", "soft"), ("plif", "linear", "soft")])
def test_model_backward_end_to_end(neuron, attention, reset):
    cfg = s0.Config(n_objects=4, n_fillers=3, seq_len=4, d_model=8, d_ff=8, n_head=2, T=3, n_layer=2,
                    neuron=neuron, attention=attention, reset=reset, theta=0.5, surrogate="sigmoid")
    params = s0.init_params(cfg, 1)
    idx, y = s0.make_task(cfg, 3, np.random.default_rng(0))
    _, grads, _, _ = s0.loss_and_grads(params, cfg, idx, y, smooth=True)
    assert set(grads) == set(params)
    if neuron == "plif":
        assert "blocks.1.mlp.sn_h.w" in grads and grads["blocks.1.mlp.sn_h.w"].shape == (8,)
    f = lambda: float(s0.loss_and_grads(params, cfg, idx, y, smooth=True)[0])  # noqa: E731
    for name in params:
        assert_close(grads[name], finite_diff(f, params[name]), name)


# ----------------------------------------------------------------------------- neuron semantics


def run(kind, x, beta=1.0, theta=1.0, reset="soft", **kw):
    out, cache = s0.neuron_forward(np.asarray(x, dtype=float), s0.Neuron(kind, reset, **kw), beta, theta)
    return out, cache[4]                                     # spikes and the membrane before reset


def test_lif_constant_input_spike_count():
    # beta = 1, input 0.35: the membrane climbs 0.35, 0.70, 1.05 -> spike at t = 2, 5, 8 of 10
    for reset in ("soft", "hard"):
        s, _ = run("lif", np.full((10, 1), 0.35), reset=reset)
        np.testing.assert_array_equal(np.flatnonzero(s[:, 0]), [2, 5, 8])
    s, _ = run("lif", np.full((12, 1), 0.35), beta=0.5)     # leak: v tends to 0.7 < theta, never fires
    assert s.sum() == 0


def test_soft_and_hard_reset_values():
    # beta 0.5, input 0.8: v = 0.8, 1.2 (spike); soft keeps 0.2: 0.9, 1.25; hard restarts at 0: 0.8, 1.2
    s, v = run("lif", np.full((4, 1), 0.8), beta=0.5, reset="soft")
    np.testing.assert_allclose(v[:, 0], [0.8, 1.2, 0.9, 1.25])
    np.testing.assert_array_equal(s[:, 0], [0, 1, 0, 1])
    s, v = run("lif", np.full((4, 1), 0.8), beta=0.5, reset="hard")
    np.testing.assert_allclose(v[:, 0], [0.8, 1.2, 0.8, 1.2])
    np.testing.assert_array_equal(s[:, 0], [0, 1, 0, 1])


def test_ternary_spikes_follow_the_sign_of_the_drive():
    s, _ = run("ternary", np.array([[0.6, -0.6, 0.05]] * 8))
    assert set(np.unique(s[:, 0])) == {0, 1} and s[:, 0].sum() == 4     # 0.6 * 8 = 4.8
    assert set(np.unique(s[:, 1])) == {-1, 0} and s[:, 1].sum() == -4
    assert np.all(s[:, 2] == 0)                                           # 0.4 never reaches 1
    s, v = run("ternary", np.full((3, 1), -0.7), reset="hard")
    np.testing.assert_allclose(v[:, 0], [-0.7, -1.4, -0.7])               # hard reset also on -1


def test_alif_fires_less_than_lif_under_sustained_input():
    x = np.full((30, 1), 0.6)
    lif, _ = run("lif", x, beta=0.9)
    alif, _ = run("alif", x, beta=0.9, rho=0.95, kappa=0.5)
    assert lif.sum() >= 10 and 0 < alif.sum() < lif.sum() * 0.7
    # the first spike comes at the same time: adaptation starts only after a spike
    assert np.flatnonzero(lif)[0] == np.flatnonzero(alif)[0]


def test_plif_channels_use_their_own_decay_and_threshold():
    x = np.full((20, 3), 0.3)
    s, _ = run("plif", x, beta=s0.plif_beta(np.array([-2.0, 3.0, 3.0])), theta=np.array([1.0, 1.0, 2.0]))
    counts = s.sum(0)
    assert counts[0] == 0                      # beta 0.12: the membrane settles near 0.34 < 1
    assert counts[1] > counts[2] > 0           # same decay, a higher threshold fires less


# ----------------------------------------------------------------------------- encodings


def test_rate_encoding_mean_and_seed():
    x = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
    s = s0.rate_encode(x, 4000, seed=7)
    assert s.shape == (4000, 5) and set(np.unique(s)) <= {0.0, 1.0}
    np.testing.assert_allclose(s.mean(0), x, atol=0.03)
    np.testing.assert_array_equal(s, s0.rate_encode(x, 4000, seed=7))
    assert not np.array_equal(s, s0.rate_encode(x, 4000, seed=8))


def test_latency_encoding_stronger_fires_earlier():
    x = np.array([[1.0, 0.75, 0.5], [0.25, 0.0, 0.1]])
    s = s0.latency_encode(x, 5)                                            # (T, 2, 3)
    assert s.shape == (5, 2, 3)
    first = np.argmax(s, axis=0)
    np.testing.assert_array_equal(s.sum(0), [[1, 1, 1], [1, 0, 1]])        # one spike each, none for 0
    np.testing.assert_array_equal(first[0], [0, 1, 2])                     # (1 - x) * 4 rounded
    assert first[1, 0] == 3 and first[1, 2] == 4


def test_direct_encoding_and_dataset_wrapper():
    x = np.array([[0.2, -1.0], [3.0, 0.5]])
    d = s0.direct_encode(x, 3)
    assert d.shape == (3, 2, 2) and all(np.array_equal(d[t], x) for t in range(3))
    pairs = [(np.array([0.2, 0.8]), 0), (np.array([0.9, 0.1]), 1)]
    first = list(s0.SpikeDataset(pairs, T=6, encoding="rate", seed=3))
    again = list(s0.SpikeDataset(pairs, T=6, encoding="rate", seed=3))
    assert [y for _, y in first] == [0, 1] and all(s.shape == (6, 2) for s, _ in first)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(first, again))
    lat = list(s0.SpikeDataset(pairs, T=6, encoding="latency"))
    assert all(s.sum() == 2 for s, _ in lat)
    with pytest.raises(ValueError, match="encoding"):
        s0.SpikeDataset(pairs, T=6, encoding="phase")


# ----------------------------------------------------------------------------- task, ops, config


def test_task_names_one_object_and_asks_its_colour():
    cfg = s0.Config()
    idx, y = s0.make_task(cfg, 200, np.random.default_rng(0))
    is_obj = idx < cfg.n_objects
    assert np.all(is_obj[:, :-1].sum(1) == 1) and np.all(idx[:, -1] == cfg.n_objects + cfg.n_fillers)
    np.testing.assert_array_equal(y, idx[is_obj] % cfg.n_colours)
    assert len(set(np.flatnonzero(is_obj) % cfg.seq_len)) > cfg.seq_len // 2   # the place varies


@pytest.mark.parametrize("attention", ["linear", "hadamard"])
def test_op_count_with_every_neuron_firing(attention):
    """At rate 1 every spike-fed layer does T times the ANN twin's work (as accumulates)."""
    cfg = s0.Config(attention=attention, n_layer=2)
    stats = {f"blocks.{i}.{site}": 1.0 for i in range(2) for site in s0.SITES + ("attn.out",)}
    ac, mac, ann = s0.op_counts(cfg, stats)
    D, C = cfg.d_model, cfg.n_colours
    assert mac == cfg.T * D * C and ac == pytest.approx(cfg.T * (ann - D * C))
    half = s0.op_counts(cfg, {k: 0.5 for k in stats})
    assert half[0] == pytest.approx(ac / 2)                 # accumulates scale with the rate


def test_command_line_config():
    cfg = s0.parse_config(["--preset", "tiny", "--neuron", "alif", "--no-detach_reset", "--lr", "0.003"])
    assert (cfg.neuron, cfg.detach_reset, cfg.lr, cfg.seq_len) == ("alif", False, 0.003, 8)
    with pytest.raises(ValueError, match="izhikevich"):
        s0.parse_config(["--neuron", "izhikevich"])
    with pytest.raises(ValueError, match="not divisible"):
        s0.parse_config(["--d_model", "30", "--n_head", "4"])
    with pytest.raises(ValueError, match="--n_layer must be >= 1, got 0"):
        s0.parse_config(["--n_layer", "0"])


def test_ascii_raster_shows_spikes():
    spikes = np.zeros((4, 3, 2))
    spikes[1, 2, 0], spikes[3, 0, 1] = 1, -1
    text = s0.ascii_raster(spikes, "demo").splitlines()
    assert text[2].endswith("|.... |.... |.#..|") and text[3].endswith("|...- |.... |....|")


# ----------------------------------------------------------------------------- learning


def test_short_training_run_learns_the_task():
    cfg = s0.Config(**s0.PRESETS["tiny"])
    params, losses = s0.train(cfg, progress=False)
    idx, y = s0.make_task(cfg, 300, np.random.default_rng([cfg.seed, 10**9]))
    acc, stats = s0.evaluate(params, cfg, idx, y)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert acc >= 0.85, f"test accuracy {acc:.2f} after {cfg.steps} steps (chance 0.25)"
    assert all(0 < r < 1 for r in stats.values())            # spikes are sparse, not dead
