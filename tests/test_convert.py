"""Stage 7 and the rate_coding option it converts into: the option's hand gradients against finite
differences, its recurrent form against its parallel one and its MLX and PyTorch versions against
stage 3; then conversion itself: logits that approach the ANN's as T grows, deterministic
calibration, checkpoints that stages 3-5 load with equal logits, and bad inputs refused."""
import json
from dataclasses import replace

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

# ----------------------------------------------------------------------------- conversion

C = load_stage("7_convert")
TEXT = ("Spikes carry the signal. A neuron fires when its membrane crosses the threshold;\n"
        "attention reads rates, and the readout averages the timesteps.\n\n") * 40


def tiny_ann(seed=0):
    """A tiny ANN twin with noisy weights (every path matters) and the preset's norm epsilon (1e-2,
    which the conversion must rescale: the converted head norm sees y / (lam_q lam_k lam_v)). Its
    embedding has unit scale, so the residual norms, whose epsilon shrinks too, read ms(h) >> eps."""
    cfg = S3.make_configs("tiny", spiking=False)[0]
    rng = np.random.default_rng(seed)
    params = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
              for k, v in S3.init_params(cfg, seed).items()}
    params["embed.weight"] = rng.normal(0, 1.0, params["embed.weight"].shape).astype(np.float32)
    return params, cfg


def test_converted_logits_and_attention_approach_the_ann_as_T_grows():
    """IF neurons, thresholds from calibration windows: the relative RMS error of the logits falls at
    every step of T = 4, 16, 64, 256 and is below 0.15 at T = 256; the first block's attention output
    (times lam_q lam_k lam_v) falls likewise to within 0.05 (relative max) of the ANN's."""
    params, cfg = tiny_ann()
    rng = np.random.default_rng(1)
    lams = C.calibrate(params, cfg, rng.integers(0, cfg.vocab_size, (16, cfg.context)), 100.0, True)
    snn = C.convert_params(params, cfg, lams)
    x = rng.integers(0, cfg.vocab_size, (4, cfg.context))
    ann, _ = S3.forward(params, cfg, x)
    y_ann = C.attention_outputs(params, cfg, x)[0][0]
    scale = lams[0]["attn.sn_q"][0] * lams[0]["attn.sn_k"][0] * lams[0]["attn.sn_v"][0]
    logit_err, attn_err = [], []
    for T in (4, 16, 64, 256):
        scfg = C.spiking_config(cfg, T, C.ConvertConfig(), lams)
        out, _ = S3.forward(snn, scfg, x)
        y = C.attention_outputs(snn, scfg, x)[0][-1] * scale            # the last timestep's rates
        logit_err.append(np.sqrt(((out - ann) ** 2).mean() / (ann ** 2).mean()))
        attn_err.append(np.abs(y - y_ann).max() / np.abs(y_ann).max())
    print("logits", np.round(logit_err, 3), "attention", np.round(attn_err, 3))
    assert all(a > b for a, b in zip(logit_err, logit_err[1:])) and logit_err[-1] < 0.15
    assert all(a > b for a, b in zip(attn_err, attn_err[1:])) and attn_err[-1] < 0.05


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared dataset and, trained 0 steps on it, an ANN twin, a spiking model, and an ANN twin
    whose checkpoint names another tokenizer."""
    root = tmp_path_factory.mktemp("convert")
    (root / "story.txt").write_text(TEXT)
    data_dir = load_stage("1_data").prepare(f"files:{root / 'story.txt'}", root=root / "data")
    load_stage("2_tokenizer").build(data_dir, vocab_size=300)
    _, tok, info = S3.load_dataset_info(data_dir)
    paths = {}
    for name, spiking, sha in (("ann", False, info["sha256"]), ("snn", True, info["sha256"]),
                               ("other_tok", False, "0" * 64)):
        mcfg, tcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size, spiking=spiking)
        params, _ = tiny_ann() if not spiking else (S3.init_params(mcfg, 0), None)
        params = {k: v for k, v in params.items() if k != "embed.weight"}
        params["embed.weight"] = np.random.default_rng(0).normal(0, 0.5, (tok.vocab_size, mcfg.d_model))
        paths[name] = S3.save_model(root / f"{name}.npz", params, mcfg, tcfg, 0, None, dict(info, sha256=sha),
                                    data_dir)
    return root, data_dir, paths


def run_convert(world, *extra):
    root, _, paths = world
    out = root / "out" / f"conv{len(list(root.glob('out/*.npz')))}.npz"
    argv = ["--ckpt", str(paths["ann"]), "--out", str(out), "--report", str(out.with_suffix(".json")),
            "--sweep", "1,4", "--timesteps", "4", "--eval_tokens", "256", "--calib_tokens", "512", *extra]
    return C.main(argv), out


def test_calibration_is_deterministic(world):
    """The same windows, thresholds and converted weights on every run."""
    _, data_dir, paths = world
    params, cfg, *_ = C.load_ann(paths["ann"])
    train = S3.open_split(data_dir, "train")
    x1, x2 = (C.calibration_windows(train, cfg.context, 1024) for _ in range(2))
    assert np.array_equal(x1, x2) and len(np.unique(x1[:, 0])) > 1
    l1, l2 = (C.calibrate(params, cfg, x1, 99.9, True) for _ in range(2))
    for a, b in zip(l1, l2):
        for site in S3.SITES:
            assert np.array_equal(a[site], b[site]) and np.all(a[site] > 0)


def test_eval_tokens_0_scores_every_token_of_the_validation_split(world):
    """--eval_tokens 0 is the whole split: every token after the first is a target once, the tail
    after the last full window too (as stage 3 scores it), on either backend; a checkpoint trained
    with dropout is scored without it (the torch model in evaluation mode) on both."""
    _, data_dir, paths = world
    params, cfg, *_ = C.load_ann(paths["ann"])
    cfg = replace(cfg, dropout=0.5)
    val = S3.open_split(data_dir, "val")
    _, tok, _ = S3.load_dataset_info(data_dir)
    assert (len(val) - 1) % cfg.context, "the split must end in a partial window for this test"
    ref = S3.eval_report(params, cfg, val, cfg.context, 0, tok.decode)
    pytest.importorskip("torch")
    for backend in ("numpy", "torch"):
        r = C.evaluate(params, cfg, val, tok.decode, C.ConvertConfig(eval_tokens=0, backend=backend,
                                                                     device="cpu"))
        assert r["tokens"] == ref["tokens"] == len(val) - 1
        assert abs(r["bpc"] - ref["bpc"]) < 1e-4


def test_converted_checkpoint_loads_in_stages_3_to_5_with_equal_logits(world):
    """Stage 7 writes a spiking, rate-coded checkpoint; stage 3's, 4's and 5's loaders read it and
    give the same logits (float32 backends within 1e-4 relative of stage 3's); its report holds the
    ANN and every swept T on the same text."""
    rc, out = run_convert(world)
    assert rc == 0
    params, cfg, *_ = S3.load_model(out)
    assert cfg.spiking and cfg.rate_coding and cfg.T == 4 and cfg.beta == 1.0 and cfg.theta == 1.0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["T"] for r in report["converted"]] == [1, 4]
    assert {r["tokens"] for r in report["converted"]} == {report["ann"]["tokens"]}
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    ref, _ = S3.forward({k: v.astype(np.float64) for k, v in params.items()}, cfg, x)
    torch = pytest.importorskip("torch")
    S5 = load_stage("5_spike_llm_triton")
    p5, cfg5, *_ = S3.load_model(out)
    model = S5.build_model(cfg5, S5.RunConfig(kernels="torch", device="cpu", dtype="float32"), p5)
    with torch.no_grad():
        logits5 = model(torch.from_numpy(x)).numpy()
    assert np.abs(logits5 - ref).max() < 1e-4 * np.abs(ref).max()
    mx = pytest.importorskip("mlx.core")
    model4 = load_stage("4_spike_llm_mlx").load(out)[0]
    logits4 = np.array(model4(mx.array(x))[0])
    assert np.abs(logits4 - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_finetuning_continues_the_converted_checkpoint(world, backend):
    """--finetune_steps trains the converted model on the chosen backend (stage 3's or stage 5's
    train, resumed at step 0): the written checkpoint holds the fine-tuned weights, its step count
    is the fine-tuning's, and the report scores the model before and after on the same text."""
    if backend == "torch":
        pytest.importorskip("torch")
    rc, out = run_convert(world, "--finetune_steps", "2", "--backend", backend, "--device", "cpu")
    assert rc == 0
    params, cfg, _, step, *_ = S3.load_model(out)
    report = json.loads(out.with_suffix(".json").read_text())
    assert step == 2 and report["finetuned"]["steps"] == 2 and cfg.T == 4
    assert report["finetuned"]["tokens"] == report["before_finetune"]["tokens"]
    _, plain = run_convert(world)                                       # the same conversion, no steps
    converted = S3.load_model(plain)[0]
    assert any(not np.allclose(params[k], converted[k]) for k in ("blocks.0.attn.wq", "blocks.0.mlp.w1"))


@pytest.mark.parametrize("case, message", [
    ("snn", "holds a spiking model"),
    ("other_tok", "was trained with tokenizer sha256"),
    ("T0", "timesteps must be >= 1, got 0"),
])
def test_bad_inputs_are_refused_with_one_line(world, capsys, case, message):
    root, _, paths = world
    argv = ["--ckpt", str(paths.get(case, paths["ann"])), "--out", str(root / "bad.npz")]
    if case == "T0":
        argv += ["--timesteps", "0"]
    assert C.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (root / "bad.npz").exists()
