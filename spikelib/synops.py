"""What one token costs the spiking model and its ANN twin, counted in synaptic operations
(stages 3, 4 and 5 count the same way; spikelib.report turns the counts into energy)."""


def synaptic_ops(cfg, rates):
    """Per-token operation counts of the spiking model (ACs on spikes, MACs on reals) and of
    its ANN twin (all MACs). A layer fed by spikes: rate_in * in * out * T accumulates.
    Attention per timestep and head: linear form S += k^T v, y = q S -> (rate_k + rate_q) dh^2
    ACs (twin: 2 dh^2 MACs); hadamard c += k * v -> rate_k dh ACs (twin: 2 dh MACs, k*v and q*z).
    The readout (real-valued, D*V) is a MAC in both; norms and neuron updates are not counted.
    rate_coding: attention reads running means (reals), T times the twin's MACs.
    Outputs that are not exactly binary or ternary (sigmoid4x with quant identity: rates p) make
    every one of these operations a MAC. LITS outputs {-s-, 0, s+} count as ACs: diag(s+) W and
    diag(s-) W are fixed weights folded once after training, so a layer adds their rows for its
    ternary spikes (two weight copies, no multiply); in attention the scales fold the same way into
    the constants each spike adds to one of four sign-indexed states."""
    D, F, V, T, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.T, cfg.n_head
    dh = D // H
    ac, ann, mac = 0.0, 0.0, D * V
    for r in rates:
        ac += T * (3 * r["sn1"] * D * D + r["wo_input"] * D * D + r["sn2"] * D * F + r["mlp.sn_h"] * F * D)
        ann += 4 * D * D + 2 * D * F
        attn_mac = 2 * H * dh * dh if cfg.attention == "linear" else 2 * H * dh
        ann += attn_mac
        if cfg.rate_coding:            # attention on running means multiplies reals: MACs
            mac += T * attn_mac
        elif cfg.attention == "linear":
            ac += T * H * (r["attn.sn_k"] + r["attn.sn_q"]) * dh * dh
        else:
            ac += T * H * r["attn.sn_k"] * dh
    if cfg.spike_fn == "sigmoid4x" and cfg.quant == "identity":     # no spikes at all: all MACs
        return {"ac": 0.0, "mac": ac + mac, "ann_mac": ann + D * V}
    return {"ac": ac, "mac": mac, "ann_mac": ann + D * V}
