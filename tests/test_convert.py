"""Stage 7 and the rate_coding option it converts into: the option's hand gradients against finite
differences, its recurrent form against its parallel one and its MLX and PyTorch versions against
stage 3; then conversion itself: logits that approach the ANN's as T grows, deterministic
calibration, checkpoints that stages 3-5 load with equal logits, and bad inputs refused."""
import numpy as np
import pytest

from spikelib.stages import load_stage

S3 = load_stage("3_spike_llm_numpy")


def small_cfg(**overrides):
    base = dict(vocab_size=11, d_model=8, d_ff=12, n_head=2, T=3, rate_coding=True)
    return S3.make_configs("tiny", **dict(base, **overrides))[0]


def noisy_params(cfg, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.1, v.shape)).astype(dtype) for k, v in S3.init_params(cfg, seed).items()}


@pytest.mark.parametrize("overrides", [{}, {"attention": "hadamard"}, {"neuron": "plif", "beta": 0.5}],
                         ids=["linear", "hadamard", "plif"])
def test_rate_coding_gradients_match_finite_differences(overrides):
    """Running means before the norms and the attention: the hand backward (stage 3) against central
    differences (h = 1e-6) of the smooth forward in float64, every parameter tensor, 3 entries each;
    ||hand - fd|| / (||hand|| + ||fd||) < 1e-5."""
    cfg = small_cfg(**overrides)
    params = noisy_params(cfg)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, cfg.vocab_size, (2, 2, 5))
    _, grads, _ = S3.loss_and_grads(params, cfg, x, y, smooth=True)
    h = 1e-6
    for name, p in params.items():
        entries = [np.unravel_index(np.argmax(np.abs(grads[name])), p.shape)]
        entries += [tuple(int(rng.integers(0, s)) for s in p.shape) for _ in range(2)]
        hand, fd = [], []
        for ix in entries:
            old = p[ix]
            p[ix] = old + h
            up = S3.loss_and_grads(params, cfg, x, y, smooth=True)[0]
            p[ix] = old - h
            down = S3.loss_and_grads(params, cfg, x, y, smooth=True)[0]
            p[ix] = old
            hand.append(grads[name][ix])
            fd.append((up - down) / (2 * h))
        hand, fd = np.array(hand), np.array(fd)
        scale = np.linalg.norm(hand) + np.linalg.norm(fd)
        assert scale < 1e-9 or np.linalg.norm(hand - fd) / scale < 1e-5, (name, hand, fd)


def test_rate_coding_changes_the_model_and_decodes_like_its_parallel_form():
    """The option is not a no-op, and token-by-token decoding (the running means are over the
    timesteps of one position) gives the parallel logits within 1e-6 in float64."""
    cfg = small_cfg(T=4)
    params = noisy_params(cfg, seed=3)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    parallel, _ = S3.forward(params, cfg, idx)
    plain, _ = S3.forward(params, small_cfg(T=4, rate_coding=False), idx)
    assert np.abs(parallel - plain).max() > 1e-3
    state = S3.init_decode_state(cfg, 2, np.float64)
    steps = [S3.decode_step(params, cfg, state, idx[:, pos]) for pos in range(idx.shape[1])]
    np.testing.assert_allclose(np.stack(steps, 1), parallel, rtol=0, atol=1e-6)


def test_rate_coding_in_pytorch_matches_stage3():
    """Stage 5's torch path with rate_coding: logits within 1e-4 and every gradient within 1e-3
    (relative to its largest entry) of stage 3's, float32 against float64."""
    torch = pytest.importorskip("torch")
    S5 = load_stage("5_spike_llm_triton")
    cfg = S3.make_configs("tiny", rate_coding=True)[0]
    params = noisy_params(cfg, seed=1, dtype=np.float32)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, cfg.vocab_size, (2, 2, 16))
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    logits3, _ = S3.forward(p64, cfg, x)
    _, grads3, _ = S3.loss_and_grads(p64, cfg, x, y)
    model = S5.build_model(cfg, S5.RunConfig(kernels="torch", device="cpu", dtype="float32"), params)
    logits = model(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), torch.from_numpy(y).view(-1))
    loss.backward()
    rel = lambda a, b: float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))  # noqa: E731
    assert rel(logits.detach().numpy(), logits3) < 1e-4
    for name, p in model.named_parameters():
        assert rel(p.grad.numpy(), grads3[name]) < 1e-3, name


def test_rate_coding_in_mlx_matches_stage3():
    """Stage 4 with rate_coding: logits within 1e-4 and gradients within 1e-3 (relative norms)."""
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    from mlx.utils import tree_flatten
    S4 = load_stage("4_spike_llm_mlx")
    cfg = S3.make_configs("tiny", rate_coding=True)[0]
    params = noisy_params(cfg, seed=1, dtype=np.float32)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, cfg.vocab_size, (2, 2, 16))
    logits3, _ = S3.forward(params, cfg, x)
    _, grads3, _ = S3.loss_and_grads(params, cfg, x, y)
    model = S4.build_model(cfg, params)
    logits = np.array(model(mx.array(x))[0])
    _, grads = nn.value_and_grad(model, S4.loss_fn)(model, mx.array(x), mx.array(y))
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))  # noqa: E731
    assert rel(logits, logits3) < 1e-4
    for name, g in dict(tree_flatten(grads)).items():
        assert rel(np.array(g), grads3[name]) < 1e-3, name
