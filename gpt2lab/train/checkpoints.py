"""Training checkpoints: RUN_DIR/checkpoints/step_NNNNNN, each a whole directory written under a temporary
name and renamed, holding everything the next step depends on.

    checkpoints/step_000500/
        model.safetensors   the weights (or sharded/, the FSDP shards of torch.distributed.checkpoint)
        trainer.pt          optimizer, grad scaler and RNG states (tensors only: loaded weights_only)
        state.json          step, data position, elapsed time, the task's state
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from gpt2lab import io
from gpt2lab.checkpoint import WEIGHTS_FILE
from gpt2lab.errors import UserError
from gpt2lab.weights import load_pickle, save_weights

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are not checkpoints)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


SHARDED = "sharded"  # a checkpoint's directory of FSDP shards (torch.distributed.checkpoint)


def sharded_staging(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the processes of an FSDP run write a checkpoint's shards before rank 0 completes it."""
    final = checkpoint_path(run_dir, step)
    return final.with_name(f".{final.name}.tmp-sharded")


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module | None, trainer_state: dict,
                    state: dict, keep: int, staged: Path | None = None) -> Path:
    """Write checkpoints/step_N as a whole (temporary dir + rename), then keep the newest `keep`.

    `staged`: a temporary directory that already holds the shards every process wrote (FSDP); `model` is
    then None and the weights are those shards."""
    final = checkpoint_path(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    with io.staging(final) as tmp:
        if staged is not None:
            tmp = staged
        else:
            save_weights(model, tmp / WEIGHTS_FILE)
        with io.atomic_file(tmp / "trainer.pt", "wb") as f:
            torch.save(trainer_state, f)
        io.write_json(tmp / "state.json", state)
        if final.exists():  # a re-run of the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
    io.fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Remove what interrupted writes left behind (never a complete checkpoint). Called by rank 0 before the
    run's processes write anything."""
    io.remove_stale_temps(Path(run_dir) / CHECKPOINTS)
    io.remove_stale_temps(run_dir)
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".step_*.tmp-sharded"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(trainer_state, state) of a checkpoint dir; the weights are loaded by `load_weights`."""
    path = Path(path)
    fix = "delete it to resume from an earlier one"
    state = io.read_json_object(path / "state.json", "checkpoint state", fix)
    trainer_file = path / "trainer.pt"
    if not trainer_file.is_file():
        raise UserError(f"{trainer_file} does not exist; the checkpoint is incomplete, {fix}")
    trainer_state = load_pickle(trainer_file, "cannot be loaded as tensors only: it is damaged or holds other "
                                f"objects; {fix}")
    return trainer_state, state


