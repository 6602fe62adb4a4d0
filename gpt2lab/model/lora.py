"""LoRA: low-rank adapters for the linear layers of a frozen model (Hu et al., 2021).

A fine-tuned weight is written as the pretrained one plus a low-rank change:

    W' = W + (alpha / r) * B @ A        W: (out, in)   B: (out, r)   A: (r, in),  r << min(in, out)

Only A and B train, r * (in + out) numbers per wrapped layer instead of in * out.
A starts random and B at zero, so at initialisation B @ A = 0 and the wrapped
model computes exactly what the base model does. Once trained, the product can
be folded into W (`merge_lora`) and the model is an ordinary GPT again, with no
cost at inference.

`LoRALinear` holds the base layer's own `weight` and `bias` parameters, so the
state dict keeps the base model's names (`transformer.h.0.attn.c_attn.weight`)
and only adds `...c_attn.lora_A` / `...c_attn.lora_B`: the base weights load and
save with the ordinary run-dir functions, the adapters on their own.

A run dir trained with LoRA holds

    model.safetensors   the base weights, unchanged (plus a classifier head, for a classifier)
    lora.safetensors    the adapters alone (the lora_A / lora_B tensors)
    config.json         ... "lora": {"rank", "alpha", "dropout", "targets"}

`gpt2lab.checkpoint` writes and reads the adapter files (`save_lora`, `load_lora`) and `load_run`
rebuilds such a model (merged by default); `gpt2lab merge-lora` writes an ordinary run dir with the
adapters folded in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.errors import UserError

DEFAULT_TARGETS = ("all",)  # every linear layer of the blocks (GPT-2's: c_attn, c_proj, c_fc), not a MoE router


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W and b frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = r, float(alpha), float(alpha) / r
        # the very parameters of the base layer: same names in the state dict, no copy
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        # A as nn.Linear initialises its weight; B = 0 makes the adapter a no-op at first
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        # (.., in) -> (.., r) -> (.., out): never forms the (out, in) product
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return base + self.scale * update

    def delta_weight(self) -> torch.Tensor:
        """The change this adapter makes to W, (out, in), computed in float32."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    def merged(self) -> nn.Linear:
        """An ordinary nn.Linear computing what this layer computes (dropout off)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}")


# ------------------------------------------------------------------------ choosing layers


def _search_root(model: nn.Module) -> tuple[str, nn.Module]:
    """Adapters go into the transformer only: never the (tied) LM head or a classifier head."""
    if hasattr(model, "transformer"):
        return "transformer.", model.transformer
    return "", model


def _matches(name: str, target: str) -> bool:
    """`target` names the layer itself by a dotted suffix ("c_fc", "mlp.c_proj", "h.0.attn.c_attn")
    or a module that contains it ("attn", "mlp", "h.3"); "all" is every linear layer of the blocks but
    a mixture of experts' router."""
    if target == "all":
        return name.startswith("h.") and not name.endswith("router")
    dotted = "." + name + "."
    return ("." + target + ".") in dotted


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names (below `transformer.`) of the linear layers LoRA could wrap."""
    _, root = _search_root(model)
    return [n for n, m in root.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]


def _short_names(names: Iterable[str]) -> list[str]:
    """'h.0.attn.c_attn' -> 'attn.c_attn': the names a user would type, once each."""
    return sorted({".".join(n.split(".")[-2:]) for n in names})


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS, freeze: bool = True) -> nn.Module:
    """Replace the targeted nn.Linear layers by LoRALinear in place and freeze everything else.

    A target matches a layer whose name ends with it ("c_proj" is both attn.c_proj
    and mlp.c_proj; "mlp.c_proj" only the MLP's) or a module holding it ("attn",
    "mlp", "h.11"). Afterwards only the lora_A / lora_B parameters have
    requires_grad (`freeze=False` leaves requires_grad as it was); unfreeze a head yourself if it
    should train too.
    """
    targets = tuple(targets)
    if not targets:
        raise UserError("no LoRA targets given; name layers such as c_attn, c_proj, c_fc, mlp.c_proj")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters; merge them (`merge_lora`) before adding others")
    _, root = _search_root(model)
    chosen = {}
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear) and any(_matches(name, t) for t in targets):
            chosen[name] = module
    unmatched = [t for t in targets if not any(_matches(n, t) for n in chosen)]
    if unmatched:
        raise UserError(f"LoRA target(s) {unmatched} match no linear layer; the model has "
                        f"{', '.join(_short_names(linear_names(model)))} (or use attn, mlp, h.N)")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        was = [(p, p.requires_grad) for p in module.parameters()]
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
        if not freeze:  # LoRALinear freezes its base weight and bias: leave them as they were
            for p, requires_grad in was:
                p.requires_grad_(requires_grad)
    model.lora_settings = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout),
                           "targets": list(targets)}
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += alpha/r * B A); the model is an ordinary one again."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged())
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, by their names in the model's state dict."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only the lora_A / lora_B parameters keep requires_grad."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
