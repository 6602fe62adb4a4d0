"""The optimisers and the learning-rate schedule.

AdamW keeps, for every parameter, running averages of its gradient (m) and of
the gradient squared (v), and steps each weight by m / sqrt(v): a per-weight
step size. Weight decay shrinks the weights towards zero, *decoupled* from the
gradient (that is the W in AdamW). GPT-2-style training decays only the
matrices; biases, LayerNorm gains and (by default) the embeddings are left
alone, since pulling them to zero has no regularising meaning.

Muon (Jordan et al., 2024; `--optimizer muon`) is for the hidden 2-D matrices only: it keeps a
momentum of each matrix's gradient (Nesterov, 0.95) and steps along that momentum *orthogonalised*,
U V^T of its singular value decomposition, computed approximately with five Newton-Schulz
iterations. Every direction of the update then has the same size, so rare directions learn as
fast as common ones. Embeddings, the LM head, norms and biases keep AdamW. Muon's learning rate
(`--muon-lr`, 0.02 by default, the value of the NanoGPT speedrun) is scaled per matrix by
sqrt(max(1, rows / columns)) and follows the same warmup and decay as AdamW's `--lr`.
torch.optim.Muon is used where the installed torch has it; `muon_step` below is the same update
written out, used otherwise.
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


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the transformer's blocks (Muon's), without the MoE router's."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and p.dim() == 2 and ".h." in f".{name}" and not name.endswith("router.weight") \
                and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def zeropower(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximation of U V^T for g = U S V^T: Muon's quintic Newton-Schulz iteration, in bfloat16 as in
    the original. Its coefficients (3.4445, -4.7750, 2.0315) push every singular value into roughly
    [0.5, 1.5] within a few steps, which trains as well as exactly 1."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # singular values <= 1
    for _ in range(steps):
        s = x @ x.T
        x = torch.addmm(x, torch.addmm(s, s, s, beta=b, alpha=c), x, beta=a)  # a x + (b s + c s^2) x
    return x.T if tall else x


class ScratchMuon(torch.optim.Optimizer):
    """Muon written out (torch.optim.Muon's update, for a torch without it)."""

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])  # buf = momentum * buf + (1 - momentum) * g
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = zeropower(update, group["ns_steps"]).to(p.dtype)
                lr = group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1)))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-lr)


class CombinedOptimizer:
    """Several optimizers stepping as one (Muon for the hidden matrices, AdamW for the rest). Each param group
    may carry `lr_scale`: the training loop sets its learning rate to the schedule's times that."""

    def __init__(self, optimizers: list):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"the state holds {len(states)} optimizers, this run has {len(self.optimizers)}")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def make_optimizer(model: nn.Module, *, kind: str, lr: float, weight_decay: float, betas=(0.9, 0.95),
                   eps: float = 1e-8, decay_embeddings: bool = False, device_type: str = "cpu",
                   muon_lr: float = 0.02, muon_momentum: float = 0.95):
    if kind == "muon":
        hidden = hidden_matrices(model)
        ids = {id(p) for p in hidden}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]}
                  for g in param_groups(model, weight_decay, decay_embeddings)]
        adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps,
                                  fused=device_type == "cuda")
        muon_cls = getattr(torch.optim, "Muon", ScratchMuon)
        muon = muon_cls([{"params": hidden, "lr_scale": muon_lr / lr}], lr=muon_lr, weight_decay=weight_decay,
                        momentum=muon_momentum)
        return CombinedOptimizer([muon, adamw])
    groups = param_groups(model, weight_decay, decay_embeddings)
    if kind == "adamw":
        # the fused CUDA kernel updates all parameters in a few launches
        fused = device_type == "cuda"  # ("sharded": FSDP's DTensors take the default implementation)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if kind == "adamw-scratch":
        return ScratchAdamW(groups, lr=lr, betas=betas, eps=eps)
    raise UserError(f"unknown optimizer {kind!r}; choose adamw, adamw-scratch or muon")


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
