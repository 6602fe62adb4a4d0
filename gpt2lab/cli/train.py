"""`gpt2lab pretrain` and `gpt2lab plot`; the flags of every training command come from here."""

from __future__ import annotations

import argparse

from gpt2lab.cli import comma_list, finite_float, positive_int


def _gib(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of GiB")
    return value


def add_config_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of a config dataclass: its help, allowed values and default come from the field's
    metadata. Defaults are None in the parser, so only flags actually given override the config file."""
    from dataclasses import MISSING, fields

    from gpt2lab.train.config import field_types

    types = field_types(cls)
    model_group = p.add_argument_group("model architecture (the fields of GPTConfig)")
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, meta = types[f.name], f.metadata
        help_text = meta.get("help", "")
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory
                                                                is not MISSING else None)
        if default not in (None, "", []) and not meta.get("model"):
            shown = ",".join(default) if isinstance(default, list) else default
            if isinstance(default, bool):
                shown = "on" if default else "off"
            help_text += f" (default {shown})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        target = model_group if meta.get("model") else p
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif meta.get("choices"):
            target.add_argument(flag, choices=meta["choices"], default=None, help=help_text)
        else:
            typ = {int: int, float: finite_float, list: comma_list}.get(kind, str)
            metavar = {list: "A,B,..", str: f.name.upper()}.get(kind)
            target.add_argument(flag, type=typ, default=None, help=help_text, metavar=metavar)


def resolve_config(args, cls):
    """(config, given): defaults, then the --config file, then the flags given. `given` holds the settings
    that were set explicitly (in the file or as flags), which a resumed run checks against its own."""
    from dataclasses import fields as dc_fields

    from gpt2lab.train.config import build, load_config_file

    given = load_config_file(args.config, cls) if getattr(args, "config", None) else {}
    for f in dc_fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            given[f.name] = value
    values = dict(given)
    if "max_steps" in given and "epochs" not in given:
        values["epochs"] = None  # an explicit length replaces one derived from a default number of epochs
    return build(cls, values), given


def cmd_pretrain(args) -> int:
    from gpt2lab.train.config import TrainConfig
    from gpt2lab.train.distributed import launched_as_main
    from gpt2lab.train.pretrain import pretrain

    cfg, given = resolve_config(args, TrainConfig)
    if args.dry_run:
        from gpt2lab.train.plan import plan

        text = plan(cfg, processes=args.processes, gpu_memory=args.gpu_memory)
        if launched_as_main():  # (under torchrun: one plan, not one per process)
            print(text)
        return 0
    if launched_as_main():
        _cpu_note(cfg, given)
    result = pretrain(cfg, given)
    if launched_as_main():
        _after_training(result, result.settings or cfg)
    return 0


def _cpu_note(cfg, given: dict) -> None:
    """A run that takes the GPU-sized defaults on a CPU is told what it costs and what a CPU wants instead."""
    from gpt2lab.device import resolve_device
    from gpt2lab.model.config import PRESETS

    if cfg.resume or cfg.init_from or "model" in given or given.get("n_layer") or given.get("n_embd") \
            or resolve_device(cfg.device).type != "cpu":
        return
    size = PRESETS[cfg.model]
    print(f"note: no --model or --config, so this trains the {cfg.model} preset ({size['n_layer']} layers, width "
          f"{size['n_embd']}: GPT-2's 124M parameters at --model gpt2) for {cfg.max_steps} steps on the CPU, which "
          "takes hours to days (the first steps print an estimate). On a CPU start with `--config "
          "configs/demo.toml` (a 4-layer model, minutes) or `--model mini`; stop with Ctrl-C and resume later",
          flush=True)


def _after_training(result, cfg) -> None:
    from gpt2lab.checkpoint import load_run
    from gpt2lab.generate import generate

    if result.final_val_loss is not None:
        print(f"final val loss {result.final_val_loss:.4f}")
    if cfg.sample_tokens:
        model, tok = load_run(result.run_dir)
        if tok.eot_id is not None:
            for i in range(2):
                ids = generate(model, [tok.eot_id], cfg.sample_tokens, temperature=0.8, top_k=50,
                               seed=cfg.seed + i, eot_id=tok.eot_id)
                print(f"--- sample {i + 1} ---\n{tok.decode(ids).strip()}")
    print(f"weights: {result.run_dir}/model.safetensors; plot the curves with "
          f"`gpt2lab plot {result.run_dir}`")


def cmd_plot(args) -> int:
    from gpt2lab.plot import plot_run, plot_runs

    if len(args.run_dir) == 1:
        path = plot_run(args.run_dir[0], args.out)
    else:
        path = plot_runs(args.run_dir, args.out or "compare.png")
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    from gpt2lab.train.config import TrainConfig

    t = sub.add_parser("pretrain", help="train a GPT-2 from scratch on a data directory",
                       description="Pretrain a GPT-2. Settings come from the defaults, then --config "
                       "(TOML or YAML with the same names as the flags), then the flags. With --resume the run's "
                       "stored settings are used; a flag that differs is refused unless it may change on resume "
                       "(--max-steps extends the run; logging, evaluation, checkpoint and device flags).")
    t.add_argument("--config", default=None, help="a TOML or YAML file of settings")
    add_config_flags(t, TrainConfig)
    d = t.add_argument_group("planning (nothing is trained)")
    d.add_argument("--dry-run", action="store_true", help="print the plan: parameters, tokens per step, "
                   "accumulation, FLOPs, and the estimated memory per process under ddp and fsdp")
    d.add_argument("--gpu-memory", type=_gib, default=None, metavar="GIB",
                   help="with --dry-run: the memory of one GPU; says what to change when the run will not fit")
    d.add_argument("--processes", type=positive_int, default=None,
                   help="with --dry-run: plan for this many processes (default: torchrun's, else 1)")
    t.set_defaults(func=cmd_pretrain)

    pl = sub.add_parser("plot", help="plot a run's loss and learning-rate curves to a PNG (several: compared)")
    pl.add_argument("run_dir", nargs="+", metavar="RUN_DIR", help="a run directory; more than one are drawn on "
                    "one figure")
    pl.add_argument("--out", default=None, help="the PNG to write (default RUN_DIR/curves.png, or compare.png "
                    "for several runs; an existing file is replaced only if it is a PNG)")
    pl.set_defaults(func=cmd_plot)
