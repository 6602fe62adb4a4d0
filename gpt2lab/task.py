"""The task protocol: what one kind of training tells the shared loop (gpt2lab/train.py).

A `Task` owns what differs between objectives: its data and batches, `loss(model, batch) ->
(loss, metrics)` (extra metrics are logged as they come), its evaluation, and what the run dir
records. Pretraining (`LMTask`, gpt2lab/pretrain.py), SFT, classification and RL
(gpt2lab/finetune) are tasks. The helpers here are the pieces several tasks share: the
next-token loss, the mixture of experts' auxiliary terms, and a held-out mean that does not
depend on the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gpt2lab import checkpoint as ckpt
from gpt2lab.config import LoopConfig
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, GPTConfig, model_fields

if TYPE_CHECKING:
    from gpt2lab.train import Trainer

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


class NonFiniteLoss(UserError):
    pass


def model_overrides(cfg) -> dict:
    """The model fields a config sets (None: keep the preset's / the starting run's)."""
    return {f.name: getattr(cfg, f.name) for f in model_fields() if getattr(cfg, f.name, None) is not None}


def moe_terms(model: torch.nn.Module) -> tuple[torch.Tensor | float, dict]:
    """The mixture of experts' share of the objective after a forward pass: its load-balancing loss (x the
    config's weight, when the model balances with a loss) and the expert load, for the log. (0.0, {}) for a
    dense model."""
    from gpt2lab.layers import MoE

    layers = [m for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if not layers:
        return 0.0, {}
    aux = torch.stack([m.aux_loss for m in layers]).mean()
    busiest = torch.stack([m.load.max() * m.n_experts for m in layers]).mean()  # 1.0: perfectly even
    extra = aux * model.config.moe_aux_weight if model.config.moe_balance == "loss" else 0.0
    return extra, {"moe_aux": aux.detach(), "moe_max_load": busiest}


def held_out_mean(trainer: Trainer, batches: list, loss_fn) -> float:
    """The mean of `loss_fn` over `batches` (the same list on every process): rank r takes batches r, r + W,
    ..., so the result does not depend on the number of processes W. Every process runs the same number of
    forward passes (FSDP's collectives need that); a pass past the end is not counted."""
    W, r = trainer.dist.world_size, trainer.dist.rank
    total = torch.zeros((), device=trainer.device)
    count = torch.zeros((), device=trainer.device)
    for k in range(math.ceil(len(batches) / W)):
        i = r + k * W
        loss = loss_fn(batches[i] if i < len(batches) else batches[0])
        if i < len(batches):
            total += loss.float()
            count += 1
    if trainer.dist.enabled:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return (total / count).item()


class Task:
    """What one kind of training supplies to the loop. Methods are called in this order:
    `load` (data and tokenizer), `model_config`, `build_model`, `train_loader`; then per step
    `loss`, and now and then `evaluate`, `sample`, `state_dict`; at the end `save_final` and
    `finish` (rank 0)."""

    name = "task"
    kind = "lm"  # the kind of run dir it writes
    tokenizer = None
    data_identity: dict | None = None
    trainer: Trainer | None = None  # set by the Trainer that runs the task

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg

    def inputs(self) -> list[str]:
        """Paths the task reads: the run dir may not be, hold or lie inside any of them."""
        return []

    def load(self, trainer: Trainer) -> None:
        raise NotImplementedError

    def model_config(self, stored: GPTConfig | None) -> GPTConfig:
        """The model to train; `stored`: the config of the run being resumed."""
        raise NotImplementedError

    def build_model(self, model_config: GPTConfig, resuming: bool) -> torch.nn.Module:
        """The model with its starting weights (random, or a run's); on resume the checkpoint's replace them."""
        return GPT(model_config)

    def seq_len(self, model_config: GPTConfig) -> int:
        return self.cfg.seq_len or model_config.block_size

    def train_loader(self, trainer: Trainer):
        """An object with next_batch(), state_dict(), load_state_dict() and steps_per_epoch."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def evaluate(self, trainer: Trainer, model: torch.nn.Module) -> dict:
        """Metrics of the held-out data, the same on every rank; "val_loss" is the headline."""
        return {}

    def sample(self, trainer: Trainer, model: torch.nn.Module) -> str | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def run_config(self) -> dict:
        """Entries for the run's config.json besides the model, tokenizer, train and data."""
        return {}

    def save_final(self, trainer: Trainer, model: torch.nn.Module) -> None:
        ckpt.save_weights(model, trainer.out / ckpt.WEIGHTS_FILE)

    def finish(self, trainer: Trainer, result: TrainResult) -> None:
        pass
