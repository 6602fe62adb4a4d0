"""The `gpt2lab` command: parse arguments, call one library function, report.

Each command group lives in its own module here (tokenizer.py, data.py,
train.py, ...) with a `register(subparsers)` function; every subcommand is a
thin layer that builds the arguments of one library function and calls it.
Mistakes a user can fix (`UserError`, `ValueError` from validation, bad
flags) end with one line `error: ...` on stderr and exit status 2. Heavy
imports (torch) happen inside the handlers, so `--help` is instant. Set
GPT2LAB_DEBUG=1 to see the traceback behind an error line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command modules, in the order `gpt2lab --help` lists them
COMMAND_MODULES = ["tokenizer", "data", "train", "generate", "hf", "evaluate", "finetune"]


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message}; see `{self.prog} --help`\n")
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


def unescape(text: str | None) -> str | None:
    """Let '\\n' on the command line mean a newline (for --doc-separator)."""
    if text is None:
        return None
    return text.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


def build_parser() -> argparse.ArgumentParser:
    from gpt2lab import __version__

    p = Parser(prog="gpt2lab",
               description="GPT-2 from scratch: tokenizer, data, pretraining, generation, Hugging Face "
               "interop, evaluation and fine-tuning. `gpt2lab COMMAND --help` for each.")
    p.add_argument("--version", action="version", version=f"gpt2lab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"gpt2lab.cli.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    from gpt2lab.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except (UserError, ValueError) as e:
        if os.environ.get("GPT2LAB_DEBUG"):
            raise
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
