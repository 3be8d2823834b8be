"""benchmarks/bench_lora_rank.py: the best rank-r part of an update against one built from known
singular vectors, the parameters of each row, a LoRA's size against stage 6's own adapters, and
bad options as one error line."""
import importlib.util
import json

import numpy as np
import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_lora_rank", ROOT / "benchmarks" / "bench_lora_rank.py")
B = importlib.util.module_from_spec(spec)
spec.loader.exec_module(B)
S3 = B.F.S3
TK = B.F.load_stage("2_tokenizer")


def known_update(rng, shape, singular):
    """U diag(singular) V^T with orthonormal U, V from QR: its SVD is known without computing one."""
    u = np.linalg.qr(rng.normal(size=(shape[0], len(singular))))[0]
    v = np.linalg.qr(rng.normal(size=(shape[1], len(singular))))[0]
    return u, v, (u * singular) @ v.T


def tiny_pair(seed=0, singular=(3.0, 2.0, 0.5)):
    """A tiny model's parameters and a 'tuned' copy: every target matrix and the embedding moved by
    a known update of the given singular values, every other array (the norm gains) by noise."""
    mcfg = S3.make_configs("tiny", vocab_size=40)[0]
    base = S3.init_params(mcfg, seed)
    rng = np.random.default_rng(seed)
    names = B.F.lora_names(base, B.F.FinetuneConfig.lora_targets)
    tuned, parts = {}, {}
    for n, w in base.items():
        if n in names or n == "embed.weight":
            u, v, delta = known_update(rng, w.shape, np.array(singular))
            parts[n] = (u, v)
            tuned[n] = (w + delta).astype(w.dtype)
        else:
            tuned[n] = (w + rng.normal(0, 0.1, w.shape)).astype(w.dtype)
    return mcfg, base, tuned, names, parts


def test_best_rank_keeps_the_largest_singular_directions():
    """Rank 2 of U diag(3, 2, 0.5) V^T is U_2 diag(3, 2) V_2^T; rank 3 is all of it."""
    u, v, delta = known_update(np.random.default_rng(1), (9, 7), np.array([3.0, 2.0, 0.5]))
    np.testing.assert_allclose(B.best_rank(delta, 2), (u[:, :2] * [3.0, 2.0]) @ v[:, :2].T, atol=1e-12)
    np.testing.assert_allclose(B.best_rank(delta, 3), delta, atol=1e-12)


def test_each_row_holds_the_arrays_it_names():
    """Rank r: targets at base + the known rank-r part, kept share (sum of the r largest s^2) / (sum
    of all), every other array the base's or, in the rows that say so, the tuned one; rank 3 is the
    whole update; the rank-r rows of the embedding alike; the other rows take the tuned arrays they
    name and the base's elsewhere."""
    mcfg, base, tuned, names, parts = tiny_pair()
    assert "head.weight" not in base                       # tied: the embedding is the readout too
    rows = {name: (params, kept) for name, params, kept, _ in B.variants(base, tuned, names, [1, 3])}
    others = [n for n in base if n not in names]
    norms = [n for n in others if n != "embed.weight"]
    assert names and norms and len(rows) == 12
    for rest, source in (("base", base), ("tuned", tuned)):
        params, kept = rows[f"rank 1 of each target update, the rest {rest}"]
        assert kept == pytest.approx(9 / (9 + 4 + 0.25))
        for n in names:
            u, v = parts[n]
            np.testing.assert_allclose(params[n], base[n] + 3.0 * np.outer(u[:, 0], v[:, 0]), atol=1e-5)
        assert all(params[n] is source[n] for n in others)
    params, kept = rows["rank 3 of each target update, the rest base"]
    assert kept == pytest.approx(1.0)
    assert all(np.allclose(params[n], tuned[n], atol=1e-5) for n in names)
    assert all(params[n] is base[n] for n in others)
    params, kept = rows["rank 1 of the embedding's update, the rest tuned"]
    u, v = parts["embed.weight"]
    want = base["embed.weight"] + 3.0 * np.outer(u[:, 0], v[:, 0])
    np.testing.assert_allclose(params["embed.weight"], want, atol=1e-5)
    assert kept == pytest.approx(9 / (9 + 4 + 0.25)) and all(params[n] is tuned[n] for n in names + norms)
    for name, keys in (("target matrices tuned, the rest base", names),
                       ("target matrices and embedding tuned, the rest base", names + ["embed.weight"]),
                       ("target matrices and the rest but the embedding tuned", names + norms)):
        params = rows[name][0]
        assert all(params[n] is (tuned[n] if n in keys else base[n]) for n in base), name
    rest = rows["the rest tuned, target matrices base"][0]
    assert all(rest[n] is base[n] for n in names) and all(rest[n] is tuned[n] for n in others)
    assert rows["fine-tuned (every array)"][0] is tuned and rows["base"][0] is base


def test_each_part_row_holds_the_arrays_it_names():
    """--parts: each block's matrices, every block but one, each kind, attention and MLP, every row
    with the embedding's update: those arrays tuned, every other the base's; then the largest
    entries."""
    _, base, tuned, names, _ = tiny_pair()
    rows = {name: params for name, params, _, _ in B.part_variants(base, tuned, names, 0.01)}
    blocks = ("0", "1")                                    # tiny: 2 blocks of 6 target matrices
    kinds = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2")
    assert len(names) == 12 and len(rows) == 2 + 2 + 6 + 2 + 1
    want = {f"block {b}'s target matrices": [f"blocks.{b}.{k}" for k in kinds] for b in blocks}
    for b, other in (("0", "1"), ("1", "0")):
        want[f"every block's target matrices but block {b}'s"] = [f"blocks.{other}.{k}" for k in kinds]
    want.update({f"every block's {k}": [f"blocks.{b}.{k}" for b in blocks] for k in kinds})
    want.update({f"every block's {part} matrices": [f"blocks.{b}.{k}" for b in blocks for k in kinds
                                                     if k.startswith(part)] for part in ("attn", "mlp")})
    for name, keys in want.items():
        params = rows[f"{name} and the embedding tuned, the rest base"]
        tuned_here = keys + ["embed.weight"]
        assert all(params[n] is (tuned[n] if n in tuned_here else base[n]) for n in base), name
    assert "the largest 1% of the update's entries (every array), the rest base" in rows


def test_largest_entries_keeps_the_biggest_changes_of_every_array():
    """An update of known sizes spread over two arrays: the share keeps exactly the k largest |change|
    wherever they are, signs included, and leaves every other entry at the base's."""
    base = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    tuned = {"a": np.array([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]], np.float32),
             "b": np.array([1.0, 1.0 - 4.0, 1.5, 1.0 + 0.05], np.float32)}
    params, k = B.largest_entries(base, tuned, 0.3)      # 30% of 10 entries: the 3 largest
    assert k == 3
    np.testing.assert_array_equal(params["a"], [[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]])
    np.testing.assert_array_equal(params["b"], [1.0, -3.0, 1.0, 1.0])
    params, k = B.largest_entries(base, tuned, 1.0)
    assert k == 10 and all(np.array_equal(params[n], tuned[n]) for n in base)


def test_lora_size_is_what_stage_6_trains():
    """r (in + out) per target matrix: the number of values in stage 6's own rank-r adapters."""
    _, base, _, names, _ = tiny_pair()
    for r in (1, 4):
        assert B.lora_size(base, names, r) == sum(a.size for a in B.F.init_lora(base, names, r).values())


def test_a_checkpoint_of_another_model_is_refused():
    mcfg, base, tuned, _, _ = tiny_pair()
    other = S3.make_configs("tiny", vocab_size=41)[0]
    with pytest.raises(ValueError, match="model configs differ"):
        B.check_pair(base, tuned, mcfg, other)
    with pytest.raises(ValueError, match="arrays differ"):
        B.check_pair(base, {**tuned, "extra": np.zeros(1)}, mcfg, mcfg)


@pytest.mark.parametrize("argv, words", [
    (["--ranks", "1,x"], "--ranks must be comma-separated whole numbers"),
    (["--ranks", "0"], "--ranks must be >= 1"),
    (["--decodings", "span,beam"], "--decodings of span, free, majority"),
    (["--lora_targets", "wq,embed"], "--lora_targets: the block matrices only"),
    (["--parts", "1", "--sparse", "0"], "--sparse must be in (0, 1]"),
    (["--sparse", "0.02"], "--sparse is a row of --parts 1: give both"),
])
def test_bad_option_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        B.main(["--base", "b.npz", "--tuned", "t.npz"] + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and words in err[-1] and err[0].startswith("usage:")


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert B.main(["--base", str(tmp_path / "none.npz"), "--tuned", str(tmp_path / "t.npz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none.npz" in err[0]


@pytest.mark.parametrize("parts, n_rows", [(0, 12), (1, 12 + 13)])
def test_the_table_scores_each_row_as_stage_6_does(tmp_path, monkeypatch, parts, n_rows):
    """End to end on a tiny byte-level model and a Q&A file: stage 6's scoring runs once per
    variant (4 + 2 + 2 ranks x 2 + 2 = 12; --parts 1 adds 2 blocks, 2 all-but-one, 6 kinds,
    attention, MLP and the largest entries) on the held-out questions, first on the base's
    parameters and then on the fine-tuned checkpoint's, and the table has a row for each."""
    tok = TK.Tokenizer([])
    tok.save(tmp_path / "tokenizer.json")
    info = {"path": str(tmp_path / "tokenizer.json"), "sha256": tok.sha256(), "vocab_size": tok.vocab_size}
    mcfg, tcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size)
    base = S3.init_params(mcfg, 0)
    rng = np.random.default_rng(2)
    tuned = {n: (w + rng.normal(0, 0.5, w.shape)).astype(w.dtype) for n, w in base.items()}
    paths = [S3.save_model(tmp_path / f"{name}.npz", p, mcfg, tcfg, 0, None, info)
             for name, p in (("base", base), ("tuned", tuned))]
    qa = tmp_path / "qa.jsonl"
    rows = [{"question": f"Colour {i}?", "answer": a, "context": f"It is {a} today.", "split": split}
            for i, (a, split) in enumerate([("red", "train"), ("blue", "test"), ("green", "test")])]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored, real = [], B.F.qa_scores

    def spy(params, mcfg, tok, pairs, *args):
        scored.append((params, [p["question"] for p in pairs]))
        return real(params, mcfg, tok, pairs, *args)
    monkeypatch.setattr(B.F, "qa_scores", spy)
    out = tmp_path / "table.md"
    assert B.main(["--base", str(paths[0]), "--tuned", str(paths[1]), "--qa", str(qa), "--ranks", "1,2",
                   "--decodings", "span", "--parts", str(parts), "--out", str(out)]) == 0
    assert len(scored) == n_rows and all(sorted(q) == ["Colour 1?", "Colour 2?"] for _, q in scored)
    for (params, _), want in zip(scored, (base, tuned)):
        assert all(np.array_equal(params[n], want[n]) for n in base)
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == 1 + n_rows
    assert lines[1].startswith("| base |") and lines[2].startswith("| fine-tuned")
    if parts:                                              # 1% of the model's values, kept by size
        n_total = sum(p.size for p in base.values())
        assert lines[-1].startswith("| the largest 1% ") and f"| {n_total // 100:,} (" in lines[-1]
