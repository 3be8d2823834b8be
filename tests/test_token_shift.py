"""Token shift (ModelConfig.token_shift): in half the channels, the input of a block's keys and values
reads the previous position's spikes (queries read the current ones). Stage 3's hand backward against finite
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
    {"token_shift": True}, {"token_shift": True, "attention": "hadamard", "neuron": "plif"},
    {"token_shift": True, "rate_coding": True}, {"token_shift": True, "spiking": False},
    {"token_shift": True, "dropout": 0.3}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_hand_backward_matches_finite_differences(overrides, monkeypatch):
    """test_stage3's gradient check (every tensor, float64 central differences, 1e-5) on shifted models."""
    gradient_check(overrides, monkeypatch)


@pytest.mark.parametrize("overrides", [{"token_shift": True},
                                       {"token_shift": True, "attention": "hadamard", "rate_coding": True}])
def test_recurrent_decoding_equals_parallel_forward(overrides):
    """Stage 3 decoding token by token (the state keeps the last position's spikes of the shifted
    half) gives the parallel logits at every position, past the training context (float64, 1e-9);
    the model differs from the unshifted one, and its state does not grow."""
    cfg = S3.make_configs("tiny", **overrides)[0]
    params = perturbed_params(cfg, seed=3)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.context + 4))
    parallel, _ = S3.forward(params, cfg, idx)
    state = S3.init_decode_state(cfg, 2, np.float64)
    assert len(state["shift"]) == cfg.n_layer
    steps = np.stack([S3.decode_step(params, cfg, state, idx[:, j]) for j in range(idx.shape[1])], 1)
    np.testing.assert_allclose(steps, parallel, rtol=0, atol=1e-9)
    assert [a.shape for a in state["shift"]] == [(cfg.T, 2, cfg.d_model // 2)] * len(state["shift"])
    unshifted = S3.forward(params, S3.make_configs("tiny", **dict(overrides, token_shift=False))[0], idx)[0]
    assert np.abs(unshifted - parallel).max() > 0.1


def test_token_shift_is_kept_by_checkpoints_and_older_versions_load_unshifted(tmp_path):
    """token_shift round-trips through the JSON model config; a version-3 file (no token_shift)
    loads as the unshifted model it was."""
    path, params, mcfg, _ = saved_tiny(tmp_path, token_shift=True)
    assert load_checkpoint(path)[1]["model"]["token_shift"] is True
    assert S3.load_model(path)[1] == mcfg and mcfg.token_shift is True
    model = {k: v for k, v in asdict(mcfg).items() if k != "token_shift"}
    old = write_raw(tmp_path / "v3.npz", {"format": FORMAT, "version": 3, "model": model}, params)
    assert S3.load_model(old)[1].token_shift is False


def test_only_keys_and_values_read_the_shifted_spikes():
    """In the ANN twin every neuron is relu, so each site's output shows what its layer read: q and the
    MLP read sn1's and sn2's own outputs, k and v the shifted ones (float64, 1e-12)."""
    cfg = S3.make_configs("tiny", token_shift=True, spiking=False)[0]
    params = perturbed_params(cfg, seed=2)
    _, cache = S3.forward(params, cfg, np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 6)))
    c, half = cache["blocks"][1], cfg.d_model // 2
    s1, x1 = c["sn1"]["s"], c["kv_input"]
    np.testing.assert_array_equal(x1[:, :, 1:, :half], s1[:, :, :-1, :half])
    np.testing.assert_array_equal(x1[..., half:], s1[..., half:])
    read = {"q": s1, "k": x1, "v": x1}
    for name, x in read.items():
        want = np.maximum(S3.linear(x, params[f"blocks.1.attn.w{name}"]), 0)
        np.testing.assert_allclose(c[f"attn.sn_{name}"]["s"], want, rtol=0, atol=1e-12)
    want = np.maximum(S3.linear(c["sn2"]["s"], params["blocks.1.mlp.w1"]), 0)
    np.testing.assert_allclose(c["mlp.sn_h"]["s"], want, rtol=0, atol=1e-12)

# ----------------------------------------------------------------------------- stages 4, 5, 6 and 8


def stage5():
    """Stage 5 as its own tests load it (tests/stage5.py: Triton interpreted without a GPU) and
    test_triton's helpers; skips without torch."""
    pytest.importorskip("torch")
    import test_triton
    return test_triton


@pytest.fixture
def interpreter(monkeypatch):
    """Triton reads TRITON_INTERPRET while running interpreted kernels (as in tests/test_triton.py)."""
    import torch
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("overrides", [{"token_shift": True}, {"token_shift": True, "attention": "hadamard"}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_stage4_equals_stage3(overrides):
    """test_mlx's checks on a shifted model: logits (1e-4), loss (1e-5), gradients (1e-3), spikes;
    MLX decoding token by token equals its parallel form and stage 3's first step (1e-4)."""
    pytest.importorskip("mlx.core")
    import test_mlx
    test_mlx.test_same_logits_loss_gradients_and_spikes_as_numpy(overrides)
    test_mlx.test_recurrent_generation_equals_parallel_forward(overrides)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_stage5_equals_stage3(kernels, interpreter):
    """test_triton's check_parity (float32 against stage 3 in float64): logits and loss within 1e-4,
    every gradient within 1e-3 (relative to its largest entry), 99.9% of the spikes equal; two
    layers, token_shift (and with hadamard attention, one layer)."""
    tt = stage5()
    if kernels == "triton" and not tt.HAS_TRITON:
        pytest.skip("needs Triton (GPU, or its interpreter on CPU)")
    tt.check_parity(tt.model_cfg(token_shift=True, n_layer=2), kernels)
    tt.check_parity(tt.model_cfg(token_shift=True, attention="hadamard", n_layer=1), kernels, seed=1)


def test_stage5_compiled_model_equals_eager():
    """--compile 1 traces the shift (torch.compile, aot_eager: the graph capture and autograd of the
    real thing without a C++ build): logits and gradients equal eager within 1e-5."""
    tt = stage5()
    import torch
    cfg = tt.model_cfg(token_shift=True, n_layer=2)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))).to(tt.DEVICE)
    out = []
    for compiled in (False, True):
        model = tt.S5.build_model(cfg, tt.run_cfg("torch"), S3.init_params(cfg, 1))
        logits = (torch.compile(model, backend="aot_eager") if compiled else model)(x)
        logits.square().mean().backward()
        out.append((logits.detach().cpu().numpy(),
                    {n: p.grad.cpu().numpy() for n, p in model.named_parameters()}))
    assert tt.rel(out[1][0], out[0][0]) < 1e-5
    assert all(tt.rel(out[1][1][n], g) < 1e-5 for n, g in out[0][1].items())


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_stage5_prefill_and_steps_equal_parallel_and_stage3(kernels, interpreter):
    """token_shift: a chunked prefill of 6 tokens from the zero state (it must leave the last
    position's spikes in the state), then 7 single steps, equal the parallel form and stage 3's
    decoding (1e-4 of the largest logit); the state's shift slots hold (T*B, D//2)."""
    tt = stage5()
    if kernels == "triton" and not tt.HAS_TRITON:
        pytest.skip("needs Triton (GPU, or its interpreter on CPU)")
    import torch
    cfg = tt.model_cfg(token_shift=True, n_layer=2)
    params = S3.init_params(cfg, 2)
    x = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 13))
    model = tt.S5.build_model(cfg, tt.run_cfg(kernels, chunk=4), params)
    ids = torch.from_numpy(x).to(tt.DEVICE)
    with torch.no_grad():
        full = model(ids).cpu().numpy()
        state = model.init_state(2)
        assert [tuple(s.shape) for s in state[2:]] == [(cfg.T * 2, cfg.d_model // 2)] * 2
        pre = model(ids[:, :6], state).cpu().numpy()
        steps = np.stack([model(ids[:, j:j + 1], state).cpu().numpy()[:, 0] for j in range(6, 13)], 1)
    state3 = S3.init_decode_state(cfg, 2, np.float64)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    ref = np.stack([S3.decode_step(p64, cfg, state3, x[:, j]) for j in range(13)], 1)
    assert tt.rel(full, ref) < 1e-4 and tt.rel(pre, ref[:, :6]) < 1e-4 and tt.rel(steps, ref[:, 6:]) < 1e-4


def test_stage6_readers_give_each_prompts_own_answer_with_a_shifted_model():
    """greedy_answers (batched by length, a prefill then single steps) with stage 3's NumpyReader
    (float64) equals each prompt decoded alone; stage 5's TorchReader (float32) gives the same answers."""
    stage5()
    import test_qa_decode as qa
    F = qa.F
    mcfg = S3.make_configs("tiny", vocab_size=40, tie_embeddings=False, token_shift=True)[0]
    rng = np.random.default_rng(0)
    params = {k: v + rng.normal(0, 1.0, v.shape) for k, v in S3.init_params(mcfg, 0, np.float64).items()}
    prompts, sources = qa.prompts_and_sources(0)
    want = [qa.reference(params, mcfg, p, 6, s) for p, s in zip(prompts, sources)]
    assert len({tuple(w) for w in want}) >= 6                                        # varied answers
    assert F.greedy_answers(params, mcfg, prompts, qa.EOS, max_new=6, batch=3, sources=sources) == want
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    got = F.greedy_answers(p32, mcfg, prompts, qa.EOS, max_new=6, batch=3, sources=sources,
                           reader=F.TorchReader)
    assert got == want


def test_stage8_state_files_of_a_shifted_model_need_its_shifted_spikes(tmp_path):
    """A shifted conversation's state file holds shift/k; one without them (the unshifted layout) is
    refused with one line, and /state names the shifted spikes."""
    stage5()
    import test_chat
    C8 = test_chat.C8
    conv, _, mcfg = test_chat.conversation("numpy", 1, token_shift=True)
    conv.feed([[1, 2, 3]])
    assert "2 x (4, 1, 16) shifted spikes" in C8.describe_state(conv)
    arrays, header = C8.load_state(conv.save(tmp_path / "s.npz"), conv.fingerprint)
    C8.save_state(tmp_path / "old.npz", {k: v for k, v in arrays.items() if not k.startswith("shift/")},
                  header)
    with pytest.raises(C8.StateFileError, match="of other shapes"):
        conv.load(tmp_path / "old.npz")
