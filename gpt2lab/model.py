"""The whole GPT-2, in one file: the only code that computes embeddings, blocks and the head.

    tokens (B, T) --wte--> + positions --wpe-->  x (B, T, C)
    repeat n_layer times:
        x = x + attn(ln_1(x))      causal multi-head self-attention
        x = x + mlp(ln_2(x))       Linear(C, 4C) -> GELU(tanh) -> Linear(4C, C)
    h = ln_f(x)                    `Transformer`: ids -> hidden states
    logits = h @ wte.T             `GPT`: the LM head shares the token embedding
    class logits = score(h[last])  `GPTClassifier`: a linear head on the last real token

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`),
so OpenAI's checkpoints map onto this model with a short list of transposes
(they store their linear layers as Conv1D, i.e. weight shape (in, out)).
The loss lives outside `forward`: the model maps ids to logits and nothing else.

Every use goes through the same forward: training (`idx` alone, causal), prefill and
decoding (`kv_cache`: the cache stores and returns keys and values, nothing more),
batches of left-padded prompts and packed multiple-choice scoring (explicit
`positions` and an attention `mask`), and the classifier (`hidden_states`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2lab.errors import UserError
from gpt2lab.layers import LatentAttention, MoE, RMSNorm, Rotary, apply_rotary, make_norm
from gpt2lab.model_config import PRESETS, GPTConfig, model_fields  # noqa: F401 (the config lives with the model)

# ------------------------------------------------------------------------------ the modules


class CausalSelfAttention(nn.Module):
    """Causal self-attention: multi-head (GPT-2), or grouped-query with fewer key/value heads (`n_kv_head`),
    with rotary positions and query/key normalisation when the config asks for them."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        # queries, keys and values for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                                bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = RMSNorm(self.head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if config.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, C). `rope`: (cos, sin) of the tokens' positions, for rotary attention. `mask` (B or 1, 1,
        T, keys): True (or 0.0) where a query may attend; None means causal among the T new tokens, with
        every cached key visible (the caller passes a mask whenever that is not enough)."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=2)
        # (B, T, heads * D) -> (B, heads, T, D)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            # keys and values of earlier tokens come from the cache; only the new ones are computed
            k, v = cache.update(layer, k, v)
        # softmax(q k^T / sqrt(head_dim)) v; flash attention where the kernel allows it. With fewer key/value
        # heads, each serves n_head / n_kv_head query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=Hkv != H)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP, Linear(C, 4C) -> GELU(tanh) -> Linear(4C, C); or ReLU squared; or SwiGLU, whose first
    matmul gives a gate and a value (silu(gate) * value)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, hidden = config.mlp, config.hidden_size
        self.c_fc = nn.Linear(config.n_embd, (2 if self.kind == "swiglu" else 1) * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: normalise, transform, add back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = LatentAttention(config) if config.attention == "mla" else CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config, MLP) if config.n_experts else MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


def causal_mask(T: int, past: int, device) -> torch.Tensor:
    """(1, 1, T, past + T): query i (at slot past + i) sees every slot up to its own."""
    slots = torch.arange(past + T, device=device)
    return (slots[None, :] <= slots[past:, None])[None, None]


class Transformer(nn.Module):
    """Embeddings, blocks and the final norm: ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        if config.pos_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            self.rotary = Rotary(config)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.activation_checkpointing = False  # a training setting, not part of the model

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """`positions` (T,) or (B, T): default 0, 1, 2, ... after what the cache holds. `mask`: see
        `CausalSelfAttention.forward`."""
        T = idx.size(1)
        past = cache.pos if cache is not None else 0
        if positions is None:
            if past + T > self.config.block_size:
                raise ValueError(f"input of {past + T} tokens is longer than the model's context of "
                                 f"{self.config.block_size} tokens")
            positions = torch.arange(past, past + T, device=idx.device)
        if mask is None and past > 0 and T > 1:
            mask = causal_mask(T, past, idx.device)  # new tokens after cached ones: causal, shifted
        x = self.wte(idx)
        rope = None
        if self.config.pos_embedding == "learned":
            x = x + self.wpe(positions)
        else:
            rope = self.rotary(positions)
        x = self.drop(x)
        for i, block in enumerate(self.h):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only each block's input; its activations are recomputed in the backward pass
                x = checkpoint(block, x, rope, mask, cache, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, and the projections
    that write into the residual stream scaled by 1/sqrt(2 * n_layer): each block adds two of them, and
    without the scale the residual's variance would grow with depth."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


class _CountsMixin:
    transformer: Transformer
    config: GPTConfig

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied tensor counted once. non_embedding=True leaves out the embedding
        tables (the convention of the scaling-law papers)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B: 6 per
        parameter (the position table, a lookup, left out), plus the attention scores and their
        weighted sum, 12 * T * (heads x head size) per layer. A mixture of experts counts the experts a
        token runs, not all of them."""
        T = seq_len or self.config.block_size
        n = self.num_params()
        wpe = getattr(self.transformer, "wpe", None)
        if isinstance(wpe, nn.Embedding):
            n -= wpe.weight.numel()
        for moe in (m for m in self.modules() if isinstance(m, MoE)):  # a token runs k of the E experts
            per_expert = sum(p.numel() for p in moe.experts[0].parameters())
            n -= (moe.n_experts - moe.k) * per_expert
        attn = 0  # per token: scores (query . key) and the weighted sum of values, for every head
        for m in self.modules():
            if isinstance(m, CausalSelfAttention):
                attn += m.n_head * 2 * m.head_dim
            elif isinstance(m, LatentAttention):
                attn += m.n_head * (2 * m.head_dim + m.rope_dim)
        return 6 * n + 6 * attn * T


class GPT(_CountsMixin, nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying: the output projection is the token embedding matrix
            self.lm_head.weight = self.transformer.wte.weight
        init_weights(self, config.n_layer)

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None, *,
                      positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) after the final norm; `head` turns any selection of them into logits."""
        return self.transformer(idx, positions, mask, kv_cache)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., vocab_size)."""
        logits = self.lm_head(h)
        if self.config.padded_vocab_size != self.config.vocab_size:
            # padded rows exist for speed only: they are never a prediction
            logits = logits[..., : self.config.vocab_size]
        return logits

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None, *, last_only: bool = False,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size).

        With a `kv_cache`, idx holds only the tokens after those already cached (the whole prompt
        first, then one token at a time). `last_only` returns the logits of the last position only,
        (B, 1, vocab_size): all that sampling needs, without the cost of the LM head everywhere.
        """
        h = self.hidden_states(idx, kv_cache, positions=positions, mask=mask)
        return self.head(h[:, -1:] if last_only else h)


class GPTClassifier(_CountsMixin, nn.Module):
    """The same transformer with a linear head on the hidden state of each row's last real token.

    Parameter names are the language model's (`transformer.h.0...`) plus `score.weight` and
    `score.bias`, so a pretrained run's weights load into it unchanged.
    """

    def __init__(self, config: GPTConfig, num_classes: int, transformer: Transformer | None = None):
        super().__init__()
        if num_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.config, self.num_classes = config, num_classes
        if transformer is None:
            transformer = Transformer(config)
            init_weights(transformer, config.n_layer)
        self.transformer = transformer
        self.score = nn.Linear(config.n_embd, num_classes)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.score.bias)

    @classmethod
    def from_lm(cls, model: GPT, num_classes: int) -> GPTClassifier:
        """Reuse a (pretrained) GPT's transformer; its LM head is dropped."""
        return cls(model.config, num_classes, transformer=model.transformer)

    def features(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) right-padded ids, lengths (B,) -> (B, C): the last real token's hidden state.
        Causal attention lets that token see the whole text and padding after it cannot change it."""
        B, T = idx.shape
        h = self.transformer(idx)
        last = (lengths - 1) if lengths is not None else torch.full((B,), T - 1, device=idx.device)
        return h[torch.arange(B, device=idx.device), last]

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """-> class logits (B, num_classes)."""
        return self.score(self.features(idx, lengths))


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every tensor once: a tied weight (the LM head is the token embedding) is
    stored under the name it was first registered with. What a weights file holds."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, in buffers allocated once.

    Generating token t+1 needs the keys and values of tokens 0..t; without a cache they are
    recomputed at every step (quadratic work). Each layer's buffers hold `max_len` slots and are made
    on that layer's first write, shaped after what it writes (an attention with fewer key/value heads
    stores fewer), so decoding writes into them and never reallocates. `reset` empties the cache for
    a new prefill and keeps the buffers. Positions and masks are the caller's business: the cache only
    stores and returns.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None):
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(f"a cache of {self.max_len} positions exceeds the model's context of "
                             f"{config.block_size}")
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.layers: list[tuple[torch.Tensor, ...] | None] = [None] * config.n_layer
        self.pos = 0  # slots filled so far

    def reset(self) -> None:
        """Forget the cached tokens (the buffers stay allocated)."""
        self.pos = 0

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this step's tensors (B, heads, T, dim) at the next free slots; return each one's
        slots so far, (B, heads, pos + T, dim)."""
        T = new[0].size(2)
        L = self.pos + T
        if L > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.pos} are used and {T} "
                             "more do not fit")
        bufs = self.layers[layer]
        if bufs is None:
            bufs = tuple(torch.empty(t.size(0), t.size(1), self.max_len, t.size(3), dtype=t.dtype,
                                     device=t.device) for t in new)
            self.layers[layer] = bufs
        out = []
        for buf, t in zip(bufs, new):
            buf.narrow(2, self.pos, T).copy_(t)
            out.append(buf.narrow(2, 0, L))
        return tuple(out)

    def advance(self, T: int) -> None:
        self.pos += T

    def repeat_rows(self, n: int) -> KVCache:
        """A cache of n rows, each a copy of this one-row cache (a prompt prefilled once, sampled n times)."""
        if self.batch_size != 1:
            raise ValueError("repeat_rows copies a cache of one row")
        other = KVCache.__new__(KVCache)
        other.max_len, other.batch_size, other.device, other.pos = self.max_len, n, self.device, self.pos
        other.layers = [None if bufs is None else tuple(t.repeat(n, 1, 1, 1) for t in bufs) for bufs in self.layers]
        return other
