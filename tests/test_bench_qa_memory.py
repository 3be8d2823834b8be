"""benchmarks/bench_qa_memory.py: its count of the held-out answers span decoding cannot give."""
import importlib.util

from conftest import ROOT
from spikelib.qa_data import generate_qa
from spikelib.stages import load_stage

spec = importlib.util.spec_from_file_location("bench_qa_memory", ROOT / "benchmarks" / "bench_qa_memory.py")
B = importlib.util.module_from_spec(spec)
spec.loader.exec_module(B)
TK = load_stage("2_tokenizer")

SPEAKERS = [("ELBOW", "duke"), ("ESCALUS", "maid"), ("ANGELO", "king")] * 4
PLAY = "\n\n".join(f"{name}:\nGood morrow to the {w} of this fair and ancient town, my lord {n}."
                   for n, (name, w) in enumerate(SPEAKERS))


def test_speakers_starting_lines_are_spans_of_span_source_only():
    """In a play every speaker's name starts a line: no span of the context's own tokens, a span of
    span_source; the copy questions' answers sit inside lines and are spans of both."""
    tok = TK.Tokenizer([])
    pairs = [dict(p, split="test") for p in generate_qa(PLAY, test_fraction=0.0)]
    counts = B.no_spans(tok, pairs)
    speakers = sum(1 for p in pairs if p["kind"] == "speaker")
    assert speakers and counts["speaker"] == [speakers, 0, speakers]
    assert counts["next"][0] > 0 and counts["next"][1:] == [0, 0]
