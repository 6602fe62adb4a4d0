"""The task seam: what one kind of training tells the shared loop (gpt2lab/train/loop.py), and what the
loop hands it.

A `Task` owns what differs between objectives: its data and batches, `loss(model, batch) -> (loss,
metrics)` (extra metrics are logged as they come), its evaluation, and what the run dir records.
Pretraining (`LMTask`, pretrain.py), SFT, classification and RL (gpt2lab/finetune) are tasks.

The seam points one way. The loop calls the task; the task never holds the loop. Once the model is built,
the loop hands the task a `Context`, read-only: the model being trained, its config, the device and
precision, the process group, the batch geometry and the run dir. Everything the loop owns stays the
loop's: accumulation, clipping, the schedule, mixed precision, DDP/FSDP, checkpoints, resume, logging,
and the auxiliary losses every task shares (the mixture of experts' balance).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab.checkpoint import WEIGHTS_FILE, RunInfo
from gpt2lab.errors import UserError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.train.config import LoopConfig
from gpt2lab.train.distributed import DistInfo
from gpt2lab.weights import save_weights

IGNORE_INDEX = -100  # targets with this value take no part in the loss (SFT prompts, padding)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not IGNORE_INDEX."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@dataclass
class TrainResult:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # every evaluation's metrics, with its step
    final_val_loss: float | None = None
    run_dir: str = ""
    settings: LoopConfig | None = None  # the run's settings as resolved (a resumed run's stored ones)
    task: Task | None = None  # the task that ran, as training left it


class NonFiniteLoss(UserError):
    pass


@dataclass(frozen=True)
class Context:
    """What the loop hands a task once the model is built; read-only."""

    cfg: LoopConfig  # the run's settings, resolved (on --resume: the stored ones)
    model: torch.nn.Module  # the model being trained, unwrapped: sample and evaluate with it
    model_config: GPTConfig
    device: torch.device
    dtype: torch.dtype
    dist: DistInfo
    seq_len: int  # tokens per training sequence
    grad_accum: int  # micro-batches per optimizer step
    out: Path  # the run dir
    autocast: Callable[[], AbstractContextManager]  # the run's mixed precision, for forwards outside the loss


def held_out_mean(ctx: Context, batches: list, loss_fn) -> float:
    """The mean of `loss_fn` over `batches` (the same list on every process): rank r takes batches r, r + W,
    ..., so the result does not depend on the number of processes W. Every process runs the same number of
    forward passes (FSDP's collectives need that); a pass past the end is not counted."""
    W, r = ctx.dist.world_size, ctx.dist.rank
    total = torch.zeros((), device=ctx.device)
    count = torch.zeros((), device=ctx.device)
    for k in range(math.ceil(len(batches) / W)):
        i = r + k * W
        loss = loss_fn(batches[i] if i < len(batches) else batches[0])
        if i < len(batches):
            total += loss.float()
            count += 1
    if ctx.dist.enabled:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return (total / count).item()


class Task:
    """What one kind of training supplies to the loop. The loop calls, in this order: `load` (data and
    tokenizer), `model_config`, `build_model`, `setup` (the Context), `train_loader`; then per micro-batch
    `loss`, and now and then `evaluate`, `sample`, `state_dict`; at the end `save_final` and `finish`
    (rank 0)."""

    name = "task"
    command = "pretrain"  # the gpt2lab command that runs it (resuming says it)
    kind = "lm"  # the kind of run dir it writes
    tokenizer = None
    data_identity: dict | None = None
    ctx: Context | None = None

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg

    def inputs(self) -> list[str]:
        """Paths the task reads: the run dir may not be, hold or lie inside any of them."""
        return []

    def load(self) -> None:
        raise NotImplementedError

    def model_config(self, resumed: RunInfo | None) -> GPTConfig:
        """The model to train; `resumed`: the run being resumed."""
        raise NotImplementedError

    def build_model(self, model_config: GPTConfig, resuming: bool) -> torch.nn.Module:
        """The model with its starting weights (random, or a run's); on resume the checkpoint's replace them."""
        return GPT(model_config)

    def seq_len(self, model_config: GPTConfig) -> int:
        return self.cfg.seq_len or model_config.block_size

    def setup(self, ctx: Context) -> None:
        """Called once, after the model is built and placed: what the task may use from then on."""
        self.ctx = ctx

    def train_loader(self):
        """An object with next_batch(), state_dict(), load_state_dict() and steps_per_epoch."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
        """`model` is the module to train through (compiled or wrapped for DDP); the loss of one micro-batch."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        """Metrics of the held-out data, the same on every rank; "val_loss" is the headline."""
        return {}

    def sample(self, model: torch.nn.Module, step: int) -> str | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def run_config(self) -> dict:
        """Entries for the run's config.json besides the model, tokenizer, train and data."""
        return {}

    def save_final(self, model: torch.nn.Module) -> None:
        save_weights(model, self.ctx.out / WEIGHTS_FILE)

    def finish(self, result: TrainResult) -> None:
        pass
