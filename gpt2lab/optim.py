"""The optimiser and the learning-rate schedule.

AdamW keeps, for every parameter, running averages of its gradient (m) and of
the gradient squared (v), and steps each weight by m / sqrt(v): a per-weight
step size. Weight decay shrinks the weights towards zero, *decoupled* from the
gradient (that is the W in AdamW). GPT-2-style training decays only the
matrices; biases, LayerNorm gains and (by default) the embeddings are left
alone, since pulling them to zero has no regularising meaning.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt2lab.errors import UserError


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two groups: matrices that are decayed, and everything else."""
    embeddings = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # the tied embedding / LM head appears once
        is_matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class ScratchAdamW(torch.optim.Optimizer):
    """AdamW written out step by step (Loshchilov & Hutter, 2019), for readers.

    Gives the same updates as `torch.optim.AdamW` to float precision.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                p.mul_(1 - lr * wd)  # decoupled weight decay
                m.lerp_(g, 1 - beta1)  # m = beta1 * m + (1 - beta1) * g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 * v + (1 - beta2) * g^2
                # bias correction: m and v start at zero and are too small early on
                step_size = lr / (1 - beta1**t)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)
        return loss


def make_optimizer(model: nn.Module, *, kind: str, lr: float, weight_decay: float, betas=(0.9, 0.95),
                   eps: float = 1e-8, decay_embeddings: bool = False, device_type: str = "cpu"):
    groups = param_groups(model, weight_decay, decay_embeddings)
    if kind == "adamw":
        # the fused CUDA kernel updates all parameters in a few launches
        fused = device_type == "cuda"  # ("sharded": FSDP's DTensors take the default implementation)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if kind == "adamw-scratch":
        return ScratchAdamW(groups, lr=lr, betas=betas, eps=eps)
    raise UserError(f"unknown optimizer {kind!r}; choose adamw or adamw-scratch")


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine") -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps` (or, `schedule="constant"`,
    `lr` from then on).

    `step` counts from 0; the first step already uses a non-zero rate.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
