"""Continuous batching: many requests share each decoding step of one model.

`Scheduler` owns the model in one worker thread. Requests (`Job`s: a prompt, settings, `n` choices)
are submitted from any thread; every choice becomes a *row*. Between two steps rows join and leave:

    loop:
        take new jobs; drop the rows and waiting jobs of cancelled ones (a client went away)
        admit waiting jobs (first come, first served) while the batch has room: each gets a prefill row
        decode: one token for every decoding row, through the model, sampled per row (its own
            temperature, top-k, top-p and random generator), turned into text (UTF-8 safe, stop strings
            cut) and handed to the job's sink
        prefill: at most `prefill_chunk` prompt tokens of the prefilling rows, oldest first (while rows decode,
            about as many as take a decoding step's time), through the model into their rows of the cache; a
            prompt that is complete samples its first token(s) and its row (copied n times for n choices) joins
            the decoding rows
        remove finished rows

The cache layout (gpt2lab.model.cache): two caches of up to `max_batch` rows, one for decoding rows and
one for prefilling rows, each row holding its own tokens from slot 0 at its own length. The cache gives
the forward each row's positions and the mask that hides the slots past its end, so a row sees exactly
what it would see alone: its greedy output is the output of `gpt2lab generate --temperature 0`, whatever
else is in the batch (up to float rounding of batched matmuls, which never changed a token in the tests).
Nothing is rebuilt when rows join or leave: a joining prompt is prefilled into a row of its own, a
finished prompt's row is copied once into the decoding cache, and a leaving row's place is taken by the
last decoding row (one row's copy). A long prompt is spread over steps, `prefill_chunk` tokens at a time,
so no running stream waits for more than one chunk. The caches grow by doubling (rows as requests join,
slots as rows write), never past max_batch rows or the model's context. `max_batch=1` serves one choice at
a time (the baseline of bench/serve.py).

Prompts that begin alike reuse the keys and values of their common beginning (prefix.py). Admission: past
`max_queue` waiting requests a new one is refused at once (`Busy`, answered 429 with Retry-After).
"""

from __future__ import annotations

import threading
import time
from collections import deque

import torch

from gpt2lab.errors import UserError
from gpt2lab.generate import check_settings
from gpt2lab.model.cache import KVCache
from gpt2lab.model.gpt import GPT
from gpt2lab.serve.jobs import (
    Busy,
    Event,
    Failed,
    Finish,
    Job,
    PromptLogprobs,
    Row,
    Text,
    TokenInfo,
    prompt_logprobs,
    sample_rows,
)
from gpt2lab.serve.prefix import PrefixCache

__all__ = ["Busy", "Event", "Failed", "Finish", "Job", "PromptLogprobs", "Scheduler", "Text", "TokenInfo"]

GROW = 128  # cache slots at first (then doubled as the rows write)
FIRST_ROWS = 8  # cache rows at first (then doubled as rows join, up to max_batch)
MIN_CHUNK = 32  # prompt tokens read in a step that also decodes, at the least
PREFILL_CHUNK = 512  # prompt tokens prefilled per step, all prefilling rows together
MAX_QUEUE = 64  # requests that may wait for a place in the batch; past them a request is refused at once
PREFIX_CACHE_BYTES = 512 << 20  # keys and values of prompt beginnings kept for reuse


class _Prefill:
    """A job whose prompt is being written into its row of the prefill cache."""

    def __init__(self, job: Job):
        self.job, self.fed = job, 0
        self.prompt_infos: list[TokenInfo] = [TokenInfo(job.prompt[0])]


class Scheduler:
    """Continuous batching of `Job`s on one model, in a worker thread (see the module's docstring).

        scheduler = Scheduler(model, tokenizer, max_batch=32)
        scheduler.start()
        scheduler.submit(Job(prompt_ids, sink=events.put, max_new_tokens=50, temperature=0))
        ...
        scheduler.close()
    """

    def __init__(self, model: GPT, tokenizer, max_batch: int = 32, max_queue: int = MAX_QUEUE,
                 prefill_chunk: int = PREFILL_CHUNK, prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        if max_batch < 1:
            raise UserError(f"max_batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise UserError(f"max_queue must be at least 0, got {max_queue}")
        if prefill_chunk < 1:
            raise UserError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = model.config
        self.block = model.config.block_size
        self.device = model.transformer.wte.weight.device
        self.eot = tokenizer.eot_id
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._lock = threading.Condition()
        self._inbox: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._rows: list[Row] = []  # decoding rows, row i in slot i of the decode cache
        self._prefills: list[_Prefill] = []  # prefilling jobs, entry i in slot i of the prefill cache
        rows = min(max_batch, FIRST_ROWS)  # the caches grow in rows and slots as they are needed (doubling)
        self._decode_cache = KVCache(self.config, rows, max_len=min(GROW, self.block), device=self.device)
        self._prefill_cache = KVCache(self.config, rows, max_len=min(GROW, self.block), device=self.device)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._decode_seconds = self._token_seconds = None  # running means: a decoding step, a prompt token
        self.counters = {"steps": 0, "tokens": 0, "jobs": 0, "cancelled": 0, "failed": 0, "max_rows": 0,
                         "prefill_tokens": 0, "prefix_tokens": 0, "rejected": 0}

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
                raise Busy("the server is shutting down", retry_after=None)
            waiting = self._would_wait()
            free = self.max_batch - len(self._rows) - sum(p.job.n for p in self._prefills) - sum(
                j.n for j in (*self._waiting, *self._inbox))
            if waiting >= self.max_queue and (waiting or job.n > free):  # a free place takes it at once
                self.counters["rejected"] += 1
                raise Busy(f"the server is busy ({self.max_batch} rows decoding, {waiting} requests waiting); "
                           "try again shortly", retry_after=1 + waiting // self.max_batch)
            job.submitted = time.monotonic()
            self._inbox.append(job)
            self._lock.notify_all()
        return job

    def _would_wait(self) -> int:
        """How many queued jobs would still wait if every place free now were taken, first come first served."""
        free = self.max_batch - len(self._rows) - sum(p.job.n for p in self._prefills)
        queued = [*self._waiting, *self._inbox]
        for k, j in enumerate(queued):
            if j.n > free:
                return len(queued) - k
            free -= j.n
        return 0

    def stats(self) -> dict:
        """Rows decoding now, jobs waiting, and counters since the start (read without locking)."""
        return {"active": len(self._rows), "prefilling": len(self._prefills),
                "waiting": len(self._waiting) + len(self._inbox), "max_batch": self.max_batch,
                "max_queue": self.max_queue, **self.counters}

    # ----------------------------------------------------------------------------- worker side

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closing or self._inbox or self._waiting or self._rows or self._prefills):
                        self._lock.wait()
                    if self._closing:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                self._step()
        self._fail_all("the server is shutting down", waiting=True)

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        decoding = bool(self._rows)
        if self._rows:
            t = time.perf_counter()
            try:
                self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
                self._fail_rows(f"generation failed: {type(e).__name__}: {e}")
            self._decode_seconds = _ema(self._decode_seconds, time.perf_counter() - t)
        if self._prefills:
            t, before = time.perf_counter(), self.counters["prefill_tokens"]
            try:
                self._prefill(self._prefill_budget() if decoding else self.prefill_chunk)
            except Exception as e:  # noqa: BLE001 - a failed prefill fails its jobs; the running rows go on
                self._fail_prefills(f"generation failed: {type(e).__name__}: {e}")
            read = self.counters["prefill_tokens"] - before
            if read >= 16:
                self._token_seconds = _ema(self._token_seconds, (time.perf_counter() - t) / read)
        self._remove_finished()

    def _prefill_budget(self) -> int:
        """Prompt tokens to read in a step that also decodes: about as many as take the time of a decoding step,
        so a running stream's tokens come at most about twice as far apart while prompts are read (at least
        MIN_CHUNK, at most `prefill_chunk`)."""
        if self._decode_seconds is None or self._token_seconds is None:
            return self.prefill_chunk
        return max(MIN_CHUNK, min(self.prefill_chunk, int(self._decode_seconds / self._token_seconds)))

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # noqa: BLE001 - the receiver is gone (its event loop closed): stop its job
            job.cancelled = True

    def _fail_rows(self, message: str) -> None:
        for job in {id(r.job): r.job for r in self._rows}.values():
            self.counters["failed"] += 1
            self._emit(job, Failed(message))
        for r in self._rows:
            r.done = r.job.cancelled = True

    def _fail_prefills(self, message: str) -> None:
        for p in self._prefills:
            self.counters["failed"] += 1
            self._emit(p.job, Failed(message))
        self._prefills = []
        self._prefill_cache.reset()

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        self._fail_rows(message)
        self._fail_prefills(message)
        if waiting:
            with self._lock:
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            for job in self._waiting:
                self.counters["failed"] += 1
                self._emit(job, Failed(message))
            self._waiting.clear()
        self._remove_finished()

    def _drop_cancelled(self) -> None:
        gone = [j for j in self._waiting if j.cancelled]
        if gone:
            self._waiting = deque(j for j in self._waiting if not j.cancelled)
        dropped = {id(j) for j in gone}
        for r in self._rows:
            if r.job.cancelled and not r.done:
                r.done = True
                dropped.add(id(r.job))
        keep = [i for i, p in enumerate(self._prefills) if not p.job.cancelled]
        if len(keep) < len(self._prefills):
            dropped.update(id(p.job) for p in self._prefills if p.job.cancelled)
            self._keep_prefills(keep)
        self.counters["cancelled"] += len(dropped)

    # admission and prefill ----------------------------------------------------------------

    def _admit(self) -> None:
        """Waiting jobs (first come, first served) get a prefill row while the batch has room for their
        choices."""
        rows = len(self._rows) + sum(p.job.n for p in self._prefills)
        while self._waiting and rows + self._waiting[0].n <= self.max_batch:
            job = self._waiting.popleft()
            p = _Prefill(job)
            if self.prefix is not None and not job.prompt_logprobs:  # the prompt's cached beginning
                m, layers = self.prefix.match(job.prompt)
                if m:
                    self._prefill_cache.reserve(len(self._prefills) + 1, m, self.max_batch)
                    self._prefill_cache.write_row(len(self._prefills), layers)
                    p.fed = m
                    self.counters["prefix_tokens"] += m
            self._prefills.append(p)
            self._prefill_cache.reserve(len(self._prefills), 1, self.max_batch)  # a row of the prefill cache for each
            rows += job.n
            self.counters["jobs"] += 1

    def _keep_prefills(self, keep: list[int]) -> None:
        self._prefills = [self._prefills[i] for i in keep]
        self._prefill_cache.select_rows(keep + [i for i in range(self._prefill_cache.batch_size) if i not in keep])

    def _prefill(self, budget: int) -> None:
        """Up to `budget` prompt tokens of the oldest prefilling jobs, in one forward (right-padded: no row's
        padding may pass the context, so a row that would push it past waits for the next step)."""
        take, T = [], 0
        for p in self._prefills:
            n = min(budget, len(p.job.prompt) - p.fed)
            width = max(T, n)
            if n == 0 or any(q.fed + width > self.block for q in self._prefills[:len(take) + 1]):
                break
            take.append(n)
            T, budget = width, budget - n
        r = len(take)
        group = self._prefills[:r]
        self._prefill_cache.reserve(r, max(q.fed for q in group) + T, self.max_batch)
        pad = self.eot if self.eot is not None else 0
        ids = torch.full((r, T), pad, dtype=torch.long)
        for b, (p, n) in enumerate(zip(group, take)):
            ids[b, :n] = torch.tensor(p.job.prompt[p.fed:p.fed + n])
        view = self._prefill_cache.rows(0, r)
        view.rewind([p.fed for p in group])
        h = self.model.hidden_states(ids.to(self.device), view)  # (r, T, C): the LM head only where needed
        view.rewind([p.fed + n for p, n in zip(group, take)])
        self.counters["prefill_tokens"] += sum(take)
        done = []
        for b, (p, n) in enumerate(zip(group, take)):
            if p.job.prompt_logprobs:
                p.prompt_infos += prompt_logprobs(p.job, p.fed, self.model.head(h[b, :n]), p.job.logprobs or 0)
            p.fed += n
            if p.fed == len(p.job.prompt):
                done.append(b)
                if self.prefix is not None:
                    self.prefix.store(p.job.prompt, self._prefill_cache.read_row(b, p.fed))
                self._start_rows(b, p, self.model.head(h[b, n - 1]))
        if done:
            self._keep_prefills([i for i in range(len(self._prefills)) if i not in done])

    def _start_rows(self, slot: int, p: _Prefill, last_logits: torch.Tensor) -> None:
        """A complete prompt: its choices become decoding rows (its cache row copied to each) and sample
        their first token."""
        job = p.job
        if job.prompt_logprobs:
            self._emit(job, PromptLogprobs(p.prompt_infos))
        if job.max_new_tokens == 0:  # scoring only (echo): nothing to generate
            for i in range(job.n):
                self._emit(job, Finish(i, "length", 0))
            return
        n_prompt = len(job.prompt)
        self._decode_cache.reserve(len(self._rows) + job.n, n_prompt + 1, self.max_batch)
        new = []
        for i in range(job.n):
            dst = len(self._rows)
            self._decode_cache.write_row(dst, self._prefill_cache.read_row(slot, n_prompt))
            row = Row(job, i, self.tokenizer, self.device)
            self._rows.append(row)
            new.append(row)
        self.counters["max_rows"] = max(self.counters["max_rows"], len(self._rows))
        self._sample(last_logits[None].expand(job.n, -1), new)

    # decoding -----------------------------------------------------------------------------

    def _decode(self) -> None:
        rows = self._rows
        view = self._decode_cache.rows(0, len(rows))
        self._decode_cache.reserve(len(rows), max(view.lengths) + 1, self.max_batch)
        view = self._decode_cache.rows(0, len(rows))
        ids = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=view, last_only=True)[:, -1]
        self.counters["steps"] += 1
        self._sample(logits, rows)

    def _remove_finished(self) -> None:
        """Drop finished rows: the last live rows move into their places (one row's cache each)."""
        rows = self._rows
        if not any(r.done for r in rows):
            return
        live = [i for i, r in enumerate(rows) if not r.done]
        holes = [i for i in range(len(live)) if rows[i].done]
        movers = [i for i in live if i >= len(live)]
        for h, m in zip(holes, movers):
            self._decode_cache.copy_row(m, h, self._decode_cache.lengths[m])
            rows[h] = rows[m]
        self._rows = rows[:len(live)]
        lengths = list(self._decode_cache.lengths)
        for i in range(len(live), len(lengths)):
            lengths[i] = 0
        self._decode_cache.lengths = lengths

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """Each row's next token from its logits (B, V), its text handed to the job; a row whose logits or
        sampling fail leaves the batch alone, before the next step."""
        tokens, failed = sample_rows(logits, rows)
        for r, message in failed:
            if not r.job.cancelled:
                self.counters["failed"] += 1
                self._emit(r.job, Failed(message))
            r.done = r.job.cancelled = True
        for b, info in tokens.items():
            self.counters["tokens"] += 1
            for event in rows[b].take(info, self.eot):
                self._emit(rows[b].job, event)


def _ema(mean: float | None, x: float, weight: float = 0.2) -> float:
    return x if mean is None else (1 - weight) * mean + weight * x
