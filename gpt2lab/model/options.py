"""The parts of newer models that GPT-2 does not have: RMSNorm, rotary positions (and YaRN), ReLU² and
SwiGLU, multi-head latent attention and a mixture of experts. gpt.py builds a block from them when the
config asks for them; every default is GPT-2's, which uses none of these.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the bias (computed in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config, dim: int | None = None) -> nn.Module:
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, eps=1e-5, bias=config.bias)


def activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The MLP's nonlinearity other than GPT-2's GELU: relu2 (ReLU squared) or swiglu, whose first matmul
    gives a gate and a value (silu(gate) * value, half the width)."""
    if kind == "swiglu":
        gate, value = h.chunk(2, dim=-1)
        return F.silu(gate) * value
    if kind == "relu2":
        return F.relu(h).square()
    raise ValueError(f"unknown activation {kind!r}")


# ------------------------------------------------------------------------------ rotary positions


def yarn_frequencies(dim: int, theta: float, factor: float, original: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023): the rotary frequencies for a context `factor` times the `original` one,
    and the attention temperature (applied to cos and sin).

    Frequencies that turn many times within the original context (short wavelengths: local order) are
    kept; those that turn less than once (long wavelengths) are divided by `factor`, so positions past
    the original context look like positions the model has seen; those between are blended linearly
    ("NTK-by-parts", with beta_fast = 32 and beta_slow = 1 turns). With factor 1 this is plain RoPE.
    """
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extrapolation, interpolation = 1.0 / base, 1.0 / (factor * base)

    def dim_for(turns: float) -> float:  # the frequency index that turns `turns` times in the original context
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dim_for(32.0)), 0)
    high = min(math.ceil(dim_for(1.0)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    temperature = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq.float(), temperature


class Rotary(nn.Module):
    """cos and sin of each position's angles, for `apply_rotary` (the rotate-half convention of Llama and
    Hugging Face: the first and second halves of a head are the two coordinates of each 2-D rotation)."""

    def __init__(self, config):
        super().__init__()
        dim = config.rope_dim
        if config.rope_scaling == "yarn":
            inv_freq, self.temperature = yarn_frequencies(dim, config.rope_theta, config.rope_factor,
                                                          config.original_context)
        else:
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            inv_freq, self.temperature = inv_freq.float(), 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin of shape (1 or B, 1, T, dim), broadcast over heads."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)  # (..., T, dim/2)
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos() * self.temperature, emb.sin() * self.temperature
        if cos.dim() == 2:  # (T, dim) -> (1, 1, T, dim)
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + d/2]) of every head by its position's angle: x (B, H, T, d)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ------------------------------------------------------------------------------ latent attention


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2). Keys and values are made from a small latent vector per
    token (`c_kv`, size kv_lora_rank), so the KV cache stores that latent (plus, with rotary positions, one
    shared rotary key of size mla_rope_dim) instead of 2 x heads x head size numbers per token. Rotary
    positions go on a decoupled part of the queries and that shared key, since a rotation cannot pass
    through the latent's up-projection.
    """

    def __init__(self, config, layer: int = 0):
        super().__init__()
        self.layer = layer  # which of the KV cache's layers this attention writes
        C, H, D = config.n_embd, config.n_head, config.head_dim
        self.n_head, self.head_dim, self.rope_dim, self.latent = H, D, config.rope_dim, config.latent_size
        self.dropout = config.dropout
        self.c_q = nn.Linear(C, H * (D + self.rope_dim), bias=config.bias)
        self.c_kv = nn.Linear(C, self.latent + self.rope_dim, bias=config.bias)  # down: the latent (+ rotary key)
        self.kv_norm = RMSNorm(self.latent)
        self.c_kv_up = nn.Linear(self.latent, 2 * H * D, bias=False)  # up: each head's key and value
        self.c_proj = nn.Linear(H * D, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, mask=None, cache=None):
        B, T, _ = x.shape
        H, D, R = self.n_head, self.head_dim, self.rope_dim
        q = self.c_q(x).view(B, T, H, D + R).transpose(1, 2)  # (B, H, T, D + R)
        kv = self.c_kv(x)
        latent = self.kv_norm(kv[..., :self.latent])[:, None]  # (B, 1, T, latent)
        k_rope = kv[..., self.latent:][:, None]  # (B, 1, T, R)
        if rope is not None:
            cos, sin = rope
            q = torch.cat([q[..., :D], apply_rotary(q[..., D:], cos, sin)], dim=-1)
            k_rope = apply_rotary(k_rope, cos, sin)
        if cache is not None:  # the cache holds the latent and the rotary key, not keys and values per head
            latent, k_rope = cache.update(self.layer, latent, k_rope)
        L = latent.size(2)
        k_nope, v = self.c_kv_up(latent[:, 0]).view(B, L, H, 2 * D).transpose(1, 2).split(D, dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, L, R)], dim=-1) if R else k_nope
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.resid_dropout(self.c_proj(y))


# ------------------------------------------------------------------------------ mixture of experts


class MoEStats:
    """What the mixtures of experts did in the training forwards of one micro-batch: each layer's
    load-balancing loss and the share of the tokens each expert got. The training loop opens one around
    a task's loss (`collect_moe`), adds the balance loss to the objective, logs both and, after the
    optimizer step, hands the loads to `MoE.update_bias`. Forwards outside it (evaluation, sampling)
    record nothing, so the layers keep no state from one call to the next."""

    def __init__(self):
        self.layers: list[MoE] = []
        self.aux: list[torch.Tensor] = []
        self.loads: list[torch.Tensor] = []

    def record(self, layer: MoE, aux: torch.Tensor, load: torch.Tensor) -> None:
        self.layers.append(layer)
        self.aux.append(aux)
        self.loads.append(load)

    def aux_loss(self) -> torch.Tensor:
        """The mean balance loss of the layers (1.0 when every expert gets its share)."""
        return torch.stack(self.aux).mean()

    def max_load(self) -> torch.Tensor:
        """The busiest expert's load as a multiple of its fair share, averaged over the layers (1.0: even)."""
        return torch.stack([load.max() * load.numel() for load in self.loads]).mean()


_moe_stats: ContextVar[MoEStats | None] = ContextVar("gpt2lab_moe_stats", default=None)


@contextmanager
def collect_moe():
    """`with collect_moe() as stats:` the MoE layers of training forwards in the block record into `stats`."""
    stats = MoEStats()
    token = _moe_stats.set(stats)
    try:
        yield stats
    finally:
        _moe_stats.reset(token)


class MoE(nn.Module):
    """A mixture of experts in place of the MLP: a router scores every expert for each token, the token goes
    to its `experts_per_token` best (weights: the router's softmax over them, renormalised), and each expert
    is an MLP of the configured kind. Dropless: every routed token is computed, none is dropped for
    capacity. An optional shared expert sees every token.

    Balance: every training forward records (into the loop's `MoEStats`) Switch Transformer's auxiliary
    loss, n_experts x sum(fraction of tokens routed to e x mean router probability of e), 1.0 when perfectly
    balanced, and the experts' load. With `moe_balance="loss"` the loop adds that loss (x moe_aux_weight)
    to the objective of every task. With "bias" (DeepSeek-V3's auxiliary-loss-free balancing) a per-expert
    bias, used only to choose the experts, is nudged after each optimizer step towards the experts that got
    too few tokens (`update_bias`).
    """

    BIAS_RATE = 1e-3

    def __init__(self, config, make_mlp):
        super().__init__()
        self.n_experts, self.k, self.balance = config.n_experts, config.experts_per_token, config.moe_balance
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = nn.ModuleList([make_mlp(config) for _ in range(config.n_experts)])
        self.shared = make_mlp(config) if config.shared_expert else None
        self.register_buffer("route_bias", torch.zeros(config.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores = self.router(flat).float().softmax(dim=-1)  # (N, E)
        choose = scores + self.route_bias if self.balance == "bias" else scores
        top = choose.topk(self.k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, top)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(top == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        if self.shared is not None:
            out = out + self.shared(flat)
        stats = _moe_stats.get()
        if stats is not None and self.training:
            load = torch.bincount(top.reshape(-1), minlength=self.n_experts).float() / top.numel()
            stats.record(self, self.n_experts * (load * scores.mean(dim=0)).sum(), load.detach())
        return out.view(shape)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """After an optimizer step, with the expert loads of the step's micro-batches summed (and, under
        several processes, summed over them, so that every process ends with the same bias): the
        auxiliary-loss-free balance raises the bias of the experts that got less than their share and
        lowers the others'."""
        if self.balance == "bias":
            self.route_bias += self.BIAS_RATE * torch.sign(load.mean() - load)
