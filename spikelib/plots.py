"""Pictures of a trained run, for `--plot 1` in stages 3, 4 and 5: four small PNGs written beside
the checkpoint.

    curves.png   bits per character against step and against wall-clock minutes, from the run's
                 metrics.jsonl (spikelib.metrics), with the ANN twin's curves beside them when its
                 run sits in the sibling folder OUT_DIR_ann (train it with
                 `--spiking 0 --out_dir OUT_DIR_ann`; a run named *_ann finds its spiking twin
                 in OUT_DIR without the suffix)
    rates.png    the spike rate of every neuron site in every block, on validation windows
    raster.png   the spikes of one validation sequence as it passes through the blocks
    decay.png    each attention head's decay gamma_h^lag: how far back it remembers

Every backend writes the same checkpoint, so the pictures come from the NumPy reference (stage 3)
whichever stage trained the run. matplotlib is an optional extra, imported only here and only
when a picture is drawn (the Agg backend: no display needed).
"""
import io
import math
from pathlib import Path

import numpy as np

from spikelib.checkpoint import tokenizer_path
from spikelib.files import write_bytes_atomic
from spikelib.metrics import read_metrics
from spikelib.stages import load_stage

MISSING = "--plot needs matplotlib: pip install matplotlib"
RASTER_POSITIONS, RASTER_CHANNELS = 24, 32       # the raster's window: tokens and neurons per block


def pyplot():
    """matplotlib.pyplot on the Agg backend; ValueError(MISSING) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(MISSING) from None
    return plt


def twin_folder(run_dir):
    """The folder of a run's twin by the naming convention: OUT_DIR <-> OUT_DIR_ann."""
    run_dir = Path(run_dir)
    if run_dir.name.endswith("_ann"):
        return run_dir.with_name(run_dir.name[:-len("_ann")])
    return run_dir.with_name(run_dir.name + "_ann")


def curve_points(records, index):
    """(steps, minutes, bpc) of one evaluation context (index 0: the training context, 1: 4x)."""
    rows = [(r["step"], r["seconds"] / 60, r["evals"][index]["bpc"]) for r in records
            if len(r["evals"]) > index]
    return tuple(np.array(col) for col in zip(*rows)) if rows else None


def plot_curves(run_dir, path, spiking=True):
    """curves.png: validation BPC against step (left) and wall-clock minutes (right), the
    spiking run and, when its log exists, the ANN twin. Returns path, or None without a log."""
    plt = pyplot()
    runs = {"spiking" if spiking else "ANN twin": read_metrics(Path(run_dir) / "metrics.jsonl"),
            "ANN twin" if spiking else "spiking": read_metrics(twin_folder(run_dir) / "metrics.jsonl")}
    if not any(runs.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for (name, records), color in zip(runs.items(), ("tab:orange", "tab:blue")):
        for index, style in ((0, "-"), (1, "--")):
            points = curve_points(records, index)
            if points is None:
                continue
            steps, minutes, bpc = points
            label = f"{name}, context {records[-1]['evals'][index]['context']}"
            axes[0].plot(steps, bpc, style, color=color, marker="o", ms=3, label=label)
            axes[1].plot(minutes, bpc, style, color=color, marker="o", ms=3, label=label)
    axes[0].set(xlabel="training step", ylabel="validation bits per character", title="by step")
    axes[1].set(xlabel="wall-clock minutes of training", title="by time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Learning curves (lower is better)")
    return save(fig, path, plt)


def plot_rates(rates, spiking, path):
    """rates.png: a heatmap of spike rates, one row per block, one column per neuron site."""
    plt = pyplot()
    sites = [s for s in rates[0] if s != "wo_input"]
    grid = np.array([[r[s] for s in sites] for r in rates])          # (n_layer, sites)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rates) + 1.8))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.5, grid.max()), aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if value < 0.6 * max(0.5, grid.max()) else "black")
    ax.set_xticks(range(len(sites)), [s.replace("attn.", "") for s in sites])
    ax.set_yticks(range(len(rates)), [f"block {i}" for i in range(len(rates))])
    what = "fraction of neurons firing per timestep" if spiking else "ANN twin: fraction of nonzero outputs"
    fig.colorbar(image, ax=ax, label="rate")
    ax.set_title(f"Spike rates ({what})", fontsize=10)
    return save(fig, path, plt)


def plot_raster(cache, tokens, T, spiking, path, site="sn1"):
    """raster.png: the spikes at `site` (the block's input neurons) of the first sequence, one
    panel per block; x is time, T timesteps per token, y the first RASTER_CHANNELS neurons."""
    plt = pyplot()
    n_layer, L = len(cache["blocks"]), min(RASTER_POSITIONS, len(tokens))
    fig, axes = plt.subplots(n_layer, 1, figsize=(9, 1.1 * n_layer + 1.2), sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        s = np.asarray(cache["blocks"][i][site]["s"])[:, 0, :L, :RASTER_CHANNELS]   # (T, L, C)
        image = s.transpose(2, 1, 0).reshape(s.shape[2], L * s.shape[0])           # (C, L*T)
        ax.imshow(image != 0, cmap="Greys", aspect="auto", interpolation="nearest")
        for pos in range(1, L):
            ax.axvline(pos * T - 0.5, color="tab:blue", lw=0.3, alpha=0.5)
        ax.set_yticks([])
        ax.set_ylabel(f"block {i}", rotation=0, ha="right", va="center", fontsize=8)
    axes[-1, 0].set_xticks([pos * T + (T - 1) / 2 for pos in range(L)],
                           [repr(t)[1:-1] for t in tokens[:L]], rotation=60, fontsize=7)
    kind = f"{T} timesteps per token" if spiking else "ANN twin: nonzero activations"
    fig.suptitle(f"Spikes of {RASTER_CHANNELS} input neurons per block on one sequence ({kind})", fontsize=10)
    return save(fig, path, plt)


def half_life(gamma):
    """The lag after which gamma^lag has fallen to one half: ln(1/2) / ln(gamma)."""
    return math.log(0.5) / math.log(gamma)


def plot_decay(cfg, path):
    """decay.png: how much of a token each head still sees `lag` positions later, gamma_h^lag,
    gamma_h = 1 - 2^-(decay_start + decay_step h), with each head's half-life marked."""
    plt = pyplot()
    lags = np.unique(np.geomspace(1, 4 * cfg.context, 200).astype(int))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for h in range(cfg.n_head):
        gamma = 1 - 2.0 ** -(cfg.decay_start + cfg.decay_step * h)
        line, = ax.plot(lags, gamma ** lags, label=f"head {h}: half gone after {half_life(gamma):.1f} tokens")
        ax.plot([half_life(gamma)], [0.5], "o", color=line.get_color())
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.axvline(cfg.context, color="grey", lw=0.8, ls="--")
    ax.text(cfg.context, 1.02, " training context", fontsize=8, color="grey")
    ax.set(xscale="log", xlabel="tokens back (lag)", ylabel="weight gamma^lag", ylim=(0, 1.08),
           title="How far back each attention head remembers")
    ax.legend(fontsize=8, loc="upper right")
    return save(fig, path, plt)


def save(fig, path, plt):
    """Write the figure as a small PNG (atomically: rendered to memory, then spikelib.files)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def plot_checkpoint(ckpt, folder=None):
    """All four pictures of a checkpoint into folder (default: the checkpoint's), printed and
    returned. Spike rates and the raster come from stage 3's forward on validation windows."""
    s3 = load_stage("3_spike_llm_numpy")
    ckpt = Path(ckpt)
    folder = Path(folder or ckpt.parent)
    params, cfg, _, _, _, config = s3.load_model(ckpt)
    tok = s3.load_tokenizer(config, ckpt)
    data_dir = tokenizer_path(config, ckpt).parent          # the dataset folder holds the tokenizer
    x, _ = s3.summary_inputs(data_dir, cfg.context, tok)
    _, cache = s3.forward(params, cfg, x)
    tokens = [tok.decode([int(t)]) for t in x[0]]
    written = [plot_curves(ckpt.parent, folder / "curves.png", cfg.spiking),
               plot_rates(s3.spike_rates(cache, cfg), cfg.spiking, folder / "rates.png"),
               plot_raster(cache, tokens, s3.timesteps(cfg), cfg.spiking, folder / "raster.png"),
               plot_decay(cfg, folder / "decay.png")]
    written = [p for p in written if p]
    print("plots: " + ", ".join(str(p) for p in written))
    return written



def plot_only(args, ckpt):
    """Whether --plot asks for the pictures of an existing checkpoint instead of a training run.
    With --plot, matplotlib is checked first (ValueError(MISSING)), so no run ends in that error."""
    if not args.plot:
        return False
    pyplot()
    return Path(ckpt).exists() and not (args.resume or args.overwrite)
