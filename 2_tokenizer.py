r"""Stage 2: a syllable tokenizer.

A language model reads integers, not text. This stage learns a vocabulary of
frequent *syllables* from data/<name>/train.txt and turns both splits into flat
arrays of token ids that later stages memory-map:

    data/<name>/tokenizer.json   the vocabulary (versioned JSON, never pickle)
    data/<name>/train.bin        uint16 token ids, little-endian, np.memmap-able
    data/<name>/val.bin          same for the validation split
    data/<name>/tokens.json      token and character counts, chars per token, sha256s

How text becomes tokens, in three steps:

1. Pre-tokenize. A regex cuts the text into chunks: words (a run of letters,
   with the single space before it), punctuation runs (also with their space),
   single digits, and whitespace runs. Joining the chunks gives the text back.
       "The cat's  hat\n" -> ["The", " cat", "'", "s", " ", " hat", "\n"]
2. Syllabify. Each word is split with pyphen's hyphenation patterns; the first
   syllable keeps the word's leading space, so " the" is one token, like
   GPT-2's space-prefixed pieces.
       " hyphenation" -> [" hy", "phen", "ation"]
3. Look up. A syllable (or a whitespace/punctuation chunk) in the vocabulary is
   one token. Anything else is covered by the longest known pieces, down to
   single characters, and a character with no token of its own becomes its UTF-8
   bytes. There is no <unk>: decode(encode(s)) == s for every string.

Vocabulary layout (ids):

    0 .. 7        special tokens <pad> <bos> <eos> <q> <a> <sys> <user> <assistant>
                  (never produced by encoding text; token_id("<q>") finds them)
    8 .. 263      the 256 bytes; an ASCII character is its own byte token
    264 ..        learned pieces: non-ASCII characters and multi-character
                  syllables/whitespace/punctuation, chosen by how many tokens
                  they save on the training text

    python 2_tokenizer.py                                # data/builtin (runs stage 1 if needed)
    python 2_tokenizer.py --data data/shakespeare --vocab-size 2000
    python 2_tokenizer.py --source files:my_books/       # runs stage 1 for it first
    python 2_tokenizer.py --data data/shakespeare --vocab-size 264   # no pieces: characters

From Python: `load_stage("2_tokenizer").build(data_dir)` (a no-op when the files
are up to date; it keeps the vocabulary size the dataset was built with) and
`Tokenizer.load(data_dir / "tokenizer.json")`.
"""
import argparse
import hashlib
import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyphen
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.cli import add_config_options, given_options  # noqa: E402
from spikelib.files import atomic_write, write_bytes_atomic  # noqa: E402

# ----------------------------------------------------------------------------
# config


@dataclass
class TokenizerConfig:
    data: str = "data/builtin"  # dataset dir holding train.txt and val.txt (stage 1 output)
    source: str = ""            # if set, run stage 1 for this source first (e.g. files:PATH)
    vocab_size: int = 2000      # total ids, special and byte tokens included (< 65536 for uint16)
    lang: str = "en_US"         # pyphen hyphenation language
    min_count: int = 2          # a piece must occur this often in train.txt to be learned
    force: bool = False         # rebuild even when tokens.json says everything is up to date

    def __post_init__(self):
        """Check every option before any work starts; a bad one is a ValueError naming it."""
        if not PIECE0 <= self.vocab_size < 65536:
            raise ValueError(f"--vocab_size must be in [{PIECE0}, 65535] ({N_SPECIAL} special + 256 byte "
                             f"tokens + learned pieces, uint16 ids), got {self.vocab_size}")
        if self.min_count < 1:
            raise ValueError(f"--min_count must be >= 1, got {self.min_count}")
        check_lang(self.lang)


PRESETS = {
    "default": {},
    "small": {"vocab_size": 512},     # tiny embedding tables for quick experiments
    "large": {"vocab_size": 8192},    # a bigger corpus (wikipedia) can afford more syllables
}

FORMAT = "spike-syllable-tokenizer"
VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<q>", "<a>", "<sys>", "<user>", "<assistant>")
N_SPECIAL = len(SPECIAL_TOKENS)
BYTE0 = N_SPECIAL            # id of byte 0x00; byte b has id BYTE0 + b
PIECE0 = BYTE0 + 256         # id of the first learned piece
MAX_HYPHEN_WORD = 64         # longer letter runs (URLs, CJK text) are not hyphenated
MAX_CACHE = 1_000_000        # distinct chunks remembered by encode()

# One alternative per chunk kind. Every character is whitespace (\s), a word
# character (\w = letters, digits, _) or neither, so the chunks cover any text.
PRETOKEN = re.compile(r"""
      [ ]?[^\W\d_]+          # a word: letters, with the one space before it
    | [ ]?(?:[^\s\w]|_)+     # punctuation / symbols / underscores, with their space
    | \d                     # a single digit: numbers are spelled digit by digit
    | \s+(?!\S)              # whitespace, leaving the last space to the next word
    | \s+                    # the rest: a newline before a word, a space before a digit
""", re.VERBOSE)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# pre-tokenization and syllables


def pretokenize(text):
    """The chunks of `text`; "".join(pretokenize(text)) == text."""
    return PRETOKEN.findall(text)


def syllables(chunk, hyphenator):
    """Split a word chunk at pyphen's hyphenation points; the leading space stays on syllable 1.

    " hyphenation" -> [" hy", "phen", "ation"]. A chunk that is not a word is one piece.
    """
    word = chunk[1:] if chunk[0] == " " else chunk
    if not word.isalpha() or len(word) > MAX_HYPHEN_WORD:
        return [chunk]
    cuts = [0] + sorted(set(hyphenator.positions(word))) + [len(word)]
    parts = [word[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    parts[0] = chunk[:len(chunk) - len(word)] + parts[0]
    return parts


def text_blocks(text, size=1 << 20):
    """Cut text into ~size-char blocks at chunk boundaries, so encoding blocks = encoding the text.

    A newline followed by a non-space character always ends a chunk (only
    whitespace chunks hold newlines, and they stop before non-space), and
    the regex looks only ahead, so every block pre-tokenizes on its own.
    """
    start = 0
    while start < len(text):
        end = start + size
        while end < len(text) and not (text[end - 1] == "\n" and not text[end].isspace()):
            nl = text.find("\n", end)
            end = len(text) if nl < 0 else nl + 1
        yield text[start:end]
        start = end


def utf8_bytes(ch):
    """UTF-8 bytes of one character; a lone surrogate (valid in a Python str) is kept as-is."""
    return ch.encode("utf-8", "surrogatepass")


def utf8_decode(data):
    """Inverse of utf8_bytes over a byte string; invalid bytes (e.g. sampled ones) become U+FFFD."""
    out, start = [], 0
    while True:
        try:
            out.append(data[start:].decode("utf-8", "surrogatepass"))
            return "".join(out)
        except UnicodeDecodeError as e:
            out.append(data[start:start + e.start].decode("utf-8", "surrogatepass"))
            out.append("\ufffd")
            start += e.end


# ----------------------------------------------------------------------------
# training: which pieces earn a place in the vocabulary


def count_chunks(text, progress=True):
    """Counter of pre-tokenized chunks over the text."""
    counts = Counter()
    with tqdm(total=len(text), unit="char", unit_scale=True, desc="counting chunks",
              disable=not progress) as bar:
        for block in text_blocks(text):
            counts.update(pretokenize(block))
            bar.update(len(block))
    return counts


def count_pieces(chunk_counts, hyphenator, progress=True):
    """Counter of candidate pieces: syllables of words, whole other chunks, and characters."""
    pieces, chars = Counter(), Counter()
    for chunk, n in tqdm(chunk_counts.items(), desc="syllables", unit="chunk",
                         disable=not progress):
        for piece in syllables(chunk, hyphenator):
            pieces[piece] += n
        for ch in chunk:
            chars[ch] += n
    return pieces, chars


def choose_pieces(pieces, chars, n_learned, min_count):
    """The n_learned most frequent candidates: non-ASCII characters and multi-character pieces.

    ASCII characters need no slot (they are byte tokens). Ranking by tokens
    saved, count * (len - 1), instead of plain count changes compression by
    under 1% on the builtin corpus, so the simpler rule stays. Ties break
    alphabetically, so training is deterministic.
    """
    candidates = Counter({ch: n for ch, n in chars.items() if ord(ch) >= 128})
    candidates.update({p: n for p, n in pieces.items() if len(p) > 1})
    ranked = sorted((-n, p) for p, n in candidates.items() if n >= min_count and is_utf8(p))
    return [p for _, p in ranked[:n_learned]]


def is_utf8(piece):
    try:
        piece.encode("utf-8")
        return True
    except UnicodeEncodeError:   # lone surrogates: they stay byte-encoded
        return False


# ----------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """Syllable tokenizer: encode(text) -> list of ids, decode(ids) -> text, lossless."""

    def __init__(self, pieces, lang="en_US"):
        check_lang(lang)
        self.pieces = list(pieces)     # learned pieces; piece i has id PIECE0 + i
        self.lang = lang
        self.vocab_size = PIECE0 + len(self.pieces)
        if self.vocab_size >= 65536:
            raise ValueError(f"vocab_size {self.vocab_size} does not fit uint16 token ids (< 65536)")
        self.bos_id = SPECIAL_TOKENS.index("<bos>")
        self.eos_id = SPECIAL_TOKENS.index("<eos>")
        self.pad_id = SPECIAL_TOKENS.index("<pad>")
        # text -> id for everything a text can become: ASCII characters are byte tokens
        self.piece_id = {chr(b): BYTE0 + b for b in range(128)}
        self.piece_id.update({p: PIECE0 + i for i, p in enumerate(self.pieces)})
        self.max_piece_len = max(len(p) for p in self.piece_id)
        # id -> bytes, so decoding is one join and one UTF-8 decode
        self.id_bytes = ([s.encode() for s in SPECIAL_TOKENS] + [bytes([b]) for b in range(256)]
                         + [p.encode("utf-8") for p in self.pieces])
        self.cache = {}                              # chunk -> tuple of ids, filled by encode()
        self.hyphenator = pyphen.Pyphen(lang=lang)   # shares pyphen's loaded patterns

    def clear_cache(self):
        """Forget cached chunks and hyphenations (benchmarks measure a cold start with this)."""
        self.cache = {}
        self.hyphenator = pyphen.Pyphen(lang=self.lang, cache=False)   # fresh patterns, no memo

    # --- training

    @classmethod
    def train(cls, text, vocab_size=2000, lang="en_US", min_count=2, progress=True):
        """Learn vocab_size - 264 pieces from text (fewer if text has too few candidates)."""
        if not PIECE0 <= vocab_size < 65536:
            raise ValueError(f"vocab_size must be in [{PIECE0}, 65535] "
                             f"({N_SPECIAL} special + 256 byte tokens + pieces), got {vocab_size}")
        check_lang(lang)
        hyphenator = pyphen.Pyphen(lang=lang)
        pieces, chars = count_pieces(count_chunks(text, progress), hyphenator, progress)
        chosen = choose_pieces(pieces, chars, vocab_size - PIECE0, min_count)
        if len(chosen) < vocab_size - PIECE0:
            log(f"note: only {len(chosen)} pieces occur >= {min_count} times; "
                f"vocab_size is {PIECE0 + len(chosen)} instead of {vocab_size}")
        return cls(chosen, lang)

    # --- encoding

    def encode(self, text):
        """Token ids of text (no <bos>/<eos>: add them yourself where a document starts/ends)."""
        ids, cache = [], self.cache
        for chunk in pretokenize(text):
            got = cache.get(chunk)
            if got is None:
                got = self.encode_chunk(chunk)
                if len(cache) < MAX_CACHE:
                    cache[chunk] = got
            ids.extend(got)
        return ids

    def encode_chunk(self, chunk):
        """Ids of one chunk: the whole chunk, else its syllables, each by lookup or fallback."""
        if chunk in self.piece_id:
            return (self.piece_id[chunk],)
        ids = []
        for part in syllables(chunk, self.hyphenator):
            got = self.piece_id.get(part)
            if got is not None:
                ids.append(got)
            else:
                ids.extend(self.encode_fallback(part))
        return tuple(ids)

    def encode_fallback(self, text):
        """Greedy longest known piece from the left; a character with no token -> UTF-8 bytes."""
        ids, i = [], 0
        while i < len(text):
            for n in range(min(self.max_piece_len, len(text) - i), 0, -1):
                got = self.piece_id.get(text[i:i + n])
                if got is not None:
                    ids.append(got)
                    i += n
                    break
            else:
                ids.extend(BYTE0 + b for b in utf8_bytes(text[i]))
                i += 1
        return ids

    def decode(self, ids, skip_special=False):
        """Text of ids. Special tokens print as their names ("<bos>") unless skip_special."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if skip_special:
            ids = [i for i in ids if i >= N_SPECIAL]
        return utf8_decode(b"".join([self.id_bytes[i] for i in ids]))

    # --- lookups

    def token_id(self, special):
        """Id of a special or role token, e.g. token_id("<q>")."""
        if special not in SPECIAL_TOKENS:
            raise KeyError(f"{special!r} is not a special token; they are {', '.join(SPECIAL_TOKENS)}")
        return SPECIAL_TOKENS.index(special)

    def id_to_piece(self, i):
        """Readable text of one id: a special name, '<0xNN>' for a byte >= 0x80, else the piece."""
        if i < N_SPECIAL:
            return SPECIAL_TOKENS[i]
        if i < PIECE0:
            b = i - BYTE0
            return chr(b) if b < 128 else f"<0x{b:02X}>"
        return self.pieces[i - PIECE0]

    def token_kinds(self):
        """(vocab_size,) int8 per id: 0 special, 1 byte of a multi-byte character, 2 single
        character, 3 multi-character piece (a syllable, whitespace or punctuation run)."""
        kinds = np.full(self.vocab_size, 2, dtype=np.int8)
        kinds[:N_SPECIAL] = 0
        kinds[BYTE0 + 128:PIECE0] = 1
        kinds[PIECE0:] = [3 if len(p) > 1 else 2 for p in self.pieces]
        return kinds

    # --- JSON

    def to_dict(self):
        return {"format": FORMAT, "version": VERSION, "lang": self.lang,
                "vocab_size": self.vocab_size, "special_tokens": list(SPECIAL_TOKENS),
                "byte_tokens": 256, "pieces": list(self.pieces)}

    def canonical_json(self):
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def sha256(self):
        """sha256 of the canonical JSON: equal hashes mean identical encodings."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def save(self, path):
        """Write the tokenizer as readable JSON (one piece per line), atomically."""
        text = json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"
        write_bytes_atomic(Path(path), text.encode("utf-8"))

    @classmethod
    def load(cls, path):
        """Read a tokenizer file; a malformed, foreign or wrong-version file raises ValueError."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not a tokenizer file: not UTF-8 text ({e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a tokenizer file: invalid JSON ({e})") from None
        return cls.from_dict(obj, str(path))

    @classmethod
    def from_dict(cls, obj, name="tokenizer"):
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"{name} is not a tokenizer file: expected a JSON object with "
                             f'"format": "{FORMAT}"')
        if obj.get("version") != VERSION:
            raise ValueError(f"{name} has tokenizer version {obj.get('version')!r}; this code reads "
                             f"version {VERSION}: rebuild it with python 2_tokenizer.py --force")
        missing = [k for k in ("lang", "vocab_size", "special_tokens", "byte_tokens", "pieces")
                   if k not in obj]
        if missing:
            raise ValueError(f"{name} is missing the field(s) {', '.join(missing)}")
        pieces = obj["pieces"]
        if obj["special_tokens"] != list(SPECIAL_TOKENS) or obj["byte_tokens"] != 256:
            raise ValueError(f"{name}: special_tokens must be {list(SPECIAL_TOKENS)} and byte_tokens 256")
        if not isinstance(pieces, list) or not all(isinstance(p, str) and p for p in pieces):
            raise ValueError(f"{name}: pieces must be a list of non-empty strings")
        bad = [p for p in pieces if (len(p) == 1 and ord(p) < 128) or not is_utf8(p)]
        if bad or len(set(pieces)) != len(pieces):
            raise ValueError(f"{name}: pieces must be unique, valid UTF-8 and not single ASCII "
                             f"characters (those are byte tokens); bad: {bad[:3]!r}")
        if obj["vocab_size"] != PIECE0 + len(pieces):
            raise ValueError(f"{name}: vocab_size {obj['vocab_size']!r} does not match "
                             f"{PIECE0} + {len(pieces)} pieces")
        if not isinstance(obj["lang"], str):
            raise ValueError(f"{name}: lang must be a string")
        return cls(pieces, obj["lang"])


def check_lang(lang):
    if not pyphen.language_fallback(lang):
        raise ValueError(f"pyphen has no hyphenation patterns for {lang!r}; "
                         f"some it has: en_US, en_GB, de_DE, fr_FR, es, it_IT, nl_NL")


# ----------------------------------------------------------------------------
# building a dataset: tokenizer.json, train.bin, val.bin, tokens.json


def sha256_file(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_file(tok, text, path: Path, desc):
    """Encode text block by block into path as flat little-endian uint16; return the token count."""
    counts = []

    def write(f):
        with tqdm(total=len(text), unit="char", unit_scale=True, desc=desc) as bar:
            for block in text_blocks(text):
                ids = np.asarray(tok.encode(block), dtype="<u2")   # vocab < 65536 fits uint16
                f.write(ids.tobytes())
                counts.append(len(ids))
                bar.update(len(block))
    atomic_write(path, write)
    return sum(counts)


def check_token_ids(data_dir, splits=("train", "val")) -> int:
    """Check that data_dir's .bin files fit its tokenizer.json; return the tokenizer's vocab_size.

    A .bin must hold whole uint16 ids (an even number of bytes) and no id >= vocab_size, which
    would index past the model's embedding. One max over a memory map: fast even for 100M tokens.
    Raises ValueError naming the file and the command that rebuilds it.
    """
    data_dir = Path(data_dir)
    vocab_size = Tokenizer.load(data_dir / "tokenizer.json").vocab_size
    rebuild = f"rebuild them with python 2_tokenizer.py --data {data_dir} --force"
    for split in splits:
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {rebuild}")
        size = path.stat().st_size
        if size % 2:
            raise ValueError(f"{path} has {size} bytes, an odd number: not uint16 token ids "
                             f"(a truncated or foreign file); {rebuild}")
        if size and (top := int(np.memmap(path, dtype="<u2", mode="r").max())) >= vocab_size:
            raise ValueError(f"{path} holds token id {top}, outside the vocabulary of "
                             f"{data_dir / 'tokenizer.json'} (vocab_size {vocab_size}); {rebuild}")
    return vocab_size


def token_stats(tok, paths):
    """Share of tokens per kind (piece / single char / byte) over the .bin files."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for path in paths:
        ids = np.fromfile(path, dtype="<u2")
        for start in range(0, len(ids), 1 << 22):   # bincount makes an int64 copy: keep it small
            counts += np.bincount(ids[start:start + (1 << 22)], minlength=tok.vocab_size)
    by_kind = np.bincount(tok.token_kinds(), weights=counts, minlength=4)
    total = max(by_kind.sum(), 1)
    return {"pieces": by_kind[3] / total, "chars": by_kind[2] / total, "bytes": by_kind[1] / total}


def build_settings(vocab_size, lang, min_count):
    """Everything that decides the outputs, besides the input files themselves."""
    return {"vocab_size": vocab_size, "lang": lang, "min_count": min_count,
            "stage_sha256": sha256_file(Path(__file__))}   # edited code means new output


def last_build(data_dir: Path):
    """tokens.json of the dataset's last build: {} if there is none or it cannot be read."""
    try:
        meta = json.loads((data_dir / "tokens.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def is_up_to_date(data_dir: Path, last, settings, inputs):
    try:
        return (last["settings"] == settings and last["inputs"] == inputs and all(
            sha256_file(data_dir / name) == digest for name, digest in last["outputs"].items()))
    except (OSError, KeyError, TypeError, AttributeError):
        return False


def build(data_dir, vocab_size=None, lang=None, min_count=None, force=False) -> Path:
    """Train on data_dir/train.txt; write tokenizer.json, train.bin, val.bin, tokens.json.

    A setting left None keeps the one the dataset was last built with (else the
    TokenizerConfig default), so a later stage never replaces a tokenizer that
    was built here with --vocab-size. Does nothing when tokens.json records the
    same settings and input sha256s and the outputs are unchanged. Returns data_dir.
    """
    t0 = time.time()
    data_dir = Path(data_dir)
    for name in ("train.txt", "val.txt"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"{data_dir / name} not found: prepare the dataset with "
                                    f"python 1_data.py first")
    given = {"vocab_size": vocab_size, "lang": lang, "min_count": min_count}
    last, default = last_build(data_dir), asdict(TokenizerConfig())
    recorded = last.get("settings") if isinstance(last.get("settings"), dict) else {}
    chosen = {k: v if v is not None else recorded.get(k, default[k]) for k, v in given.items()}
    settings = build_settings(**chosen)
    vocab_size, lang, min_count = settings["vocab_size"], settings["lang"], settings["min_count"]
    inputs = {name: sha256_file(data_dir / name) for name in ("train.txt", "val.txt")}
    if not force and is_up_to_date(data_dir, last, settings, inputs):
        log(f"{data_dir} tokens are up to date (same settings and inputs): nothing to do")
        return data_dir
    train_text, val_text = (read_utf8(data_dir / name) for name in ("train.txt", "val.txt"))
    tok = Tokenizer.train(train_text, vocab_size, lang, min_count)
    tok.save(data_dir / "tokenizer.json")
    n_train = encode_file(tok, train_text, data_dir / "train.bin", "encoding train")
    n_val = encode_file(tok, val_text, data_dir / "val.bin", "encoding val")
    n_chars = len(train_text) + len(val_text)
    meta = {"tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size,
            "train_tokens": n_train, "val_tokens": n_val,
            "train_chars": len(train_text), "val_chars": len(val_text),
            "chars_per_token": round(n_chars / max(n_train + n_val, 1), 4),
            "coverage": {k: round(v, 4) for k, v in
                         token_stats(tok, [data_dir / "train.bin", data_dir / "val.bin"]).items()},
            "settings": settings, "inputs": inputs,
            "outputs": {name: sha256_file(data_dir / name)
                        for name in ("tokenizer.json", "train.bin", "val.bin")}}
    # tokens.json is written last: its presence says the other three files are complete
    write_bytes_atomic(data_dir / "tokens.json", (json.dumps(meta, indent=2) + "\n").encode())
    print_summary(data_dir, tok, meta, time.time() - t0)
    return data_dir


def read_utf8(path: Path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); stage 1 writes UTF-8, "
                         f"rerun python 1_data.py") from None


def print_summary(data_dir, tok, meta, seconds):
    c = meta["coverage"]
    rows = [("split", "characters", "tokens", "chars/token")]
    for split in ("train", "val"):
        chars, toks = meta[f"{split}_chars"], meta[f"{split}_tokens"]
        rows.append((split, f"{chars:,}", f"{toks:,}", f"{chars / max(toks, 1):.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    log(f"\n{data_dir}  ({seconds:.1f}s)")
    log(f"  vocab size {tok.vocab_size:,} = {N_SPECIAL} special + 256 bytes + {len(tok.pieces):,} "
        f"learned pieces (lang {tok.lang})")
    for r in rows:
        log("  " + "  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(r, widths))))
    log(f"  compression {meta['chars_per_token']:.3f} characters per token")
    log(f"  coverage: {c['pieces']:.1%} syllable/whitespace/punctuation pieces, "
        f"{c['chars']:.1%} single characters, {c['bytes']:.1%} UTF-8 byte fallbacks")
    sample = " The syllable tokenizer splits hyphenation into pieces."
    log("  example: " + "|".join(tok.id_to_piece(i) for i in tok.encode(sample)))
    log(f"  tokenizer sha256 {meta['tokenizer_sha256'][:16]}...")


# ----------------------------------------------------------------------------
# main


def dataset_dir(cfg: TokenizerConfig) -> Path:
    """The dataset dir to tokenize, running stage 1 first when its output is missing.

    --source runs stage 1 for that source. Without it, a missing data/builtin
    (or data/shakespeare, data/wikipedia) is prepared under the same root.
    """
    data_dir = Path(cfg.data)
    source = cfg.source
    if not source and not (data_dir / "train.txt").is_file():
        if data_dir.name not in ("builtin", "shakespeare", "wikipedia"):
            raise FileNotFoundError(f"{data_dir / 'train.txt'} not found: run python 1_data.py "
                                    f"--source ... first, or pass --source here")
        source = data_dir.name
    if source:
        from spikelib.stages import load_stage
        log(f"running stage 1 for --source {source}")
        data_dir = Path(load_stage("1_data").prepare(source, root=str(data_dir.parent)))
    return data_dir


def parse_args(argv=None) -> TokenizerConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="named settings: " + str(PRESETS))
    add_config_options(p, TokenizerConfig, "settings (TokenizerConfig)",
                       {k: {"tokenizer": v} for k, v in PRESETS.items()}, "tokenizer", dashed=True)
    args = p.parse_args(argv)
    given = given_options(args, TokenizerConfig)
    return TokenizerConfig(**{**asdict(TokenizerConfig()), **PRESETS[args.preset], **given})


def main(argv=None):
    try:
        cfg = parse_args(argv)
        build(dataset_dir(cfg), cfg.vocab_size, cfg.lang, cfg.min_count, cfg.force)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
