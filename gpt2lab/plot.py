"""`gpt2lab plot RUN_DIR`: train/val loss (or, for an RL run, reward and held-out pass rate) and the learning
rate against steps."""

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


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib; install it with `pip install 'gpt2lab[plot]'`") from None
    out = Path(out) if out else Path(run_dir) / "curves.png"
    io.check_output_file(out, "png", flag="--out")
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r and isinstance(r.get("step"), (int, float))]
    val = [r for r in records if "val_loss" in r and isinstance(r.get("step"), (int, float))]

    rl = [r for r in train if "reward" in r]
    if rl:  # reinforcement learning: the reward and the held-out pass rate are the curves that matter
        passed = [r for r in records if "val_pass_at_1" in r and isinstance(r.get("step"), (int, float))]
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 1]})
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
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 1]})
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val", lw=1.5)
        ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.set_title(f"{Path(run_dir).name}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r.get("lr", float("nan")) for r in train], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    # tokens on a second x axis: tokens grow linearly with steps
    with_tokens = [r for r in train if r.get("tokens") and r["step"]]
    if with_tokens and not rl:
        per_step = with_tokens[-1]["tokens"] / with_tokens[-1]["step"]
        top = ax_loss.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_file(out, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out
