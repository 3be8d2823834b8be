"""The training log a run keeps beside its checkpoint: OUT_DIR/metrics.jsonl, one JSON line per
evaluation, for the curves of spikelib.plots.

    {"step": 300, "seconds": 141.2, "lr": 0.0003,
     "evals": [{"context": 64, "bpc": 2.19, "nats": 1.95, ...}, {"context": 256, ...}],
     "rates": {"sn1": 0.24, ...}}      # mean spike rate per site on the last training batch, if known

"seconds" is wall-clock time spent training, summed over resumed runs. The whole file is
rewritten atomically at each evaluation (spikelib.files), as every file a stage writes is: it
stays small (one line per evaluation), and a crash can never leave a torn last line. A resumed
run first drops the lines after its checkpoint's step, so the log always matches the checkpoint.
"""
import json
from pathlib import Path

from spikelib.files import write_text_atomic


def metrics_path(ckpt_path):
    """The log of a checkpoint: metrics.jsonl in the checkpoint's folder."""
    return Path(ckpt_path).parent / "metrics.jsonl"


def read_metrics(path):
    """The records of a log (a list of dicts; [] when there is none)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """The log of one run: a new run starts it empty, a resumed run keeps the lines up to its step."""

    def __init__(self, ckpt_path, start_step):
        self.path = metrics_path(ckpt_path)
        self.records = [r for r in read_metrics(self.path) if r["step"] <= start_step] if start_step else []
        self.seconds_before = self.records[-1]["seconds"] if self.records else 0.0

    def add(self, step, seconds, evals, stats):
        """Append one evaluation (evals: eval_result dicts) and rewrite the file."""
        record = {"step": int(step), "seconds": round(self.seconds_before + seconds, 2),
                  "lr": float(stats.get("lr", 0.0)),
                  "evals": [dict(e) for e in evals or [] if e]}
        if stats.get("rates"):
            sites = [s for s in stats["rates"][0] if s != "wo_input"]
            record["rates"] = {s: sum(r[s] for r in stats["rates"]) / len(stats["rates"]) for s in sites}
        self.records = [r for r in self.records if r["step"] < step] + [record]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
