"""The whole GPT-2, in one file.

    tokens (B, T) --wte--> + positions --wpe-->  x (B, T, C)
    repeat n_layer times:
        x = x + attn(ln_1(x))      causal multi-head self-attention
        x = x + mlp(ln_2(x))       Linear(C, 4C) -> GELU(tanh) -> Linear(4C, C)
    logits = ln_f(x) @ wte.T       the LM head shares the token embedding

Parameter names follow Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn.weight`),
so OpenAI's checkpoints map onto this model with a short list of transposes
(they store their linear layers as Conv1D, i.e. weight shape (in, out)).
The loss lives outside `forward`: the model maps ids to logits and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# the model sizes OpenAI released, and small ones that train on a laptop CPU
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # ~10M + embeddings
    "micro": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
    "nano": dict(n_layer=3, n_head=4, n_embd=128, block_size=128),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),  # for tests
}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's: 256 bytes + 50,000 merges + <|endoftext|>
    block_size: int = 1024  # the context length: how many positions have embeddings
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    # round the embedding/LM-head rows up to a multiple of this (50257 -> 50304 with 64)
    # for faster matmuls; the extra rows are never produced or trained on
    pad_vocab_multiple: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # query, key and value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is None:
            # softmax(q k^T / sqrt(head_dim)) v under a causal mask; flash attention where available
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:
            # keys and values of earlier tokens come from the cache; only the new ones are computed
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: normalise, transform, add back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


def trunk(transformer: nn.ModuleDict, block_size: int, idx: torch.Tensor,
          kv_cache: KVCache | None = None) -> torch.Tensor:
    """Embeddings and every block: idx (B, T) -> hidden states (B, T, C), before the final LayerNorm.

    Shared by the language model and the classifier built on the same transformer.
    """
    T = idx.size(1)
    if kv_cache is None:
        if T > block_size:
            raise ValueError(f"input of {T} tokens is longer than the model's context of "
                             f"{block_size} tokens")
        pos, mask = torch.arange(T, device=idx.device), None
    else:
        pos, mask = kv_cache.prepare(T)
    x = transformer.drop(transformer.wte(idx) + transformer.wpe(pos))
    for i, block in enumerate(transformer.h):
        x = block(x, kv_cache, i, mask)
    if kv_cache is not None:
        kv_cache.advance(T)
    return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # weight tying: the output projection is the token embedding matrix
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer): each block adds two of them, and without the scale
        # the residual's variance would grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, kv_cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size).

        With a `kv_cache`, idx holds only the tokens after those already cached
        (the whole prompt first, then one token at a time). `last_only` returns
        the logits of the last position only, (B, 1, vocab_size): all that
        sampling needs, without the cost of the LM head on every position.
        """
        x = trunk(self.transformer, self.config.block_size, idx, kv_cache)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.padded_vocab_size != self.config.vocab_size:
            # padded rows exist for speed only: they are never a prediction
            logits = logits[..., : self.config.vocab_size]
        return logits

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied embedding counted once.

        non_embedding=True leaves out the position embeddings and the token
        embedding rows (the convention of the scaling-law papers).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B.

        6 FLOPs per weight that multiplies an activation (2 forward, 4 backward),
        plus the attention scores and their weighted sum: 12 * layers * width * T.
        """
        c = self.config
        T = seq_len or c.block_size
        n_matmul = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n_matmul + 12 * c.n_layer * c.n_embd * T


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, preallocated once.

    Generating token t+1 needs the keys and values of tokens 0..t; without a
    cache they are recomputed at every step (quadratic work). The buffers are
    allocated for `max_len` positions up front, so decoding writes into them
    and never reallocates; `reset` empties the cache for a new prefill (the
    sliding window of gpt2lab.generate) and keeps the buffers.

    Batches of prompts of different lengths are left-padded: row b begins with
    `pad[b]` padding slots that no query may attend to, and its positions
    count from its first real token, so every row sees exactly what it would
    see alone.

    A decoding step (one new token per row) costs no tensor work here beyond
    views: its positions and, with padding, its attention mask are slices of
    tensors built once in the constructor.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, pad: torch.Tensor | None = None):
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(f"a cache of {self.max_len} positions exceeds the model's context of "
                             f"{config.block_size}")
        self.shape = (config.n_layer, batch_size, config.n_head, self.max_len, config.head_dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.k: torch.Tensor | None = None  # allocated on first use, in the dtype of the keys
        self.v: torch.Tensor | None = None
        self._k_layers: tuple[torch.Tensor, ...] = ()  # self.k[layer] for each layer, made once
        self._v_layers: tuple[torch.Tensor, ...] = ()
        self.pos = 0  # slots filled so far
        self._slots = torch.arange(self.max_len, device=self.device)
        self.pad = pad.to(self.device) if pad is not None else None
        self.valid = None
        if self.pad is not None:
            # key slot j of row b holds a real token when j >= pad[b]
            self.valid = self._slots[None, :] >= self.pad[:, None]  # (B, max_len)
            # the position of slot j in row b counts from the row's first real token
            self._positions = (self._slots[None, :] - self.pad[:, None]).clamp(min=0)  # (B, max_len)
            # once every row is past its padding, a new token may see every real slot before it:
            # the mask of a decoding step is a slice of `valid`
            self._decode_mask = self.valid[:, None, None, :]  # (B, 1, 1, max_len)
            self._all_real_from = int(self.pad.max())

    def reset(self) -> None:
        """Forget the cached tokens (the buffers stay allocated)."""
        self.pos = 0

    def prepare(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (T,) or (B, T) of the next T tokens, and the attention mask they need."""
        pos = self.pos
        L = pos + T
        if L > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {pos} are used and "
                             f"{T} more do not fit")
        q_slots = self._slots[pos:L]
        if self.pad is None:
            # no padding: causal order is all there is; sdpa handles T == 1 and a fresh prefill itself
            if T == 1 or pos == 0:
                return q_slots, None
            return q_slots, (self._slots[None, :L] <= q_slots[:, None])[None, None]
        positions = self._positions[:, pos:L]
        if T == 1 and pos >= self._all_real_from:
            return positions, self._decode_mask[..., :L]
        causal = self._slots[None, :L] <= q_slots[:, None]  # (T, L)
        mask = causal[None] & self.valid[:, None, :L]  # (B, T, L)
        # a padding slot attends to itself, so its (unused) row never becomes NaN
        mask = mask | (self._slots[None, :L] == q_slots[:, None])[None]
        return positions, mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, n_head, T, head_dim); return all of this layer's so far."""
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=v.device)
            self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)
        T, L = k.size(2), self.pos + k.size(2)
        k_all, v_all = self._k_layers[layer], self._v_layers[layer]
        k_all.narrow(2, self.pos, T).copy_(k)
        v_all.narrow(2, self.pos, T).copy_(v)
        return k_all.narrow(2, 0, L), v_all.narrow(2, 0, L)

    def advance(self, T: int) -> None:
        self.pos += T
