"""Exact resume: what a checkpoint holds besides the weights, written and read back.

A checkpoint holds everything the next step depends on: the weights, the optimizer's moments, the
gradient scaler, every process's random state, the data position, the task's state, the step, the time
spent so far and (with --time-budget) the run's fitted length. A run that is killed and resumed thus ends
with the same bits as one that was not. Under FSDP every process writes its shards of the weights and
the optimizer state (torch.distributed.checkpoint); otherwise rank 0 writes the whole.

Ctrl-C (`CtrlC`) is a way to stop, not a crash: the loop finishes the step it is in, saves it, and says the
command that goes on from there.
"""

from __future__ import annotations

import random
import shutil
import signal
import threading
from pathlib import Path

import torch

from gpt2lab.checkpoint import WEIGHTS_FILE
from gpt2lab.errors import Interrupted, UserError
from gpt2lab.metrics import console
from gpt2lab.train import checkpoints, distributed
from gpt2lab.weights import load_weights


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(trainer) -> None:
    """Write the trainer's checkpoint at its current step. Every rank's RNG state is gathered; the data
    position and the task's state are global; rank 0 writes (under FSDP every rank writes its shards)."""
    dist, out = trainer.dist, trainer.out
    rng = rng_state()
    if dist.enabled:
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    staged = None
    if trainer.fsdp:  # every process writes its shards of the weights and the optimizer state
        staged = checkpoints.sharded_staging(out, trainer.step)
        if dist.is_main:
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
        distributed.barrier(dist)
        distributed.save_sharded(trainer.model, trainer.optimizer, staged / checkpoints.SHARDED)
        distributed.barrier(dist)
    if dist.is_main:
        trainer_state = {"scaler": trainer.scaler.state_dict(), "rng": gathered}
        if not trainer.fsdp:
            trainer_state["optimizer"] = trainer.optimizer.state_dict()
        state = {"step": trainer.step, "elapsed": trainer.elapsed(), "data": trainer.train_loader.state_dict(),
                 "task": trainer.task.state_dict(), "world_size": dist.world_size, "strategy": trainer.cfg.strategy,
                 "max_steps": trainer.max_steps, "tokens_seen": trainer.step * trainer.total_batch_tokens}
        try:
            checkpoints.save_checkpoint(out, trainer.step, None if trainer.fsdp else trainer.model, trainer_state,
                                        state, keep=trainer.cfg.keep_checkpoints, staged=staged)
        except OSError as e:
            raise UserError(f"cannot write a checkpoint into {out} ({e.strerror}); free space or fix the "
                            "permissions, then rerun with --resume") from None
    distributed.barrier(dist)


def restore(trainer, path: Path) -> None:
    """Load the checkpoint at `path` into the trainer: weights, optimizer, scaler, data position, this
    process's random state, the task's state, the step and the time spent."""
    trainer_state, state = checkpoints.load_checkpoint(path)
    cfg, dist = trainer.cfg, trainer.dist
    written_with = state.get("strategy", "ddp")
    if written_with != cfg.strategy:
        raise UserError(f"{path} was written with --strategy {written_with}, but the run's config.json says "
                        f"{cfg.strategy}; the run dir is inconsistent, start a new run with --init-from it")
    if trainer.fsdp:
        distributed.load_sharded(trainer.model, trainer.optimizer, path / checkpoints.SHARDED)
    else:
        load_weights(trainer.model, path / WEIGHTS_FILE, exact=True)
    try:
        if state.get("world_size") != dist.world_size and "data" not in state:
            raise UserError(f"{path} was written by {state.get('world_size')} processes, this run has "
                            f"{dist.world_size}; resume with the same number of processes")
        if not trainer.fsdp:
            trainer.optimizer.load_state_dict(trainer_state["optimizer"])
        trainer.scaler.load_state_dict(trainer_state["scaler"])
        data = state["data"] if "data" in state else state["loaders"][dist.rank]
        trainer.train_loader.load_state_dict(data)
        rngs = trainer_state["rng"]
        set_rng_state(rngs[dist.rank % len(rngs)])
        trainer.task.load_state_dict(state.get("task") or {})
        trainer.step = int(state["step"])
        trainer.elapsed_before = float(state.get("elapsed", 0.0))
        if cfg.time_budget is not None and "max_steps" in state:  # the length fitted to the budget
            trainer.max_steps = int(state["max_steps"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path} is not a usable checkpoint ({e}); delete it to resume from an earlier one") \
            from None


class CtrlC:
    """While training: the first Ctrl-C asks the loop to stop after the step it is in (and save it); a second
    one stops at once. Only in a single process (torchrun delivers Ctrl-C to every rank) and the main thread."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.asked = False

    def __enter__(self):
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._ask)
        return self

    def _ask(self, signum, frame):
        self.asked = True
        console("\nCtrl-C: stopping after this step and saving it (Ctrl-C again stops at once, losing the step)")
        signal.signal(signal.SIGINT, self.previous)

    def finish(self, trainer, saved: bool) -> None:
        """Save the last whole step (unless its checkpoint is there) and say how to go on."""
        if not saved:
            save(trainer)
        if not checkpoints.list_checkpoints(trainer.out):
            raise Interrupted("stopped by Ctrl-C before the first step; nothing was trained, run the command again")
        raise Interrupted(f"stopped by Ctrl-C after step {trainer.step}/{trainer.max_steps}, saved in {trainer.out}; "
                          f"go on with `gpt2lab {trainer.task.command} --out {trainer.out} --resume`")

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)
