"""Fine-tuning GPT-2 as a text classifier (the book's chapter 6: SMS spam).

    text -> ids (truncated to max_length) -> right-padded with <|endoftext|>
         -> the transformer -> hidden state of the last real token -> ln_f -> score -> class logits

Causal attention lets the last token see the whole text, so its hidden state
is the one to classify from. Padding sits after it and cannot change it, so a
text gets the same logits alone or in a batch with longer texts (the book
reads the last position, padding included; here the last real token is picked).

Data (`read_examples`): CSV, TSV or JSONL, with configurable text and label
fields. CSV and TSV files have a header line unless `columns` names their
columns (sms_spam.tsv has none: `columns=["label", "text"]`). TSV fields are
split on tabs with no quoting (SMS texts contain quote characters); CSV uses
standard CSV quoting. Labels are strings (a JSON 0/1 becomes "0"/"1"); they are
numbered in sorted order (numerically when all are integers) unless `labels`
gives the order.

Splits (`make_splits`), when one file is given: with `balance`, every class is
downsampled (at random) to the size of the smallest; then all examples are
shuffled and cut into train / val / test. The train and val sizes are rounded
down and test takes the rest, as the book does: 1,284 balanced SMS examples with
fractions 0.7/0.1/0.2 give 898/128/258. Without a test split, val takes the
rest. The same seed gives the same splits.

What trains (`train_mode`): "all"; "last-blocks" (the last N blocks, the final
LayerNorm and the head: the book's choice, N = 1); "head"; "lora" (adapters on
the targeted linear layers, plus the head).

The output run dir:
    config.json        the base model config, "task": "classify", "labels", "head", "train", "data"
                       (and "lora" in LoRA mode)
    model.safetensors  the transformer (no LM head) + the head as score.weight / score.bias;
                       in LoRA mode the transformer is the unchanged base
    lora.safetensors   the adapters (LoRA mode only; `gpt2lab merge-lora` folds them in)
    tokenizer.json
    results.json       accuracies and per-class precision/recall/F1 of the kept (best) epoch, and
                       the history of every epoch
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab import checkpoint as ckpt
from gpt2lab.errors import UserError
from gpt2lab.finetune import lora as lora_mod
from gpt2lab.model import GPT, GPTConfig, trunk

TASK = "classify"
RESULTS_FILE = "results.json"
TRAIN_MODES = ("all", "last-blocks", "head", "lora")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl"}
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------- the model


class GPTClassifier(nn.Module):
    """GPT-2's transformer with a linear head on the last real token instead of the LM head.

    The parameter names are the LM's (`transformer.h.0...`) plus `score.weight` and
    `score.bias`, so a pretrained run's weights load into it unchanged.
    """

    def __init__(self, config: GPTConfig, num_classes: int, transformer: nn.ModuleDict | None = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.transformer = transformer if transformer is not None else GPT(config).transformer
        self.score = nn.Linear(config.n_embd, num_classes)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.score.bias)

    @classmethod
    def from_lm(cls, model: GPT, num_classes: int) -> GPTClassifier:
        """Reuse a (pretrained) GPT's transformer; its LM head is dropped."""
        return cls(model.config, num_classes, transformer=model.transformer)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) right-padded ids, lengths (B,) real tokens per row -> logits (B, num_classes)."""
        B, T = idx.shape
        t = self.transformer
        x = trunk(t, self.config.block_size, idx)  # (B, T, C)
        last = (lengths - 1) if lengths is not None else torch.full((B,), T - 1, device=idx.device)
        x = x[torch.arange(B, device=idx.device), last]  # (B, C): the last real token of each row
        return self.score(t.ln_f(x))  # LayerNorm acts per position, so after the pick is the same


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


# ------------------------------------------------------------------------------ data


@dataclass
class Example:
    text: str
    label: str
    where: str  # "file:line", for error messages


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("csv", "tsv", "jsonl"):
            raise UserError(f"unknown data format {fmt!r}; choose csv, tsv or jsonl")
        return fmt
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise UserError(f"cannot tell the format of {path} from its extension; name it .csv, .tsv or "
                        ".jsonl, or pass --format csv|tsv|jsonl")
    return found


def _label_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def read_examples(path: str | Path, text_field: str = "text", label_field: str = "label",
                  columns: list[str] | None = None, fmt: str | None = None) -> list[Example]:
    """(text, label) pairs of a CSV, TSV or JSONL file; see the module docstring for the rules."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; check the path of the data file")
    fmt = _format_of(path, fmt)
    if fmt == "jsonl":
        if columns:
            raise UserError("--columns names the columns of a CSV/TSV file without a header; a JSONL "
                            "file names its fields itself (use --text-field and --label-field)")
        return _read_jsonl(path, text_field, label_field)
    return _read_table(path, fmt, text_field, label_field, columns)


def _read_table(path: Path, fmt: str, text_field: str, label_field: str,
                columns: list[str] | None) -> list[Example]:
    kwargs = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, **kwargs)
        if columns:
            names, first = list(columns), 1
        else:
            try:
                names = next(rows)
            except StopIteration:
                raise UserError(f"{path} is empty; it needs a header line and examples") from None
            first = 2
        for want in (text_field, label_field):
            if want not in names:
                hint = (" If the file has no header line, name its columns with --columns, e.g. "
                        f"--columns {label_field},{text_field}") if not columns else ""
                which = "--text-field" if want == text_field else "--label-field"
                raise UserError(f"{path} has no column {want!r} ({which}); its columns are: "
                                f"{', '.join(repr(n) for n in names)}.{hint}")
        ti, li = names.index(text_field), names.index(label_field)
        out = []
        for lineno, row in enumerate(rows, start=first):
            if not row or row == [""]:
                continue
            if len(row) != len(names):
                raise UserError(f"{path}:{lineno} has {len(row)} fields, the header names {len(names)} "
                                f"({', '.join(names)}); fix the line or the --columns")
            out.append(Example(row[ti], row[li], f"{path}:{lineno}"))
    return _checked(out, path)


def _read_jsonl(path: Path, text_field: str, label_field: str) -> list[Example]:
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e}); each line must hold one "
                                "JSON object") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno} holds a {type(record).__name__}, not a JSON object")
            for want, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
                if want not in record:
                    raise UserError(f"{path}:{lineno} has no field {want!r} ({flag}); its fields are: "
                                    f"{', '.join(repr(k) for k in record)}")
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, "
                                "not text; choose the text field with --text-field")
            out.append(Example(text, _label_text(record[label_field]), f"{path}:{lineno}"))
    return _checked(out, path)


def _checked(examples: list[Example], path: Path) -> list[Example]:
    if not examples:
        raise UserError(f"{path} holds no examples")
    for ex in examples:
        if ex.label.strip() == "":
            raise UserError(f"{ex.where} has an empty label; every example needs one")
    return examples


def label_order(labels, given: list[str] | None = None) -> list[str]:
    """The class names in id order: `given`, or sorted (numerically when all are integers)."""
    found = set(labels)
    if given:
        if len(set(given)) != len(given):
            raise UserError(f"--labels {','.join(given)} names a label twice")
        unknown = sorted(found - set(given))
        if unknown:
            raise UserError(f"the training data has labels {unknown} that --labels {','.join(given)} "
                            "does not list; add them or leave --labels out")
        names = list(given)
    else:
        try:
            names = sorted(found, key=int)
        except ValueError:
            names = sorted(found)
    present = [n for n in names if n in found]
    if len(present) < 2:
        raise UserError(f"the training data has a single class ({', '.join(present) or 'none'}); a "
                        "classifier needs examples of at least two (check --label-field)")
    return names


def balance_classes(examples: list[Example], rng: random.Random) -> list[Example]:
    """Downsample every class to the size of the smallest (a random subset, order kept)."""
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    n = min(len(v) for v in by_label.values())
    keep = set()
    for label in sorted(by_label):
        keep.update(rng.sample(by_label[label], n))
    return [ex for i, ex in enumerate(examples) if i in keep]


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test): train and val rounded down, test takes the rest (val does, without test)."""
    v, t = Fraction(str(val_fraction)), Fraction(str(test_fraction))
    if v < 0 or t < 0 or v + t >= 1:
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be "
                        "non-negative and leave some examples to train on")
    n_train = math.floor(n * (1 - v - t))
    if t == 0:
        return n_train, n - n_train, 0
    n_val = math.floor(n * v)
    return n_train, n_val, n - n_train - n_val


def make_splits(examples: list[Example], val_fraction: float, test_fraction: float, balance: bool,
                seed: int) -> dict[str, list[Example]]:
    rng = random.Random(seed)
    if balance:
        examples = balance_classes(examples, rng)
    examples = list(examples)
    rng.shuffle(examples)
    n_train, n_val, _ = split_sizes(len(examples), val_fraction, test_fraction)
    return {"train": examples[:n_train], "val": examples[n_train:n_train + n_val],
            "test": examples[n_train + n_val:]}


# ------------------------------------------------------------------------ batches


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids, cut to max_length (the start is kept); an empty text is one <|endoftext|>."""
    eot = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    return [(tokenizer.encode(t) or [eot])[:max_length] for t in texts]


def collate(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest in the batch: (B, T) ids and (B,) lengths."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return idx.to(device), lengths.to(device)


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
        idx, lengths = collate([seqs[i] for i in chunk], pad_id, device)
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


# ------------------------------------------------------------------------ fine-tuning


@dataclass
class ClassifyConfig:
    init: str  # the run dir to start from (pretrained or imported)
    out: str
    data: str | None = None  # one file, split here ...
    train: str | None = None  # ... or the splits given
    val: str | None = None
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    columns: list[str] | None = None  # the columns of a CSV/TSV without a header line
    format: str | None = None  # csv | tsv | jsonl (default: from the extension)
    labels: list[str] | None = None  # class order (default: sorted)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    balance: bool = False
    max_length: int | None = None  # default: the longest training example, at most the context
    train_mode: str = "last-blocks"
    last_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(lora_mod.DEFAULT_TARGETS))
    epochs: int = 5
    lr: float = 5e-5
    batch_size: int = 8
    weight_decay: float = 0.1
    grad_clip: float = 0.0  # 0: no clipping
    random_init: bool = False  # discard the --init weights (keep its architecture and tokenizer)
    seed: int = 123
    device: str = "auto"
    quiet: bool = False

    def validate(self) -> None:
        if (self.data is None) == (self.train is None):
            raise UserError("give the data as --data FILE (split here) or as --train FILE [--val FILE "
                            "--test FILE], not both and not neither")
        if self.data is not None and (self.val or self.test):
            raise UserError("--val/--test go with --train; with --data the splits are made from "
                            "--val-fraction and --test-fraction")
        if self.train_mode not in TRAIN_MODES:
            raise UserError(f"unknown --train-mode {self.train_mode!r}; choose one of: "
                            f"{', '.join(TRAIN_MODES)}")
        for name in ("epochs", "batch_size", "last_blocks", "lora_rank"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_length is not None and self.max_length < 1:
            raise UserError("--max-length must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("--lr must be positive, --weight-decay and --grad-clip non-negative")


@dataclass
class ClassifyResult:
    run_dir: str
    labels: list[str]
    sizes: dict[str, int]
    best_epoch: int
    metrics: dict[str, dict]  # split -> classification_metrics of the kept epoch
    history: list[dict]  # one record per epoch
    trainable_params: int
    total_params: int


def _load_splits(cfg: ClassifyConfig) -> tuple[dict[str, list[Example]], dict]:
    read = dict(text_field=cfg.text_field, label_field=cfg.label_field, columns=cfg.columns, fmt=cfg.format)
    if cfg.data is not None:
        examples = read_examples(cfg.data, **read)
        label_order([ex.label for ex in examples], cfg.labels)  # one class: say so before splitting
        splits = make_splits(examples, cfg.val_fraction, cfg.test_fraction, cfg.balance, cfg.seed)
        info = {"source": str(Path(cfg.data).resolve()), "examples": len(examples),
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
                "balance": cfg.balance, "seed": cfg.seed}
    info.update(text_field=cfg.text_field, label_field=cfg.label_field, columns=cfg.columns)
    return splits, info


def _check_labels(splits: dict[str, list[Example]], labels: list[str]) -> None:
    known = set(labels)
    for name in ("val", "test"):
        for ex in splits[name]:
            if ex.label not in known:
                raise UserError(f"{ex.where}: label {ex.label!r} of the {name} data was not seen in the "
                                f"training data (labels: {', '.join(labels)}); remove those examples or "
                                "add some to the training data")


def _load_base(init: str):
    try:
        cfg = ckpt.read_run_config(init)
    except UserError as e:
        raise UserError(f"--init {init} is not a run dir ({e})") from None
    if cfg.get("task") == TASK:
        raise UserError(f"--init {init} is already a classifier; pass the language-model run dir it was "
                        "fine-tuned from (or any run dir made by `gpt2lab pretrain` / `import-hf`)")
    model, tokenizer = lora_mod.load_lora_run(init, merge=True)  # adapters of a LoRA run folded in
    return model, tokenizer, cfg


def finetune_classifier(cfg: ClassifyConfig) -> ClassifyResult:
    from gpt2lab.distributed import resolve_device
    from gpt2lab.metrics import console
    from gpt2lab.optim import make_optimizer

    cfg.validate()
    say = (lambda line: None) if cfg.quiet else console
    out = Path(cfg.out)
    if (out / ckpt.CONFIG_FILE).exists():
        raise UserError(f"{out} already holds a run; choose another --out or delete it")
    device = resolve_device(cfg.device)

    lm, tokenizer, base_cfg = _load_base(cfg.init)
    if cfg.random_init:  # a baseline: the same architecture and tokenizer, no pretraining
        torch.manual_seed(cfg.seed)
        lm = GPT(lm.config)
    splits, data_info = _load_splits(cfg)
    labels = label_order([ex.label for ex in splits["train"]], cfg.labels)
    _check_labels(splits, labels)
    label_id = {name: i for i, name in enumerate(labels)}
    block = lm.config.block_size
    if cfg.max_length is not None and cfg.max_length > block:
        raise UserError(f"--max-length {cfg.max_length} is longer than the model's context ({block}); "
                        f"use at most {block}")
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    full = {k: encode_texts(tokenizer, [ex.text for ex in v], block) for k, v in splits.items()}
    max_length = cfg.max_length or max(len(s) for s in full["train"])
    seqs = {k: [s[:max_length] for s in v] for k, v in full.items()}
    gold = {k: [label_id[ex.label] for ex in v] for k, v in splits.items()}
    sizes = {k: len(v) for k, v in splits.items()}

    torch.manual_seed(cfg.seed)
    model = GPTClassifier.from_lm(lm, len(labels))
    lora_settings = None
    if cfg.train_mode == "lora":
        lora_settings = {"rank": cfg.lora_rank, "alpha": float(cfg.lora_alpha),
                         "dropout": float(cfg.lora_dropout), "targets": list(cfg.lora_targets)}
    set_train_mode(model, cfg.train_mode, cfg.last_blocks, lora_settings)
    model.to(device)
    trainable = lora_mod.count_trainable(model)
    total = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, kind="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                               betas=(0.9, 0.999), device_type=device.type)
    say(f"classify: {sizes['train']:,} train / {sizes['val']:,} val / {sizes['test']:,} test examples, "
        f"labels {labels}, max length {max_length} tokens; training {trainable:,} of {total:,} "
        f"parameters ({cfg.train_mode}) on {device}")

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    head = {"type": "linear", "pooling": "last_token", "num_classes": len(labels), "max_length": max_length,
            "pad_id": pad_id, "weights": ["score.weight", "score.bias"]}
    extra = {"task": TASK, "labels": labels, "head": head,
             "base": {"run_dir": str(Path(cfg.init).resolve()), "lora": base_cfg.get("lora"),
                      "random_init": cfg.random_init}}
    if lora_settings:
        extra["lora"] = lora_settings

    def evaluate_all() -> dict[str, dict]:
        results = {}
        for name in SPLITS:
            probs = predict_proba(model, seqs[name], pad_id, batch_size=4 * cfg.batch_size)
            results[name] = classification_metrics(probs, gold[name], labels)
        return results

    def save() -> None:
        if lora_settings:
            model.lora_settings = lora_settings
            lora_mod.save_lora_run_weights(model, out)
        else:
            ckpt.save_weights(model, out / ckpt.WEIGHTS_FILE)
        ckpt.write_run_config(out, lm.config, tokenizer_identity=tokenizer.identity(), train=asdict(cfg),
                              data={**data_info, "sizes": sizes}, extra=extra)

    rng = random.Random(cfg.seed)
    history, best, best_key, best_metrics = [], 0, None, None
    train_ids = list(range(len(seqs["train"])))
    for epoch in range(1, cfg.epochs + 1):
        t0, losses = time.time(), []
        model.train()
        rng.shuffle(train_ids)
        for start in range(0, len(train_ids), cfg.batch_size):
            chunk = train_ids[start:start + cfg.batch_size]
            idx, lengths = collate([seqs["train"][i] for i in chunk], pad_id, device)
            target = torch.tensor([gold["train"][i] for i in chunk], device=device)
            loss = F.cross_entropy(model(idx, lengths).float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
        metrics = evaluate_all()
        record = {"epoch": epoch, "loss": sum(losses) / len(losses), "seconds": round(time.time() - t0, 2),
                  **{f"{k}_accuracy": metrics[k]["accuracy"] for k in SPLITS},
                  **{f"{k}_loss": metrics[k]["loss"] for k in SPLITS}}
        history.append(record)
        # kept: the best validation accuracy, ties broken by the lower validation loss (then the
        # earlier epoch); without a validation split, the last epoch
        val = metrics["val"]
        key = (val["accuracy"], -val["loss"]) if val["n"] else None
        improved = key is None or best_key is None or key > best_key
        if improved:
            best, best_key, best_metrics = epoch, key, copy.deepcopy(metrics)
            save()
        say(f"epoch {epoch}/{cfg.epochs} | loss {record['loss']:.4f} | "
            + " | ".join(f"{k} {_pct(metrics[k]['accuracy'])}" for k in SPLITS)
            + f" | {record['seconds']:.1f} s" + (" | kept" if improved else ""))

    results = {f"{k}_accuracy": best_metrics[k]["accuracy"] for k in SPLITS}
    results.update(best_epoch=best, labels=labels, sizes=sizes, train_mode=cfg.train_mode,
                   trainable_params=trainable, total_params=total,
                   per_class={k: best_metrics[k]["per_class"] for k in SPLITS}, history=history)
    ckpt.write_json(out / RESULTS_FILE, results)
    say(f"kept epoch {best}: " + ", ".join(f"{k} accuracy {_pct(best_metrics[k]['accuracy'])}"
                                            for k in SPLITS) + f"; wrote {out}")
    return ClassifyResult(str(out), labels, sizes, best, best_metrics, history, trainable, total)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


# ------------------------------------------------------------------------ using a classifier


def check_head(cfg: dict, run_dir: Path) -> list[str]:
    """The labels of a classifier run config, validated."""
    labels, head = cfg.get("labels"), cfg.get("head")
    if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels)
            or not isinstance(head, dict) or head.get("num_classes") != len(labels)):
        raise UserError(f"{run_dir / ckpt.CONFIG_FILE} is a classifier config without valid \"labels\" "
                        "and \"head\" entries; fine-tune it again with `gpt2lab finetune classify`")
    return labels


def load_classifier(run_dir: str | Path, device="cpu"):
    """(model, tokenizer, labels, head) of a run dir written by `finetune_classifier`."""
    run_dir = Path(run_dir)
    cfg = ckpt.read_run_config(run_dir)
    if cfg.get("task") != TASK:
        raise UserError(f"{run_dir} is not a classifier (task {cfg.get('task', 'language model')!r}); "
                        "make one with `gpt2lab finetune classify --init RUN_DIR ...`")
    labels = check_head(cfg, run_dir)
    model, tokenizer = lora_mod.load_lora_run(run_dir, device=device)
    return model, tokenizer, labels, cfg["head"]


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
