"""Stage 2 (2_tokenizer.py): lossless round trip, determinism, vocabulary, JSON file, dataset build."""
import errno
import json
import random
import subprocess
import sys

import numpy as np
import pyphen
import pytest

from spikelib.stages import ROOT, load_stage

tk = load_stage("2_tokenizer")

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. A syllable tokenizer splits every word into "
    "syllables, so that frequent pieces like the, tion and ing become single tokens.\n"
    "Hyphenation patterns decide where a word may be broken: hy-phen-ation, syl-la-ble.\n"
    "    def function(argument):\n        return argument * 2  # indented code\n\n"
    "Café, naïve, résumé — “quoted” text costs € and ¥; 東京 is a city. 😀 emoji too.\n"
)


@pytest.fixture(scope="module")
def tok():
    return tk.Tokenizer.train(ENGLISH * 20, vocab_size=400, progress=False)


# ----------------------------------------------------------------------------
# random Unicode text, seeded (no hypothesis): every kind of character the encoder must survive

WORDS = ["the", "The", "THE", "syllable", "Tokenizer", "hyphenation", "naïve", "fox", "a", "I",
         "internationalization", "x" * 100]
POOLS = {
    "words": lambda r: r.choice([" ", ""]) + r.choice(WORDS),
    "ascii": lambda r: chr(r.randrange(32, 127)),
    "space": lambda r: r.choice([" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\xa0",
                                 "\u2028", "\u3000", " " * r.randrange(1, 300), "\n" * r.randrange(1, 9)]),
    "control": lambda r: chr(r.choice(list(range(0, 32)) + [127] + list(range(0x80, 0xA0)))),
    "digits": lambda r: r.choice(["0", "7", "2024", " 3.14", "٣", "²", "Ⅻ"]),
    "emoji": lambda r: r.choice(["😀", "👩\u200d👩\u200d👧", "🇺🇳", "👍🏽", "❤️", "🦀"]),
    "cjk": lambda r: "".join(chr(r.randrange(0x4E00, 0xA000)) for _ in range(r.randrange(1, 12))),
    "combining": lambda r: r.choice("aeoAEO") + "".join(chr(r.randrange(0x300, 0x370))
                                                         for _ in range(r.randrange(1, 4))),
    "surrogate": lambda r: chr(r.randrange(0xD800, 0xE000)),   # lone, valid in a Python str only
    "any": lambda r: chr(r.randrange(0, 0x110000)),
}


def random_string(r):
    n = r.choice([0, 1, 2, 5, 20, 80])
    return "".join(POOLS[r.choice(sorted(POOLS))](r) for _ in range(n))


def random_strings(seed, n=400):
    r = random.Random(seed)
    return [random_string(r) for _ in range(n)]


SPECIAL_CASES = ["", " ", "\n", "\r\n", "\t\t", " " * 1000, "\n\n\n", "a", " the", "The  cat",
                 "<bos><q>hi</q><eos>", "\ud83d\ude00", "\ud800", "\udfff x \ud800", "\x00\x01\x7f",
                 "e\u0301", "x" * 5000, "0123456789", "MiXeD CaSe wOrDs", "\ufeff\u200b\u200d"]


def test_pretokenize_covers_every_character():
    for s in SPECIAL_CASES + random_strings(1):
        assert "".join(tk.pretokenize(s)) == s


def test_round_trip_on_special_cases(tok):
    for s in SPECIAL_CASES:
        assert tok.decode(tok.encode(s)) == s, repr(s)


def test_round_trip_on_random_unicode(tok):
    for s in random_strings(2):
        ids = tok.encode(s)
        assert all(tk.N_SPECIAL <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s, repr(s)


def test_round_trip_concatenated_random_text_and_cached_encoding_agrees(tok):
    s = "".join(random_strings(3, 200))
    first = tok.encode(s)
    assert tok.encode(s) == first                      # second pass answers from the cache
    tok.clear_cache()
    assert tok.encode(s) == first
    assert tok.decode(first) == s


def test_text_blocks_cut_only_at_chunk_boundaries(tok):
    s = (ENGLISH + "".join(random_strings(4, 100))) * 5
    blocks = list(tk.text_blocks(s, size=97))
    assert len(blocks) > 5 and "".join(blocks) == s
    assert [i for b in blocks for i in tok.encode(b)] == tok.encode(s)


def test_special_tokens_are_never_produced_by_text(tok):
    ids = tok.encode("<pad><bos><eos><q><a><sys><user><assistant>")
    assert min(ids) >= tk.N_SPECIAL
    names = ["<pad>", "<bos>", "<eos>", "<q>", "<a>", "<sys>", "<user>", "<assistant>"]
    got = [tok.token_id(n) for n in names]
    assert sorted(got) == list(range(8)) and len(set(got)) == 8
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (got[0], got[1], got[2])
    assert tok.decode([tok.bos_id] + tok.encode("hi") + [tok.eos_id]) == "<bos>hi<eos>"
    assert tok.decode([tok.bos_id] + tok.encode("hi"), skip_special=True) == "hi"
    with pytest.raises(KeyError, match="not a special token"):
        tok.token_id("<unk>")


def test_decode_rejects_bad_ids_and_survives_broken_bytes(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    # a lone UTF-8 lead byte (as a model might sample) decodes to U+FFFD, the rest survives
    lead = tk.BYTE0 + 0xE2
    assert tok.decode([lead] + tok.encode("ok")) == "\ufffdok"
    assert tok.decode(np.array(tok.encode("numpy ids"), dtype=np.uint16)) == "numpy ids"


def test_syllables_follow_pyphen_and_keep_the_leading_space():
    hyph = pyphen.Pyphen(lang="en_US")
    for word in ["hyphenation", "syllable", "internationalization", "Tokenizer", "the"]:
        expected = hyph.inserted(word).split("-")   # pyphen's own hyphenated spelling
        assert tk.syllables(word, hyph) == expected
        spaced = tk.syllables(" " + word, hyph)
        assert spaced == [" " + expected[0]] + expected[1:]
    assert tk.syllables("  \n", hyph) == ["  \n"] and tk.syllables("...", hyph) == ["..."]


def test_frequent_words_become_one_token(tok):
    # " the" occurs 40 times in the training text: a single space-prefixed piece
    assert len(tok.encode(" the")) == 1
    assert tok.id_to_piece(tok.encode(" the")[0]) == " the"


# ----------------------------------------------------------------------------
# vocabulary and determinism

@pytest.mark.parametrize("vocab_size", [264, 300, 350])
def test_vocab_size_is_exact(vocab_size):
    t = tk.Tokenizer.train(ENGLISH * 20, vocab_size=vocab_size, min_count=1, progress=False)
    assert t.vocab_size == vocab_size == len(t.id_bytes) == len(t.token_kinds())
    assert len(set(t.pieces)) == len(t.pieces)
    assert max(t.encode(ENGLISH)) < vocab_size


def test_small_corpus_gives_smaller_vocab_and_bad_sizes_are_refused():
    t = tk.Tokenizer.train("tiny text tiny text", vocab_size=2000, progress=False)
    assert tk.PIECE0 <= t.vocab_size < 2000
    for bad in (10, 263, 65536):
        with pytest.raises(ValueError, match="vocab_size"):
            tk.Tokenizer.train(ENGLISH, vocab_size=bad, progress=False)
    with pytest.raises(ValueError, match="hyphenation patterns"):
        tk.Tokenizer.train(ENGLISH, lang="xx_NOPE", progress=False)


def test_pieces_are_the_most_frequent_candidates():
    text = " banana" * 50 + " cherry" * 30 + " é" * 20 + " kiwi" * 3
    t = tk.Tokenizer.train(text, vocab_size=tk.PIECE0 + 3, progress=False)
    counts = {}
    hyph = pyphen.Pyphen(lang="en_US")
    for chunk in tk.pretokenize(text):
        for p in tk.syllables(chunk, hyph):
            if len(p) > 1:
                counts[p] = counts.get(p, 0) + 1
    counts["é"] = 20
    top = sorted(counts, key=lambda p: (-counts[p], p))[:3]
    assert t.pieces == top


def test_same_corpus_same_tokenizer_sha256(tmp_path):
    a = tk.Tokenizer.train(ENGLISH * 10, vocab_size=350, progress=False)
    b = tk.Tokenizer.train(ENGLISH * 10, vocab_size=350, progress=False)
    assert a.sha256() == b.sha256()
    c = tk.Tokenizer.train(ENGLISH * 10 + " quartz" * 50, vocab_size=350, progress=False)
    assert c.sha256() != a.sha256()


def test_other_language(tmp_path):
    text = "Die Silbentrennung zerlegt Wörter in Silben. Silbentrennung ist nützlich.\n" * 10
    t = tk.Tokenizer.train(text, vocab_size=300, lang="de_DE", progress=False)
    assert t.decode(t.encode(text)) == text
    t.save(tmp_path / "de.json")
    assert tk.Tokenizer.load(tmp_path / "de.json").lang == "de_DE"


# ----------------------------------------------------------------------------
# the JSON file

def test_json_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["format"] == tk.FORMAT and obj["version"] == tk.VERSION
    back = tk.Tokenizer.load(path)
    assert back.sha256() == tok.sha256() and back.pieces == tok.pieces
    for s in SPECIAL_CASES + random_strings(5, 50):
        assert back.encode(s) == tok.encode(s)


def corrupt(tok, tmp_path, edit):
    obj = tok.to_dict()
    edit(obj)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.update(version=2), "version 2"),
    (lambda o: o.update(format="something-else"), "not a tokenizer file"),
    (lambda o: o.pop("pieces"), "missing the field"),
    (lambda o: o.pop("lang"), "missing the field"),
    (lambda o: o.update(vocab_size=12345), "does not match"),
    (lambda o: o["pieces"].append(o["pieces"][0]), "unique"),
    (lambda o: o["pieces"].append("a"), "single ASCII"),
    (lambda o: o["pieces"].append(7), "non-empty strings"),
    (lambda o: o.update(special_tokens=["<bos>"]), "special_tokens"),
    (lambda o: o.update(lang="xx_NOPE"), "hyphenation patterns"),
])
def test_bad_tokenizer_files_give_clear_errors(tok, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        tk.Tokenizer.load(corrupt(tok, tmp_path, edit))


def test_malformed_files_give_clear_errors(tmp_path):
    cases = {"truncated.json": b'{"format": "spike-syllable-tokenizer", "vers',
             "list.json": b"[1, 2, 3]", "empty.json": b"", "binary.json": b"\xff\xfe\x00garbage"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a tokenizer file"):
            tk.Tokenizer.load(tmp_path / name)


# ----------------------------------------------------------------------------
# building a dataset

@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    """Stage 1's offline builtin corpus in a temporary root (about a second), tokenized by build()."""
    root = tmp_path_factory.mktemp("data")
    data_dir = load_stage("1_data").prepare("builtin", root=root)
    assert tk.build(data_dir) == data_dir
    return data_dir


def test_build_writes_bins_that_decode_to_the_text(builtin_dir):
    meta = json.loads((builtin_dir / "tokens.json").read_text())
    tok = tk.Tokenizer.load(builtin_dir / "tokenizer.json")
    assert meta["tokenizer_sha256"] == tok.sha256() and meta["vocab_size"] == tok.vocab_size == 2000
    for split in ("train", "val"):
        text = (builtin_dir / f"{split}.txt").read_text(encoding="utf-8")
        ids = np.memmap(builtin_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(ids) == meta[f"{split}_tokens"] and len(text) == meta[f"{split}_chars"]
        assert tok.decode(ids) == text
        assert np.array_equal(ids, tok.encode(text))


def test_compression_on_builtin_corpus(builtin_dir):
    meta = json.loads((builtin_dir / "tokens.json").read_text())
    n_chars = meta["train_chars"] + meta["val_chars"]
    n_tokens = meta["train_tokens"] + meta["val_tokens"]
    assert meta["chars_per_token"] == pytest.approx(n_chars / n_tokens, abs=1e-4)
    assert n_chars / n_tokens >= 2.0
    cov = meta["coverage"]
    assert sum(cov.values()) == pytest.approx(1.0, abs=1e-3) and cov["pieces"] > 0.5


def test_build_is_a_no_op_when_up_to_date_and_rebuilds_on_change(builtin_dir, capsys):
    bins = [builtin_dir / n for n in ("tokenizer.json", "train.bin", "val.bin", "tokens.json")]
    stamps = [p.stat().st_mtime_ns for p in bins]
    tk.build(builtin_dir)
    assert [p.stat().st_mtime_ns for p in bins] == stamps
    assert "up to date" in capsys.readouterr().err
    # a damaged output is noticed and rebuilt
    (builtin_dir / "val.bin").write_bytes(b"\x00\x00")
    tk.build(builtin_dir)
    meta = json.loads((builtin_dir / "tokens.json").read_text())
    assert (builtin_dir / "val.bin").stat().st_size == 2 * meta["val_tokens"] > 2


def test_build_rebuilds_for_new_settings_or_input(tmp_path):
    d = tmp_path / "mini"
    d.mkdir()
    (d / "train.txt").write_text(ENGLISH * 30, encoding="utf-8")
    (d / "val.txt").write_text(ENGLISH, encoding="utf-8")
    tk.build(d, vocab_size=300)
    assert json.loads((d / "tokens.json").read_text())["vocab_size"] == 300
    tk.build(d, vocab_size=320)
    assert json.loads((d / "tokens.json").read_text())["vocab_size"] == 320
    sha = json.loads((d / "tokens.json").read_text())["tokenizer_sha256"]
    (d / "train.txt").write_text(ENGLISH * 30 + " quartz" * 100, encoding="utf-8")
    tk.build(d, vocab_size=320)
    meta = json.loads((d / "tokens.json").read_text())
    assert meta["tokenizer_sha256"] != sha
    assert " quartz" in tk.Tokenizer.load(d / "tokenizer.json").pieces


def test_build_without_settings_keeps_the_datasets_tokenizer(tmp_path):
    """A later stage calls build(d): it must not replace a tokenizer built with --vocab-size."""
    d = tmp_path / "chars"
    d.mkdir()
    (d / "train.txt").write_text(ENGLISH * 30, encoding="utf-8")
    (d / "val.txt").write_text(ENGLISH, encoding="utf-8")
    tk.build(d, vocab_size=tk.PIECE0)                  # bytes only: one token per ASCII character
    sha = json.loads((d / "tokens.json").read_text())["tokenizer_sha256"]
    tk.build(d)
    meta = json.loads((d / "tokens.json").read_text())
    assert (meta["vocab_size"], meta["tokenizer_sha256"]) == (tk.PIECE0, sha)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("train.txt", "val.txt"):
        (fresh / name).write_text((d / name).read_text(encoding="utf-8"), encoding="utf-8")
    tk.build(fresh)                                    # nothing recorded: the config's default
    recorded = json.loads((fresh / "tokens.json").read_text())["settings"]
    assert recorded["vocab_size"] == tk.TokenizerConfig().vocab_size


def mini_dataset(tmp_path, vocab_size=300):
    d = tmp_path / "mini"
    d.mkdir()
    (d / "train.txt").write_text(ENGLISH * 30, encoding="utf-8")
    (d / "val.txt").write_text(ENGLISH, encoding="utf-8")
    tk.build(d, vocab_size=vocab_size)
    return d


def test_check_token_ids_accepts_a_build_and_names_bad_bins(tmp_path):
    d = mini_dataset(tmp_path)
    assert tk.check_token_ids(d) == 300
    val = (d / "val.bin").read_bytes()
    (d / "val.bin").write_bytes(val[:-1])                          # a torn copy: half an id
    with pytest.raises(ValueError, match=r"val.bin has \d+ bytes, an odd number.*--force") as err:
        tk.check_token_ids(d)
    assert "\n" not in str(err.value)
    (d / "val.bin").write_bytes(val + np.array([299, 300], "<u2").tobytes())   # 300 = vocab_size
    with pytest.raises(ValueError, match=r"val.bin holds token id 300, outside the vocabulary .*size 300"):
        tk.check_token_ids(d)
    (d / "val.bin").write_bytes(b"")                               # an empty split holds no bad id
    assert tk.check_token_ids(d) == 300
    (d / "train.bin").unlink()
    with pytest.raises(FileNotFoundError, match="train.bin not found"):
        tk.check_token_ids(d)


def test_a_build_that_runs_out_of_disk_keeps_the_previous_files(tmp_path, monkeypatch):
    d = mini_dataset(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    calls = []

    def encode_then_disk_full(self, text):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return encode(self, text)
    encode = tk.Tokenizer.encode
    monkeypatch.setattr(tk.Tokenizer, "encode", encode_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        tk.build(d, vocab_size=320)                                 # a new build, failing midway
    after = {p.name: p.read_bytes() for p in d.iterdir()}
    assert after.keys() == before.keys()                            # no temp file left behind
    assert after["val.bin"] == before["val.bin"]                    # the file being written: intact
    assert after["tokens.json"] == before["tokens.json"]            # still the old build's record,
    assert not tk.is_up_to_date(d, tk.last_build(d), json.loads(after["tokens.json"])["settings"],
                                json.loads(after["tokens.json"])["inputs"])   # which no longer matches
    monkeypatch.undo()
    assert tk.build(d, vocab_size=320) and tk.check_token_ids(d) == 320   # the rerun completes


def test_build_needs_the_text_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="1_data.py"):
        tk.build(tmp_path)


def test_cli(tmp_path):
    d = tmp_path / "cli"
    d.mkdir()
    (d / "train.txt").write_text(ENGLISH * 30, encoding="utf-8")
    (d / "val.txt").write_text("", encoding="utf-8")   # an empty val split is allowed
    run = subprocess.run([sys.executable, str(ROOT / "2_tokenizer.py"), "--data", str(d),
                          "--vocab-size", "300"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "compression" in run.stderr
    meta = json.loads((d / "tokens.json").read_text())
    assert meta["vocab_size"] == 300 and meta["val_tokens"] == 0
    assert (d / "val.bin").stat().st_size == 0
    bad = subprocess.run([sys.executable, str(ROOT / "2_tokenizer.py"), "--data", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not found" in bad.stderr
    helped = subprocess.run([sys.executable, str(ROOT / "2_tokenizer.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--vocab-size" in helped.stdout
