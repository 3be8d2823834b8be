"""Stage 6: Q&A generation and validation, the masked loss and LoRA gradients against finite
differences, merged adapters, freezing, exact match rising with every method, the CLI."""
import json
import os
import signal
import time
from dataclasses import fields, replace
from functools import partial

import numpy as np
import pytest

from numerics import finite_diff, rel_error
from spikelib.checkpoint import CheckpointError, load_checkpoint
from spikelib.cli import field_comments
from spikelib.qa_data import generate_qa
from spikelib.stages import load_stage

F = load_stage("6_finetune")
S3 = load_stage("3_spike_llm_numpy")
TK = load_stage("2_tokenizer")

# ----------------------------------------------------------------------------- Q&A generation

CORPUS = """Module json
===========

json.dumps
Return a JSON formatted string. New in version 3.2: the indent may be a string.

The encoder is a class that turns Python objects into text, and it is used by dumps.
In 1999, the first version of the format was written down by Douglas.
Paris is a city in France and the capital.
Ada Lovelace was born in London, England.


ROMEO:
But soft, what light through yonder window breaks?

JULIET:
O Romeo, Romeo, wherefore art thou Romeo?
"""

EXPECTED = {  # (kind, question, answer): one per rule the corpus above triggers
    ("returns", "What does json.dumps return?", "a JSON formatted string"),
    ("version", "In which version was json.dumps added?", "3.2"),
    ("definition", "What is the encoder?", "a class"),
    ("date", "In which year: the first version of the format was written down by Douglas?", "1999"),
    ("place", "Where is Paris?", "France"),
    ("person", "Where was Ada Lovelace born?", "London"),
    ("speaker", "Who says: O Romeo, Romeo, wherefore art thou Romeo?", "JULIET"),
}


def test_generated_questions_are_deterministic_extractive_spans():
    pairs = generate_qa(CORPUS)
    assert pairs == generate_qa(CORPUS)                         # same text, same list
    assert EXPECTED <= {(p["kind"], p["question"], p["answer"]) for p in pairs}
    for p in pairs:
        assert p["answer"] in p["context"], p                     # extractive: a span of its context
    assert len({p["question"] for p in pairs}) == len(pairs)      # one answer per question
    again = generate_qa(CORPUS + "\n\n\nThe encoder is a function of the module.")
    encoder_answers = [p["answer"] for p in again if p["question"] == "What is the encoder?"]
    assert encoder_answers == ["a class"]                                                    # the first


def test_split_is_fixed_by_the_question(tmp_path):
    """A question keeps its split when its context and the documents around it change, and in a
    user file without context; raising test_fraction only moves questions into test."""
    half = {p["question"]: p for p in generate_qa(CORPUS, test_fraction=0.5) if p["kind"] != "next"}
    edited = CORPUS.replace("what light through yonder window breaks",
                            "is that a light up in the window")
    edited = edited.replace("Paris is a city in France and the capital",
                            "Paris is a city in France, old and large")
    reordered = "\n\n\n".join(edited.split("\n\n\n")[::-1])
    moved = {p["question"]: p for p in generate_qa(reordered, test_fraction=0.5)
             if p["kind"] != "next"}       # "next" questions quote the edited text
    assert set(moved) == set(half)
    assert sum(moved[q]["context"] != half[q]["context"] for q in half) >= 3     # speaker, place, definition
    splits = {q: p["split"] for q, p in half.items()}
    assert {q: p["split"] for q, p in moved.items()} == splits
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in splits))
    assert {p["question"]: p["split"] for p in F.read_qa(path, test_fraction=0.5)} == splits
    assert set(splits.values()) == {"train", "test"}                            # this corpus has both at 0.5
    fewer = {p["question"] for p in generate_qa(CORPUS, test_fraction=0.25)
             if p["split"] == "test" and p["kind"] != "next"}
    assert fewer <= {q for q, p in half.items() if p["split"] == "test"}


# ----------------------------------------------------------------------------- user JSONL

def test_malformed_jsonl_names_every_bad_line(tmp_path):
    lines = ['{"question": "Who?", "answer": "me"}',             # 1 good
             'not json {',                                        # 2
             '[1, 2]',                                            # 3 not an object
             '{"question": "Why?"}',                              # 4 no answer
             '{"question": "How?", "answer": "so", "split": "dev"}',  # 5 bad split
             '',                                                  # 6 blank: skipped
             '{"question": "When?", "answer": "now", "context": "It is now."}']  # 7 good
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        F.read_qa(path)
    msg = str(err.value)
    assert "4 bad line(s)" in msg
    reasons = ((2, "not valid JSON"), (3, "expected a JSON object"),
               (4, '"answer" must be'), (5, '"split" must'))
    for n, why in reasons:
        assert f"line {n}: {why}" in msg, msg
    assert "line 1:" not in msg and "line 7:" not in msg


def test_valid_jsonl_loads(tmp_path):
    rows = [{"question": "Who?", "answer": "me", "split": "test"},
            {"question": "When?", "answer": "now", "context": "It is now."}]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = F.read_qa(path)
    assert [p["question"] for p in pairs] == ["Who?", "When?"]
    assert pairs[0]["split"] == "test" and pairs[1]["context"] == "It is now."
    assert pairs[1]["split"] in ("train", "test") and F.read_qa(path) == pairs     # default split is fixed
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no question-answer pairs"):
        F.read_qa(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- gradients

def test_masked_cross_entropy_matches_reference_and_finite_differences():
    """float64: the loss equals -log softmax averaged over the masked positions only, dlogits its
    central differences (relative error < 1e-7), exactly zero where the mask is 0."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (2, 5, 7))
    y = rng.integers(0, 7, (2, 5))
    mask = (rng.random((2, 5)) < 0.5).astype(np.float64)
    mask[0, 0], mask[1, 4] = 1.0, 0.0
    loss, dz = F.masked_cross_entropy(z, y, mask)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
    assert loss == pytest.approx(nll[mask == 1].mean(), rel=1e-12)
    fd = finite_diff(lambda: F.masked_cross_entropy(z, y, mask)[0], z, eps=1e-6)
    assert rel_error(dz, fd) < 1e-7
    assert not dz[mask == 0].any()
    # float32 logits keep float32 dlogits, so the backward runs in float32 as in stage 3
    assert F.masked_cross_entropy(z.astype(np.float32), y, mask)[1].dtype == np.float32


def test_lora_gradients_match_finite_differences(monkeypatch):
    """dB = s dW A^T and dA = s B^T dW through the numpy backend, against central differences
    (h = 1e-6) of the masked loss in float64: relative error < 1e-5 for every adapter tensor, all
    entries, the tied embedding's (lookup and readout in one dW) too. Stage 3's smooth forward (each
    spike H(u) replaced by its surrogate S(u), as in its own gradient checks) makes the loss
    differentiable; A is random so that dB is not zero. Two embedding rows (--lora_tokens) and
    every RMSNorm gain (the target norm) train in full beside the adapters: dr_i = dE_eff[i] and
    dd = dg_eff, checked the same way."""
    mcfg = S3.make_configs("tiny", vocab_size=11, d_model=8, d_ff=12, n_head=2)[0]
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float64) + rng.normal(0, 0.1, v.shape) for k, v in S3.init_params(mcfg).items()}
    lora = F.init_lora(params, F.lora_names(params, "wq,wk,wv,wo,w1,w2,embed"), rank=2, token_ids=(3, 4),
                       gains=F.norm_names(params))
    for k in lora:
        if k.endswith(".A"):
            lora[k] = rng.normal(0, 0.3, lora[k].shape)
    assert len(lora) == 2 * (6 * mcfg.n_layer + 1) + 2 + (3 * mcfg.n_layer + 1) and "embed.weight.B" in lora
    assert lora["embed.weight.row.3"].shape == lora["norm_f.weight.delta"].shape == (mcfg.d_model,)
    assert lora["blocks.1.attn.norm.weight.delta"].shape == params["blocks.1.attn.norm.weight"].shape
    x, y = rng.integers(0, mcfg.vocab_size, (2, 2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]], np.float64)
    scale = 1.5
    monkeypatch.setattr(S3, "forward", partial(S3.forward, smooth=True))
    loss, grads = F.numpy_backend(mcfg)(F.apply_lora(params, lora, scale), x, y, mask)
    hand = F.lora_grads(grads, lora, scale)
    assert set(hand) == set(lora)

    def masked_loss():
        return F.masked_cross_entropy(S3.forward(F.apply_lora(params, lora, scale), mcfg, x)[0], y, mask)[0]

    assert masked_loss() == loss
    for name, a in lora.items():
        fd = finite_diff(masked_loss, a, eps=1e-6)
        assert np.linalg.norm(fd) > 1e-4, name                    # a real gradient, not round-off
        assert rel_error(hand[name], fd) < 1e-5, name


# ----------------------------------------------------------------------------- checkpoints

def tiny_base(tmp_path):
    """A tiny base checkpoint naming its tokenizer, a byte-level one (no learned pieces, 264 ids)."""
    tok = TK.Tokenizer([])
    tok.save(tmp_path / "tokenizer.json")
    info = {"path": str(tmp_path / "tokenizer.json"), "sha256": tok.sha256(), "vocab_size": tok.vocab_size}
    mcfg, tcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size)
    return S3.save_model(tmp_path / "base.npz", S3.init_params(mcfg, 0), mcfg, tcfg, 0, None, info)


def random_adapters(params, rank, seed=0):
    """Adapters with both factors random (freshly initialized ones have A = 0 and change nothing)."""
    rng = np.random.default_rng(seed)
    lora = F.init_lora(params, F.lora_names(params, "wq,wk,wv,wo,w1,w2"), rank, seed)
    return {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in lora.items()}


def test_merged_checkpoint_equals_base_plus_adapters(tmp_path, monkeypatch, capsys):
    """The merged file's forward equals the base's forward with the adapters applied unmerged,
    y = x W + s (x B) A at every adapted matrix (float64, smooth forward, within 1e-6 relative)."""
    base = tiny_base(tmp_path)
    params, mcfg, _, _, _, config = S3.load_model(base)
    cfg = F.FinetuneConfig(base=str(base), out_dir=str(tmp_path / "out"), lora_rank=4, lora_alpha=6.0)
    lora = random_adapters(params, cfg.lora_rank)
    F.save_lora(tmp_path / "lora.npz", lora, cfg, base)
    merged, mcfg2, _, _, _, config2 = S3.load_model(F.merge(cfg, tmp_path / "lora.npz"))
    assert f"merged {6 * mcfg.n_layer} adapters" in capsys.readouterr().out
    assert mcfg2 == mcfg and config2["tokenizer"] == config["tokenizer"]
    for n in params:                                              # only adapted matrices changed
        assert np.array_equal(merged[n], params[n]) == (n + ".B" not in lora), n

    x = np.random.default_rng(1).integers(0, mcfg.vocab_size, (2, 12))
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    plain = S3.forward(p64, mcfg, x, smooth=True)[0]
    got = S3.forward({k: v.astype(np.float64) for k, v in merged.items()}, mcfg, x, smooth=True)[0]
    adapters = {id(p64[k[:-2]]): (lora[k].astype(np.float64), lora[k[:-2] + ".A"].astype(np.float64))
                for k in lora if k.endswith(".B")}
    real_linear, used = S3.linear, set()

    def lora_linear(inp, W):
        out = real_linear(inp, W)
        if id(W) in adapters:
            used.add(id(W))
            B, A = adapters[id(W)]
            out = out + (cfg.lora_alpha / cfg.lora_rank) * real_linear(real_linear(inp, B), A)
        return out

    monkeypatch.setattr(S3, "linear", lora_linear)
    want = S3.forward(p64, mcfg, x, smooth=True)[0]
    assert used == set(adapters)                                  # every adapter took part
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
    assert np.linalg.norm(plain - want) / np.linalg.norm(want) > 1e-2     # the adapters matter


def test_trained_rows_change_their_rows_alone(tmp_path, capsys):
    """--lora_tokens: E_eff[i] = E[i] + r_i exactly at the trained rows, every other row and the base
    untouched; the rows survive save_lora / load_lora, and a row the base lacks is refused."""
    base = tiny_base(tmp_path)
    params = S3.load_model(base)[0]
    before = {k: v.copy() for k, v in params.items()}
    cfg = F.FinetuneConfig(base=str(base), out_dir=str(tmp_path), lora_rank=2, lora_tokens="<q>,<a>")
    q, a = F.SPECIAL_TOKENS.index("<q>"), F.SPECIAL_TOKENS.index("<a>")
    lora = F.init_lora(params, F.lora_names(params, "wq"), 2, token_ids=(q, a))
    rng = np.random.default_rng(0)
    lora = {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in lora.items()}
    tuned = F.apply_lora(params, lora, 1.0)
    changed = np.nonzero((tuned["embed.weight"] != params["embed.weight"]).any(1))[0]
    assert changed.tolist() == [q, a]
    assert np.array_equal(tuned["embed.weight"][q], params["embed.weight"][q] + lora[f"embed.weight.row.{q}"])
    assert all(params[k].tobytes() == before[k].tobytes() for k in params)
    F.save_lora(tmp_path / "rows.npz", lora, cfg, base)
    loaded, _ = F.load_lora(tmp_path / "rows.npz", params)
    assert all(np.array_equal(loaded[k], lora[k]) for k in lora) and set(loaded) == set(lora)
    merged = S3.load_model(F.merge(cfg, tmp_path / "rows.npz"))[0]
    assert np.array_equal(merged["embed.weight"], tuned["embed.weight"])
    n_b = sum(k.endswith(".B") for k in lora)                        # one wq adapter a block
    assert f"merged {n_b} adapters (s = 8), 2 embedding rows and 0 norm gains" in capsys.readouterr().out
    vocab = params["embed.weight"].shape[0]
    for key, row in ((f"embed.weight.row.{vocab}", lora[f"embed.weight.row.{q}"]),     # no such token
                     (f"embed.weight.row.{q}", lora[f"embed.weight.row.{q}"][:-1])):   # a short row
        F.save_lora(tmp_path / "bad.npz", {**lora, key: row}, cfg, base)
        with pytest.raises(CheckpointError, match="does not fit the base model"):
            F.load_lora(tmp_path / "bad.npz", params)


def test_trained_gains_change_the_norms_alone(tmp_path, capsys):
    """--lora_targets ...,norm: g_eff = g + d exactly at every RMSNorm gain (each block's norm1,
    attn.norm and norm2, and norm_f), every other array and the base untouched; the gains count
    in the trained set, survive save_lora / load_lora and merge, and a change that fits no gain is
    refused."""
    base = tiny_base(tmp_path)
    params, mcfg = S3.load_model(base)[:2]
    before = {k: v.copy() for k, v in params.items()}
    cfg = F.FinetuneConfig(base=str(base), out_dir=str(tmp_path), lora_rank=2, lora_targets="wq,norm")
    lora = F.trainable_params(params, cfg, mcfg)
    gains = sorted(k for k in lora if k.endswith(".delta"))
    assert len(gains) == 3 * mcfg.n_layer + 1 and "norm_f.weight.delta" in gains
    assert sum(lora[k].size for k in gains) == len(gains) * mcfg.d_model
    only = F.trainable_params(params, replace(cfg, lora_targets="norm"), mcfg)
    assert sorted(only) == gains                                      # the gains alone: no matrix needed
    rng = np.random.default_rng(0)
    lora = {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in lora.items()}
    tuned = F.apply_lora(params, lora, cfg.lora_alpha / cfg.lora_rank)
    changed = sorted(n for n in params if not np.array_equal(tuned[n], params[n]))
    wq = [f"blocks.{i}.attn.wq" for i in range(mcfg.n_layer)]
    assert changed == sorted([k[:-len(".delta")] for k in gains] + wq)
    assert np.array_equal(tuned["norm_f.weight"], params["norm_f.weight"] + lora["norm_f.weight.delta"])
    assert all(params[k].tobytes() == before[k].tobytes() for k in params)
    F.save_lora(tmp_path / "gains.npz", lora, cfg, base)
    loaded, _ = F.load_lora(tmp_path / "gains.npz", params)
    assert set(loaded) == set(lora) and all(np.array_equal(loaded[k], lora[k]) for k in lora)
    merged = S3.load_model(F.merge(cfg, tmp_path / "gains.npz"))[0]
    assert all(np.array_equal(merged[n], tuned[n]) for n in params)
    assert f"merged {mcfg.n_layer} adapters (s = 8), 0 embedding rows and {len(gains)} norm gains" \
        in capsys.readouterr().out
    d = mcfg.d_model
    plif = {**params, "blocks.0.sn1.theta": np.ones(d, np.float32)}   # a PLIF base's threshold: (d,), no gain
    for key, v in (("blocks.0.sn1.theta.delta", np.zeros(d)), ("blocks.0.attn.wq.delta", np.zeros(d)),
                   ("norm_f.weight.delta", np.zeros(d - 1))):           # a short change
        F.save_lora(tmp_path / "bad.npz", {**lora, key: v}, cfg, base)
        with pytest.raises(CheckpointError, match="does not fit the base model"):
            F.load_lora(tmp_path / "bad.npz", plif)


def test_load_lora_rejects_adapters_of_another_model(tmp_path):
    base = tiny_base(tmp_path)
    params = S3.load_model(base)[0]
    cfg = F.FinetuneConfig(lora_rank=4)
    good = random_adapters(params, 4)
    F.save_lora(tmp_path / "good.npz", good, cfg, base)
    lora, scale = F.load_lora(tmp_path / "good.npz", params)
    assert scale == cfg.lora_alpha / 4 and set(lora) == set(good)
    wide = S3.make_configs("tiny", vocab_size=params["embed.weight"].shape[0], d_ff=48)[0]
    deep = S3.make_configs("tiny", vocab_size=params["embed.weight"].shape[0], n_layer=3)[0]
    for name, other in (("wide", wide), ("deep", deep)):          # a wrong shape; a layer the base lacks
        F.save_lora(tmp_path / f"{name}.npz", random_adapters(S3.init_params(other), 4), cfg, base)
        with pytest.raises(CheckpointError, match="does not fit the base model"):
            F.load_lora(tmp_path / f"{name}.npz", params)
    without_a = {k: v for k, v in good.items() if k != "blocks.0.attn.wq.A"}
    F.save_lora(tmp_path / "half.npz", without_a, cfg, base)
    with pytest.raises(CheckpointError, match="blocks.0.attn.wq.B"):            # a B without its A
        F.load_lora(tmp_path / "half.npz", params)
    (tmp_path / "notes.npz").write_text("not adapters at all\n" * 8)       # not an .npz archive
    with pytest.raises(CheckpointError, match="not a readable LoRA adapter file") as err:
        F.load_lora(tmp_path / "notes.npz", params)
    assert "pickle" not in str(err.value)          # numpy's hint to load it unsafely is not passed on


# ----------------------------------------------------------------------------- training

QA = [("Sky color?", "blue"), ("Grass color?", "green"), ("Snow color?", "white"), ("Coal color?", "black"),
      ("Cat says?", "meow"), ("Dog says?", "woof")]


@pytest.fixture(scope="module")
def qa_setup():
    """Six short questions, a tokenizer trained on them (answers are one or two tokens) and the
    tiny preset with the tokenizer's vocabulary."""
    tok = TK.Tokenizer.train(" ".join(f"{q} {a}." for q, a in QA) * 3, vocab_size=300, progress=False)
    pairs = [{"question": q, "answer": a} for q, a in QA]
    mcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size)[0]
    return tok, pairs, [F.encode_pair(tok, p) for p in pairs], mcfg


def test_freeze_leaves_frozen_parameters_bit_identical(qa_setup):
    _, _, examples, mcfg = qa_setup
    params = S3.init_params(mcfg, 0)
    before = {k: v.copy() for k, v in params.items()}
    cfg = F.FinetuneConfig(method="freeze", lr=1e-2, max_steps=5, warmup=1, batch_size=6)
    trainable, _, _ = F.finetune(params, mcfg, cfg, examples, F.numpy_backend(mcfg), progress=False)
    frozen = set(F.frozen_names(params, 1))                       # freeze_layers=-1: half of 2 blocks
    assert frozen == {"embed.weight"} | {n for n in params if n.startswith("blocks.0.")}
    assert set(trainable) == set(params) - frozen
    for n in params:
        assert np.array_equal(params[n], before[n]) == (n in frozen), n      # every trainable one moved


@pytest.mark.parametrize("method, lr, steps",
                         [("full", 1e-2, 100), ("freeze", 1e-2, 100), ("lora", 2e-2, 300)])
def test_finetuning_raises_exact_match(qa_setup, method, lr, steps):
    """From the tiny preset's random init, greedy answers to the six training questions go from
    exact match 0 to >= 4/6 (5/6 or 6/6 for init seeds 0..9 with these settings; LoRA rank 8,
    alpha 16 needs more steps, as the fixed random embedding caps its logits)."""
    tok, pairs, examples, mcfg = qa_setup
    params = S3.init_params(mcfg, 0)
    before = F.qa_scores(params, mcfg, tok, pairs, max_new=4)["em"]
    cfg = F.FinetuneConfig(method=method, lr=lr, max_steps=steps, warmup=5, batch_size=6)
    trainable, losses, _ = F.finetune(params, mcfg, cfg, examples, F.numpy_backend(mcfg), progress=False)
    tuned = F.apply_lora(params, trainable, cfg.lora_alpha / cfg.lora_rank) if method == "lora" else params
    after = F.qa_scores(tuned, mcfg, tok, pairs, max_new=4)
    assert before == 0.0
    assert after["em"] >= 4 / 6, after["answers"]
    assert np.mean(losses[-10:]) < losses[0]


def test_span_answers_come_from_the_context_not_the_question(qa_setup):
    """Scored with span decoding, every answer of a random model is a piece of its context, though
    the prompt also holds the question (whose words are not in the context)."""
    tok, _, _, mcfg = qa_setup
    pairs = [{"question": f"{q} {a}?", "answer": "x", "context": ctx}
             for q, a in QA for ctx in ("Snow white.", "Cat says meow. Dog says woof.")]
    for seed in range(3):
        params = S3.init_params(mcfg, seed)
        answers = F.qa_scores(params, mcfg, tok, pairs, max_new=4, decode="span")["answers"]
        assert all(a and a in p["context"] for a, p in zip(answers, pairs)), list(zip(answers, pairs))


def test_batched_greedy_answers_equal_one_prompt_at_a_time():
    """Prompts of different lengths decoded together (two groups of up to 3) give each prompt's own
    greedy continuation from stage 3's generate, cut at <eos>. float64, an untied random head so
    the continuations vary; token 25 plays <eos> and ends two of them early."""
    mcfg = S3.make_configs("tiny", vocab_size=40, tie_embeddings=False)[0]
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float64) + rng.normal(0, 1.0, v.shape) for k, v in S3.init_params(mcfg).items()}
    prompts = [list(rng.integers(3, 40, n)) for n in (3, 9, 1, 6)]
    want = []
    for p in prompts:
        out = list(S3.generate(params, mcfg, p, 6, np.random.default_rng(0), temperature=0))
        want.append(out[:out.index(25)] if 25 in out else out)
    assert [len(w) for w in want] == [2, 6, 6, 5]
    assert F.greedy_answers(params, mcfg, prompts, eos_id=25, max_new=6, batch=3) == want


@pytest.mark.parametrize("backend, package", [("mlx", "mlx.core"), ("triton", "torch")])
def test_backend_gradients_equal_numpy(qa_setup, backend, package):
    """The same masked loss and gradients as the numpy backend, float32: relative error < 1e-4.
    The ANN twin (spiking=False) keeps float32 rounding from flipping a spike between frameworks."""
    pytest.importorskip(package)
    _, _, examples, spiking = qa_setup
    mcfg = S3.make_configs("tiny", vocab_size=spiking.vocab_size, spiking=False)[0]
    rng = np.random.default_rng(0)
    init = S3.init_params(mcfg)
    params = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in init.items()}
    x, y, mask = F.make_batch(examples, 0)
    loss, grads = F.numpy_backend(mcfg)(params, x, y, mask)
    loss2, grads2 = F.BACKEND[backend](mcfg)(params, x, y, mask)
    assert loss2 == pytest.approx(loss, rel=1e-5)
    assert set(grads2) == set(grads)
    for n in grads:
        assert np.linalg.norm(grads2[n] - grads[n]) / np.linalg.norm(grads[n]) < 1e-4, n


@pytest.mark.parametrize("backend, package", [("mlx", "mlx.core"), ("triton", "torch")])
def test_lora_finetuning_equals_numpy_step_for_step(qa_setup, backend, package):
    """Twenty LoRA steps (the chain rule and AdamW of stage 6 on each backend's dW_eff), the
    embedding adapted and the norm gains trained too, end in the same adapters and losses as with
    the numpy backend: relative error < 1e-3 (float32, ANN twin)."""
    pytest.importorskip(package)
    _, _, examples, spiking = qa_setup
    mcfg = S3.make_configs("tiny", vocab_size=spiking.vocab_size, spiking=False)[0]
    rng = np.random.default_rng(0)
    base = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in S3.init_params(mcfg).items()}
    cfg = F.FinetuneConfig(method="lora", max_steps=20, warmup=2, batch_size=4, lora_rank=2, lora_alpha=4.0,
                           lora_targets="wq,wk,wv,wo,w1,w2,embed,norm")
    runs = [F.finetune(dict(base), mcfg, cfg, examples, F.BACKEND[b](mcfg), progress=False)
            for b in ("numpy", backend)]
    (want, want_losses, _), (got, got_losses, _) = runs
    assert got_losses == pytest.approx(want_losses, rel=1e-4) and want_losses[-1] < want_losses[0] - 0.5
    for n in want:
        assert np.linalg.norm(got[n] - want[n]) <= 1e-3 * np.linalg.norm(want[n]), n


# ----------------------------------------------------------------------------- command line

def test_cli_help_and_missing_base(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        F.main(["--help"])
    assert exit_info.value.code == 0 and "--lora_rank" in capsys.readouterr().out
    missing = tmp_path / "none.npz"
    assert F.main(["--base", str(missing), "--out_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"no pretrained checkpoint at {missing}" in err and "python 3_spike_llm_numpy.py" in err


def test_run_scores_answerable_held_out_questions_without_their_contexts(tmp_path, monkeypatch):
    """After fine-tuning, run scores the answerable held-out questions once more with their contexts
    removed and free decoding (what the model recalls rather than reads); the row keeps that EM.
    Questions that had no context are left out (their free score is already that)."""
    base = tiny_base(tmp_path)
    qa = tmp_path / "qa.jsonl"
    rows = [{"question": q, "answer": a, "context": f"Note: {a} here.",
             "split": "test" if i % 3 == 0 else "train"} for i, (q, a) in enumerate(QA)]
    rows.append({"question": "Moon color?", "answer": "", "is_impossible": True, "context": "No moon.",
                 "split": "test"})
    rows.append({"question": "Sun color?", "answer": "yellow", "split": "test"})      # no context: not scored
    qa.write_text("".join(json.dumps(row) + "\n" for row in rows))
    calls, real = [], F.qa_scores

    def spy(params, mcfg, tok, pairs, *args, **kwargs):
        calls.append((pairs, args[1]))
        return real(params, mcfg, tok, pairs, *args, **kwargs)
    monkeypatch.setattr(F, "qa_scores", spy)
    cfg = F.FinetuneConfig(base=str(base), out_dir=str(tmp_path / "out"), qa=str(qa), max_steps=2,
                           batch_size=2, max_answer_tokens=3, eval_tokens=256)
    row = F.run(cfg, progress=False)
    held = [r for r in rows if r["split"] == "test" and r["answer"] and r.get("context")]
    blind = [(pairs, decode) for pairs, decode in calls if all(p["context"] == "" for p in pairs)]
    assert len(blind) == 1 and blind[0][1] == "free"
    assert sorted(p["question"] for p in blind[0][0]) == sorted(r["question"] for r in held)
    assert row["n_blind"] == len(held) and 0 <= row["em_blind"] <= 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_resumes_a_stopped_run_to_the_same_adapters(tmp_path, monkeypatch, capsys, sig):
    """End to end: Ctrl-C during step 3 of 5 (a SIGINT from inside the backend), or a scheduler's
    SIGTERM, saves the state and exits 130; --resume 1 finishes the run, deletes the state, writes
    the adapters an unstopped run writes (byte for byte) and reports the time of both parts (the
    stopped one made slower than the rest, so that the resumed part alone would be less)."""
    base = tiny_base(tmp_path)
    qa = tmp_path / "qa.jsonl"
    rows = [{"question": q, "answer": a, "split": "test" if i % 3 == 0 else "train"}
            for i, (q, a) in enumerate(QA)]
    qa.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["--base", str(base), "--qa", str(qa), "--max_steps", "5", "--batch_size", "2",
            "--max_answer_tokens", "3", "--save_interval", "0"]
    assert F.main(args + ["--out_dir", str(tmp_path / "straight")]) == 0
    calls, real = [], F.numpy_backend

    def interrupted_backend(mcfg):
        grad_fn = real(mcfg)

        def grads(*batch):
            calls.append(1)
            if len(calls) <= 3:
                time.sleep(0.3)                          # the stopped part takes longer than the rest
            if len(calls) == 3:
                os.kill(os.getpid(), sig)
            return grad_fn(*batch)
        return grads
    monkeypatch.setitem(F.BACKEND, "numpy", interrupted_backend)
    out = tmp_path / "stopped"
    assert F.main(args + ["--out_dir", str(out)]) == 130
    assert "interrupted: saved step 3" in capsys.readouterr().out
    stopped_seconds = load_checkpoint(out / "lora.state.npz")[1]["seconds"]
    assert F.main(args + ["--out_dir", str(out), "--resume", "1"]) == 0
    assert not (out / "lora.state.npz").exists() and len(calls) == 5
    assert (out / "lora.npz").read_bytes() == (tmp_path / "straight" / "lora.npz").read_bytes()
    assert stopped_seconds > 0.9
    assert json.loads((out / "results.jsonl").read_text())["seconds"] > stopped_seconds


def test_cli_finetunes_merges_and_answers(tmp_path, capsys):
    """End to end on a user file: LoRA (with the norm gains) writes adapters and a results row,
    --merge a checkpoint that loads with the base's tokenizer, --ask answers with the adapters."""
    base = tiny_base(tmp_path)
    qa = tmp_path / "qa.jsonl"
    rows = [{"question": q, "answer": a, "split": "test" if i % 3 == 0 else "train"}
            for i, (q, a) in enumerate(QA)]
    qa.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    args = ["--base", str(base), "--out_dir", str(out), "--qa", str(qa), "--max_steps", "3",
            "--batch_size", "2", "--max_answer_tokens", "3", "--lora_targets", "wq,wv,norm"]
    assert F.main(args) == 0
    row = json.loads((out / "results.jsonl").read_text())
    got = (row["method"], row["steps"], row["n_test"], row["output"])
    assert got == ("lora", 3, 2, str(out / "lora.npz"))
    assert list(row["em_by_kind"]) == ["-"] and row["em_by_kind"]["-"][1] == 2      # a user file has no kinds
    assert "| lora | numpy |" in capsys.readouterr().out
    assert F.main(args + ["--merge", "1"]) == 0
    F.load_base(out / "lora_merged.npz")
    assert F.main(args + ["--ask", "Sky color?"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    context = "The sky is blue."                      # span decoding: the answer is a piece of the context
    assert F.main(args + ["--ask", "Sky color?", "--context", context, "--max_answer_tokens", "4"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and answer in context, answer
    assert F.main(args + ["--decode", "beam"]) == 1
    assert "--decode must be one of span, free, majority, got 'beam'" in capsys.readouterr().err


def test_a_fine_tuned_checkpoint_is_the_base_of_the_next_run(tmp_path, monkeypatch):
    """Carrying a model on (to longer contexts, README): --base a full.npz of stage 6, and the next
    run trains from its parameters, not from the base it was tuned from."""
    base = tiny_base(tmp_path)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": a, "split": "test" if i % 3 == 0 else "train"})
                          + "\n" for i, (q, a) in enumerate(QA)))
    common = ["--qa", str(qa), "--method", "full", "--max_steps", "2", "--batch_size", "2", "--lr", "1e-2",
              "--max_answer_tokens", "3"]
    assert F.main(["--base", str(base), "--out_dir", str(tmp_path / "first")] + common) == 0
    started, real = [], F.finetune

    def spy(params, *args, **kwargs):
        started.append({k: v.copy() for k, v in params.items()})
        return real(params, *args, **kwargs)
    monkeypatch.setattr(F, "finetune", spy)
    first = tmp_path / "first" / "full.npz"
    assert F.main(["--base", str(first), "--out_dir", str(tmp_path / "second")] + common) == 0
    tuned, original = F.load_base(first)[0], F.load_base(base)[0]
    assert len(started) == 1 and all(np.array_equal(started[0][k], tuned[k]) for k in tuned)
    assert any(not np.array_equal(tuned[k], original[k]) for k in tuned)
    assert (tmp_path / "second" / "full.npz").is_file()


def test_help_explains_every_config_field():
    """--help carries each FinetuneConfig field's own comment (compared without whitespace, as
    argparse rewraps the text), and every field has one."""
    comments = field_comments(F.FinetuneConfig)
    names = [f.name for f in fields(F.FinetuneConfig)]
    assert [n for n in names if not comments.get(n)] == []
    help_text = "".join(F.build_parser().format_help().split())
    for name in names:
        assert f"--{name}" in help_text and "".join(comments[name].split()) in help_text, name


def test_bad_choice_is_one_error_line(capsys):
    assert F.main(["--method", "bogus"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --method") and "bogus" in err[0], err


def is_span(answer, source):
    return any(source[i:i + len(answer)] == answer for i in range(len(source) - len(answer) + 1))


SPEAKERS = [("ELBOW", "duke"), ("DUKE VINCENTIO", "king"), ("ESCALUS", "maid")] * 4
PLAY = "\n\n".join(f"{name}:\nGood morrow to the {w} of this fair and ancient town, my lord {n}."
                   for n, (name, w) in enumerate(SPEAKERS))


def test_span_decoding_can_give_an_answer_in_the_form_it_is_trained_to_write(monkeypatch):
    """Answers are trained as " " + answer. A speaker's name starts a line of its context, so the
    context's own tokens hold it without the space: no trained answer is a span of them. Every
    answer of the generated pairs is a span of span_source, and scoring hands span_source to the
    decoder."""
    tok = TK.Tokenizer.train(PLAY, vocab_size=300, progress=False)
    pairs = [p for p in generate_qa(PLAY, test_fraction=0.0) if p["answer"]]
    speakers = [p for p in pairs if p["kind"] == "speaker"]
    assert speakers and {p["kind"] for p in pairs} > {"speaker"}
    assert all(is_span(tok.encode(" " + p["answer"]), F.span_source(tok, p["context"])) for p in pairs)
    assert not any(is_span(tok.encode(" " + p["answer"]), tok.encode(p["context"])) for p in speakers)
    seen = []

    def no_answers(params, mcfg, prompts, *args, sources=None, **kwargs):
        seen.append(sources)
        return [[] for _ in prompts]
    monkeypatch.setattr(F, "greedy_answers", no_answers)
    F.qa_scores(None, None, tok, pairs, decode="span")
    F.qa_scores(None, None, tok, pairs, decode="free")
    assert seen == [[F.span_source(tok, p["context"]) for p in pairs], [None] * len(pairs)]


def test_span_decoding_picks_the_best_span_continuation():
    """Extractive decoding against a brute-force reference on the full (non-recurrent) forward:
    no answer if p(<eos>) beats the summed probability of the tokens that start a span of the
    source, else the first token is the argmax over them; after it the
    answer ends when softmax gives <eos> over 1/2 or no token t keeps answer + [t] a span, and
    otherwise goes on with the argmax of those t. float64, an untied random head; token 34 plays
    <eos> and sits in the sources so that a span may run into it. Batched, one at a time
    (stream_answer) and the reference agree, and every answer is a span while free decoding
    leaves the sources."""
    mcfg = S3.make_configs("tiny", vocab_size=40, tie_embeddings=False)[0]
    rng = np.random.default_rng(1)
    params = {k: v.astype(np.float64) + rng.normal(0, 1.0, v.shape) for k, v in S3.init_params(mcfg).items()}
    prompts = [[3] + list(rng.integers(3, 40, n)) + [4] for n in (12, 5, 9, 20, 7, 15)]
    prompts[1][3] = 34

    def reference(prompt, source, max_new=6):
        answer = []
        while len(answer) < max_new:
            logits = S3.forward(params, mcfg, np.array([prompt + answer]))[0][0, -1]
            p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            cont = [t for t in range(40) if is_span(answer + [t], source)]
            if answer and (not cont or p[34] > 0.5) or not answer and p[34] > sum(p[t] for t in cont):
                break
            best = max(cont, key=lambda t: logits[t])
            if best == 34:
                break
            answer.append(best)
        return answer

    sources = [p[1:-1] for p in prompts]
    want = [reference(p, s) for p, s in zip(prompts, sources)]
    got = F.greedy_answers(params, mcfg, prompts, eos_id=34, max_new=6, batch=3, sources=sources)
    assert got == want
    assert [list(F.stream_answer(params, mcfg, p, 34, 6, s)) for p, s in zip(prompts, sources)] == want
    assert all(a and is_span(a, s) for a, s in zip(got, sources))
    free = F.greedy_answers(params, mcfg, prompts, eos_id=34, max_new=6)
    assert free != got and not all(is_span(a, s) for a, s in zip(free, sources))


def test_span_answer_ends_when_eos_has_over_half_the_probability():
    """The end rule on hand-made logits: <eos> (token 0) at p = 0.4 beats every single continuation
    yet the answer goes on; at p = 0.6 it ends; before the first token it ends (no answer) only when
    it beats the summed probability of the source's start tokens (0.4 > 0.25 + 0.0875, not 0.4 >
    0.45 + 0.1375; p = 0.3 beats each start, 0.2 and 0.125, but not their sum); with no continuation
    left it must."""
    def logits_with(p_eos, p_cont):                     # token 0 <eos>, 1 the continuation, 2..5 the rest
        p = np.array([p_eos, p_cont] + [(1 - p_eos - p_cont) / 4] * 4)
        return np.log(p)
    source = [1, 1, 2]
    assert F.pick_token(logits_with(0.4, 0.1), source, [0], 0, started=True) == (1, [1])
    assert F.pick_token(logits_with(0.6, 0.1), source, [0], 0, started=True)[0] == 0
    assert F.pick_token(logits_with(0.4, 0.45), source, range(3), 0, started=False) == (1, [1, 2])
    assert F.pick_token(logits_with(0.4, 0.25), source, range(3), 0, started=False) == (0, [])
    assert F.pick_token(logits_with(0.9, 0.05), source, range(3), 0, started=False) == (0, [])
    assert F.pick_token(logits_with(0.3, 0.2), [1, 2, 3], range(3), 0, started=False) == (1, [1])
    assert F.pick_token(logits_with(0.1, 0.8), source, [3], 0, started=True)[0] == 0


def test_majority_decoding_ends_only_when_eos_has_over_half_the_probability():
    """Free decoding with span decoding's end rule, on hand-made logits (<eos> token 2, token 1 the
    likeliest other, four more): at p(<eos>) = 0.4 the plain argmax ends, majority goes on with the
    best other token; at 0.6 it ends, at the start too (no answer). The best other token keeps its
    vocabulary id when it comes after <eos> (token 4); without a source it may be any token."""
    def logits_with(p_eos, p_cont):
        p = np.array([0.1, p_cont, p_eos] + [(0.9 - p_eos - p_cont) / 3] * 3)
        return np.log(p)
    assert F.pick_token(logits_with(0.4, 0.2), None, None, 2, started=True) == (2, None)
    for started in (False, True):
        assert F.pick_token(logits_with(0.4, 0.2), None, None, 2, started, majority=True) == (1, None)
        assert F.pick_token(logits_with(0.6, 0.2), None, None, 2, started, majority=True) == (2, None)
    beyond = np.log(np.array([0.05, 0.05, 0.45, 0.05, 0.3, 0.1]))          # the best other token: 4
    assert F.pick_token(beyond, None, None, 2, True, majority=True) == (4, None)


def test_majority_decoding_matches_a_brute_force_reference():
    """Batched majority decoding (greedy_answers) and one prompt at a time (stream_answer) against
    a reference on the full forward, float64, untied random head, <eos> = 34: stop when softmax
    gives <eos> over 1/2, else append the argmax of the other tokens. <eos>'s readout is scaled up
    so that answers end at the start, midway and not at all; they differ from plain greedy
    decoding, which stops whenever <eos> is the single best token."""
    mcfg = S3.make_configs("tiny", vocab_size=40, tie_embeddings=False)[0]
    rng = np.random.default_rng(3)
    params = {k: v.astype(np.float64) + rng.normal(0, 0.5, v.shape) for k, v in S3.init_params(mcfg).items()}
    params["head.weight"][:, 34] *= 1.5
    prompts = [[3] + list(rng.integers(3, 40, n)) + [4] for n in (12, 5, 9, 20, 7, 15, 3, 8)]

    def reference(prompt, max_new=6):
        answer = []
        while len(answer) < max_new:
            logits = S3.forward(params, mcfg, np.array([prompt + answer]))[0][0, -1]
            p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            if p[34] > 0.5:
                break
            answer.append(max((t for t in range(40) if t != 34), key=lambda t: logits[t]))
        return answer

    want = [reference(p) for p in prompts]
    assert {len(w) for w in want} >= {0, 5, 6}
    got = F.greedy_answers(params, mcfg, prompts, eos_id=34, max_new=6, batch=3, majority=True)
    assert got == want
    assert [list(F.stream_answer(params, mcfg, p, 34, 6, majority=True)) for p in prompts] == want
    assert F.greedy_answers(params, mcfg, prompts, eos_id=34, max_new=6, batch=3) != want
