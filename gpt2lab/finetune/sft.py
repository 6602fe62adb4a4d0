"""Instruction fine-tuning (SFT): teach a model to answer in a prompt template.

Each record becomes one sequence: the rendered prompt, then the response, then
<|endoftext|> so that the model learns to stop. The loss is taken on the
response and the end-of-text token only; prompt positions and padding carry
IGNORE_INDEX in the targets:

    ids      [ prompt ...          | response ...      eot ]
    x        ids[:-1]
    y        [ -100 -100 ... -100  | response ...      eot ]   (ids[1:], prompt masked)

Batches are padded to their longest sequence (with eot in x, IGNORE_INDEX in y).
Training goes through the same `Trainer` as pretraining: only the data, the
starting weights (`--init`, a run dir) and the optional LoRA adapters differ.

Accepted data: Alpaca-style JSON (a list) or JSONL with `instruction`,
`input` (optional) and `output`; or chat JSONL, `{"messages": [{"role":
"user"|"assistant"|"system", "content": ...}, ...]}`, trained with the `chat`
template on every assistant turn.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from gpt2lab import checkpoint as ckpt
from gpt2lab.config import SFTConfig
from gpt2lab.errors import UserError
from gpt2lab.templates import get_template
from gpt2lab.train import IGNORE_INDEX, Trainer

# ------------------------------------------------------------------------------ records


def read_records(path: str | os.PathLike) -> list[dict]:
    """Alpaca records or chat records from a .json (list) or .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction data {path} does not exist; check the path")
    text = path.read_text(encoding="utf-8")
    fix = "Alpaca data is a JSON list or one JSON object per line"
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); {fix}") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} is not valid JSONL ({e.msg}, line {lineno}); {fix}") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"{path} holds no records; expected a list of {{instruction, input, output}} "
                        "or chat objects with `messages`")
    for i, r in enumerate(records):
        problem = _record_problem(r)
        if problem:
            raise UserError(f"{path}: record {i} {problem}; each record needs text `instruction` and "
                            "`output` (and optionally `input`) for Alpaca, or `messages` of "
                            "{role, content} for chat")
    return records


def _record_problem(r) -> str | None:
    if not isinstance(r, dict):
        return f"is {type(r).__name__}, not an object"
    if "messages" in r:
        msgs = r["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "has `messages` that is not a non-empty list"
        for m in msgs:
            ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            if not ok:
                return f"has a message {m!r} without text `role` and `content`"
        if not any(m["role"] == "assistant" for m in msgs):
            return "has no assistant message to learn from"
        return None
    if not {"instruction", "output"} <= set(r):
        return f"has {sorted(r)}"
    for key in ("instruction", "output", "input"):
        if key in r and r[key] is not None and not isinstance(r[key], str):
            return f"has a `{key}` that is {type(r[key]).__name__}, not text"
    return None


def render(record: dict, template) -> list[tuple[str, bool]]:
    """A record as text segments, each marked True where the loss applies."""
    if "messages" in record:
        chat = get_template("chat")
        segments = []
        messages = record["messages"]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content", "")
            if role == "assistant":
                segments.append((chat.assistant_prefix, False))
                segments.append((content, True))  # followed by a trained eot: the turn ends here
                if i < len(messages) - 1:
                    segments.append((chat.turn_end, False))
            else:
                segments.append((chat.render_turn(role, content), False))
        return segments
    prompt = template.render(record["instruction"], record.get("input", "") or "")
    return [(prompt, False), (record["output"], True)]


def encode_record(record: dict, template, tokenizer, max_length: int) -> tuple[list[int], list[bool]] | None:
    """(ids, trained): every trained segment (a response) is followed by a trained eot, since
    learning to stop is part of the answer. None if nothing trained fits in `max_length`."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, on in render(record, template):
        piece = tokenizer.encode(text) if text else []
        ids += piece
        trained += [on] * len(piece)
        if on:
            ids.append(tokenizer.eot_id)
            trained.append(True)
    ids, trained = ids[: max_length + 1], trained[: max_length + 1]
    # targets are ids[1:]: a trained target exists when some position past the first is trained
    if not any(trained[1:]):
        return None
    return ids, trained


class SFTLoader:
    """Shuffled, padded batches of instruction examples, with a resumable position.

    Each epoch is a fresh permutation drawn from (seed, epoch); rank r of W
    takes its own slice of every step's B*W examples.
    """

    def __init__(self, examples: list[tuple[list[int], list[bool]]], batch_size: int, pad_id: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 device: str | torch.device = "cpu"):
        if not examples:
            raise UserError("no training examples left after encoding; check the data and --max-length")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.device = torch.device(device)
        self.position = 0  # examples consumed by all ranks, over all epochs

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.examples)
        picks = []
        start = self.position + self.rank * self.batch_size
        for i in range(start, start + self.batch_size):
            epoch, j = divmod(i, n)
            picks.append(self.examples[int(self._order(epoch)[j])])
        self.position += self.batch_size * self.world_size
        return collate(picks, self.pad_id, self.device)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("examples") != len(self.examples):
            raise UserError("the checkpoint was made with different fine-tuning data; resume with the same "
                            "--data and --val-fraction")
        self.position = int(state["position"])


def collate(batch: list[tuple[list[int], list[bool]]], pad_id: int,
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


# ------------------------------------------------------------------------------ trainer


class SFTTrainer(Trainer):
    cfg: SFTConfig

    def load_data(self) -> None:
        from gpt2lab.tokenizer import load_tokenizer_file

        cfg = self.cfg
        cfg.init_from = cfg.init
        ckpt.read_run_config(cfg.init)  # a clear error if --init is not a run dir
        self.tokenizer = load_tokenizer_file(Path(cfg.init) / ckpt.TOKENIZER_FILE)
        records = read_records(cfg.data)
        if all("messages" in r for r in records):
            cfg.template = "chat"
        self.template = get_template(cfg.template)
        if cfg.val_data:
            train_records, val_records = records, read_records(cfg.val_data)
        else:
            # a deterministic held-out share: every k-th record
            k = int(round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else 0
            val_records = [r for i, r in enumerate(records) if k and i % k == k - 1]
            train_records = [r for i, r in enumerate(records) if not (k and i % k == k - 1)]
        self.records = train_records, val_records
        digest = hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest()
        self.data_identity = {"path": str(Path(cfg.data).resolve()), "sha256": digest,
                              "train_records": len(train_records), "val_records": len(val_records)}

    def make_loaders(self):
        cfg, dist = self.cfg, self.dist
        max_length = self.seq_len
        encode = lambda rs: [e for r in rs if (e := encode_record(r, self.template, self.tokenizer,
                                                                  max_length)) is not None]
        train_examples, val_examples = encode(self.records[0]), encode(self.records[1])
        if cfg.epochs is not None:
            per_step = cfg.batch_size * dist.world_size * self.grad_accum
            cfg.max_steps = max(1, math.ceil(cfg.epochs * len(train_examples) / per_step))
        train = SFTLoader(train_examples, cfg.batch_size, self.tokenizer.eot_id, seed=cfg.seed,
                          rank=dist.rank, world_size=dist.world_size, device=self.device)
        val_batches = []
        if val_examples:
            val = SFTLoader(val_examples, cfg.batch_size, self.tokenizer.eot_id, shuffle=False,
                            rank=dist.rank, world_size=dist.world_size, device=self.device)
            n = min(cfg.eval_batches, math.ceil(len(val_examples) / (cfg.batch_size * dist.world_size)))
            val_batches = [val.next_batch() for _ in range(n)]
        else:
            val_batches = [train.next_batch()]  # no held-out data: a fixed training batch
            train.position = 0
        return train, val_batches

    def prepare_model(self) -> None:
        cfg = self.cfg
        if cfg.lora_rank:
            from gpt2lab.finetune.lora import apply_lora

            targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
            apply_lora(self.model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       targets=targets)

    def extra_config(self) -> dict:
        extra = {"task": "sft", "template": self.cfg.template}
        if self.cfg.lora_rank:
            # model.safetensors keeps the base weights, lora.safetensors the adapters;
            # `gpt2lab merge-lora` folds them into one ordinary run dir
            extra["lora"] = dict(self.model.lora_settings)
        return extra

    def save_final(self) -> None:
        if self.cfg.lora_rank:
            from gpt2lab.finetune.lora import save_lora_run_weights

            save_lora_run_weights(self.model, self.out)
        else:
            ckpt.save_weights(self.model, self.out / ckpt.WEIGHTS_FILE)


def finetune_sft(cfg: SFTConfig):
    from gpt2lab import distributed

    info = distributed.setup(cfg.device)
    try:
        return SFTTrainer(cfg, info).run()
    finally:
        distributed.teardown(info)
