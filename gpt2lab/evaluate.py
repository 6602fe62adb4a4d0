"""Evaluation: loss / perplexity / bits per byte, HellaSwag, LAMBADA and generic multiple choice.

Every task comes down to one measurement: the summed log-probability of a
continuation given a context, and whether greedy decoding would have produced
it. `score_requests` makes that measurement for many (context, continuations)
pairs at once; the tasks only build the pairs and turn the scores into metrics.
The tasks follow EleutherAI's lm-evaluation-harness, so that a model trained
here and OpenAI's GPT-2 imported here land on the scale everyone else reports:

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

Context and continuation are tokenised separately and the ids concatenated; an
empty context becomes <|endoftext|>, as in the harness. When the two together
exceed the model's context, the context loses tokens on the left and the
continuation stays whole.

How it is fast. A multiple-choice example is packed into one sequence: the
context once, then every choice's tokens, each choice attending to the context
and to itself only (a block mask), with its positions counting on from the end
of the context. HellaSwag thus costs one sequence of ~165 tokens per example
instead of four of ~80. The LM head, about 30% of GPT-2 small's work per token,
is applied only at the positions that predict a scored token. Sequences are
sorted by length and batched with right padding, which causal attention never
sees.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from gpt2lab.errors import UserError
from gpt2lab.eval_data import MCExample, load_hellaswag, load_lambada, load_mc, loss_documents, resolve_data
from gpt2lab.metrics import progress as progress_bar
from gpt2lab.model import GPT

TASKS = ("loss", "hellaswag", "lambada", "mc")
LM_HEAD_CHUNK = 1024  # scored positions per LM-head matmul: bounds the (positions, vocab) logits


# ----------------------------------------------------------------------------- scoring


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Request:
    """Score each continuation (token ids) after the context (token ids, at least one)."""

    context: Sequence[int]
    continuations: Sequence[Sequence[int]]


@dataclass(frozen=True)
class Score:
    logprob: float  # summed log-probability of the continuation's tokens, in nats
    greedy: bool  # the argmax at every continuation position is the continuation's token
    argmax: tuple[int, ...] | None = None  # those argmax ids, when asked for


@dataclass
class _Row:
    """One sequence of a batch: a context and the continuations that share it."""

    tokens: list[int]
    positions: list[int] | None  # None: 0, 1, 2, ...
    segments: list[int] | None  # 0 for context tokens, j + 1 for continuation j; None: one continuation
    scored: list[int]  # the row index whose output predicts each target
    targets: list[int]
    owners: list[int]  # which (request, continuation) each target belongs to


def _rows(requests: Sequence[Request], block_size: int) -> tuple[list[_Row], list[tuple[int, int]]]:
    """Requests -> rows; owners index the returned list of (request, continuation) pairs."""
    rows: list[_Row] = []
    pairs: list[tuple[int, int]] = []
    for r, req in enumerate(requests):
        ctx = list(req.context)
        conts = [list(c) for c in req.continuations]
        if not ctx:
            raise ValueError(f"request {r} has an empty context; start it with the <|endoftext|> id")
        for j, cont in enumerate(conts):
            if not 1 <= len(cont) <= block_size:
                raise UserError(f"example {r}: continuation {j} has {len(cont)} tokens; it must have "
                                f"between 1 and the model's context of {block_size}")
        first = len(pairs)
        pairs.extend((r, j) for j in range(len(conts)))
        packed = len(ctx) + sum(len(c) - 1 for c in conts)
        if len(conts) > 1 and packed <= block_size:
            rows.append(_packed_row(ctx, conts, first))
            continue
        for j, cont in enumerate(conts):
            # as the harness: the last block_size + 1 tokens of context + continuation, minus the last
            keep = block_size + 1 - len(cont)
            c = ctx[-keep:] if len(ctx) > keep else ctx
            n = len(c)
            rows.append(_Row(tokens=c + cont[:-1], positions=None, segments=None,
                             scored=list(range(n - 1, n - 1 + len(cont))), targets=cont,
                             owners=[first + j] * len(cont)))
    return rows, pairs


def _packed_row(ctx: list[int], conts: list[list[int]], first: int) -> _Row:
    n = len(ctx)
    tokens, positions, segments = list(ctx), list(range(n)), [0] * n
    scored, targets, owners = [], [], []
    for j, cont in enumerate(conts):
        start = len(tokens)
        tokens += cont[:-1]
        positions += range(n, n + len(cont) - 1)
        segments += [j + 1] * (len(cont) - 1)
        # the context's last token predicts every choice's first token, then each its own next
        scored += [n - 1] + list(range(start, start + len(cont) - 1))
        targets += cont
        owners += [first + j] * len(cont)
    return _Row(tokens, positions, segments, scored, targets, owners)


def _batch_tensors(batch: list[_Row], device: torch.device):
    B, T = len(batch), max(len(r.tokens) for r in batch)
    idx = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(batch):
        idx[b, :len(r.tokens)] = torch.tensor(r.tokens)
    if all(r.segments is None for r in batch):
        # plain causal sequences: right padding comes after every real token, so nothing sees it
        return idx.to(device), torch.arange(T, device=device), None
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    for b, r in enumerate(batch):
        n = len(r.tokens)
        pos[b, :n] = torch.tensor(r.positions if r.positions is not None else range(n))
        seg[b, :n] = torch.tensor(r.segments if r.segments is not None else [0] * n)
    ar = torch.arange(T)
    causal = ar[None, :] <= ar[:, None]  # (query, key): key not after query
    seg_q, seg_k = seg[:, :, None], seg[:, None, :]
    # a token sees the context and its own continuation, never another continuation or padding
    mask = causal[None] & ((seg_k == 0) | (seg_k == seg_q)) & (seg_k >= 0)
    mask |= torch.eye(T, dtype=torch.bool)[None]  # a padding row attends to itself: no NaN
    return idx.to(device), pos.to(device), mask[:, None].to(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def score_requests(model: GPT, requests: Sequence[Request], *, batch_size: int = 8,
                   autocast_dtype: torch.dtype | None = None, return_argmax: bool = False,
                   progress: bool = False, desc: str = "scoring",
                   bar=None) -> list[list[Score]]:
    """For each request, a Score per continuation: summed log-probability and greedy match.

    `batch_size` is the number of sequences per forward pass (a multiple-choice
    example packed with all its choices is one sequence). Scores do not depend
    on it beyond float rounding. `bar`: a progress bar to advance (one step per
    sequence) instead of making one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    rows, pairs = _rows(requests, model.config.block_size)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))  # longest first, as the harness
    logprob = torch.zeros(len(pairs), dtype=torch.float64)
    misses = torch.zeros(len(pairs), dtype=torch.long)
    argmax: list[list[int]] | None = [[] for _ in pairs] if return_argmax else None
    own_bar = bar is None
    if own_bar:
        bar = progress_bar(total=len(rows), desc=desc, unit="seq", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[start:start + batch_size]]
            idx, pos, mask = _batch_tensors(batch, device)
            if mask is not None and autocast_dtype is None:
                # additive form, made once rather than by attention in every layer
                additive = torch.zeros(mask.shape, dtype=model.lm_head.weight.dtype, device=device)
                mask = additive.masked_fill_(~mask, float("-inf"))
            with _autocast(device, autocast_dtype):
                h = model.hidden_states(idx, positions=pos, mask=mask)
            T = idx.size(1)
            flat = torch.tensor([b * T + s for b, r in enumerate(batch) for s in r.scored], device=device)
            targets = torch.tensor([t for r in batch for t in r.targets], device=device)
            owners = torch.tensor([o for r in batch for o in r.owners])
            h = h.reshape(-1, h.size(-1)).index_select(0, flat)
            lp, hit, am = _score_positions(model, h, targets, vocab)
            logprob.index_add_(0, owners, lp.double().cpu())
            misses.index_add_(0, owners, (~hit).long().cpu())
            if argmax is not None:
                for o, a in zip(owners.tolist(), am.tolist()):
                    argmax[o].append(a)
            bar.update(len(batch))
    finally:
        model.train(was_training)
        if own_bar:
            bar.close()
    out: list[list[Score]] = [[] for _ in requests]
    for p, (r, _j) in enumerate(pairs):
        ids = tuple(argmax[p]) if argmax is not None else None
        out[r].append(Score(float(logprob[p]), bool(misses[p] == 0), ids))
    return out


def _score_positions(model: GPT, h: torch.Tensor, targets: torch.Tensor, vocab: int):
    """The LM head on the scored positions only, in chunks, the log-probabilities in fp32."""
    lps, hits, ams = [], [], []
    weight_dtype = model.lm_head.weight.dtype
    for s in range(0, h.size(0), LM_HEAD_CHUNK):
        hc, tc = h[s:s + LM_HEAD_CHUNK], targets[s:s + LM_HEAD_CHUNK]
        logits = model.head(hc.to(weight_dtype)).float()[:, :vocab]
        # one pass for the argmax, one fused log-softmax for the targets' log-probabilities
        am = logits.max(dim=-1).indices
        lps.append(-F.cross_entropy(logits, tc, reduction="none"))
        ams.append(am)
        hits.append(am == tc)
    return torch.cat(lps), torch.cat(hits), torch.cat(ams)


# ----------------------------------------------------------------------------- text -> ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, tokenised separately, as the harness does.

    Whitespace at the end of the context moves to the start of the continuation;
    an empty context becomes <|endoftext|>.
    """
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    return _context_ids(tokenizer, context), tokenizer.encode_ordinary(continuation)


def _context_ids(tokenizer, context: str) -> list[int]:
    if context:
        return tokenizer.encode_ordinary(context)
    if tokenizer.eot_id is None:
        raise UserError("an example has an empty context and the tokenizer has no <|endoftext|> token "
                        "to stand in for it; give every example some context")
    return [tokenizer.eot_id]


# ----------------------------------------------------------------------------- tasks


@dataclass
class TaskResult:
    metrics: dict  # {"task", "n", metric: value, ...}
    records: list[dict] = field(default_factory=list)  # one per example, for --predictions


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
                       "ppl": math.exp(-mean_lp)}, records)


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
                       "ppl": math.exp(loss), "bpb": bpb, "stride": stride}, records)



# ----------------------------------------------------------------------------- one call, many tasks


def check_tasks(tasks: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    known = TASKS + tuple(extra)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; choose from {', '.join(known)}")
    if not tasks:
        raise UserError(f"no task given; choose from {', '.join(known)}")
    return list(dict.fromkeys(tasks))


def run_task(model: GPT, tokenizer, task: str, data: str, *, limit: int | None = None, batch_size: int = 8,
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
                 device: str = "auto", dtype: str = "fp32", progress: bool = False,
                 extra_tasks: dict[str, ExtraTask] | None = None) -> list[TaskResult]:
    """Load a run dir and score it on each task; `data` maps a task to its file or directory.

    `extra_tasks`: tasks defined elsewhere (the judge), called with the loaded model; their data
    paths must be given in `data`.
    """
    from gpt2lab.checkpoint import load_run, open_run
    from gpt2lab.distributed import resolve_device

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
    model, tokenizer = load_run(run_dir, device=dev, kind="lm")
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
            results.append(run_task(model, tokenizer, t, paths[t], limit=limit, batch_size=batch_size,
                                    stride=stride, autocast_dtype=autocast_dtype, progress=progress))
    return results


def format_table(results: Sequence[TaskResult]) -> str:
    """The metrics as an aligned text table: accuracies with their standard error."""
    lines = [f"{'task':<10} {'n':>7}  {'metric':<11} {'value':>10}"]
    for res in results:
        m, first = res.metrics, True
        passes = sorted(k for k in m if k.startswith("pass_at_"))
        for key in ("acc", "acc_norm", "loss", "ppl", "bpb", "mean_score", "unscored", *passes, "mean_reward"):
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


__all__ = ["Request", "Score", "TASKS", "TaskResult", "check_tasks", "encode_pair", "eval_lambada", "eval_loss",
           "eval_multiple_choice", "evaluate_run", "format_table", "loss_windows", "run_task", "score_requests"]
