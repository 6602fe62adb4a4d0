"""The run directory: the one format every command reads and writes, and its one loader.

    RUN_DIR/
      config.json          {"format": "gpt2lab-run", "version", "kind", "model", "tokenizer", "task",
                            "train", "data", and per task: "template", "lora", "labels", "head", ...}
      tokenizer.json       the tokenizer the model was trained with (its sha256 is in config.json)
      model.safetensors    the final weights (a tied tensor stored once)
      lora.safetensors     LoRA adapters, when the run trained them (model.safetensors is the base)
      metrics.jsonl        one JSON object per logged step / evaluation
      tensorboard/         event files, when tensorboard is installed
      checkpoints/step_000500/
          model.safetensors
          trainer.pt       optimizer, grad scaler and RNG states (tensors only: loaded weights_only)
          state.json       step, data position, elapsed time, the task's state

`kind` is "lm" (a language model: pretrained, SFT, imported) or "classifier". `load_run` builds
any of them: a LoRA run comes back with its adapters merged (or kept, `merge_lora=False`), a
classifier as a `GPTClassifier`. Every command that takes a run dir goes through it.

The format is versioned. Version 1 (the first gpt2lab) had no "kind"; `migrate` brings an old
config up to date when it is read, so every run dir ever written still loads.

Weights files are gpt2lab.weights' (safetensors, written atomically); the training checkpoints under
checkpoints/ are gpt2lab.train.checkpoints'.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.model import lora
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT, GPTClassifier
from gpt2lab.model.quantize import quantize as quantize_model
from gpt2lab.templates import FORMATS
from gpt2lab.tokenizer import load_tokenizer_file
from gpt2lab.weights import (
    check_shapes,
    file_shapes,
    load_lora,
    load_weights,
    save_weights,
    unique_state_dict,
)

RUN_FORMAT = "gpt2lab-run"
RUN_VERSION = 2
CONFIG_FILE = io.RUN_CONFIG
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
LORA_FILE = "lora.safetensors"
KINDS = ("lm", "classifier")


# --------------------------------------------------------------------------- run configs


def write_run_config(run_dir: str | os.PathLike, model_config: GPTConfig, *, tokenizer_identity: dict,
                     kind: str = "lm", task: str | None = None, train: dict | None = None,
                     data: dict | None = None, extra: dict | None = None) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    io.write_json(Path(run_dir) / CONFIG_FILE, {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "kind": kind,
        "task": task,
        "model": model_config.to_dict(),
        "tokenizer": tokenizer_identity,
        "train": train,
        "data": data,
        **(extra or {}),
    })


def migrate(cfg: dict) -> dict:
    """A run config of any earlier version, brought to the current one (nothing else changes)."""
    cfg = dict(cfg)
    if cfg.get("version") == 1:
        # version 1 had no "kind": a classifier said so with "task"; everything else was a language model
        cfg["kind"] = "classifier" if cfg.get("task") == "classify" else "lm"
        cfg.setdefault("task", None)
        cfg["version"] = 2
    return cfg


@dataclass
class RunInfo:
    """What a run dir's config.json says, checked."""

    path: Path
    config: dict  # the whole config.json, migrated
    model_config: GPTConfig
    kind: str  # "lm" or "classifier"
    template: str | None  # the chat format of an instruction-tuned model
    lora: dict | None  # {"rank", "alpha", "dropout", "targets"} when the run holds adapters
    labels: list[str] | None  # a classifier's classes
    head: dict | None  # a classifier's head settings

    flag: str | None = None  # the argument that named the run, for messages

    @property
    def tokenizer_sha256(self) -> str:
        return self.config["tokenizer"]["sha256"]

    def load(self, device: str | torch.device = "cpu", **kw):
        """(model, tokenizer) of this run, as `load_run` loads them (its keyword arguments), without reading
        config.json again."""
        return _load(self, device, **kw)


def _bad(run_dir: Path, what: str) -> UserError:
    return UserError(f"{run_dir / CONFIG_FILE} {what}; the run dir is damaged, train or import it again")


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run dir, checked and migrated to the current version."""
    return open_run(run_dir).config


def open_run(run_dir: str | os.PathLike, flag: str | None = None) -> RunInfo:
    """A run dir's description, every field checked; `flag` names the argument in messages."""
    run_dir = Path(run_dir)
    name = f"{flag} {run_dir}" if flag else f"run directory {run_dir}"
    if not run_dir.exists():
        raise UserError(f"{name} does not exist; train one with `gpt2lab pretrain` or import one with "
                        "`gpt2lab import-hf`")
    if not run_dir.is_dir():
        raise UserError(f"{name} is a file, not a run directory; pass the directory `gpt2lab pretrain --out` "
                        "wrote")
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"{name} is not a run directory (it has no {CONFIG_FILE}); pass a directory written "
                        "by `gpt2lab pretrain`, `finetune` or `import-hf`")
    cfg = io.read_json_object(run_dir / CONFIG_FILE, "run config", "train again or import the model again")
    if cfg.get("format") != RUN_FORMAT:
        raise UserError(f"{run_dir / CONFIG_FILE} is not a gpt2lab run config (format {cfg.get('format')!r}); "
                        "pass a directory written by `gpt2lab pretrain`")
    version = cfg.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(run_dir, f"has no valid format version ({version!r})")
    if version > RUN_VERSION:
        raise UserError(f"{run_dir / CONFIG_FILE} has run format version {version}; this gpt2lab reads "
                        f"versions up to {RUN_VERSION}: upgrade gpt2lab")
    cfg = migrate(cfg)
    try:
        model_config = GPTConfig.from_dict(cfg.get("model"))
    except UserError as e:
        raise _bad(run_dir, f"has an invalid model config ({e})") from None
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise _bad(run_dir, f"has kind {kind!r}, expected one of {', '.join(KINDS)}")
    tok = cfg.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("sha256"), str):
        raise _bad(run_dir, "has no tokenizer identity (\"tokenizer\": {\"sha256\": ...})")
    template = cfg.get("template")
    if template is not None:
        if not isinstance(template, str) or template not in FORMATS:
            raise _bad(run_dir, f"names an unknown chat format {template!r} (known: {', '.join(FORMATS)})")
    lora = _check_lora(cfg.get("lora"), run_dir) if cfg.get("lora") else None
    labels = head = None
    if kind == "classifier":
        labels, head = cfg.get("labels"), cfg.get("head")
        if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels)
                or not isinstance(head, dict) or head.get("num_classes") != len(labels)):
            raise _bad(run_dir, "is a classifier config without valid \"labels\" and \"head\" entries")
    return RunInfo(run_dir, cfg, model_config, kind, template, lora, labels, head, flag)


def _check_lora(settings, run_dir: Path) -> dict:
    try:
        rank, alpha = settings["rank"], float(settings["alpha"])
        dropout, targets = float(settings.get("dropout", 0.0)), list(settings["targets"])
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or not targets \
                or not all(isinstance(t, str) for t in targets) or not (alpha == alpha and abs(alpha) < 1e30) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError("rank must be a positive integer, alpha finite, targets a list of names")
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(run_dir, f"has a malformed \"lora\" entry ({e}); expected {{rank, alpha, dropout, targets}}") \
            from None
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}


def load_tokenizer(info: RunInfo, fast: bool = True):
    """The run's tokenizer, checked to be the one config.json names and to fit the model."""
    path = info.path / TOKENIZER_FILE
    tok = load_tokenizer_file(path, fast=fast)
    if tok.fingerprint != info.tokenizer_sha256:
        raise UserError(f"{path} is not the tokenizer this run was trained with (sha256 "
                        f"{tok.fingerprint[:12]}..., config.json says {info.tokenizer_sha256[:12]}...); put "
                        "the run's own tokenizer.json back")
    if tok.vocab_size > info.model_config.vocab_size:
        raise UserError(f"{path} has {tok.vocab_size} tokens but the model only {info.model_config.vocab_size} "
                        "rows; the run dir is inconsistent")
    return tok


def build_model(info: RunInfo) -> torch.nn.Module:
    """The empty model a run config describes (no weights loaded)."""
    if info.kind == "classifier":
        return GPTClassifier(info.model_config, len(info.labels))
    return GPT(info.model_config)


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", *, merge_lora: bool = True,
             weights: str | os.PathLike | None = None, fast_tokenizer: bool = True, kind: str | None = None,
             flag: str | None = None, dtype: str | None = None, quantize: str | None = None):
    """(model, tokenizer) of any run dir: language model or classifier, with or without LoRA adapters.

    A LoRA run's adapters are merged into the weights (`merge_lora=False` keeps them as adapters:
    then only they have requires_grad). `weights`: another weights file (a checkpoint's, which
    holds the adapters itself). `kind` ("lm" or "classifier") refuses the other kind with a message
    naming the command that takes it. The model is returned in eval mode.
    """
    return open_run(run_dir, flag).load(device, merge_lora=merge_lora, weights=weights,
                                        fast_tokenizer=fast_tokenizer, kind=kind, dtype=dtype, quantize=quantize)


def _load(info: RunInfo, device: str | torch.device = "cpu", *, merge_lora: bool = True,
          weights: str | os.PathLike | None = None, fast_tokenizer: bool = True, kind: str | None = None,
          dtype: str | None = None, quantize: str | None = None):
    """`RunInfo.load`: the run's (model, tokenizer); for inference, cast to `dtype` ("bf16") and/or with
    int8 weights (`quantize`, model/quantize.py)."""
    run_dir, flag = info.path, info.flag
    where = f"{flag} {run_dir}" if flag else str(run_dir)
    if kind == "lm" and info.kind == "classifier":
        raise UserError(f"{where} is a classifier, not a language model; use it with `gpt2lab classify`, or "
                        "pass the language model it was fine-tuned from")
    if kind == "classifier" and info.kind != "classifier":
        raise UserError(f"{where} is a language model, not a classifier; make one with "
                        "`gpt2lab finetune classify --init RUN_DIR ...`")
    tokenizer = load_tokenizer(info, fast_tokenizer)
    # the weights file's header against the config before anything is allocated: a config.json that asks for an
    # absurd size is refused here, not after minutes of allocation
    path = Path(weights) if weights is not None else info.path / WEIGHTS_FILE
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in unique_state_dict(build_model(info)).items()}
    found = {k: v for k, v in file_shapes(path).items() if not k.endswith((".lora_A", ".lora_B"))}
    check_shapes(shapes, found, path)
    model = build_model(info)
    if info.lora is not None:
        lora.apply_lora(model, info.lora["rank"], info.lora["alpha"], info.lora["dropout"],
                        info.lora["targets"], freeze=False)
    if weights is not None:
        load_weights(model, weights)
    else:
        load_weights(model, info.path / WEIGHTS_FILE)
        if info.lora is not None:
            load_lora(model, info.path / LORA_FILE)
    if info.lora is not None:
        if merge_lora:
            lora.merge_lora(model)
        else:
            lora.freeze_all_but_adapters(model)
    model = model.to(device).eval()
    if dtype == "bf16":  # fast on GPUs, and on CPUs with AVX512-BF16 or AMX
        model = model.to(torch.bfloat16)
    if quantize is not None:
        model = quantize_model(model, quantize)
    return model, tokenizer


def write_merged_run(run_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `out`: the LoRA run in `run_dir` with its adapters folded into the weights, an ordinary run dir."""
    run_dir, out = Path(run_dir), Path(out)
    info = open_run(run_dir)
    if info.lora is None:
        raise UserError(f"{run_dir} has no LoRA adapters (no \"lora\" entry in config.json); "
                        "it is already an ordinary run dir")
    io.check_output_dir(out, "run", overwrite=overwrite, flag="--out", inputs=[run_dir])
    if io.dir_kind(out) == "run" and "merged_lora" not in open_run(out).config:
        raise UserError(f"--out {out} holds a run that merge-lora did not write; --overwrite only replaces an "
                        "earlier merged run, choose another --out")
    model, tokenizer = load_run(run_dir, merge_lora=True)
    merged = {k: v for k, v in info.config.items() if k != "lora"}
    merged["merged_lora"] = {"from": str(run_dir.resolve()), **info.lora}
    with io.staging(out) as tmp:
        tokenizer.save(tmp)
        for extra in ("results.json", "metrics.jsonl"):
            if (run_dir / extra).is_file():
                shutil.copyfile(run_dir / extra, tmp / extra)
        save_weights(model, tmp / WEIGHTS_FILE)
        io.write_json(tmp / CONFIG_FILE, merged)
        io.publish(tmp, out)
    return out


__all__ = ["CONFIG_FILE", "LORA_FILE", "RUN_VERSION", "RunInfo", "TOKENIZER_FILE", "WEIGHTS_FILE", "build_model",
           "load_run", "load_tokenizer", "migrate", "open_run", "read_run_config", "write_merged_run",
           "write_run_config"]
