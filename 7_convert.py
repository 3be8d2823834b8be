"""Stage 7: convert a trained ANN twin into the spiking LLM, calibrated, then optionally fine-tuned.

The ANN twin (stages 3-5 with --spiking 0) is the network a conversion starts from: one timestep,
relu at every neuron site. The spiking model runs T timesteps of integrate-and-fire neurons. A
spike train's rate stands in for a relu activation:

    IF with soft reset, threshold 1, input x/lam each step:  rate = count/T -> clip(x/lam, 0, 1)

so a neuron reproduces relu(x) up to the scale lam and a clip at lam. Conversion therefore
  1. runs the ANN on calibration windows of its own training text and takes lam at every site as a
     high percentile of the activations there (per channel where a weight can carry it);
  2. folds lam into the weights (data-based normalisation): what FEEDS a neuron is divided by lam_c
     (the RMSNorm gains of norm1, norm2 and the head norm; the columns of wq, wk, wv, w1), what
     READS its spikes is multiplied by lam_c (the rows of wq, wk, wv, wo, w1, w2), so each layer's
     expected input is unchanged, a spike carries the value lam_c, and a global threshold 1 works;
  3. switches the model to rate coding (ModelConfig.rate_coding, stage 3): a network that computes
     per timestep cannot converge. RMSNorm(h_t) of one timestep's residual stream and attention's
     triple product (q_l . k_j) v_j of one timestep's spikes are nonlinear: the mean of products of
     spike trains is not the product of their rates. With rate coding the norms read the running
     mean hbar_t = mean_{tau<=t} h_tau and attention reads the running rates qbar_t, kbar_t, vbar_t,
     so every nonlinearity acts on rate estimates whose error falls like 1/t, and the output of
     attention at step t, sum_j gamma^(l-j) (qbar_l . kbar_j) vbar_j, approaches the ANN's y / (lam_q
     lam_k lam_v) as T grows (tests/test_convert.py measures it). q, k, v take one lam per site, not
     per channel: nothing but the attention reads them, and a scalar factor of y is removed by the
     head norm that follows (its epsilon rescaled to match: spiking_config). The cost: attention on
     running means multiplies reals, so its operations count as MACs in the energy figures.
Then it picks T (--timesteps auto: the smallest T of the sweep within --tolerance bits per character
of the ANN), writes a spiking checkpoint that stages 3-6 load, and can continue with surrogate-
gradient training (--finetune_steps) on any backend.

Where it falls short: every site's rate is off by about 1/T (the charge left in the membrane, the
clip at lam), attention multiplies three such rates, and each block reads the errors of all the
blocks before it. A 4-block model converts well (TinyShakespeare, README: 0.05 bits/char from its
ANN at T = 32); a 12-block one needs far more timesteps for the same gap (about 0.37 at T = 32;
the same small model with 12 blocks instead of 4: 0.108 against 0.046 at T = 32, README).

    python 7_convert.py --ckpt out/numpy/ckpt.npz                      # calibrate, sweep T, choose T
    python 7_convert.py --ckpt ann.npz --timesteps 4 --finetune_steps 100 --plot 1
    python 7_convert.py --retime out/convert/ckpt.npz --timesteps 16   # a converted model at another T
    python 7_convert.py --ckpt ann.npz --compare out/numpy/ckpt.npz    # ... and a directly trained SNN
"""
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelib.checkpoint import tokenizer_path  # noqa: E402
from spikelib.cli import add_config_options, check_choices, check_fields, config_from_args, fail  # noqa: E402
from spikelib.evaluation import eval_windows  # noqa: E402
from spikelib.files import atomic_write  # noqa: E402
from spikelib.stages import load_stage  # noqa: E402

S3 = load_stage("3_spike_llm_numpy")

# ----------------------------------------------------------------------------- config


@dataclass
class ConvertConfig:
    ckpt: str = "out/numpy/ckpt.npz"      # the ANN twin to convert (stage 3, 4 or 5 with --spiking 0)
    out: str = "out/convert/ckpt.npz"     # the converted spiking checkpoint
    retime: str = ""                      # instead: a converted checkpoint to rewrite at --timesteps
    data_dir: str = ""                    # the prepared dataset (default: the checkpoint's own)
    calib_tokens: int = 8192              # training tokens the thresholds are calibrated on
    percentile: float = 99.9              # threshold = this percentile of a site's positive activations
    per_channel: bool = True              # one threshold per channel where a weight can carry it
    neuron: str = "if"                    # if (integrate-and-fire, no leak) | lif (leak --beta); soft reset
    beta: float = 0.95                    # LIF leak per timestep (--neuron lif)
    timesteps: str = "auto"               # T of the written model: a number, or auto (see --tolerance)
    tolerance: float = 0.15               # auto: the smallest swept T within this many bits/char of the ANN
    sweep: str = "1,2,4,8,16,32,64"       # the T evaluated and reported
    eval_tokens: int = 0                  # validation tokens scored (0: the whole split; else its start)
    backend: str = "numpy"                # numpy (stage 3) | torch | triton (stage 5) for eval, fine-tuning
    device: str = "auto"                  # torch/triton: auto | cpu | cuda
    finetune_steps: int = 0               # surrogate-gradient steps after conversion (0: none)
    finetune_T: int = 4                   # timesteps of the fine-tuned model
    finetune_lr: float = 0.0              # peak lr of fine-tuning, cosine to a tenth (0: the ANN's lr / 3)
    compare: str = ""                     # a directly trained spiking checkpoint scored on the same text
    report: str = "out/convert/report.json"   # the figures as JSON (the PNG goes beside it)
    plot: bool = False                    # also draw bits/char against T as a PNG (needs matplotlib)
    overwrite: bool = False               # replace an existing --out

    def __post_init__(self):
        check_choices(self, {"neuron": ("if", "lif"), "backend": ("numpy", "torch", "triton"),
                             "device": ("auto", "cpu", "cuda")})
        check_fields(self, {"calib_tokens": ">= 1", "percentile": "in (0, 100]", "beta": "in (0, 1]",
                            "tolerance": ">= 0", "eval_tokens": ">= 0", "finetune_steps": ">= 0",
                            "finetune_T": ">= 1", "finetune_lr": ">= 0"})
        for t in self.sweep_T() + ([] if self.timesteps == "auto" else [self.chosen_T()]):
            if t <= 0:
                raise ValueError(f"timesteps must be >= 1, got {t}")

    def sweep_T(self):
        try:
            return sorted({int(t) for t in self.sweep.split(",")})
        except ValueError:
            raise ValueError(f"--sweep must be whole numbers separated by commas, got {self.sweep!r}") \
                from None

    def chosen_T(self):
        try:
            return int(self.timesteps)
        except ValueError:
            raise ValueError(f"--timesteps must be a whole number or auto, got {self.timesteps!r}") from None


SITE_FEEDS = {   # site -> (parameter that feeds it: divided by lam, parameters that read it: rows * lam)
    "sn1": ("norm1.weight", ("attn.wq", "attn.wk", "attn.wv")),
    "attn.sn_o": ("attn.norm.weight", ("attn.wo",)),
    "sn2": ("norm2.weight", ("mlp.w1",)),
    "mlp.sn_h": ("mlp.w1", ("mlp.w2",)),
    "attn.sn_q": ("attn.wq", ()), "attn.sn_k": ("attn.wk", ()), "attn.sn_v": ("attn.wv", ()),
}
SCALAR_SITES = ("attn.sn_q", "attn.sn_k", "attn.sn_v")    # read by attention only: one lam per site

# ----------------------------------------------------------------------------- the ANN and its data


def load_ann(path, data_dir=""):
    """(params, ModelConfig, config, data_dir) of an ANN-twin checkpoint whose tokenizer is its dataset's;
    ValueError (one line) for a spiking model, hadamard attention or a mismatched tokenizer."""
    params, mcfg, _, _, _, config = S3.load_model(path)
    if mcfg.spiking:
        raise ValueError(f"{path} holds a spiking model; stage 7 converts an ANN twin "
                         f"(trained with --spiking 0)")
    if mcfg.attention != "linear":
        raise ValueError(f"{path} uses hadamard attention, whose gate q * z multiplies spikes; "
                         f"stage 7 converts linear attention")
    data_dir = Path(data_dir) if data_dir else tokenizer_path(config, path).parent
    _, tok, info = S3.load_dataset_info(data_dir)
    S3.check_tokenizer(config, info["sha256"], path)
    return params, mcfg, config, data_dir, tok


def calibration_windows(train, context, n_tokens):
    """x (n, context): n = n_tokens // context windows at evenly spaced starts over the train split
    (deterministic: the same windows every run)."""
    n = max(1, n_tokens // context)
    starts = np.linspace(0, len(train) - context - 1, n).astype(np.int64)
    return np.stack([np.asarray(train[s:s + context]) for s in starts]).astype(np.int64)


def site_activations(params, cfg, x, batch=8):
    """Per layer {site: relu outputs of the twin over all calibration tokens, (N, C)}."""
    acts = [{site: [] for site in S3.SITES} for _ in range(cfg.n_layer)]
    for b in range(0, len(x), batch):
        _, cache = S3.forward(params, cfg, x[b:b + batch])
        for layer, c in zip(acts, cache["blocks"]):
            for site in S3.SITES:
                layer[site].append(c[site]["s"].reshape(-1, c[site]["s"].shape[-1]))
    return [{site: np.concatenate(a) for site, a in layer.items()} for layer in acts]


def site_thresholds(a, percentile, per_channel):
    """lam for one site from its activations a (N, C): the percentile of the positive values, per
    channel or over the site. A channel that never fired in calibration takes the site's value."""
    positive = np.where(a > 0, a, np.nan)
    site = np.nanpercentile(positive, percentile) if np.any(a > 0) else 1.0
    if not per_channel:
        return np.full(a.shape[1], site)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                   # an all-NaN (silent) channel
        lam = np.nanpercentile(positive, percentile, axis=0)
    return np.where(np.isfinite(lam) & (lam > 0), lam, site)


def calibrate(params, cfg, x, percentile, per_channel):
    """Per layer {site: lam (C,)} from the twin's activations on the calibration windows x."""
    out = []
    for layer in site_activations(params, cfg, x):
        out.append({site: site_thresholds(a, percentile, per_channel and site not in SCALAR_SITES)
                    for site, a in layer.items()})
    return out

# ----------------------------------------------------------------------------- conversion


def attention_scales(lams):
    """P = lam_q lam_k lam_v of each layer: the converted attention computes the ANN's y / P."""
    return [float(lam["attn.sn_q"][0] * lam["attn.sn_k"][0] * lam["attn.sn_v"][0]) for lam in lams]


def spiking_config(ann_cfg, T, cc, lams):
    """The converted model: IF (beta 1) or LIF with soft reset at threshold 1, T steps, rate coding.

    The epsilon. The head norm now sees y / P (P = lam_q lam_k lam_v, ~100 in a trained twin), and
    RMSNorm(y / P; eps) = y / sqrt(ms(y) + eps P^2) = RMSNorm(y; eps P^2): the twin's eps 1e-2 would
    act as ~100 on a y whose ms is ~100. So the converted model takes eps / P_max^2: exact in the
    layer with the largest P, smaller than the twin's elsewhere. The norms share one epsilon, so the
    residual norms get the small one too. Keeping theirs exact instead (the residual stream shrunk
    by P_max, the final gain grown by it) measured worse on TinyShakespeare `small` (+0.14 against
    +0.09 bits/char at T = 16) and leaves parameters ~100x off the twin's scale, which AdamW's
    fixed step size then wrecks in fine-tuning (3.32 against 3.07 bits/char after 24 steps)."""
    eps = ann_cfg.norm_eps / max(attention_scales(lams)) ** 2
    return replace(ann_cfg, spiking=True, T=T, neuron="lif", beta=1.0 if cc.neuron == "if" else cc.beta,
                   theta=1.0, reset="soft", detach_reset=False, rate_coding=True, dropout=0.0, norm_eps=eps)


def convert_params(params, ann_cfg, lams):
    """Fold the thresholds into the weights: feeds / lam_c, readers' rows * lam_c (float32).

    Per block, with L = lams[i]:  norm1 /= L.sn1;  wq, wk, wv <- diag(L.sn1) w / L.sn_{q,k,v};
    attn.norm /= L.sn_o;  wo <- diag(L.sn_o) wo;  norm2 /= L.sn2;  w1 <- diag(L.sn2) w1 / L.sn_h;
    w2 <- diag(L.sn_h) w2. Embedding, final norm and readout are unchanged (the residual stream is)."""
    snn_shapes = S3.param_shapes(replace(ann_cfg, neuron="lif"))         # PLIF's parameters are dropped
    p = {k: params[k].astype(np.float64) for k in snn_shapes}
    for i, lam in enumerate(lams):
        b = f"blocks.{i}."
        for site, (feed, readers) in SITE_FEEDS.items():
            p[b + feed] = p[b + feed] / lam[site]                         # last axis: the site's channels
            for r in readers:
                p[b + r] = p[b + r] * lam[site][:, None]
    return {k: v.astype(np.float32) for k, v in p.items()}


def attention_outputs(params, cfg, x):
    """Per layer the attention's output y (T, B, H, L, dh) before the head norm, for the tests."""
    ys = []
    orig = S3.headnorm

    def spy(y, g, eps):
        ys.append(y)
        return orig(y, g, eps)
    S3.headnorm = spy
    try:
        S3.forward(params, cfg, x)
    finally:
        S3.headnorm = orig
    return ys

# ----------------------------------------------------------------------------- evaluation


def backend_model(params, cfg, cc):
    """(stage 5, its model on the chosen backend in float32, in evaluation mode: no dropout, random
    quantizers round), or None for NumPy (stage 3)."""
    if cc.backend == "numpy":
        return None
    S5 = load_stage("5_spike_llm_triton")
    run = S5.resolve_run(S5.RunConfig(kernels=cc.backend, device=cc.device, dtype="float32"),
                         S5.triton is not None)
    return S5, S5.build_model(cfg, run, params).eval()


def evaluate(params, cfg, val, decode, cc):
    """{bpc, spike_rate, energy_nj, ops} on the evaluation text (the first eval_tokens of val, or with
    eval_tokens 0 all of it, the tail after the last full window too), spike rates and energy per
    token on its first 8 windows."""
    max_tokens = cc.eval_tokens
    x, _ = eval_windows(val, cfg.context, 8 * cfg.context)
    built = backend_model(params, cfg, cc)
    if built is None:
        r = S3.eval_report(params, cfg, val, cfg.context, max_tokens, decode)
        _, energy = S3.energy_report(params, cfg, x)
    else:
        S5, model = built
        r = S5.eval_report(model, val, cfg.context, max_tokens, decode)
        _, energy = S5.energy_report(model, S5.torch.from_numpy(x).to(model.embed.weight.device))
    rates = [v for layer in energy["rates"] for s, v in layer.items() if s != "wo_input"]
    return {"T": S3.timesteps(cfg), "bpc": r["bpc"], "tokens": r["tokens"], "chars": r["chars"],
            "spike_rate": float(np.mean(rates)), "energy_nj": energy["energy_snn"] * 1e9,
            "ops_M": {k: v / 1e6 for k, v in energy["ops"].items()}}


def choose_T(ann_bpc, results, tolerance):
    """The smallest swept T whose bits/char is within tolerance of the ANN's (None if none is)."""
    good = [r["T"] for r in results if r["bpc"] - ann_bpc <= tolerance]
    return min(good) if good else None

# ----------------------------------------------------------------------------- writing, fine-tuning


def save_converted(path, params, cfg, ann_config, data_dir, lams, cc, tok_info):
    """A spiking checkpoint in the one format; its train section is a fine-tuning schedule (step 0),
    and "conversion" records where it came from and the thresholds' summary."""
    train = dict(ann_config.get("train", {}))
    tcfg = S3.TrainConfig(**{f.name: train[f.name] for f in fields(S3.TrainConfig) if f.name in train})
    lr = cc.finetune_lr or tcfg.lr / 3      # small, 24 steps: 3e-4 -> 3.067 bits/char, 1e-3 -> 3.021
    tcfg = replace(tcfg, max_steps=max(1, cc.finetune_steps), lr=lr, min_lr=lr / 10,
                   warmup=0, max_minutes=0.0, eval_interval=max(1, cc.finetune_steps),
                   out_dir=str(Path(path).parent))
    S3.save_model(path, params, cfg, tcfg, 0, None, tok_info, data_dir)
    return tcfg


def finetune(path, cfg, tcfg, data_dir, cc):
    """Surrogate-gradient training of the converted checkpoint: stage 3's (or 5's) train, resumed
    from step 0 of the saved schedule. Returns (params, seconds)."""
    t0 = time.time()
    if cc.backend == "numpy":
        params, _, _ = S3.train(cfg, tcfg, data_dir, path, resume=True)
        return params, time.time() - t0
    S5 = load_stage("5_spike_llm_triton")
    run = S5.resolve_run(S5.RunConfig(kernels=cc.backend, device=cc.device), S5.triton is not None)
    model, _ = S5.train(cfg, tcfg, run, data_dir, path, resume=True)
    return S5.export_params(model), time.time() - t0


def retime(cc):
    """stac's calibrate_timesteps for this conversion: a converted checkpoint rewritten at another T.
    Rate coding makes the folded thresholds T-free (a rate is count / T, a running mean divides by t),
    so the weights stay and only T changes; the new model is scored before it is written."""
    params, cfg, train, _, _, config = S3.load_model(cc.retime)
    if not (cfg.spiking and cfg.rate_coding):
        raise ValueError(f"{cc.retime} is not a converted (rate-coded spiking) checkpoint")
    new = replace(cfg, T=cc.chosen_T())
    tcfg = S3.TrainConfig(**{f.name: train[f.name] for f in fields(S3.TrainConfig) if f.name in train})
    data_dir = tokenizer_path(config, cc.retime).parent
    S3.save_model(cc.out, params, new, tcfg, 0, None, config["tokenizer"], data_dir)
    print(f"{cc.retime} (T={cfg.T}) -> {cc.out} (T={new.T})")

# ----------------------------------------------------------------------------- report


def print_row(name, r, ann_bpc):
    gap = "" if ann_bpc is None else f"{r['bpc'] - ann_bpc:+8.4f}"
    print(f"{name:28} {r['T']:>3} {r['bpc']:8.4f} {gap:>8} {r['spike_rate']:8.3f} {r['energy_nj']:10.2f}")


def write_report(path, report, plot):
    """The figures as JSON (atomically), and with plot a PNG of bits/char against T beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
    if not plot:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; wrote the JSON only", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    Ts = [r["T"] for r in report["converted"]]
    ax.plot(Ts, [r["bpc"] for r in report["converted"]], "o-", label="converted SNN")
    ax.axhline(report["ann"]["bpc"], color="k", ls="--", label="ANN twin")
    for key, style in (("finetuned", "s"), ("direct", "^")):
        if report.get(key):
            label = {"finetuned": "converted + fine-tuned", "direct": "direct SNN"}[key]
            ax.plot([report[key]["T"]], [report[key]["bpc"]], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("timesteps T")
    ax.set_ylabel("bits per character")
    ax.legend()
    fig.tight_layout()
    png = path.with_suffix(".png")
    atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"plot: {png}")

# ----------------------------------------------------------------------------- main


def convert(cc):
    """Calibrate, sweep T, choose T, write the checkpoint, fine-tune, compare: the report dict."""
    if Path(cc.out).exists() and not cc.overwrite:
        raise ValueError(f"{cc.out} exists; replace it with --overwrite 1 or choose another --out")
    params, ann_cfg, config, data_dir, tok = load_ann(cc.ckpt, cc.data_dir)
    _, _, tok_info = S3.load_dataset_info(data_dir)
    train, val = S3.open_split(data_dir, "train"), S3.open_split(data_dir, "val")
    t0 = time.time()
    x = calibration_windows(train, ann_cfg.context, cc.calib_tokens)
    lams = calibrate(params, ann_cfg, x, cc.percentile, cc.per_channel)
    calib_s = time.time() - t0
    text = "whole validation split" if not cc.eval_tokens else f"first {cc.eval_tokens} validation tokens"
    print(f"calibrated on {x.size} training tokens in {calib_s:.1f} s; scoring on the {text}")
    print(f"{'model':28} {'T':>3} {'bits/chr':>8} {'vs ANN':>8} {'spikes':>8} {'nJ/token':>10}")
    ann = evaluate(params, ann_cfg, val, tok.decode, cc)
    print_row("ANN twin", ann, None)
    converted = {}
    snn = convert_params(params, ann_cfg, lams)
    for T in cc.sweep_T():
        cfg = spiking_config(ann_cfg, T, cc, lams)
        converted[T] = evaluate(snn, cfg, val, tok.decode, cc)
        print_row(f"converted ({cc.neuron})", converted[T], ann["bpc"])
    auto = choose_T(ann["bpc"], converted.values(), cc.tolerance)
    T = cc.chosen_T() if cc.timesteps != "auto" else (auto or max(converted))
    if cc.timesteps == "auto":
        print(f"auto: T = {T}" + ("" if auto else f" (no swept T is within {cc.tolerance} bits/char)"))
    report = {"ann_ckpt": cc.ckpt, "eval_text": text, "calibration_tokens": int(x.size),
              "calibration_seconds": calib_s, "settings": asdict(cc), "ann": ann,
              "converted": list(converted.values()), "auto_T": auto, "written_T": T,
              "thresholds (min, median, max)": [{s: [float(v.min()), float(np.median(v)), float(v.max())]
                                                 for s, v in lam.items()} for lam in lams]}
    cfg = spiking_config(ann_cfg, cc.finetune_T if cc.finetune_steps else T, cc, lams)
    Path(cc.out).parent.mkdir(parents=True, exist_ok=True)
    tcfg = save_converted(cc.out, snn, cfg, config, data_dir, lams, cc, tok_info)
    if cc.finetune_steps:
        report["before_finetune"] = evaluate(snn, cfg, val, tok.decode, cc)
        tuned, seconds = finetune(Path(cc.out), cfg, tcfg, data_dir, cc)
        report["finetuned"] = dict(evaluate(tuned, cfg, val, tok.decode, cc), steps=cc.finetune_steps,
                                   seconds=seconds)
        print_row(f"converted + {cc.finetune_steps} steps", report["finetuned"], ann["bpc"])
    if cc.compare:
        dparams, dcfg, dtrain, dstep, _, _ = S3.load_model(cc.compare)
        report["direct"] = dict(evaluate(dparams, dcfg, val, tok.decode, cc), steps=dstep)
        print_row(f"direct SNN ({dstep} steps)", report["direct"], ann["bpc"])
    print(f"checkpoint: {cc.out} (T={cfg.T}{', fine-tuned' if cc.finetune_steps else ''})")
    return report


def build_parser():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(ap, ConvertConfig, "conversion (ConvertConfig)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cc = config_from_args(ConvertConfig, args)
        if cc.retime:
            retime(cc)
            return 0
        report = convert(cc)
        write_report(cc.report, report, cc.plot)
        print(f"report: {cc.report}")
    except S3.ERRORS as err:          # ValueError (CheckpointError too), OSError, FloatingPointError
        return fail(err)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
