"""Numeric precision of training: ``fp32``, or ``bf16`` autocast where the hardware has it.

bf16 autocast runs convolutions and matrix products in bfloat16 (float32 accumulation inside
the kernels) and keeps weights, optimizer state, BatchNorm statistics and the losses in
float32 (every loss casts its logits first, :mod:`tune_cifar.losses`). It pays where the
hardware computes bf16 natively: every recent CUDA GPU, and CPUs with AVX512-BF16 or AMX
(x86) or the BF16 extension (Arm); elsewhere bf16 is emulated and slower, so ``auto`` never
tries it there. Whether it pays on a CPU that has it is a measurement, not a flag (two CPUs with
the same AVX512-BF16 flag gave opposite answers): ``auto`` is decided by :mod:`tune_cifar.calibration`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from tune_cifar.config import PRECISIONS
from tune_cifar.errors import UsageError

# /proc/cpuinfo feature flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16, Arm's BF16
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU's feature flags include native bf16 arithmetic (False where they cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS)


def resolve(precision: str, device: torch.device) -> str:
    """An explicit ``fp32`` or ``bf16``, checked against the device (``auto`` is measured instead:
    :func:`tune_cifar.calibration.choose`)."""
    if precision not in PRECISIONS or precision == "auto":
        raise UsageError(f"unknown precision {precision!r} here (choose from fp32, bf16)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp32")
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a resolved precision (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
