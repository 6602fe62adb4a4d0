"""The training configuration: one typed dataclass that defaults, config files and flags all set.

Precedence: the defaults here, then a TOML or YAML file (`--config run.toml`,
the same names as the flags, with `_` or `-`), then the command-line flags.
This module imports no torch, so that `gpt2lab pretrain --help` is instant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from gpt2lab.errors import UserError

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "pad_vocab_multiple")
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    model: str = "gpt2"
    # per-field model overrides of the preset (None: the preset's value)
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    dropout: float | None = None
    bias: bool | None = None
    pad_vocab_multiple: int | None = None
    # batch
    max_steps: int = 1000
    batch_size: int = 8
    seq_len: int | None = None  # default: the model's block_size
    total_batch_tokens: int | None = None  # default: one micro-batch per process, no accumulation
    # optimisation
    optimizer: str = "adamw"  # or "adamw-scratch", the AdamW written out in optim.py
    lr: float = 6e-4
    min_lr: float | None = None  # default: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off (the norm is still logged)
    data_order: str = "random"  # random windows, or "sequential"
    # evaluation, logging, checkpoints
    eval_every: int = 250
    eval_batches: int = 20
    sample_every: int = 0  # 0: only at the end
    sample_tokens: int = 64
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True
    # machinery
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # fp32 on CPU; bf16 on CUDA when supported
    compile: bool = False
    resume: bool = False
    init_from: str | None = None  # a run dir whose weights start this run

    def validate(self) -> None:
        if not self.data:
            raise UserError("no data directory given; pass --data DIR (made by `gpt2lab prepare`)")
        if not self.out:
            raise UserError("no run directory given; pass --out DIR")
        positive = ["max_steps", "batch_size", "eval_every", "eval_batches", "log_every",
                    "checkpoint_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("seq_len", "total_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("warmup_steps", "sample_every", "sample_tokens", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise UserError(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("--weight-decay and --grad-clip must be >= 0")
        if self.optimizer not in ("adamw", "adamw-scratch"):
            raise UserError(f"--optimizer must be adamw or adamw-scratch, got {self.optimizer!r}")
        if self.data_order not in ("random", "sequential"):
            raise UserError(f"--data-order must be random or sequential, got {self.data_order!r}")
        if self.dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}; got {self.dtype!r}")
        if self.resume and self.init_from:
            raise UserError("--resume continues the run in --out; --init-from starts a new run from "
                            "another's weights: use one of them")


def load_config_file(path: str | os.PathLike, cls=None) -> dict:
    """A TOML or YAML file of TrainConfig fields (`max_steps = 100`, dashes allowed)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; check the path")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(text)
    except Exception as e:  # each parser has its own error type
        raise UserError(f"{path} cannot be parsed ({str(e).splitlines()[0]}); fix the syntax "
                        "(TOML for .toml, YAML for .yaml/.yml)") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a table of settings (key = value)")
    return coerce_settings(raw, cls or TrainConfig, str(path))


def coerce_settings(raw: dict, cls=None, source: str = "config") -> dict:
    """Check names and types of settings from a file against the dataclass `cls`.

    YAML reads `6e-4` as a string and TOML may give an int for a float; numbers
    in strings are converted, and anything else of the wrong type is an error
    naming the setting (a string "no" must never pass as a true bool).
    """
    import typing

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"{source}: unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
        args = typing.get_args(hints[name])
        kinds = [k for k in args if k is not type(None)] or [hints[name]]
        out[name] = _coerce(name, value, kinds[0], source, optional=type(None) in args)
    return out


def _coerce(name: str, value, kind: type, source: str, optional: bool):
    if value is None and optional:
        return None
    bad = UserError(f"{source}: setting {name!r} must be {kind.__name__}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: setting {name!r} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if kind is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


@dataclass
class SFTConfig(TrainConfig):
    init: str = ""  # the run dir to fine-tune (trained here or imported)
    val_data: str | None = None  # held-out records; default: a share of --data
    val_fraction: float = 0.1
    template: str = "alpaca"  # chat records always use the "chat" template
    epochs: float | None = None  # overrides max_steps when given
    lora_rank: int = 0  # 0: train all weights
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "c_attn,c_proj,c_fc"

    def validate(self) -> None:
        if not self.init:
            raise UserError("no model to fine-tune; pass --init RUN_DIR (from `gpt2lab pretrain` or "
                            "`gpt2lab import-hf`)")
        super().validate()
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.lora_rank < 0:
            raise UserError(f"--lora-rank must be >= 0, got {self.lora_rank}")
