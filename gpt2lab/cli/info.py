"""`gpt2lab info RUN_DIR`: what a run is, in a screenful: its kind and task, the model (sizes, the options
that differ from GPT-2, parameters), the tokenizer, how far it trained and on what, its last losses and
scores, its checkpoints and its size on disk. `--json` prints the same as one object.

It reads config.json, metrics.jsonl, the weights file's header and the checkpoints' names: no weights are
loaded."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _parameters(weights: Path) -> int | None:
    """The numbers in a safetensors file, from its header alone (8 bytes of length, then JSON)."""
    try:
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 1 << 26)))
    except (OSError, ValueError, struct.error):
        return None
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))


def describe(run_dir: str) -> dict:
    from gpt2lab import io
    from gpt2lab.checkpoint import open_run
    from gpt2lab.export.gpt2 import gpt2_obstacles

    info = open_run(run_dir)
    cfg, config = info.model_config, info.config
    out = {"run": str(run_dir), "kind": info.kind, "task": config.get("task"), "chat_format": info.template,
           "model": {"layers": cfg.n_layer, "heads": cfg.n_head, "width": cfg.n_embd, "context": cfg.block_size,
                     "vocab_size": cfg.vocab_size, "parameters": _parameters(Path(run_dir) / "model.safetensors"),
                     "differs_from_gpt2": gpt2_obstacles(cfg)}}
    tok = config.get("tokenizer") or {}
    out["tokenizer"] = {k: tok.get(k) for k in ("name", "vocab_size", "eot_id") if k in tok}
    if info.lora:
        out["lora"] = info.lora
    if info.labels:
        out["labels"] = info.labels
    if isinstance(config.get("source"), dict):
        out["source"] = {k: v for k, v in config["source"].items() if k != "weights"}
    resolved = config.get("resolved") or {}
    train = config.get("train") or {}
    records = []
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        for line in io.read_text(metrics, "metrics file").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict):
                records.append(r)
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    if resolved or steps:
        last = next((r for r in reversed(records) if "loss" in r), {})
        val = next((r for r in reversed(records) if "val_loss" in r), {})
        out["training"] = {"steps": max(steps) if steps else 0, "max_steps": resolved.get("max_steps"),
                           "tokens_per_step": resolved.get("total_batch_tokens"), "data": train.get("data") or
                           (config.get("data") or {}).get("path"), "device": resolved.get("device"),
                           "dtype": resolved.get("dtype"), "last_loss": last.get("loss"),
                           "val_loss": val.get("val_loss"), "val_at_step": val.get("step")}
        scores = {k: v for k, v in (val or {}).items() if k.endswith(("accuracy", "pass_at_1")) and v is not None}
        if scores:
            out["training"]["scores"] = scores
    checkpoints = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step_*")) \
        if (Path(run_dir) / "checkpoints").is_dir() else []
    out["checkpoints"] = checkpoints
    out["disk"] = _size(Path(run_dir))
    return out


def show(d: dict) -> str:
    m = d["model"]
    kind = {"lm": "language-model", "classifier": "classifier"}.get(d["kind"], d["kind"])
    lines = [f"{d['run']}: a {kind} run ({d['task'] or 'unknown task'})"
             + (f", chat format {d['chat_format']}" if d.get("chat_format") else "")]
    options = ", ".join(m["differs_from_gpt2"]) or "GPT-2's architecture"
    lines.append(f"  model      {m['layers']} layers, {m['heads']} heads, width {m['width']}, context {m['context']}, "
                 f"vocabulary {m['vocab_size']:,}"
                 + (f": {m['parameters']:,} parameters" if m["parameters"] else "") + f"; {options}")
    t = d["tokenizer"]
    if t:
        lines.append(f"  tokenizer  {t.get('name')} ({t.get('vocab_size', '?'):,} tokens)")
    if "lora" in d:
        lines.append(f"  lora       rank {d['lora'].get('rank')}, alpha {d['lora'].get('alpha')}, on "
                     f"{', '.join(d['lora'].get('targets') or [])}")
    if "labels" in d:
        lines.append(f"  labels     {', '.join(d['labels'])}")
    if "source" in d:
        lines.append(f"  source     {d['source'].get('id') or d['source'].get('path')}")
    tr = d.get("training")
    if tr:
        total = f"/{tr['max_steps']:,}" if tr.get("max_steps") else ""
        tokens = f", {tr['steps'] * tr['tokens_per_step']:,} tokens" if tr.get("tokens_per_step") else ""
        lines.append(f"  trained    {tr['steps']:,}{total} steps{tokens} on {tr.get('device')} "
                     f"({tr.get('dtype')}); data {tr.get('data')}")
        losses = []
        if tr.get("last_loss") is not None:
            losses.append(f"train loss {tr['last_loss']:.4f}")
        if tr.get("val_loss") is not None:
            losses.append(f"val loss {tr['val_loss']:.4f} at step {tr['val_at_step']}")
        losses += [f"{k.replace('_', ' ')} {v:.4f}" for k, v in (tr.get("scores") or {}).items()]
        if losses:
            lines.append(f"  last       {', '.join(losses)}")
    cps = d["checkpoints"]
    lines.append(f"  checkpoints {len(cps)}" + (f" (newest {cps[-1]})" if cps else "")
                 + f"; {_human(d['disk'])} on disk")
    return "\n".join(lines)


def cmd_info(args) -> int:
    d = describe(args.run_dir)
    print(json.dumps(d, indent=2) if args.json else show(d))
    return 0


def register(sub) -> None:
    i = sub.add_parser("info", help="what a run is: model, tokenizer, training, scores, checkpoints, size",
                       description="Describe a run directory without loading it: its kind and task, the model "
                       "(sizes, options, parameters), the tokenizer, how far it trained and on what, its last "
                       "losses and scores, its checkpoints and its size on disk.")
    i.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    i.add_argument("--json", action="store_true", help="print it as one JSON object")
    i.set_defaults(func=cmd_info)
