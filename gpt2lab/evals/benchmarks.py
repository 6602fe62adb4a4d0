"""The benchmarks: loss / perplexity / bits per byte, HellaSwag, LAMBADA and generic multiple choice, each
built on scoring.py's one measurement; and `evaluate_run`, which scores a run dir on several of them.

They follow EleutherAI's lm-evaluation-harness, so that a model trained here and OpenAI's GPT-2 imported
here land on the scale everyone else reports:

  hellaswag  context  preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
             choices  " " + preprocess(ending), for each of the 4 endings
             acc      argmax of the summed log-probability of each choice's tokens
             acc_norm argmax of that sum divided by the length of the ending in characters
                      (the harness divides by len(ending), the text without its leading space)
  lambada    context  the passage without its last space-separated word; target " " + that word
             acc      greedy decoding reproduces every target token
             ppl      exp(-mean over passages of the target's summed log-probability)
  mc         {"context", "choices", "label"} records, scored like hellaswag without preprocessing
  loss       mean cross-entropy (nats per token), perplexity and bits per byte of documents
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gpt2lab.checkpoint import open_run
from gpt2lab.device import resolve_device
from gpt2lab.errors import UserError
from gpt2lab.evals.data import MCExample, load_hellaswag, load_lambada, load_mc, loss_documents, resolve_data
from gpt2lab.evals.scoring import Request, encode_pair, score_requests
from gpt2lab.metrics import progress as progress_bar
from gpt2lab.model.gpt import GPT

TASKS = ("loss", "hellaswag", "lambada", "mc")



@dataclass
class TaskResult:
    metrics: dict  # {"task", "n", metric: value, ...}
    records: list[dict] = field(default_factory=list)  # one per example, for --predictions


def _exp(x: float) -> float:
    """exp(x), infinite rather than an OverflowError for a model that has diverged."""
    return math.exp(x) if x < 709.0 else math.inf


def _stderr(p: float, n: int) -> float | None:
    """Standard error of a mean of n 0/1 outcomes (the sample standard deviation / sqrt(n))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def eval_multiple_choice(model: GPT, tokenizer, examples: Sequence[MCExample], task: str = "mc", *,
                         batch_size: int = 8, autocast_dtype: torch.dtype | None = None,
                         progress: bool = False) -> TaskResult:
    """acc: the choice with the highest summed log-probability; acc_norm: that sum / len(choice)."""
    if not examples:
        raise UserError(f"{task}: no examples to score; check the data file and --limit")
    requests = []
    for ex in examples:
        # the context ids come out the same for every choice: share them
        pairs = [encode_pair(tokenizer, ex.context, " " + choice) for choice in ex.choices]
        requests.append(Request(pairs[0][0], [cont for _, cont in pairs]))
    scores = score_requests(model, requests, batch_size=batch_size, autocast_dtype=autocast_dtype,
                            progress=progress, desc=task)
    correct = correct_norm = 0
    records = []
    for i, (ex, sc) in enumerate(zip(examples, scores)):
        lps = [s.logprob for s in sc]
        # the harness divides by the choice's length in characters; an empty choice never wins
        norm = [lp / len(c) if c else -math.inf for lp, c in zip(lps, ex.choices)]
        pred = max(range(len(lps)), key=lambda k: lps[k])
        pred_norm = max(range(len(norm)), key=lambda k: norm[k])
        correct += pred == ex.label
        correct_norm += pred_norm == ex.label
        records.append({"task": task, "index": i, "scores": lps, "prediction": pred,
                        "prediction_norm": pred_norm, "gold": ex.label})
    n = len(examples)
    acc, acc_norm = correct / n, correct_norm / n
    return TaskResult({"task": task, "n": n, "acc": acc, "acc_stderr": _stderr(acc, n), "acc_norm": acc_norm,
                       "acc_norm_stderr": _stderr(acc_norm, n)}, records)


def eval_lambada(model: GPT, tokenizer, examples: Sequence[tuple[str, str]], *, batch_size: int = 8,
                 autocast_dtype: torch.dtype | None = None, progress: bool = False) -> TaskResult:
    """acc: greedy decoding gives the whole last word; ppl: exp(-mean log-probability of it)."""
    if not examples:
        raise UserError("lambada: no examples to score; check the data file and --limit")
    requests = []
    for context, target in examples:
        ctx, cont = encode_pair(tokenizer, context, target)
        requests.append(Request(ctx, [cont]))
    scores = score_requests(model, requests, batch_size=batch_size, autocast_dtype=autocast_dtype,
                            return_argmax=True, progress=progress, desc="lambada")
    records = []
    for i, ((_, target), (s,)) in enumerate(zip(examples, scores)):
        records.append({"task": "lambada", "index": i, "scores": [s.logprob],
                        "prediction": tokenizer.decode(s.argmax), "gold": target, "correct": s.greedy})
    n = len(examples)
    acc = sum(r["correct"] for r in records) / n
    mean_lp = sum(s[0].logprob for s in scores) / n
    return TaskResult({"task": "lambada", "n": n, "acc": acc, "acc_stderr": _stderr(acc, n),
                       "ppl": _exp(-mean_lp)}, records)


def loss_windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """How a document of n tokens is scored: (begin, first, end) per window.

    The window's input is ids[begin:end] (at most block_size tokens) and it
    scores the targets ids[first:end + 1], the tokens no earlier window scored,
    each with every token of the window before it as context. ids[0] is context
    only. Windows begin every `stride` tokens; with stride == block_size their
    inputs do not overlap, and every window's scored tokens have at least
    block_size + 1 - stride tokens of context.
    """
    if not 1 <= stride <= block_size:
        raise UserError(f"stride {stride} must be between 1 and the model's context of {block_size}")
    windows, done, begin = [], 0, 0  # done: the last target index scored so far
    while done < n - 1:
        end = min(begin + block_size, n - 1)
        windows.append((begin, done + 1, end))
        done, begin = end, begin + stride
    return windows


def eval_loss(model: GPT, tokenizer, documents: Sequence[Sequence[int]], *, stride: int | None = None,
              batch_size: int = 8, autocast_dtype: torch.dtype | None = None, progress: bool = False,
              desc: str = "loss", chunk_windows: int = 4096) -> TaskResult:
    """Cross-entropy, perplexity and bits per byte of token documents, each scored on its own.

    A document's first id is its context only (prepared data and `text_documents`
    put <|endoftext|> there). Bits per byte = total nats / (ln 2 * total UTF-8
    bytes the scored tokens decode to), comparable across tokenizers. Windows
    are scored `chunk_windows` at a time, so memory does not grow with the data.
    """
    block = model.config.block_size
    stride = block // 2 if stride is None else stride
    windows = [(d, *w) for d, doc in enumerate(documents) for w in loss_windows(len(doc), block, stride)]
    if not windows:
        raise UserError("loss: no document has a token to score (each needs at least two ids); "
                        "check the data and --limit")
    nll = [0.0] * len(documents)
    with progress_bar(total=len(windows), desc=desc, unit="seq", disable=not progress, leave=False,
              file=sys.stderr) as bar:
        for s in range(0, len(windows), chunk_windows):
            part = windows[s:s + chunk_windows]
            requests = []
            for d, begin, first, end in part:
                ids = np.asarray(documents[d][begin:end + 1]).tolist()
                requests.append(Request(ids[:first - begin], [ids[first - begin:]]))
            scores = score_requests(model, requests, batch_size=batch_size, autocast_dtype=autocast_dtype,
                                    bar=bar)
            for (d, *_), (sc,) in zip(part, scores):
                nll[d] -= sc.logprob
    records, tokens, nbytes = [], 0, 0
    for d in sorted({w[0] for w in windows}):
        doc = documents[d]
        n_bytes = len(tokenizer.decode_bytes(np.asarray(doc[1:]).tolist()))
        tokens += len(doc) - 1
        nbytes += n_bytes
        records.append({"task": "loss", "index": d, "tokens": len(doc) - 1, "bytes": n_bytes, "nll": nll[d]})
    total = sum(r["nll"] for r in records)
    loss = total / tokens
    bpb = total / (math.log(2) * nbytes) if nbytes else None  # only <|endoftext|> was scored
    return TaskResult({"task": "loss", "n": len(records), "tokens": tokens, "bytes": nbytes, "loss": loss,
                       "ppl": _exp(loss), "bpb": bpb, "stride": stride}, records)



# ----------------------------------------------------------------------------- one call, many tasks


def check_tasks(tasks: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    known = TASKS + tuple(extra)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; choose from {', '.join(known)}")
    if not tasks:
        raise UserError(f"no task given; choose from {', '.join(known)}")
    return list(dict.fromkeys(tasks))


def run_benchmark(model: GPT, tokenizer, task: str, data: str, *, limit: int | None = None, batch_size: int = 8,
             stride: int | None = None, autocast_dtype: torch.dtype | None = None,
             progress: bool = False) -> TaskResult:
    """One scoring task on one model; `data` as `resolve_data` returns it."""
    start = time.perf_counter()
    opts = dict(batch_size=batch_size, autocast_dtype=autocast_dtype, progress=progress)
    if task == "hellaswag":
        result = eval_multiple_choice(model, tokenizer, load_hellaswag(data, limit), "hellaswag", **opts)
    elif task == "mc":
        result = eval_multiple_choice(model, tokenizer, load_mc(data, limit), "mc", **opts)
    elif task == "lambada":
        result = eval_lambada(model, tokenizer, load_lambada(data, limit), **opts)
    elif task == "loss":
        docs = loss_documents(tokenizer, data, limit, vocab_size=model.config.vocab_size)
        result = eval_loss(model, tokenizer, docs, stride=stride, **opts)
    else:
        raise UserError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    result.metrics["data"] = str(data)
    result.metrics["seconds"] = round(time.perf_counter() - start, 3)
    return result


# a task evaluate.py does not know (the judge, ...): (model, tokenizer, run info, data, limit, progress) -> result
ExtraTask = Callable[..., "TaskResult"]


def evaluate_run(run_dir: str | os.PathLike, tasks: Sequence[str], data: dict[str, str] | None = None, *,
                 limit: int | None = None, batch_size: int = 8, stride: int | None = None,
                 device: str = "auto", dtype: str = "fp32", progress: bool = False, quantize: str | None = None,
                 extra_tasks: dict[str, ExtraTask] | None = None) -> list[TaskResult]:
    """Load a run dir and score it on each task; `data` maps a task to its file or directory.

    `extra_tasks`: tasks defined elsewhere (the judge), called with the loaded model; their data
    paths must be given in `data`.
    """
    extra_tasks = extra_tasks or {}
    tasks = check_tasks(tasks, tuple(extra_tasks))
    data = dict(data or {})
    unused = sorted(set(data) - set(tasks))
    if unused:
        raise UserError(f"--data is given for {unused[0]}, which is not among the tasks {', '.join(tasks)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"unknown dtype {dtype!r}; use fp32 or bf16")
    info = open_run(run_dir)
    # every path is checked (and downloaded) before the model is loaded
    paths = {}
    for t in tasks:
        if t in extra_tasks:
            if t in data and not os.path.exists(data[t]):
                raise UserError(f"--data {data[t]} for task {t} does not exist; check the path")
            paths[t] = data.get(t)
        else:
            paths[t] = resolve_data(t, data.get(t), info.config, progress)
    model, tokenizer = info.load(dev, kind="lm", quantize=quantize)
    autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
    results = []
    for t in tasks:
        if t in extra_tasks:
            start = time.perf_counter()
            res = extra_tasks[t](model, tokenizer, info, paths[t], limit=limit, progress=progress)
            res.metrics.setdefault("data", str(paths[t]) if paths[t] else None)
            res.metrics["seconds"] = round(time.perf_counter() - start, 3)
            results.append(res)
        else:
            results.append(run_benchmark(model, tokenizer, t, paths[t], limit=limit, batch_size=batch_size,
                                    stride=stride, autocast_dtype=autocast_dtype, progress=progress))
    return results


def format_table(results: Sequence[TaskResult]) -> str:
    """The metrics as an aligned text table: accuracies with their standard error."""
    lines = [f"{'task':<10} {'n':>7}  {'metric':<11} {'value':>10}"]
    for res in results:
        m, first = res.metrics, True
        passes = sorted(k for k in m if k.startswith("pass_at_"))
        for key in ("acc", "acc_norm", "loss", "ppl", "bpb", "exact_match", "mean_score", "unscored", *passes,
                    "mean_reward"):
            if key not in m:
                continue
            value = m[key]
            if value is None:
                text = f"{'-':>10}"
            elif key.startswith("acc"):
                err = m.get(key + "_stderr")
                text = f"{value:>10.4f}" + (f" ± {err:.4f}" if err is not None else "")
            elif key in ("ppl", "mean_score"):
                text = f"{value:>10.3f}"
            elif key == "unscored":
                text = f"{value:>10d}"
            else:
                text = f"{value:>10.4f}"
            task, n = (m["task"], str(m["n"])) if first else ("", "")
            lines.append(f"{task:<10} {n:>7}  {key:<11} {text}")
            first = False
    return "\n".join(lines)


__all__ = ["TASKS", "TaskResult", "check_tasks", "eval_lambada", "eval_loss", "eval_multiple_choice", "evaluate_run",
           "format_table", "loss_windows", "run_benchmark"]
