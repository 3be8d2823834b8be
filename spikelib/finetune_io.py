"""What stage 6 writes beside its checkpoints: the Q&A file, the results rows and their table."""
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path


def write_text_atomic(path, text):
    """Write text to path through a temp file in the same folder, fsync, rename: a crash mid-write
    leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def append_result(path, result):
    """Add one results row to a JSONL file (NaN written as null), the whole file replaced atomically."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    row = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}
    return write_text_atomic(path, old + json.dumps(row) + "\n")


def print_table(rows):
    """Markdown table of results rows (dicts of stage 6's run())."""
    head = ("| method | backend | trained params | time | steps | decode | EM test | F1 test | "
            "EM test, free | EM train | BPC before | BPC after |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        pct = {k: f"{100 * r[k]:.1f}%" for k in ("em_test", "f1_test", "em_test_free", "em_train")}
        lines.append(f"| {r['method']} | {r['backend']} | {r['trained']:,} ({100 * r['fraction']:.2f}%) | "
                     f"{r['seconds']:.0f} s | {r['steps']} | {r['decode']} | {pct['em_test']} | "
                     f"{pct['f1_test']} | {pct['em_test_free']} | {pct['em_train']} | "
                     f"{r['bpc_before']:.3f} | {r['bpc_after']:.3f} |")
    return "\n".join(lines)


def print_result(result, test, answers):
    """What a fine-tuning run prints at its end: exact matches by kind, the first held-out
    answers beside the gold ones, the results table and the file written."""
    kinds = ", ".join(f"{k} {r}/{n}" for k, (r, n) in result["em_by_kind"].items())
    print(f"held-out exact matches by kind: {kinds}")
    for p, a in list(zip(test, answers))[:5]:
        print(f"  Q: {p['question']}\n     gold: {p['answer']!r}  model: {a!r}")
    print(print_table([result]))
    print(f"saved {result['output']}")


def stable_hash(text):
    """A number in [0, 1) fixed by the text (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64
