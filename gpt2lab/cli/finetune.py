"""`gpt2lab finetune classify|sft|instructions`, `gpt2lab classify` and `gpt2lab merge-lora`."""

from __future__ import annotations

import argparse
import json
import sys

from gpt2lab.cli import Parser, fraction, positive_int


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of names")
    return names


# flags whose value is given only when set: the defaults live in ClassifyConfig, once
_CONFIG_FLAGS = ("data", "train", "val", "test", "text_field", "label_field", "columns", "format", "labels",
                 "val_fraction", "test_fraction", "max_length", "train_mode", "last_blocks", "lora_rank",
                 "lora_alpha", "lora_dropout", "lora_targets", "epochs", "lr", "batch_size", "weight_decay",
                 "grad_clip", "seed", "device")


def cmd_finetune_classify(args) -> int:
    from gpt2lab.finetune.classify import ClassifyConfig, finetune_classifier

    values = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    cfg = ClassifyConfig(init=args.init, out=args.out, balance=args.balance, random_init=args.random_init,
                         **values)
    finetune_classifier(cfg)
    return 0


def _read_inputs(path: str, text_field: str) -> list[str]:
    from pathlib import Path

    from gpt2lab.errors import UserError

    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p} does not exist; --input takes a text file (one text per line) or JSONL")
        text = p.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    if not path.endswith((".jsonl", ".ndjson")):
        return lines
    texts = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            fields = ", ".join(repr(k) for k in record) if isinstance(record, dict) else "none"
            raise UserError(f"{path}:{lineno} has no text field {text_field!r}; its fields are: {fields} "
                            "(choose one with --text-field)")
        texts.append(record[text_field])
    return texts


def cmd_classify(args) -> int:
    from gpt2lab.distributed import resolve_device
    from gpt2lab.finetune.classify import classify_texts, load_classifier

    if (args.text is None) == (args.input is None):
        raise ValueError("give the texts with --text TEXT (repeatable) or --input FILE, one of the two")
    texts = args.text if args.text is not None else _read_inputs(args.input, args.text_field)
    model, tokenizer, labels, head = load_classifier(args.run_dir, device=resolve_device(args.device))
    for row in classify_texts(model, tokenizer, labels, head, texts, batch_size=args.batch_size):
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0


def cmd_merge_lora(args) -> int:
    from gpt2lab.finetune.lora import merge_lora_run

    out = merge_lora_run(args.run_dir, args.out)
    print(f"merged the LoRA adapters of {args.run_dir} into {out}")
    return 0


_SFT_SKIP = ("model", "n_layer", "n_head", "n_embd", "block_size", "bias", "pad_vocab_multiple", "init_from",
             "data_order")
_SFT_HELP = {
    "data": "instruction records: Alpaca JSON/JSONL (instruction, input, output) or chat JSONL (messages)",
    "out": "the run dir to write",
    "init": "the run dir to fine-tune (from `gpt2lab pretrain` or `gpt2lab import-hf`)",
    "val_data": "held-out records (default: every k-th record of --data, k = 1/--val-fraction)",
    "val_fraction": "share of --data held out when --val-data is not given",
    "template": "prompt template: alpaca or chat (chat records always use chat)",
    "seq_len": "tokens per example, prompt and response together (default: the model's context)",
    "epochs": "passes over the training records (overrides --max-steps)",
    "lora_rank": "train LoRA adapters of this rank instead of all weights (0: off)",
    "lora_alpha": "LoRA scale numerator (the update is alpha/rank * B A)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_targets": "comma-separated layers to adapt: c_attn, c_proj, c_fc, attn, mlp, h.N",
    "lr": "peak learning rate (default 6e-4; 1e-4 to 5e-5 suits full fine-tuning)",
}


def cmd_finetune_sft(args) -> int:
    from gpt2lab.cli.train import resolve_config
    from gpt2lab.config import SFTConfig
    from gpt2lab.finetune.sft import finetune_sft

    cfg = resolve_config(args, SFTConfig)
    result = finetune_sft(cfg)
    if result.final_val_loss is not None:
        print(f"final val loss {result.final_val_loss:.4f} (response tokens only)")
    print(f"try it: gpt2lab chat {result.run_dir} -p \"...\"")
    return 0


def cmd_instructions(args) -> int:
    from gpt2lab.finetune.instructions import build_instruction_set

    counts = build_instruction_set(args.out, args.source, synthetic=args.synthetic,
                                   heldout_fraction=args.heldout_fraction, seed=args.seed)
    for split, per_task in counts.items():
        total = sum(per_task.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(per_task.items()))
        print(f"{split}: {total} records ({detail})")
    print(f"wrote {args.out}/train.jsonl and {args.out}/heldout.jsonl")
    return 0


def register(sub) -> None:
    from gpt2lab.cli.train import add_train_flags
    from gpt2lab.config import SFTConfig

    ft = sub.add_parser("finetune", help="fine-tune a run dir (classify, sft)",
                        description="Fine-tune a pretrained or imported run dir; writes a new run dir.")
    ft_sub = ft.add_subparsers(dest="finetune_command", metavar="TASK", parser_class=Parser)
    ft_sub.required = True
    c = ft_sub.add_parser(
        "classify", help="train a text classifier on a CSV/TSV/JSONL file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a run dir as a classifier: a linear head on the hidden state of the last "
        "token.\n\nData: --data FILE is split here (optionally --balance'd: every class downsampled to "
        "the smallest,\nthen shuffled; train and val sizes are rounded down, test takes the rest), or "
        "the splits are\ngiven with --train/--val/--test. CSV/TSV files have a header line unless "
        "--columns names the\ncolumns; TSV is split on tabs without quoting.\n\n"
        "The book's SMS spam setup:\n  gpt2lab finetune classify --init RUN --data sms_spam.tsv "
        "--columns label,text --balance --out OUT")
    c.add_argument("--init", required=True, metavar="RUN_DIR", help="the run dir to start from")
    c.add_argument("--out", required=True, metavar="RUN_DIR", help="the classifier run dir to write")
    c.add_argument("--random-init", action="store_true", help="a baseline: keep --init's architecture and "
                   "tokenizer but start from random weights")
    d = c.add_argument_group("data")
    d.add_argument("--data", metavar="FILE", help="one file, split into train/val/test here")
    d.add_argument("--train", metavar="FILE", help="the training split (instead of --data)")
    d.add_argument("--val", metavar="FILE", help="the validation split (with --train)")
    d.add_argument("--test", metavar="FILE", help="the test split (with --train)")
    d.add_argument("--format", choices=["csv", "tsv", "jsonl"], help="default: from the file extension")
    d.add_argument("--text-field", metavar="NAME", help="the column or field holding the text (default text)")
    d.add_argument("--label-field", metavar="NAME", help="the column or field holding the label "
                   "(default label)")
    d.add_argument("--columns", type=_names, metavar="A,B,..", help="column names of a CSV/TSV without a "
                   "header line, e.g. label,text")
    d.add_argument("--labels", type=_names, metavar="A,B,..", help="the classes in id order "
                   "(default: sorted, numerically when all are integers)")
    d.add_argument("--val-fraction", type=fraction, help="with --data (default 0.1)")
    d.add_argument("--test-fraction", type=fraction, help="with --data (default 0.2)")
    d.add_argument("--balance", action="store_true", help="downsample every class to the smallest's size")
    d.add_argument("--max-length", type=positive_int, help="truncate texts to this many tokens "
                   "(default: the longest training text, at most the model's context)")
    m = c.add_argument_group("what trains")
    m.add_argument("--train-mode", choices=["all", "last-blocks", "head", "lora"],
                   help="all, last-blocks (the last N blocks + final LayerNorm + head), head, or lora "
                   "(adapters + head) (default last-blocks)")
    m.add_argument("--last-blocks", type=positive_int, help="N for --train-mode last-blocks (default 1)")
    m.add_argument("--lora-rank", type=positive_int, help="LoRA rank r (default 8)")
    m.add_argument("--lora-alpha", type=float,
                   help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    m.add_argument("--lora-dropout", type=fraction, help="dropout on the adapters' input (default 0)")
    m.add_argument("--lora-targets", type=_names, metavar="A,B,..",
                   help="layers to adapt: c_attn, c_proj (attention and MLP), c_fc, attn.c_proj, "
                   "mlp.c_proj, attn, mlp, h.N (default c_attn,c_proj,c_fc: every linear layer)")
    o = c.add_argument_group("optimisation")
    o.add_argument("--epochs", type=positive_int, help="passes over the training data (default 5)")
    o.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-5)")
    o.add_argument("--batch-size", type=positive_int, help="examples per step (default 8)")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    o.add_argument("--grad-clip", type=float, help="clip the gradient norm (default 0: off)")
    o.add_argument("--seed", type=int, help="seed of the splits, the head and the batch order (default 123)")
    o.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    c.set_defaults(func=cmd_finetune_classify)

    t = ft_sub.add_parser("sft", help="instruction fine-tuning on Alpaca or chat records",
                          description="Instruction fine-tuning: the loss is on response tokens only, an "
                          "<|endoftext|> ends each response, the template is stored in the run dir for "
                          "`gpt2lab chat`. Settings: defaults, then --config, then flags.")
    t.add_argument("--config", default=None, help="a TOML or YAML file of settings")
    add_train_flags(t, SFTConfig, skip=_SFT_SKIP, helps=_SFT_HELP)
    t.set_defaults(func=cmd_finetune_sft)

    i = ft_sub.add_parser("instructions", help="build an instruction set from Q/A and checkable tasks",
                          description="Write train.jsonl and heldout.jsonl: generated tasks with exactly "
                          "checkable answers (arithmetic, spelling backwards, letter counts, copying with a "
                          "change) plus, with --source, Q/A material converted to instructions.")
    i.add_argument("--out", required=True, help="directory for train.jsonl and heldout.jsonl")
    i.add_argument("--source", default=None, help="a folder with chatterbot/*.yml, gsm8k_test.jsonl.gz, "
                   "squad_val_1000.jsonl.gz")
    i.add_argument("--synthetic", type=int, default=4000, help="generated checkable records (default 4000)")
    i.add_argument("--heldout-fraction", type=fraction, default=0.1, help="held-out share (default 0.1)")
    i.add_argument("--seed", type=int, default=0, help="seed of the generated tasks and the split")
    i.set_defaults(func=cmd_instructions)

    k = sub.add_parser("classify", help="label texts with a classifier run dir",
                       description="Print one JSON object per text: {\"label\": ..., \"probs\": {label: p}}.")
    k.add_argument("run_dir", help="a run dir written by `gpt2lab finetune classify`")
    k.add_argument("--text", action="append", help="a text to classify (repeatable)")
    k.add_argument("--input", metavar="FILE", help="one text per line, or JSONL (.jsonl) with --text-field; "
                   "- reads stdin")
    k.add_argument("--text-field", default="text", help="the text field of JSONL input (default text)")
    k.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    k.set_defaults(func=cmd_classify)

    g = sub.add_parser("merge-lora", help="fold LoRA adapters into the weights",
                       description="Write a copy of a LoRA run dir with the adapters merged into the "
                       "weights: an ordinary run dir (no lora.safetensors).")
    g.add_argument("run_dir", help="a run dir with lora.safetensors")
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="the merged run dir to write")
    g.set_defaults(func=cmd_merge_lora)
