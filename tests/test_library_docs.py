"""benchmarks/library_docs.py: one document per public module of a package (stage 1's
module_document), paragraphs of the excluded files dropped, and stage 1 reading the folder as one
document per file. The package is a small one written for the test, so the documents are known."""
import importlib.util
import sys
import textwrap

import pytest

from conftest import ROOT
from spikelib.stages import load_stage

spec = importlib.util.spec_from_file_location("library_docs", ROOT / "benchmarks" / "library_docs.py")
L = importlib.util.module_from_spec(spec)
spec.loader.exec_module(L)
S1 = load_stage("1_data")

LONG = "It is written here at length, so that the module has enough docstring to be kept. " * 3
SHARED = "Return the sum of the values along the given axis."


def module(doc, body=""):
    return f'"""{doc}"""\n' + textwrap.dedent(body)


@pytest.fixture
def package(tmp_path, monkeypatch):
    """tinylib with a public submodule, a subpackage, a private module, a tests package and a
    module with too little docstring; removed from sys.modules afterwards."""
    root = tmp_path / "site" / "tinylib"
    (root / "sub").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "__init__.py").write_text(module("Tinylib, a package of small tools. " + LONG))
    (root / "alpha.py").write_text(module("Alpha: sums. " + LONG, f'''
        def total(x):
            """Add the values.

            {SHARED}

            Returns the total."""


        class Box:
            """A box of values, made at <tinylib.Box object at 0x7f0dfd412e70>."""

            def open(self):
                """Open the box and return its values."""
        '''))
    (root / "sub" / "__init__.py").write_text(module("The subpackage. " + LONG))
    (root / "sub" / "beta.py").write_text(module("Beta: products. " + LONG))
    (root / "_private.py").write_text(module("Private. " + LONG))
    (root / "tests" / "__init__.py").write_text(module("Tests. " + LONG))
    (root / "short.py").write_text(module("Too short to ask about."))
    monkeypatch.syspath_prepend(str(root.parent))
    yield "tinylib"
    for name in [n for n in sys.modules if n.split(".")[0] == "tinylib"]:
        del sys.modules[name]


def test_one_document_per_public_module_named_by_module(package, tmp_path):
    out = tmp_path / "docs"
    assert L.main([package, "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tinylib.alpha.txt", "tinylib.sub.beta.txt", "tinylib.sub.txt", "tinylib.txt"]
    alpha = (out / "tinylib.alpha.txt").read_text(encoding="utf-8")
    assert alpha.startswith("Module tinylib.alpha\nAlpha: sums.")
    assert f"tinylib.alpha.total\nAdd the values.\n\n{SHARED}\n\nReturns the total." in alpha
    assert "tinylib.alpha.Box.open\nOpen the box and return its values." in alpha
    assert "made at <tinylib.Box object>." in alpha and "0x7f" not in alpha     # the address dropped
    docs, single, _ = S1.files_docs(out)
    assert not single and len(docs) == 4 and docs[0].startswith("Module tinylib.alpha")


def test_paragraphs_of_the_excluded_files_are_dropped_and_only_those(package, tmp_path, capsys):
    corpus = tmp_path / "train.txt"
    corpus.write_text(f"Some other paragraph.\n\n  {SHARED}\n\nReturns nothing.\n", encoding="utf-8")
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    assert L.main([package, "--out", str(kept)]) == 0
    assert L.main([package, "--out", str(dropped), "--exclude", str(corpus)]) == 0
    assert "1 paragraphs shared with --exclude dropped" in capsys.readouterr().out
    before = (kept / "tinylib.alpha.txt").read_text(encoding="utf-8")
    after = (dropped / "tinylib.alpha.txt").read_text(encoding="utf-8")
    assert after == before.replace(f"\n\n{SHARED}\n\n", "\n\n") != before
    for name in ["tinylib.txt", "tinylib.sub.txt", "tinylib.sub.beta.txt"]:
        assert (dropped / name).read_text(encoding="utf-8") == (kept / name).read_text(encoding="utf-8")


def test_bad_inputs_are_one_line_and_keep_what_is_there(package, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert L.main([package, "--out", str(mine)]) == 1
    assert [p.name for p in mine.iterdir()] == ["keep.txt"] and (mine / "keep.txt").read_text() == "mine"
    assert L.main([package, "--out", str(tmp_path / "a"), "--exclude", str(tmp_path / "none.txt")]) == 1
    assert L.main(["no_such_package_here", package, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "none.txt" in err[1] and "no_such_package_here" in err[2]
    assert not (tmp_path / "a").exists()
