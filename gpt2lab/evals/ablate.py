"""`gpt2lab ablate`: train variants of a model on the same data, seed and budget, and compare them.

    gpt2lab ablate --data data/plays --out runs/ablation --model micro --max-steps 400 \
        --variant "base=" --variant "rope=--pos-embedding rope --norm rmsnorm" --variant "muon=--optimizer muon"

Every variant is a pretraining run in OUT/NAME with the shared flags plus its own (its own win). They
share the seed, so they start from the same data order, and the same budget: the same steps and
tokens, or with `--time-budget SECONDS` the same wall-clock time each. After each run its
validation loss is measured as `gpt2lab eval --task loss` does (every held-out document scored on
its own), in nats per token and in bits per byte, which compares variants whatever their
tokenizer.

OUT/ablation.json is a list with one object per variant: name, flags, params, tokens_per_sec (the
mean of the logged steps after the first), val_loss, val_bpb, steps, seconds and the validation
curve. OUT/ablation.png plots the curves. Run it again on the same --out and it goes on where it
stopped: finished variants are kept, an interrupted one resumes from its last checkpoint, and rows of
variants the new command does not name stay in ablation.json. A variant whose settings differ from the
ones it was trained with (a changed shared flag included) is refused, naming the settings, or with
--retrain trained again.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

from gpt2lab import io
from gpt2lab.checkpoint import open_run
from gpt2lab.errors import UserError
from gpt2lab.evals.benchmarks import run_benchmark
from gpt2lab.train.checkpoints import list_checkpoints
from gpt2lab.train.config import TrainConfig, build, flag
from gpt2lab.train.plan import count_params
from gpt2lab.train.pretrain import pretrain

RESULTS = "ablation.json"
PLOT = "ablation.png"


def parse_variant(spec: str) -> tuple[str, str]:
    name, sep, flags = spec.partition("=")
    name = name.strip()
    if not sep or not name or not all(c.isalnum() or c in "-_+." for c in name):
        raise UserError(f"--variant {spec!r}: write NAME=FLAGS (a name of letters, digits, - _ + . and the "
                        "pretrain flags of that variant, possibly none: \"base=\")")
    return name, flags.strip()


def _record(run_dir: Path, name: str, flags: str, seconds: float) -> dict:
    """The row of a finished variant: its size, speed and held-out scores."""
    info = open_run(run_dir)
    model, tok = info.load()
    data = info.config["data"]["path"]
    scores = run_benchmark(model, tok, "loss", data).metrics
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m][1:] or \
        [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m]
    curve = [[m["step"], m["val_loss"]] for m in metrics if "val_loss" in m]
    return {"name": name, "flags": flags, "params": count_params(model),
            "tokens_per_sec": sum(speeds) / len(speeds) if speeds else None,
            "val_loss": scores["loss"], "val_bpb": scores["bpb"], "steps": max((m["step"] for m in metrics),
                                                                               default=0),
            "seconds": round(seconds, 1), "curve": curve, "run_dir": str(run_dir)}


# settings that change how a run is watched, not what it learns: a variant may differ in these and be kept
WATCHING = {"out", "resume", "log_every", "tensorboard", "device", "sample_every", "sample_tokens", "keep_checkpoints",
            "checkpoint_every", "eval_every", "eval_batches", "compile"}


def _differences(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """The settings (as flags) in which the run in `run_dir` differs from `cfg`, "--name stored -> wanted"."""
    stored = open_run(run_dir).config.get("train") or {}
    wanted = asdict(cfg)
    out = []
    for name, value in wanted.items():
        if name in WATCHING or name not in stored:
            continue
        old = stored[name]
        if name in ("data", "init_from") and isinstance(old, str) and isinstance(value, str):
            if Path(old).resolve() == Path(value).resolve():
                continue
        if old != value:
            out.append(f"{flag(name)} {old} -> {value}")
    return out


def ablate(shared: dict, variants: list[tuple[str, dict, str]], out: str, progress: bool = True,
           retrain: bool = False) -> list[dict]:
    """Train each (name, its settings, its flags as typed) with the `shared` settings; return the rows.

    A variant already in `out` is kept when it was trained with the same settings (it resumes if it did not
    finish); one whose settings differ (the shared ones or its own) is refused, naming them, or with
    `retrain` trained again from scratch. Rows of variants that this command does not name stay in
    ablation.json."""
    out = Path(out)
    names = [n for n, _, _ in variants]
    if len(set(names)) != len(names):
        raise UserError(f"two variants are called {next(n for n in names if names.count(n) > 1)!r}; give each "
                        "its own name")
    io.check_output_dir(out, "ablation", allow_same_kind=True, flag="--out", inputs=[shared.get("data", "")])
    done = {}
    if (out / RESULTS).is_file():
        for row in io.read_json(out / RESULTS, "ablation results"):
            done[row["name"]] = row
    configs = {}
    for name, settings, _ in variants:  # every variant is checked before any trains
        values = {**shared, **settings, "out": str(out / name)}
        cfg = configs[name] = build(TrainConfig, values)
        if (out / name / "config.json").is_file():
            changed = _differences(out / name, cfg)
            if changed and not retrain:
                raise UserError(f"variant {name!r} in {out} was trained with other settings ({'; '.join(changed)}); "
                                "pass --retrain to train it again with these, or choose another --out")
            if changed:
                shutil.rmtree(out / name)
                done.pop(name, None)
    if not (out / RESULTS).is_file():
        out.mkdir(parents=True, exist_ok=True)
        io.write_json(out / RESULTS, [])  # the directory is an ablation from now on (and resumes as one)
    rows = []
    for name, settings, flags in variants:
        run_dir, cfg = out / name, configs[name]
        finished = (run_dir / "model.safetensors").is_file()
        if finished and name in done:
            rows.append({**done[name], "flags": flags})
            continue
        seconds = 0.0
        if not finished:
            cfg.resume = bool(list_checkpoints(run_dir))
            if progress:
                print(f"=== {name}: {flags or '(the shared settings)'}", flush=True)
            start = time.time()
            values = {**shared, **settings, "out": str(run_dir), "resume": cfg.resume}
            pretrain(cfg, {k: v for k, v in values.items() if k in {f.name for f in fields(TrainConfig)}})
            seconds = time.time() - start
        rows.append(_record(run_dir, name, flags, seconds))
        io.write_json(out / RESULTS, _all_rows(rows, done))
    io.write_json(out / RESULTS, _all_rows(rows, done))
    plot(rows, out / PLOT)
    return rows


def _all_rows(rows: list[dict], done: dict) -> list[dict]:
    """This command's rows, then those of earlier commands' other variants (every finished row is kept)."""
    named = {r["name"] for r in rows}
    return rows + [r for n, r in done.items() if n not in named]


def table(rows: list[dict]) -> str:
    """The comparison, each variant against the first."""
    first = rows[0]
    lines = ["| variant | params | tokens/s | val loss | val bpb | bpb vs first | flags |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        delta = r["val_bpb"] - first["val_bpb"] if r is not first else 0.0
        speed = f"{r['tokens_per_sec']:,.0f}" if r.get("tokens_per_sec") else "-"
        lines.append(f"| {r['name']} | {r['params']:,} | {speed} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
                     f"{delta:+.4f} | {r['flags'] or '-'} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10").colors
    for i, r in enumerate(rows):
        if r.get("curve"):
            steps, losses = zip(*r["curve"])
            # ten colours, then the next ten with another line and marker, so no two variants look alike
            style = ("o-", "s--", "^:")[(i // len(colours)) % 3]
            ax.plot(steps, losses, style, color=colours[i % len(colours)], ms=3, lw=1.2,
                    label=f"{r['name']} ({r['val_bpb']:.3f} bpb)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    finite = [loss for r in rows for _, loss in r.get("curve", []) if math.isfinite(loss)]
    if finite:
        ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 2.0))
    fig.tight_layout()
    with io.atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path
