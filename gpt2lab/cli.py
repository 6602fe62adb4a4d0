"""The `gpt2lab` command: parse arguments, call one library function, report.

Each subcommand is a thin layer: it builds the arguments of a library
function and calls it. Mistakes a user can fix (`UserError`, `ValueError`
from validation, bad flags) end with one line `error: ...` on stderr and exit
status 2. Heavy imports (torch) happen inside the handlers, so `--help` is
instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message}; see `{self.prog} --help`\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


def _unescape(text: str | None) -> str | None:
    """Let '\\n' on the command line mean a newline (for --doc-separator)."""
    if text is None:
        return None
    return text.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


# ------------------------------------------------------------------ handlers


def cmd_tokenizer_train(args) -> int:
    from gpt2lab.tokenizer.train import train_bpe_to_dir

    train_bpe_to_dir(
        args.input,
        args.out,
        vocab_size=args.vocab_size,
        name=args.name,
        text_field=args.text_field,
        max_chars=args.max_chars,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return 0


def cmd_tokenizer_encode(args) -> int:
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer(args.tokenizer, fast=not args.slow)
    text = args.text if args.text is not None else sys.stdin.read()
    allowed = "all" if args.allow_special else ()
    print(json.dumps(tok.encode(text, allowed_special=allowed)))
    return 0


def cmd_tokenizer_decode(args) -> int:
    from gpt2lab.tokenizer import get_tokenizer

    tok = get_tokenizer(args.tokenizer, fast=not args.slow)
    try:
        ids = [int(x) for x in args.ids.replace(",", " ").replace("[", " ").replace("]", " ").split()]
    except ValueError:
        raise ValueError(f"--ids must be integers separated by spaces or commas, got {args.ids!r}") from None
    sys.stdout.write(tok.decode(ids) + "\n")
    return 0


def cmd_prepare(args) -> int:
    from gpt2lab.data import prepare

    if not args.input and not args.hf_dataset:
        raise ValueError("nothing to prepare: give input files with --input, or --hf-dataset NAME")
    prepare(
        args.input or [],
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        doc_separator=_unescape(args.doc_separator),
        hf_dataset=args.hf_dataset,
        hf_split=args.hf_split,
        hf_config=args.hf_config,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return 0


_TRAIN_HELP = {
    "data": "data directory made by `gpt2lab prepare`",
    "out": "run directory to write (config, weights, metrics, checkpoints)",
    "model": "model preset: gpt2, gpt2-medium, gpt2-large, gpt2-xl, mini, micro, nano, tiny",
    "n_layer": "override the preset's number of layers",
    "n_head": "override the preset's number of attention heads",
    "n_embd": "override the preset's width",
    "block_size": "override the preset's context length",
    "dropout": "dropout probability (default 0)",
    "bias": "biases in Linear and LayerNorm layers (GPT-2 has them)",
    "pad_vocab_multiple": "pad the embedding rows to a multiple of this, e.g. 64 (speed)",
    "max_steps": "optimizer steps to train for",
    "batch_size": "sequences per micro-batch, per process",
    "seq_len": "tokens per sequence (default: the model's context length)",
    "total_batch_tokens": "tokens per optimizer step; gradient accumulation is derived from it",
    "optimizer": "adamw (torch, fused on CUDA) or adamw-scratch (written out in gpt2lab/optim.py)",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay (default lr/10)",
    "warmup_steps": "steps of linear warmup",
    "weight_decay": "AdamW weight decay, applied to matrices only",
    "decay_embeddings": "apply weight decay to the embeddings too",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "data_order": "random windows or sequential passes over the data",
    "eval_every": "evaluate the validation loss every N steps",
    "eval_batches": "validation batches per evaluation",
    "sample_every": "print a text sample every N steps (0: only at the end)",
    "sample_tokens": "tokens per sample",
    "log_every": "print and record metrics every N steps",
    "checkpoint_every": "write a checkpoint every N steps (and at the end)",
    "keep_checkpoints": "how many of the newest checkpoints to keep",
    "tensorboard": "write TensorBoard event files (when tensorboard is installed)",
    "seed": "random seed", "device": "auto, cpu, cuda, cuda:N or mps",
    "dtype": "auto, fp32, bf16 or fp16 (auto: bf16 on CUDA, fp32 on CPU)",
    "compile": "compile the model with torch.compile",
    "resume": "continue the run in --out from its newest checkpoint",
    "init_from": "start from the weights of this run directory",
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are None so that only given flags override."""
    import typing

    from gpt2lab.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in TrainConfig.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        base = base[0]
        help_text = _TRAIN_HELP.get(f.name, "")
        if f.default is not None and f.default != "":
            help_text += f" (default {f.default})"
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, type=base, default=None, help=help_text,
                           metavar=f.name.upper() if base is str else None)


def cmd_pretrain(args) -> int:
    from dataclasses import fields as dc_fields

    from gpt2lab.config import TrainConfig, load_config_file
    from gpt2lab.train import pretrain

    values = load_config_file(args.config) if args.config else {}
    for f in dc_fields(TrainConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise ValueError(f"bad training config: {e}") from None
    result = pretrain(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _after_training(result, cfg)
    return 0


def _after_training(result, cfg) -> None:
    from gpt2lab.checkpoint import load_run
    from gpt2lab.generate import generate

    if result.final_val_loss is not None:
        print(f"final val loss {result.final_val_loss:.4f}")
    if cfg.sample_tokens:
        model, tok = load_run(result.run_dir)
        for i in range(2):
            ids = generate(model, [tok.eot_id], cfg.sample_tokens, temperature=0.8, top_k=50,
                           seed=cfg.seed + i, eot_id=tok.eot_id)
            print(f"--- sample {i + 1} ---\n{tok.decode(ids).strip()}")
    print(f"weights: {result.run_dir}/model.safetensors; plot the curves with "
          f"`gpt2lab plot {result.run_dir}`")


def cmd_plot(args) -> int:
    from gpt2lab.plot import plot_run

    path = plot_run(args.run_dir, args.out)
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------- parsers


def build_parser() -> argparse.ArgumentParser:
    from gpt2lab import __version__

    p = _Parser(prog="gpt2lab", description="GPT-2 from scratch: tokenizer, data, training, generation.")
    p.add_argument("--version", action="version", version=f"gpt2lab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # tokenizer ...
    tp = sub.add_parser("tokenizer", help="train a byte-level BPE, or encode/decode text")
    tsub = tp.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=_Parser)
    tsub.required = True

    t = tsub.add_parser("train", help="train a byte-level BPE on text files",
                        description="Train a byte-level BPE with GPT-2's pre-tokenisation regex and "
                        "<|endoftext|> as its special token. Deterministic for the same input.")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files (.txt, .gz, .jsonl), directories or globs")
    t.add_argument("--vocab-size", type=_positive_int, required=True,
                   help="size of the vocabulary, the 256 bytes and <|endoftext|> included")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    t.add_argument("--name", default=None, help="a name recorded in the tokenizer (default: the out dir's)")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    t.add_argument("--max-chars", type=_positive_int, default=None,
                   help="train on at most this many characters of the input")
    t.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --out")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=cmd_tokenizer_train)

    for action, func, helptext in (("encode", cmd_tokenizer_encode, "print the ids of a text"),
                                   ("decode", cmd_tokenizer_decode, "print the text of ids")):
        e = tsub.add_parser(action, help=helptext, description=helptext)
        e.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer directory")
        if action == "encode":
            e.add_argument("--text", default=None, help="the text (default: read standard input)")
            e.add_argument("--allow-special", action="store_true",
                           help="turn the text <|endoftext|> into its special id")
        else:
            e.add_argument("--ids", required=True, help="ids, e.g. '15496 995' or '[15496, 995]'")
        e.add_argument("--slow", action="store_true", help="use the from-scratch encoder, not tiktoken")
        e.set_defaults(func=func)

    # prepare
    d = sub.add_parser("prepare", help="tokenise text into train/val shards",
                       description="Tokenise documents into a data directory of train and val shards "
                       "with <|endoftext|> between documents, plus meta.json.")
    d.add_argument("--input", nargs="+", metavar="PATH", help="text files (.txt, .gz, .jsonl), dirs or globs")
    d.add_argument("--out", required=True, help="the data directory to create")
    d.add_argument("--tokenizer", default="gpt2", help="'gpt2' (default) or a tokenizer directory")
    d.add_argument("--val-fraction", type=_fraction, default=0.005,
                   help="share of whole documents held out for validation (default 0.005)")
    d.add_argument("--text-field", default="text", help="field holding the text in .jsonl / datasets")
    d.add_argument("--doc-separator", default=None,
                   help="also split files into documents at this string (e.g. '\\n\\n\\n')")
    d.add_argument("--hf-dataset", default=None, metavar="NAME",
                   help="stream a Hugging Face dataset (needs the [hf] extra and a network)")
    d.add_argument("--hf-split", default="train", help="dataset split to read (default train)")
    d.add_argument("--hf-config", default=None, help="dataset configuration name")
    d.add_argument("--workers", type=_positive_int, default=None,
                   help="tokeniser processes (default: the number of CPUs)")
    d.add_argument("--shard-tokens", type=_positive_int, default=100_000_000,
                   help="tokens per shard file (default 100M)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing data directory")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_prepare)

    # pretrain
    t = sub.add_parser("pretrain", help="train a GPT-2 from scratch on a data directory",
                       description="Pretrain a GPT-2. Settings come from the defaults, then --config "
                       "(TOML or YAML with the same names as the flags), then the flags.")
    t.add_argument("--config", default=None, help="a TOML or YAML file of settings")
    _add_train_flags(t)
    t.set_defaults(func=cmd_pretrain)

    pl = sub.add_parser("plot", help="plot a run's loss and learning-rate curves to a PNG")
    pl.add_argument("run_dir", help="a run directory")
    pl.add_argument("--out", default=None, help="the PNG to write (default RUN_DIR/curves.png)")
    pl.set_defaults(func=cmd_plot)

    return p


def main(argv: list[str] | None = None) -> None:
    from gpt2lab.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except (UserError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"error: {msg}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    sys.exit(code or 0)
