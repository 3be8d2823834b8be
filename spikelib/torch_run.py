"""The run around a torch SpikeLM (stage 5, and the torch paths of later stages): scoring it on the
validation text, its spike rates and energy, sampling from it, its checkpoint file, its optimizer's
parameter groups, and evaluation on rank 0 of several training processes. The model and its
training step are the lesson and stay in the stage; this is what every torch run does around them."""
from functools import partial

import torch
import torch.nn.functional as F

from spikelib.evaluation import validation_report
from spikelib.report import energy_summary, print_evals, print_summary, stream_sample
from spikelib.runs import save_model, summary_inputs
from spikelib.sampling import sample_token
from spikelib.stages import load_stage
from spikelib.torch_io import export_adam_moments, export_params, record_spike_rates


@torch.no_grad()
def batch_nats(model, x, y):
    """Total nats of the targets y (B, L) under the parallel form, forward only."""
    device = model.embed.weight.device
    logits = model(torch.from_numpy(x).to(device))
    y = torch.from_numpy(y).to(device)
    return float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))


def eval_report(model, val, context, max_tokens, decode):
    """Stage 3's validation figures on the same windows, in the same batches."""
    nats = partial(batch_nats, model)
    return validation_report(nats, val, context, model.cfg.context, max_tokens, decode)


@torch.no_grad()
def energy_report(model, x):
    """Spike rates per layer and site, recorded by forward hooks at stage 3's sites and at what feeds
    wo (attn.wo_input), counted and reported as stage 3 does."""
    S3 = load_stage("3_spike_llm_numpy")
    where = {site: site for site in S3.SITES} | {"wo_input": "attn.wo_input"}   # site -> module path
    with record_spike_rates(model.blocks, where) as rates:
        model(x)
    return energy_summary(model.cfg, S3.synaptic_ops(model.cfg, rates), rates)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, rng, temperature=1.0, top_k=0, top_p=1.0):
    """Yield token ids one at a time: the prompt fills the state in one parallel (chunked) pass,
    then every new token costs one recurrent step, whatever the context length."""
    device = model.embed.weight.device
    state = model.init_state(1)
    logits = model(torch.tensor([prompt_ids], device=device), state)[0, -1]
    for _ in range(max_new_tokens):
        nxt = sample_token(logits.cpu().numpy(), rng, temperature, top_k, top_p)
        yield nxt
        logits = model(torch.tensor([[nxt]], device=device), state)[0, -1]


def stream_text(tok, model, prompt, sc, out=None):
    """Sample sc.max_new_tokens after the prompt and print them as they come."""
    return stream_sample(tok, prompt, sc, partial(generate, model), out)


def print_run_summary(model, tok, data_dir, sc, ckpt):
    """What a finished training run prints (spikelib.report.print_summary): the energy report on 8
    validation windows, a sample streamed after the opening words of the validation text, the checkpoint."""
    x, prompt = summary_inputs(data_dir, model.cfg.context, tok)
    energy = energy_report(model, torch.from_numpy(x).to(model.embed.weight.device))[0]
    print_summary(energy, lambda: stream_text(tok, model, prompt, sc), sc, ckpt)


def save_torch_model(path, model, opt, mcfg, tcfg, step, tok_info, data_dir):
    """Stage 3's checkpoint file: params, AdamW moments, config with the completed step."""
    save_model(path, export_params(model), mcfg, tcfg, step, export_adam_moments(opt), tok_info, data_dir)


def layerwise_groups(model, tcfg, layer_depth):
    """One AdamW parameter group per parameter, named, with its layer-wise lr multiplier
    layer_lr_decay^(n_layer + 1 - depth) ("mult") and weight decay on matrices only."""
    n_layer = model.cfg.n_layer
    groups = []
    for name, p in model.named_parameters():
        mult = tcfg.layer_lr_decay ** (n_layer + 1 - layer_depth(name, n_layer))
        groups.append({"params": [p], "name": name, "mult": mult,
                       "weight_decay": tcfg.weight_decay if p.ndim >= 2 else 0.0})
    return groups


def set_layerwise_lr(opt, lr):
    """Each group's learning rate: lr times its layer-wise multiplier."""
    for group in opt.param_groups:
        group["lr"] = lr * group["mult"]


def evaluate_on_main(group, model, done, report, context):
    """print_evals(done, report, context) on rank 0 with the model in eval mode (no dropout), then
    back in training mode; the other ranks wait for it and return no results."""
    results = []
    if group.main:
        model.eval()
        results = print_evals(done, report, context)
        model.train()
    group.barrier()
    return results
