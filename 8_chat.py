"""Stage 8: conversation with constant-size memory -- multi-turn spiking inference.

The model's attention is recurrent: each layer keeps a state S = gamma S + k^T v of a fixed size
(T x B x H x dh x dh), whatever the length of the text it has read (with --token_shift 1, also the
previous position's spikes of the shifted channels, T x B x D/2 per layer), and there are no
position embeddings, so a position counter is all the rest. A conversation therefore keeps that state
between turns: each new turn costs only its own tokens, and a thousand turns cost no more memory
than one. This stage wraps any backend (numpy: stage 3, mlx: stage 4, triton: stage 5) in a
Conversation object and puts a small REPL around it.

    python 8_chat.py --ckpt out/numpy/ckpt.npz              # talk; /reset /state /save F /load F
    python 8_chat.py --script turns.txt                     # one user turn per line, for demos
    python 8_chat.py --backend triton --device cuda         # the same on a GPU

A turn is marked with the tokenizer's reserved role tokens:

    <user> text <assistant> reply <eos>   <user> next text <assistant> ...

The user's tokens are fed into the state (all at once: one chunked parallel pass in stage 5; one
position at a time in stages 3 and 4, whose recurrent form takes one token), then the reply is
sampled a token at a time until <eos> (or --max_new_tokens, after which <eos> is fed to close the
turn). Several conversations share one batch: each row keeps its own state and position, rows of
different lengths are fed together (a row with no token at a step keeps its state), and
reset(batch_id) clears one row. Saved states name their model by a fingerprint of its
parameters, so a state is never continued by another model.
"""
import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.checkpoint import CheckpointError  # noqa: E402
from spikelib.cli import add_config_options, check_choices, check_fields, config_from_args, fail  # noqa: E402
from spikelib.report import print_stream  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402
from spikelib.state_io import StateFileError, load_state, model_fingerprint, save_state  # noqa: E402

S3 = load_stage("3_spike_llm_numpy")      # the reference model, checkpoints, sampling

# ----------------------------------------------------------------------------- config

BACKENDS = ("numpy", "mlx", "triton")
COMMANDS = "/reset, /state, /save FILE, /load FILE, /help, /quit"


@dataclass
class ChatConfig:
    ckpt: str = "out/numpy/ckpt.npz"   # model checkpoint of stage 3, 4, 5 or 6 (one format)
    adapters: str = ""                 # LoRA adapters of stage 6 applied to the checkpoint ('' = none)
    backend: str = "numpy"             # numpy (stage 3) | mlx (stage 4) | triton (stage 5, PyTorch + Triton)
    device: str = "auto"               # triton backend: auto | cuda | cpu
    kernels: str = "auto"              # triton backend: auto (Triton on CUDA, else torch) | triton | torch
    dtype: str = "float32"             # triton backend: matmul dtype, float32 | bfloat16 | auto
    max_new_tokens: int = 120          # longest reply; the turn is closed with <eos> after it
    temperature: float = 0.8           # sampling temperature; 0 = greedy
    top_k: int = 40                    # sample among the k most likely tokens (0 = all)
    top_p: float = 0.95                # and among the smallest set whose probability reaches top_p
    seed: int = 0                      # sampling seed
    script: str = ""                   # run this file's turns (one a line, /commands too), then exit

    def __post_init__(self):
        check_choices(self, {"backend": BACKENDS, "device": ("auto", "cuda", "cpu"),
                             "kernels": ("auto", "triton", "torch"),
                             "dtype": ("float32", "bfloat16", "auto")})
        check_fields(self, {"max_new_tokens": ">= 1", "temperature": ">= 0", "top_k": ">= 0",
                            "top_p": "in (0, 1]"})

# ----------------------------------------------------------------------------- backends
# A backend holds the model and does five things with its states `layers`, one list: the attention
# state of each layer, then token_shift's slots (each the previous position's spikes, stage 3's "shift"):
#   init(B)                 zero states of B conversations
#   step(layers, ids)       feed ids (B, L) -> (new layers, logits (B, L, V) as NumPy); the given
#                           layers are left untouched, so a step interrupted by Ctrl-C changes nothing
#   where(rows, new, old)   per conversation: new where rows (B,) is True, else old
#   to_numpy / from_numpy   stage 3's layout, (T, B, H, dh, dh) (hadamard: (T, B, H, dh)) per layer,
#                           (T, B, D//2) per shift slot


class NumpyBackend:
    """Stage 3: its recurrent form takes one position per call, so a turn is fed token by token."""

    def __init__(self, params, mcfg):
        self.params, self.cfg, self.n_layer = params, mcfg, mcfg.n_layer
        self.dtype = params["embed.weight"].dtype

    def init(self, B):
        state = S3.init_decode_state(self.cfg, B, self.dtype)
        return state["layers"] + state["shift"]

    def step(self, layers, ids):                         # ids (B, L)
        n = self.n_layer                                 # decode_step replaces the lists' arrays
        state = {"pos": 0, "layers": list(layers[:n]), "shift": list(layers[n:])}
        logits = [S3.decode_step(self.params, self.cfg, state, ids[:, j]) for j in range(ids.shape[1])]
        return state["layers"] + state["shift"], np.stack(logits, 1)

    def where(self, rows, new, old):
        return [np.where(rows.reshape((1, -1) + (1,) * (n.ndim - 2)), n, o) for n, o in zip(new, old)]

    def to_numpy(self, layers):
        return [np.asarray(s, np.float32) for s in layers]

    def from_numpy(self, arrays):
        return [a.astype(self.dtype) for a in arrays]


class MlxBackend:
    """Stage 4: model(idx (B, 1), state) -> (logits, spikes, new state); one position per call."""

    def __init__(self, params, mcfg):
        import mlx.core as mx
        self.mx, self.model = mx, load_stage("4_spike_llm_mlx").build_model(mcfg, params)
        self.n_layer = mcfg.n_layer

    def init(self, B):
        return self.model.init_state(B)

    def step(self, layers, ids):
        mx, out = self.mx, []
        for j in range(ids.shape[1]):
            logits, _, layers = self.model(mx.array(ids[:, j:j + 1]), layers)
            mx.eval(logits, layers)                     # one small graph per position
            out.append(np.array(logits[:, 0]))
        return layers, np.stack(out, 1)

    def where(self, rows, new, old):
        mx = self.mx
        masks = [mx.array(rows.reshape((1, -1) + (1,) * (n.ndim - 2))) for n in new]  # each (1, B, 1, ...)
        return [mx.where(m, n, o) for m, n, o in zip(masks, new, old)]

    def to_numpy(self, layers):
        return [np.array(s, np.float32) for s in layers]

    def from_numpy(self, arrays):
        return [self.mx.array(a.astype(np.float32)) for a in arrays]


class TritonBackend:
    """Stage 5: a turn of L > 1 tokens is one chunked parallel pass from the carried state; a single
    token is one step of the Triton decoding kernel (on a GPU). Its states pack timesteps and
    conversations into one axis, (T*B, H, dh, dh), row t*B + b: viewed as (T, B, ...) to pick b."""

    def __init__(self, params, mcfg, cfg):
        import torch

        from spikelib.torch_io import resolve_run
        S5 = load_stage("5_spike_llm_triton")
        self.torch, self.T, self.n_layer = torch, S3.timesteps(mcfg), mcfg.n_layer
        run = S5.RunConfig(kernels=cfg.kernels, device=cfg.device, dtype=cfg.dtype)
        self.run = resolve_run(run, have_triton=S5.triton is not None)
        self.model = S5.build_model(mcfg, self.run, params).eval()

    def init(self, B):
        return self.model.init_state(B)

    def step(self, layers, ids):
        torch = self.torch
        with torch.no_grad():
            new = [s.clone() for s in layers]           # the decoding kernel updates its state in place
            logits = self.model(torch.as_tensor(ids, device=self.run.device), new)
        return new, logits.float().cpu().numpy()

    def rows_view(self, s):                             # (T*B, ...) -> (T, B, ...)
        return s.view(self.T, s.shape[0] // self.T, *s.shape[1:])

    def where(self, rows, new, old):
        torch = self.torch
        m = torch.as_tensor(rows, device=self.run.device)
        out = []
        for n, o in zip(new, old):
            nv, ov = self.rows_view(n), self.rows_view(o)
            out.append(torch.where(m.view((1, -1) + (1,) * (nv.dim() - 2)), nv, ov).reshape(n.shape))
        return out

    def to_numpy(self, layers):
        return [self.rows_view(s).float().cpu().numpy() for s in layers]

    def from_numpy(self, arrays):
        torch = self.torch
        tensors = [torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in arrays]
        return [t.reshape(-1, *t.shape[2:]).to(self.run.device) for t in tensors]


def make_backend(params, mcfg, cfg):
    if cfg.backend == "numpy":
        return NumpyBackend(params, mcfg)
    if cfg.backend == "mlx":
        return MlxBackend(params, mcfg)
    return TritonBackend(params, mcfg, cfg)

# ----------------------------------------------------------------------------- the conversation


class Conversation:
    """B conversations with one model, each carrying its recurrent state from turn to turn.

    Per conversation b it keeps: the attention state of every layer (inside `layers`), pos[b]
    (tokens read so far: the position the next token takes), logits[b] (the next-token logits
    after the last token read) and open[b] (a reply has begun and is not closed by <eos> yet).
    Memory is constant: nothing here grows with the conversation.
    """

    def __init__(self, backend, tok, fingerprint, batch=1):
        self.backend, self.tok, self.fingerprint, self.B = backend, tok, fingerprint, batch
        self.user, self.assistant = tok.token_id("<user>"), tok.token_id("<assistant>")
        self.reset()

    def reset(self, batch_id=None):
        """Forget everything (batch_id None) or one conversation of the batch."""
        rows = np.ones(self.B, bool) if batch_id is None else np.arange(self.B) == batch_id
        if batch_id is not None and not 0 <= batch_id < self.B:
            raise IndexError(f"batch_id {batch_id} is outside the batch of {self.B}")
        fresh = self.backend.init(self.B)
        if batch_id is None:
            self.layers = fresh
            self.pos = np.zeros(self.B, np.int64)
            self.logits = np.zeros((self.B, self.tok.vocab_size), np.float32)
            self.open = np.zeros(self.B, bool)
            return
        self.layers = self.backend.where(rows, fresh, self.layers)
        self.pos[rows], self.logits[rows], self.open[rows] = 0, 0.0, False

    def feed(self, turns):
        """Read turns[b] (a list of token ids, may be empty) into conversation b; returns each row's
        logits at each position it read, a list of (len(turns[b]), V) arrays.

        The positions all rows have are fed in one step (one parallel pass in stage 5); the rest one
        position at a time, a row without a token there keeping its old state (backend.where)."""
        n = np.array([len(t) for t in turns])
        if len(turns) != self.B:
            raise ValueError(f"feed needs {self.B} turns (one per conversation), got {len(turns)}")
        out = [[] for _ in turns]
        common = int(n.min())
        if common:
            ids = np.array([t[:common] for t in turns], np.int64)                       # (B, common)
            self.layers, logits = self.backend.step(self.layers, ids)
            for b in range(self.B):
                out[b].append(logits[b])
            self.pos += common
            self.logits = logits[:, -1].astype(np.float32)
        for j in range(common, int(n.max())):
            rows = n > j
            ids = np.array([[t[j] if j < len(t) else 0] for t in turns], np.int64)      # (B, 1)
            new, logits = self.backend.step(self.layers, ids)
            self.layers = self.backend.where(rows, new, self.layers)
            for b in np.flatnonzero(rows):
                out[b].append(logits[b])
            self.pos += rows
            self.logits[rows] = logits[rows, -1]
        return [np.concatenate(o) if o else np.zeros((0, self.tok.vocab_size), np.float32) for o in out]

    def user_turn(self, text):
        """<user> text <assistant>: the ids of one user turn, ending where the reply begins."""
        return [self.user] + self.tok.encode(text) + [self.assistant]

    def say(self, texts):
        """Feed one user turn per conversation ('' or None: that conversation is left alone)."""
        self.feed([self.user_turn(t) if t else [] for t in texts])
        self.open |= np.array([bool(t) for t in texts])

    def reply(self, choose, max_new_tokens):
        """Yield the next token of every open conversation, (B,) ints (-1 for a row not replying),
        until each has ended; choose(b, logits) picks row b's token. The reply ends at <eos> or any
        role token (fed as <eos>), or after max_new_tokens (then <eos> is fed to close the turn)."""
        stops = {self.tok.eos_id, self.user, self.assistant, self.tok.token_id("<sys>")}
        for _ in range(max_new_tokens):
            if not self.open.any():
                return
            nxt = np.array([choose(b, self.logits[b]) if self.open[b] else -1 for b in range(self.B)])
            ended = self.open & np.isin(nxt, list(stops))
            fed = np.where(ended, self.tok.eos_id, nxt)
            self.feed([[int(fed[b])] if self.open[b] else [] for b in range(self.B)])
            shown = np.where(self.open & ~ended, nxt, -1)
            self.open &= ~ended
            yield shown
        self.end_reply()

    def end_reply(self):
        """Close every open reply with <eos> (after max_new_tokens, or when Ctrl-C stopped it)."""
        if self.open.any():
            self.feed([[self.tok.eos_id] if o else [] for o in self.open])
            self.open[:] = False

    def replies(self, texts, choose, max_new_tokens):
        """One user turn per conversation, then every reply in full: a list of token lists."""
        self.say(texts)
        out = [[] for _ in range(self.B)]
        for nxt in self.reply(choose, max_new_tokens):
            for b in np.flatnonzero(nxt >= 0):
                out[b].append(int(nxt[b]))
        return out

    def state_bytes(self):
        """Bytes of the recurrent state: every layer's attention state plus the position counters."""
        return sum(a.nbytes for a in self.backend.to_numpy(self.layers)) + self.pos.nbytes

    def state_names(self):
        """layer/i: layer i's attention state; shift/k: token_shift's slot k (none without token_shift, so
        a file written before the option existed loads as it was)."""
        n = self.backend.n_layer
        return [f"layer/{i}" if i < n else f"shift/{i - n}" for i in range(len(self.layers))]

    def save(self, path):
        """The state in a .npz with a JSON header naming the model's fingerprint (spikelib.state_io)."""
        arrays = dict(zip(self.state_names(), self.backend.to_numpy(self.layers)))
        arrays["logits"] = self.logits
        header = {"fingerprint": self.fingerprint, "batch": self.B, "pos": self.pos.tolist(),
                  "open": self.open.tolist()}
        return save_state(path, arrays, header)

    def load(self, path):
        """Continue from a saved state; StateFileError (one line) if it is not this model's."""
        arrays, header = load_state(path, self.fingerprint)
        want = self.backend.to_numpy(self.backend.init(self.B))
        layers = [arrays.get(name) for name in self.state_names()]
        shapes_differ = any(a is None or a.shape != w.shape for a, w in zip(layers, want))
        if header.get("batch") != self.B or shapes_differ:
            raise StateFileError(f"state file {path} holds {header.get('batch')} conversation(s) of other "
                                 f"shapes; this chat has {self.B}")
        self.layers = self.backend.from_numpy(layers)
        self.pos = np.array(header["pos"], np.int64)
        self.logits = arrays["logits"].astype(np.float32)
        self.open = np.array(header["open"], bool)

# ----------------------------------------------------------------------------- loading a model


def load_chat_model(cfg):
    """(backend, tokenizer, fingerprint, ModelConfig) of cfg.ckpt (+ cfg.adapters) on cfg.backend."""
    if not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"no checkpoint at {cfg.ckpt}; train one first: python 3_spike_llm_numpy.py")
    params, mcfg, _, _, _, config = S3.load_model(cfg.ckpt)
    tok = load_stage("2_tokenizer").Tokenizer.load(config["tokenizer"]["path"])
    S3.check_tokenizer(config, tok.sha256(), cfg.ckpt)
    if cfg.adapters:
        S6 = load_stage("6_finetune")
        lora, scale = S6.load_lora(cfg.adapters, params)
        params = S6.apply_lora(params, lora, scale)
    fingerprint = model_fingerprint(params, asdict(mcfg))
    return make_backend(params, mcfg, cfg), tok, fingerprint, mcfg


def sampler(cfg):
    """choose(b, logits) for Conversation.reply: stage 3's temperature / top-k / top-p sampling."""
    rng = np.random.default_rng(cfg.seed)
    return lambda b, logits: S3.sample_token(logits, rng, cfg.temperature, cfg.top_k, cfg.top_p)

# ----------------------------------------------------------------------------- the REPL


def describe_state(conv):
    """One line for /state: bytes, shapes, tokens seen."""
    layers, n = conv.backend.to_numpy(conv.layers), conv.backend.n_layer
    shift = f" + {len(layers) - n} x {tuple(layers[-1].shape)} shifted spikes" if len(layers) > n else ""
    return (f"state: {conv.state_bytes():,} bytes ({n} layers x {tuple(layers[0].shape)} "
            f"{layers[0].dtype}{shift} + position), {int(conv.pos[0]):,} tokens seen")


def command(conv, line, out):
    """Run one /command; returns False for /quit. Problems print one line on stderr ('error: ...')."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    try:
        if name == "/quit":
            return False
        if name == "/reset":
            conv.reset()
            print("(conversation reset)", file=out)
        elif name == "/state":
            print(describe_state(conv), file=out)
        elif name in ("/save", "/load") and not arg:
            print(f"error: {name} needs a file name, e.g. {name} chat_state.npz", file=sys.stderr)
        elif name == "/save":
            print(f"(saved to {conv.save(arg)})", file=out)
        elif name == "/load":
            conv.load(arg)
            print(f"(loaded {arg}: {int(conv.pos[0]):,} tokens seen)", file=out)
        elif name == "/help":
            print(f"commands: {COMMANDS}; anything else is your turn; Ctrl-C stops a reply, Ctrl-D exits",
                  file=out)
        else:
            print(f"error: unknown command {name}; the commands are {COMMANDS}", file=sys.stderr)
    except (StateFileError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
    return True


def turn(conv, text, choose, cfg, out):
    """Feed one user turn and stream the reply; Ctrl-C ends the reply (closed with <eos>), not the chat."""
    try:
        conv.say([text])
        tokens = (int(t[0]) for t in conv.reply(choose, cfg.max_new_tokens) if t[0] >= 0)
        return print_stream(conv.tok, "assistant: ", [], tokens, out)
    except KeyboardInterrupt:
        conv.end_reply()
        print(" [reply stopped]", file=out)
        return None


def repl(conv, cfg, lines=None, out=None):
    """The conversation loop: input() lines (or the given lines of a --script), /commands among them."""
    out = out or sys.stdout
    choose = sampler(cfg)
    interactive = lines is None
    if interactive:
        print(f"chatting with {cfg.ckpt} ({cfg.backend}); {COMMANDS}; Ctrl-D exits", file=out)
    lines = iter(lines or [])
    while True:
        try:
            line = input("you: ") if interactive else next(lines)
        except (EOFError, StopIteration):
            break
        except KeyboardInterrupt:
            print("\n(Ctrl-D exits)", file=out)
            continue
        if not interactive:
            print(f"you: {line}", file=out)
        if line.startswith("/"):
            if not command(conv, line, out):
                break
        elif line.strip():
            turn(conv, line, choose, cfg, out)
    return conv

# ----------------------------------------------------------------------------- main


def build_parser():
    """Every ChatConfig field is an option, explained by its comment above (spikelib.cli)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_options(ap, ChatConfig, "chat (ChatConfig)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(ChatConfig, args)
        lines = Path(cfg.script).read_text(encoding="utf-8").splitlines() if cfg.script else None
        backend, tok, fingerprint, _ = load_chat_model(cfg)
        repl(Conversation(backend, tok, fingerprint), cfg, lines)
    except (CheckpointError, ValueError, FileNotFoundError, ImportError, OSError) as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
