"""The six parts of bench/gpu_suite.py. Each runs as a process of its own, started by the suite:

    python bench/gpu_parts.py PART --work DIR --rows FILE --deadline UNIX_TIME [--device cuda] [--smoke] ...

and appends each result to --rows (a JSON object a line) the moment it has it. A measurement that fails is a
row saying so, the part goes on, and then exits 1. Every number comes from running gpt2lab: its commands
(`pretrain`, `eval`, `serve`, torchrun for FSDP), bench/train.py, or its library's `generate` and compiled step
timed here. `fsdp-child MEMORY_JSON pretrain ...` is what torchrun starts in part 5: gpt2lab's command line,
which writes its peak memory to MEMORY_JSON and stops after the last step (before the final checkpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gpt2lab, hf_twin, run_metrics  # noqa: E402
from gpu_suite import TITLES, Failed, Part, stop_group  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = BENCH / "gpu_data" / "shards"
MODERN = ["--pos-embedding", "rope", "--norm", "rmsnorm", "--qk-norm", "--mlp", "relu2", "--optimizer", "muon"]


def loop_speed(run_dir: Path) -> tuple[float, float | None]:
    """The training loop's median tokens/s and MFU over its logged steps, the first (start-up, compilation) left
    out."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in records if "mfu" in r][1:]
    return run_metrics(run_dir)["median_tokens_per_sec"], (statistics.median(mfus) if mfus else None)


def mfu_note(mfu: float | None) -> str:
    return f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU: no peak FLOP/s for this device"  # (a CPU)


def timed_run(p: Part, name: str, flags: list[str], env: dict | None = None) -> tuple[float, float | None]:
    """`gpt2lab pretrain` on the carried shards for a few timed steps (one evaluation batch and a checkpoint at
    the end), with `flags` on top: its loop's tokens/s and MFU."""
    s, steps, run = p.size, str(p.size.steps), p.work / name
    shutil.rmtree(run, ignore_errors=True)
    p.run(name, gpt2lab("pretrain", "--data", str(DATA), "--out", str(run), "--model", s.preset, "--batch-size",
                        str(s.batch), "--seq-len", str(s.seq), "--max-steps", steps, "--warmup-steps", "1",
                        "--log-every", "1", "--eval-every", steps, "--eval-batches", "1", "--checkpoint-every", steps,
                        "--keep-checkpoints", "1", "--sample-tokens", "0", "--no-tensorboard", "--device", p.device,
                        *flags), env)
    speed = loop_speed(run)
    shutil.rmtree(run, ignore_errors=True)  # (a 124M checkpoint is 1.5 GB)
    return speed


# ------------------------------------------------------------------------------------------------- the parts


def part1(p: Part) -> None:
    s = p.size
    shape = f"{s.preset}, {s.batch} x {s.seq}"

    def headline():
        out, steps = p.work / "train.json", s.steps if p.smoke else s.steps + 2
        p.run("bench_train", [sys.executable, str(BENCH / "train.py"), "--model", s.preset, "--vocab-size", "50304",
                              "--batch-size", str(s.batch), "--seq-len", str(s.seq), "--steps", str(steps),
                              "--warmup", "1" if p.smoke else "3", "--device", p.device, "--dtype", p.train_dtype,
                              "--compile", "--json", str(out)])
        rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
        ours, hf = rows["gpt2lab"], rows["transformers"]
        what = f"{shape}, {p.train_dtype} autocast, torch.compile, {'fused ' * p.cuda}AdamW, vocab 50,304, SDPA"
        p.emit(f"gpt2lab: {what}", "tokens/s", ours["tokens_per_sec"], notes="bench/train.py, random tokens")
        p.emit(f"gpt2lab: {what}", "MFU", ours.get("mfu", "-"), notes="6N + attention FLOPs over the dense bf16 peak")
        p.emit("transformers GPT2LMHeadModel (sdpa), the same steps", "tokens/s", hf["tokens_per_sec"],
               notes=mfu_note(hf.get("mfu")))
        p.emit("gpt2lab vs transformers", "ratio", ours["tokens_per_sec"] / hf["tokens_per_sec"])

    p.step("bench/train.py: gpt2lab vs transformers", 90, headline)
    # the waterfall: `gpt2lab pretrain` on the carried shards, each row adding one thing to the one above it; the
    # vocabulary is padded before compiling, so that the two compiled rows share one compilation (inductor's cache)
    flags = {"--dtype": "fp32", "--optimizer": "adamw-scratch"}
    rows = [("fp32, TF32 off, AdamW written out", {}, {"NVIDIA_TF32_OVERRIDE": "0"}, 20),
            ("+ TF32 matmuls", {}, {}, 20), ("+ bf16 autocast", {"--dtype": "bf16"}, {}, 20),
            ("+ vocabulary padded to 50,304", {"--pad-vocab-multiple": "64"}, {}, 20),
            ("+ torch.compile", {"--compile": None}, {}, 60),
            ("+ fused AdamW (torch's)", {"--optimizer": "adamw"}, {}, 30)]
    before = None
    for k, (what, change, env, need) in enumerate(rows):
        flags.update(change)
        argv = [x for f, v in flags.items() for x in ((f,) if v is None else (f, v))]

        def measure(k=k, what=what, argv=argv, env=env):
            nonlocal before
            tok_s, mfu = timed_run(p, f"waterfall{k}", argv, env)
            gain = f"{tok_s / before:.2f}x the row above; " if before else ""
            p.emit(f"waterfall ({shape}): {what}", "tokens/s", tok_s, notes=gain + mfu_note(mfu))
            before = tok_s

        p.step(f"waterfall: {what}", need, measure)


def part2(p: Part) -> None:
    s = p.size
    common = MODERN + ["--dtype", p.train_dtype, "--compile", "--pad-vocab-multiple", "64"]
    speeds = {}
    for name, extra in (("modern", []), ("modern_doc_mask", ["--doc-mask"])):
        def measure(name=name, extra=extra):
            speeds[name] = tok_s, mfu = timed_run(p, name, common + extra)
            setting = (f"{s.preset}, {s.batch} x {s.seq}: RoPE, RMSNorm, QK-norm, ReLU², Muon; {p.train_dtype}, "
                       "compiled, vocab 50,304" + (", --doc-mask" if extra else ""))
            vs = f"{tok_s / speeds['modern'][0]:.2f}x without --doc-mask; " if extra and "modern" in speeds else ""
            p.emit(setting, "tokens/s", tok_s, notes=vs + "gpt2lab pretrain's loop")
            p.emit(setting, "MFU", mfu if mfu is not None else "-")

        p.step(f"pretrain {name}", 60, measure)


def part3(p: Part) -> None:
    p.step("decoding", 80, lambda: decoding(p))
    p.step("serving", 30, lambda: serving(p))


def decoding(p: Part) -> None:
    import torch

    from gpt2lab.generate import generate, generate_batch
    from gpt2lab.generate.compiled import compiled_step
    from gpt2lab.model.config import GPTConfig
    from gpt2lab.model.gpt import GPT

    s, device = p.size, torch.device(p.device)
    dtype = torch.bfloat16 if p.cuda else torch.float32
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(s.preset)).eval()
    hf = hf_twin(model).to(device, dtype)
    model.to(device, dtype)

    def eager(prompts, n):
        if len(prompts) == 1:
            return [generate(model, prompts[0], n, temperature=0.0)]
        return generate_batch(model, prompts, n, temperature=0.0)

    def compiled(prompts, n):
        if len(prompts) == 1:
            return [generate(model, prompts[0], n, temperature=0.0, compile=True)]
        step = compiled_step(model, len(prompts), s.prompt + s.new_tokens)  # (generate_batch has no compile)
        with torch.inference_mode():
            token = step.prefill(torch.tensor(prompts, device=device)).argmax(-1)
            out = [token]
            for _ in range(n - 1):
                token = step.decode(token[:, None]).argmax(-1)
                out.append(token)
        return torch.stack(out, 1).tolist()

    def transformers_generate(prompts, n):
        x = torch.tensor(prompts, device=device)
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
        return y[:, x.size(1):].tolist()

    impls = {"gpt2lab eager": eager, "gpt2lab compiled step" + (" (CUDA graphs)" if p.cuda else ""): compiled,
             "transformers generate": transformers_generate}
    for batch in (1, s.clients):
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, model.config.vocab_size, (batch, s.prompt), generator=g).tolist()
        best, tokens, ready = {}, {}, {}
        for name, fn in impls.items():
            try:
                fn(prompts, 4)  # warm-up: compilation, graph capture, allocations
                ready[name] = fn
            except Exception as e:  # noqa: BLE001 - the others are still measured
                p.fail(f"{name}, batch {batch}", e)
        for _ in range(s.repeat):
            for name, fn in ready.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                tokens[name] = fn(prompts, s.new_tokens)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        for name, seconds in best.items():
            pairs = [(a, b) for x, y in zip(tokens[name], tokens.get("gpt2lab eager", [])) for a, b in zip(x, y)]
            same = f"{100 * sum(a == b for a, b in pairs) / len(pairs):.0f}%" if pairs else "?"
            vs = f"{best['transformers generate'] / seconds:.2f}x" if "transformers generate" in best else "?"
            p.emit(f"{name}, {s.preset} {str(dtype)[6:]}, batch {batch}", "tokens/s", batch * s.new_tokens / seconds,
                   notes=f"{1000 * seconds / s.new_tokens:.2f} ms a step; {vs} transformers; {same} of tokens equal to "
                   f"eager's; {s.prompt}-token prompts, {s.new_tokens} new, greedy, best of {s.repeat}")


def serving(p: Part) -> None:
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:  # (the environment's, not gpt2lab's: a row, not a failure)
        p.emit("gpt2lab serve", "not run", "-", notes=f"not installed: {', '.join(missing)} (gpt2lab[serve], openai)")
        return
    from serve import Process, free_port, make_run, prompts
    from serve_loads import concurrency, summarize

    s, dtype = p.size, p.dtype
    run = make_run(p.work / "run", s.preset)
    servers = [(f"gpt2lab serve --max-batch {s.clients}, {dtype}", gpt2lab(
        "serve", str(run), "--device", p.device, "--dtype", dtype, "--max-batch", str(s.clients), "--max-queue",
        "256", "--quiet"), "run")]
    peer = Path(sys.executable).parent / "transformers"
    why = "smoke mode" if p.smoke else f"no {peer}" if not peer.exists() else \
        f"{p.left():.0f} s left of the part's cap" if p.left() < 90 else None
    if why:
        p.emit("transformers serve --continuous-batching", "not run", "-", notes=why)
    else:
        p.run("export_hf", gpt2lab("export-hf", str(run), "--out", str(p.work / "hf")))
        servers.append(("transformers serve --continuous-batching, bf16", [
            str(peer), "serve", str(p.work / "hf"), "--device", p.device, "--host", "127.0.0.1",
            "--continuous-batching", "--dtype", "bfloat16" if p.cuda else "float32"], str(p.work / "hf")))
    texts = prompts(s.clients, 32)
    for label, argv, model_id in servers:
        port = free_port()
        proc = Process(argv + ["--port", str(port)], port, 1, p.logs / f"part3_server{port}.log")
        p.servers.append(proc)
        try:
            why = proc.ready(timeout=min(300.0, max(5.0, p.left())))
            if why is not None:
                raise Failed(f"did not start: {why}")
            url = f"http://127.0.0.1:{port}/v1"
            asyncio.run(concurrency(url, model_id, ["warm up"], 4))
            r = summarize(asyncio.run(concurrency(url, model_id, texts, 32 if not p.smoke else 4)))
            p.emit(f"{label}: {s.clients} clients at once, 32-token prompts, {r['tokens'] // s.clients} new tokens "
                   f"each", "tokens/s in all", r["total"],
                   notes=f"TTFT p50 {r['ttft_p50']:.2f} s, p95 {r['ttft_p95']:.2f} s; {r['per_client']:.1f} tokens/s a "
                   f"client; ITL p95 {1000 * r['itl_p95']:.1f} ms; {s.preset}, random weights, streamed")
        except Exception as e:  # noqa: BLE001 - the next server is still measured
            p.fail(label, e)
        finally:
            proc.stop()


def part4(p: Part) -> None:
    names = [Path(p.args.hellaswag)] if p.args.hellaswag else [
        base / "shared" / "data" / "eval" / "hellaswag_val.jsonl.gz" for base in (ROOT, ROOT.parent)]
    data = next((x for x in names if x.is_file()), None)
    if data is None:
        return p.skip(f"no HellaSwag file ({', '.join(map(str, names))}); pass --hellaswag hellaswag_val.jsonl(.gz)")
    from serve import make_run

    s = p.size

    def score():
        run = make_run(p.work / "run", s.preset)
        out = p.work / "scores.json"
        limit = ["--limit", str(s.hellaswag_limit)] if s.hellaswag_limit else []
        wall = p.run("eval_hellaswag", gpt2lab("eval", str(run), "--task", "hellaswag", "--data", str(data),
                                               "--device", p.device, "--dtype", p.dtype, "--batch-size", "64",
                                               "--output", str(out), "--quiet", *limit))
        m = json.loads(out.read_text())[0]
        p.emit(f"gpt2lab eval --task hellaswag: {m['n']:,} examples, {s.preset} random weights, batch 64",
               "seconds", m["seconds"], notes=f"{m['n'] / m['seconds']:,.0f} examples/s; {wall:.0f} s for the whole "
               f"command; acc_norm {100 * m['acc_norm']:.1f}% (chance 25%)")

    p.step("HellaSwag", 60, score)


def part5(p: Part) -> None:
    s, run, memory, dtype = p.size, p.work / "run", p.work / "memory.json", p.dtype
    flags = ["--data", str(DATA), "--out", str(run), "--model", s.xl, "--strategy", "fsdp",
             "--activation-checkpointing", "--batch-size", str(s.xl_batch), "--seq-len", str(s.seq), "--dtype", dtype,
             "--device", p.device]
    setting = f"{s.xl}, FSDP2 on 1 process, {dtype}, activation checkpointing, {s.xl_batch} x {s.seq}"
    estimate = {}

    def dry_run():
        gpu = ["--gpu-memory", f"{p.args.gpu_memory:.0f}"] if p.args.gpu_memory else []
        p.run("dry_run", gpt2lab("pretrain", *flags, "--dry-run", "--processes", "1", *gpu))
        text = (p.logs / "part5_dry_run.log").read_text()
        total = re.search(r"^\s*total\s+([\d,.]+) GiB\s+([\d,.]+) GiB", text, re.M)
        estimate["fsdp"] = float(total.group(2).replace(",", ""))
        estimate["line"] = next((x for x in text.splitlines() if x.startswith(("fits", "does not fit"))), "")

    def train():
        shutil.rmtree(run, ignore_errors=True)
        steps = s.steps - 2 if not p.smoke else s.steps
        p.run("fsdp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                       str(Path(__file__).resolve()), "fsdp-child", str(memory), "pretrain", *flags, "--max-steps",
                       str(steps), "--warmup-steps", "1", "--log-every", "1", "--eval-every", str(steps),
                       "--eval-batches", "1", "--sample-tokens", "0", "--no-tensorboard"])
        tok_s, mfu = loop_speed(run)
        m = json.loads(memory.read_text())
        p.emit(setting, "fits", "yes", notes=f"{m['step']} steps trained; {estimate.get('line', '')}".strip("; "))
        est = estimate.get("fsdp")
        vs = f"`pretrain --dry-run` estimate {est:.2f} GiB" if est else "no dry-run estimate"
        if m["allocated"] is not None:
            p.emit(setting, "peak memory allocated (GiB)", m["allocated"] / 2**30,
                   notes=f"{vs}; reserved {m['reserved'] / 2**30:.2f} GiB")
        else:
            p.emit(setting, "peak resident memory (GiB)", m["rss"] / 2**30,
                   notes=f"{vs}; on the CPU the process's RSS, not comparable")
        p.emit(setting, "tokens/s", tok_s, notes=mfu_note(mfu) + " (6N: recomputation not counted)")
        shutil.rmtree(run, ignore_errors=True)

    p.step("pretrain --dry-run", 20, dry_run)
    p.step("FSDP2 training", 60, train)


def part6(p: Part) -> None:
    s, run, dtype = p.size, p.work / "run", p.dtype
    budget = 2 if p.smoke else max(15, int(p.left() - 40))  # start-up, final checkpoint, eval, plot: ~40 s
    tokens = json.loads((DATA / "meta.json").read_text())["splits"]["train"]["tokens"]
    step_tokens = 4 * s.batch * s.seq  # (longer steps: the first, slower one weighs less in --time-budget's probe)
    setting = (f"{s.preset}, {step_tokens:,} tokens a step ({s.batch} x {s.seq} x 4), {dtype}, vocab 50,304, "
               f"--time-budget {budget} s on the carried shards ({tokens / 1e6:.2f}M tokens)")

    def train():
        shutil.rmtree(run, ignore_errors=True)
        p.run("train", gpt2lab("pretrain", "--data", str(DATA), "--out", str(run), "--model", s.preset,
                               "--pad-vocab-multiple", "64", "--dtype", dtype, "--batch-size", str(s.batch),
                               "--seq-len", str(s.seq), "--total-batch-tokens", str(step_tokens), "--time-budget",
                               str(budget), "--lr", "6e-4", "--warmup-steps", "1" if p.smoke else "20",
                               "--eval-every", "10", "--log-every", "2", "--eval-batches", "1", "--checkpoint-every",
                               "1000000", "--sample-tokens", "0", "--no-tensorboard", "--device", p.device))
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        steps, vals = [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]
        last = steps[-1]
        windows = zip([{"tokens": 0}] + steps, steps)  # (logged windows: evaluations and checkpoints left out)
        seconds = sum((b["tokens"] - a["tokens"]) / max(b["tokens_per_sec"], 1e-9) for a, b in windows)
        p.emit(setting, "steps", last["step"], notes=f"{last['tokens']:,} tokens in {seconds:.0f} s of training; no "
               "--compile: --time-budget times the first 5 steps, and would count the compilation as training")
        p.emit(setting, "tokens/s", run_metrics(run)["tokens_per_sec"], notes="the training loop's")
        p.emit(setting, "train loss (last step)", last["loss"])
        if vals:
            p.emit(setting, "val loss (the loop's)", vals[-1]["val_loss"], notes=f"{len(vals)} evaluation(s)")
        out = Path(p.args.out)
        shutil.copy(run / "metrics.jsonl", out / "run6_metrics.jsonl")
        try:
            p.run("plot", gpt2lab("plot", str(run), "--out", str(out / "run6_curves.png")))
        except Failed as e:
            p.emit(setting, "loss curve", "-", notes=f"no plot ({e}); the curve is in run6_metrics.jsonl")

    def score():
        out = p.work / "bpb.json"
        limit = ["--limit", "3"] if p.smoke else []  # (documents)
        p.run("eval_loss", gpt2lab("eval", str(run), "--task", "loss", "--data", str(DATA), "--device", p.device,
                                   "--dtype", dtype, "--output", str(out), "--quiet", *limit))
        m = json.loads(out.read_text())[0]
        p.emit(setting, "held-out bits per byte", m["bpb"], notes=f"gpt2lab eval --task loss: loss {m['loss']:.4f} on "
               f"{m['n']} held-out Austen documents, each scored alone")

    p.step("training", 30, train)
    if (run / "model.safetensors").is_file():
        p.step("held-out bits per byte", 15, score)


def fsdp_child(memory_file: str, argv: list[str]) -> None:
    import resource

    import torch

    from gpt2lab.cli import main as gpt2lab_main
    from gpt2lab.train import resume

    def measure_and_stop(trainer):
        cuda = trainer.device.type == "cuda"
        peak = {"step": trainer.step, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "allocated": torch.cuda.max_memory_allocated(trainer.device) if cuda else None,
                "reserved": torch.cuda.max_memory_reserved(trainer.device) if cuda else None}
        Path(memory_file).write_text(json.dumps(peak))
        if trainer.logger is not None:
            trainer.logger.close()
        os._exit(0)  # the final checkpoint (16 bytes a parameter) is not what is measured

    resume.save = measure_and_stop
    gpt2lab_main(argv)


def main() -> None:
    if sys.argv[1:2] == ["fsdp-child"]:
        fsdp_child(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", type=int, choices=sorted(TITLES))
    for name in ("--work", "--rows", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--deadline", type=float, required=True, help="unix time by which the part is done")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--hellaswag", default=None)
    ap.add_argument("--gpu-memory", type=float, default=None, help="GiB, for the dry run's verdict")
    args = ap.parse_args()
    p = Part(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the suite's time cap: the finally below runs
    try:
        globals()[f"part{args.part}"](p)
    finally:
        stop_group(p.current, 10)
        for proc in p.servers:
            proc.stop()
    sys.exit(1 if p.failures else 0)


if __name__ == "__main__":
    main()
