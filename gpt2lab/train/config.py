"""Training configurations: typed dataclasses that defaults, config files and flags all set.

    LoopConfig       the loop's settings, shared by every task (steps, batch, optimiser, schedule,
                     evaluation, checkpoints, device)
    TrainConfig      pretraining: + data, model preset, --init-from, data order, and every model field

The fine-tuning configs (SFT, classification, RL) extend LoopConfig in gpt2lab.finetune.config.

Every field carries its help text, its allowed values and its check, so flags, `--help`, config
files and validation come from one place. The model fields are not listed here: they are added
from `GPTConfig` (`model_fields`), so a new architecture option is a flag of `pretrain` the moment
it is a field of the model.

Precedence: the defaults here, then a TOML or YAML file (`--config run.toml`, the same names as
the flags, with `_` or `-`), then the command-line flags. On `--resume`, the run's stored settings
replace the defaults and the file; a given setting that differs from the stored one is refused
unless it is one that may change on resume (`resumable` in its metadata). This module imports no
torch, so that `gpt2lab pretrain --help` is instant.
"""

from __future__ import annotations

import difflib
import math
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
import yaml

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.model.config import PRESETS, model_fields

DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw-scratch", "muon")
SCHEDULES = ("cosine", "constant")


def opt(default, help: str, *, choices=None, check=None, resumable: bool = False, **meta):
    """A config field. `check`: (predicate, "what it must be"); `resumable`: may change on --resume."""
    metadata = {"help": help, "choices": choices, "check": check, "resumable": resumable, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def finite_range(lo=None, hi=None, lo_open=False, hi_open=False):
    def ok(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    what = f"a finite number in {lo_s}, {hi_s}" if lo is not None and hi is not None else \
        f"a finite number {'>' if lo_open else '>='} {lo:g}" if lo is not None else "a finite number"
    return ok, what


POSITIVE = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
NONNEG = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
SEED = (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
        "an integer from 0 to 2**63 - 1")
FRACTION = finite_range(0, 1, hi_open=True)
BETA = finite_range(0, 1, hi_open=True)


@dataclass
class LoopConfig:
    DEFAULT_EPOCHS = None  # a task whose length is passes over its data: the passes when neither is given

    out: str = opt("", "the run directory to write (config, weights, metrics, checkpoints)", resumable=True)
    max_steps: int = opt(1000, "optimizer steps to train for; on --resume a larger value extends the run (the "
                         "schedule is recomputed for the new length from the resumed step on)",
                         check=POSITIVE, resumable=True)
    epochs: float | None = opt(None, "passes over the training data; when given it sets --max-steps",
                               check=finite_range(0, lo_open=True))
    time_budget: float | None = opt(None, "train for about this many seconds: the first steps are timed and the "
                                    "run's length (and so its schedule) is set to fit",
                                    check=finite_range(0, 1e8, lo_open=True))
    batch_size: int = opt(8, "sequences per micro-batch, per process (may change on --resume, with the number of "
                          "processes: the tokens per step stay the run's, the accumulation follows)", check=POSITIVE,
                          resumable=True)
    seq_len: int | None = opt(None, "tokens per sequence (default: the model's context length)", check=POSITIVE)
    total_batch_tokens: int | None = opt(None, "tokens per optimizer step; gradient accumulation is derived "
                                         "from it (default: one micro-batch per process)", check=POSITIVE)
    optimizer: str = opt("adamw", "adamw (torch's, fused on CUDA), adamw-scratch (written out in "
                         "gpt2lab/train/optim.py), or muon (Muon for the blocks' matrices at --muon-lr, AdamW for the "
                         "rest at --lr)",
                         choices=OPTIMIZERS)
    muon_lr: float = opt(0.02, "Muon's peak learning rate (--optimizer muon); warmup and decay follow --lr's",
                         check=finite_range(0, 10, lo_open=True))
    muon_momentum: float = opt(0.95, "Muon's momentum (Nesterov)", check=finite_range(0, 1, hi_open=True))
    lr: float = opt(6e-4, "peak learning rate", check=finite_range(0, 10, lo_open=True))
    min_lr: float | None = opt(None, "learning rate at the end of the cosine decay (default: lr / 10)",
                               check=finite_range(0, 10))
    lr_schedule: str = opt("cosine", "cosine (warmup, then cosine decay to --min-lr) or constant (warmup, "
                           "then --lr)", choices=SCHEDULES)
    warmup_steps: int = opt(100, "steps of linear warmup", check=NONNEG)
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrices only", check=finite_range(0, 100))
    decay_embeddings: bool = opt(False, "apply weight decay to the embeddings too")
    beta1: float = opt(0.9, "AdamW beta1", check=BETA)
    beta2: float = opt(0.95, "AdamW beta2", check=BETA)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping; the norm is logged)",
                           check=finite_range(0, 1e6))
    eval_every: int | None = opt(250, "evaluate every N steps (and at the end)", check=POSITIVE, resumable=True)
    eval_batches: int = opt(20, "validation batches per evaluation", check=POSITIVE, resumable=True)
    sample_every: int = opt(0, "print a text sample every N steps (0: only at the end)", check=NONNEG,
                            resumable=True)
    sample_tokens: int = opt(64, "tokens per sample (0: no samples)", check=NONNEG, resumable=True)
    log_every: int = opt(10, "print and record metrics every N steps", check=POSITIVE, resumable=True)
    checkpoint_every: int | None = opt(500, "write a checkpoint every N steps (and at the end)", check=POSITIVE,
                                       resumable=True)
    keep_checkpoints: int = opt(2, "how many of the newest checkpoints to keep (0: keep all of them)",
                                check=NONNEG, resumable=True)
    tensorboard: bool = opt(True, "write TensorBoard event files (when tensorboard is installed)",
                            resumable=True)
    seed: int = opt(1337, "random seed (weights, data order, dropout, samples)", check=SEED)
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps", resumable=True)
    dtype: str = opt("auto", "auto (bf16 on CUDA and on CPUs with native bf16: AMX or AVX512-BF16; fp32 "
                     "elsewhere), fp32, bf16 or fp16", choices=DTYPE_NAMES, resumable=True)
    compile: bool = opt(False, "compile the model with torch.compile", resumable=True)
    strategy: str = opt("ddp", "how several processes (torchrun) share the work: ddp (each holds the whole model) "
                        "or fsdp (weights, gradients and optimizer state sharded; FSDP2)", choices=("ddp", "fsdp"))
    activation_checkpointing: bool = opt(False, "keep only each block's input during the forward pass and "
                                         "recompute the rest in the backward (less memory, ~30% more compute)",
                                         resumable=True)
    resume: bool = opt(False, "continue the run in --out from its newest checkpoint, with its stored settings",
                       resumable=True)

    def validate(self) -> None:
        if not self.out:
            raise UserError("no run directory given; pass --out DIR")
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            kind = _base_type(hints[f.name])
            choices, check = f.metadata.get("choices"), f.metadata.get("check")
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"{flag(f.name)} must be a number, got {value!r}")
            if kind is bool and not isinstance(value, bool):
                raise UserError(f"{flag(f.name)} must be true or false, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise UserError(f"{flag(f.name)} must be text, got {value!r}")
            if choices and value not in choices:
                raise UserError(f"{flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")
            if check and not check[0](value):
                raise UserError(f"{flag(f.name)} must be {check[1]}, got {value!r}")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise UserError(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if self.strategy == "fsdp" and self.optimizer == "muon":
            raise UserError("--optimizer muon works with --strategy ddp (Muon needs each matrix whole)")
        if self.strategy == "fsdp" and self.dtype == "fp16":
            raise UserError("--strategy fsdp trains in fp32 or bf16; use --dtype bf16 (or fp32)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def with_model_fields(names: tuple[str, ...] | None = None):
    """Add the model fields of GPTConfig (all of them, or `names`) to a config class, as optional
    overrides: None keeps the value of the preset or of the run the model comes from."""

    def deco(cls):
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for f in model_fields():
            if names is not None and f.name not in names:
                continue
            annotations[f.name] = f"{f.type} | None"
            help_text = f.metadata["help"] + (" (default: the preset's)" if names is None else
                                              " (default: the starting run's)")
            setattr(cls, f.name, field(default=None, metadata={"help": help_text, "model": True,
                                                               "choices": f.metadata.get("choices")}))
        cls.__annotations__ = annotations
        return dataclass(cls)

    return deco


@with_model_fields()
class TrainConfig(LoopConfig):
    """`gpt2lab pretrain`."""

    data: str = opt("", "data directory made by `gpt2lab prepare` (on --resume: the run's own, by default)")
    model: str = opt("gpt2", "model preset", choices=tuple(PRESETS))
    init_from: str | None = opt(None, "start from the weights of this run directory (merged, for a LoRA run)")
    data_order: str = opt("random", "random: every epoch a new permutation of the windows; sequential: in order",
                          choices=("random", "sequential"))
    doc_mask: bool = opt(False, "keep the documents packed into a row apart: no attention across <|endoftext|>, "
                         "positions that restart at each document")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UserError("no data directory given; pass --data DIR (made by `gpt2lab prepare`)")
        if self.resume and self.init_from:
            raise UserError("--resume continues the run in --out; --init-from starts a new run from "
                            "another's weights: use one of them")


# ------------------------------------------------------------------------------ types


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return typing.get_origin(base) or base


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in fields(cls)}


def defaults(cls) -> dict:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def load_config_file(path: str | os.PathLike, cls=None) -> dict:
    """A TOML or YAML file of settings of `cls` (`max_steps = 100`, dashes allowed), type-checked."""
    path = Path(path)
    text = io.read_text(path, "config file", "pass a TOML or YAML file with --config")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
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
    cls = cls or TrainConfig
    types = field_types(cls)
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in types:
            close = difflib.get_close_matches(name, list(types), n=1, cutoff=0.7)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"{source}: unknown setting {key!r}; {hint}known settings: {', '.join(sorted(types))}")
        optional = type(None) in typing.get_args(hints[name])
        out[name] = _coerce(name, value, types[name], source, optional)
    return out


def _coerce(name: str, value, kind: type, source: str, optional: bool):
    if value is None and optional:
        return None
    bad = UserError(f"{source}: setting {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
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
    if kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    return value


def build(cls, values: dict):
    """`cls(**values)`, with a bad name reported as a user error."""
    try:
        return cls(**values)
    except TypeError as e:
        raise UserError(f"bad training config: {e}") from None


def stored_settings(cls, stored: dict | None) -> dict:
    """The settings of `cls` a run's config.json recorded under "train" (older names mapped)."""
    out = {}
    if not isinstance(stored, dict):
        return out
    if hasattr(cls, "migrate_stored"):
        stored = cls.migrate_stored(stored)
    types = field_types(cls)
    for name, value in stored.items():
        if name not in types:
            continue
        if name == "dtype":  # version 1 stored the resolved dtype
            value = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(value, value)
        try:
            out[name] = _coerce(name, value, types[name], "config.json", True)
        except UserError:
            continue
    return out


def merge_for_resume(cls, stored: dict | None, given: dict) -> dict:
    """The settings of a resumed run: the stored ones, with the given ones that may change on resume.

    A given setting that differs from the stored value and may not change is a UserError naming it.
    """
    values = {**defaults(cls), **stored_settings(cls, stored)}
    meta = {f.name: f.metadata for f in fields(cls)}
    for name, value in given.items():
        if name not in values or values[name] == value or meta[name].get("resumable"):
            values[name] = value
            continue
        if meta[name].get("model") and value is not None and values[name] is None:
            values[name] = value  # checked against the stored model by the trainer
            continue
        raise UserError(f"{flag(name)} {value} differs from the run being resumed ({values[name]}); a resumed "
                        f"run keeps its settings: drop {flag(name)}, or start a new run with another --out")
    values["resume"] = True
    return values


def explicit_settings(cfg) -> dict:
    """The settings of a config object that differ from its class's defaults (what a Python caller set)."""
    base = defaults(type(cfg))
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != base.get(f.name)}


def model_overrides(cfg) -> dict:
    """The model fields a config sets (None: keep the preset's / the starting run's)."""
    return {f.name: getattr(cfg, f.name) for f in model_fields() if getattr(cfg, f.name, None) is not None}
