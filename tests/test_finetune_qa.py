"""Stage 6, question answering as SQuAD 2.0 poses it: unanswerable and widened generated pairs,
the SQuAD JSON reader, SQuAD 2.0 scoring, replay batches against a per-sequence reference, and
LoRA leaving the base bit-identical."""
import json
import math
import os
import re
import signal
from dataclasses import replace

import numpy as np
import pytest

from spikelib.checkpoint import load_checkpoint
from spikelib.finetune_io import normalize
from spikelib.qa_data import (PART_CHARS, FreshDrills, corpus_text, documents, fresh_drills, generate_qa,
                               sentences, write_qa)
from spikelib.stages import load_stage

F = load_stage("6_finetune")
S3 = load_stage("3_spike_llm_numpy")
TK = load_stage("2_tokenizer")

ARTICLES = ["Module alpha\n\nThe alpha module is a small library for parsing numbers. "
            "It reads digits from text and returns integers to the caller who asked for them. "
            "Paris is a city in France and the capital.",
            "Module beta\n\nThe beta module is a large toolkit for drawing shapes on screens. "
            "Each shape keeps its colour and position in a record of plain numbers. "
            "Ada Lovelace was born in London, England."]
CORPUS = "\n\n\n".join(ARTICLES)

# ----------------------------------------------------------------------------- generation


def test_unanswerable_pairs_ask_a_question_of_another_articles_context():
    """no_answer=1: every answerable question comes again with another article's context that does
    not hold its answer, answer "" (kind none), in the same split as its answerable twin."""
    pairs = generate_qa(CORPUS, no_answer=1.0, test_fraction=0.5)
    assert pairs == generate_qa(CORPUS, no_answer=1.0, test_fraction=0.5)             # deterministic
    has = {p["question"]: p for p in pairs if p["kind"] != "none"}
    none = [p for p in pairs if p["kind"] == "none"]
    assert len(has) >= 4 and len(none) == len(has)
    for p in none:
        twin = has[p["question"]]
        assert p["answer"] == "" and p["is_impossible"] and p["split"] == twin["split"]
        assert p["context"] in {q["context"] for q in has.values() if q["article"] != twin["article"]}
        assert normalize(twin["answer"]) not in normalize(p["context"])
    assert not [p for p in generate_qa(CORPUS, no_answer=0.0) if p["kind"] == "none"]


def test_widened_contexts_hold_the_answer_at_varying_places():
    """context_chars widens each context with the text around it, up to the limit, whole words,
    the answer still inside, and the rule's sentence not always first."""
    narrow = {p["question"]: p for p in generate_qa(CORPUS)}
    wide = {p["question"]: p for p in generate_qa(CORPUS, context_chars=200)}
    assert set(wide) == set(narrow)
    starts = set()
    for q, p in wide.items():
        core = " ".join(narrow[q]["context"].split())
        flat = " ".join(p["context"].split())
        assert p["answer"] in p["context"] and core in flat, (q, p["context"])
        assert len(p["context"]) <= max(200, len(narrow[q]["context"]))
        assert all(w in CORPUS for w in flat.split()[:1] + flat.split()[-1:])   # whole words at both ends
        starts.add(flat.index(core) > 0)
    assert starts == {True, False}
    assert any(len(p["context"]) > len(narrow[q]["context"]) + 40 for q, p in wide.items())


DRILLS = "\n\n\n".join(f"Module m{a}\n\n" + " ".join(
    f"The m{a} part {i} keeps w{a}{i}a w{a}{i}b w{a}{i}c w{a}{i}d and w{a}{i}e in its own plain order."
    for i in range(12)) for a in range(3))


def test_copy_drills_add_training_questions_and_keep_the_held_out_set():
    """copies=4: the pairs of copies=1 unchanged and first, then training-only 'What follows'
    questions at other places of the sentences, never of a sentence that holds a held-out question."""
    one = generate_qa(DRILLS, test_fraction=0.3, no_answer=0.2)
    four = generate_qa(DRILLS, test_fraction=0.3, no_answer=0.2, copies=4)
    assert four[:len(one)] == one and four == generate_qa(DRILLS, test_fraction=0.3, no_answer=0.2, copies=4)
    drills = four[len(one):]
    answerable = [p for p in drills if p["kind"] == "next"]
    assert {p["kind"] for p in drills} == {"next", "none"} and {p["split"] for p in drills} == {"train"}
    assert len(answerable) > 2 * len([p for p in one if p["kind"] == "next" and p["split"] == "train"])
    assert not {p["question"] for p in answerable} & {p["question"] for p in one}
    held = {p["context"] for p in one if p["split"] == "test" and p["kind"] != "none"}
    assert held and all(p["answer"] in p["context"] and p["context"] not in held for p in answerable)
    wide = generate_qa(DRILLS, test_fraction=0.3, no_answer=0.2, context_chars=150, copies=4)[len(one):]
    assert [p["question"] for p in wide] == [p["question"] for p in drills]          # widened as the others
    assert all(p["context"] in q["context"] for p, q in zip(answerable, wide))
    widened = [len(q["context"]) > len(p["context"]) + 40 for p, q in zip(answerable, wide)]
    assert sum(widened) > len(answerable) / 2


def test_fresh_drills_are_new_copy_questions_never_about_a_held_out_sentence():
    """FreshDrills: every pair a 'What follows' question whose cue and answer follow each other in
    its context, or (a no_answer share) the same question of another article's context with no
    answer; the draws of one seed repeat, and 400 of them hold far more questions than the fixed
    drills of copies=4; no cue or answer is ever taken from a sentence of a held-out question."""
    fixed = generate_qa(DRILLS, test_fraction=0.3, copies=4)
    held = {p["context"] for p in generate_qa(DRILLS, test_fraction=0.3) if p["split"] == "test"}
    free = [t for para in DRILLS.split("\n\n") for t in sentences(para) if t not in held]
    assert held and free
    drills = FreshDrills(DRILLS, test_fraction=0.3, context_chars=150, no_answer=0.3)
    draws = [drills.draw(np.random.default_rng(1)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(0)
    fresh = [drills.draw(rng) for _ in range(400)]
    answerable = [p for p in fresh if p["kind"] == "next"]
    none = [p for p in fresh if p["kind"] == "none"]
    assert {p["split"] for p in fresh} == {"train"} and len(answerable) + len(none) == 400
    assert 0.2 < len(none) / 400 < 0.4
    for p in answerable:
        cue = p["question"].removeprefix('What follows "').removesuffix('"?')
        assert f"{cue} {p['answer']}" in p["context"], p
        assert any(f"{cue} {p['answer']}" in t for t in free), p              # not a held-out sentence
    for p in none:                                     # "Module mA": the context holds no word of mA
        assert p["answer"] == "" and p["article"][-1] not in "".join(re.findall(r"\bm(\d)\b", p["context"]))
    questions = {p["question"] for p in answerable}
    assert len(questions) > 1.5 * len({p["question"] for p in fixed if p["kind"] == "next"})
    assert len({p["context"] for p in answerable}) > len(questions)        # one question, other offsets


def test_fresh_drills_that_find_no_question_say_so_instead_of_searching_forever():
    """Sentences of 8 to 40 words whose every cue holds a quote give no copy question: draw is a
    ValueError, not an endless redraw."""
    quoted = "\n\n\n".join(f"Module m{a}\n\n" + " ".join(f'"w{a}{i}"' for i in range(12)) + "."
                             for a in range(3))
    drills = FreshDrills(quoted, test_fraction=0.0)
    with pytest.raises(ValueError, match="gave no copy question"):
        drills.draw(np.random.default_rng(0))


def test_fresh_pairs_fit_max_len_or_fail_before_training(tmp_path):
    """stage 6's fresh_pairs: every draw fits max_len; a max_len no draw fits is a ValueError when
    it is built, before any training step."""
    (tmp_path / "train.txt").write_text(DRILLS, encoding="utf-8")
    tok, mcfg = TK.Tokenizer([]), S3.make_configs("tiny")[0]
    cfg = F.FinetuneConfig(fresh_copies=0.5, context_chars=150, test_fraction=0.3)
    draw = F.fresh_pairs(cfg, tmp_path, mcfg, tok, max_len=400)
    rng = np.random.default_rng(0)
    assert all(len(p) + len(a) <= 400 for p, a in (draw(rng) for _ in range(50)))
    with pytest.raises(ValueError, match="longer than max_len=20"):
        F.fresh_pairs(cfg, tmp_path, mcfg, tok, max_len=20)


def test_a_single_file_corpus_is_cut_into_parts_that_give_every_kind_of_question(tmp_path):
    """A single-file dataset (stage 1 records no doc_separator) is cut at paragraphs into parts of
    about PART_CHARS characters, which together are its text; its generated pairs include copy,
    speaker and no-answer questions, and fresh drills draw from it (split at whitespace instead,
    it gave no pair at all)."""
    speech = "{0}:\nThe {1} and {2} of our good {3} shall come to {4} before the night is over.\n\n"
    text = "".join(speech.format(["ROMEO", "JULIET", "NURSE"][i % 3], *(f"w{i}{k}" for k in "abcd"))
                   for i in range(400)).strip()
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    (tmp_path / "meta.json").write_text(json.dumps({"doc_separator": None}))
    parts = documents(*corpus_text(tmp_path))
    assert "\n\n".join(parts) == text and len(parts) == math.ceil(len(text) / PART_CHARS) > 1
    assert all(len(part) >= PART_CHARS for part in parts[:-1])
    _, pairs = write_qa(tmp_path, F.FinetuneConfig(context_chars=150, no_answer=0.2), 64)
    kinds = {p["kind"] for p in pairs}
    assert {"next", "speaker", "none"} <= kinds, kinds
    assert all(normalize(p["answer"]) in normalize(p["context"]) for p in pairs if p["answer"])
    drills = fresh_drills(tmp_path, F.FinetuneConfig(no_answer=0.3), 64)
    assert {drills.draw(np.random.default_rng(i))["kind"] for i in range(40)} == {"next", "none"}


def test_qa_dir_gives_the_pairs_and_fresh_drills_of_its_own_text(tmp_path, monkeypatch):
    """--qa DIR: a run's generated pairs and fresh drills come from DIR's train.txt (the pairs
    written to DIR/qa.jsonl, which its results name), not from the base's corpus; without --qa both
    come from the base's corpus; a DIR without train.txt is a FileNotFoundError naming --qa."""
    own, other = tmp_path / "own", tmp_path / "other"
    for d, text in ((own, CORPUS), (other, DRILLS)):
        d.mkdir()
        (d / "train.txt").write_text(text, encoding="utf-8")
    tok = TK.Tokenizer([])                             # bytes: the base's corpus is own/
    tok.save(own / "tokenizer.json")
    info = {"path": str(own / "tokenizer.json"), "sha256": tok.sha256(), "vocab_size": tok.vocab_size}
    mcfg, tcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size)
    base = S3.save_model(tmp_path / "base.npz", S3.init_params(mcfg, 0), mcfg, tcfg, 0, None, info)
    split_pairs, fresh_drills = F.split_pairs, F.fresh_drills
    for qa, text, wrote in (("", CORPUS, own), (str(other), DRILLS, other)):
        scored, read = [], []
        monkeypatch.setattr(F, "split_pairs", lambda cfg, tok, pairs, *a: scored.append(pairs)
                            or split_pairs(cfg, tok, pairs, *a))
        monkeypatch.setattr(F, "fresh_drills", lambda d, *a: read.append(d) or fresh_drills(d, *a))
        cfg = F.FinetuneConfig(base=str(base), out_dir=str(tmp_path / "out"), qa=qa, method="full",
                               max_steps=1, batch_size=2, fresh_copies=0.5, context_chars=150,
                               test_fraction=0.3, max_len=400, eval_questions=4, max_answer_tokens=2)
        row = F.run(cfg, progress=False)
        assert row["qa"] == str(wrote / "qa.jsonl") and (wrote / "qa.jsonl").is_file()
        assert read == [str(wrote)]
        assert scored[0] and all(p["context"] in " ".join(text.split()) for p in scored[0] if p["answer"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"--qa {tmp_path / 'empty'} has no train.txt"):
        F.run(replace(cfg, qa=str(tmp_path / "empty")), progress=False)


def test_no_answer_is_eos_at_once():
    tok = TK.Tokenizer([])
    prompt, answer = F.encode_pair(tok, {"question": "Q?", "answer": "", "context": "C."})
    assert answer == [tok.eos_id] and prompt[0] == tok.token_id("<q>") and prompt[-1] == tok.token_id("<a>")
    assert tok.decode(prompt[1:-1]) == "Q?\nC."                                    # question first
    assert tok.decode(F.prompt_ids(tok, "Q?", "C.", "context_first")[1:-1]) == "C.\nQ?"
    assert tok.decode(F.prompt_ids(tok, "Q?", "C.", "question_twice")[1:-1]) == "Q?\nC.\nQ?"
    assert tok.decode(F.prompt_ids(tok, "Q?", "", "question_twice")[1:-1]) == "Q?"     # no context: once

# ----------------------------------------------------------------------------- SQuAD files

SQUAD = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [
    {"context": "Paris is in France. Rome is in Italy.",
     "qas": [{"id": "a1", "question": "Where is Paris?",
              "answers": [{"text": "France", "answer_start": 12}, {"text": "in France", "answer_start": 9}]},
             {"id": "a2", "question": "Where is Oslo?", "answers": [], "is_impossible": True,
              "plausible_answers": [{"text": "Italy", "answer_start": 32}]}]}]}]}


def test_squad_json_v1_and_v2_read(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD, indent=2))
    pairs = F.read_qa(path, test_fraction=0.0)
    assert [(p["question"], p["answer"], p["answers"], p["is_impossible"], p["split"]) for p in pairs] == [
        ("Where is Paris?", "France", ["France", "in France"], False, "train"),
        ("Where is Oslo?", "", [""], True, "train")]                    # plausible answers are not golds
    assert all(p["context"] == SQUAD["data"][0]["paragraphs"][0]["context"] for p in pairs)
    v1 = {"version": "1.1", "data": [dict(SQUAD["data"][0], paragraphs=[
        dict(SQUAD["data"][0]["paragraphs"][0], qas=SQUAD["data"][0]["paragraphs"][0]["qas"][:1])])]}
    path.write_text(json.dumps(v1))                                        # one line, no is_impossible
    assert [p["answers"] for p in F.read_qa(path)] == [["France", "in France"]]


@pytest.mark.parametrize("edit, where", [
    (lambda d: d.pop("data"), "data must be a list"),
    (lambda d: d["data"][0].update(paragraphs={}), "data[0].paragraphs must be a list"),
    (lambda d: d["data"][0]["paragraphs"][0].update(context=7), "data[0].paragraphs[0].context must be"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("question"), "qas[0].question must be"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][1].update(text=3),
     "qas[0].answers[1].text"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(is_impossible="yes"), "qas[1].is_impossible"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[]), "qas[0].answers is empty"),
])
def test_malformed_squad_names_the_bad_place(tmp_path, edit, where):
    doc = json.loads(json.dumps(SQUAD))
    edit(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc, indent=1))
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        F.read_qa(path)
    path.write_text(json.dumps(SQUAD, indent=1)[:-5])                      # truncated
    with pytest.raises(ValueError, match="not valid JSON"):
        F.read_qa(path)

# ----------------------------------------------------------------------------- SQuAD 2.0 scores


def test_squad2_scores_split_answerable_and_unanswerable(monkeypatch):
    """Answers fed in by hand: no answer counts only where there is none, the best gold counts, EM
    and F1 split by has/none, and EM's standard error is sqrt(p (1 - p) / n)."""
    tok = TK.Tokenizer([])
    pairs = [{"question": "a", "answer": "France", "answers": ["France", "in France"], "context": "x"},
             {"question": "b", "answer": "the red car", "context": "x"},
             {"question": "c", "answer": "", "context": "x"},
             {"question": "d", "answer": "", "context": "x"},
             {"question": "e", "answer": "Paris", "context": "x"}]
    said = ["in France!", "red bus", "", "Paris", ""]          # EM 1, 0 (F1 1/2), 1, 0, 0 (no answer: wrong)
    monkeypatch.setattr(F, "greedy_answers", lambda *a, **k: [tok.encode(s) for s in said])
    r = F.qa_scores(None, None, tok, pairs)
    assert r["answers"] == said and r["n"] == 5
    assert r["em"] == pytest.approx(2 / 5) and r["f1"] == pytest.approx((1 + 0.5 + 1) / 5)
    assert (r["em_has"], r["n_has"], r["em_none"], r["n_none"]) == (pytest.approx(1 / 3), 3, 0.5, 2)
    assert r["f1_has"] == pytest.approx(1.5 / 3)
    assert r["em_se"] == pytest.approx(np.sqrt(0.4 * 0.6 / 5))
    assert F.matches_by_kind(pairs, said) == {"-": [2, 5]}

# ----------------------------------------------------------------------------- replay and LoRA


@pytest.fixture(scope="module")
def tiny():
    tok = TK.Tokenizer([])
    mcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size)[0]
    corpus = np.frombuffer(CORPUS.encode() * 4, np.uint8).astype(np.uint16) + 8      # byte ids
    pairs = [p for p in generate_qa(CORPUS, no_answer=0.5)]
    return tok, mcfg, corpus, [F.encode_pair(tok, p) for p in pairs]


def test_replay_batch_loss_weighs_answer_tokens_and_windows_as_the_mean_pair(tiny):
    """A batch of Q&A pairs and replayed corpus windows: its loss equals, from each sequence scored
    alone by stage 3's forward, (sum of the answer tokens' losses + n_a x each window's mean loss)
    / (answer tokens + n_a x windows), n_a the mean answer length: every answer token counts once
    and a window as much as a mean pair. The windows are pieces of the corpus."""
    tok, mcfg, corpus, examples = tiny
    params = S3.init_params(mcfg, 0)
    windows = F.replay_windows(corpus, 3, mcfg.context, np.random.default_rng(0))
    text = corpus.tobytes()
    assert all(np.asarray(p + a, np.uint16).tobytes() in text and len(a) == mcfg.context for p, a in windows)
    batch = examples[:4] + windows
    x, y, mask = F.make_batch(batch, pad_id=0, windows=3)
    loss = F.masked_cross_entropy(S3.forward(params, mcfg, x)[0], y, mask)[0]
    each = []
    for p, a in batch:
        seq = np.array([p + a])
        logits = S3.forward(params, mcfg, seq[:, :-1])[0][0]                 # (L, V)
        z = logits - logits.max(-1, keepdims=True)
        nll = np.log(np.exp(z).sum(-1)) - z[np.arange(len(z)), seq[0, 1:]]
        each.append(nll[len(p) - 1:])
    n_a = np.mean([len(a) for _, a in examples[:4]])
    total = sum(e.sum() for e in each[:4]) + n_a * sum(e.mean() for e in each[4:])
    assert loss == pytest.approx(total / (sum(len(e) for e in each[:4]) + 3 * n_a), rel=1e-5)


def test_undecided_model_is_pushed_to_the_no_answer_share_not_to_empty_answers():
    """At <a>, a model that cannot yet tell answerable from unanswerable questions should learn
    p(<eos>) = the share of unanswerable pairs (here 1 in 5), so that it still starts answers. The
    masked loss's gradient on the <eos> logit there, summed over the batch, must vanish at p(<eos>)
    = 1/5 and push down from 1/2. (Weighing each pair 1 / its length gave the lone <eos> of a
    no-answer pair the weight of a whole answer: its optimum was p(<eos>) ~ 1/2, every answer empty.)"""
    tok = TK.Tokenizer([])
    answers = ("one two", "three", "four five", "six", "")
    pairs = [{"question": "Q?", "context": "C.", "answer": a} for a in answers]
    examples = [F.encode_pair(tok, p) for p in pairs]
    assert max(len(a) for _, a in examples) >= 3                # answers of several tokens, and one <eos>
    x, y, mask = F.make_batch(examples, pad_id=0)
    first = [len(p) - 1 for p, _ in examples]                    # the position that reads <a>
    V = tok.vocab_size
    for p_eos, sign in ((0.2, 0), (0.5, 1)):
        logits = np.zeros(x.shape + (V,))
        for b, t in enumerate(first):                             # same p(<eos>) at <a> for every pair
            logits[b, t, tok.eos_id] = np.log(p_eos * (V - 1) / (1 - p_eos))
        dlogits = F.masked_cross_entropy(logits, y, mask)[1]
        g = sum(dlogits[b, t, tok.eos_id] for b, t in enumerate(first))
        assert (g == pytest.approx(0, abs=1e-9)) if sign == 0 else g > 1e-3, (p_eos, g)


def test_fresh_pairs_take_their_share_of_each_batch(tiny):
    """--fresh_copies 0.5 at batch 4: each step's batch is 2 pairs of the training set, then 2 drawn
    by `fresh` from that step's generator, then the replay windows; at 0 the batch is as before."""
    tok, mcfg, corpus, examples = tiny
    seen = []

    def grad_fn(params, x, y, mask):
        seen.append(x[:, 0].copy())
        return 1.0, {n: np.zeros_like(v) for n, v in params.items()}

    def fresh(rng):
        return [int(rng.integers(200, 250))], [7]
    cfg = F.FinetuneConfig(method="full", max_steps=3, batch_size=4, replay=0.5, fresh_copies=0.5)
    F.finetune(S3.init_params(mcfg, 0), mcfg, cfg, examples, grad_fn, False, corpus, fresh)
    for step, first in enumerate(seen):
        pick = S3.batch_rng(0, step).integers(0, len(examples), 2)
        drawn = S3.batch_rng(2, step).integers(200, 250, 2)
        windows = F.replay_windows(corpus, 2, mcfg.context, S3.batch_rng(1, step))
        assert list(first) == [examples[i][0][0] for i in pick] + list(drawn) + [w[0] for w, _ in windows]
    seen.clear()
    F.finetune(S3.init_params(mcfg, 0), mcfg, F.FinetuneConfig(method="full", max_steps=1, batch_size=4),
               examples, grad_fn, False, None, fresh)
    assert list(seen[0]) == [examples[i][0][0] for i in S3.batch_rng(0, 0).integers(0, len(examples), 4)]


def test_lora_with_replay_leaves_the_base_bit_identical(tiny):
    """LoRA fine-tuning (with replay) trains adapters only: every base array is bit-identical
    afterwards, so the base with the adapters removed is the original model. The role tokens'
    embedding rows train too (--lora_tokens), as deltas beside the base's rows."""
    tok, mcfg, corpus, examples = tiny
    params = S3.init_params(mcfg, 0)
    before = {k: v.copy() for k, v in params.items()}
    cfg = F.FinetuneConfig(method="lora", max_steps=3, warmup=1, batch_size=4, replay=0.5,
                           lora_tokens="<q>,<a>,<eos>")
    trainable, _, _ = F.finetune(params, mcfg, cfg, examples, F.numpy_backend(mcfg), False, corpus)
    assert all(np.abs(v).sum() > 0 for k, v in trainable.items() if k.endswith(".A"))     # adapters moved
    rows = [k for k in trainable if k.startswith("embed.weight.row.")]
    assert len(rows) == 3 and all(np.abs(trainable[k]).sum() > 0 for k in rows)           # rows moved
    assert set(params) == set(before)
    for k in params:
        assert params[k].tobytes() == before[k].tobytes(), k
    tuned = F.apply_lora(params, trainable, cfg.lora_alpha / cfg.lora_rank)
    assert any(not np.array_equal(tuned[k], before[k]) for k in params)
    for k in params:
        assert params[k].tobytes() == before[k].tobytes(), k


@pytest.mark.parametrize("method", ["full", "lora"])
def test_accumulated_micro_batches_equal_the_whole_batch(tiny, method):
    """--grad_accum 3 splits a batch (Q&A pairs of several lengths and replay windows) into three
    micro-batches, each cut after its last weighted column; weighing each by its share of the
    batch's loss weights gives the whole batch's loss and gradients (float64, to 1e-10)."""
    tok, mcfg, corpus, examples = tiny
    params = S3.init_params(mcfg, 0, dtype=np.float64)
    windows = F.replay_windows(corpus, 2, mcfg.context, np.random.default_rng(0))
    qa = sorted(examples[:40], key=lambda e: len(e[0]) + len(e[1]))[::8]      # 5 pairs, shortest first
    x, y, mask = F.make_batch(qa + windows, pad_id=0, windows=2)
    ends = [np.nonzero(mask[r].any(0))[0][-1] + 1 for r in np.array_split(np.arange(len(x)), 3)]
    assert min(ends) < x.shape[1]                                     # a micro-batch is cut short
    grad_fn = F.numpy_backend(mcfg)
    whole_cfg = F.FinetuneConfig(method=method, batch_size=5)
    trainable = F.trainable_params(params, whole_cfg, mcfg)
    if method == "lora":                                              # B = 0 at init: move it
        rng = np.random.default_rng(1)
        trainable = {n: v + 0.1 * rng.standard_normal(v.shape) for n, v in trainable.items()}
    whole = F.accumulated_grads(params, trainable, whole_cfg, grad_fn, x, y, mask)
    parts_cfg = F.FinetuneConfig(method=method, batch_size=5, grad_accum=3)
    parts = F.accumulated_grads(params, trainable, parts_cfg, grad_fn, x, y, mask)
    assert parts[0] == pytest.approx(whole[0], rel=1e-10)
    for n in whole[1]:
        np.testing.assert_allclose(parts[1][n], whole[1][n], rtol=1e-9, atol=1e-12, err_msg=n)


def test_grad_accum_is_checked_against_the_batch():
    with pytest.raises(ValueError, match="--grad_accum must be >= 1, got 0"):
        F.FinetuneConfig(grad_accum=0)
    with pytest.raises(ValueError, match="--grad_accum 5 is more micro-batches than --batch_size 4"):
        F.FinetuneConfig(batch_size=4, grad_accum=5)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("stop", ["ctrl-c", "crash"])
@pytest.mark.parametrize("backend", ["numpy", "mlx", "triton"])
def test_a_resumed_run_ends_where_an_unstopped_one_does(tiny, tmp_path, method, stop, backend):
    """A run stopped during step 3 (ctrl-c: a SIGINT from inside the backend; the step finishes
    and is saved) or killed there (crash: the state of step 2, saved by --save_interval 2), then
    continued with --resume 1, ends with the same trained arrays, bit for bit, and the same
    losses as a run that never stopped. mlx: stage 4's model; triton: stage 5's (Triton kernels
    on a GPU)."""
    if backend != "numpy":
        pytest.importorskip({"mlx": "mlx.core", "triton": "torch"}[backend])
    tok, mcfg, corpus, examples = tiny
    cfg = F.FinetuneConfig(method=method, max_steps=6, warmup=1, batch_size=4, replay=0.5, lr=1e-2,
                           save_interval=2)
    grad_fn = F.BACKEND[backend](mcfg)
    want, want_losses, _ = F.finetune(S3.init_params(mcfg, 0), mcfg, cfg, examples, grad_fn, False, corpus)
    calls = []

    def stopping(p, x, y, mask):
        calls.append(len(calls))
        if len(calls) == 3 and stop == "ctrl-c":
            os.kill(os.getpid(), signal.SIGINT)         # the handler only asks the loop to stop
        if len(calls) == 3 and stop == "crash":
            raise RuntimeError("the machine went away")
        return grad_fn(p, x, y, mask)

    state = tmp_path / "lora.state.npz"
    with pytest.raises(KeyboardInterrupt if stop == "ctrl-c" else RuntimeError):
        F.finetune(S3.init_params(mcfg, 0), mcfg, cfg, examples, stopping, False, corpus, state=state)
    assert load_checkpoint(state)[1]["step"] == (3 if stop == "ctrl-c" else 2)
    got, got_losses, _ = F.finetune(S3.init_params(mcfg, 0), mcfg, replace(cfg, resume=True), examples,
                                    grad_fn, False, corpus, state=state)
    assert got_losses == want_losses and len(got_losses) == 6
    assert set(got) == set(want)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k
    with pytest.raises(ValueError, match="was saved with --lr 0.01, not 0.02"):
        F.finetune(S3.init_params(mcfg, 0), mcfg, replace(cfg, resume=True, lr=2e-2), examples, grad_fn,
                   False, corpus, state=state)
