"""Stage 6 fits its own training questions: the batch puts the loss on exactly the answer tokens
and <eos> of every pair, pairs longer than the model's training context are trained whole (no
truncation), and a tiny model fine-tuned on a handful of such pairs answers every one of them with
free decoding, with corpus replay off and on."""
import numpy as np
import pytest

from spikelib.stages import load_stage

F = load_stage("6_finetune")
S3 = load_stage("3_spike_llm_numpy")
TK = load_stage("2_tokenizer")

# Four pairs, byte tokens: each prompt (~45 tokens) is longer than the model's training context (16
# here). The contexts end in different words, and the answers sit at their start, far from <a>.
PAIRS = [dict(question="Ada born?", answer="London", context="London saw Ada born; she wrote."),
         dict(question="What runs?", answer="The river", context="The river runs past mills."),
         dict(question="Paris?", answer="France", context="France holds Paris and a tower."),
         dict(question="Tea?", answer="a drink", context="Tea is a drink of leaves, hot.")]


@pytest.fixture(scope="module")
def byte_setup():
    tok = TK.Tokenizer([])                                       # the 8 special and 256 byte tokens
    mcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size, context=16)[0]
    corpus = np.frombuffer(" ".join(p["context"] for p in PAIRS).encode() * 4, np.uint8).astype(np.uint16) + 8
    return tok, mcfg, corpus, [F.encode_pair(tok, p) for p in PAIRS]


def test_batch_loss_mask_is_exactly_the_answer_and_eos(byte_setup):
    """Row b of make_batch: the weighted targets y are the answer's tokens then <eos>, in order,
    read at the positions from <a> on; every other position (question, context, padding) weighs 0."""
    tok, mcfg, _, examples = byte_setup
    assert all(len(p) > mcfg.context for p, _ in examples)      # longer than the training context
    x, y, mask = F.make_batch(examples, pad_id=0)
    for b, (p, a) in enumerate(examples):
        on = np.flatnonzero(mask[b])
        assert list(y[b, on]) == a and a[-1] == tok.eos_id
        assert x[b, on[0]] == tok.token_id("<a>") and list(x[b, :len(p)]) == p
        assert np.all(mask[b, on] == 1.0)


def test_pairs_longer_than_the_context_are_trained_whole(byte_setup):
    """split_pairs keeps every pair up to max_len tokens, whole (the model has no position limit),
    and skips longer ones rather than cutting the question or the answer away."""
    tok, mcfg, _, examples = byte_setup
    cfg = F.FinetuneConfig(eval_questions=4)
    pairs = [dict(p, split=s) for p, s in zip(PAIRS, ("train", "train", "test", "train"))]
    longest = max(len(p) + len(a) for p, a in examples)
    train, test, _ = F.split_pairs(cfg, tok, pairs, "test pairs", longest)
    assert train == [examples[0], examples[1], examples[3]] and test == [pairs[2]]
    train, _, _ = F.split_pairs(cfg, tok, pairs, "test pairs", longest - 1)
    assert all(len(p) + len(a) < longest for p, a in train) and len(train) == 2


def test_the_held_out_questions_are_the_same_in_every_prompt_order(byte_setup):
    """With max_len between a pair's length with the question first and with the question twice,
    question_twice trains without that pair but still scores it: every --prompt_order is scored on
    the same held-out questions (chosen by their length with the question first)."""
    tok, _, _, _ = byte_setup
    once = [sum(map(len, F.encode_pair(tok, p))) for p in PAIRS]
    twice = [sum(map(len, F.encode_pair(tok, p, "question_twice"))) for p in PAIRS]
    max_len = max(once)
    assert max(twice) > max_len >= min(twice)                 # some held-out pairs fit only once
    shortest = PAIRS[int(np.argmin(twice))]                   # a training pair every order can train on
    pairs = [dict(p, split="test") for p in PAIRS] + [dict(shortest, split="train")]
    tests = {}
    for order in F.PROMPT_ORDERS:
        cfg = F.FinetuneConfig(eval_questions=4, prompt_order=order)
        train, tests[order], _ = F.split_pairs(cfg, tok, pairs, "test pairs", max_len)
        assert sorted(p["question"] for p in tests[order]) == sorted(p["question"] for p in PAIRS)
    assert tests["question_twice"] == tests["question_first"] == tests["context_first"]
    assert len(train) == 1


@pytest.mark.parametrize("replay", [0.0, 0.5])
def test_tiny_model_answers_all_its_training_questions(byte_setup, replay):
    """Full fine-tuning from a random tiny model on the four pairs: greedy free decoding then gives
    every training answer exactly, with replay (its windows in the same batches) and without.
    The settings reach 4/4 for init seeds 0..3 (replay off and on); a loss mask shifted by one token
    fails."""
    tok, mcfg, corpus, examples = byte_setup
    params = S3.init_params(mcfg, 0)
    cfg = F.FinetuneConfig(method="full", lr=1e-2, max_steps=200, warmup=5, batch_size=4, replay=replay)
    _, losses, _ = F.finetune(params, mcfg, cfg, examples, F.numpy_backend(mcfg), False,
                              corpus if replay else None)
    scores = F.qa_scores(params, mcfg, tok, PAIRS, max_new=12, decode="free")
    assert scores["answers"] == [p["answer"] for p in PAIRS], scores["answers"]
    assert scores["em"] == 1.0 and np.mean(losses[-5:]) < 0.1 * losses[0]


def test_memory_note_warns_when_prompts_outlast_the_slowest_head(capsys):
    """small: 4 heads, decays 1 - 2^-(1 + 1.5 h), the slowest remembers 2^5.5 ~ 45 positions. A median
    prompt of 100 tokens gets the note; one of 40 does not."""
    mcfg = S3.make_configs("small")[0]
    F.memory_note(mcfg, [([0] * 100, [1])] * 3)
    assert "remembers about 45 positions" in capsys.readouterr().out
    F.memory_note(mcfg, [([0] * 40, [1])] * 3)
    assert capsys.readouterr().out == ""
