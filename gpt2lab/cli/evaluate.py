"""`gpt2lab eval`: score a run dir on loss / perplexity / bits per byte, HellaSwag, LAMBADA, or a
multiple-choice file, several tasks in one call."""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from gpt2lab.cli import finite_float, nonneg_int, positive_int

# the tasks of gpt2lab.evals.benchmarks.TASKS (a test checks that they agree), named here so that a typo is
# reported at once, without importing torch
TASK_NAMES = ("loss", "hellaswag", "lambada", "mc", "judge", "exact", "arithmetic", "countdown")
CHECKABLE = ("arithmetic", "countdown")  # gpt2lab.evals.checkable.BUILTIN: pass@1 and pass@k on held-out prompts


def _task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in TASK_NAMES:
            raise argparse.ArgumentTypeError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
    if not names:
        raise argparse.ArgumentTypeError(f"no task named; choose from {', '.join(TASK_NAMES)}")
    return names


def _data_map(specs: list[str] | None, tasks: list[str]) -> dict[str, str]:
    """--data [TASK=]PATH, repeatable; a bare PATH belongs to the only task."""
    from gpt2lab.errors import UserError

    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, rest = spec.partition("=")
        if sep and name in TASK_NAMES:
            task, path = name, rest
        elif len(tasks) == 1:
            task, path = tasks[0], spec
        else:
            raise UserError(f"--data {spec}: with several tasks, say which one the data is for, e.g. "
                            f"--data {tasks[0]}={spec}")
        if task in out:
            raise UserError(f"--data is given twice for task {task}; give one file or directory per task")
        if not glob.has_magic(path) and not Path(path).exists():  # before seconds of imports
            raise UserError(f"--data {path} for task {task} does not exist; check the path")
        out[task] = path
    return out


def cmd_eval(args) -> int:
    from gpt2lab import io
    from gpt2lab.errors import UserError
    from gpt2lab.evals.benchmarks import evaluate_run, format_table

    tasks = list(dict.fromkeys(t for group in args.task for t in group))
    data = _data_map(args.data, tasks)
    for name in ("judge", "exact"):
        if name in tasks and name not in data:
            raise UserError(f"task {name} needs --data FILE.json or .jsonl of Alpaca records "
                            "{instruction, input, output}")
    # the outputs are checked before the (long) evaluation starts
    from gpt2lab.sources import expand_inputs

    inputs = [args.run_dir]
    for path in data.values():  # a glob's matches are inputs too
        inputs += [str(p) for p in expand_inputs([path])] if glob.has_magic(path) else [path]
    if args.output and args.predictions and Path(args.output).resolve() == Path(args.predictions).resolve():
        raise UserError("--output and --predictions name the same file; give each its own")
    if args.output:
        io.check_output_file(args.output, "eval-json", flag="--output", inputs=inputs)
    if args.predictions:
        io.check_output_file(args.predictions, "eval-jsonl", flag="--predictions", inputs=inputs)
    extra = {}
    if "judge" in tasks:
        from gpt2lab.evals.judge import judge_task

        extra["judge"] = judge_task(args.judge_url, args.judge_model, args.judge_api_key, args.max_new_tokens)
    if "exact" in tasks:
        from gpt2lab.evals.judge import exact_task

        extra["exact"] = exact_task(args.max_new_tokens)
    if args.k > max(1, args.samples):
        raise UserError(f"--k {args.k} needs at least that many --samples per prompt (now {args.samples})")
    for name in CHECKABLE:
        if name in tasks:
            from gpt2lab.evals.checkable import eval_task

            if name in data:
                raise UserError(f"task {name} makes its own held-out prompts; drop --data for it")
            extra[name] = eval_task(name, args.difficulty, args.samples, args.k, args.max_new_tokens,
                                    args.temperature)
    results = evaluate_run(args.run_dir, tasks, data, limit=args.limit, batch_size=args.batch_size,
                           stride=args.stride, device=args.device, dtype=args.dtype, progress=not args.quiet,
                           quantize=args.quantize,
                           extra_tasks=extra)
    print(format_table(results), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # a missing folder was checked writable
        io.write_json(args.output, [r.metrics for r in results])
    if args.predictions:
        Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
        io.write_jsonl(args.predictions, [rec for r in results for rec in r.records])
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="score a run: loss/perplexity/bits per byte, HellaSwag, LAMBADA, multiple choice",
        description="Score a run dir the way lm-evaluation-harness does. Tasks: loss (cross-entropy, "
        "perplexity and bits per byte of a data dir's val split or of text files, long documents in "
        "sliding windows), hellaswag (acc, acc_norm), lambada (acc, ppl of the last word), mc (a JSONL "
        "of {\"context\", \"choices\", \"label\"}), judge (answers to Alpaca records scored 0-100 by a "
        "larger model behind an OpenAI-compatible endpoint), exact (the share of greedy answers to Alpaca records "
        "equal to their output), arithmetic and countdown (checkable tasks: pass@1, "
        "greedy, and pass@k on held-out prompts). HellaSwag and LAMBADA are downloaded once "
        "into ~/.cache/gpt2lab unless --data is given.")
    p.add_argument("run_dir", help="a run directory (trained, fine-tuned or imported)")
    p.add_argument("--task", type=_task_list, action="append", required=True, metavar="TASK",
                   help=f"one of {', '.join(TASK_NAMES)}; repeat it or separate with commas for several")
    p.add_argument("--data", action="append", metavar="[TASK=]PATH",
                   help="the task's data: a data dir or text files for loss, a .jsonl/.jsonl.gz for the "
                   "others; prefix the task name when several tasks are given")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N examples "
                   "(documents for loss)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per forward pass (a multiple-choice example with all its choices is one) "
                   "(default 32)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="loss: tokens between sliding windows (default half the context; the context "
                   "itself gives windows that do not overlap)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="score the model with int8 weights (as --quantize int8 decodes), to measure what it costs")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 autocast (GPUs, and CPUs with AVX512-BF16 or AMX) (default fp32)")
    p.add_argument("--output", metavar="FILE.json", help="write the metrics: a list of {task, n, ...} (an "
                   "existing file is replaced only if it holds gpt2lab metrics)")
    p.add_argument("--predictions", metavar="FILE.jsonl",
                   help="write one line per example: index, scores per choice, prediction, gold (an existing "
                   "file is replaced only if it holds gpt2lab predictions)")
    p.add_argument("--judge-url", default="http://localhost:11434",
                   help="judge: an OpenAI-compatible server (Ollama, vLLM, llama.cpp server, OpenAI) that "
                   "scores each answer 0-100 (default http://localhost:11434)")
    p.add_argument("--judge-model", default="llama3", help="judge: the model name the server knows (default llama3)")
    p.add_argument("--judge-api-key", default=None, help="judge: the API key of that endpoint, sent only to it "
                   "(default: none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="judge, exact, arithmetic, countdown: tokens generated per answer (default 128)")
    p.add_argument("--difficulty", type=positive_int, default=1, help="arithmetic, countdown: difficulty 1 to 5 "
                   "(default 1)")
    p.add_argument("--samples", type=nonneg_int, default=0, help="arithmetic, countdown: sampled answers per "
                   "prompt for pass@k (default 0: greedy pass@1 only)")
    p.add_argument("--k", type=positive_int, default=1, help="arithmetic, countdown: the k of pass@k, at most "
                   "--samples (default 1)")
    p.add_argument("--temperature", type=finite_float, default=1.0, help="arithmetic, countdown: the temperature "
                   "of the sampled answers (default 1.0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
