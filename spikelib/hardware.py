"""What machine a benchmark ran on, for the header line every benchmark prints."""
import os
import platform
import sys
from pathlib import Path


def cpu_model():
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus():
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def gpu_model():
    """The first CUDA GPU's name, or "" where torch or a GPU is missing (for GPU benchmarks' headers)."""
    try:
        import torch
    except ImportError:
        return ""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def blas_hint():
    """For MLX on a CPU (stage 4). On Linux the mlx[cpu] wheel links the reference BLAS, about 10x
    slower at matmul than OpenBLAS; preloading OpenBLAS swaps in a fast cblas_sgemm (same numbers).
    Returns that tip when it applies, else ""."""
    if sys.platform != "linux":
        return ""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ""
    if "/libopenblas" in maps or "mlx_cpu.libs/libblas" not in maps:
        return ""
    return ("note: MLX here multiplies matrices with the reference BLAS of the mlx[cpu] wheel; for "
            "~10x faster steps install OpenBLAS (apt install libopenblas0) and run with "
            "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
