"""Continuous batching: many requests share each decoding step of one model.

`Scheduler` owns the model in one worker thread. Requests (`Job`s: a prompt, settings, `n` choices)
are submitted from any thread; every choice becomes a *row* of one running batch. Between two steps
rows join and leave:

    loop:
        take new jobs; drop the rows and waiting jobs of cancelled ones (a client went away)
        admit waiting jobs (first come, first served) while the batch has room:
            prefill their prompts together (left-padded, a cache of their own), sample each row's
            first token, and merge their cache rows into the batch's cache
        one decoding step: each row's last token, at the same slot of every row, through the model
        sample one token per row (its own temperature, top-k, top-p and random generator),
        turn it into text (UTF-8 safe, stop strings cut) and hand it to the job's sink
        remove finished rows; trim the cache slots no remaining row uses

The cache layout: one `KVCache` for the batch, every row right-aligned. All rows write their next
token at the same slot (`cache.pos`); row b holds its tokens in slots `pad[b] .. pos - 1` and the
slots before are padding that no query attends to. `LeftPadding` gives each row its own positions
(counted from its first real token) and the mask that hides the padding, so a row sees exactly what
it would see alone: its greedy output is the output of `gpt2lab generate --temperature 0`, whatever
else is in the batch (up to float rounding of batched matmuls, which never changed a token in the
tests). A joining job is prefilled on its own and its rows are copied into a rebuilt cache, with
the longer of the two histories deciding the common length and the other rows padded on the left.
When rows leave, the last live rows move into their places (a copy of one row's cache each) and the
batch's buffers are narrowed; when much of the cache has become padding that every remaining row has,
it is rebuilt shifted left instead. The cache grows in chunks as the batch writes (a rebuild, which
also drops the shared padding); it never exceeds the model's context:
a job is admitted only if every row, old and new, can write all its remaining tokens below
`block_size` slots (otherwise it waits for rows to finish). Per-row caches were the alternative; a
common cache keeps each step one batched call of the model's own forward with no change to it.

A rebuild copies the whole cache (a join, a growth step, or a leave that trims padding); a long
prompt's prefill runs between two steps and delays the other rows by that much (no chunked prefill).
`max_batch=1` serves one choice at a time (the baseline of bench/serve.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gpt2lab.errors import UserError
from gpt2lab.generate import LeftPadding, StopText, StreamDecoder, check_settings, sample_next
from gpt2lab.model import GPT, KVCache

GROW = 128  # cache slots added at a time as the batch writes


# ------------------------------------------------------------------------------- jobs and events


class Busy(UserError):
    """The scheduler takes no more jobs now (its queue is full, or it is shutting down)."""


@dataclass
class TokenInfo:
    """One sampled token: its id, the log-probability the model gave it, and the most likely alternatives."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Text:
    """New text of choice `index`, with the tokens it came from (their logprobs when asked for)."""

    index: int
    text: str
    tokens: list[TokenInfo]


@dataclass
class Finish:
    """Choice `index` is complete: `reason` is "stop" (<|endoftext|> or a stop string) or "length"."""

    index: int
    reason: str
    completion_tokens: int


@dataclass
class PromptLogprobs:
    """Logprobs of the prompt's tokens (the first has none): asked for by `echo` with `logprobs`."""

    tokens: list[TokenInfo]


@dataclass
class Failed:
    """The job could not be completed; no more events follow."""

    message: str


Event = Text | Finish | PromptLogprobs | Failed


@dataclass
class Job:
    """One prompt and its sampling settings; `n` choices are generated from it, each a row of the batch.

    `sink(event)` is called from the worker thread with every `Text`, `Finish`, `PromptLogprobs` or
    `Failed` of the job; it must return quickly (put the event on a queue). `max_new_tokens` must
    leave the prompt room in the context: prompt + max_new_tokens <= block_size.
    """

    prompt: list[int]
    sink: Callable[[Event], None]
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    n: int = 1
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely
    prompt_logprobs: bool = False
    cancelled: bool = field(default=False, init=False)
    submitted: float = field(default=0.0, init=False)

    def cancel(self) -> None:
        """Stop generating for this job (its rows leave the batch before the next step)."""
        self.cancelled = True


class _Row:
    """One choice of a job being generated."""

    def __init__(self, job: Job, index: int, tokenizer, device: torch.device):
        self.job, self.index = job, index
        self.decoder = StreamDecoder(tokenizer)
        self.cutter = StopText(job.stop)
        self.generator = None
        if job.seed is not None and job.temperature > 0:
            # choice i uses seed + i, as `gpt2lab generate --seed S --num-samples N` does
            self.generator = torch.Generator(device=device).manual_seed(job.seed + index)
        self.length = len(job.prompt)  # tokens of this row in the cache
        self.generated = 0  # tokens sampled so far
        self.pending = -1  # the last sampled token: the next step's input
        self.infos: list[TokenInfo] = []  # tokens whose text has not been handed out yet
        self.done = False

    @property
    def future(self) -> int:
        """Cache slots this row may still write: the pending token and every later one but the last."""
        return max(0, len(self.job.prompt) + self.job.max_new_tokens - 1 - self.length)


# --------------------------------------------------------------------------------- the scheduler


class Scheduler:
    """Continuous batching of `Job`s on one model, in a worker thread (see the module's docstring).

        scheduler = Scheduler(model, tokenizer, max_batch=32)
        scheduler.start()
        scheduler.submit(Job(prompt_ids, sink=events.put, max_new_tokens=50, temperature=0))
        ...
        scheduler.close()
    """

    def __init__(self, model: GPT, tokenizer, max_batch: int = 32, max_waiting: int = 1024):
        if max_batch < 1:
            raise UserError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = model.config
        self.block = model.config.block_size
        self.device = model.transformer.wte.weight.device
        self.eot = tokenizer.eot_id
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._lock = threading.Condition()
        self._inbox: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._padding: LeftPadding | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self.counters = {"steps": 0, "tokens": 0, "jobs": 0, "cancelled": 0, "failed": 0, "max_rows": 0}

    # ----------------------------------------------------------------------------- public side

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpt2lab-batching", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; jobs still waiting or running get `Failed`."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        """Queue a job (thread-safe). Raises UserError when its settings are unusable or the queue is full."""
        check_settings(job.max_new_tokens, job.temperature, job.top_k, job.top_p)
        if not job.prompt:
            raise UserError("the prompt is empty; start it with the <|endoftext|> id")
        if any(not 0 <= i < self.config.vocab_size for i in job.prompt):
            raise UserError(f"the prompt holds a token id outside the model's vocabulary of {self.config.vocab_size}")
        if len(job.prompt) + job.max_new_tokens > self.block:
            raise UserError(f"the prompt ({len(job.prompt)} tokens) plus max_new_tokens ({job.max_new_tokens}) "
                            f"exceeds the context of {self.block} tokens")
        if not 1 <= job.n <= self.max_batch:
            raise UserError(f"n must be between 1 and {self.max_batch} (the server's batch size), got {job.n}")
        with self._lock:
            if self._closing:
                raise Busy("the server is shutting down")
            if len(self._inbox) + len(self._waiting) >= self.max_waiting:
                raise Busy(f"the server is busy ({self.max_waiting} requests waiting); try again later")
            job.submitted = time.monotonic()
            self._inbox.append(job)
            self._lock.notify_all()
        return job

    def stats(self) -> dict:
        """Rows decoding now, jobs waiting, and counters since the start (read without locking)."""
        return {"active": len(self._rows), "waiting": len(self._waiting) + len(self._inbox),
                "max_batch": self.max_batch, **self.counters}

    # ----------------------------------------------------------------------------- worker side

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._closing and not self._inbox and not self._waiting and not self._rows:
                        self._lock.wait()
                    if self._closing:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - a failed step fails its jobs, never the server
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", waiting=True)

    def _step(self) -> None:
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._remove_finished()  # rows whose first token already ended them
        if self._rows:
            self._decode()
            self._remove_finished()

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # noqa: BLE001 - the receiver is gone (its event loop closed): stop its job
            job.cancelled = True

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        jobs = {id(r.job): r.job for r in self._rows}
        if waiting:
            with self._lock:
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            jobs.update((id(j), j) for j in self._waiting)
            self._waiting.clear()
        for job in jobs.values():
            self.counters["failed"] += 1
            self._emit(job, Failed(message))
        self._rows, self._cache, self._padding = [], None, None

    def _drop_cancelled(self) -> None:
        gone = [j for j in self._waiting if j.cancelled]
        if gone:
            self._waiting = deque(j for j in self._waiting if not j.cancelled)
        cancelled_rows = {id(r.job): r.job for r in self._rows if r.job.cancelled}
        for r in self._rows:
            if r.job.cancelled:
                r.done = True
        self.counters["cancelled"] += len(gone) + len(cancelled_rows)
        if cancelled_rows:
            self._remove_finished()

    # admission ----------------------------------------------------------------------------

    def _admit(self) -> bool:
        """Prefill waiting jobs that fit and merge their rows into the batch. True if any joined."""
        jobs: list[Job] = []
        rows = len(self._rows)
        pos = max((r.length for r in self._rows), default=0)  # the merge drops the padding all rows share
        future = max((r.future for r in self._rows), default=0)
        while self._waiting:
            job = self._waiting[0]
            new_pos = max(pos, len(job.prompt))
            new_future = max(future, job.max_new_tokens - 1)
            if rows + job.n > self.max_batch or (rows and new_pos + new_future > self.block):
                break  # first come, first served: the others wait behind it
            self._waiting.popleft()
            jobs.append(job)
            rows, pos, future = rows + job.n, new_pos, new_future
        if not jobs:
            return False
        try:
            self._prefill(jobs)
        except Exception as e:  # noqa: BLE001 - these jobs fail; the running rows go on
            for job in jobs:
                self.counters["failed"] += 1
                self._emit(job, Failed(f"generation failed: {type(e).__name__}: {e}"))
        return True

    def _prefill(self, jobs: list[Job]) -> None:
        device = self.device
        lengths = [len(j.prompt) for j in jobs]
        longest = max(lengths)
        pads = [longest - n for n in lengths]
        ids = torch.tensor([[0] * p + j.prompt for p, j in zip(pads, jobs)], dtype=torch.long, device=device)
        cache = KVCache(self.config, len(jobs), max_len=longest, device=device)
        positions = mask = None
        if any(pads):
            positions, mask = LeftPadding(torch.tensor(pads, device=device), longest).inputs(0, longest)
        full = any(j.prompt_logprobs for j in jobs)
        logits = self.model(ids, kv_cache=cache, last_only=not full, positions=positions, mask=mask)
        for b, job in enumerate(jobs):
            if job.prompt_logprobs:
                self._emit(job, PromptLogprobs(self._prompt_logprobs(job, logits[b, pads[b]:], job.logprobs or 0)))
        self.counters["jobs"] += len(jobs)
        new_rows, order = [], []
        for b, job in enumerate(jobs):
            if job.max_new_tokens == 0:  # scoring only (echo): nothing to generate
                for i in range(job.n):
                    self._emit(job, Finish(i, "length", 0))
                continue
            for i in range(job.n):
                new_rows.append(_Row(job, i, self.tokenizer, device))
                order.append(b)
        if not new_rows:
            return
        last = logits[:, -1]
        index = torch.tensor(order, device=device)
        self._relayout(list(range(len(self._rows))), (cache, index, new_rows))
        self.counters["max_rows"] = max(self.counters["max_rows"], len(self._rows))
        self._sample(last.index_select(0, index), new_rows)

    def _prompt_logprobs(self, job: Job, logits: torch.Tensor, top: int) -> list[TokenInfo]:
        """The prompt's tokens with the logprob the model gave each after the ones before it."""
        lp = logits.float().log_softmax(-1)  # (P, V): position t predicts token t + 1
        out = [TokenInfo(job.prompt[0])]
        if len(job.prompt) > 1:
            targets = torch.tensor(job.prompt[1:], device=lp.device)
            chosen = lp[:-1].gather(1, targets[:, None])[:, 0].tolist()
            tops = lp[:-1].topk(top, dim=-1) if top else None
            for t, token in enumerate(job.prompt[1:]):
                alts = None
                if tops is not None:
                    alts = list(zip(tops.indices[t].tolist(), tops.values[t].tolist()))
                out.append(TokenInfo(token, chosen[t], alts))
        return out

    # cache layout -------------------------------------------------------------------------

    def _relayout(self, keep: list[int], new: tuple[KVCache, torch.Tensor, list[_Row]] | None = None) -> None:
        """Rebuild the batch's cache from the rows `keep` (indices into the current rows), shifted left past
        the padding they all share, and the rows `new[1]` of a prefill cache `new[0]` (the rows `new[2]`),
        every row right-aligned at the common length."""
        old = self._cache
        kept = [self._rows[i] for i in keep]
        new_rows = new[2] if new is not None else []
        rows = kept + new_rows
        self._rows = rows
        if not rows:
            self._cache = self._padding = None
            return
        old_len = max((r.length for r in kept), default=0)  # the kept history, less the shared padding
        shift = old.pos - old_len if kept else 0
        new_len = new[0].pos if new is not None else 0
        pos = max(old_len, new_len)
        # room for the next writes: in chunks, and never past the context (admission made sure it fits)
        cap = min(self.block, pos + max(1, min(GROW, max(r.future for r in rows))))
        cache = KVCache(self.config, len(rows), max_len=cap, device=self.device)
        keep_index = torch.tensor(keep, device=self.device) if kept else None
        for layer in range(self.config.n_layer):
            like = old.layers[layer] if kept else new[0].layers[layer]
            bufs = tuple(torch.zeros(len(rows), t.size(1), cap, t.size(3), dtype=t.dtype, device=t.device)
                         for t in like)
            if kept:
                for buf, t in zip(bufs, old.layers[layer]):
                    buf[:len(kept), :, pos - old_len:pos] = t[:, :, shift:shift + old_len].index_select(0, keep_index)
            if new is not None:
                for buf, t in zip(bufs, new[0].layers[layer]):
                    buf[len(kept):, :, pos - new_len:pos] = t[:, :, :new_len].index_select(0, new[1])
            cache.layers[layer] = bufs
        cache.pos = pos
        self._cache = cache
        pads = [pos - r.length for r in rows]
        self._padding = LeftPadding(torch.tensor(pads, device=self.device), cap) if any(pads) else None

    def _remove_finished(self) -> None:
        """Drop finished rows. Usually by moving the last live rows into their places (one row's cache each)
        and narrowing the batch; when much of the cache is padding that every live row has, by rebuilding it
        shifted left."""
        rows = self._rows
        gone = [i for i, r in enumerate(rows) if r.done]
        if not gone:
            return
        live = len(rows) - len(gone)
        if live == 0:
            self._rows, self._cache, self._padding = [], None, None
            return
        cache = self._cache
        shared = cache.pos - max(r.length for r in rows if not r.done)
        if shared >= max(32, cache.pos // 4):
            self._relayout([i for i, r in enumerate(rows) if not r.done])
            return
        holes = [i for i in gone if i < live]
        movers = [j for j in range(live, len(rows)) if not rows[j].done]
        if holes:
            src, dst = torch.tensor(movers, device=self.device), torch.tensor(holes, device=self.device)
            for bufs in cache.layers:
                for buf in bufs:
                    buf[dst] = buf[src]
            for h, m in zip(holes, movers):
                rows[h] = rows[m]
        self._rows = rows[:live]
        cache.layers = [tuple(buf[:live] for buf in bufs) for bufs in cache.layers]
        cache.batch_size = live
        pads = [cache.pos - r.length for r in self._rows]
        self._padding = LeftPadding(torch.tensor(pads, device=self.device), cache.max_len) if any(pads) else None

    # decoding -----------------------------------------------------------------------------

    def _decode(self) -> None:
        rows, cache = self._rows, self._cache
        if cache.pos >= cache.max_len:  # out of slots: grow the cache (never past the context)
            self._relayout(list(range(len(rows))))
            rows, cache = self._rows, self._cache
        ids = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.device)
        if self._padding is not None:
            positions, mask = self._padding.inputs(cache.pos, 1)
        else:
            positions = mask = None  # every row starts at slot 0: exactly what a row alone computes
        logits = self.model(ids, kv_cache=cache, last_only=True, positions=positions, mask=mask)[:, -1]
        for r in rows:
            r.length += 1
        self.counters["steps"] += 1
        self._sample(logits, rows)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Sample each row's next token from its logits (B, V) and hand out the text.

        Greedy rows take the argmax; sampled rows without a seed are sampled together, one call per
        setting (temperature, top-k, top-p); a seeded row draws from its own generator, as it would alone."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        greedy = logits.argmax(dim=-1).tolist()
        tokens: dict[int, int] = {}
        groups: dict[tuple, list[int]] = {}
        for b, r in enumerate(rows):
            job = r.job
            if r.done:
                continue
            if not finite[b]:
                r.done = job.cancelled = True
                self.counters["failed"] += 1
                self._emit(job, Failed("the model's logits are not finite (NaN or infinity): its weights are damaged"))
            elif job.temperature == 0:
                tokens[b] = greedy[b]
            elif r.generator is None:
                groups.setdefault((job.temperature, job.top_k, job.top_p), []).append(b)
            else:
                tokens[b] = int(sample_next(logits[b:b + 1], job.temperature, job.top_k, job.top_p, r.generator)[0])
        for (temperature, top_k, top_p), index in groups.items():
            drawn = sample_next(logits[index], temperature, top_k, top_p).tolist()
            tokens.update(zip(index, drawn))
        wanted = [b for b in tokens if rows[b].job.logprobs is not None]
        lp = dict(zip(wanted, logits[wanted].float().log_softmax(-1))) if wanted else {}
        for b, token in tokens.items():
            info = TokenInfo(token)
            if b in lp:
                info.logprob = float(lp[b][token])
                k = rows[b].job.logprobs
                if k:
                    top = lp[b].topk(k)
                    info.top = list(zip(top.indices.tolist(), top.values.tolist()))
            self._take(rows[b], token, info)

    def _take(self, r: _Row, token: int, info: TokenInfo) -> None:
        r.generated += 1
        self.counters["tokens"] += 1
        job = r.job
        if token == self.eot:
            self._text(r, r.cutter.flush(r.decoder.flush()))
            self._finish(r, "stop")
            return
        r.infos.append(info)
        self._text(r, r.cutter.push(r.decoder.push(token)))
        if r.cutter.stopped:
            self._finish(r, "stop")
        elif r.generated >= job.max_new_tokens:
            self._text(r, r.cutter.flush(r.decoder.flush()))
            self._finish(r, "length")
        else:
            r.pending = token

    def _text(self, r: _Row, text: str) -> None:
        if text:
            self._emit(r.job, Text(r.index, text, r.infos))
            r.infos = []

    def _finish(self, r: _Row, reason: str) -> None:
        r.done = True
        self._emit(r.job, Finish(r.index, reason, r.generated))
