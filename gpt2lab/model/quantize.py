"""int8 weights for fast local inference: `quantize(model)` swaps every linear layer of a loaded model, and
the LM head, for int8 ones behind the same forward.

At batch 1 a decoding step reads every weight once, so the bytes per weight decide its time: fp32
streams 4 bytes a weight, int8 one. On the CPU, `Int8Linear` keeps each weight matrix as int8 with one
scale per output row (symmetric) and multiplies it with int8 activations quantized on the fly (a scale
per call), with PyTorch's own quantized CPU kernels (`torch.ops.quantized.linear_dynamic`: fbgemm on
x86, which uses AVX512-VNNI where there is one; qnnpack on ARM). On CUDA the weights go through
torchao's int8 weight-only quantization (the optional extra `pip install torchao`), which keeps the
activations in floating point.

What changes: the logits, a little (int8 rounding; bench/quantize.py measures held-out bits per byte
and the share of next and greedy tokens equal to fp32's). What does not: the model's code. The
embedding stays in floating point; the LM head, which GPT-2 ties to it, gets an int8 copy of its own.
A quantized model is for inference only: it cannot train, and its weights are not saved.
"""

from __future__ import annotations

import platform
import warnings

import torch
import torch.nn as nn

from gpt2lab.errors import UserError

KINDS = ("int8",)


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (a scale per output row) and x quantized to int8 per call."""

    def __init__(self, linear: nn.Linear, reduce_range: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().cpu()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        with warnings.catch_warnings():  # the quantized tensor API warns of a future without it; not yet
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                                 torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # fbgemm's 7-bit activations avoid an overflow of 16-bit sums on CPUs without VNNI
        self.reduce_range = reduce_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed, self.reduce_range)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _engine() -> tuple[str, bool]:
    """The quantized CPU engine of this machine, and whether its activations need a reduced range."""
    engines = torch.backends.quantized.supported_engines
    if not hasattr(torch.ops.quantized, "linear_dynamic"):
        raise UserError("this PyTorch has no quantized CPU kernels; run without --quantize (or use a PyTorch "
                        "release that has torch.ops.quantized)")
    if platform.machine().lower() in ("arm64", "aarch64") and "qnnpack" in engines:
        return "qnnpack", False
    if "fbgemm" in engines or "x86" in engines:
        return ("x86" if "x86" in engines else "fbgemm"), not _has_vnni()
    raise UserError(f"this PyTorch has no quantized CPU kernels (engines: {engines}); run without --quantize")


def _has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def _untie_head(model: nn.Module) -> None:
    """The LM head as a matrix of its own (an int8 copy replaces it; the embedding stays as it is)."""
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is model.transformer.wte.weight:
        own = nn.Linear(head.in_features, head.out_features, bias=False, device=head.weight.device,
                        dtype=head.weight.dtype)
        with torch.no_grad():
            own.weight.copy_(head.weight)
        model.lm_head = own


def quantize(model: nn.Module, kind: str = "int8") -> nn.Module:
    """Swap every nn.Linear of `model` (blocks and LM head) for an int8 one, in place; returns the model, in
    eval mode. CPU: PyTorch's quantized kernels; CUDA: torchao."""
    if kind not in KINDS:
        raise UserError(f"unknown quantization {kind!r}; choose one of: {', '.join(KINDS)}")
    device = next(model.parameters()).device
    model.eval()
    _untie_head(model)
    if device.type == "cuda":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            raise UserError("--quantize int8 on a GPU needs torchao: pip install torchao") from None
        quantize_(model, Int8WeightOnlyConfig())
        return model
    if device.type != "cpu":
        raise UserError(f"--quantize int8 runs on the CPU or a CUDA GPU, not on {device.type}")
    engine, reduce_range = _engine()
    torch.backends.quantized.engine = engine
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child, reduce_range))
    model.quantized = kind
    return model
