"""Stage 6's scoring readers: greedy_answers batches prompts by length and reads the tokens a batch
shares in one call, yet gives every prompt the answer of its own token-by-token decoding with stage
3's recurrent form; stage 5's TorchReader (torch ops on a CPU, float32) reads the same logits as
stage 3's NumpyReader, prefill and single steps, and gives the same answers and validation BPC."""
import numpy as np
import pytest

from spikelib.stages import load_stage

torch = pytest.importorskip("torch")
from stage5 import load_stage5  # noqa: E402

load_stage5()            # as stage 5's tests load it (Triton interpreted without a GPU): TorchReader
F = load_stage("6_finetune")
S3 = load_stage("3_spike_llm_numpy")
TK = load_stage("2_tokenizer")
EOS = 34                     # plays <eos>: it sits in some sources, so a span may run into it
LENGTHS = (7, 3, 12, 1, 5, 9, 3, 15, 6, 2, 11)     # unsorted, repeated, a one-token prompt


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def random_model(seed, dtype=np.float64):
    """The tiny preset with an untied head, its weights pushed well away from init so that answers
    vary in length and content."""
    mcfg = S3.make_configs("tiny", vocab_size=40, tie_embeddings=False)[0]
    rng = np.random.default_rng(seed)
    params = {k: (v + rng.normal(0, 1.0, v.shape)).astype(dtype) for k, v in S3.init_params(mcfg).items()}
    return params, mcfg


def prompts_and_sources(seed):
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, 40, n)] for n in LENGTHS]
    sources = [p[len(p) // 3:] + [EOS] if i % 3 else None for i, p in enumerate(prompts)]   # some free
    return prompts, sources


def reference(params, mcfg, prompt, max_new, source):
    """One prompt alone, a decode_step per token: the prompt, then each pick fed back until <eos>."""
    state = S3.init_decode_state(mcfg, 1, np.float64)
    for t in prompt:
        logits = S3.decode_step(params, mcfg, state, [t])[0]                # (V,)
    answer, nexts = [], range(len(source)) if source else None
    while True:
        token, nexts = F.pick_token(logits, source, nexts, EOS, bool(answer))
        if token == EOS or len(answer) >= max_new:
            return answer
        answer.append(token)
        logits = S3.decode_step(params, mcfg, state, [token])[0]


class RecordingReader(F.NumpyReader):
    """Stage 3's reader, noting each start and the shape of every ids it reads."""
    calls = []

    def start(self, batch):
        self.calls.append("start")
        return super().start(batch)

    def read(self, state, ids):
        self.calls.append(ids.shape)
        return super().read(state, ids)


@pytest.mark.parametrize("span", [False, True])
def test_sorted_batches_give_each_prompts_own_answer(span):
    """Batches of 3 among 11 prompts of lengths 1..15 (four batches), span and free decoding, float64:
    the same answers, in the order given, as each prompt decoded alone. Each batch holds prompts
    next to each other in length order and opens with one read of its shortest prompt, (B, m);
    every other read is one position, (B, 1)."""
    params, mcfg = random_model(0)
    prompts, sources = prompts_and_sources(0)
    sources = sources if span else None
    want = [reference(params, mcfg, p, 6, s) for p, s in zip(prompts, sources or [None] * len(prompts))]
    assert len({len(w) for w in want}) >= 3 and len({tuple(w) for w in want}) >= 6     # varied answers
    RecordingReader.calls = []
    got = F.greedy_answers(params, mcfg, prompts, EOS, max_new=6, batch=3, sources=sources,
                           reader=RecordingReader)
    assert got == want
    calls, by_length = RecordingReader.calls, sorted(LENGTHS)
    prefills = [calls[i + 1] for i, c in enumerate(calls) if c == "start"]
    assert prefills == [(len(by_length[s:s + 3]), by_length[s]) for s in range(0, len(LENGTHS), 3)]
    assert all(c[1] == 1 for i, c in enumerate(calls) if c != "start" and calls[i - 1] != "start")


def test_torch_reader_reads_numpy_readers_logits():
    """Stage 5 (float32, torch ops) against stage 3 (float64), same parameters: a prefill of 7
    tokens, then 5 single steps, each within 1e-4 of the largest logit."""
    params, mcfg = random_model(1, np.float32)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    ids = np.random.default_rng(1).integers(0, 40, (3, 12))
    numpy_reader, torch_reader = F.NumpyReader(p64, mcfg), F.TorchReader(params, mcfg)
    s3, s5 = numpy_reader.start(3), torch_reader.start(3)
    assert rel(torch_reader.read(s5, ids[:, :7]), numpy_reader.read(s3, ids[:, :7])) < 1e-4
    for j in range(7, 12):
        assert rel(torch_reader.read(s5, ids[:, j:j + 1]), numpy_reader.read(s3, ids[:, j:j + 1])) < 1e-4


@pytest.mark.parametrize("decode", F.DECODINGS)
def test_torch_reader_gives_the_same_answers(decode):
    """greedy_answers with stage 5's reader (float32) equals stage 3's (float64), every decoding."""
    params, mcfg = random_model(2, np.float32)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    prompts, sources = prompts_and_sources(2)
    sources = sources if decode == "span" else None
    majority = decode == "majority"
    want = F.greedy_answers(p64, mcfg, prompts, EOS, max_new=6, batch=4, sources=sources, majority=majority)
    got = F.greedy_answers(params, mcfg, prompts, EOS, max_new=6, batch=4, sources=sources,
                           reader=F.TorchReader, majority=majority)
    assert got == want and any(want)


def test_torch_reader_scores_validation_text_as_numpy():
    """val_bpc's figures from stage 5's parallel form equal stage 3's (relative 1e-5), byte tokens."""
    tok = TK.Tokenizer([])
    mcfg = S3.make_configs("tiny", vocab_size=tok.vocab_size, context=16)[0]
    params = S3.init_params(mcfg, 3)
    val = np.random.default_rng(3).integers(8 + 97, 8 + 123, 100)        # lower-case letters
    want = F.NumpyReader(params, mcfg).eval_report(val, len(val), tok.decode)["bpc"]
    got = F.TorchReader(params, mcfg).eval_report(val, len(val), tok.decode)["bpc"]
    assert got == pytest.approx(want, rel=1e-5) and want > 0
