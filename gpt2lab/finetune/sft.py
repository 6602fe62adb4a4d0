"""Instruction fine-tuning (SFT): teach a model to answer in a chat format.

Each record becomes one sequence through the one chat format (gpt2lab.templates): the
rendered prompt, then the response, then <|endoftext|> so that the model learns to stop.
The loss is taken on the responses and their end-of-text tokens only; prompt positions and
padding carry IGNORE_INDEX in the targets:

    ids      [ prompt ...          | response ...      eot ]
    x        ids[:-1]
    y        [ -100 -100 ... -100  | response ...      eot ]   (ids[1:], prompt masked)

Batches are padded to their longest sequence (with eot in x, IGNORE_INDEX in y). SFT is a
task on the shared training loop (gpt2lab.train): checkpoints, exact resume, DDP, mixed
precision and logging are the loop's. The starting weights come from `--init` (a run dir;
a LoRA run's adapters merged), optionally with LoRA adapters of their own.

Accepted data: Alpaca-style JSON (a list) or JSONL with `instruction`, `input` (optional)
and `output`; or chat JSONL, `{"messages": [{"role": "user"|"assistant"|"system",
"content": ...}, ...]}`, trained with the `chat` format on every assistant turn.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from gpt2lab import checkpoint as ckpt
from gpt2lab.data.order import GlobalOrder
from gpt2lab.data.records import read_instructions
from gpt2lab.errors import UserError
from gpt2lab.finetune.base import FinetuneTask
from gpt2lab.finetune.config import SFTConfig
from gpt2lab.io import file_sha256
from gpt2lab.metrics import console
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.lora import apply_lora
from gpt2lab.templates import encode_messages, record_messages
from gpt2lab.train.config import OPTIMIZERS, explicit_settings
from gpt2lab.train.distributed import launched_as_main
from gpt2lab.train.loop import train_task
from gpt2lab.train.task import IGNORE_INDEX, held_out_mean, lm_loss
from gpt2lab.weights import save_lora, save_weights

# ------------------------------------------------------------------------------ records


def encode_record(record: dict, fmt, tokenizer, max_length: int) -> tuple[list[int], list[bool]] | None:
    """(ids, trained) of a record in chat format `fmt`, cut to max_length + 1 ids; None when nothing
    trained fits."""
    examples, _, _ = encode_records([record], fmt, tokenizer, max_length)
    return examples[0] if examples else None


def encode_records(records: list[dict], fmt, tokenizer, max_length: int) -> tuple[list, int, int]:
    """(examples, cut, dropped): the records encoded, each cut to max_length + 1 ids (targets are ids[1:]);
    how many of those kept were cut, and how many were left out because no trained token fits."""
    examples, cut, dropped = [], 0, 0
    for r in records:
        ids, trained = encode_messages(tokenizer, record_messages(r), fmt, add_generation_prompt=False)
        longer = len(ids) > max_length + 1
        ids, trained = ids[: max_length + 1], trained[: max_length + 1]
        if not any(trained[1:]):
            dropped += 1
            continue
        cut += longer
        examples.append((ids, trained))
    return examples, cut, dropped


class SFTLoader:
    """Padded batches of instruction examples in gpt2lab's one global order (`data.GlobalOrder`):
    shuffled per epoch from the seed, rank r of W taking its slice of every micro-step's B*W examples."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], batch_size: int, pad_id: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 device: str | torch.device = "cpu"):
        if not examples:
            raise UserError("no training examples left after encoding: no record has a response that fits "
                            "in --seq-len; check the data or raise --seq-len")
        self.examples, self.pad_id = examples, pad_id
        self.device = torch.device(device)
        self.order = GlobalOrder(len(examples), batch_size, seed=seed, rank=rank, world_size=world_size,
                                 shuffle=shuffle)

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    @property
    def position(self) -> int:
        return self.order.position

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_examples([self.examples[int(i)] for i in self.order.next_indices()], self.pad_id, self.device)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state, "instruction data (with this --val-fraction)")


def pad_examples(batch: list[tuple[list[int], list[bool]]], pad_id: int,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; x = ids[:-1], y = ids[1:] with untrained targets masked."""
    T = max(len(ids) for ids, _ in batch) - 1
    x = torch.full((len(batch), T), pad_id, dtype=torch.long)
    y = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, trained) in enumerate(batch):
        n = len(ids) - 1
        x[b, :n] = torch.tensor(ids[:-1])
        targets = torch.tensor(ids[1:])
        mask = torch.tensor(trained[1:])
        y[b, :n] = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX))
    return x.to(device), y.to(device)


# ------------------------------------------------------------------------------ the task


class SFTTask(FinetuneTask):
    name = "sft"
    command = "finetune sft"
    cfg: SFTConfig

    def inputs(self) -> list[str]:
        return [p for p in (self.cfg.init, self.cfg.data, self.cfg.val_data) if p]

    def load(self) -> None:
        cfg = self.cfg
        self.open_start("instruction tuning")
        records = read_instructions(cfg.data)
        # the chat format can render Alpaca records as user/assistant turns; the alpaca one cannot render chats
        self.format = "chat" if any("messages" in r for r in records) else cfg.template
        if cfg.val_data:
            train_records, val_records = records, read_instructions(cfg.val_data)
        else:
            # a deterministic held-out share: every k-th record
            k = int(round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else 0
            val_records = [r for i, r in enumerate(records) if k and i % k == k - 1]
            train_records = [r for i, r in enumerate(records) if not (k and i % k == k - 1)]
        self.records = train_records, val_records
        self.data_identity = {"path": str(Path(cfg.data).resolve()), "sha256": file_sha256(cfg.data),
                              "train_records": len(train_records), "val_records": len(val_records)}
        if cfg.val_data:
            self.data_identity["val_sha256"] = file_sha256(cfg.val_data)

    def build_model(self, model_config: GPTConfig, resuming: bool) -> torch.nn.Module:
        model = GPT(model_config)
        if not resuming:
            model.load_state_dict(self.start_model().state_dict())
        if self.cfg.lora_rank:
            targets = tuple(t.strip() for t in self.cfg.lora_targets.split(",") if t.strip())
            apply_lora(model, rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha, dropout=self.cfg.lora_dropout,
                       targets=targets)
        elif self.cfg.freeze_embeddings:
            for module in (model.transformer.wte, model.lm_head, getattr(model.transformer, "wpe", None)):
                if module is not None:
                    module.weight.requires_grad_(False)
        return model

    def train_loader(self):
        cfg, ctx = self.cfg, self.ctx
        dist = ctx.dist
        train_examples, cut, dropped = encode_records(self.records[0], self.format, self.tokenizer, ctx.seq_len)
        val_examples, val_cut, val_dropped = encode_records(self.records[1], self.format, self.tokenizer, ctx.seq_len)
        if dist.is_main:
            def counts(n, c, d, what):
                shown = [f"{c:,} cut to the {ctx.seq_len + 1}-token window"] * bool(c) + \
                        [f"{d:,} left out (no answer token fits)"] * bool(d)
                return f"{n:,} {what}" + (f" ({', '.join(shown)})" if shown else "")
            console("data: " + counts(len(train_examples) + dropped, cut, dropped, "training records") + ", "
                    + counts(len(val_examples) + val_dropped, val_cut, val_dropped, "held out")
                    + ("; raise --seq-len (up to the model's context) or shorten the records to keep them whole"
                       if cut or dropped or val_cut or val_dropped else ""))
        train = SFTLoader(train_examples, cfg.batch_size, self.tokenizer.eot_id, seed=cfg.seed,
                          rank=dist.rank, world_size=dist.world_size, device=ctx.device)
        if val_examples:  # the same batches on every process (each evaluates its share)
            val = SFTLoader(val_examples, cfg.batch_size, self.tokenizer.eot_id, shuffle=False,
                            device=ctx.device)
            n = min(cfg.eval_batches, val.steps_per_epoch)
            self.val_batches = [val.next_batch() for _ in range(n)]
        else:  # no held-out data: a fixed training batch
            fixed = SFTLoader(train_examples, cfg.batch_size, self.tokenizer.eot_id, shuffle=False,
                              device=ctx.device)
            self.val_batches = [fixed.next_batch()]
        return train

    def loss(self, model, batch):
        x, y = batch
        return lm_loss(model(x), y), {}

    def evaluate(self, model, step: int) -> dict:
        return {"val_loss": held_out_mean(self.ctx, self.val_batches, lambda b: lm_loss(model(b[0]), b[1]))}

    def run_config(self) -> dict:
        extra = {"template": self.format, "base": {"run_dir": str(Path(self.cfg.init).resolve())}}
        if self.cfg.lora_rank:
            # model.safetensors keeps the base weights, lora.safetensors the adapters;
            # `gpt2lab merge-lora` folds them into one ordinary run dir
            targets = [t.strip() for t in self.cfg.lora_targets.split(",") if t.strip()]
            extra["lora"] = {"rank": self.cfg.lora_rank, "alpha": float(self.cfg.lora_alpha),
                             "dropout": float(self.cfg.lora_dropout), "targets": targets}
        return extra

    def save_final(self, model) -> None:
        out = self.ctx.out
        if self.cfg.lora_rank:
            save_weights(model, out / ckpt.WEIGHTS_FILE, exclude_lora=True)
            save_lora(model, out / ckpt.LORA_FILE)
        else:
            save_weights(model, out / ckpt.WEIGHTS_FILE)


def settings_from_base(cfg: SFTConfig, given: dict | None = None) -> SFTConfig:
    """The optimizer, learning rates and frozen embeddings of a full fine-tune, when not given, from the base.

    The defaults (AdamW at 1e-4, every weight trained) are right for OpenAI's 124M GPT-2, whose import
    carries no training settings, and stay for it. A run pretrained here fine-tunes with its own optimizer,
    its Muon rate and a third of its AdamW rate (a 5M-parameter model pretrained at 3e-3 with Muon does not
    learn a new instruction at 1e-4), and with its token embedding and head frozen: a few thousand records
    answer with a small part of the vocabulary, and training the head on them pushes every other token
    down, so that the model cannot copy a word the data never had (README "Fine-tuning" has the
    measurements). LoRA and --resume keep their own settings."""
    given = explicit_settings(cfg) if given is None else given
    if cfg.resume or cfg.lora_rank or not cfg.init:
        return cfg
    try:
        base = ckpt.read_run_config(cfg.init)
    except UserError:
        return cfg  # the task reports the bad --init with its fix
    train = base.get("train") if isinstance(base.get("train"), dict) else {}
    if base.get("task") != "pretrain" or not isinstance(train.get("lr"), (int, float)):
        return cfg
    changes = {}
    if "optimizer" not in given and train.get("optimizer") in OPTIMIZERS:
        changes["optimizer"] = train["optimizer"]
    if "lr" not in given:
        changes["lr"] = float(train["lr"]) / 3
    if "muon_lr" not in given and isinstance(train.get("muon_lr"), (int, float)):
        changes["muon_lr"] = float(train["muon_lr"])
    if cfg.freeze_embeddings is None:
        changes["freeze_embeddings"] = True
    changes = {k: v for k, v in changes.items() if getattr(cfg, k) != v}
    if not changes:
        return cfg
    shown = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v:g}" if isinstance(v, float) else f" {v}")
             for k, v in changes.items()]
    if launched_as_main():
        console(f"settings from the base run's pretraining: {' '.join(shown)} (flags given win)")
    return replace(cfg, **changes)


def finetune_sft(cfg: SFTConfig, given: dict | None = None):
    return train_task(settings_from_base(cfg, given), SFTTask, given)
