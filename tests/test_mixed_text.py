"""benchmarks/mixed_text.py: WikiText-2 cut into its articles, a play into parts, one file each, and
stage 1 reading the folder as one document per file."""
import importlib.util

from conftest import ROOT
from spikelib.stages import load_stage

spec = importlib.util.spec_from_file_location("mixed_text", ROOT / "benchmarks" / "mixed_text.py")
M = importlib.util.module_from_spec(spec)
spec.loader.exec_module(M)
S1 = load_stage("1_data")

BODY = "The river runs past the old mill and the town , and the mill stands on its bank . " * 8


def wiki(*titles):
    """WikiText-2's layout: a blank first line, then per article a title line, a section line
    (two '=' each side) and paragraphs, all as ' \\n'-separated lines."""
    return " \n" + "".join(f" = {t} = \n \n {BODY}\n \n = = History = = \n \n {BODY}\n \n" for t in titles)


def test_wikitext_is_cut_at_article_titles_not_at_sections():
    arts = M.articles(wiki("Alpha", "Beta", "Gamma") + " = Stub = \n \n Too short . \n")
    assert [a.splitlines()[0].strip() for a in arts] == ["= Alpha =", "= Beta =", "= Gamma ="]
    assert all(a.count("= = History = =") == 1 and a.count(BODY.strip()) == 2 for a in arts)


def test_a_play_is_cut_at_blank_lines_into_parts_just_over_the_size():
    speech = "Words of the speech, line on line. "
    play = "\n\n".join(f"SPEAKER {i}:\n" + speech * (i % 7 + 1) for i in range(900))
    parts = M.parts(play)
    assert "".join(parts) == play + "\n\n"                      # nothing lost, nothing added
    assert len(parts) > 3 and all(len(p) > M.PART_CHARS for p in parts[:-1])
    assert all(len(p[:-2].rsplit("\n\n", 1)[0]) <= M.PART_CHARS for p in parts)   # closed at the first chance


def test_the_folder_is_one_stage_1_document_per_article_and_part(tmp_path):
    (tmp_path / "wiki.tokens").write_text(wiki("Alpha", "Beta"), encoding="utf-8")
    play = "\n\n".join(["KING:\nGo now, and fare thee well."] * 700)
    (tmp_path / "play.txt").write_text(play, encoding="utf-8")
    out = tmp_path / "mix"
    assert M.main(["--wikitext", str(tmp_path / "wiki.tokens"), "--shakespeare", str(tmp_path / "play.txt"),
                   "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())              # stage 1 reads them in this order
    assert names[-2:] == ["w00000.txt", "w00001.txt"] and all(n.startswith("s") for n in names[:-2])
    docs, single, _ = S1.files_docs(out)
    assert not single and len(docs) == len(names) > 3
    assert docs[-2].startswith("= Alpha =") and docs[-1].startswith("= Beta =")


def test_bad_inputs_are_one_line_and_keep_what_is_there(tmp_path, capsys):
    assert M.main(["--out", str(tmp_path / "a")]) == 1
    assert M.main(["--shakespeare", str(tmp_path / "none.txt"), "--out", str(tmp_path / "a")]) == 1
    kept = tmp_path / "b" / "keep.txt"
    kept.parent.mkdir()
    kept.write_text("mine")
    (tmp_path / "play.txt").write_text("KING:\nGo.")
    assert M.main(["--shakespeare", str(tmp_path / "play.txt"), "--out", str(kept.parent)]) == 1
    assert kept.read_text() == "mine" and len(list(kept.parent.iterdir())) == 1
    assert M.main(["--shakespeare", str(tmp_path / "play.txt"), "--out", str(kept)]) == 1   # a file
    assert kept.read_text() == "mine"
    (tmp_path / "latin1.txt").write_bytes("ROM\u00c9O:\nAh.".encode("latin-1"))          # not UTF-8
    assert M.main(["--shakespeare", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)
    assert "latin1.txt: not UTF-8 text" in err[-1] and not (tmp_path / "c").exists()
