"""GPTConfig: every architecture field of the model, GPT-2's value as each default, and the presets.

It lives apart from gpt.py so that reading it needs no torch: the command line builds its model
flags and their help from these fields, and `gpt2lab --help` stays instant. The package exports it:
`from gpt2lab.model import GPTConfig`.
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
    block_size: int = _field(1024, "the context length: how many positions the model is trained for")
    n_layer: int = _field(12, "transformer blocks")
    n_head: int = _field(12, "attention heads per block")
    n_embd: int = _field(768, "the width of the residual stream")
    dropout: float = _field(0.0, "dropout probability (embeddings, attention, residual branches)")
    bias: bool = _field(True, "biases in every Linear and LayerNorm (GPT-2 has them)")
    # round the embedding/LM-head rows up to a multiple of this (50257 -> 50304 with 64)
    # for faster matmuls; the extra rows are never produced or trained on
    pad_vocab_multiple: int = _field(1, "pad the embedding rows to a multiple of this, e.g. 64 (speed)")
    # ---- the options of newer models (GPT-2's choice is each default)
    pos_embedding: str = _field("learned", "positions: learned (GPT-2's table) or rope (rotary, on queries and "
                                "keys)", choices=("learned", "rope"))
    rope_theta: float = _field(10000.0, "RoPE base: the longest wavelength's scale")
    rope_scaling: str = _field("none", "none, or yarn: run a RoPE model past the context it was trained at "
                               "(with --rope-factor and --rope-original-context)", choices=("none", "yarn"))
    rope_factor: float = _field(1.0, "YaRN: how many times the original context the model should reach")
    rope_original_context: int = _field(0, "YaRN: the context the model was trained at (0: --block-size)")
    norm: str = _field("layernorm", "layernorm (GPT-2) or rmsnorm", choices=("layernorm", "rmsnorm"))
    qk_norm: bool = _field(False, "normalise queries and keys per head (RMSNorm) before attention")
    mlp: str = _field("gelu", "the MLP: gelu (GPT-2), relu2 (ReLU squared) or swiglu (gated, with a hidden "
                      "size that keeps the parameters comparable)", choices=("gelu", "relu2", "swiglu"))
    mlp_hidden: int = _field(0, "the MLP's hidden size (0: 4 x n_embd, or 8/3 x n_embd for swiglu)")
    n_kv_head: int = _field(0, "key/value heads: grouped-query attention when fewer than --n-head (1: "
                            "multi-query; 0: one per query head)")
    tie_embeddings: bool = _field(True, "the LM head is the token embedding (GPT-2), or a matrix of its own")
    n_experts: int = _field(0, "mixture of experts: experts per MLP (0: a dense MLP)")
    experts_per_token: int = _field(2, "mixture of experts: experts each token is routed to")
    shared_expert: bool = _field(False, "mixture of experts: one more expert that every token uses")
    moe_balance: str = _field("loss", "how the router balances the experts: loss (an auxiliary load-balancing "
                              "loss) or bias (auxiliary-loss-free: a per-expert bias nudged after each step)",
                              choices=("loss", "bias"))
    moe_aux_weight: float = _field(0.01, "mixture of experts: the weight of the load-balancing loss")
    attention: str = _field("mha", "mha (multi-head, or grouped-query with --n-kv-head) or mla (multi-head "
                            "latent attention, DeepSeek-V2: the KV cache holds a compressed latent)",
                            choices=("mha", "mla"))
    kv_lora_rank: int = _field(0, "MLA: the size of the compressed key/value latent (0: n_embd / 4)")
    mla_rope_dim: int = _field(0, "MLA with rope: the size of the decoupled rotary key (0: head size / 2)")

    def __post_init__(self):
        def bad(name, what):
            raise UserError(f"model setting {name} must be {what}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple",
                     "experts_per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "a positive integer")
        for name in ("rope_original_context", "mlp_hidden", "n_kv_head", "n_experts", "kv_lora_rank",
                     "mla_rope_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(name, "an integer >= 0")
        for name in ("bias", "qk_norm", "tie_embeddings", "shared_expert"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        for name in fields(self):
            choices = name.metadata.get("choices")
            if choices and getattr(self, name.name) not in choices:
                bad(name.name, "one of " + ", ".join(choices))
        for name, lo, hi in (("dropout", 0.0, 1.0), ("rope_theta", 1.0, 1e12), ("rope_factor", 1.0, 1e6),
                             ("moe_aux_weight", 0.0, 1e3)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value < hi:
                bad(name, f"a number in [{lo:g}, {hi:g})")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.kv_heads > self.n_head or self.n_head % self.kv_heads:
            raise UserError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.pos_embedding == "rope" and self.rope_dim % 2:
            raise UserError(f"rotary positions need an even size per head, got {self.rope_dim}")
        if self.rope_scaling == "yarn" and self.pos_embedding != "rope":
            raise UserError("--rope-scaling yarn needs --pos-embedding rope")
        if self.n_experts and self.experts_per_token > self.n_experts:
            raise UserError(f"experts_per_token ({self.experts_per_token}) exceeds n_experts ({self.n_experts})")
        if self.attention == "mla" and self.n_kv_head:
            raise UserError("--attention mla compresses keys and values itself; leave --n-kv-head unset")
        # sizes no machine can hold are refused here, before anything is allocated
        if self.vocab_size > 1 << 21 or self.block_size > 1 << 20 or self.n_layer > 1024 \
                or self.n_embd > 1 << 16 or self.n_experts > 1024 or self.hidden_size > 1 << 18:
            raise UserError(f"the model config asks for an impossible size (vocab_size {self.vocab_size}, "
                            f"block_size {self.block_size}, n_layer {self.n_layer}, n_embd {self.n_embd})")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden size: 4C (GPT-2), or for SwiGLU 8C/3 rounded up to a multiple of 32, so that its
        three matrices hold about the 8C^2 parameters of GPT-2's two."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return -(-8 * self.n_embd // 3 // 32) * 32
        return 4 * self.n_embd

    @property
    def latent_size(self) -> int:
        return self.kv_lora_rank or max(1, self.n_embd // 4)

    @property
    def rope_dim(self) -> int:
        """Rotary size per head: the whole head, or MLA's decoupled part."""
        if self.pos_embedding != "rope":
            return 0
        if self.attention == "mla":
            return self.mla_rope_dim or max(2, self.head_dim // 2 // 2 * 2)
        return self.head_dim

    @property
    def original_context(self) -> int:
        return self.rope_original_context or self.block_size

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


# model fields that may differ from the run a model starts from (--init-from, --init): dropout, and for a
# rotary model its context (a longer one, usually with YaRN)
CONTEXT_FIELDS = ("block_size", "rope_scaling", "rope_factor", "rope_original_context")
STARTING_RUN_FIELDS = ("dropout",) + CONTEXT_FIELDS


def derive(base: GPTConfig, overrides: dict, source: str) -> GPTConfig:
    """The config of a model that starts from `base` (a run's), with the `overrides` a user gave: those a
    starting run allows, checked; any other that differs is a UserError naming the flag and `source`."""
    values = base.to_dict()
    for name, given in overrides.items():
        if given == values[name]:
            continue
        if name in CONTEXT_FIELDS and base.pos_embedding != "rope":
            raise UserError(f"--{name.replace('_', '-')} {given}: {source} has learned positions, a table of "
                            f"{base.block_size}; only a rotary (--pos-embedding rope) model can change its context")
        if name not in STARTING_RUN_FIELDS:
            raise UserError(f"--{name.replace('_', '-')} {given} disagrees with {source} ({values[name]}); drop "
                            "the flag")
        values[name] = given
    if values["block_size"] > base.block_size and values["rope_scaling"] == "yarn" \
            and not values["rope_original_context"]:
        values["rope_original_context"] = base.original_context  # what the weights were trained at
    return GPTConfig.from_dict(values)
