"""What the stages print, in one format for every backend: streamed text, the model and
evaluation lines, the spike-rate and energy report."""
import sys

import numpy as np
from tqdm import tqdm


def print_stream(tok, prompt, ids, new_tokens, out=None):
    """Print the prompt, then each new piece of text as soon as it is complete (a byte-level
    token may end mid-character: wait for the rest before printing). Returns the whole text."""
    out = out or sys.stdout
    out.write(prompt)
    ids, shown = list(ids), tok.decode(ids)
    for nxt in new_tokens:
        ids.append(nxt)
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):] if text.startswith(shown) else "")
            out.flush()
            shown = text
    out.write("\n")
    return tok.decode(ids)


def stream_sample(tok, prompt, sc, generate, out=None):
    """Sample sc.max_new_tokens after the prompt with generate(prompt_ids, n, rng, temperature,
    top_k, top_p), a generator of token ids, printing the text as it comes; returns all of it."""
    ids = tok.encode(prompt) or [tok.bos_id]
    rng = np.random.default_rng(sc.sample_seed)
    new = generate(list(ids), sc.max_new_tokens, rng, sc.temperature, sc.top_k, sc.top_p)
    return print_stream(tok, prompt, ids, new, out)


def model_line(n_params, mcfg, n_train, n_val, backend=""):
    """One line naming the model and the data, printed when training starts."""
    kind = mcfg.neuron if mcfg.spiking else "ANN twin"
    return (f"model: {n_params / 1e6:.2f} M parameters, {mcfg.n_layer} layers, d={mcfg.d_model}, T={mcfg.T}, "
            f"context {mcfg.context}, {kind}{'; ' + backend if backend else ''}; "
            f"data: {n_train:,} train / {n_val:,} val tokens")


def eval_line(step, r):
    """One validation result (a dict of eval_result) as printed during training; a result on a
    slice of the split says so."""
    scope = "whole val split"
    if not r["whole"]:
        scope = f"slice: first {r['tokens']:,} of {r['split_tokens']:,} val tokens"
    return (f"step {step}: val @ context {r['context']}: {r['nats']:.4f} nats/token, ppl {r['ppl']:.2f}, "
            f"{r['bpc']:.4f} bits/char ({scope}, {r['tokens']:,} tokens, {r['chars']:,} chars)")


def print_evals(step, report, context):
    """Evaluate at the training context and at 4x it (decoding is not capped by the context) with
    report(ctx) -> an eval_result or None, and print each result above the progress bar; returns them."""
    results = [r for r in (report(ctx) for ctx in (context, 4 * context)) if r]
    for r in results:
        tqdm.write(eval_line(step, r))
    return results


E_AC, E_MAC = 0.9e-12, 4.6e-12    # joules per accumulate / multiply-accumulate, 45 nm (Horowitz 2014)


def energy_summary(cfg, ops, rates):
    """(report text, figures) of a model's energy per token at 45 nm, from its operation counts
    (ACs on spikes, MACs on real values; spikelib.synops) and spike rates per layer."""
    if not cfg.spiking:       # the twin itself: every layer is dense multiply-accumulates
        ops = dict(ops, ac=0.0, mac=ops["ann_mac"])
    e_snn = ops["ac"] * E_AC + ops["mac"] * E_MAC
    e_ann = ops["ann_mac"] * E_MAC
    text = energy_text(rates, cfg.spiking, cfg.T, ops, e_snn, e_ann)
    return text, {"rates": rates, "ops": ops, "energy_snn": e_snn, "energy_ann": e_ann}


def energy_text(rates, spiking, T, ops, e_snn, e_ann):
    """The spike-rate table (layer x site), its mean, and the energy per token of both models."""
    sites = list(rates[0])
    lines = ["layer " + " ".join(f"{s.replace('attn.', ''):>9}" for s in sites)]
    lines += [f"{i:5d} " + " ".join(f"{r[s]:9.3f}" for s in sites) for i, r in enumerate(rates)]
    if spiking:
        mean = sum(r[s] for r in rates for s in sites if s != "wo_input") / (len(rates) * (len(sites) - 1))
        lines.append(f"mean spike rate {mean:.3f} over {T} timesteps")
    else:
        lines.append("(ANN twin: fraction of nonzero activations)")
    lines.append(f"per token: spiking {ops['ac'] / 1e6:.2f} M AC + {ops['mac'] / 1e6:.2f} M MAC"
                 f" = {e_snn * 1e9:.2f} nJ;  ANN twin {ops['ann_mac'] / 1e6:.2f} M MAC = {e_ann * 1e9:.2f} nJ"
                 f"  (x{e_ann / e_snn:.2f}, 45 nm: AC 0.9 pJ, MAC 4.6 pJ)")
    return "\n".join(lines)


def print_summary(energy, sample, sc, ckpt):
    """What a finished training run prints: the energy report, a streamed sample, the checkpoint."""
    print("\nspike statistics on validation windows (rate = fraction of neurons firing per timestep):")
    print(energy)
    print(f"\nsample (recurrent form, temperature {sc.temperature}, top-k {sc.top_k}, top-p {sc.top_p}):")
    sample()
    print(f"\ncheckpoint: {ckpt}")
