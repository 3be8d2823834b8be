"""Project-wide rules: the CI command is README's, stages stay short, nothing loads pickles."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    readme = (ROOT / "README.md").read_text()
    assert ci in readme, f"README.md must give the exact command .ci/run runs: {ci}"


def test_every_stage_is_under_1000_lines():
    stages = sorted(ROOT.glob("[0-9]*_*.py"))
    assert stages, "no numbered stage found"
    for path in stages:
        n = len(path.read_text().splitlines())
        assert n < 1000, f"{path.name} has {n} lines"


def test_no_unsafe_loading():
    unsafe = re.compile(r"pickle\.load|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only\s*=\s*True)")
    sources = list(ROOT.glob("*.py")) + list(ROOT.glob("spikelib/*.py")) + list(ROOT.glob("benchmarks/*.py"))
    for path in sources:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            assert not unsafe.search(line), f"{path.name}:{i}: {line.strip()}"
