"""The `gpt2lab` command: parse arguments, call one library function, report.

Each command group lives in its own module here (tokenizer.py, data.py,
train.py, ...) with a `register(subparsers)` function; every subcommand is a
thin layer that builds the arguments of one library function and calls it.
Mistakes a user can fix (a `UserError`, a bad flag, an output that cannot be
written) end with one line `error: ...` on stderr and exit status 2; anything
else is a bug and keeps its traceback. Heavy imports (torch) happen inside the
handlers, so `--help` is instant. Set GPT2LAB_DEBUG=1 to see the traceback
behind an error line.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

# commands that write nothing (Ctrl-C loses nothing)
READ_ONLY = ("generate", "chat", "serve", "info", "plot")
# command modules, in the order `gpt2lab --help` lists them
COMMAND_MODULES = ["tokenizer", "data", "train", "generate", "serve", "export", "evaluate", "finetune", "ablate",
                   "info"]


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, names the command's own help, and exits 2. Flags
    are never abbreviated: `pretrain --init RUN` must not quietly mean --init-from."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message}{self._suggestion(message)}; see `{self.prog} --help`\n")
        sys.exit(2)

    def _suggestion(self, message: str) -> str:
        """"did you mean --lr?" for a mistyped flag."""
        import difflib
        import re

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:  # a mistyped command or choice
            choices = re.findall(r"'?([\w.-]+)'?", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            return f" (did you mean {close[0]}?)" if close else ""
        if not message.startswith("unrecognized arguments:"):
            return ""
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        for word in message.split(":", 1)[1].split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.7)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""


# ------------------------------------------------------------------ argument types


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


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite (range checks belong to the setting)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be in [0, 1)")
    return value


def comma_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of names")
    return names


def unescape(text: str | None) -> str | None:
    r"""Let '\n', '\t', '\\' and '\xNN'-style escapes on the command line mean what they say."""
    if text is None:
        return None
    try:
        return text.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as e:
        from gpt2lab.errors import UserError

        raise UserError(f"{text!r} has an invalid escape sequence ({e.reason}); write \\n, \\t or \\\\, "
                        "or quote the text without escapes") from None


# ------------------------------------------------------------------ the parser


def _leaf_parsers(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in action.choices.values():
            yield from _leaf_parsers(child)


def build_parser() -> argparse.ArgumentParser:
    from gpt2lab import __version__

    p = Parser(prog="gpt2lab",
               description="GPT-2 from scratch: tokenizer, data, pretraining, generation, Hugging Face "
               "interop, evaluation, fine-tuning (SFT, LoRA, classification, RL), serving and ablations. "
               "`gpt2lab COMMAND --help` for each.")
    p.add_argument("--version", action="version", version=f"gpt2lab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"gpt2lab.cli.{name}").register(sub)
    for leaf in _leaf_parsers(p):
        leaf.set_defaults(_parser=leaf)
    return p


def _parse(parser: argparse.ArgumentParser, argv):
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand, so that the help it names is the right one
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> None:
    from gpt2lab.errors import Interrupted, UserError
    from gpt2lab.io import WRITE_ERRNOS

    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `gpt2lab`: what it can do
        parser.print_help()
        sys.exit(0)
    args = _parse(parser, argv)
    try:
        code = args.func(args)
    except UserError as e:
        if os.environ.get("GPT2LAB_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _error(msg)
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as e:
        # an output that cannot be written (permissions, a full disk, a file in the way): the user's to fix
        if e.errno not in WRITE_ERRNOS or os.environ.get("GPT2LAB_DEBUG"):
            raise
        where = e.filename if e.filename is not None else "the output"
        _error(f"cannot write {where} ({e.strerror}); free space, fix the permissions or choose another path")
    except Interrupted as e:
        sys.stderr.write(f"\n{e}\n")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted (Ctrl-C); nothing was written\n" if args.command in READ_ONLY
                         else "\ninterrupted (Ctrl-C); outputs are written whole or not at all, so run the "
                         "command again\n")
        sys.exit(130)
    sys.exit(code or 0)


def _error(msg: str) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.stderr.write(f"error: {msg}\n")
    sys.exit(2)
