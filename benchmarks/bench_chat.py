"""Stage 8: memory and time per turn of a conversation that carries its state, against the naive way.

    python benchmarks/bench_chat.py --ckpt out/numpy/ckpt.npz                     # NumPy, this CPU
    python benchmarks/bench_chat.py --backend triton --device cuda --ckpt CKPT     # a GPU
    python benchmarks/bench_chat.py --qa 1 --ckpt BASE --adapters out/finetune/lora.npz

Speed: a conversation of --turns turns, each a user turn of --turn_tokens tokens (fixed random
syllables) and a reply of exactly --reply_tokens tokens (greedy, role tokens and <eos> excluded so
every reply has the same length). At turns 1, 10, 100, 1000 it prints the state's bytes and the
milliseconds per generated token of that turn (the user's tokens fed, then the reply) carried,
and the same turn the naive way: a fresh state reads the whole transcript so far (what every
`--generate` call does), then writes the same reply. The naive way must also keep the transcript.

QA (--qa 1): stage 6's held-out questions, grouped by the article they come from. Carried: turn 1
is `<q>` and the group's contexts, once; each question is a later turn `\\n question <a>`, answered
(stage 6's span decoding) and closed with <eos>, the state carried. Re-fed: every question gets a
fresh state and stage 6's own prompt `<q> contexts \\n question <a>`, the contexts read again.
"""
import argparse
import json
import platform
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spikelib.hardware import cpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

C8 = load_stage("8_chat")
MEASURED = (1, 10, 100, 1000)


def hardware(cfg):
    line = f"CPU: {cpu_model()} ({usable_cpus()} usable cores), Python {platform.python_version()}"
    if cfg.backend == "triton":
        import torch
        S5 = load_stage("5_spike_llm_triton")
        from spikelib.torch_io import resolve_run
        rc = S5.RunConfig(kernels=cfg.kernels, device=cfg.device, dtype=cfg.dtype)
        run = resolve_run(rc, have_triton=S5.triton is not None)
        gpu = torch.cuda.get_device_name() if run.device == "cuda" else "none"
        line += (f", torch {torch.__version__}, device {run.device} (GPU: {gpu}), "
                 f"kernels {run.kernels}, {run.dtype}")
    return line + f"; backend {cfg.backend}"


def fixed_length_choice(tok):
    """Greedy among ordinary tokens only, so a reply never ends early."""
    special = np.arange(tok.vocab_size) < len(load_stage("2_tokenizer").SPECIAL_TOKENS)
    return lambda b, z: int(np.argmax(np.where(special, -np.inf, z)))


def timed_turn(conv, ids, choose, n_reply):
    """Feed ids, then write a reply of n_reply tokens; (seconds, reply tokens)."""
    t0 = time.perf_counter()
    conv.feed([ids])
    conv.open[:] = True
    reply = [int(t[0]) for t in conv.reply(choose, n_reply)]
    return time.perf_counter() - t0, reply


def speed(args, cfg):
    backend, tok, fp, mcfg = C8.load_chat_model(cfg)
    conv = C8.Conversation(backend, tok, fp)
    choose = fixed_length_choice(tok)
    rng = np.random.default_rng(0)
    first = len(load_stage("2_tokenizer").SPECIAL_TOKENS) + 256      # learned pieces: real syllables
    transcript = []
    print(hardware(cfg))
    print(f"model {cfg.ckpt}: {mcfg.n_layer} layers, d {mcfg.d_model}, T {mcfg.T}; "
          f"each turn {args.turn_tokens} user tokens + 2 role tokens, "
          f"a reply of {args.reply_tokens} tokens + <eos>")
    print(f"{'turn':>5} {'tokens seen':>12} {'state bytes':>12} {'transcript bytes':>17} "
          f"{'ms/token carried':>17} {'ms/token naive':>15}")
    for turn in range(1, args.turns + 1):
        user = [conv.user] + rng.integers(first, tok.vocab_size, args.turn_tokens).tolist() + [conv.assistant]
        seconds, reply = timed_turn(conv, user, choose, args.reply_tokens)
        if turn in MEASURED:
            naive = "-"
            if turn <= args.naive_max_turn:
                fresh = C8.Conversation(backend, tok, fp)
                naive_s, naive_reply = timed_turn(fresh, transcript + user, choose, args.reply_tokens)
                assert naive_reply == reply or cfg.backend != "numpy", "the naive way wrote another reply"
                naive = f"{1000 * naive_s / args.reply_tokens:.2f}"
            transcript_bytes = 4 * (len(transcript) + len(user) + len(reply) + 1)      # int32 ids
            print(f"{turn:5d} {int(conv.pos[0]):12,d} {conv.state_bytes():12,d} {transcript_bytes:17,d} "
                  f"{1000 * seconds / args.reply_tokens:17.2f} {naive:>15}", flush=True)
        transcript += user + reply + [tok.eos_id]


def answer(conv, question_ids, source, S6, max_new):
    """Feed a question turn and decode its answer with stage 6's span rule; <eos> is fed at the end."""
    conv.feed([question_ids])
    out, nexts = [], range(len(source))
    for j in range(max_new):
        nxt, nexts = S6.pick_token(conv.logits[0], source, nexts, conv.tok.eos_id, j > 0)
        conv.feed([[nxt]])
        if nxt == conv.tok.eos_id:
            return out
        out.append(nxt)
    conv.feed([[conv.tok.eos_id]])
    return out


def qa(args, cfg):
    S6 = load_stage("6_finetune")
    backend, tok, fp, _ = C8.load_chat_model(cfg)
    _, mcfg, *_, config = C8.S3.load_model(cfg.ckpt)
    pairs, source = S6.qa_pairs(S6.FinetuneConfig(), config, mcfg)
    groups = OrderedDict()
    for p in pairs:
        if p["split"] == "test":
            groups.setdefault(p["article"], []).append(p)
    print(hardware(cfg))
    print(f"{sum(map(len, groups.values()))} held-out questions of {source} in {len(groups)} articles; "
          f"{sum(len(g) - 1 for g in groups.values())} are later questions (2nd or after in their article)")
    results = {"carried": [], "re-fed": []}
    seconds = {}
    conv = C8.Conversation(backend, tok, fp)
    for way in results:
        t0 = time.perf_counter()
        for group in groups.values():
            context = " ".join(OrderedDict.fromkeys(p["context"] for p in group))
            src, spans = tok.encode(context), S6.span_source(tok, context)      # read; what answers may copy
            conv.reset()
            if way == "carried":
                conv.feed([[tok.token_id("<q>")] + src])
            for k, p in enumerate(group):
                if way == "carried":
                    ids = tok.encode("\n" + p["question"]) + [tok.token_id("<a>")]
                else:
                    conv.reset()
                    ids = S6.prompt_ids(tok, p["question"], context)
                reply_ids = answer(conv, ids, spans, S6, args.max_answer_tokens)
                got = tok.decode(reply_ids, skip_special=True).strip()
                results[way].append((k, S6.normalize(got) == S6.normalize(p["answer"]), got))
        seconds[way] = time.perf_counter() - t0
    print("| way | EM, all held-out questions | EM, later questions | seconds |")
    print("|---|---|---|---|")
    for way, rows in results.items():
        every = [ok for _, ok, _ in rows]
        later = [ok for k, ok, _ in rows if k > 0]
        print(f"| {way} | {100 * np.mean(every):.1f}% ({sum(every)}/{len(every)}) | "
              f"{100 * np.mean(later):.1f}% ({sum(later)}/{len(later)}) | {seconds[way]:.1f} |")
    same = [a[2] == b[2] for a, b in zip(*results.values()) if a[0] > 0]
    print(f"later questions answered with the same text both ways: {sum(same)}/{len(same)}")
    print(json.dumps({w: [got for _, _, got in r] for w, r in results.items()})[:2000])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", default="out/numpy/ckpt.npz", help="model checkpoint (any stage)")
    ap.add_argument("--adapters", default="", help="stage 6 LoRA adapters ('' = none)")
    ap.add_argument("--backend", default="numpy", choices=C8.BACKENDS, help="which stage runs the model")
    ap.add_argument("--device", default="auto", help="triton backend: auto | cuda | cpu")
    ap.add_argument("--kernels", default="auto", help="triton backend: auto | triton | torch")
    ap.add_argument("--dtype", default="float32", help="triton backend: float32 | bfloat16 | auto")
    ap.add_argument("--turns", type=int, default=1000, help="turns of the conversation")
    ap.add_argument("--turn_tokens", type=int, default=8, help="user tokens per turn")
    ap.add_argument("--reply_tokens", type=int, default=8, help="generated tokens per reply")
    ap.add_argument("--naive_max_turn", type=int, default=1000, help="skip the naive way after this turn")
    ap.add_argument("--qa", type=int, default=0, help="1: the question-answering comparison instead")
    ap.add_argument("--max_answer_tokens", type=int, default=24, help="QA: longest answer")
    args = ap.parse_args()
    try:
        cfg = C8.ChatConfig(ckpt=args.ckpt, adapters=args.adapters, backend=args.backend, device=args.device,
                            kernels=args.kernels, dtype=args.dtype)
        qa(args, cfg) if args.qa else speed(args, cfg)
    except (C8.CheckpointError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
