"""`gpt2lab pretrain` and `gpt2lab plot`."""

from __future__ import annotations

import argparse
import os

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


def add_train_flags(p: argparse.ArgumentParser, cls=None, skip: tuple[str, ...] = (),
                    helps: dict[str, str] | None = None) -> None:
    """One flag per field of a TrainConfig (sub)class; defaults are None so only given flags override."""
    import typing

    from gpt2lab.config import TrainConfig

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    for f in cls.__dataclass_fields__.values():
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        base = base[0]
        help_text = {**_TRAIN_HELP, **(helps or {})}.get(f.name, "")
        if f.default is not None and f.default != "":
            help_text += f" (default {f.default})"
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, type=base, default=None, help=help_text,
                           metavar=f.name.upper() if base is str else None)


def resolve_config(args, cls):
    """Defaults, then the --config file, then the flags given, as a `cls` instance."""
    from dataclasses import fields as dc_fields

    from gpt2lab.config import load_config_file

    values = load_config_file(args.config, cls) if args.config else {}
    for f in dc_fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"bad training config: {e}") from None


def cmd_pretrain(args) -> int:
    from gpt2lab.config import TrainConfig
    from gpt2lab.train import pretrain

    cfg = resolve_config(args, TrainConfig)
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


def register(sub) -> None:
    # pretrain
    t = sub.add_parser("pretrain", help="train a GPT-2 from scratch on a data directory",
                       description="Pretrain a GPT-2. Settings come from the defaults, then --config "
                       "(TOML or YAML with the same names as the flags), then the flags.")
    t.add_argument("--config", default=None, help="a TOML or YAML file of settings")
    add_train_flags(t)
    t.set_defaults(func=cmd_pretrain)

    pl = sub.add_parser("plot", help="plot a run's loss and learning-rate curves to a PNG")
    pl.add_argument("run_dir", help="a run directory")
    pl.add_argument("--out", default=None, help="the PNG to write (default RUN_DIR/curves.png)")
    pl.set_defaults(func=cmd_plot)
