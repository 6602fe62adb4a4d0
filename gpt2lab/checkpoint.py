"""The run directory: the one format every command reads and writes.

    RUN_DIR/
      config.json          {"format": "gpt2lab-run", "model", "train", "tokenizer", "data"}
      tokenizer.json       the tokenizer the model was trained with
      model.safetensors    the final weights (the LM head is tied to wte and stored once)
      metrics.jsonl        one JSON object per logged step / evaluation
      tensorboard/         event files, when tensorboard is installed
      checkpoints/step_000500/
          model.safetensors
          trainer.pt       optimizer, grad scaler and RNG states (tensors only: loaded weights_only)
          state.json       step, data loader position, elapsed time

Everything is written atomically (a temporary name, then a rename), so an
interrupted command leaves the previous good state and never a half-written
file. Weights are safetensors; the one torch.save file holds only tensors and
plain containers and is read with `weights_only=True`: a checkpoint from a
stranger cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2lab.errors import UserError
from gpt2lab.model import GPT, GPTConfig

RUN_FORMAT = "gpt2lab-run"
RUN_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")
TIED = ("lm_head.weight",)  # same tensor as transformer.wte.weight


# ------------------------------------------------------------------ small atomic writers


def write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str, fix: str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the {what} is corrupt, {fix}") from None


# ----------------------------------------------------------------------------- weights


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """safetensors, written atomically (temporary name, fsync, rename)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_tensors(path: str | os.PathLike, missing: str,
                 corrupt: str = "the file is corrupt") -> dict[str, torch.Tensor]:
    """A safetensors file; a missing or unreadable one is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; {missing}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as safetensors ({e}); {corrupt}") from None


def save_weights(model: GPT, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """The model's state dict as safetensors, the tied LM head left out, written atomically."""
    save_tensors({k: v for k, v in model.state_dict().items() if k not in TIED}, path, metadata)


def load_weights(model: GPT, path: str | os.PathLike) -> None:
    path = Path(path)
    state = read_tensors(path, "the run or checkpoint is incomplete",
                         "the file is corrupt, use another checkpoint")
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in TIED}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model in config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); the weights and config come from different runs")
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise UserError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}, the config "
                            f"expects {tuple(shape)}")
    model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- run dirs


def write_run_config(run_dir: str | os.PathLike, model_config: GPTConfig, *, tokenizer_identity: dict,
                     train: dict | None = None, data: dict | None = None, extra: dict | None = None) -> None:
    write_json(Path(run_dir) / CONFIG_FILE, {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "model": model_config.to_dict(),
        "tokenizer": tokenizer_identity,
        "train": train,
        "data": data,
        **(extra or {}),
    })


def read_run_config(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; train one with `gpt2lab pretrain` "
                        "or import one with `gpt2lab import-hf`")
    cfg = read_json(run_dir / CONFIG_FILE, "run config",
                    "train again or pass the directory that `gpt2lab pretrain --out` wrote")
    if cfg.get("format") != RUN_FORMAT:
        raise UserError(f"{run_dir / CONFIG_FILE} is not a gpt2lab run config (format "
                        f"{cfg.get('format')!r}); pass a directory written by `gpt2lab pretrain`")
    if cfg.get("version") != RUN_VERSION:
        raise UserError(f"{run_dir / CONFIG_FILE} has run format version {cfg.get('version')}; this "
                        f"gpt2lab reads version {RUN_VERSION}")
    return cfg


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu", weights: str | None = None,
             fast_tokenizer: bool = True):
    """(model, tokenizer) from a run dir; `weights` picks another safetensors file (a checkpoint's)."""
    from gpt2lab.tokenizer import load_tokenizer_file

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if cfg.get("task") == "classify":
        raise UserError(f"{run_dir} is a classifier, not a language model; use `gpt2lab classify {run_dir}`")
    if cfg.get("lora") and weights is None:
        # base weights plus adapters: fold them in for inference
        from gpt2lab.finetune.lora import load_lora_run

        return load_lora_run(run_dir, device=device, merge=True, fast_tokenizer=fast_tokenizer)
    try:
        model_config = GPTConfig.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{run_dir / CONFIG_FILE} has an invalid model config ({e})") from None
    tokenizer = load_tokenizer_file(run_dir / TOKENIZER_FILE, fast=fast_tokenizer)
    model = GPT(model_config)
    load_weights(model, weights or (run_dir / WEIGHTS_FILE))
    return model.to(device).eval(), tokenizer


# -------------------------------------------------------------------------- checkpoints


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are not checkpoints)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: GPT, trainer_state: dict, state: dict,
                    keep: int) -> Path:
    """Write checkpoints/step_N as a whole (temporary dir + rename), then keep the newest `keep`."""
    final = checkpoint_path(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / WEIGHTS_FILE)
    with open(tmp / "trainer.pt.tmp", "wb") as f:
        torch.save(trainer_state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp / "trainer.pt.tmp", tmp / "trainer.pt")
    write_json(tmp / "state.json", state)
    if final.exists():  # a re-run of the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Remove what an interrupted save left behind (never a complete checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(trainer_state, state) of a checkpoint dir; the weights are loaded by `load_weights`."""
    path = Path(path)
    state = read_json(path / "state.json", "checkpoint state", "resume from an earlier checkpoint "
                      "(delete this one)")
    trainer_file = path / "trainer.pt"
    if not trainer_file.is_file():
        raise UserError(f"{trainer_file} does not exist; the checkpoint is incomplete, delete it to "
                        "resume from an earlier one")
    try:
        trainer_state = torch.load(trainer_file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or hostile file
        raise UserError(f"{trainer_file} cannot be loaded ({str(e).splitlines()[0]}); the checkpoint is "
                        "corrupt, delete it to resume from an earlier one") from None
    return trainer_state, state


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is what matters
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
