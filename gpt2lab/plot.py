"""`gpt2lab plot RUN_DIR [RUN_DIR ...]`: train/val loss (or, for an RL run, reward and held-out pass rate)
and the learning rate against steps; several runs on one figure to compare them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpt2lab import io
from gpt2lab.errors import UserError


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a run directory; pass one written by `gpt2lab pretrain`")
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a run directory written by `gpt2lab pretrain`")
    records = []
    for line in io.read_text(path, "metrics file").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise UserError(f"{path} has no metrics yet; train for at least --log-every steps")
    return records


def _label(run_dir) -> str:
    """The run as a title names it: its path as given, and what it is (task, layers, parameters)."""
    try:
        config = io.read_json_object(Path(run_dir) / io.RUN_CONFIG, "run config")
    except UserError:
        return str(run_dir)
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    parts = [str(config.get("task") or "")] + ([f"{model['n_layer']} layers, width {model['n_embd']}"]
                                               if {"n_layer", "n_embd"} <= set(model) else [])
    return f"{run_dir} ({', '.join(p for p in parts if p)})" if any(parts) else str(run_dir)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib; install it with `pip install 'gpt2lab[plot]'`") from None
    return plt


def _steps(records: list[dict], key: str) -> list[dict]:
    return [r for r in records if key in r and isinstance(r.get("step"), (int, float))]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """One run's curves: losses (or an RL run's reward and pass rate) and the learning rate."""
    plt = _pyplot()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    io.check_output_file(out, "png", flag="--out")
    records = read_metrics(run_dir)
    train, val = _steps(records, "loss"), _steps(records, "val_loss")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    rl = [r for r in train if "reward" in r]
    if rl:  # reinforcement learning: the reward and the held-out pass rate are the curves that matter
        passed = _steps(records, "val_pass_at_1")
        steps, rewards = [r["step"] for r in rl], [r["reward"] for r in rl]
        ax_loss.plot(steps, rewards, lw=0.8, alpha=0.4, label="reward (each step)")
        window = max(1, len(rl) // 20)
        smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
                  for i in range(len(rewards))]
        ax_loss.plot(steps, smooth, lw=1.8, label=f"reward (mean of {window})")
        if passed:
            ax_loss.plot([r["step"] for r in passed], [r["val_pass_at_1"] for r in passed], "o-", lw=1.5,
                         label="held-out pass@1 (greedy)")
        ax_loss.set_ylabel("reward / pass rate")
    else:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val", lw=1.5)
        ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title(_label(run_dir), fontsize=10)
    ax_lr.plot([r["step"] for r in train], [r.get("lr", float("nan")) for r in train], color="tab:green")
    # tokens on a second x axis: tokens grow linearly with steps
    with_tokens = [r for r in train if r.get("tokens") and r["step"]]
    if with_tokens and not rl:
        per_step = with_tokens[-1]["tokens"] / with_tokens[-1]["step"]
        top = ax_loss.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens")
    return _save(plt, fig, ax_loss, ax_lr, out)


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Several runs on one figure: each one's train loss (thin) and validation loss (points), and learning
    rate, in its own colour, against steps; the legend names the runs."""
    plt = _pyplot()
    out = Path(out)
    io.check_output_file(out, "png", flag="--out")
    runs = [(run_dir, read_metrics(run_dir)) for run_dir in run_dirs]  # every one readable before drawing
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for k, (run_dir, records) in enumerate(runs):
        color = f"C{k % 10}"
        train, val = _steps(records, "loss"), _steps(records, "val_loss")
        name = _label(run_dir)
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, lw=0.8, alpha=0.5)
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=color, lw=1.5,
                         label=f"{name}: val {val[-1]['val_loss']:.4f}")
        else:
            ax_loss.plot([], [], color=color, label=name)
        ax_lr.plot([r["step"] for r in train], [r.get("lr", float("nan")) for r in train], color=color, lw=1)
    ax_loss.set_ylabel("cross-entropy loss (thin: train, points: validation)")
    ax_loss.set_title(f"{len(runs)} runs", fontsize=10)
    return _save(plt, fig, ax_loss, ax_lr, out)


def _save(plt, fig, ax_loss, ax_lr, out: Path) -> Path:
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(out, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out
