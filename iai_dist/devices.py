"""Which device and which precision: `train.device` and `train.autocast` resolved for the machine at hand."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split())


@functools.lru_cache(maxsize=None)
def bf16_native(device: torch.device) -> bool:
    """A CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16: elsewhere bf16 is emulated, and was 18x slower
    than fp32 for a linreg-paper learner step on an AMD EPYC without them."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})
    return False


def uses_bf16(setting: str, device: torch.device) -> bool:
    """train.autocast resolved: 'auto' takes bf16 only where the device runs it natively."""
    return setting == "bf16" or (setting == "auto" and bf16_native(device))


def precision_line(setting: str, device: torch.device) -> str:
    """Which precision the refiner runs in, and why: printed once at the start of training."""
    if setting != "auto":
        why = f"train.autocast={setting}"
    elif device.type == "cuda":
        why = f"auto: {torch.cuda.get_device_name(device)} {'runs' if bf16_native(device) else 'lacks'} bf16"
    elif device.type == "cpu":
        found = sorted(_cpu_flags() & {"amx_bf16", "avx512_bf16"})
        why = f"auto: this CPU {'has ' + ' and '.join(found) if found else 'has no amx_bf16 or avx512_bf16'}"
    else:
        why = f"auto: no native bf16 known for {device.type}"
    mode = "bf16 autocast" if uses_bf16(setting, device) else "fp32"
    return f"[precision] refiner in {mode} on {device} ({why})"
