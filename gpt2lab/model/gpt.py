"""GPT-2, top to bottom: the only code that computes embeddings, blocks and the head.

    tokens (B, T) --wte--> + positions --wpe-->  x (B, T, C)
    repeat n_layer times:
        x = x + attn(ln_1(x))      causal multi-head self-attention
        x = x + mlp(ln_2(x))       Linear(C, 4C) -> GELU(tanh) -> Linear(4C, C)
    h = ln_f(x)                    `Transformer`: ids -> hidden states
    logits = h @ wte.T             `GPT`: the LM head shares the token embedding
    class logits = score(h[last])  `GPTClassifier`: a linear head on the last real token

With its defaults this is OpenAI's GPT-2 exactly. The options of newer models (GPTConfig's fields) are
short hooks here whose bodies live in options.py: RMSNorm for LayerNorm (`make_norm`), rotary positions
for the table (`Rotary`), query/key norms, ReLU² or SwiGLU for GELU (`activation`), fewer key/value heads,
multi-head latent attention for the attention (`LatentAttention`), a mixture of experts for the MLP
(`MoE`).

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`),
so OpenAI's checkpoints map onto this model with a short list of transposes
(they store their linear layers as Conv1D, i.e. weight shape (in, out)).
The loss lives outside `forward`: the model maps ids to logits and nothing else.

Every use goes through the same forward: training (`idx` alone, causal), prefill and decoding
(`kv_cache`: the cache stores keys and values and says where each row's new tokens go), packed
documents and multiple-choice scoring (explicit `positions` and an attention `mask`, masks.py), and the
classifier (`hidden_states`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab.errors import UserError
from gpt2lab.model.cache import KVCache
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.options import LatentAttention, MoE, RMSNorm, Rotary, activation, apply_rotary, make_norm

# ------------------------------------------------------------------------------ the modules


class CausalSelfAttention(nn.Module):
    """Causal self-attention: multi-head (GPT-2), or grouped-query with fewer key/value heads (`n_kv_head`),
    with rotary positions and query/key normalisation when the config asks for them."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # which of the KV cache's layers this attention writes
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
                cache: KVCache | None = None) -> torch.Tensor:
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
            k, v = cache.update(self.layer, k, v)
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
        h = F.gelu(h, approximate="tanh") if self.kind == "gelu" else activation(h, self.kind)  # GPT-2: tanh GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: normalise, transform, add back."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = make_norm(config)
        attention = LatentAttention if config.attention == "mla" else CausalSelfAttention
        self.attn = attention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config, MLP) if config.n_experts else MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


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
        self.h = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.ln_f = make_norm(config)

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """`positions` (T,) or (B, T): default 0, 1, 2, ... after what the cache holds. `mask`: see
        `CausalSelfAttention.forward`. With a cache and neither given, the cache says where each row's new
        tokens go (its rows may hold different numbers of tokens)."""
        T = idx.size(1)
        if cache is not None and positions is None and mask is None:
            positions, mask = cache.inputs(T, idx.device)
        if positions is None:
            past = cache.pos if cache is not None else 0
            if past + T > self.config.block_size:
                raise ValueError(f"input of {past + T} tokens is longer than the model's context of "
                                 f"{self.config.block_size} tokens")
            positions = torch.arange(past, past + T, device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.config.pos_embedding == "learned":
            x = x + self.wpe(positions)
        else:
            rope = self.rotary(positions)
        x = self.drop(x)
        for block in self.h:
            x = block(x, rope, mask, cache)
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


class GPT(nn.Module):
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


class GPTClassifier(nn.Module):
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
