"""The plumbing around a training stage's run (stages 3, 4 and 5 share it through stage 3): the
sampling options, the configs a run takes from its command line and its checkpoint, and the
parameters it starts from."""
from dataclasses import dataclass, replace
from pathlib import Path

from spikelib.checkpoint import check_vocab
from spikelib.cli import check_fields, given_options, preset_configs, resumed_config
from spikelib.runs import check_tokenizer, load_model

ERRORS = (ValueError, OSError, FloatingPointError)    # what a stage reports as one line (CheckpointError
                                                      # is a ValueError); anything else is a bug


@dataclass
class SampleConfig:
    max_new_tokens: int = 120     # tokens to sample after the prompt
    temperature: float = 0.8      # softmax temperature; 0 always picks the most likely token
    top_k: int = 40               # sample only among the k most likely tokens (0: all)
    top_p: float = 0.95           # ... and the smallest set of them whose probability reaches top_p
    sample_seed: int = 0          # seed of the sampler

    def __post_init__(self):
        check_fields(self, {"max_new_tokens": ">= 0", "temperature": ">= 0", "top_k": ">= 0",
                            "top_p": "in (0, 1]", "sample_seed": ">= 0"})


def check_model_config(cfg):
    """Refuse a model config (stage 3's ModelConfig, its choices checked) that cannot run, with one
    error naming the option: a size below 1, heads that do not divide d_model, a quantizer on
    heaviside spikes, a rate, leak or threshold out of range."""
    sizes = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "T", "context")
    check_fields(cfg, dict.fromkeys(sizes, ">= 1"))
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"--n_head must divide --d_model {cfg.d_model}, got {cfg.n_head}")
    if cfg.spike_fn == "heaviside" and cfg.quant != "round_ste":
        raise ValueError(f"--quant {cfg.quant} needs --spike_fn sigmoid4x (heaviside spikes are binary)")
    check_fields(cfg, {"decay_start": "> 0 (so that 0 < gamma < 1)", "decay_step": ">= 0",
                       "alpha": "> 0", "dropout": "in [0, 1)", "theta": "> 0", "norm_eps": "> 0",
                       "syn_alpha": "in [0, 1)", "alif_rho": "in [0, 1]", "alif_kappa": ">= 0",
                       "beta": "in (0, 1)" if cfg.neuron == "plif" else "in [0, 1] (1: no leak)"})


def check_train_config(cfg):
    """Refuse a training config (stage 3's TrainConfig) with a size, rate or interval out of range."""
    check_fields(cfg, {"batch_size": ">= 1", "max_steps": ">= 1", "max_minutes": ">= 0", "lr": "> 0",
                       "min_lr": ">= 0", "warmup": ">= 0", "weight_decay": ">= 0", "grad_clip": ">= 0",
                       "layer_lr_decay": "> 0", "eval_interval": ">= 1", "eval_tokens": ">= 0",
                       "repeat": "in [0, 1]"})


def resolve_configs(args, out_dir, presets, model_cls, train_cls, shapes_of):
    """(model config, train config, checkpoint path) from parsed options: the preset with the fields
    given changed; when resuming, the saved run's own configs with only the training options given
    now changed (a resumed run keeps its model). A new run does not replace another run's
    checkpoint unless asked (--overwrite 1). shapes_of(model config): the parameter shapes."""
    overrides = given_options(args, model_cls, train_cls)
    overrides.setdefault("out_dir", out_dir)
    mcfg, tcfg = preset_configs(presets, args.preset, overrides, model=model_cls, train=train_cls)
    ckpt = Path(args.ckpt or Path(tcfg.out_dir) / "ckpt.npz")
    if args.resume:
        _, saved_model, saved_train, _, _, _ = load_model(ckpt, model_cls, shapes_of)
        for name in given_options(args, model_cls):
            if getattr(saved_model, name) != getattr(mcfg, name):
                raise ValueError(f"--{name}: the checkpoint's model has {getattr(saved_model, name)!r}; a "
                                 f"resumed run keeps its model (start a new one with --overwrite 1)")
        tcfg = resumed_config(train_cls, saved_train, overrides, tcfg)
    elif args.generate is None and not args.plot and ckpt.exists() and not args.overwrite:
        raise ValueError(f"{ckpt} already holds a trained checkpoint: continue it with --resume 1, "
                         f"replace it with --overwrite 1, or choose another --out_dir")
    return mcfg, tcfg, ckpt


def start_run(mcfg, seed, ckpt_path, resume, tok_info, load, init):
    """(params, mcfg, step, opt_state or None) a run starts from: load(ckpt_path)'s when resuming
    (with the checkpoint's own model config, checked against the dataset's tokenizer), else
    init(mcfg, seed) for the tokenizer's vocabulary (a larger model vocabulary would let the
    sampler draw ids the tokenizer cannot decode)."""
    if resume:
        params, mcfg, _, step, opt, config = load(ckpt_path)
        check_tokenizer(config, tok_info["sha256"], ckpt_path)
        check_vocab(mcfg.vocab_size, tok_info["vocab_size"], ckpt_path)
        print(f"resuming {ckpt_path} at step {step}")
        return params, mcfg, step, opt
    if mcfg.vocab_size != tok_info["vocab_size"]:      # one embedding row per token the tokenizer has
        mcfg = replace(mcfg, vocab_size=tok_info["vocab_size"])
    return init(mcfg, seed), mcfg, 0, None
