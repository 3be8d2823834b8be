"""Benchmark the stage 2 tokenizer: encode throughput (cold and cached), decode, chars/token.

    python benchmarks/bench_tokenizer.py                          # data/builtin/train.txt
    python benchmarks/bench_tokenizer.py --file data/tinyshakespeare/train.txt

Uses the tokenizer.json next to the file when there is one, else trains one on
the file. "cold" encodes with every cache empty (each distinct word is
hyphenated and looked up once); "cached" encodes the same text again, which is
what encoding a large corpus converges to as its vocabulary of words repeats.
MB/s counts UTF-8 bytes of input text.
"""
import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.hardware import cpu_model, usable_cpus  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

tk = load_stage("2_tokenizer")



def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", default="data/builtin/train.txt", help="UTF-8 text to encode")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: next to --file, else train)")
    p.add_argument("--vocab-size", type=int, default=2000, help="when training one")
    p.add_argument("--lang", default="en_US", help="when training one")
    p.add_argument("--repeat", type=int, default=3, help="cached/decode timings: best of this many")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")

    path = Path(args.file)
    if not path.exists() and args.file == p.get_default("file"):
        load_stage("1_data").prepare("builtin", root="data")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        p.error(f"--file {path}: {err}")
    n_bytes = len(text.encode("utf-8"))
    rows = []

    tok_path = Path(args.tokenizer) if args.tokenizer else path.parent / "tokenizer.json"
    if args.tokenizer and not tok_path.is_file():            # named but absent: not trained in its place
        p.error(f"--tokenizer {tok_path}: no such file")
    try:                                  # a damaged tokenizer.json, a vocabulary size or language refused
        if tok_path.exists():
            tok = tk.Tokenizer.load(tok_path)
            origin = str(tok_path)
        else:
            t_train, tok = best_time(lambda: tk.Tokenizer.train(text, args.vocab_size, args.lang,
                                                                 progress=False), 1)
            origin = f"trained on the file ({t_train:.2f}s)"
            rows.append(("train", t_train))
    except ValueError as err:
        p.error(str(err))

    tok.clear_cache()
    t_cold, ids = best_time(lambda: tok.encode(text), 1)
    rows.append(("encode cold", t_cold))
    t_warm, _ = best_time(lambda: tok.encode(text), args.repeat)
    rows.append(("encode cached", t_warm))
    t_dec, back = best_time(lambda: tok.decode(ids), args.repeat)
    rows.append(("decode", t_dec))
    assert back == text, "round trip failed"

    print(f"file       {path}  ({len(text):,} chars, {n_bytes:,} UTF-8 bytes)")
    print(f"tokenizer  {origin}, vocab {tok.vocab_size:,}, lang {tok.lang}")
    print(f"tokens     {len(ids):,}   chars/token {len(text) / max(len(ids), 1):.3f}")
    print(f"cpu        {cpu_model()} ({usable_cpus()} cores usable, single-threaded run), "
          f"python {platform.python_version()}")
    print()
    print(f"{'step':<14} {'seconds':>8} {'MB/s':>8}")
    for name, seconds in rows:
        print(f"{name:<14} {seconds:>8.3f} {n_bytes / seconds / 1e6:>8.2f}")


if __name__ == "__main__":
    main()
