"""Weights files: every tensor file gpt2lab reads or writes goes through here (a run's weights, a
checkpoint's, LoRA adapters, exports).

Tensors are safetensors, written atomically (gpt2lab.io: a temporary name, fsync, rename), each tensor
once (a tied LM head is the token embedding). Every name and shape is checked against the model before a
tensor is read. The one pickled file (a checkpoint's trainer state, an old Hugging Face model) is read as
tensors and plain containers only: a file from a stranger cannot run code.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.model import lora


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """A dict of tensors as safetensors, written atomically (temporary name, fsync, rename)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with io.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})


def read_tensors(path: str | os.PathLike, missing: str, corrupt: str = "the file is corrupt") -> dict:
    """A safetensors file; a missing or unreadable one is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; {missing}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as safetensors ({str(e).splitlines()[0]}); {corrupt}") from None


def load_pickle(path: str | os.PathLike, refused: str):
    """A torch.save file read as tensors and plain containers only (`weights_only`: never an arbitrary
    object or a function call, so a file from a stranger cannot run code). `refused` says why a file that
    fails was refused and what to do."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for a damaged or hostile file
        raise UserError(f"{path} {refused}") from None


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every tensor once: a tied weight (the LM head is the token embedding) is
    stored under the name it was first registered with. What a weights file holds."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def save_weights(model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                 exclude_lora: bool = False) -> None:
    """The model's tensors as safetensors, each once (a tied LM head is the embedding), atomically.
    `exclude_lora`: leave out LoRA adapters (a LoRA run's model.safetensors holds the base only)."""
    state = unique_state_dict(model)
    if exclude_lora:
        state = {k: v for k, v in state.items() if not _is_adapter(k)}
    save_tensors(state, path, metadata)


def file_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a safetensors file, from its header alone (nothing is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; the run or checkpoint is incomplete (did training finish?)")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as safetensors ({str(e).splitlines()[0]}); the file is corrupt, "
                        "use another checkpoint") from None


def check_shapes(expected: dict, found: dict, path: Path, config_name: str = "config.json") -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model in {config_name} (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); the weights and the config come from different runs")
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise UserError(f"{path}: tensor {k} has shape {tuple(found[k])}, {config_name} implies "
                            f"{tuple(shape)}; the weights and the config come from different runs")


def check_dtypes(state: dict, expected: dict, path: Path, exact: bool) -> None:
    """Weights are floating point (a tensor of integers or booleans is no weight); with `exact`, of the very
    dtype the model holds (a checkpoint resumes bitwise only from its own dtype)."""
    for k, t in state.items():
        want = expected.get(k)
        if want is None:
            continue
        if not t.dtype.is_floating_point or (exact and t.dtype != want.dtype):
            raise UserError(f"{path}: tensor {k} is {str(t.dtype).removeprefix('torch.')}, the model holds "
                            f"{str(want.dtype).removeprefix('torch.')}; the file was not written by this run, use "
                            "another checkpoint")


def load_weights(model: torch.nn.Module, path: str | os.PathLike, config_name: str = "config.json",
                 exact: bool = False) -> None:
    """Load a weights file into `model`, checking every name, shape and dtype first (LoRA adapters, which live
    in their own file, are not expected here). `exact`: the dtypes must be the model's (resuming)."""
    path = Path(path)
    shapes = file_shapes(path)
    expected = {k: tuple(v.shape) for k, v in unique_state_dict(model).items()
                if not _is_adapter(k) or k in shapes}
    check_shapes(expected, shapes, path, config_name)
    state = read_tensors(path, "the run or checkpoint is incomplete (did training finish?)",
                         "the file is corrupt, use another checkpoint")
    check_dtypes(state, unique_state_dict(model), path, exact)
    with torch.no_grad():
        for k, t in unique_state_dict(model).items():
            if k in state:
                t.copy_(state[k])


def save_lora(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write the LoRA adapters (only) to `path`; their settings go into the file's metadata too."""
    tensors = lora.lora_state_dict(model)
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    settings = getattr(model, "lora_settings", None)
    save_tensors(tensors, path, {"lora": json.dumps(settings)} if settings else None)


def load_lora(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load adapters saved by `save_lora` into a model that `apply_lora` prepared the same way."""
    path = Path(path)
    state = read_tensors(path, f"a LoRA run dir holds its adapters in {path.name}")
    expected = lora.lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path} does not fit the model's adapters (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); the rank or targets in config.json differ from the file's")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise UserError(f"{path}: adapter {k} has shape {tuple(state[k].shape)}, the model expects "
                            f"{tuple(v.shape)}; the rank in config.json differs from the file's")
    check_dtypes(state, expected, path, exact=False)
    model.load_state_dict(state, strict=False)
