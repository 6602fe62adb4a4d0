"""gpt2lab's GPU claims, measured by one command in about ten minutes: a table ready for README.md.

    python bench/gpu_suite.py --out gpu_results                   # on the GPU machine: every part, 540 s in all
    python bench/gpu_suite.py --out gpu_results --parts 1,3 --budget 300
    python bench/gpu_suite.py --device cpu --smoke --out /tmp/gs    # every part at toy sizes on the CPU (CI)

The parts, in order of value (bench/gpu_parts.py runs each one):

    1  pretraining GPT-2 124M at T=1024 (bf16, torch.compile, fused AdamW, SDPA, vocabulary 50,304): tokens/s
       and MFU against transformers' GPT2LMHeadModel (bench/train.py), and a waterfall of `gpt2lab pretrain` on
       the carried shards, one thing added a row: fp32 (TF32 off), TF32, bf16, vocabulary 50,304, compile, fused
       AdamW (the vocabulary before compile, so that both compiled rows share one compilation)
    2  the modern recipe (RoPE, RMSNorm, QK-norm, ReLU², Muon) at the same size, without and with --doc-mask
    3  greedy decoding at batch 1 and 64, eager and with the compiled step (CUDA graphs), against transformers'
       generate; `gpt2lab serve` (and `transformers serve --continuous-batching`) with 64 clients at once
    4  HellaSwag, all 10,042 examples, `gpt2lab eval --task hellaswag` on a random-weight 124M run
    5  gpt2-xl with FSDP2 on one GPU (torchrun, bf16, activation checkpointing): fits, peak memory against
       `pretrain --dry-run`'s estimate, tokens/s
    6  a real run in the time left: 124M with --time-budget on the carried shards, held-out bits per byte from
       `gpt2lab eval --task loss`, the loss curve (run6_metrics.jsonl, run6_curves.png)

Each part is a process of its own under its own time cap (its share of what is left of --budget), so a hang, a
crash or an out-of-memory in one cannot stop the rest. Whenever a part has a new result, --out gets results.json,
results.md (the table, headed by the machine and this command) and logs.tar.gz (every command's output), each
written to a temporary file and renamed: a run cut short keeps all it measured. A part that fails or times out
is a row with its status and the last lines of its stderr. The exit status is 0 on a GPU whatever failed (the
table says what); with --smoke it is 1 if a part failed, so that CI catches a broken path.

The training data is bench/gpu_data/shards (GPT-2 tokens of the King James Bible and Jane Austen's novels; see
bench/gpu_data/README.md). HellaSwag is read from --hellaswag, else from shared/data/eval/hellaswag_val.jsonl.gz
in or beside the checkout; without it part 4 is skipped. Serving needs fastapi, uvicorn and openai.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TITLES = {1: "pretraining 124M", 2: "modern recipe", 3: "decoding and serving", 4: "HellaSwag",
          5: "gpt2-xl FSDP2", 6: "a real run"}
# seconds of the default 540-s budget each part is planned for; a part's cap is its share of what is left
PLAN = {1: 220, 2: 90, 3: 110, 4: 30, 5: 50, 6: 40}
PROBE = """import json, os, platform, torch
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda, cpus=os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, gpus=torch.cuda.device_count())
print(json.dumps(info))"""


def machine(env: dict) -> dict:
    """What this runs on: the GPU (torch, nvidia-smi), the driver, torch, CUDA, transformers, the CPU, the commit."""
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    info = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"probe": out.stderr[-300:]}
    info["cpu"] = cpu_name()
    try:
        info["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        info["transformers"] = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        info["nvidia_smi"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    info["commit"] = git.stdout.strip() if git.returncode == 0 else None
    return info


def machine_line(m: dict, device: str) -> str:
    smi = [x.strip() for x in (m.get("nvidia_smi") or "").split(",")]
    if device.startswith("cuda") and m.get("gpu"):
        driver = f"driver {smi[1]}, {smi[2]}" if len(smi) == 3 else "driver unknown (no nvidia-smi)"
        head = f"{m['gpu']} ({driver}), {m.get('gpus', 1)} GPU(s); CPU {m['cpu']}, {m.get('cpus')} cores"
    else:
        head = f"CPU {m['cpu']}, {m.get('cpus')} cores (no GPU used)"
    return (f"{head}; torch {m.get('torch')} (CUDA {m.get('cuda')}), transformers {m.get('transformers')}, Python "
            f"{m.get('python')}; gpt2lab {m.get('commit') or 'unknown commit'}")


# ------------------------------------------------- what a part (bench/gpu_parts.py) works with: sizes, rows, commands


@dataclass(frozen=True)
class Sizes:
    preset: str  # the model of every part but 5
    xl: str  # the model of part 5
    batch: int  # sequences per step (parts 1, 2, 6) and their length
    seq: int
    steps: int  # optimizer steps of a timed pretrain run
    xl_batch: int
    new_tokens: int  # decoding: tokens generated after a prompt of `prompt` tokens, best of `repeat`
    prompt: int
    repeat: int
    clients: int  # the large batch of decoding and the clients of the server
    hellaswag_limit: int | None


GPU = Sizes("gpt2", "gpt2-xl", 32, 1024, 8, 16, 200, 32, 3, 64, None)
SMOKE = Sizes("tiny", "tiny", 2, 64, 3, 2, 8, 8, 1, 4, 8)


class Failed(Exception):
    """A command of a part failed (its message ends with the last error line of its output)."""


class Part:
    """One part's run: its sizes, its deadline, its rows, and the command running now."""

    def __init__(self, args):
        self.n, self.args, self.device, self.smoke = args.part, args, args.device, args.smoke
        self.size = SMOKE if args.smoke else GPU
        if not args.smoke and (args.gpu_memory or 0) < 100:  # an 80-GB H100: fp32 at 32 x 1024 may not fit
            self.size = replace(GPU, batch=16)
        self.cuda = args.device.startswith("cuda")
        self.dtype = "bf16" if self.cuda else "fp32"  # decoding, serving, evaluation, FSDP, the real run
        self.train_dtype = "bf16" if self.cuda or args.smoke else "fp32"  # parts 1-2 (bf16 autocast runs on a CPU)
        self.work = Path(args.work) / f"part{self.n}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = Path(args.work) / "logs"
        self.logs.mkdir(exist_ok=True)
        self.failures, self.current, self.servers = 0, None, []

    def left(self) -> float:
        return self.args.deadline - time.time()

    def emit(self, setting: str, metric: str, value, notes: str = "") -> None:
        row = {"part": self.n, "setting": setting, "metric": metric, "value": value, "shown": fmt(metric, value),
               "notes": notes}
        with open(self.args.rows, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"| {setting} | {metric} | {row['shown']} | {notes} |", flush=True)

    def skip(self, reason: str) -> None:
        with open(self.args.rows, "a") as f:
            f.write(json.dumps({"part": self.n, "status": "skipped", "reason": reason}) + "\n")

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> float:
        """Run a command in a process group of its own until it ends or the part's deadline; its output in
        WORK/logs/partN_NAME.log. Its wall-clock seconds; Failed with the last lines of its output."""
        log = self.logs / f"part{self.n}_{name}.log"
        print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with log.open("w") as f:
            self.current = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                            start_new_session=True)
            try:
                rc = self.current.wait(timeout=max(1.0, self.left()))
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                proc, self.current = self.current, None
                stop_group(proc, 10)
        print(f"  ({time.perf_counter() - start:.1f} s, exit status {rc})", file=sys.stderr, flush=True)
        if rc != 0:
            lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
            errors = [x for x in lines if re.search(r"(^|\]: )(error: |[\w.]+(Error|Exception)\b)", x)
                      and "ChildFailedError" not in x]  # (the worker's error, not torchrun's report of it)
            what = "stopped at the part's time cap" if rc is None else f"exit status {rc}"
            raise Failed(f"{name}: {what}: " + (errors[-1] if errors else " / ".join(lines[-3:]))[-600:])
        return time.perf_counter() - start

    def step(self, what: str, need: float, fn) -> None:
        """One measurement: on a GPU not started when less than `need` seconds of the part are left; an error is
        a row (and the part's exit status), not the end of the part."""
        if self.left() < (0 if self.smoke else need):
            self.emit(what, "not run", "-", notes=f"{self.left():.0f} s left of the part's cap, it needs ~{need:.0f} s")
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failed measurement is a result
            self.fail(what, e)

    def fail(self, what: str, e: Exception) -> None:
        traceback.print_exc()
        self.failures += 1
        self.emit(what, "failed", "-", notes=f"{type(e).__name__}: {e}"[:700])


def fmt(metric: str, value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if metric == "MFU":
        return f"{100 * value:.1f}%"
    if metric.startswith("ratio") or metric.startswith("vs "):
        return f"{value:.2f}x"
    if "GiB" in metric:
        return f"{value:.2f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


# -------------------------------------------------------------------------------------------- the results


def read_rows(path: Path) -> tuple[list[dict], str | None]:
    """A part's rows so far, and why it was skipped (if it was)."""
    rows, skipped = [], None
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # (a line being written when the part was stopped)
            continue
        if r.get("status") == "skipped":
            skipped = r["reason"]
        else:
            rows.append(r)
    return rows, skipped


def tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join([x for x in lines if x.strip()][-n:])


def cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " / ")


def markdown(results: dict) -> str:
    lines = ["# gpt2lab GPU suite", "", f"- machine: {results['machine_line']}",
             f"- command: `{results['command']}`",
             f"- budget {results['budget']:.0f} s, started {results['started']}, {results['elapsed']:.0f} s "
             + ("in all" if results.get("done") else "so far")
             + (", smoke mode (toy sizes, TORCH_COMPILE_DISABLE=1)" if results["smoke"] else ""), "",
             "| part | setting | metric | value | notes |", "|---|---|---|---:|---|"]
    for part in results["parts"]:
        label = f"{part['part']}. {TITLES[part['part']]}"
        for r in part["rows"]:
            lines.append(f"| {label} | {cell(r['setting'])} | {cell(r['metric'])} | {cell(r['shown'])} | "
                         f"{cell(r['notes'])} |")
        failed_rows = any(r["metric"] == "failed" for r in part["rows"])
        if part["status"] not in ("ok", "running") and not (part["status"].startswith("failed") and failed_rows):
            last = part.get("reason") or (part["stderr_tail"].splitlines() or [""])[-1]
            lines.append(f"| {label} | the part | status | {part['status']} | {cell(last[-300:])} |")
    lines += ["", "| part | status | seconds | cap (s) |", "|---|---|---:|---:|"]
    lines += [f"| {p['part']}. {TITLES[p['part']]} | {p['status']} | {p['seconds']:.0f} | {p['cap']:.0f} |"
              for p in results["parts"]]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_results(out: Path, results: dict, work: Path) -> None:
    results["elapsed"] = time.time() - results["t0"]
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str).encode())
    write_atomic(out / "results.md", markdown(results).encode())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for log in sorted([*work.glob("*.out"), *work.glob("*.err"), *(work / "logs").glob("*.log")]):
            data = log.read_bytes()[-2_000_000:]  # (the end of a long log says what went wrong)
            info = tarfile.TarInfo(f"logs/{log.name}")
            info.size, info.mtime = len(data), int(log.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    write_atomic(out / "logs.tar.gz", buf.getvalue())


# ---------------------------------------------------------------------------------------------- the run


def stop_group(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM to a process group (a part then stops what it started), SIGKILL after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def run_part(n: int, cap: float, args, work: Path, env: dict, results: dict) -> None:
    rows_file, out_log, err_log = work / f"part{n}.rows.jsonl", work / f"part{n}.out", work / f"part{n}.err"
    entry = dict(part=n, title=TITLES[n], status="running", cap=cap, seconds=0.0, rows=[], stderr_tail="")
    results["parts"].append(entry)
    cmd = [sys.executable, str(BENCH / "gpu_parts.py"), str(n), "--work", str(work), "--rows", str(rows_file),
           "--out", str(args.out), "--deadline", str(time.time() + cap - 10), "--device", args.device]
    cmd += ["--smoke"] * args.smoke + (["--hellaswag", args.hellaswag] if args.hellaswag else [])
    if results["machine"].get("gpu_memory_gib") and args.device.startswith("cuda"):
        cmd += ["--gpu-memory", f"{results['machine']['gpu_memory_gib']:.1f}"]
    print(f"\n== part {n}: {TITLES[n]} (cap {cap:.0f} s)\n$ {shlex.join(cmd)}", flush=True)
    start, seen, timed_out = time.time(), 0, False
    try:
        with out_log.open("w") as out, err_log.open("w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
            try:
                while proc.poll() is None and time.time() - start < cap:
                    time.sleep(1)
                    size = rows_file.stat().st_size if rows_file.exists() else 0
                    if size != seen:  # a new result: on disk at once
                        seen = size
                        entry["rows"], _ = read_rows(rows_file)
                        entry["seconds"] = time.time() - start
                        write_results(args.out, results, work)
            finally:
                timed_out = proc.poll() is None
                if timed_out:
                    stop_group(proc, 20)
    except BaseException:
        entry["status"] = "interrupted"
        raise
    finally:
        entry["seconds"] = time.time() - start
        entry["rows"], skipped = read_rows(rows_file)
        entry["stderr_tail"] = tail(err_log)
    if timed_out:
        entry["status"] = f"timed out at {cap:.0f} s"
    elif proc.returncode != 0:
        entry["status"] = f"failed (exit status {proc.returncode})"
    elif skipped:
        entry["status"], entry["reason"] = "skipped", skipped
    else:
        entry["status"] = "ok"
    print("".join(f"| {r['setting']} | {r['metric']} | {r['shown']} | {r['notes']} |\n" for r in entry["rows"])
          + f"== part {n}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
    if entry["status"] not in ("ok", "skipped") and entry["stderr_tail"]:
        print(entry["stderr_tail"], flush=True)


def parse_parts(text: str) -> list[int]:
    parts = sorted({int(x) for x in text.split(",") if x.strip()})
    if not parts or any(p not in TITLES for p in parts):
        raise argparse.ArgumentTypeError(f"parts are numbers from 1 to {len(TITLES)}, e.g. 1,3")
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="where results.json, results.md, ... go")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: checks every path in about a minute on a CPU")
    ap.add_argument("--parts", type=parse_parts, default=list(TITLES), help="which parts, e.g. 1,3 (default all)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all the parts (default 540, so that the whole fits a 600-s command; 600 "
                    "with --smoke, whose parts take what they need)")
    ap.add_argument("--hellaswag", default=None, help="HellaSwag's validation file (hellaswag_val.jsonl or .gz)")
    ap.add_argument("--work", type=Path, default=None, help="keep runs and logs here (default: a temporary dir)")
    args = ap.parse_args()
    budget = args.budget or (600.0 if args.smoke else 540.0)
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpt2lab-gpu-suite-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if args.smoke:  # --compile stays on the command lines but compiles nothing; one thread a toy model (two spin
        env.update(TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")  # against each other on a busy 2-core machine)
    t0 = time.time()
    info = machine(env)
    results = {"suite": "gpt2lab GPU suite", "command": shlex.join([Path(sys.executable).name, *sys.argv]),
               "machine": info, "machine_line": machine_line(info, args.device), "device": args.device,
               "smoke": args.smoke, "budget": budget, "t0": t0, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "parts": []}
    print(f"machine: {results['machine_line']}", flush=True)
    write_results(args.out, results, work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (then the part running now is stopped, results kept)
    try:
        for i, n in enumerate(args.parts):
            left = budget - (time.time() - t0) - 5
            cap = left * PLAN[n] / sum(PLAN[q] for q in args.parts[i:])
            if cap < 20:
                results["parts"].append(dict(part=n, title=TITLES[n], status="skipped", cap=cap, seconds=0.0, rows=[],
                                             stderr_tail="", reason=f"the budget is spent ({left:.0f} s left)"))
                continue
            run_part(n, cap, args, work, env, results)
            write_results(args.out, results, work)
    finally:
        results["done"] = True
        write_results(args.out, results, work)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown(results), flush=True)
    print(f"wrote {args.out}/results.md, results.json, logs.tar.gz", flush=True)
    bad = [p["part"] for p in results["parts"] if p["status"] not in ("ok", "skipped")]
    sys.exit(1 if args.smoke and bad else 0)


if __name__ == "__main__":
    main()
