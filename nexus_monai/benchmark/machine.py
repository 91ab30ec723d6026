"""The machine: CPU and thread description, process memory (RSS), and GEMM rates measured in the run.

:func:`measure_peak_gemm` is the physical reference of the benchmark: FLOP/s of a large square
matmul (``n x n x n``, ``2 n^3`` FLOPs, best of ``repeats``), fp32 at the thread count in use on
CPU; on CUDA fp32 and bf16 (the autocast dtype), every timer read after a synchronize.
:func:`measure_gemm` is the older decoder-shaped rate (``torch.addmm`` at the decoder layers' shapes).
:func:`measure_memory_bandwidth` is the reference of the memory-bound parts (gathers, lookups): bytes
read + written per second by a large tensor copy.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from typing import Callable

import torch
from torch import nn

from nexus_monai.benchmark.inputs import decoder_linears

__all__ = ["machine_info", "rss_gib", "ru_maxrss_gib", "reset_peak_rss", "peak_rss_since_reset_gib", "best_seconds",
           "synchronizer", "measure_gemm", "measure_peak_gemm", "measure_memory_bandwidth", "cuda_info", "GIB"]

GIB = 1024.0**3


def machine_info() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def cuda_info(device: torch.device | str) -> dict:
    """Name, memory and CUDA / cuDNN versions of a CUDA device (empty for a CPU device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {"cuda_device_name": props.name, "cuda_total_memory_gib": props.total_memory / GIB,
            "cuda_version": torch.version.cuda, "cudnn_version": torch.backends.cudnn.version(),
            "cuda_capability": f"{props.major}.{props.minor}",
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_gib() -> float:
    kib = _proc_status_kib("VmRSS")
    if kib is None:  # not Linux: fall back to the peak, the best number available
        return ru_maxrss_gib()
    return kib * 1024.0 / GIB


def ru_maxrss_gib() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / GIB if sys.platform == "darwin" else ru * 1024.0 / GIB  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_gib() -> float:
    """``VmHWM`` (the high-water mark since :func:`reset_peak_rss`), else the process peak."""
    hwm = _proc_status_kib("VmHWM")
    return hwm * 1024.0 / GIB if hwm is not None else ru_maxrss_gib()


def synchronizer(device: torch.device | str) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device (call before every timer read), else ``None``."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """Best time of ``fn`` over ``repeats`` (each repeat >= ~20 ms of calls), after one warm-up call.
    ``sync`` (e.g. :func:`synchronizer`) runs before every timer read (asynchronous devices)."""
    sync = sync or (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t0
    inner = max(1, int(0.02 / max(once, 1e-9)))
    best = math.inf
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure_peak_gemm(n: int = 2048, repeats: int = 5, seed: int = 0, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict:
    """Peak GEMM FLOP/s: ``(n, n) @ (n, n)`` in ``dtype`` on ``device`` (CPU: at the current thread
    count), best of ``repeats``; CUDA timed with a synchronize before every timer read."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds = best_seconds(lambda: torch.mm(a, b, out=out), repeats, synchronizer(device))
    del a, b, out
    return {"peak_gemm_n": int(n), "peak_gemm_s": seconds, "peak_gemm_flops_per_s": 2.0 * n**3 / seconds,
            "peak_gemm_threads": torch.get_num_threads(), "peak_gemm_dtype": str(dtype).replace("torch.", "")}


def measure_gemm(network: nn.Module, rows: int, repeats: int = 5, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict:
    """GEMM FLOP/s with ``torch.addmm`` at the decoders' layer shapes ``(rows, in) x (in, out)``
    (in ``dtype`` on ``device``).

    ``gemm_flops_per_s``: all the decoders' layers in sequence (sum of FLOPs / sum of best times);
    ``gemm_hidden_flops_per_s``: the ``(rows, hidden) x (hidden, hidden)`` product alone.
    """
    rows = max(1, int(rows))
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    best: dict[tuple[int, int], float] = {}
    for layer in decoder_linears(network):
        shape = (layer.in_features, layer.out_features)
        if shape in best:
            continue
        x = torch.randn(rows, shape[0], generator=gen).to(device=device, dtype=dtype)
        w = torch.randn(shape[1], shape[0], generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(shape[1], generator=gen).to(device=device, dtype=dtype)
        with torch.no_grad():
            best[shape] = best_seconds(lambda: torch.addmm(b, x, w.t()), repeats, synchronizer(device))
    layers = [(m.in_features, m.out_features) for m in decoder_linears(network)]
    flops = sum(2 * rows * i * o for i, o in layers)
    seconds = sum(best[s] for s in layers)
    square = max(best, key=lambda s: s[0] * s[1])
    return {
        "gemm_rows": rows,
        "gemm_shapes": [f"({rows},{i})x({i},{o})" for i, o in best],
        "gemm_flops_per_s": flops / seconds,
        "gemm_hidden_shape": f"({rows},{square[0]})x({square[0]},{square[1]})",
        "gemm_hidden_flops_per_s": 2 * rows * square[0] * square[1] / best[square],
        "gemm_dtype": str(dtype).replace("torch.", ""),
    }


def measure_memory_bandwidth(nbytes: int = 256 * 1024**2, repeats: int = 5, device: torch.device | str = "cpu") -> dict:
    """Memory bandwidth: a copy of ``nbytes`` (float32, far beyond the caches) into another buffer on ``device``
    (CPU: at the current thread count), best of ``repeats``; bytes moved = read + written = ``2 x nbytes``."""
    device = torch.device(device)
    n = max(1, int(nbytes) // 4)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    with torch.inference_mode():
        seconds = best_seconds(lambda: dst.copy_(src), repeats, synchronizer(device))
    return {"memory_bandwidth_bytes": int(2 * 4 * n), "memory_bandwidth_s": seconds,
            "memory_bandwidth_bytes_per_s": 2.0 * 4 * n / seconds}
