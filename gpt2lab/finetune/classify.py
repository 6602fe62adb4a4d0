"""Fine-tuning GPT-2 as a text classifier (the book's chapter 6: SMS spam), a task on the shared loop.

    text -> ids (truncated to max_length) -> right-padded with <|endoftext|>
         -> the transformer -> hidden state of the last real token -> score -> class logits

Causal attention lets the last token see the whole text, so its hidden state is the one to
classify from (`GPTClassifier` in model/gpt.py). Padding sits after it and cannot change it, so a
text gets the same logits alone or in a batch with longer texts.

Training goes through the shared loop (gpt2lab.train) like every task: checkpoints, bitwise `--resume`,
DDP, mixed precision and logging are the loop's. The data and its splits are
classify_data.py's. What trains (`train_mode`): "all"; "last-blocks" (the last N blocks, the
final LayerNorm and the head: the book's choice, N = 1); "head"; "lora" (adapters on the
targeted linear layers, plus the head). Every epoch the train, val and test accuracies are
measured; the weights of the best epoch (validation accuracy, then loss) are kept
(`--keep-best`, the default) or those of the last.

The output run dir:
    config.json        kind "classifier", the base model config, "labels", "head", "train", "data"
                       (and "lora" in LoRA mode)
    model.safetensors  the transformer (no LM head) + the head as score.weight / score.bias;
                       in LoRA mode the transformer is the unchanged base
    lora.safetensors   the adapters (LoRA mode only; `gpt2lab merge-lora` folds them in)
    tokenizer.json
    results.json       accuracies and per-class precision/recall/F1 of the kept epoch, and
                       the history of every epoch
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab import checkpoint as ckpt
from gpt2lab import io
from gpt2lab.data.order import GlobalOrder
from gpt2lab.errors import UserError
from gpt2lab.finetune.base import FinetuneTask
from gpt2lab.finetune.classify_data import (
    SPLITS,
    Example,
    balance_classes,
    encode_texts,
    label_order,
    make_splits,
    pad_texts,
    read_examples,
)
from gpt2lab.finetune.config import TRAIN_MODES, ClassifyConfig
from gpt2lab.io import file_sha256
from gpt2lab.metrics import console
from gpt2lab.model import lora as lora_mod
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPTClassifier
from gpt2lab.train.loop import train_task
from gpt2lab.train.task import TrainResult
from gpt2lab.weights import load_weights, save_lora, save_weights

TASK = "classify"
RESULTS_FILE = "results.json"
BEST_FILE = "best.safetensors"  # the kept epoch's weights while training runs


def set_train_mode(model: GPTClassifier, mode: str, last_blocks: int = 1, lora: dict | None = None) -> None:
    """Freeze what should not train; in "lora" mode, add the adapters first."""
    if mode not in TRAIN_MODES:
        raise UserError(f"unknown train mode {mode!r}; choose one of: {', '.join(TRAIN_MODES)}")
    for p in model.parameters():
        p.requires_grad_(mode == "all")
    if mode == "last-blocks":
        n_layer = len(model.transformer.h)
        if not 1 <= last_blocks <= n_layer:
            raise UserError(f"--last-blocks {last_blocks}: the model has {n_layer} blocks; "
                            f"choose 1..{n_layer} (or --train-mode all)")
        for module in [*model.transformer.h[n_layer - last_blocks:], model.transformer.ln_f]:
            for p in module.parameters():
                p.requires_grad_(True)
    elif mode == "lora":
        lora = lora or {}
        lora_mod.apply_lora(model, lora.get("rank", 8), lora.get("alpha", 16.0), lora.get("dropout", 0.0),
                            lora.get("targets", lora_mod.DEFAULT_TARGETS))
    for p in model.score.parameters():
        p.requires_grad_(True)


# ------------------------------------------------------------------------------ scoring


@torch.no_grad()
def predict_proba(model: GPTClassifier, seqs: list[list[int]], pad_id: int, batch_size: int = 32,
                  device=None) -> torch.Tensor:
    """(N, num_classes) probabilities, in the order of `seqs`; batches of similar lengths."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    probs = torch.empty(len(seqs), model.num_classes)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        idx, lengths = pad_texts([seqs[i] for i in chunk], pad_id, device)
        probs[chunk] = F.softmax(model(idx, lengths).float(), dim=-1).cpu()
    model.train(was_training)
    return probs


def classification_metrics(probs: torch.Tensor, gold: list[int], labels: list[str]) -> dict:
    """Accuracy, mean cross-entropy and, per class, precision, recall, F1 and support (None where
    undefined) of (N, num_classes) probabilities against the gold class ids."""
    n = len(gold)
    pred = probs.argmax(-1).tolist() if n else []
    loss = (-probs[torch.arange(n), torch.tensor(gold)].clamp_min(1e-12).log().mean().item()) if n else None
    correct = sum(p == g for p, g in zip(pred, gold))
    per_class = {}
    for c, name in enumerate(labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        predicted = sum(p == c for p in pred)
        support = sum(g == c for g in gold)
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        f1 = (2 * precision * recall / (precision + recall)
              if precision is not None and recall is not None and precision + recall > 0 else None)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {"accuracy": correct / n if n else None, "loss": loss, "n": n, "per_class": per_class}


# ------------------------------------------------------------------------------ the task


class ExampleLoader:
    """Batches (ids, lengths, labels) of encoded examples in the one global order."""

    def __init__(self, seqs: list[list[int]], gold: list[int], batch_size: int, pad_id: int, *, seed: int,
                 rank: int, world_size: int, device):
        self.seqs, self.gold, self.pad_id, self.device = seqs, gold, pad_id, device
        self.order = GlobalOrder(len(seqs), batch_size, seed=seed, rank=rank, world_size=world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def next_batch(self):
        picks = [int(i) for i in self.order.next_indices()]
        idx, lengths = pad_texts([self.seqs[i] for i in picks], self.pad_id, self.device)
        return idx, lengths, torch.tensor([self.gold[i] for i in picks], device=self.device)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state, "classification data")


class ClassifyTask(FinetuneTask):
    name = TASK
    command = "finetune classify"
    kind = "classifier"
    cfg: ClassifyConfig

    def inputs(self) -> list[str]:
        c = self.cfg
        return [p for p in (c.init, c.data, c.train, c.val, c.test) if p]

    def load(self) -> None:
        cfg = self.cfg
        self.open_start("a classifier", classifier_ok=True, need_eot=False)
        if self.base.kind == "classifier":
            raise UserError(f"--init {cfg.init} is already a classifier; pass the language-model run dir it was "
                            "fine-tuned from (or any run dir made by `gpt2lab pretrain` / `import-hf`)")
        splits, self.data_identity = _load_splits(cfg)
        labels = label_order([ex.label for ex in splits["train"]], cfg.labels)
        _check_labels(splits, labels)
        self.labels, self.splits = labels, splits
        label_id = {name: i for i, name in enumerate(labels)}
        block = self.base.model_config.block_size
        if cfg.max_length is not None and cfg.max_length > block:
            raise UserError(f"--max-length {cfg.max_length} is longer than the model's context ({block}); "
                            f"use at most {block}")
        self.pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        full = {k: encode_texts(self.tokenizer, [ex.text for ex in v], block) for k, v in splits.items()}
        self.max_length = cfg.max_length or max(len(s) for s in full["train"])
        self.seqs = {k: [s[:self.max_length] for s in v] for k, v in full.items()}
        self.gold = {k: [label_id[ex.label] for ex in v] for k, v in splits.items()}
        self.sizes = {k: len(v) for k, v in splits.items()}
        console(f"data: {self.sizes['train']:,} train, {self.sizes['val']:,} validation and {self.sizes['test']:,} "
                f"test examples; {len(labels)} labels ({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''})")
        self.best = {"epoch": None, "key": None, "metrics": None}
        self.history: list[dict] = []

    def seq_len(self, model_config: GPTConfig) -> int:
        return self.max_length

    def _lora(self) -> dict | None:
        c = self.cfg
        if c.train_mode != "lora":
            return None
        return {"rank": c.lora_rank, "alpha": float(c.lora_alpha), "dropout": float(c.lora_dropout),
                "targets": c.target_list}

    def build_model(self, model_config: GPTConfig, resuming: bool) -> torch.nn.Module:
        cfg = self.cfg
        model = GPTClassifier(model_config, len(self.labels))
        if not (resuming or cfg.random_init):  # the pretrained transformer; the head starts from the seed
            model.transformer.load_state_dict(self.start_model().transformer.state_dict())
        set_train_mode(model, cfg.train_mode, cfg.last_blocks, self._lora())
        return model

    def train_loader(self):
        dist = self.ctx.dist
        self.loader = ExampleLoader(self.seqs["train"], self.gold["train"], self.cfg.batch_size, self.pad_id,
                                    seed=self.cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                    device=self.ctx.device)
        return self.loader

    def loss(self, model, batch):
        idx, lengths, target = batch
        return F.cross_entropy(model(idx, lengths).float(), target), {}

    def evaluate(self, model, step: int) -> dict:
        metrics = {}
        for name in SPLITS:
            probs = predict_proba(model, self.seqs[name], self.pad_id, batch_size=4 * self.cfg.batch_size)
            metrics[name] = classification_metrics(probs, self.gold[name], self.labels)
        ctx = self.ctx
        epoch = step / max(1, math.ceil(self.loader.steps_per_epoch / ctx.grad_accum))
        record = {"epoch": round(epoch, 3), **{f"{k}_accuracy": metrics[k]["accuracy"] for k in SPLITS},
                  **{f"{k}_loss": metrics[k]["loss"] for k in SPLITS}}
        self.history.append({"step": step, **record})
        # kept: the best validation accuracy, ties broken by the lower validation loss (then the
        # earlier epoch); without a validation split, the last evaluation
        val = metrics["val"]
        key = [val["accuracy"], -val["loss"]] if val["n"] else None
        improved = key is None or self.best["key"] is None or key > self.best["key"]
        if improved:
            self.best = {"epoch": record["epoch"], "step": step, "key": key, "metrics": metrics}
            if self.cfg.keep_best and ctx.dist.is_main:
                save_weights(model, ctx.out / BEST_FILE)
        # the test split is scored every time (for the kept epoch's results) but shown once, at the end: choosing
        # by it would make it a second validation split
        return {k: v for k, v in record.items() if v is not None and k != "epoch" and not k.startswith("test_")}

    def state_dict(self) -> dict:
        return {"best": self.best, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", self.best)
        self.history = list(state.get("history", []))

    def run_config(self) -> dict:
        head = {"type": "linear", "pooling": "last_token", "num_classes": len(self.labels),
                "max_length": self.max_length, "pad_id": self.pad_id, "weights": ["score.weight", "score.bias"]}
        extra = {"labels": self.labels, "head": head,
                 "base": {"run_dir": str(Path(self.cfg.init).resolve()), "lora": self.base.lora,
                          "random_init": self.cfg.random_init}}
        if self._lora():
            extra["lora"] = self._lora()
        return extra

    def save_final(self, model) -> None:
        out = self.ctx.out
        best = out / BEST_FILE
        if self.cfg.keep_best and best.is_file():
            load_weights(model, best)
        if self._lora():
            save_weights(model, out / ckpt.WEIGHTS_FILE, exclude_lora=True)
            save_lora(model, out / ckpt.LORA_FILE)
        else:
            save_weights(model, out / ckpt.WEIGHTS_FILE)
        best.unlink(missing_ok=True)

    def finish(self, result: TrainResult) -> None:
        metrics = self.best["metrics"]
        trainable = lora_mod.count_trainable(self.ctx.model)
        total = sum(p.numel() for p in self.ctx.model.parameters())
        self.results = {f"{k}_accuracy": metrics[k]["accuracy"] for k in SPLITS}
        self.results.update(best_epoch=self.best["epoch"], labels=self.labels, sizes=self.sizes,
                            train_mode=self.cfg.train_mode, trainable_params=trainable, total_params=total,
                            per_class={k: metrics[k]["per_class"] for k in SPLITS}, history=self.history)
        io.write_json(self.ctx.out / RESULTS_FILE, self.results)
        kept = f"the epoch {self.best['epoch']:g} weights (best validation accuracy)" if self.cfg.keep_best and \
            metrics["val"]["n"] else "the last weights"
        shown = [f"{k} accuracy {metrics[k]['accuracy']:.4f} ({metrics[k]['n']:,} examples)" for k in SPLITS
                 if metrics[k]["n"]]
        console(f"kept {kept}: " + ", ".join(shown))


def _load_splits(cfg: ClassifyConfig) -> tuple[dict[str, list[Example]], dict]:
    read = dict(text_field=cfg.text_field, label_field=cfg.label_field, columns=cfg.columns, fmt=cfg.format)
    if cfg.data is not None:
        examples = read_examples(cfg.data, **read)
        label_order([ex.label for ex in examples], cfg.labels)  # one class: say so before splitting
        splits = make_splits(examples, cfg.val_fraction, cfg.test_fraction, cfg.balance, cfg.seed)
        info = {"source": str(Path(cfg.data).resolve()), "sha256": file_sha256(cfg.data), "examples": len(examples),
                "balance": cfg.balance, "val_fraction": cfg.val_fraction,
                "test_fraction": cfg.test_fraction, "seed": cfg.seed}
    else:
        splits = {"train": read_examples(cfg.train, **read)}
        if cfg.balance:
            splits["train"] = balance_classes(splits["train"], random.Random(cfg.seed))
        for name in ("val", "test"):
            path = getattr(cfg, name)
            splits[name] = read_examples(path, **read) if path else []
        info = {"files": {k: str(Path(p).resolve()) for k in SPLITS if (p := getattr(cfg, k))},
                "sha256": {k: file_sha256(p) for k in SPLITS if (p := getattr(cfg, k))},
                "balance": cfg.balance, "seed": cfg.seed}
    info.update(text_field=cfg.text_field, label_field=cfg.label_field, columns=cfg.columns,
                sizes={k: len(v) for k, v in splits.items()})
    if not splits["train"]:
        raise UserError("no training examples are left after the split; lower --val-fraction/--test-fraction")
    return splits, info


def _check_labels(splits: dict[str, list[Example]], labels: list[str]) -> None:
    known = set(labels)
    for name in ("val", "test"):
        for ex in splits[name]:
            if ex.label not in known:
                raise UserError(f"{ex.where}: label {ex.label!r} of the {name} data was not seen in the "
                                f"training data (labels: {', '.join(labels)}); remove those examples or "
                                "add some to the training data")


@dataclass
class ClassifyResult:
    run_dir: str
    labels: list[str]
    sizes: dict[str, int]
    best_epoch: float
    metrics: dict[str, dict]  # split -> classification_metrics of the kept epoch
    history: list[dict]  # one record per evaluation
    trainable_params: int
    total_params: int


def finetune_classifier(cfg: ClassifyConfig, given: dict | None = None) -> ClassifyResult:
    result = train_task(cfg, ClassifyTask, given)
    task = result.task
    r = getattr(task, "results", None) or io.read_json(Path(result.run_dir) / RESULTS_FILE)
    return ClassifyResult(result.run_dir, r["labels"], r["sizes"], r["best_epoch"],
                          task.best["metrics"] if task.best["metrics"] else {}, r["history"],
                          r["trainable_params"], r["total_params"])


# ------------------------------------------------------------------------ using a classifier


def load_classifier(run_dir: str | Path, device="cpu"):
    """(model, tokenizer, labels, head) of a classifier run dir."""
    info = ckpt.open_run(run_dir)
    model, tokenizer = info.load(device, kind="classifier")
    return model, tokenizer, info.labels, info.head


def classify_texts(model: GPTClassifier, tokenizer, labels: list[str], head: dict, texts: list[str],
                   batch_size: int = 32) -> list[dict]:
    """[{"label": ..., "probs": {label: p}}] for each text."""
    max_length = min(int(head.get("max_length") or model.config.block_size), model.config.block_size)
    pad_id = int(head.get("pad_id", tokenizer.eot_id or 0))
    probs = predict_proba(model, encode_texts(tokenizer, texts, max_length), pad_id, batch_size)
    out = []
    for row in probs.tolist():
        best = max(range(len(labels)), key=lambda c: row[c])
        out.append({"label": labels[best], "probs": {name: round(p, 6) for name, p in zip(labels, row)}})
    return out
