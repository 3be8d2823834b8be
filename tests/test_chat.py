"""Stage 8: a conversation carried turn to turn equals one parallel pass over the whole transcript.

The reference is stage 3's parallel form in float64 (the training form, which never sees a state)
run on each conversation's concatenated transcript. Backends: numpy (stage 3's recurrent form),
mlx (stage 4), triton (stage 5 with torch kernels, and with its Triton kernels in Triton's
interpreter, set while stage 5 is imported as tests/test_triton.py does). Tolerance: logits within
1e-4 of the largest reference logit (float32 backends against float64; a spike flipped by
round-off would move a logit by far more).
"""

import numpy as np
import pytest

from spikelib.stages import load_stage

S3 = load_stage("3_spike_llm_numpy")
TK = load_stage("2_tokenizer")
torch = pytest.importorskip("torch")
from stage5 import load_stage5  # noqa: E402
S5 = load_stage5()
C8 = load_stage("8_chat")
HAS_TRITON = S5.triton is not None and (torch.cuda.is_available() or
                                        S5.neuron_fwd_kernel.__class__.__name__ == "InterpretedFunction")
TOL = 1e-4

BACKENDS = ["numpy", pytest.param("mlx", marks=pytest.mark.skipif(
                not __import__("importlib").util.find_spec("mlx"), reason="needs mlx")),
            "torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs Triton"))]


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Triton also reads TRITON_INTERPRET while running interpreted kernels: set it per test."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


TOKENIZER = TK.Tokenizer([])                      # byte level: 264 ids, the role tokens among them


def tiny(seed=3, token_shift=False):
    """The tiny preset (context 32) with the byte tokenizer's vocabulary and perturbed parameters
    (norm gains away from 1, so a bug in any of them shows)."""
    mcfg = S3.make_configs("tiny", vocab_size=TOKENIZER.vocab_size, token_shift=token_shift)[0]
    params = S3.init_params(mcfg, seed)
    rng = np.random.default_rng(seed)
    for name in params:
        if "norm" in name:
            params[name] = (params[name] * rng.uniform(0.5, 1.5, params[name].shape)).astype(np.float32)
    return params, mcfg


def backend(name, params, mcfg):
    kind = {"torch": "triton", "triton": "triton"}.get(name, name)
    kernels = {"torch": "torch", "triton": "triton"}.get(name, "auto")
    device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"   # else: the interpreter
    cfg = C8.ChatConfig(backend=kind, kernels=kernels, device=device if kind == "triton" else "auto")
    return C8.make_backend(params, mcfg, cfg)


def conversation(name, batch, seed=3, token_shift=False):
    params, mcfg = tiny(seed, token_shift)
    fp = C8.model_fingerprint(params, {"seed": seed})
    return C8.Conversation(backend(name, params, mcfg), TOKENIZER, fp, batch), params, mcfg


def parallel_logits(params, mcfg, ids):
    """Stage 3's parallel (training) form in float64 over one whole transcript: (L, V)."""
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    return S3.forward(p64, mcfg, np.asarray(ids)[None])[0][0]


def close(a, b):
    return np.abs(a - b).max() <= TOL * np.abs(b).max()


def random_turns(rng, lengths, vocab):
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("token_shift", [False, True])
@pytest.mark.parametrize("name", BACKENDS)
def test_turns_fed_one_by_one_equal_one_parallel_pass(name, token_shift):
    """Two conversations of ragged turns (two of 33 and 34 tokens, longer than the training context
    of 32), fed turn by turn with the carried state: every logit equals the parallel pass over that
    conversation's concatenated transcript, and the position counters count every token."""
    conv, params, mcfg = conversation(name, 2, token_shift=token_shift)
    rng = np.random.default_rng(0)
    turns = [random_turns(rng, (3, 2, 34, 1), 264), random_turns(rng, (1, 4, 33, 0), 264)]
    got = [[], []]
    for k in range(4):
        for b, logits in enumerate(conv.feed([turns[0][k], turns[1][k]])):
            got[b].append(logits)
        assert conv.pos.tolist() == [sum(map(len, t[:k + 1])) for t in turns]      # counter continuity
    assert 33 > mcfg.context
    for b in range(2):
        ref = parallel_logits(params, mcfg, sum(turns[b], []))
        assert np.abs(ref).max() > 1e-2
        assert close(np.concatenate(got[b]), ref), name


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_replies_continue_the_transcript(name):
    """A greedy user turn + reply + next turn: the logits of the next turn equal the parallel pass
    over <user> a <assistant> reply <eos> <user> b <assistant>, and the state's size never changes."""
    conv, params, mcfg = conversation(name, 1)
    size = conv.state_bytes()
    greedy = lambda b, z: int(np.argmax(z))                               # noqa: E731
    reply = conv.replies(["hello"], greedy, 6)[0]
    second = conv.user_turn("again")
    logits = conv.feed([second])[0]
    transcript = conv.user_turn("hello") + reply + [TOKENIZER.eos_id] + second
    assert conv.pos[0] == len(transcript) and conv.state_bytes() == size
    assert close(logits, parallel_logits(params, mcfg, transcript)[-len(second):])


@pytest.mark.parametrize("token_shift", [False, True])
@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_reset_one_conversation_clears_exactly_that_one(name, token_shift):
    """reset(1) of three: conversations 0 and 2 keep their states bit for bit; 1 becomes a fresh
    conversation (zero state, position 0) that then equals a conversation started alone. The
    torch backend packs (T, B) into one axis, so a wrong row index would clear the wrong one."""
    conv, params, mcfg = conversation(name, 3, token_shift=token_shift)
    rng = np.random.default_rng(1)
    conv.feed(random_turns(rng, (6, 4, 5), 264))
    before = conv.backend.to_numpy(conv.layers)
    conv.reset(1)
    after = conv.backend.to_numpy(conv.layers)
    for a, b in zip(before, after):
        assert np.array_equal(a[:, [0, 2]], b[:, [0, 2]]) and not np.any(b[:, 1])
        assert np.any(a[:, 1])                                  # there was something to clear
    assert conv.pos.tolist() == [6, 0, 5]
    turn = rng.integers(0, 264, 7).tolist()
    logits = conv.feed([[], turn, []])[1]
    assert close(logits, parallel_logits(params, mcfg, turn))
    with pytest.raises(IndexError):
        conv.reset(3)


@pytest.mark.parametrize("token_shift", [False, True])
@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_saved_and_loaded_state_continues_identically(name, token_shift, tmp_path):
    """Save after two turns, load into a new conversation of the same model: the third turn and a
    sampled reply are identical to the original conversation going on. The file holds layer/i (and
    with token_shift the shifted spikes shift/k), so a file of the unshifted layout still loads."""
    conv, params, mcfg = conversation(name, 2, token_shift=token_shift)
    rng = np.random.default_rng(2)
    for k in range(2):
        conv.feed(random_turns(rng, (4, 3), 264))
    conv.say(["x", "y"])                                       # saved between a turn and its reply
    conv.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as saved:
        shifts = [f"shift/{k}" for k in range(mcfg.n_layer * token_shift)]
        assert set(saved.files) == {"state.json", "logits", *shifts, *(f"layer/{i}" for i in range(2))}
    other = C8.Conversation(backend(name, params, mcfg), TOKENIZER, conv.fingerprint, 2)
    other.load(tmp_path / "s.npz")
    assert other.pos.tolist() == conv.pos.tolist() and other.open.all()
    cfg = C8.ChatConfig(temperature=1.0, seed=5)
    replies = [[t.tolist() for t in c.reply(C8.sampler(cfg), 8)] for c in (conv, other)]
    assert replies[0] == replies[1] and len(replies[0]) > 1
    third = random_turns(rng, (5, 2), 264)
    for a, b in zip(conv.feed(third), other.feed(third)):
        assert np.array_equal(a, b)


def test_state_files_of_another_model_or_corrupt_are_refused(tmp_path):
    conv, _, _ = conversation("numpy", 1, seed=3)
    conv.feed([[1, 2, 3]])
    conv.save(tmp_path / "s.npz")
    stranger, _, _ = conversation("numpy", 1, seed=4)          # same shapes, other parameters
    with pytest.raises(C8.StateFileError, match="belongs to another model"):
        stranger.load(tmp_path / "s.npz")
    data = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(C8.StateFileError, match="corrupt"):
        conv.load(tmp_path / "bad.npz")
    (tmp_path / "notes.npz").write_text("not a state file\n" * 8)           # not an .npz archive
    with pytest.raises(C8.StateFileError, match="corrupt") as err:
        conv.load(tmp_path / "notes.npz")
    assert "pickle" not in str(err.value)
    assert conv.pos.tolist() == [3]                             # a refused load changes nothing


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny checkpoint naming the byte tokenizer, and a second one of another model."""
    TOKENIZER.save(tmp_path / "tokenizer.json")
    info = {"path": str(tmp_path / "tokenizer.json"), "sha256": TOKENIZER.sha256(), "vocab_size": 264}
    paths = []
    for seed in (3, 4):
        params, mcfg = tiny(seed)
        tcfg = S3.make_configs("tiny")[1]
        paths.append(S3.save_model(tmp_path / f"m{seed}.npz", params, mcfg, tcfg, 0, None, info))
    return paths


def test_cli_script_commands_and_refusals(checkpoint, tmp_path, capsys):
    """A --script run: turns stream replies, /state reports a constant size, /save and /load work,
    and a state of another model, a corrupt state and an unknown command each give one error line
    without ending the chat."""
    m3, m4 = checkpoint
    other = tmp_path / "other.npz"
    script = tmp_path / "turns.txt"
    script.write_text(f"/save {other}\n")
    assert C8.main(["--ckpt", str(m4), "--script", str(script)]) == 0
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    mine = tmp_path / "mine.npz"
    script.write_text(f"hello\n/state\n/save {mine}\nagain\n/state\n/load {mine}\n/state\n/bogus\n"
                      f"/load {other}\n/load {tmp_path / 'corrupt.npz'}\n/load\nstill here\n")
    capsys.readouterr()
    assert C8.main(["--ckpt", str(m3), "--script", str(script), "--max_new_tokens", "5"]) == 0
    out, err = capsys.readouterr()
    errors = err.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("error: ") for e in errors), err
    assert "unknown command /bogus" in errors[0]
    assert "belongs to another model" in errors[1] and "corrupt" in errors[2] and "needs a file" in errors[3]
    states = [line for line in out.splitlines() if line.startswith("state: ")]
    sizes = {s.split(" bytes")[0] for s in states}
    seen = [int(s.split(", ")[-1].split()[0].replace(",", "")) for s in states]
    assert len(sizes) == 1 and seen[0] < seen[1] and seen[2] == seen[0]
    assert out.count("assistant: ") == 3


def test_cli_missing_checkpoint_and_bad_backend(tmp_path, capsys):
    assert C8.main(["--ckpt", str(tmp_path / "none.npz")]) == 1
    assert C8.main(["--backend", "cuda", "--ckpt", str(tmp_path / "none.npz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)


def test_help_explains_every_option_and_a_bad_value_is_one_line(capsys):
    """--help carries each ChatConfig field's own comment; a bad option value is one error line."""
    from dataclasses import fields

    from spikelib.cli import field_comments
    comments = field_comments(C8.ChatConfig)
    text = " ".join(C8.build_parser().format_help().split())
    for f in fields(C8.ChatConfig):
        assert comments.get(f.name) and " ".join(comments[f.name].split()) in text, f.name
    capsys.readouterr()
    assert C8.main(["--temperature", "-1"]) == 1
    assert capsys.readouterr().err == "error: --temperature must be >= 0, got -1.0\n"
