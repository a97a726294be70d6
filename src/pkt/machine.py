"""What kind of machine computed a result, and which dtype runs fastest on it.

The same weights give slightly different numbers on CPUs with different kernels: a bfloat16 matrix product runs
on AMX tiles on one Xeon and on AVX-512 on another, with other rounding, so a row that passes through bfloat16
can move in its last digits between machines (docs/benchmarks.md P11). Every stage record therefore says which
kernel class produced it (:func:`kernel_class`), and a study resumed on another class says so instead of mixing
records silently.

``auto`` as a dtype (a demo's setting; a study pins its dtype) is resolved once per process by timing a bfloat16
and a float32 matrix product side by side (:func:`fastest_dtype`): bfloat16 where it is clearly faster (AMX, a
GPU, and some AVX-512 CPUs without AMX), float32 elsewhere. Machines of one kind differ here: without AMX a 2-core
Xeon VM ran bfloat16 products at ~0.5x float32 (P6), a 2-core AMD EPYC VM at ~2x (P4); the record's ``cpu``
names which.
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch

# bfloat16 is chosen only when its product is at least this much faster than float32's: near parity, float32's
# precision wins
BF16_MARGIN = 1.2


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def kernel_class() -> dict:
    """The facts that decide which kernels torch runs here: architecture, the CPU's model name, torch's CPU
    capability, AMX and AVX-512 bf16 support, the GPU if one is used."""
    flags = _cpu_flags()
    return {"arch": platform.machine(), "cpu": _cpu_model(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def describe(k: dict) -> str:
    """One line: ``x86_64 AVX512, AMX bf16`` / ``x86_64 AVX512, no AMX (AMD EPYC)``."""
    gpu = f", GPU {k['gpu']}" if k.get("gpu") else ""
    cpu = f" ({k['cpu']})" if k.get("cpu") else ""
    return f"{k.get('arch')} {k.get('cpu_capability')}, {'AMX bf16' if k.get('amx_bf16') else 'no AMX'}{cpu}{gpu}"


def same_class(a: dict, b: dict) -> bool:
    """Whether two kernel classes agree on every fact that both record (a record made before a fact was recorded
    is not taken for another machine for lacking it)."""
    keys = ("arch", "cpu", "cpu_capability", "amx_bf16", "gpu")
    return all(a[k] == b[k] for k in keys if k in a and k in b)


def _matmul_seconds(dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # first call: kernel selection, allocation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=1)
def fastest_dtype(n: int = 1024, repeats: int = 5) -> tuple[str, float]:
    """("bfloat16" | "float32", bf16 speed / fp32 speed) of an n x n matrix product on this machine's CPU;
    bfloat16 on a GPU. Interleaving is not needed: each measurement is the median of ``repeats``."""
    if torch.cuda.is_available():
        return "bfloat16", float("nan")
    ratio = _matmul_seconds(torch.float32, n, repeats) / _matmul_seconds(torch.bfloat16, n, repeats)
    return ("bfloat16" if ratio >= BF16_MARGIN else "float32"), round(ratio, 2)
