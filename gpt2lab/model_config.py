"""GPTConfig: every architecture field of the model, GPT-2's value as each default, and the presets.

It lives apart from model.py only so that reading it needs no torch: the command line builds its
model flags and their help from these fields, and `gpt2lab --help` stays instant. model.py
re-exports it: `from gpt2lab.model import GPTConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from gpt2lab.errors import UserError

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


def _field(default, help: str, flag: bool = True, **meta):
    """A model config field: its default is GPT-2's; `help` becomes the flag's help text."""
    return field(default=default, metadata={"help": help, "flag": flag, **meta})


@dataclass(frozen=True)
class GPTConfig:
    """Every architecture field, GPT-2's value as the default. The model flags of `pretrain` and their
    help come from here; a field a run dir lacks (written by an older gpt2lab) takes its default."""

    vocab_size: int = _field(50257, "rows of the token embedding (from the tokenizer)", flag=False)
    block_size: int = _field(1024, "the context length: how many positions have embeddings")
    n_layer: int = _field(12, "transformer blocks")
    n_head: int = _field(12, "attention heads per block")
    n_embd: int = _field(768, "the width of the residual stream")
    dropout: float = _field(0.0, "dropout probability (embeddings, attention, residual branches)")
    bias: bool = _field(True, "biases in every Linear and LayerNorm (GPT-2 has them)")
    # round the embedding/LM-head rows up to a multiple of this (50257 -> 50304 with 64)
    # for faster matmuls; the extra rows are never produced or trained on
    pad_vocab_multiple: int = _field(1, "pad the embedding rows to a multiple of this, e.g. 64 (speed)")

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model setting {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model setting dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise UserError(f"model setting bias must be true or false, got {self.bias!r}")
        # sizes no machine can hold are refused here, before anything is allocated
        if self.vocab_size > 1 << 21 or self.block_size > 1 << 20 or self.n_layer > 1024 \
                or self.n_embd > 1 << 16:
            raise UserError(f"the model config asks for an impossible size (vocab_size {self.vocab_size}, "
                            f"block_size {self.block_size}, n_layer {self.n_layer}, n_embd {self.n_embd})")

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
            raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """A config as stored in a run dir; missing fields take GPT-2's value, unknown ones are an error."""
        if not isinstance(d, dict):
            raise UserError(f"the model config must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def model_fields(flags_only: bool = True) -> list:
    """The fields of GPTConfig a user may set (as flags and config-file keys)."""
    return [f for f in fields(GPTConfig) if f.metadata.get("flag", True) or not flags_only]
