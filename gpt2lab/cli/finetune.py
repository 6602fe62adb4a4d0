"""`gpt2lab finetune classify|sft|instructions`, `gpt2lab classify` and `gpt2lab merge-lora`."""

from __future__ import annotations

import argparse
import json
import sys

from gpt2lab.cli import Parser, fraction, nonneg_int, positive_int


def cmd_finetune_classify(args) -> int:
    from gpt2lab.cli.train import resolve_config
    from gpt2lab.finetune.classify import finetune_classifier
    from gpt2lab.finetune.config import ClassifyConfig

    cfg, given = resolve_config(args, ClassifyConfig)
    result = finetune_classifier(cfg, given)
    if _is_main():  # under torchrun only rank 0 speaks
        print(f"try it: gpt2lab classify {result.run_dir} --text \"...\"")
    return 0


def _is_main() -> bool:
    from gpt2lab.train.distributed import launched_as_main

    return launched_as_main()


def _read_inputs(path: str, text_field: str) -> list[str]:
    from gpt2lab import io
    from gpt2lab.errors import UserError

    if path == "-":
        text = sys.stdin.read()
    else:
        text = io.read_text(path, "input file", "--input takes a text file (one text per line) or JSONL")
    if not path.endswith((".jsonl", ".ndjson")):
        return text.splitlines()
    texts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            fields = ", ".join(repr(k) for k in record) if isinstance(record, dict) else "none"
            raise UserError(f"{path}:{lineno} has no text field {text_field!r}; its fields are: {fields} "
                            "(choose one with --text-field)")
        texts.append(record[text_field])
    return texts


def cmd_classify(args) -> int:
    from gpt2lab.device import resolve_device
    from gpt2lab.errors import UserError
    from gpt2lab.finetune.classify import classify_texts, load_classifier

    if (args.text is None) == (args.input is None):
        raise UserError("give the texts with --text TEXT (repeatable) or --input FILE, one of the two")
    texts = args.text if args.text is not None else _read_inputs(args.input, args.text_field)
    model, tokenizer, labels, head = load_classifier(args.run_dir, device=resolve_device(args.device))
    for row in classify_texts(model, tokenizer, labels, head, texts, batch_size=args.batch_size):
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0


def cmd_merge_lora(args) -> int:
    from gpt2lab.checkpoint import write_merged_run

    out = write_merged_run(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"merged the LoRA adapters of {args.run_dir} into {out}")
    return 0


def cmd_finetune_sft(args) -> int:
    from gpt2lab.cli.train import resolve_config
    from gpt2lab.finetune.config import SFTConfig
    from gpt2lab.finetune.sft import finetune_sft

    cfg, given = resolve_config(args, SFTConfig)
    result = finetune_sft(cfg, given)
    if not _is_main():  # under torchrun only rank 0 speaks
        return 0
    if result.final_val_loss is not None:
        print(f"final val loss {result.final_val_loss:.4f} (response tokens only)")
    print(f"try it: gpt2lab chat {result.run_dir} -p \"...\"")
    return 0


def cmd_finetune_rl(args) -> int:
    from gpt2lab.cli.train import resolve_config
    from gpt2lab.finetune.config import RLConfig
    from gpt2lab.finetune.rl import finetune_rl

    cfg, given = resolve_config(args, RLConfig)
    result = finetune_rl(cfg, given)
    last = result.evals[-1] if result.evals else {}
    if "val_pass_at_1" in last:
        print(f"held-out pass@1 {last['val_pass_at_1']:.3f} after {result.steps[-1] if result.steps else 0} steps")
    print(f"score it: gpt2lab eval {result.run_dir} --task {cfg.task or 'TASK'}")
    return 0


def cmd_instructions(args) -> int:
    from gpt2lab.finetune.instructions import build_instruction_set, build_task_set

    if args.task:
        if args.source:
            from gpt2lab.errors import UserError

            raise UserError("--task builds a set from a built-in task alone; drop --source")
        counts = build_task_set(args.out, args.task, args.synthetic, difficulty=args.difficulty, think=args.think,
                                heldout=200 if args.heldout is None else args.heldout, seed=args.seed,
                                overwrite=args.overwrite, heldout_flag=None if args.heldout is None else "--heldout")
    else:
        counts = build_instruction_set(args.out, args.source, synthetic=args.synthetic,
                                       heldout_fraction=args.heldout_fraction, seed=args.seed,
                                       overwrite=args.overwrite, question_field=args.question_field,
                                       answer_field=args.answer_field)
    for split, per_task in counts.items():
        total = sum(per_task.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(per_task.items()))
        print(f"{split}: {total} records ({detail})")
    print(f"wrote {args.out}/train.jsonl and {args.out}/heldout.jsonl")
    return 0


def register(sub) -> None:
    from gpt2lab.cli.train import add_config_flags
    from gpt2lab.finetune.config import ClassifyConfig, RLConfig, SFTConfig

    ft = sub.add_parser("finetune", help="fine-tune a run dir (classify, sft, instructions, rl)",
                        description="Fine-tune a pretrained or imported run dir; writes a new run dir. "
                        "`instructions` builds an instruction set for `sft`.")
    ft_sub = ft.add_subparsers(dest="finetune_command", metavar="TASK", parser_class=Parser)
    ft_sub.required = True
    c = ft_sub.add_parser(
        "classify", help="train a text classifier on a CSV/TSV/JSONL file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a run dir as a classifier: a linear head on the hidden state of the last "
        "token, trained on the shared loop\n(checkpoints, --resume, DDP, mixed precision).\n\nData: --data FILE "
        "is split here (optionally --balance'd: every class downsampled to the smallest,\nthen shuffled; train "
        "and val sizes are rounded down, test takes the rest), or the splits are\ngiven with "
        "--train/--val/--test. CSV/TSV files have a header line unless --columns names the\ncolumns; TSV is "
        "split on tabs without quoting.\n\nThe book's SMS spam setup:\n  gpt2lab finetune classify --init RUN "
        "--data sms_spam.tsv --columns label,text --balance --out OUT")
    c.add_argument("--config", default=None, help="a TOML or YAML file of settings")
    add_config_flags(c, ClassifyConfig)
    c.set_defaults(func=cmd_finetune_classify)

    t = ft_sub.add_parser("sft", help="instruction fine-tuning on Alpaca or chat records",
                          description="Instruction fine-tuning: the loss is on response tokens only, an "
                          "<|endoftext|> ends each response, the chat format is stored in the run dir for "
                          "`gpt2lab chat`. Settings: defaults, then --config, then flags.")
    t.add_argument("--config", default=None, help="a TOML or YAML file of settings")
    add_config_flags(t, SFTConfig)
    t.set_defaults(func=cmd_finetune_sft)

    i = ft_sub.add_parser("instructions", help="build an instruction set from Q/A and checkable tasks",
                          description="Write train.jsonl and heldout.jsonl: generated tasks with exactly "
                          "checkable answers (arithmetic, spelling backwards, letter counts, copying with a "
                          "change) plus, with --source, Q/A material converted to instructions.")
    i.add_argument("--out", required=True, help="the directory to write (train.jsonl, heldout.jsonl)")
    i.add_argument("--source", default=None, help="your Q/A file (.jsonl, .json, .csv or .tsv with named fields), "
                   "or a folder with chatterbot/*.yml, gsm8k_test.jsonl.gz, squad_val_1000.jsonl.gz")
    i.add_argument("--question-field", default=None, metavar="NAME", help="the field of --source holding the "
                   "question (default: question, prompt, instruction, query, ...)")
    i.add_argument("--answer-field", default=None, metavar="NAME", help="the field of --source holding the "
                   "answer (default: answer, output, response, completion, ...)")
    i.add_argument("--synthetic", type=nonneg_int, default=4000, help="generated checkable records (default 4000)")
    i.add_argument("--heldout-fraction", type=fraction, default=0.1, help="held-out share (default 0.1)")
    i.add_argument("--seed", type=nonneg_int, default=0, help="seed of the generated tasks and the split (default 0)")
    i.add_argument("--overwrite", action="store_true", help="replace an instruction set made earlier in --out")
    i.add_argument("--task", choices=["arithmetic", "countdown"], default=None,
                   help="instead: chat records of a built-in checkable task (--synthetic of them), with worked "
                   "steps in a <think> section when --think is given; held-out prompts never in train")
    i.add_argument("--difficulty", type=positive_int, default=1, help="with --task: 1 to 5 (default 1)")
    i.add_argument("--think", action="store_true", help="with --task: answers begin with <think>worked steps</think>")
    i.add_argument("--heldout", type=nonneg_int, default=None,
                   help="with --task: held-out records (default 200, or all the task has when it has fewer)")
    i.set_defaults(func=cmd_instructions)

    r = ft_sub.add_parser("rl", help="reinforcement learning on a checkable task (group-relative policy gradient)",
                          description="Tune a run dir with reinforcement learning: for each prompt, --group-size "
                          "answers are sampled and rewarded by a checker; each answer's advantage is its reward minus "
                          "its group's mean; the loss is a token-level policy gradient (clipped when samples serve "
                          "several updates), with an optional KL penalty to the starting model. Built-in tasks "
                          "(--task) or your own (--prompts FILE.jsonl --reward PATH.py:FUNCTION). Settings: "
                          "defaults, then --config, then flags.")
    r.add_argument("--config", default=None, help="a TOML or YAML file of settings")
    add_config_flags(r, RLConfig)
    r.set_defaults(func=cmd_finetune_rl)

    k = sub.add_parser("classify", help="label texts with a classifier run dir",
                       description="Print one JSON object per text: {\"label\": ..., \"probs\": {label: p}}.")
    k.add_argument("run_dir", help="a run dir written by `gpt2lab finetune classify`")
    k.add_argument("--text", action="append", help="a text to classify (repeatable)")
    k.add_argument("--input", metavar="FILE", help="one text per line, or JSONL (.jsonl) with --text-field; "
                   "- reads stdin")
    k.add_argument("--text-field", default="text", help="the text field of JSONL input (default text)")
    k.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass (default 32)")
    k.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    k.set_defaults(func=cmd_classify)

    g = sub.add_parser("merge-lora", help="fold LoRA adapters into the weights",
                       description="Write a copy of a LoRA run dir with the adapters merged into the "
                       "weights: an ordinary run dir (no lora.safetensors).")
    g.add_argument("run_dir", help="a run dir with lora.safetensors")
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="the merged run dir to write")
    g.add_argument("--overwrite", action="store_true", help="replace a run dir merged earlier in --out")
    g.set_defaults(func=cmd_merge_lora)
