"""Stage 5 on several processes: DistributedDataParallel over gloo on the CPU against stage 5 in one
process (torch kernels, tiny preset, builtin corpus, dropout 0).

Every rank draws the same global batch from (seed, step) and takes its own rows, so W processes
with global batch B, or one process with B in K micro-batches (--grad_accum K), compute the step
of one process with batch B; only the order of float sums differs. Tolerance: per-step losses and
gradient norms within 1e-5 relative, parameters within rtol 1e-5 (6 steps; a larger gap would
mean other rows, another loss scale or a missing all-reduce, which move them by 1e-2 or more).
With dropout > 0 the masks are drawn per (seed, step, micro-batch), so they differ between
splits and only the same split repeats exactly: these tests use dropout 0.
Two-process runs are spawned with torch.multiprocessing and the environment torchrun would set;
the error test runs torchrun itself.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as mp  # noqa: E402

from spikelib.stages import load_stage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
S5 = load_stage("5_spike_llm_triton")
S3 = S5.S3
STEPS = 6


def argv(root, out, *extra):
    return ["--preset", "tiny", "--kernels", "torch", "--device", "cpu", "--dropout", "0",
            "--data_root", str(root / "data"), "--out_dir", str(root / out), "--batch_size", "4",
            "--max_steps", str(STEPS), "--eval_interval", "4", "--eval_tokens", "256",
            "--max_new_tokens", "4", *map(str, extra)]


def recorded_main(args, interrupt_at=None):
    """Stage 5's main, noting (step, loss, grad_norm) of every step; with interrupt_at, a real
    SIGINT arrives in the middle of that step. (exit code, records)."""
    real, records = S5.train_step, []

    def recording(*a, **k):
        if a[5] == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)          # the handler runs now, inside the step
        loss, stats = real(*a, **k)
        records.append((a[5], loss, stats["grad_norm"]))
        return loss, stats

    S5.train_step = recording
    try:
        return S5.main(args), records
    finally:
        S5.train_step = real


def worker(rank, world, port, args, log, interrupt_rank, interrupt_at):
    """One of `world` processes, placed as torchrun places them; writes its code and records."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    code, records = recorded_main(args, interrupt_at if rank == interrupt_rank else None)
    Path(f"{log}.{rank}").write_text(json.dumps({"code": code, "records": records}))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, log, world=2, interrupt_rank=None, interrupt_at=None, timeout=150):
    """Run `world` processes of stage 5; [{code, records}] by rank. A hang (ranks that disagree
    and wait for each other) fails the test instead of blocking it."""
    ctx = mp.start_processes(worker, args=(world, free_port(), args, str(log), interrupt_rank, interrupt_at),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes still running after {timeout} s")
    return [json.loads(Path(f"{log}.{r}").read_text()) for r in range(world)]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def assert_same_steps(records, reference):
    """Same steps, losses and gradient norms within 1e-5 relative."""
    assert [r[0] for r in records] == [r[0] for r in reference]
    assert rel([r[1] for r in records], [r[1] for r in reference]) < 1e-5
    assert rel([r[2] for r in records], [r[2] for r in reference]) < 1e-5


def assert_params_close(path, reference):
    a, b = S3.load_model(path)[0], S3.load_model(reference)[0]
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (batch 4) and the same run on two processes, started here once."""
    root = tmp_path_factory.mktemp("ddp")
    S3.prepare_dataset("builtin", root / "data")
    code, single = recorded_main(argv(root, "single"))
    assert code == 0 and len(single) == STEPS
    two = spawn(argv(root, "two"), root / "two.log")
    return root, single, two


def test_two_processes_follow_one_process_with_the_same_global_batch(runs):
    root, single, two = runs
    assert [r["code"] for r in two] == [0, 0]
    assert_same_steps(two[0]["records"], single)
    assert two[1]["records"] == two[0]["records"]        # every rank sees the all-reduced loss
    assert_params_close(root / "two/ckpt.npz", root / "single/ckpt.npz")
    assert S3.load_model(root / "two/ckpt.npz")[3] == STEPS


def test_grad_accum_2_equals_the_whole_batch_at_once(runs):
    """--grad_accum 2 with batch 4 (two micro-batches of 2) == --grad_accum 1 with batch 4."""
    root, single, _ = runs
    code, accum = recorded_main(argv(root, "accum", "--grad_accum", 2))
    assert code == 0
    assert_same_steps(accum, single)
    assert_params_close(root / "accum/ckpt.npz", root / "single/ckpt.npz")


def test_interrupted_two_process_run_resumes_exactly(runs):
    """A SIGINT reaching rank 1 alone, inside step 2: both ranks finish step 2 and stop together,
    rank 0 saves step 3 (exit 130); --resume 1 on two processes then ends with exactly the
    parameters and losses of the uninterrupted two-process run."""
    root, _, two = runs
    cut = spawn(argv(root, "cut"), root / "cut.log", interrupt_rank=1, interrupt_at=2)
    assert [r["code"] for r in cut] == [130, 130]
    assert S3.load_model(root / "cut/ckpt.npz")[3] == 3
    resumed = spawn(argv(root, "cut", "--resume", 1), root / "resumed.log")
    assert [r["code"] for r in resumed] == [0, 0]
    assert resumed[0]["records"] == two[0]["records"][3:]
    a, b = S3.load_model(root / "cut/ckpt.npz"), S3.load_model(root / "two/ckpt.npz")
    assert a[3] == b[3] == STEPS
    for name in b[0]:
        np.testing.assert_array_equal(a[0][name], b[0][name], err_msg=name)
        np.testing.assert_array_equal(a[4]["v"][name], b[4]["v"][name], err_msg=name)


def test_two_process_checkpoint_continues_in_stages_3_and_4(runs):
    """The one checkpoint format: stage 3 resumes the two-process run for a step; stage 4 loads it."""
    root, _, _ = runs
    args = argv(root, "two", "--resume", 1, "--max_steps", STEPS + 1)
    del args[2:6]                                          # stage 3 has no --kernels, --device
    assert S3.main(args) == 0
    params, _, _, step, _, _ = S3.load_model(root / "two/ckpt.npz")
    assert step == STEPS + 1
    pytest.importorskip("mlx.core")
    from spikelib import mlx_io
    S4 = load_stage("4_spike_llm_mlx")
    model, _, step4, _, _ = S4.load(root / "two/ckpt.npz")
    assert step4 == step
    for name, value in mlx_io.numpy_params(model).items():
        np.testing.assert_array_equal(value, params[name], err_msg=name)


def test_batch_not_split_by_the_world_size_is_one_error_line(runs, tmp_path):
    """torchrun, two processes, global batch 3: one `error:` line naming the numbers, exit != 0."""
    root, _, _ = runs
    args = argv(root, "odd", "--batch_size", 3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(ROOT / "5_spike_llm_triton.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error:")]
    assert out.returncode != 0
    assert errors == ["error: --batch_size 3 does not split over 2 processes x --grad_accum 1: "
                      "it must be a multiple of 2"]
    assert not (root / "odd").exists()


def test_join_group_on_gpus_puts_each_rank_on_its_gpu_and_keeps_a_valid_run(monkeypatch):
    """The CUDA branch of join_group, without GPUs: set_device and the NCCL group recorded instead
    of done. The run must stay a valid RunConfig ("cuda", the current device) and the group must
    name this rank's GPU, which its own tensors and DDP's device_ids use."""
    from spikelib import distributed
    calls = {}
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda i: calls.setdefault("gpu", i))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.setdefault("backend", backend))
    monkeypatch.setattr(distributed.sys, "stdout", sys.stdout)       # rank 1 silences stdout
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    group, run = distributed.join_group(S5.RunConfig(device="cuda", kernels="torch"))
    assert calls == {"gpu": 1, "backend": "nccl"}
    assert run == S5.RunConfig(device="cuda", kernels="torch")
    assert (group.rank, group.world, group.device) == (1, 2, "cuda:1")
