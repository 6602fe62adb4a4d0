"""`gpt2lab tokenizer train|encode|decode`."""

from __future__ import annotations

import json
import sys

from gpt2lab.cli import Parser, positive_int


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
        from gpt2lab.errors import UserError

        raise UserError(f"--ids must be integers separated by spaces or commas, got {args.ids!r}") from None
    sys.stdout.write(tok.decode(ids) + "\n")
    return 0



def register(sub) -> None:
    # tokenizer ...
    tp = sub.add_parser("tokenizer", help="train a byte-level BPE, or encode/decode text")
    tsub = tp.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=Parser)
    tsub.required = True

    t = tsub.add_parser("train", help="train a byte-level BPE on text files",
                        description="Train a byte-level BPE with GPT-2's pre-tokenisation regex and "
                        "<|endoftext|> as its special token. Deterministic for the same input.")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files (.txt, .gz, .jsonl), directories or globs")
    t.add_argument("--vocab-size", type=positive_int, required=True,
                   help="size of the vocabulary, the 256 bytes and <|endoftext|> included (training stops "
                   "earlier, with a smaller vocabulary, when no pair of tokens occurs twice any more)")
    t.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    t.add_argument("--name", default=None, help="a name recorded in the tokenizer (default: the out dir's)")
    t.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    t.add_argument("--max-chars", type=positive_int, default=None,
                   help="train on at most this many characters of the input")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a tokenizer dir trained earlier in --out (never another kind of directory)")
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
