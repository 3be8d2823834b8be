"""Stage 1: the corpus.

Every later stage reads what this file writes:

    data/<name>/train.txt   UTF-8 training text
    data/<name>/val.txt     UTF-8 validation text
    data/<name>/meta.json   source, settings, counts and sha256 of both files

Four sources, chosen with --source:

    wikipedia      plain-text articles through the MediaWiki API (polite, resumable)
    shakespeare    TinyShakespeare, the classic 1 MB character-level benchmark
    files:PATH     a local text file, or a folder of .txt / .md / .jsonl files
    builtin        an offline corpus built from text every Python carries
                   (the bundled pydoc topics and the standard library's docstrings)

Without --source the stage uses wikipedia when the network answers and falls
back to builtin otherwise. Text is cleaned (Unicode normalisation, whitespace,
markup leftovers, a content filter, exact duplicates, a minimum length) and
split into train/val by *document*, deterministically: a document's fate is a
function of its own text, so adding documents never moves old ones. A source
that is one single file (TinyShakespeare) keeps its last 10% of characters as
validation, exactly as nanoGPT does, so results compare.

    python 1_data.py                          # wikipedia if online, else builtin
    python 1_data.py --source builtin
    python 1_data.py --source files:path/to/tinyshakespeare.txt

From Python (later stages): `load_stage("1_data").prepare("builtin")` returns the
dataset folder, doing nothing when it is already prepared with the same settings.
"""
import argparse
import contextlib
import errno
import hashlib
import http.client
import inspect
import io
import json
import pkgutil
import platform
import re
import socket
import subprocess
import sys
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.cli import add_config_options, given_options  # noqa: E402
from spikelib.files import write_bytes_atomic, write_text_atomic  # noqa: E402

# ----------------------------------------------------------------------------
# config

WIKI_API = "https://en.wikipedia.org/w/api.php"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Wikipedia has no category called "famous people"; Nobel laureates stand in for it.
WIKI_CATEGORIES = ("Nobel laureates,Biology,Physics,History,Chemistry,Mathematics,"
                   "Geography,Literature,Philosophy,Science")
# Wikimedia asks every client to say who it is; add your contact with --user_agent.
USER_AGENT = "SpikeTransformerCorpus/0.1 (teaching corpus builder for a spiking transformer; python-urllib)"


@dataclass
class DataConfig:
    source: str = ""                # wikipedia | shakespeare | files:PATH | builtin; "" = auto
    root: str = "data"              # datasets go to <root>/<name>/
    force: bool = False             # rebuild even when meta.json says it is up to date

    # cleaning
    unicode_form: str = "NFC"       # NFC (lossless) or NFKC (also folds ligatures, full-width, ...)
    min_chars: int = 200            # documents shorter than this after cleaning are dropped
    filter_words: str = "default"   # "default", "none", or a file with one word per line

    # split
    val_fraction: float = 0.1       # share of the documents that go to val.txt
    split_seed: int = 0             # changes which documents land in val

    # wikipedia
    api_url: str = WIKI_API         # the MediaWiki API endpoint to ask
    categories: str = WIKI_CATEGORIES   # comma separated Wikipedia category titles
    per_category: int = 100         # articles collected per category
    max_depth: int = 2              # how deep to walk into subcategories to find articles
    max_bytes: int = 40_000_000     # cap on the raw article text kept (UTF-8 bytes)
    max_articles: int = 0           # stop after this many *new* articles this run (0 = no limit)
    user_agent: str = USER_AGENT    # who is asking, sent with every request (add your contact)
    min_interval: float = 0.5       # seconds between API requests (rate limit)
    timeout: float = 20.0           # seconds per HTTP request
    retries: int = 5                # attempts after the first one, on 429 / 5xx / timeouts / bad JSON
                                    # (a failed name lookup or a refused connection fails at once)
    backoff: float = 2.0            # first retry delay in seconds; doubles each retry
    max_backoff: float = 60.0       # the retry delay stops doubling here (seconds)

    # shakespeare
    shakespeare_url: str = SHAKESPEARE_URL  # where the TinyShakespeare text is downloaded from

    def __post_init__(self):
        """Check every option before any work starts; a bad one is a ValueError naming it."""
        if self.unicode_form not in ("NFC", "NFKC", "NFD", "NFKD"):
            raise ValueError(f"--unicode_form must be NFC, NFKC, NFD or NFKD, got {self.unicode_form!r}")
        if self.filter_words not in ("default", "none") and not Path(self.filter_words).is_file():
            raise ValueError(f"--filter_words: {self.filter_words} is not 'default', 'none' or a file")
        for name, (allowed, words) in NUMBER_OPTIONS.items():
            if not allowed(getattr(self, name)):         # comparisons with NaN are false: refused too
                raise ValueError(f"--{name} must be {words}, got {getattr(self, name)}")


# Each numeric option: the test of an allowed value, and the allowed values in words.
NUMBER_OPTIONS = {
    "min_chars": (lambda v: v >= 1, ">= 1"), "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "per_category": (lambda v: v >= 1, ">= 1"), "max_depth": (lambda v: v >= 0, ">= 0"),
    "max_bytes": (lambda v: v >= 1, ">= 1"), "max_articles": (lambda v: v >= 0, ">= 0 (0 = no limit)"),
    "min_interval": (lambda v: v >= 0, ">= 0"), "timeout": (lambda v: v > 0, "> 0"),
    "retries": (lambda v: v >= 0, ">= 0"), "backoff": (lambda v: v >= 0, ">= 0"),
    "max_backoff": (lambda v: v >= 0, ">= 0"),
}


PRESETS = {
    "default": {},
    "small": {"per_category": 20, "max_bytes": 5_000_000},     # a few minutes of downloading
    "large": {"per_category": 300, "max_bytes": 90_000_000},
}

# Settings that change the produced files; the rest (rate, timeouts) only change how we get there.
OUTPUT_SETTINGS = ("unicode_form", "min_chars", "filter_words", "val_fraction", "split_seed")
WIKI_SETTINGS = ("api_url", "categories", "per_category", "max_depth", "max_bytes")

DOC_SEPARATOR = "\n\n\n"   # cleaning never leaves two blank lines inside a document


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------
# sources: each returns (docs, single_file, complete), docs a list of raw strings

class FetchError(ValueError):
    """A download that failed for good. A ValueError, so every stage's main prints it as one line."""


# errno values of a machine that is offline or cut off: retrying in a minute will not help
UNREACHABLE = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN)


def unreachable(err):
    """What failed, when err says the server cannot be reached at all (else None): a name lookup
    that failed (DNS, the usual sign of no network) or a connection that was refused."""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, socket.gaierror):
        return f"the name lookup failed ({reason.strerror or reason})"
    if isinstance(reason, OSError) and reason.errno in UNREACHABLE:
        return f"the connection failed ({reason.strerror or reason})"
    return None


class HttpClient:
    """urllib with a User-Agent, a minimum interval between requests and retries.

    Retries wait backoff * 2**attempt seconds (or the server's Retry-After, if
    larger), on HTTP 429 and 5xx, timeouts, dropped connections and JSON that
    does not parse. Other HTTP errors (404, 403, ...) fail at once, and so does
    a server that cannot be reached at all (no network: see unreachable()).
    """

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.last_request = 0.0

    def _wait_rate_limit(self):
        wait = self.last_request + self.cfg.min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last_request = time.monotonic()

    def _retry_delay(self, attempt, retry_after=None):
        delay = min(self.cfg.backoff * 2 ** attempt, self.cfg.max_backoff)
        if retry_after is not None and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), self.cfg.max_backoff))
        return delay

    def request(self, url, parse, desc=None):
        """GET url and return parse(response); parse may raise ValueError to ask for a retry."""
        last_error = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                retry_after = getattr(last_error, "retry_after", None)
                delay = self._retry_delay(attempt - 1, retry_after)
                log(f"  retry {attempt}/{self.cfg.retries} in {delay:.1f}s after: {last_error}")
                time.sleep(delay)
            self._wait_rate_limit()
            req = urllib.request.Request(url, headers={"User-Agent": self.cfg.user_agent})
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    return parse(resp, desc)
            except FetchError:
                raise
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    raise FetchError(f"HTTP {e.code} for {url}: {e.reason}") from e
                e.retry_after = e.headers.get("Retry-After") if e.headers else None
                last_error = e
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
                if what := unreachable(e):
                    host = urllib.parse.urlsplit(url).hostname
                    raise FetchError(f"cannot reach {host}: {what}. Offline? Use a local text file "
                                     f"or folder with --source files:PATH, or --source builtin") from None
                last_error = e
        raise FetchError(f"giving up on {url} after {self.cfg.retries + 1} attempts: {last_error}")

    def get_json(self, params):
        url = self.cfg.api_url + "?" + urllib.parse.urlencode(params)
        return self.request(url, _parse_json)

    def get_bytes(self, url, desc):
        return self.request(url, _read_with_progress, desc)


def _parse_json(resp, _):
    data = json.loads(resp.read().decode("utf-8"))   # JSONDecodeError is a ValueError: retried
    if not isinstance(data, dict):
        raise ValueError("response is not a JSON object")
    if "error" in data:
        raise FetchError(f"API error: {data['error']}")
    return data


def _read_with_progress(resp, desc):
    total = int(resp.headers.get("Content-Length") or 0) or None
    chunks = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        while chunk := resp.read(1 << 16):
            chunks.append(chunk)
            bar.update(len(chunk))
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise ConnectionError(f"download cut short: {len(data)} of {total} bytes")
    return data


def network_available(cfg: DataConfig, timeout=3.0):
    """One quick request to the API: is the network (and Wikipedia) reachable?"""
    url = cfg.api_url + "?action=query&meta=siteinfo&format=json"
    req = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, http.client.HTTPException, ValueError):
        return False


# --- wikipedia ---------------------------------------------------------------

def load_article_cache(path: Path):
    """Articles finished by earlier runs, one JSON object per line.

    A run killed mid-write can leave a torn last line; it is cut off here so
    the next append starts on a clean line and nothing finished is lost.
    """
    articles = []
    if not path.exists():
        return articles
    raw = path.read_bytes()
    good = 0
    for line in raw.splitlines(keepends=True):
        try:
            art = json.loads(line)
            if not line.endswith(b"\n") or not {"pageid", "title", "category", "text"} <= set(art):
                raise ValueError
        except ValueError:
            log(f"  {path.name}: dropping a torn line at byte {good} (an interrupted write)")
            break
        articles.append(art)
        good += len(line)
    if good != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return articles


def list_category_pages(client, category, want, max_depth):
    """Up to `want` article titles from a category, walking subcategories breadth first."""
    titles, seen_cats = [], {category}
    queue = [(category, 0)]
    while queue and len(titles) < want:
        cat, depth = queue.pop(0)
        params = {"action": "query", "list": "categorymembers", "cmtitle": "Category:" + cat,
                  "cmtype": "page|subcat", "cmlimit": "500", "format": "json", "formatversion": "2"}
        while len(titles) < want:
            data = client.get_json(params)
            members = data.get("query", {}).get("categorymembers")
            if not isinstance(members, list):
                raise FetchError(f"unexpected categorymembers response for {cat!r}")
            for m in members:
                title = m.get("title", "")
                if m.get("ns") == 0 and title not in titles and len(titles) < want:
                    titles.append(title)
                elif m.get("ns") == 14 and depth < max_depth:
                    sub = title.split(":", 1)[1]
                    if sub not in seen_cats:
                        seen_cats.add(sub)
                        queue.append((sub, depth + 1))
            if "continue" not in data:
                break
            params = {**params, **data["continue"]}
    return titles


def fetch_extract(client, title):
    """The plain-text body of one article (None when the page is missing)."""
    data = client.get_json({"action": "query", "prop": "extracts", "explaintext": "1",
                            "exsectionformat": "plain", "redirects": "1", "titles": title,
                            "format": "json", "formatversion": "2"})
    pages = data.get("query", {}).get("pages")
    if not isinstance(pages, list) or not pages:
        raise FetchError(f"unexpected extracts response for {title!r}")
    page = pages[0]
    if page.get("missing") or "extract" not in page:
        return None
    return {"pageid": page["pageid"], "title": page["title"], "text": page["extract"]}


def collect_wikipedia(cfg: DataConfig, out_dir: Path):
    """Download articles into out_dir/articles.jsonl, resuming from what is already there.

    Each finished article is appended (and flushed) at once, so an interrupted
    run loses at most the article in flight; a rerun skips every title and page
    id already stored, and the raw text never exceeds cfg.max_bytes.
    Returns (articles, complete); complete is False when --max_articles stopped us.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "articles.jsonl"
    articles = load_article_cache(cache)
    have_ids = {a["pageid"] for a in articles}
    have_titles = {a["title"] for a in articles} | {a.get("asked", a["title"]) for a in articles}
    total_bytes = sum(len(a["text"].encode()) for a in articles)
    if articles:
        log(f"resuming: {len(articles)} articles ({total_bytes / 1e6:.1f} MB) already in {cache}")
    client, new = HttpClient(cfg), 0
    categories = [c.strip() for c in cfg.categories.split(",") if c.strip()]
    for cat in categories:
        done = sum(a["category"] == cat for a in articles)
        if done >= cfg.per_category:
            continue
        # list twice what we need: some titles are already held under another category
        titles = list_category_pages(client, cat, 2 * cfg.per_category, cfg.max_depth)
        todo = [t for t in titles if t not in have_titles][:cfg.per_category - done]
        for title in tqdm(todo, desc=f"{cat:>16}", unit="article"):
            if cfg.max_articles and new >= cfg.max_articles:
                log(f"stopping after {new} new articles (--max_articles); rerun to continue")
                return articles, False
            art = fetch_extract(client, title)
            if art is None or art["pageid"] in have_ids:
                continue   # missing page, or a redirect to an article we already have
            size = len(art["text"].encode())
            if total_bytes + size > cfg.max_bytes:
                log(f"size cap reached: {total_bytes / 1e6:.1f} MB of {cfg.max_bytes / 1e6:.1f} MB")
                return articles, True
            art = {**art, "asked": title, "category": cat}
            append_line(cache, json.dumps(art, ensure_ascii=False))
            articles.append(art)
            have_ids.add(art["pageid"])
            have_titles.update((title, art["title"]))
            total_bytes += size
            new += 1
    return articles, True


def append_line(path: Path, line: str):
    """Append one line and close: finished articles are on disk at once, and a run that fails
    before its first article leaves no file behind. (The cache grows by appending, not through
    the atomic rewrite every other file gets: load_article_cache repairs a torn last line.)"""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def wikipedia_docs(cfg, out_dir):
    articles, complete = collect_wikipedia(cfg, out_dir)
    return [a["title"] + "\n\n" + a["text"] for a in articles], False, complete


# --- shakespeare -------------------------------------------------------------

def shakespeare_docs(cfg, out_dir):
    """TinyShakespeare (1.1 MB): downloaded once, kept as input.txt next to the splits."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "input.txt"
    if not raw.exists():
        write_bytes_atomic(raw, HttpClient(cfg).get_bytes(cfg.shakespeare_url, "tinyshakespeare"))
    return [raw.read_text(encoding="utf-8")], True, True


# --- files:PATH --------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def read_jsonl(path: Path):
    """One document per line from the "text" field; every bad line is named, none skipped quietly."""
    docs, errors = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{lineno}: invalid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                errors.append(f'{path}:{lineno}: expected an object with a string "text" field')
                continue
            docs.append(obj["text"])
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{len(errors)} bad line(s) in {path}:\n  " + "\n  ".join(errors[:20]) + more)
    return docs


def read_text_file(path: Path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e


def list_input_files(path: Path):
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"files: source {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"no {'/'.join(TEXT_SUFFIXES)} files under {path}")
    return files


def files_docs(path: Path):
    """A single .txt/.md file is one document (split by characters); anything else by document."""
    files = list_input_files(path)
    docs = []
    for p in files:
        docs += read_jsonl(p) if p.suffix.lower() == ".jsonl" else [read_text_file(p)]
    single = len(files) == 1 and files[0].suffix.lower() != ".jsonl"
    return docs, single, True


def files_fingerprint(path: Path):
    """Name, size and modification time of every input file: cheap, and changes when they do."""
    h = hashlib.sha256()
    for p in list_input_files(path):
        st = p.stat()
        name = p.relative_to(path) if path.is_dir() else p.name
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --- builtin -----------------------------------------------------------------

# Modules never imported: they open windows or browsers, print, write files on import
# (lib2to3 caches grammar pickles), touch the terminal, or are test suites / entry points.
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
                "lib2to3", "distutils", "ensurepip", "venv", "readline", "site", "pydoc_data",
                "sitecustomize", "usercustomize", "msilib", "__phello__", "__hello__"}


def _skip(name):
    parts = name.split(".")
    return (parts[0] in SKIP_MODULES or any(p.startswith("_") for p in parts)
            or any(p in ("test", "tests", "idle_test", "__main__") for p in parts))


def _quiet_import(name):
    """Import a module with its warnings and prints swallowed; None when it fails."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            __import__(name)
            return sys.modules[name]
        except (Exception, SystemExit):   # platform-only modules, missing C libraries, ...
            return None


def module_names(top):
    """The module top and every importable public module under it, packages walked, in walk order."""
    mod = _quiet_import(top)
    if mod is None:
        return []
    names = [top]
    stack = [mod] if hasattr(mod, "__path__") else []   # a package: walk its submodules
    while stack:                                        # (without executing __main__)
        pkg = stack.pop()
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            full = pkg.__name__ + "." + info.name
            if _skip(full):
                continue
            sub = _quiet_import(full)
            if sub is not None:
                names.append(full)
                if info.ispkg and hasattr(sub, "__path__"):
                    stack.append(sub)
    return names


def stdlib_module_names():
    """Every importable public stdlib module, packages walked, in sorted order."""
    tops = [top for top in sorted(sys.stdlib_module_names) if not _skip(top)]
    return sorted(name for top in tops for name in module_names(top))


def _own_doc(obj):
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def module_document(name, seen):
    """A module's docstring followed by those of the classes and functions it defines.

    Objects are named, not signed: a signature can print default values that
    contain memory addresses, which would make the corpus differ between runs.
    For the same reason *hook attributes (sys.excepthook, threading.excepthook,
    ...) are left out: test runners and IDEs swap them at run time.
    Docstrings already used by another object (inherited boilerplate) are skipped.
    """
    mod = sys.modules[name]
    parts = []

    def add(title, obj):
        doc = _own_doc(obj)
        if doc and doc not in seen:
            seen.add(doc)
            parts.append(f"{title}\n{doc}")

    add(f"Module {name}", mod)
    for attr in sorted(vars(mod)):
        obj = vars(mod)[attr]
        if attr.startswith("_") or attr.endswith("hook") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            add(f"class {name}.{attr}", obj)
            for meth in sorted(vars(obj)):
                m = vars(obj)[meth]
                if not meth.startswith("_") and inspect.isroutine(m):
                    add(f"{name}.{attr}.{meth}", m)
        elif inspect.isroutine(obj):
            add(f"{name}.{attr}", obj)
    return "\n\n".join(parts)


def stdlib_docs():
    """pydoc's help topics plus one document per standard-library module."""
    from pydoc_data.topics import topics
    docs = [f"Python help topic: {key}\n\n{topics[key]}" for key in sorted(topics)]
    seen = set()
    for name in stdlib_module_names():
        docs.append(module_document(name, seen))
    return docs


def builtin_docs(cfg, out_dir):
    """stdlib_docs() collected in a fresh interpreter.

    Libraries the caller has already imported patch the standard library
    (torch, for one, replaces inspect.getfile), which would change the corpus;
    a child started with -I (no PYTHON* variables, no user site) sees only itself.
    """
    child = f"import json, runpy; print(json.dumps(runpy.run_path({str(Path(__file__))!r})['stdlib_docs']()))"
    out = subprocess.run([sys.executable, "-I", "-c", child], capture_output=True, check=True)
    return json.loads(out.stdout), False, True


# ----------------------------------------------------------------------------
# cleaning

# A short list of explicit sexual words. Whole words only (plus a plural s), so
# "sex chromosome" or "Essex" are kept; a paragraph containing one is dropped.
# Word lists are blunt: older explicit words also occur in literature (one is in
# The Winter's Tale), so this list sticks to modern vocabulary; pass your own file.
DEFAULT_FILTER_WORDS = ("porn", "porno", "pornographic", "pornography", "blowjob", "handjob",
                        "cumshot", "hentai", "milf", "nsfw", "camgirl")


def load_filter_words(spec):
    if spec == "none":
        return []
    if spec == "default":
        return list(DEFAULT_FILTER_WORDS)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--filter_words: {spec} is not 'default', 'none' or a file")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [w.strip().lower() for w in lines if w.strip() and not w.lstrip().startswith("#")]


def filter_regex(words):
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(set(words)))
    return re.compile(rf"\b(?:{alternatives})s?\b", re.IGNORECASE)


MARKUP_RULES = [
    # wiki: [[target|label]] -> label, [[target]] -> target, '''bold''' / ''italic'' -> text
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"'{2,5}([^'\n]+)'{2,5}"), r"\1"),
    (re.compile(r" *\{\{[^{}]*\}\}"), ""),                         # {{templates}}
    (re.compile(r"^(={2,6}) *(.+?) *\1 *$", re.M), r"\2"),          # == Heading == -> Heading
    # html tags and comments; entities are decoded separately
    (re.compile(r" *<!--.*?-->", re.S), ""),
    (re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>"), ""),
    # reST: :role:`text` -> text, ``literal`` -> literal, `text <url>`_ -> text, directives
    (re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`"), r"\1"),
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"`([^`<]+?) <[^>]+>`_"), r"\1"),
    (re.compile(r"^\.\. [a-z-]+::.*$", re.M), ""),
    (re.compile(r"(?<=\w)::$", re.M), ":"),                         # "Example::" renders "Example:"
    # doctest: the ">>> " prompts stay (a REPL transcript is good text), the directives go
    (re.compile(r" *# *doctest: *[+-][A-Z_]+(?:, *[+-][A-Z_]+)*"), ""),
]
HTML_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'", "&nbsp;": " "}


def strip_displaystyle(text):
    """Drop '{\\displaystyle ...}' LaTeX that Wikipedia's plain-text extracts leave behind."""
    out, i = [], 0
    while (j := text.find("{\\displaystyle", i)) != -1:
        out.append(text[i:j].rstrip(" "))
        depth, k = 0, j
        while k < len(text):               # find the matching closing brace
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
            if depth == 0:
                break
        i = k
    out.append(text[i:])
    return "".join(out)


def strip_markup(text):
    text = strip_displaystyle(text)
    for pattern, repl in MARKUP_RULES:
        text = pattern.sub(repl, text)
    for entity, char in HTML_ENTITIES.items():
        text = text.replace(entity, char)
    return text


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")


def normalize_whitespace(text):
    """No control characters, tabs or trailing spaces, at most one blank line in a row.

    Spaces inside a line are left alone: docstrings hold indented code and
    aligned tables, and TinyShakespeare should stay (almost) byte for byte.
    """
    text = text.replace("\u00a0", " ").expandtabs(4)
    text = CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def clean_document(text, cfg, banned):
    """Normalise, strip markup, drop paragraphs with a banned word. Returns (text, n_dropped)."""
    text = unicodedata.normalize(cfg.unicode_form, text)
    text = normalize_whitespace(strip_markup(text.replace("\r\n", "\n").replace("\r", "\n")))
    if banned is None:
        return text, 0
    paragraphs = text.split("\n\n")
    kept = [p for p in paragraphs if not banned.search(p)]
    return "\n\n".join(kept), len(paragraphs) - len(kept)


def clean_corpus(docs, cfg, single_file):
    """Clean every document, then drop short ones and exact duplicates (first copy wins)."""
    banned = filter_regex(load_filter_words(cfg.filter_words))
    stats = {"raw_docs": len(docs), "filtered_paragraphs": 0, "short": 0, "duplicates": 0}
    out, seen = [], set()
    for doc in tqdm(docs, desc="cleaning", unit="doc", disable=len(docs) < 1000):
        text, dropped = clean_document(doc, cfg, banned)
        stats["filtered_paragraphs"] += dropped
        if len(text) < (1 if single_file else cfg.min_chars):
            stats["short"] += 1
            continue
        key = hashlib.sha256(text.encode()).digest()
        if key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        out.append(text)
    if not out:
        raise ValueError(f"no documents left after cleaning ({stats}); try a smaller --min_chars")
    return out, stats


# ----------------------------------------------------------------------------
# split and write

def doc_score(text, seed):
    """A number in [0, 1) fixed by the document's text: its place in the split."""
    h = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def split_documents(docs, val_fraction, seed):
    """Documents scoring below val_fraction go to val; order within each split is kept.

    At least one document lands in each split when there are two or more.
    """
    scores = [doc_score(d, seed) for d in docs]
    is_val = [s < val_fraction for s in scores]
    if len(docs) >= 2 and not any(is_val):
        is_val[scores.index(min(scores))] = True
    if len(docs) >= 2 and all(is_val):
        is_val[scores.index(max(scores))] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def split_single_text(text, val_fraction):
    """nanoGPT's split of one long text: the first 90% trains, the last 10% validates."""
    n = len(text)
    cut = int(n * (1 - val_fraction))
    return text[:cut], text[cut:]


def sha256_file(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_dataset(out_dir, train_text, val_text, n_train, n_val, meta):
    """train.txt, val.txt, then meta.json last: a dataset without meta.json is unfinished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    for name, text, n_docs in (("train", train_text, n_train), ("val", val_text, n_val)):
        path = out_dir / f"{name}.txt"
        write_text_atomic(path, text)
        meta[f"{name}_docs"] = n_docs
        meta[f"{name}_chars"] = len(text)
        meta[f"{name}_bytes"] = path.stat().st_size
        meta.setdefault("sha256", {})[path.name] = sha256_file(path)
    write_text_atomic(out_dir / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


# ----------------------------------------------------------------------------
# main

def dataset_name(source):
    if source.startswith("files:"):
        p = Path(source[len("files:"):])
        return (p.stem if p.is_file() else p.name) or "files"
    if source not in ("wikipedia", "shakespeare", "builtin"):
        raise ValueError(f"unknown source {source!r}: use wikipedia, shakespeare, files:PATH or builtin")
    return source


def resolve_source(cfg: DataConfig):
    if cfg.source:
        return cfg.source
    if network_available(cfg):
        return "wikipedia"
    log("network unreachable: using the offline --source builtin (pass --source to choose)")
    return "builtin"


def settings_of(cfg: DataConfig, source):
    """Everything that decides the output files; equal settings mean the files need no rebuild."""
    s = {k: getattr(cfg, k) for k in OUTPUT_SETTINGS}
    s["source"] = source
    s["stage_sha256"] = sha256_file(Path(__file__))   # edited cleaning code means new output
    if source == "wikipedia":
        s.update({k: getattr(cfg, k) for k in WIKI_SETTINGS})
    elif source == "shakespeare":
        s["shakespeare_url"] = cfg.shakespeare_url
    elif source == "builtin":
        s["python"] = platform.python_version()   # docstrings change between Python versions
    else:
        path = Path(source[len("files:"):]).resolve()
        s["input_fingerprint"] = files_fingerprint(path)
    if cfg.filter_words not in ("default", "none"):
        s["filter_words_sha256"] = sha256_file(Path(cfg.filter_words))
    return s


def is_up_to_date(out_dir: Path, settings):
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        return meta["complete"] and meta["settings"] == settings and all(
            sha256_file(out_dir / name) == digest for name, digest in meta["sha256"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def collect(source, cfg, out_dir):
    if source == "wikipedia":
        return wikipedia_docs(cfg, out_dir)
    if source == "shakespeare":
        return shakespeare_docs(cfg, out_dir)
    if source == "builtin":
        return builtin_docs(cfg, out_dir)
    return files_docs(Path(source[len("files:"):]))


def print_summary(out_dir, meta, seconds):
    rows = [("split", "documents", "characters", "bytes", "sha256")]
    for name in ("train", "val"):
        rows.append((name, f"{meta[name + '_docs']:,}", f"{meta[name + '_chars']:,}",
                     f"{meta[name + '_bytes']:,}", meta["sha256"][name + ".txt"][:16]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    log(f"\n{out_dir}  (source {meta['source']}, {seconds:.1f}s)")
    for r in rows:
        log("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    d = meta["dropped"]
    log(f"  dropped: {d['short']} short, {d['duplicates']} duplicate documents, "
        f"{d['filtered_paragraphs']} filtered paragraphs (of {d['raw_docs']} raw documents)")


def run(cfg: DataConfig) -> Path:
    t0 = time.time()
    source = resolve_source(cfg)
    out_dir = Path(cfg.root) / dataset_name(source)
    settings = settings_of(cfg, source)
    if not cfg.force and is_up_to_date(out_dir, settings):
        log(f"{out_dir} is up to date (same settings, files unchanged): nothing to do")
        return out_dir
    docs, single_file, complete = collect(source, cfg, out_dir)
    docs, stats = clean_corpus(docs, cfg, single_file)
    if single_file:
        train_text, val_text = split_single_text(docs[0], cfg.val_fraction)
        n_train, n_val = 1, 1
    else:
        train, val = split_documents(docs, cfg.val_fraction, cfg.split_seed)
        train_text = DOC_SEPARATOR.join(train) + "\n"
        val_text = DOC_SEPARATOR.join(val) + "\n" if val else ""
        n_train, n_val = len(train), len(val)
    meta = {"stage": "1_data", "format": 1, "source": source, "name": out_dir.name,
            "settings": settings, "complete": complete, "single_file": single_file,
            "doc_separator": None if single_file else DOC_SEPARATOR, "dropped": stats}
    meta = write_dataset(out_dir, train_text, val_text, n_train, n_val, meta)
    print_summary(out_dir, meta, time.time() - t0)
    if not complete:
        log("collection incomplete: these files hold what is there so far; rerun to continue")
    return out_dir


def prepare(source="builtin", root="data", **options) -> Path:
    """Make data/<name>/{train.txt,val.txt,meta.json} (a no-op when up to date); return the folder.

    source=None picks wikipedia when online, else builtin. options are DataConfig fields.
    """
    unknown = set(options) - {f.name for f in fields(DataConfig)}
    if unknown:
        raise TypeError(f"prepare() got unknown options {sorted(unknown)}")
    return run(DataConfig(source=source or "", root=str(root), **options))


def parse_args(argv=None) -> DataConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="named settings, mostly how much Wikipedia to fetch: " + str(PRESETS))
    add_config_options(p, DataConfig, "settings (DataConfig)", {k: {"data": v} for k, v in PRESETS.items()},
                       "data", dashed=True)
    args = p.parse_args(argv)
    return DataConfig(**{**asdict(DataConfig()), **PRESETS[args.preset], **given_options(args, DataConfig)})


def main(argv=None):
    try:
        run(parse_args(argv))
    except (FetchError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished downloads are kept; rerun the same command to resume")


if __name__ == "__main__":
    main()
