"""A folder of API documentation from installed Python packages, one document per public module,
for a reader's course of questions on text of the builtin corpus's kind (stage 6's --qa DIR):

    python benchmarks/library_docs.py numpy torch --out docs \
        --exclude data/builtin/train.txt data/builtin/val.txt
    python 1_data.py --source files:docs                        # -> data/docs, one document per file

The builtin corpus is Python's own documentation, written by stage 1's module_document: a module's
docstring, then those of the classes and functions it defines. Some of its questions ask what a
function returns, which articles and plays never ask (mixed_text.py's folder has no such question).
This script applies the same module_document to other packages' modules (every public module,
packages walked as stage 1 walks the standard library), so their docstrings hold questions of the
same kinds about text the builtin corpus does not have.

--exclude FILE ... drops from every document each paragraph (blank-line separated, compared
stripped) that also occurs in those files, so a course on this text holds none of the target
corpus's paragraphs: stage 6 asks its held-out questions of the builtin corpus's val text, and a
reader must not have read it. Modules with MIN_CHARS characters of docstrings or fewer are left out.
Which text comes out depends on the packages' installed versions (printed at the end). Files are
named by module (numpy.linalg.txt); a docstring two modules share is written only in the first,
the packages taken in the order given and each one's modules in sorted order.
"""
import argparse
import re
import sys
import warnings
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.cli import fail  # noqa: E402
from spikelib.files import write_text_atomic  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

S1 = load_stage("1_data")

MIN_CHARS = 200                            # a module with this little docstring has nothing to ask about
ADDRESS = re.compile(r" at 0x[0-9a-f]+>")   # a default argument's repr: <... object at 0x7f0dfd412e70>


def paragraphs_of(files):
    """Every paragraph of the files (split at blank lines), stripped: what --exclude compares."""
    return {p.strip() for f in files for p in S1.read_text_file(Path(f)).split("\n\n") if p.strip()}


def without_paragraphs(text, known):
    """text with every paragraph in known dropped, and how many were dropped."""
    paragraphs = text.split("\n\n")
    kept = [p for p in paragraphs if p.strip() not in known]
    return "\n\n".join(kept), len(paragraphs) - len(kept)


def package_documents(packages, known):
    """(module name, document) for every public module of the packages with more than MIN_CHARS
    characters of docstrings, each without the paragraphs in known, and how many were dropped.
    A docstring already written for an earlier object (inherited boilerplate) is skipped, as stage 1
    does for the standard library; an object's address in a docstring (C++ bindings print default
    arguments as <... object at 0x7f...>) is dropped, as it differs from one run to the next."""
    seen, docs, dropped = set(), [], 0
    with warnings.catch_warnings():        # deprecated attributes warn when inspected
        warnings.simplefilter("ignore")
        for top in packages:
            names = S1.module_names(top)
            if not names:
                raise ValueError(f"cannot import {top}: install it, or give another package")
            for name in sorted(names):
                text = ADDRESS.sub(">", S1.module_document(name, seen))
                if len(text) > MIN_CHARS:
                    doc, n = without_paragraphs(text + "\n", known)
                    docs.append((name, doc))
                    dropped += n
    return docs, dropped


def version_of(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:     # a module that is not an installed distribution
        return "unknown version"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packages", nargs="+", metavar="PACKAGE",
                    help="importable packages whose modules' docstrings to write (numpy torch)")
    ap.add_argument("--out", required=True, metavar="DIR", help="the folder to write (stage 1: files:DIR)")
    ap.add_argument("--exclude", nargs="*", default=[], metavar="FILE",
                    help="text files (the target corpus's train.txt and val.txt) whose paragraphs are "
                         "dropped from every document")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return fail(f"{args.out} is a file or a folder that is not empty; give a new folder "
                    f"(stage 1 reads every file in it)")
    for path in args.exclude:
        if not Path(path).is_file():
            return fail(f"no such file: {path}")
    try:
        docs, dropped = package_documents(args.packages, paragraphs_of(args.exclude))
        for name, doc in docs:
            write_text_atomic(out / f"{name}.txt", doc)
    except (OSError, ValueError) as err:   # a package that does not import, a non-UTF-8 file, a full disk
        return fail(err)
    chars = sum(len(doc) for _, doc in docs)
    print("packages: " + ", ".join(f"{p} {version_of(p)}" for p in args.packages))
    print(f"{len(docs)} documents, {chars:,} characters, in {args.out}; "
          f"{dropped} paragraphs shared with --exclude dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
