"""Training configurations: typed dataclasses that defaults, config files and flags all set.

    LoopConfig       the loop's settings, shared by every task (steps, batch, optimiser, schedule,
                     evaluation, checkpoints, device)
    TrainConfig      pretraining: + data, model preset, --init-from, data order, and every model field
    SFTConfig        instruction fine-tuning: + --init, records, chat format, LoRA
    ClassifyConfig   classification: + --init, data files and splits, what trains, LoRA

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

import math
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from gpt2lab.errors import UserError
from gpt2lab.model_config import PRESETS, STARTING_RUN_FIELDS, model_fields

DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw-scratch", "muon")
SCHEDULES = ("cosine", "constant")
# model fields that may differ from the starting run when fine-tuning (the rest come from it)
FINETUNE_MODEL_FIELDS = STARTING_RUN_FIELDS


def opt(default, help: str, *, choices=None, check=None, resumable: bool = False, **meta):
    """A config field. `check`: (predicate, "what it must be"); `resumable`: may change on --resume."""
    metadata = {"help": help, "choices": choices, "check": check, "resumable": resumable, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _finite(lo=None, hi=None, lo_open=False, hi_open=False):
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
FRACTION = _finite(0, 1, hi_open=True)
BETA = _finite(0, 1, hi_open=True)


@dataclass
class LoopConfig:
    out: str = opt("", "the run directory to write (config, weights, metrics, checkpoints)", resumable=True)
    max_steps: int = opt(1000, "optimizer steps to train for; on --resume a larger value extends the run (the "
                         "schedule is recomputed for the new length from the resumed step on)",
                         check=POSITIVE, resumable=True)
    epochs: float | None = opt(None, "passes over the training data; when given it sets --max-steps",
                               check=_finite(0, lo_open=True))
    time_budget: float | None = opt(None, "train for about this many seconds: the first steps are timed and the "
                                    "run's length (and so its schedule) is set to fit", check=_finite(0, lo_open=True))
    batch_size: int = opt(8, "sequences per micro-batch, per process", check=POSITIVE)
    seq_len: int | None = opt(None, "tokens per sequence (default: the model's context length)", check=POSITIVE)
    total_batch_tokens: int | None = opt(None, "tokens per optimizer step; gradient accumulation is derived "
                                         "from it (default: one micro-batch per process)", check=POSITIVE)
    optimizer: str = opt("adamw", "adamw (torch's, fused on CUDA), adamw-scratch (written out in gpt2lab/optim.py), "
                         "or muon (Muon for the blocks' matrices at --muon-lr, AdamW for the rest at --lr)",
                         choices=OPTIMIZERS)
    muon_lr: float = opt(0.02, "Muon's peak learning rate (--optimizer muon); warmup and decay follow --lr's",
                         check=_finite(0, 10, lo_open=True))
    muon_momentum: float = opt(0.95, "Muon's momentum (Nesterov)", check=_finite(0, 1, hi_open=True))
    lr: float = opt(6e-4, "peak learning rate", check=_finite(0, 10, lo_open=True))
    min_lr: float | None = opt(None, "learning rate at the end of the cosine decay (default: lr / 10)",
                               check=_finite(0, 10))
    lr_schedule: str = opt("cosine", "cosine (warmup, then cosine decay to --min-lr) or constant (warmup, "
                           "then --lr)", choices=SCHEDULES)
    warmup_steps: int = opt(100, "steps of linear warmup", check=NONNEG)
    weight_decay: float = opt(0.1, "AdamW weight decay, applied to matrices only", check=_finite(0, 100))
    decay_embeddings: bool = opt(False, "apply weight decay to the embeddings too")
    beta1: float = opt(0.9, "AdamW beta1", check=BETA)
    beta2: float = opt(0.95, "AdamW beta2", check=BETA)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping; the norm is logged)",
                           check=_finite(0, 1e6))
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
    dtype: str = opt("auto", "auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16", choices=DTYPE_NAMES,
                     resumable=True)
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


@with_model_fields(FINETUNE_MODEL_FIELDS)
class SFTConfig(LoopConfig):
    """`gpt2lab finetune sft`."""

    init: str = opt("", "the run dir to fine-tune (from `gpt2lab pretrain` or `gpt2lab import-hf`; a LoRA "
                    "run starts from its merged weights)")
    data: str = opt("", "instruction records: Alpaca JSON/JSONL (instruction, input, output) or chat JSONL "
                    "(messages)")
    val_data: str | None = opt(None, "held-out records (default: every k-th record of --data, "
                               "k = 1/--val-fraction)")
    val_fraction: float = opt(0.1, "share of --data held out when --val-data is not given", check=FRACTION)
    template: str = opt("alpaca", "chat format of the run: alpaca or chat (data holding any chat record "
                        "uses chat)", choices=("alpaca", "chat"))
    lora_rank: int = opt(0, "train LoRA adapters of this rank instead of all weights (0: off)", check=NONNEG)
    lora_alpha: float = opt(16.0, "LoRA scale numerator (the update is alpha/rank * B A)",
                            check=_finite(0, lo_open=True))
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", check=FRACTION)
    lora_targets: str = opt("all", "comma-separated layers to adapt: all (every linear layer of the blocks), "
                            "c_attn, c_proj, c_fc, attn, mlp, h.N, or any layer's name")
    lr: float = opt(1e-4, "peak learning rate", check=_finite(0, 10, lo_open=True))
    warmup_steps: int = opt(20, "steps of linear warmup", check=NONNEG)
    eval_every: int | None = opt(100, "evaluate every N steps (and at the end)", check=POSITIVE, resumable=True)
    seq_len: int | None = opt(None, "tokens per example, prompt and response together (default: the model's "
                              "context)", check=POSITIVE)

    def validate(self) -> None:
        if not self.init:
            raise UserError("no model to fine-tune; pass --init RUN_DIR (from `gpt2lab pretrain` or "
                            "`gpt2lab import-hf`)")
        if not self.data:
            raise UserError("no instruction data given; pass --data FILE (.json or .jsonl records)")
        super().validate()


TRAIN_MODES = ("all", "last-blocks", "head", "lora")


@with_model_fields(FINETUNE_MODEL_FIELDS)
class ClassifyConfig(LoopConfig):
    """`gpt2lab finetune classify`."""

    init: str = opt("", "the run dir to start from (a language model; a LoRA run's adapters are merged)")
    data: str | None = opt(None, "one file, split into train/val/test here")
    train: str | None = opt(None, "the training split (instead of --data)")
    val: str | None = opt(None, "the validation split (with --train)")
    test: str | None = opt(None, "the test split (with --train)")
    format: str | None = opt(None, "csv, tsv or jsonl (default: from the file extension)",
                             choices=("csv", "tsv", "jsonl"))
    text_field: str = opt("text", "the column or field holding the text")
    label_field: str = opt("label", "the column or field holding the label")
    columns: list[str] | None = opt(None, "column names of a CSV/TSV without a header line, e.g. label,text")
    labels: list[str] | None = opt(None, "the classes in id order (default: sorted, numerically when all are "
                                   "integers)")
    val_fraction: float = opt(0.1, "with --data: the validation share", check=_finite(0, 1, hi_open=True))
    test_fraction: float = opt(0.2, "with --data: the test share", check=_finite(0, 1, hi_open=True))
    balance: bool = opt(False, "downsample every class to the smallest's size")
    max_length: int | None = opt(None, "truncate texts to this many tokens (default: the longest training "
                                 "text, at most the model's context)", check=POSITIVE)
    train_mode: str = opt("last-blocks", "what trains: all, last-blocks (the last N blocks + final LayerNorm + "
                          "head), head, or lora (adapters + head)", choices=TRAIN_MODES)
    last_blocks: int = opt(1, "N for --train-mode last-blocks", check=POSITIVE)
    lora_rank: int = opt(8, "LoRA rank r (--train-mode lora)", check=POSITIVE)
    lora_alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha/r", check=_finite(0, lo_open=True))
    lora_dropout: float = opt(0.0, "dropout on the adapters' input", check=_finite(0, 1, hi_open=True))
    lora_targets: str = opt("all", "layers to adapt: all (every linear layer of the blocks), c_attn, c_proj, "
                            "c_fc, attn.c_proj, mlp.c_proj, attn, mlp, h.N")
    random_init: bool = opt(False, "a baseline: keep --init's architecture and tokenizer but start from random "
                            "weights")
    keep_best: bool = opt(True, "keep the weights of the epoch with the best validation accuracy (else the last)")
    # the loop's settings, with classification's defaults
    epochs: float | None = opt(5.0, "passes over the training data; when given it sets --max-steps",
                               check=_finite(0, lo_open=True))
    batch_size: int = opt(8, "examples per micro-batch, per process", check=POSITIVE)
    lr: float = opt(5e-5, "AdamW learning rate", check=_finite(0, 10, lo_open=True))
    lr_schedule: str = opt("constant", "constant (after the warmup) or cosine", choices=("cosine", "constant"))
    warmup_steps: int = opt(0, "steps of linear warmup", check=(lambda v: isinstance(v, int) and v >= 0,
                                                                "an integer >= 0"))
    beta2: float = opt(0.999, "AdamW beta2", check=_finite(0, 1, hi_open=True))
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0: no clipping)", check=_finite(0, 1e6))
    eval_every: int | None = opt(None, "evaluate every N steps (default: once per epoch)", check=POSITIVE,
                                 resumable=True)
    checkpoint_every: int | None = opt(None, "write a checkpoint every N steps (default: at every evaluation)",
                                       check=POSITIVE, resumable=True)
    sample_tokens: int = opt(0, "unused by classification", resumable=True)
    seed: int = opt(123, "seed of the splits, the head and the batch order",
                    check=(lambda v: isinstance(v, int) and 0 <= v < 2**63, "an integer from 0 to 2**63 - 1"))

    def validate(self) -> None:
        if not self.init:
            raise UserError("no model to start from; pass --init RUN_DIR")
        if (self.data is None) == (self.train is None):
            raise UserError("give the data as --data FILE (split here) or as --train FILE [--val FILE "
                            "--test FILE], not both and not neither")
        if self.data is not None and (self.val or self.test):
            raise UserError("--val/--test go with --train; with --data the splits are made from "
                            "--val-fraction and --test-fraction")
        super().validate()
        if self.strategy == "fsdp":
            raise UserError("--strategy fsdp is for pretrain and finetune sft; a classifier trains with ddp")
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError(f"--val-fraction {self.val_fraction} and --test-fraction {self.test_fraction} "
                            "must leave some examples to train on")

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]



@with_model_fields(("dropout",))
class RLConfig(LoopConfig):
    """`gpt2lab finetune rl`."""

    init: str = opt("", "the run dir to tune (an instruction-tuned model, usually: it should already answer in "
                    "its chat format, with a pass rate between about 0.2 and 0.7)")
    task: str | None = opt(None, "a built-in checkable task: arithmetic or countdown",
                           choices=("arithmetic", "countdown"))
    difficulty: int = opt(1, "the built-in task's difficulty, 1 to 5", check=POSITIVE)
    prompts: str | None = opt(None, "your own task: a JSONL file of records with \"prompt\" (and any other "
                              "fields), with --reward")
    reward: str | None = opt(None, "your own task's reward: PATH.py:FUNCTION, called as FUNCTION(prompt, "
                             "completion, record) -> float")
    format_reward: float = opt(0.0, "built-in tasks: the reward of a well-formed but wrong answer (partial credit)",
                               check=_finite(0, 1, hi_open=True))
    group_size: int = opt(8, "samples per prompt; their rewards are compared with each other", check=POSITIVE)
    batch_size: int = opt(4, "prompts per micro-batch, per process (each sampled --group-size times)",
                          check=POSITIVE)
    max_new_tokens: int = opt(64, "the longest answer sampled", check=POSITIVE)
    temperature: float = opt(1.0, "sampling temperature of the answers", check=_finite(0, 10, lo_open=True))
    scale_advantages: bool = opt(False, "divide each group's advantages by its standard deviation (GRPO); off: "
                                 "mean-centred only")
    kl: float = opt(0.0, "the weight of a KL penalty to the starting model (0: none; the KL is logged anyway)",
                    check=_finite(0, 100))
    clip: float = opt(0.2, "ratio clipping when samples serve more than one update", check=_finite(0, 10, lo_open=True))
    updates_per_batch: int = opt(1, "optimizer steps on each batch of samples (above 1: the clipped ratio matters)",
                                 check=POSITIVE)
    eval_prompts: int = opt(64, "held-out prompts scored greedily (pass@1) at each evaluation", check=POSITIVE)
    lr: float = opt(1e-5, "peak learning rate", check=_finite(0, 10, lo_open=True))
    lr_schedule: str = opt("constant", "constant (after the warmup) or cosine", choices=SCHEDULES)
    warmup_steps: int = opt(0, "steps of linear warmup", check=NONNEG)
    max_steps: int = opt(200, "optimizer steps", check=POSITIVE, resumable=True)
    eval_every: int | None = opt(20, "evaluate every N steps (and at the end)", check=POSITIVE, resumable=True)
    checkpoint_every: int | None = opt(20, "write a checkpoint every N steps (and at the end)", check=POSITIVE,
                                       resumable=True)
    log_every: int = opt(1, "print and record metrics every N steps", check=POSITIVE, resumable=True)
    sample_tokens: int = opt(0, "unused by RL", resumable=True)
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only", check=_finite(0, 100))

    def validate(self) -> None:
        if not self.init:
            raise UserError("no model to tune; pass --init RUN_DIR (an instruction-tuned run, usually)")
        if (self.task is None) == (self.prompts is None):
            raise UserError("give a built-in --task (arithmetic, countdown) or your own --prompts FILE.jsonl with "
                            "--reward PATH.py:FUNCTION, one of the two")
        if (self.prompts is None) != (self.reward is None):
            raise UserError("--prompts and --reward go together: the prompts of your task and its reward function")
        if self.strategy == "fsdp":
            raise UserError("--strategy fsdp is for pretrain and finetune sft; RL trains with ddp")
        super().validate()


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
    from gpt2lab import io

    path = Path(path)
    text = io.read_text(path, "config file", "pass a TOML or YAML file with --config")
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
    cls = cls or TrainConfig
    types = field_types(cls)
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in types:
            raise UserError(f"{source}: unknown setting {key!r}; known settings: {', '.join(sorted(types))}")
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
