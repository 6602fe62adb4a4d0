"""`gpt2lab prepare`: text to token shards."""

from __future__ import annotations

from gpt2lab.cli import fraction, positive_int, unescape


def cmd_prepare(args) -> int:
    from gpt2lab.data.prepare import prepare

    if not args.input and not args.hf_dataset:
        from gpt2lab.errors import UserError

        raise UserError("nothing to prepare: give input files with --input, or --hf-dataset NAME")
    prepare(
        args.input or [],
        args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        doc_separator=unescape(args.doc_separator),
        hf_dataset=args.hf_dataset,
        hf_split=args.hf_split,
        hf_config=args.hf_config,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return 0



def register(sub) -> None:
    # prepare
    d = sub.add_parser("prepare", help="tokenise text into train/val shards",
                       description="Tokenise documents into a data directory of train and val shards "
                       "with <|endoftext|> between documents, plus meta.json.")
    d.add_argument("--input", nargs="+", metavar="PATH", help="text files (.txt, .gz, .jsonl), dirs or globs")
    d.add_argument("--out", required=True, help="the data directory to create")
    d.add_argument("--tokenizer", default="gpt2", help="'gpt2' (default) or a tokenizer directory")
    d.add_argument("--val-fraction", type=fraction, default=0.005,
                   help="share of whole documents held out for validation (default 0.005)")
    d.add_argument("--text-field", default="text", help="field holding the text in .jsonl / datasets (default text)")
    d.add_argument("--doc-separator", default=None,
                   help="also split files into documents at this string (e.g. '\\n\\n\\n')")
    d.add_argument("--hf-dataset", default=None, metavar="NAME",
                   help="stream a Hugging Face dataset (needs the [hf] extra and a network)")
    d.add_argument("--hf-split", default="train", help="dataset split to read (default train)")
    d.add_argument("--hf-config", default=None, help="dataset configuration name")
    d.add_argument("--workers", type=positive_int, default=None,
                   help="tokeniser processes (default: the number of CPUs)")
    d.add_argument("--shard-tokens", type=positive_int, default=100_000_000,
                   help="tokens per shard file (default 100M)")
    d.add_argument("--overwrite", action="store_true", help="replace a data dir prepared earlier in --out "
                   "(never another kind of directory, nor one that is, holds or lies inside an input)")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_prepare)
