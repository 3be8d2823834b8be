"""A folder of many short documents from WikiText-2 and TinyShakespeare, for a reader's course of
questions on varied text (stage 6's --qa DIR):

    python benchmarks/mixed_text.py --wikitext valid.txt test.txt --shakespeare tinyshakespeare.txt \
        --out mix
    python 1_data.py --source files:mix                        # -> data/mix, one document per file

Stage 1 reads a folder as one document per file and splits documents between train and val, and
stage 6 asks its no-answer questions of another document's context. Two big files would be two
documents, so the text is cut first:
  - WikiText-2 (the tokenized `wiki.*.tokens` files) into its articles, at the " = Title = " lines
    (one '=' each side: " = = Section = = " lines stay inside their article), articles of at most
    MIN_CHARS characters dropped;
  - TinyShakespeare into parts of a little over PART_CHARS characters, cut at blank lines.
Files are numbered in that order: w00000.txt, ..., then s00121.txt, ... (stage 1 reads them sorted by name).
"""
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spikelib.cli import fail  # noqa: E402
from spikelib.files import write_text_atomic  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

S1 = load_stage("1_data")

MIN_CHARS = 500          # WikiText-2 pieces this short are the file's blank start, not articles
PART_CHARS = 10_000      # a TinyShakespeare part closes at the first blank line past this length
ARTICLE_START = re.compile(r"\n(?= = [^=].* = \n)")     # the newline before an article's title line


def articles(text):
    """WikiText-2 text cut before each article's title line, each stripped; the short ones dropped."""
    return [a.strip() + "\n" for a in ARTICLE_START.split(text) if len(a.strip()) > MIN_CHARS]


def parts(text):
    """A play cut at blank lines into parts of just over PART_CHARS characters (the last may be shorter)."""
    out, part = [], ""
    for paragraph in text.split("\n\n"):
        part += paragraph + "\n\n"
        if len(part) > PART_CHARS:
            out.append(part)
            part = ""
    return out + ([part] if part.strip() else [])


def write_documents(wikitext, shakespeare, out):
    """Write every article and part to its own file in out; return the (wiki, play) counts."""
    docs = [("w", a) for path in wikitext for a in articles(S1.read_text_file(Path(path)))]
    play = parts(S1.read_text_file(Path(shakespeare))) if shakespeare else []
    docs += [("s", p) for p in play]
    for i, (prefix, doc) in enumerate(docs):
        write_text_atomic(Path(out) / f"{prefix}{i:05d}.txt", doc)
    return len(docs) - len(play), len(play)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wikitext", nargs="*", default=[], metavar="FILE",
                    help="WikiText-2 token files (wiki.valid.tokens, wiki.test.tokens), cut into articles")
    ap.add_argument("--shakespeare", default="", metavar="FILE",
                    help="TinyShakespeare's input.txt, cut into parts of about 10,000 characters")
    ap.add_argument("--out", required=True, metavar="DIR", help="the folder to write (stage 1: files:DIR)")
    args = ap.parse_args(argv)
    if not args.wikitext and not args.shakespeare:
        return fail("give --wikitext FILE ... and/or --shakespeare FILE")
    for path in [*args.wikitext, *([args.shakespeare] if args.shakespeare else [])]:
        if not Path(path).is_file():
            return fail(f"no such file: {path}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return fail(f"{args.out} is a file or a folder that is not empty; give a new folder "
                    f"(stage 1 reads every file in it)")
    try:
        n_wiki, n_play = write_documents(args.wikitext, args.shakespeare, out)
    except (OSError, ValueError) as err:              # an unreadable or non-UTF-8 input, a full disk
        return fail(err)
    print(f"{args.out}: {n_wiki:,} articles and {n_play:,} play parts, one file each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
