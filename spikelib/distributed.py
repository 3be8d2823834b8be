"""Training on several processes under torchrun, for stage 5: the process-group plumbing.

    torchrun --nproc_per_node 2 5_spike_llm_triton.py --preset base ...

torchrun starts one process per GPU and tells each its place through environment variables:
RANK (0 .. WORLD_SIZE-1 over all hosts), LOCAL_RANK (its GPU on this host), WORLD_SIZE, and
MASTER_ADDR/MASTER_PORT where rank 0 waits for the others. `join_group` reads them and opens
the process group (NCCL between GPUs, gloo between CPU processes); without them (a plain
`python` run) it returns SOLO, one process, and the stage runs exactly as it does alone.
The training step itself (which rows a rank takes, when DDP all-reduces) stays in the stage.
"""
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from spikelib.cli import fail


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes (SOLO: the only one)."""
    rank: int = 0           # 0 .. world - 1; rank 0 alone prints, evaluates and saves
    world: int = 1          # number of processes
    device: str = "cpu"     # where its collectives' tensors live (NCCL wants them on its GPU)

    @property
    def main(self):
        return self.rank == 0

    def mean(self, x):
        """The mean over all ranks of a one-element tensor, as a float on every rank (one process:
        its value). gloo has no AVG reduction: SUM, then divide."""
        if self.world > 1:
            x = x.detach().clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x = x / self.world
        return float(x)

    def any(self, flags):
        """(bool, ...): for each flag, whether any rank raised it, in one all-reduce. The ranks
        then act alike: a rank that stopped alone would leave the others waiting forever."""
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (preparing a dataset, say); the others run it after, when
        what rank 0 wrote is there to be read rather than written again by every process."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def wrap(self, model):
        """The model in DistributedDataParallel: it starts every rank from rank 0's parameters
        and, during backward, all-reduces (averages) gradients in buckets as soon as each bucket
        is ready, overlapping communication with the rest of the backward pass."""
        ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    def fail(self, err):
        """One `error:` line for an expected error. A bad option fails alike on every rank, so only
        rank 0 reports it; a file error may be one rank's own, so every rank reports its own."""
        if self.main or isinstance(err, OSError):
            return fail(err if self.main else f"rank {self.rank}: {err}")
        return 1

    def leave(self):
        """Close the process group once every rank is here, so no rank tears its connections down
        while another still uses them."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


SOLO = Group()


def join_group(run):
    """(Group, run) for this process. Under torchrun (WORLD_SIZE > 1): open the process group,
    NCCL for run.device cuda (each process on GPU LOCAL_RANK, the current device, where Triton
    launches its kernels) or gloo on the CPU, and silence stdout on ranks other than 0. Else
    (SOLO, run) unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SOLO, run
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = run.device
    if run.device == "cuda":
        # run.device stays "cuda" (a valid option): torch.device("cuda") is the current device,
        # which set_device makes this rank's GPU; the group's own tensors name it explicitly.
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")      # model line, evaluations, tqdm.write: rank 0's alone
    return Group(rank, world, device), run


def check_batch(batch_size, world, grad_accum):
    """The global batch must split into world * grad_accum equal micro-batches."""
    if batch_size % (world * grad_accum):
        raise ValueError(f"--batch_size {batch_size} does not split over {world} processes x "
                         f"--grad_accum {grad_accum}: it must be a multiple of {world * grad_accum}")
