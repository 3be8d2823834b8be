"""Stage 5 benchmarks on an NVIDIA GPU; prints markdown tables (and appends them to --out).

    python benchmarks/bench_triton.py                 # everything below
    python benchmarks/bench_triton.py --only neuron   # neuron | step | generate | profile

neuron:   multi-step LIF forward+backward, 8.4M neurons per step, T = 4 and 16: the fused
          Triton kernel vs the eager PyTorch loop, torch.compile of it, and snnTorch and
          SpikingJelly where installed, against the memory floor (the bytes it must move over
          the measured device-to-device copy bandwidth). Each is timed queued (calls back to
          back), as a lone call, and replayed from a CUDA graph (the GPU's own time, without
          the host's launch work).
step:     one training step of the `base` preset (fwd + bwd + AdamW): tokens/s and peak memory
          for --kernels triton, with and without torch.compile, --kernels torch (eager) and
          torch.compile of the torch path.
generate: per-token latency of recurrent decoding after a prompt of 128 ... 32k tokens.
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from spikelib.stages import load_stage  # noqa: E402

S5 = load_stage("5_spike_llm_triton")
S3 = S5.S3


def bench(fn, warmup=3, rep=20, queued=False):
    """Median milliseconds of fn() between CUDA events. A lone call (queued=False) waits for the
    GPU to go idle first, so the host's launch work before and between its kernels is counted;
    queued calls go back to back, as inside a training step, and measure the GPU's own time
    unless the host cannot keep up (then its gaps still show)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        events.append((a, b))
        if not queued:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return float(np.median([a.elapsed_time(b) for a, b in events]))


def graph_ms(fn):
    """Milliseconds of fn() replayed from a CUDA graph: the GPU's own time, with the host's launch
    work (Python, autograd, the kernel launchers) taken out. None where fn cannot be captured."""
    try:
        return triton.testing.do_bench_cudagraph(fn)
    except Exception as err:                               # e.g. a library that syncs with the host
        print(f"CUDA graph capture failed: {str(err)[:120]}")
        return None


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), rep=10)
    return 2 * x.numel() / (ms * 1e-3)


def neuron_table(bw):
    cfg = S3.ModelConfig(**dict(S3.PRESETS["tiny"]["model"], neuron="lif", surrogate="arctan"))
    rows, C, N = [], 2048, 4096 * 2048                     # 8.4M neurons per timestep
    for T in (4, 16):
        x = (torch.randn(T, N // C, C, device="cuda") + 0.5).requires_grad_(True)
        gs32 = torch.randn(x.shape, device="cuda")
        gs16 = gs32.to(torch.bfloat16)
        beta, theta = torch.full((C,), cfg.beta, device="cuda"), torch.full((C,), cfg.theta, device="cuda")
        ones = torch.ones(2, C, device="cuda")             # the output scales (lits only)

        def triton_fp32():
            x.grad = None                                  # no gradient accumulation pass
            S5.TritonNeuron.apply(x, beta, theta, ones, cfg, torch.float32).backward(gs32)

        def triton_bf16():
            x.grad = None                                  # no gradient accumulation pass
            S5.TritonNeuron.apply(x, beta, theta, ones, cfg, torch.bfloat16).backward(gs16)

        def eager():
            x.grad = None                                  # no gradient accumulation pass
            S5.neuron_torch(x, cfg.beta, cfg.theta, cfg).backward(gs32)

        compiled = torch.compile(lambda x: S5.neuron_torch(x, cfg.beta, cfg.theta, cfg))

        def comp():
            x.grad = None                                  # no gradient accumulation pass
            compiled(x).backward(gs32)

        floor32 = 5 * 4 * T * N / bw * 1e3                 # read x, write s; read x, gs, write gx (fp32)
        floor16 = (4 + 2 + 4 + 2 + 4) * T * N / bw * 1e3   # same with bf16 spikes and spike grads
        res = {"triton fp32 s/gs": triton_fp32, "triton bf16 s/gs": triton_bf16, "eager loop": eager,
               "torch.compile": comp, **library_neurons(x, gs32, cfg)}
        for name, fn in res.items():
            try:
                rep = 10 if name == "eager loop" else 20
                ms, lone = bench(fn, 3, rep, queued=True), bench(fn, 3, rep)
            except Exception as err:                       # report, keep going
                print(f"{name} T={T} failed: {err}")
                ms = lone = float("nan")
            graph = graph_ms(fn)
            x.grad = None
            floor = floor16 if "bf16" in name else floor32
            g = f"{graph:.3f} | {graph / floor:.2f}" if graph else "n/a | n/a"
            rows.append(f"| {T} | {name} | {ms:.3f} | {ms / floor:.2f} | {lone:.3f} | {lone / floor:.2f} "
                        f"| {g} | {floor:.3f} |")
    head = ["| T | implementation | fwd+bwd ms, queued | x floor | lone call ms | x floor "
            "| CUDA graph ms | x floor | floor ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    missing = [p for p in ("snntorch", "spikingjelly") if importlib.util.find_spec(p) is None]
    note = f"\n(not installed on this machine, so not measured: {', '.join(missing)})" if missing else ""
    return "\n".join(head + rows) + note


def library_neurons(x, gs, cfg):
    """The same LIF (leak 0.5, soft reset, arctan surrogate, fp32) in snnTorch and SpikingJelly's
    multi-step node, where installed: {name: fwd+bwd function}."""
    out = {}
    if importlib.util.find_spec("snntorch"):
        import snntorch
        lif = snntorch.Leaky(beta=cfg.beta, threshold=cfg.theta, reset_mechanism="subtract",
                             spike_grad=snntorch.surrogate.atan(alpha=cfg.alpha)).to(x.device)

        def snn_torch():
            x.grad = None                                  # no gradient accumulation pass
            mem, spikes = lif.init_leaky(), []
            for t in range(x.shape[0]):
                s, mem = lif(x[t], mem)
                spikes.append(s)
            torch.stack(spikes).backward(gs)
        out[f"snnTorch {snntorch.__version__}"] = snn_torch
    if importlib.util.find_spec("spikingjelly"):
        import spikingjelly
        from spikingjelly.activation_based import functional, neuron, surrogate
        node = neuron.LIFNode(tau=1 / (1 - cfg.beta), decay_input=False, v_threshold=cfg.theta, v_reset=None,
                              surrogate_function=surrogate.ATan(alpha=cfg.alpha), step_mode="m")

        def spiking_jelly():
            x.grad = None                                  # no gradient accumulation pass
            functional.reset_net(node)
            node(x).backward(gs)
        out[f"SpikingJelly {getattr(spikingjelly, '__version__', '')} (multi-step)"] = spiking_jelly
    return out


STEP_PATHS = (("triton", "triton", False), ("triton + torch.compile", "triton", True),
              ("torch eager", "torch", False), ("torch.compile", "torch", True))
PARTS = ("neuron", "step", "generate", "profile")


def step_table(args):
    mcfg, tcfg = S3.make_configs("base", vocab_size=2000)
    B, L = args.batch or tcfg.batch_size, mcfg.context
    rows = []
    for name, kernels, comp in (p for p in STEP_PATHS if p[0] in args.paths.split(",")):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        run = S5.RunConfig(kernels=kernels, device="cuda", dtype="bfloat16", compile=comp)
        try:
            model = S5.build_model(mcfg, run, seed=0)
            opt = S5.make_optimizer(model, tcfg)
            fwd = torch.compile(model) if comp else model
            data = np.random.default_rng(0).integers(0, 2000, 10 * B * L).astype(np.uint16)
            tc = S3.TrainConfig(**dict(vars(tcfg), batch_size=B))
            t0 = time.time()
            for step in range(2):
                S5.train_step(model, opt, mcfg, tc, data, step, "cuda", fwd)
            warm = time.time() - t0
            torch.cuda.synchronize()
            t0, n = time.time(), args.steps
            for step in range(2, 2 + n):
                S5.train_step(model, opt, mcfg, tc, data, step, "cuda", fwd)
            torch.cuda.synchronize()
            dt = (time.time() - t0) / n
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append(f"| {name} | {B} | {dt * 1e3:.0f} | {B * L / dt:,.0f} | {peak:.1f} | {warm:.0f} |")
        except torch.cuda.OutOfMemoryError:
            rows.append(f"| {name} | {B} | out of memory | | | |")
        except Exception as err:                           # e.g. a compile failure: report it, go on
            first_line = str(err).splitlines()[0][:80]
            rows.append(f"| {name} | {B} | failed: {type(err).__name__}: {first_line} | | | |")
        finally:
            model = opt = fwd = None
        print(rows[-1], flush=True)
    head = [f"base preset: {mcfg.n_layer} layers, d {mcfg.d_model}, ffn {mcfg.d_ff}, T {mcfg.T}, "
            f"context {L}, bf16 matmuls, AdamW fp32", "",
            "| path | batch | ms/step | tokens/s | peak GiB | first 2 steps s |", "|---|---|---|---|---|---|"]
    return "\n".join(head + rows)


def profile_table(args):
    """Where one triton training step of `base` spends GPU time: the top kernels."""
    mcfg, tcfg = S3.make_configs("base", vocab_size=2000)
    tc = S3.TrainConfig(**dict(vars(tcfg), batch_size=args.batch or tcfg.batch_size))
    model = S5.build_model(mcfg, S5.RunConfig(kernels="triton", device="cuda", dtype="bfloat16"), seed=0)
    opt = S5.make_optimizer(model, tc)
    data = np.random.default_rng(0).integers(0, 2000, 10 * tc.batch_size * mcfg.context).astype(np.uint16)
    for step in range(2):
        S5.train_step(model, opt, mcfg, tc, data, step, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        S5.train_step(model, opt, mcfg, tc, data, 2, "cuda")
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    return "```\n" + table + "\n```"


@torch.no_grad()
def generate_table():
    mcfg, _ = S3.make_configs("base", vocab_size=2000)
    rows = []
    for kernels in ("triton", "torch"):
        run = S5.RunConfig(kernels=kernels, device="cuda", dtype="bfloat16")
        model = S5.build_model(mcfg, run, seed=0).eval()
        for ctx in (128, 1024, 8192, 32768):
            state = model.init_state(1)
            prompt = torch.randint(0, 2000, (1, ctx), device="cuda")
            for i in range(0, ctx, 4096):                  # prefill in pieces (chunked form + state)
                logits = model(prompt[:, i:i + 4096], state)
            tok = logits[:, -1:].argmax(-1)

            def step():
                nonlocal tok
                tok = model(tok, state)[:, -1:].argmax(-1)
                tok.item()                                 # a real decoder needs the token on the host

            ms = bench(step, warmup=3, rep=30)
            rows.append(f"| {kernels} | {ctx:,} | {ms:.2f} |")
            print(rows[-1], flush=True)
    return "\n".join(["| kernels | context | ms/token |", "|---|---|---|"] + rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="neuron,step,generate",
                    help=f"comma-separated tables to measure, of {', '.join(PARTS)}")
    ap.add_argument("--batch", type=int, default=0, help="training-step batch (0: the preset's 32)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per path of the step table "
                    "(after two untimed ones that compile)")
    names = [p[0] for p in STEP_PATHS]
    ap.add_argument("--paths", default=",".join(names),
                    help="comma-separated paths of the step table, of: " + ", ".join(names))
    ap.add_argument("--out", default="", help="a Markdown file the tables are appended to (none: stdout)")
    args = ap.parse_args()
    unknown = [x for x in args.only.split(",") if x not in PARTS]
    unknown += [x for x in args.paths.split(",") if x not in names]
    if unknown or args.steps < 1 or args.batch < 0:
        ap.error(f"unknown table or path {unknown}" if unknown else "--steps must be >= 1 and --batch >= 0")
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    bw = copy_bandwidth()
    out = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {S5.triton.__version__}; "
           f"measured device-to-device copy {bw / 1e12:.2f} TB/s (read + write)"]
    print(out[0], flush=True)
    tables = {"neuron": lambda: neuron_table(bw), "step": lambda: step_table(args),
              "generate": generate_table, "profile": lambda: profile_table(args)}
    for part in args.only.split(","):
        table = tables[part]()
        out += ["", f"### {part}", "", table]
        print("\n".join(out[-3:]), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
