"""Stage 1 (1_data.py): sources, cleaning, split, resume. Offline: Wikipedia is a local fake."""
import errno
import hashlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spikelib.stages import ROOT, load_stage

data = load_stage("1_data")

FAST = dict(min_interval=0.0, timeout=0.3, retries=3, backoff=0.01, max_backoff=0.05)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def article_text(i):
    # long enough to pass min_chars, distinct per article
    return f"Article number {i} is about topic {i * 7}.\n\n" + f"Sentence {i} of the body. " * 20


# ----------------------------------------------------------------------------
# a fake MediaWiki API on 127.0.0.1

class FakeWiki:
    """Category members (paged, with subcategories) and plain-text extracts, plus scripted faults.

    faults[title] is a list of modes used up one per request for that title:
    "429", "500", "badjson", "slow" (answers after the client timed out), "404".
    After `die_after` successful extracts every request gets a 503 (the server died).
    """

    def __init__(self):
        self.pages = {}         # title -> (pageid, text)
        self.cats = {}          # category -> list of member dicts
        self.faults = {}
        self.served = []        # titles whose extract was served successfully
        self.requests = []      # every request: (kind, key)
        self.die_after = None
        self.agents = set()     # User-Agent headers seen
        self.files = {}         # plain downloads: path -> bytes
        self.page_size = 2      # small, so category listings need "continue"
        self.lock = threading.Lock()

    def add_category(self, cat, titles, subcats=()):
        members = []
        for t in titles:
            if t not in self.pages:
                self.pages[t] = (1000 + len(self.pages), article_text(len(self.pages)))
            members.append({"ns": 0, "title": t, "pageid": self.pages[t][0]})
        members += [{"ns": 14, "title": "Category:" + s} for s in subcats]
        self.cats[cat] = members

    def answer(self, query):
        """(status, body bytes, headers) for one request."""
        q = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
        if q.get("list") == "categorymembers":
            key, kind = q["cmtitle"].split(":", 1)[1], "members"
        elif q.get("prop") == "extracts":
            key, kind = q["titles"], "extract"
        else:
            key, kind = "", "siteinfo"
        with self.lock:
            self.requests.append((kind, key))
            if self.die_after is not None and len(self.served) >= self.die_after:
                return 503, b"down", {}
            mode = self.faults.get(key, []).pop(0) if self.faults.get(key) else None
        if mode == "429":
            return 429, b"slow down", {"Retry-After": "1"}
        if mode == "500":
            return 500, b"oops", {}
        if mode == "404":
            return 404, b"nope", {}
        if mode == "badjson":
            return 200, b'{"query": {"pages": [', {}
        if mode == "slow":
            time.sleep(1.0)
        if kind == "members":
            members = self.cats[key]
            start = int(q.get("cmcontinue", 0))
            body = {"batchcomplete": True,
                    "query": {"categorymembers": members[start:start + self.page_size]}}
            if start + self.page_size < len(members):
                body["continue"] = {"cmcontinue": str(start + self.page_size), "continue": "-||"}
        elif kind == "extract":
            if key not in self.pages:
                body = {"query": {"pages": [{"ns": 0, "title": key, "missing": True}]}}
            else:
                pageid, text = self.pages[key]
                body = {"query": {"pages": [{"pageid": pageid, "ns": 0, "title": key, "extract": text}]}}
                with self.lock:
                    self.served.append(key)
        else:
            body = {"query": {"general": {"sitename": "Fake"}}}
        return 200, json.dumps(body).encode(), {"Content-Type": "application/json"}


@pytest.fixture
def wiki():
    fake = FakeWiki()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            fake.agents.add(self.headers.get("User-Agent"))
            url = urllib.parse.urlsplit(self.path)
            if url.path in fake.files:
                status, body, headers = 200, fake.files[url.path], {}
            else:
                status, body, headers = fake.answer(url.query)
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass   # the client gave up on a slow answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/w/api.php"
    yield fake
    server.shutdown()
    server.server_close()


def standard_wiki(fake):
    fake.add_category("Physics", ["Atom", "Force", "Energy"], subcats=["Optics"])
    fake.add_category("Optics", ["Lens", "Prism"])
    fake.add_category("Biology", ["Cell", "Atom", "Gene", "Enzyme", "Virus"])   # Atom is in both


# Physics: 3 pages + 1 from the Optics subcategory; Biology: Atom is already held, so the
# listing has to reach past it to find 4 new articles
ALL_TITLES = ["Atom", "Force", "Energy", "Lens", "Cell", "Gene", "Enzyme", "Virus"]


def wiki_opts(fake, **kw):
    return dict(api_url=fake.url, categories="Physics,Biology", per_category=4, max_depth=1,
                min_chars=50, **{**FAST, **kw})


def cached_articles(ds):
    lines = (Path(ds) / "articles.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def assert_each_once(ds, fake, titles):
    arts = cached_articles(ds)
    assert sorted(a["title"] for a in arts) == sorted(titles)
    assert len({a["pageid"] for a in arts}) == len(arts)
    text = (Path(ds) / "train.txt").read_text() + (Path(ds) / "val.txt").read_text()
    for t in titles:
        body = fake.pages[t][1].split("\n\n")[1].strip()
        assert text.count(body) == 1, t


# ----------------------------------------------------------------------------
# wikipedia

def test_wikipedia_collects_through_faults(wiki, tmp_path):
    standard_wiki(wiki)
    wiki.faults = {"Physics": ["429"], "Atom": ["429"], "Force": ["500"],
                   "Lens": ["badjson"], "Cell": ["slow"], "Gene": ["500", "badjson"]}
    ds = data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki))
    assert ds == tmp_path / "wikipedia"
    titles = ALL_TITLES
    assert_each_once(ds, wiki, titles)
    for title, tries in [("Atom", 2), ("Force", 2), ("Lens", 2), ("Cell", 2), ("Gene", 3), ("Energy", 1)]:
        assert wiki.requests.count(("extract", title)) == tries, title
    assert sorted(wiki.served) == sorted(titles)
    assert wiki.agents == {data.USER_AGENT}
    meta = json.loads((ds / "meta.json").read_text())
    assert meta["complete"] and meta["train_docs"] + meta["val_docs"] == len(titles)
    assert meta["sha256"]["train.txt"] == sha(ds / "train.txt")
    # same settings again: nothing is downloaded or rewritten
    n_requests, mtime = len(wiki.requests), (ds / "train.txt").stat().st_mtime_ns
    data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki))
    assert len(wiki.requests) == n_requests and (ds / "train.txt").stat().st_mtime_ns == mtime


def test_wikipedia_gives_up_with_a_clear_error(wiki, tmp_path):
    standard_wiki(wiki)
    wiki.faults = {"Force": ["500"] * 10}
    with pytest.raises(data.FetchError, match=r"giving up .* after 4 attempts: HTTP Error 500"):
        data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki))
    assert wiki.requests.count(("extract", "Force")) == 4
    assert not (tmp_path / "wikipedia" / "meta.json").exists()
    # a 404 is not retried
    wiki.faults = {"Force": ["404"]}
    with pytest.raises(data.FetchError, match="HTTP 404"):
        data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki))
    assert wiki.requests.count(("extract", "Force")) == 5


def test_wikipedia_resumes_after_the_server_dies(wiki, tmp_path):
    standard_wiki(wiki)
    wiki.die_after = 3
    with pytest.raises(data.FetchError):
        data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki, retries=1))
    ds = tmp_path / "wikipedia"
    assert len(cached_articles(ds)) == 3 and not (ds / "meta.json").exists()
    # a torn last line, as a kill during the write would leave, is cut off on resume
    with open(ds / "articles.jsonl", "a") as f:
        f.write('{"pageid": 99, "title": "Half')
    wiki.die_after = None
    data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki))
    titles = ALL_TITLES
    assert_each_once(ds, wiki, titles)
    assert sorted(wiki.served) == sorted(titles)   # nothing finished was downloaded twice


def test_wikipedia_max_articles_then_resume(wiki, tmp_path):
    standard_wiki(wiki)
    ds = data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki, max_articles=2))
    meta = json.loads((ds / "meta.json").read_text())
    assert not meta["complete"] and len(cached_articles(ds)) == 2
    ds = data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki, max_articles=3))
    assert len(cached_articles(ds)) == 5
    ds = data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki))
    assert json.loads((ds / "meta.json").read_text())["complete"]
    assert_each_once(ds, wiki, ALL_TITLES)
    assert len(wiki.served) == len(ALL_TITLES)


def test_wikipedia_size_cap_holds(wiki, tmp_path):
    standard_wiki(wiki)
    one = len(article_text(0).encode())
    cap = int(3.5 * one)
    ds = data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki, max_bytes=cap))
    arts = cached_articles(ds)
    assert len(arts) == 3 and sum(len(a["text"].encode()) for a in arts) <= cap
    # rerunning with the same cap adds nothing
    data.prepare("wikipedia", root=tmp_path, **wiki_opts(wiki, max_bytes=cap, force=True))
    assert len(cached_articles(ds)) == 3


class FakeUrlopen:
    """urlopen that raises the given errors in turn, then answers; counts the calls."""

    def __init__(self, *errors, body=b"First Citizen:\nBefore we proceed any further, hear me speak.\n"):
        self.errors, self.body, self.calls = list(errors), body, 0

    def __call__(self, req, timeout=None):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        resp = io.BytesIO(self.body)
        resp.headers = {"Content-Length": str(len(self.body))}
        return resp


OFFLINE = [(urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
            "the name lookup failed (Name or service not known)"),
           (urllib.error.URLError(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")),
            "the connection failed (Connection refused)"),
           (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            "the connection failed (Connection refused)"),
           (urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable")),
            "the connection failed (Network is unreachable)")]


@pytest.mark.parametrize("error, what", OFFLINE, ids=["dns", "refused", "refused-raw", "unreachable"])
def test_an_unreachable_server_fails_at_once_with_one_line(tmp_path, monkeypatch, error, what):
    fake = FakeUrlopen(error)
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    t0 = time.monotonic()
    with pytest.raises(data.FetchError) as err:   # a ValueError: the later stages print it as one line
        data.prepare("shakespeare", root=tmp_path, min_interval=0.0, backoff=5.0)
    assert fake.calls == 1 and time.monotonic() - t0 < 2.0        # no retry, no backoff sleep
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert "raw.githubusercontent.com" in message and "--source files:PATH" in message
    assert message.startswith(f"cannot reach raw.githubusercontent.com: {what}.")


def test_server_errors_and_timeouts_are_still_retried(tmp_path, monkeypatch):
    errors = [urllib.error.HTTPError(data.SHAKESPEARE_URL, 503, "Service Unavailable", {}, None),
              urllib.error.URLError(TimeoutError("timed out")), ConnectionResetError("reset by peer")]
    fake = FakeUrlopen(*errors)
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    ds = data.prepare("shakespeare", root=tmp_path, **FAST)
    assert fake.calls == 4 and (ds / "input.txt").read_bytes() == fake.body


def test_offline_command_line_prints_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", FakeUrlopen(OFFLINE[0][0]))
    with pytest.raises(SystemExit) as e:
        data.main(["--source", "shakespeare", "--root", str(tmp_path)])
    assert str(e.value.code).startswith("error: cannot reach") and "\n" not in str(e.value.code)


def test_requests_are_rate_limited(wiki):
    client = data.HttpClient(data.DataConfig(api_url=wiki.url, **{**FAST, "min_interval": 0.1}))
    t0 = time.monotonic()
    for _ in range(4):
        client.get_json({"action": "query", "meta": "siteinfo", "format": "json"})
    assert time.monotonic() - t0 >= 0.3   # three gaps of at least min_interval


def test_shakespeare_download_is_cached_and_split_like_nanogpt(wiki, tmp_path):
    text = "".join(f"CITIZEN {i}:\nWe are accounted poor citizens.\n\n" for i in range(300))
    wiki.files["/input.txt"] = text.encode()
    url = wiki.url.replace("/w/api.php", "/input.txt")
    ds = data.prepare("shakespeare", root=tmp_path, shakespeare_url=url, **FAST)
    assert (ds / "input.txt").read_text() == text
    clean = text.rstrip("\n")
    cut = int(len(clean) * 0.9)
    assert (ds / "train.txt").read_text() == clean[:cut] and (ds / "val.txt").read_text() == clean[cut:]
    del wiki.files["/input.txt"]   # a rebuild reuses the downloaded copy
    data.prepare("shakespeare", root=tmp_path, shakespeare_url=url, force=True, **FAST)
    assert (ds / "train.txt").read_text() == clean[:cut]


def test_default_source_probes_the_network(wiki, tmp_path, capsys):
    assert data.resolve_source(data.DataConfig(api_url=wiki.url)) == "wikipedia"
    closed = wiki.url.replace(wiki.url.split(":")[2].split("/")[0], "1")   # port 1: refused
    assert data.resolve_source(data.DataConfig(api_url=closed)) == "builtin"
    assert "network unreachable" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# builtin

BUILTIN_SHA = """
import sys; sys.path.insert(0, sys.argv[1])
import inspect; _getfile = inspect.getfile
inspect.getfile = lambda obj: _getfile(obj)   # as torch does: a library patches the stdlib
from spikelib.stages import load_stage
ds = load_stage("1_data").prepare("builtin", root=sys.argv[2])
import json; print(json.loads((ds / "meta.json").read_text())["sha256"]["train.txt"])
"""


def test_builtin_is_deterministic_across_processes(tmp_path):
    ds = data.prepare("builtin", root=tmp_path / "a")
    meta = json.loads((ds / "meta.json").read_text())
    assert meta["train_chars"] > 1_000_000 and meta["val_docs"] > 0
    text = (ds / "train.txt").read_text()
    assert "Module json" in text and " at 0x" not in text   # no memory addresses
    # another interpreter (the stdlib patched, another hash seed) gives the same bytes
    out = subprocess.run([sys.executable, "-c", BUILTIN_SHA, str(ROOT), str(tmp_path / "b")],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == sha(ds / "train.txt")
    assert sha(tmp_path / "b" / "builtin" / "val.txt") == sha(ds / "val.txt")


def test_rerun_is_a_noop_and_changed_settings_rebuild(tmp_path, capsys):
    ds = data.prepare("builtin", root=tmp_path)
    mtime = (ds / "train.txt").stat().st_mtime_ns
    capsys.readouterr()
    data.prepare("builtin", root=tmp_path)
    assert "up to date" in capsys.readouterr().out
    assert (ds / "train.txt").stat().st_mtime_ns == mtime
    data.prepare("builtin", root=tmp_path, val_fraction=0.2)
    assert "up to date" not in capsys.readouterr().out
    meta = json.loads((ds / "meta.json").read_text())
    assert meta["settings"]["val_fraction"] == 0.2
    # a damaged output file is noticed and rebuilt
    (ds / "val.txt").write_text("damaged")
    data.prepare("builtin", root=tmp_path, val_fraction=0.2)
    assert sha(ds / "val.txt") == meta["sha256"]["val.txt"]


# ----------------------------------------------------------------------------
# files:PATH

def test_single_file_keeps_last_tenth_as_val(tmp_path):
    src = tmp_path / "plays.txt"
    text = "".join(f"SPEAKER {i}:\nLine number {i}, said softly.\n\n" for i in range(500))
    src.write_text(text)
    ds = data.prepare(f"files:{src}", root=tmp_path / "out")
    assert ds.name == "plays"
    clean = text.rstrip("\n")   # the only change cleaning makes to this text
    n = len(clean)
    assert (ds / "train.txt").read_text() == clean[:int(n * 0.9)]
    assert (ds / "val.txt").read_text() == clean[int(n * 0.9):]
    first = sha(ds / "train.txt"), sha(ds / "val.txt")
    data.prepare(f"files:{src}", root=tmp_path / "out", force=True)
    assert (sha(ds / "train.txt"), sha(ds / "val.txt")) == first


def make_folder(tmp_path, n=30):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    docs = [f"Note {i}: " + f"the value of item {i} is {i * i}. " * 10 for i in range(n)]
    for i, d in enumerate(docs[:n // 2]):
        (folder / f"n{i:02d}.txt").write_text(d)
    (folder / "sub" / "more.md").write_text(docs[n // 2])
    with open(folder / "sub" / "rest.jsonl", "w") as f:
        for d in docs[n // 2 + 1:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    (folder / "ignored.csv").write_text("a,b\n")
    return folder, docs


def test_folder_splits_by_document(tmp_path):
    folder, docs = make_folder(tmp_path)
    ds = data.prepare(f"files:{folder}", root=tmp_path / "out")
    assert ds.name == "notes"
    train = (ds / "train.txt").read_text().rstrip("\n").split(data.DOC_SEPARATOR)
    val = (ds / "val.txt").read_text().rstrip("\n").split(data.DOC_SEPARATOR)
    assert sorted(train + val) == sorted(d.strip() for d in docs)
    assert 1 <= len(val) < len(docs) / 2
    meta = json.loads((ds / "meta.json").read_text())
    assert (meta["train_docs"], meta["val_docs"]) == (len(train), len(val))
    assert meta["train_bytes"] == (ds / "train.txt").stat().st_size
    shas = sha(ds / "train.txt"), sha(ds / "val.txt")
    data.prepare(f"files:{folder}", root=tmp_path / "out2")
    assert (sha(tmp_path / "out2/notes/train.txt"), sha(tmp_path / "out2/notes/val.txt")) == shas


def test_split_is_stable_when_documents_are_added():
    docs = [f"document {i} " * 30 for i in range(400)]
    train, val = data.split_documents(docs, 0.1, seed=0)
    assert 20 <= len(val) <= 60           # about 10%
    train2, val2 = data.split_documents(docs + [f"new {i} " * 30 for i in range(50)], 0.1, seed=0)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert data.split_documents(docs, 0.1, seed=1)[1] != val   # the seed matters
    assert data.split_documents(docs[:2], 0.0, seed=0)[1] != []   # val never empty


def test_jsonl_bad_lines_are_reported_with_line_numbers(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": oops}\n\n{"body": "no text"}\n[1, 2]\n')
    with pytest.raises(ValueError) as e:
        data.prepare(f"files:{src}", root=tmp_path / "out")
    msg = str(e.value)
    assert "3 bad line(s)" in msg
    assert "bad.jsonl:2: invalid JSON" in msg and "bad.jsonl:4:" in msg and "bad.jsonl:5:" in msg
    assert not (tmp_path / "out" / "bad").exists()


def test_missing_and_non_utf8_inputs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.prepare(f"files:{tmp_path / 'nothing'}", root=tmp_path)
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        data.prepare(f"files:{tmp_path / 'latin.txt'}", root=tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        data.prepare("wikipdia", root=tmp_path)
    with pytest.raises(TypeError, match="unknown options"):
        data.prepare("builtin", root=tmp_path, vocab=3)


# ----------------------------------------------------------------------------
# cleaning

def test_cleaning_removes_markup_and_normalises():
    raw = ("== History ==\r\nThe [[Atom|atom]] is '''small''' <ref name=x>cite</ref> and "
           "{{citation needed}} obeys {\\displaystyle E=mc^{2}} here.\u00a0 \t\n\n\n\n"
           "Use :func:`json.dumps` or ``repr``, like this::\n.. versionadded:: 3.2\n"
           ">>> print(1)  # doctest: +SKIP, +ELLIPSIS\n1\n"
           "Cafe\u0301 &amp; bar\x07")
    cfg = data.DataConfig()
    text, dropped = data.clean_document(raw, cfg, None)
    assert text == ("History\nThe atom is small cite and obeys here.\n\n"
                    "Use json.dumps or repr, like this:\n\n>>> print(1)\n1\nCaf\u00e9 & bar")
    assert dropped == 0
    # NFKC also folds compatibility characters; NFC keeps them
    assert data.clean_document("\ufb01ne x\u00b2", data.DataConfig(unicode_form="NFKC"), None)[0] == "fine x2"
    assert data.clean_document("\ufb01ne x\u00b2", cfg, None)[0] == "\ufb01ne x\u00b2"


def test_content_filter_drops_paragraphs_with_listed_words(tmp_path):
    doc = ("Essex and the sex chromosome are fine here.\n\n"
           "This paragraph mentions PORN and must go.\n\n"
           "Pornographic? gone too.\n\nThe last paragraph stays.")
    cfg = data.DataConfig()
    banned = data.filter_regex(data.load_filter_words("default"))
    text, dropped = data.clean_document(doc, cfg, banned)
    assert dropped == 2
    assert text == "Essex and the sex chromosome are fine here.\n\nThe last paragraph stays."
    assert data.clean_document(doc, cfg, data.filter_regex(data.load_filter_words("none")))[1] == 0
    words = tmp_path / "words.txt"
    words.write_text("# my list\nfine\n\nstays\n")
    text, dropped = data.clean_document(doc, cfg, data.filter_regex(data.load_filter_words(str(words))))
    assert dropped == 2 and "must go" in text
    with pytest.raises(FileNotFoundError):
        data.load_filter_words(str(tmp_path / "missing.txt"))


def test_duplicates_and_short_documents_are_dropped():
    body = "caf\u00e9 " * 60
    docs = [body, unicodedata.normalize("NFD", body) + "  \n\n", "too short", body + "!", body]
    out, stats = data.clean_corpus(docs, data.DataConfig(min_chars=100), single_file=False)
    assert out == [body.strip(), (body + "!").strip()]
    assert stats == {"raw_docs": 5, "filtered_paragraphs": 0, "short": 1, "duplicates": 2}
    with pytest.raises(ValueError, match="no documents left"):
        data.clean_corpus(["tiny"], data.DataConfig(), single_file=False)


# ----------------------------------------------------------------------------
# command line

def test_command_line(tmp_path, capsys):
    src = tmp_path / "story.txt"
    src.write_text("Once upon a time there was a spike.\n" * 50)
    data.main(["--source", f"files:{src}", "--root", str(tmp_path / "out"), "--val-fraction", "0.2"])
    out = capsys.readouterr().out
    assert "train" in out and "val" in out and "characters" in out
    meta = json.loads((tmp_path / "out" / "story" / "meta.json").read_text())
    assert meta["settings"]["val_fraction"] == 0.2
    cfg = data.parse_args(["--preset", "small", "--api-url", "http://x", "--force"])
    assert (cfg.per_category, cfg.api_url, cfg.force) == (20, "http://x", True)
    with pytest.raises(SystemExit) as e:
        data.parse_args(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit, match="error: .*does not exist"):
        data.main(["--source", f"files:{tmp_path / 'nope'}", "--root", str(tmp_path)])
