"""The files of stage 6 besides its checkpoints: a user's Q&A JSONL or SQuAD file (validated) and
SQuAD's answer normalization, LoRA adapter files, the results rows and their table."""
import hashlib
import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np

from spikelib.checkpoint import CheckpointError, read_npz
from spikelib.files import atomic_write, write_text_atomic

EMBED_ROW = "embed.weight.row."     # an adapter file's key of a trained embedding row: + its token id
GAIN_DELTA = ".delta"               # ... and of a trained RMSNorm gain's change: its name + this


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


def qa_table(rows):
    """Markdown table, method x decoding: SQuAD 2.0 EM (one standard error) and F1 on the held-out
    questions, EM on the answerable and unanswerable ones, the corpus BPC before and after."""
    lines = ["| method | replay | decoding | EM | F1 | EM has-answer | EM no-answer | BPC before | "
             "BPC after |", "|" + "---|" * 9]
    for r in rows:
        for d, s in r["scores"].items():
            cells = [f"{100 * s['em']:.1f}% ± {100 * s['em_se']:.1f}", f"{100 * s['f1']:.1f}%"]
            cells += [f"{100 * s['em_' + k]:.1f}% (n={s['n_' + k]})" if s["n_" + k] else "-"
                      for k in ("has", "none")]
            lines.append(f"| {r['method']} | {r['replay']:g} | {d} | " + " | ".join(cells) +
                         f" | {r['bpc_before']:.3f} | {r['bpc_after']:.3f} |")
    return "\n".join(lines)


def print_result(result, test, answers):
    """What a fine-tuning run prints at its end: exact matches by kind, the first held-out
    answers beside the gold ones, the results table and the file written."""
    kinds = ", ".join(f"{k} {r}/{n}" for k, (r, n) in result["em_by_kind"].items())
    print(f"held-out exact matches by kind: {kinds}")
    for p, a in list(zip(test, answers))[:5]:
        print(f"  Q: {p['question']}\n     gold: {p['answer']!r}  model: {a!r}")
    if result["n_blind"]:
        print(f"without their contexts, {100 * result['em_blind']:.1f}% of the {result['n_blind']} "
              "answerable held-out questions are answered (free decoding): recalled, not read")
    print(print_table([result]))
    print(qa_table([result]))
    print(f"saved {result['output']}")


def stable_hash(text):
    """A number in [0, 1) fixed by the text (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64


def read_qa(path, test_fraction=0.1):
    """A user's Q&A file: SQuAD JSON (read_squad) if it is one JSON object, else JSONL validated line
    by line; raises ValueError listing every bad line.

    Each non-empty line: a JSON object with non-empty strings "question" and "answer" (or
    "is_impossible": true and no answer), optional string "context", optional "split" in
    {train, test} (default: fixed by the question's hash).
    """
    pairs, errors = [], []
    if not Path(path).is_file():
        raise FileNotFoundError(f"--qa {path}: no such file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); "
                         f"save it as UTF-8") from None
    if is_squad(text):
        return read_squad(path, text, test_fraction)
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"line {n}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"line {n}: expected a JSON object, got {type(obj).__name__}")
            continue
        impossible = obj.get("is_impossible") is True
        problems = [f'"{k}" must be a non-empty string' for k in ("question", "answer")
                    if not (k == "answer" and impossible and obj.get(k, "") == "")
                    and (not isinstance(obj.get(k), str) or not obj.get(k).strip())]
        if "context" in obj and not isinstance(obj["context"], str):
            problems.append('"context" must be a string')
        if obj.get("split", "train") not in ("train", "test"):
            problems.append('"split" must be "train" or "test"')
        if problems:
            errors.append(f"line {n}: " + "; ".join(problems))
            continue
        obj.setdefault("answer", "")
        held_out = stable_hash("split:" + obj["question"]) < test_fraction
        obj.setdefault("split", "test" if held_out else "train")
        pairs.append(obj)
    if errors:
        more = f"; ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{path}: {len(errors)} bad line(s): " + "; ".join(errors[:20]) + more)
    if not pairs:
        raise ValueError(f"{path}: no question-answer pairs")
    return pairs


def normalize(text):
    """SQuAD's answer normalization: lower case, punctuation and the articles a/an/the removed,
    whitespace collapsed (stage 6 scores with it, qa_data checks answers with it)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_squad(text):
    """True for one JSON document (SQuAD): its first line is not a whole JSON object of its own
    but starts one, or it is an object with "data"."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return first.startswith("{")
    return isinstance(obj, dict) and "data" in obj


def expect(value, kind, where):
    """value if it is of the JSON type kind (list, dict, str, bool), else a ValueError naming where."""
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        want = {list: "a list", dict: "an object", str: "a non-empty string", bool: "true or false"}[kind]
        raise ValueError(f"{where} must be {want}, got {json.dumps(value)[:60]}")
    return value


def read_squad(path, text, test_fraction=0.1):
    """Pairs from the SQuAD JSON format, v1.1 or v2.0: {"data": [{"title", "paragraphs": [{"context",
    "qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}.
    Every gold answer is kept ("answers", scored as SQuAD does: the best match), "answer" is the
    first; an impossible question (v2.0) has answer "" (plausible_answers are not golds). The split
    is fixed by the question's id (or text) hash. A malformed file is a ValueError naming the first
    bad place, e.g. data[0].paragraphs[2].qas[1].answers."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                         "a SQuAD file is one JSON object") from None
    pairs = []
    try:
        for a, article in enumerate(expect(expect(doc, dict, "the file").get("data"), list, "data")):
            where = f"data[{a}]"
            title = str(expect(article, dict, where).get("title", ""))
            for g, para in enumerate(expect(article.get("paragraphs"), list, f"{where}.paragraphs")):
                at = f"{where}.paragraphs[{g}]"
                context = expect(expect(para, dict, at).get("context"), str, f"{at}.context")
                for k, qa in enumerate(expect(para.get("qas"), list, f"{at}.qas")):
                    pairs.append(squad_pair(expect(qa, dict, f"{at}.qas[{k}]"), context, title,
                                            f"{at}.qas[{k}]", test_fraction))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if not pairs:
        raise ValueError(f"{path}: no questions in its data")
    return pairs


def squad_pair(qa, context, title, where, test_fraction):
    """One SQuAD question as a stage 6 pair (read_squad)."""
    question = expect(qa.get("question"), str, f"{where}.question")
    impossible = expect(qa.get("is_impossible", False), bool, f"{where}.is_impossible")
    answers = [] if impossible else expect(qa.get("answers"), list, f"{where}.answers")
    golds = [expect(expect(x, dict, f"{where}.answers[{i}]").get("text"), str, f"{where}.answers[{i}].text")
             for i, x in enumerate(answers)]
    if not impossible and not golds:
        raise ValueError(f"{where}.answers is empty but is_impossible is not true")
    held_out = stable_hash("split:" + str(qa.get("id", question))) < test_fraction
    return {"question": question, "answer": golds[0] if golds else "", "answers": golds or [""],
            "context": context, "kind": "none" if impossible else "squad", "article": title,
            "is_impossible": impossible, "split": "test" if held_out else "train"}


def save_lora(path, lora, cfg, base_path):
    """Adapters as a small npz: lora/<name>.B, lora/<name>.A, lora/embed.weight.row.<id> (trained
    embedding rows), lora/<gain name>.delta (trained RMSNorm gains) and a JSON config (no pickle)."""
    doc = {"format": "spike-transformer-lora", "version": 1, "rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
           "targets": cfg.lora_targets, "tokens": cfg.lora_tokens, "base": str(base_path)}
    arrays = {"config.json": np.frombuffer(json.dumps(doc).encode(), np.uint8)}
    arrays.update({"lora/" + k: np.asarray(v, np.float32) for k, v in lora.items()})
    return atomic_write(path, lambda f: np.savez(f, **arrays))    # a failed save keeps the old file


def load_lora(path, params):
    """(adapters, scale) from save_lora's file; checks each adapter against the base's shapes.
    Anything else (a missing, truncated or foreign file) is a CheckpointError naming the file."""
    if not Path(path).is_file():
        raise CheckpointError(f"no LoRA adapters at {path}: train them with --method lora, "
                              f"or pass --adapters FILE")
    try:
        arrays = read_npz(path)
        doc = json.loads(arrays.pop("config.json").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is not a readable LoRA adapter file ({type(err).__name__}: {err}); "
                              f"retrain the adapters") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: its config.json is a JSON {type(doc).__name__}, not an object")
    if doc.get("format") != "spike-transformer-lora":
        raise CheckpointError(f"{path} is not a LoRA adapter file (format={doc.get('format')!r})")
    rank, alpha = doc.get("rank"), doc.get("alpha")
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float))):
        raise CheckpointError(f"{path}: its config needs an integer rank >= 1 and a number alpha")
    lora = {k[len("lora/"):]: v for k, v in arrays.items()}
    vocab, d = params["embed.weight"].shape
    for key, v in lora.items():
        if not np.issubdtype(v.dtype, np.floating):
            raise CheckpointError(f"{path}: lora/{key} is not floating-point")
        if key.startswith(EMBED_ROW):                   # a trained row of the embedding: (d,)
            i = key[len(EMBED_ROW):]
            if not (i.isdecimal() and int(i) < vocab and v.shape == (d,)):
                raise CheckpointError(f"{path}: embedding row {key} {v.shape} does not fit the base model")
            continue
        if key.endswith(GAIN_DELTA):                   # a trained RMSNorm gain's change: as the gain
            n = key[:-len(GAIN_DELTA)]
            if not ("norm" in n and n in params and v.shape == params[n].shape == (d,)):
                raise CheckpointError(f"{path}: norm gain change {key} {v.shape} does not fit the base model")
            continue
        if not key.endswith((".A", ".B")):
            raise CheckpointError(f"{path}: lora/{key} is not an .A or .B adapter, an embedding row or a "
                                  f"norm gain's change")
        n = key[:-2]
        d_in, d_out = params[n].shape if n in params and params[n].ndim == 2 else (None, None)
        want = {".B": (d_in, rank), ".A": (rank, d_out)}.get(key[-2:])
        if d_in is None or v.shape != want or {n + ".A", n + ".B"} - set(lora):     # each B needs its A
            raise CheckpointError(f"{path}: adapter {key} {v.shape} does not fit the base model")
    return lora, alpha / rank
