"""Where a model runs and in what precision: the device names of every command's --device and --dtype.

    resolve_device("auto")    cuda if there is a GPU, else mps on Apple silicon, else cpu
    resolve_dtype("auto", d)  bf16 on a CUDA GPU that has it (else fp16) and on a CPU with native bf16, fp32
                              elsewhere
    autocast(device, dtype)   mixed precision for a block of code (nothing for fp32)
"""

from __future__ import annotations

import contextlib

import torch

from gpt2lab.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not mps_available():
        raise UserError(f"device {name!r} asked for, but Apple's Metal (MPS) is not available here (it needs a "
                        "Mac with Apple silicon and a PyTorch built for it); use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r}: gpt2lab runs on cpu, cuda, cuda:N or mps")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Intel AMX or AVX512-BF16): there bf16 autocast trains about
    1.6x faster than fp32 at the same loss per step (README's "The CPU recipe")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA GPU (it trains with a gradient scaler); "
                        "use --dtype fp32 or bf16 on this device")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context that runs matmuls in `dtype` (bf16 or fp16); a no-op for fp32 or None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# peak dense bf16 tensor-core FLOP/s, for MFU; matched against torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16; V100 has no bf16
}


def peak_flops(device) -> float | None:
    """The GPU's peak bf16 FLOP/s from the table, or None (CPU, unknown GPU)."""
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # longer, more specific keys come first
        if key in name:
            return flops
    return None
