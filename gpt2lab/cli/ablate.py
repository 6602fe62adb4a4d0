"""`gpt2lab ablate`: variants of a model trained on the same data, seed and budget, compared in one table."""

from __future__ import annotations

import argparse
import shlex

from gpt2lab.cli import Parser


def _variant_parser():
    from gpt2lab.cli.train import add_config_flags
    from gpt2lab.train.config import TrainConfig

    # a variant's flags are pretrain's (whose --help lists them), never abbreviated
    p = Parser(prog="gpt2lab pretrain", add_help=False, allow_abbrev=False)
    add_config_flags(p, TrainConfig, skip=("data", "out", "resume"))
    return p


def cmd_ablate(args) -> int:
    from gpt2lab.cli.train import resolve_config
    from gpt2lab.errors import UserError
    from gpt2lab.evals.ablate import ablate, parse_variant, table
    from gpt2lab.train.config import TrainConfig

    if not args.variant:
        raise UserError('give at least one --variant NAME=FLAGS (e.g. --variant "base=" --variant '
                        '"rope=--pos-embedding rope")')
    if args.resume:
        raise UserError("ablate resumes by itself: run the same command again on the same --out")
    shared_cfg, shared = resolve_config(args, TrainConfig)
    shared.pop("out", None)
    if args.time_budget is not None:
        shared["time_budget"] = args.time_budget
    parser = _variant_parser()
    variants = []
    for spec in args.variant:
        name, flags = parse_variant(spec)
        try:
            parsed = parser.parse_args(shlex.split(flags))
        except ValueError as e:  # shlex: an unclosed quote
            raise UserError(f"--variant {spec!r}: {e}") from None
        own = {k: v for k, v in vars(parsed).items() if v is not None and not k.startswith("_")}
        variants.append((name, own, flags))
    rows = ablate(shared, variants, args.out, retrain=args.retrain)
    print(table(rows))
    print(f"wrote {args.out}/ablation.json and {args.out}/ablation.png")
    return 0


def register(sub) -> None:
    from gpt2lab.cli.train import add_config_flags
    from gpt2lab.train.config import TrainConfig

    a = sub.add_parser("ablate", help="train variants on the same data and budget; compare their val bpb",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train every --variant as a pretraining run in OUT/NAME with the shared flags "
                       "plus its own, the same seed\nand the same budget (steps, or --time-budget seconds each); "
                       "measure each one's held-out loss and bits per byte;\nwrite OUT/ablation.json and "
                       "OUT/ablation.png and print a table against the first variant. Run it again on the\nsame "
                       "--out to go on where it stopped.\n\n"
                       "  gpt2lab ablate --data DATA --out OUT --model micro --max-steps 300 \\\n"
                       "      --variant \"base=\" --variant \"rope=--pos-embedding rope --norm rmsnorm\"")
    a.add_argument("--variant", action="append", metavar="NAME=FLAGS",
                   help="a variant: its name and its pretrain flags (repeatable; the first is the baseline)")
    a.add_argument("--config", default=None, help="a TOML or YAML file of the shared settings")
    a.add_argument("--retrain", action="store_true", help="train again a variant in --out whose settings differ "
                   "from this command's (without it, such a variant is refused, naming the settings)")
    add_config_flags(a, TrainConfig)
    a.set_defaults(func=cmd_ablate)
