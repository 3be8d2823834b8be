"""Stage 5 as the tests load it: on a machine without a CUDA GPU its @triton.jit kernels are defined
under Triton's interpreter (TRITON_INTERPRET is read when they are defined), so the kernel tests run
on the CPU too; with a GPU they compile as usual."""
import os
import sys

import torch

from spikelib.stages import load_stage


def load_stage5():
    """The stage 5 module, its kernels interpreted when there is no GPU (and Triton is not loaded yet)."""
    if torch.cuda.is_available() or "triton" in sys.modules:
        return load_stage("5_spike_llm_triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return load_stage("5_spike_llm_triton")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
