"""What the scheduler (scheduler.py) is handed and hands back: a `Job` (a prompt, its settings and `n`
choices), the events of its choices (`Text`, `Finish`, `PromptLogprobs`, `Failed`), and a `Row`, one choice
being generated with its text decoder and stop cutter."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gpt2lab.errors import UserError
from gpt2lab.generate import sample_next
from gpt2lab.text import StopText, StreamDecoder


class Busy(UserError):
    """The scheduler takes no more jobs now: its queue is full (come back in `retry_after` seconds), or it is
    shutting down (retry_after None)."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


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


class Row:
    """One choice of a job being generated: how its tokens become text, and where it stands."""

    def __init__(self, job: Job, index: int, tokenizer, device: torch.device):
        self.job, self.index = job, index
        self.decoder = StreamDecoder(tokenizer)
        self.cutter = StopText(job.stop)
        self.generator = None
        if job.seed is not None and job.temperature > 0:
            # choice i uses seed + i, as `gpt2lab generate --seed S --num-samples N` does
            self.generator = torch.Generator(device=device).manual_seed(job.seed + index)
        self.generated = 0  # tokens sampled so far
        self.pending = -1  # the last sampled token: the next step's input
        self.infos: list[TokenInfo] = []  # tokens whose text has not been handed out yet
        self.done = False

    def take(self, info: TokenInfo, eot: int | None) -> list[Event]:
        """The events of this row's new token: text that is ready, and its finish (<|endoftext|>, a stop
        string, or the token limit)."""
        self.generated += 1
        if info.id == eot:
            return self._text(self.cutter.flush(self.decoder.flush())) + self._finish("stop")
        self.infos.append(info)
        events = self._text(self.cutter.push(self.decoder.push(info.id)))
        if self.cutter.stopped:
            return events + self._finish("stop")
        if self.generated >= self.job.max_new_tokens:
            return events + self._text(self.cutter.flush(self.decoder.flush())) + self._finish("length")
        self.pending = info.id
        return events

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        event, self.infos = Text(self.index, text, self.infos), []
        return [event]

    def _finish(self, reason: str) -> list[Event]:
        self.done = True
        return [Finish(self.index, reason, self.generated)]


def sample_rows(logits: torch.Tensor, rows: list[Row]) -> tuple[dict[int, TokenInfo], list[tuple[Row, str]]]:
    """Each live row's next token from its logits (B, V): ({row index: token}, [(row, why it failed)]).

    Greedy rows take the argmax; sampled rows without a seed are sampled together, one call per setting
    (temperature, top-k, top-p); a seeded row draws from its own generator, as it would alone. A row whose
    logits are not finite, or whose sampling fails, fails alone: the other rows get their tokens."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    greedy = logits.argmax(dim=-1).tolist()
    tokens: dict[int, int] = {}
    failed: list[tuple[Row, str]] = []
    groups: dict[tuple, list[int]] = {}
    for b, r in enumerate(rows):
        job = r.job
        if r.done:
            continue
        if not finite[b]:
            failed.append((r, "the model's logits are not finite (NaN or infinity): its weights are damaged"))
        elif job.temperature == 0:
            tokens[b] = greedy[b]
        elif r.generator is None:
            groups.setdefault((job.temperature, job.top_k, job.top_p), []).append(b)
        else:
            groups[("seeded", b)] = [b]
    for index in groups.values():
        job = rows[index[0]].job
        try:
            drawn = sample_next(logits[index], job.temperature, job.top_k, job.top_p, rows[index[0]].generator)
            tokens.update(zip(index, drawn.tolist()))
        except Exception as e:  # noqa: BLE001 - these rows fail; the others go on
            failed += [(rows[b], f"sampling failed: {type(e).__name__}: {e}") for b in index]
    wanted = [b for b in tokens if rows[b].job.logprobs is not None]
    lp = dict(zip(wanted, logits[wanted].float().log_softmax(-1))) if wanted else {}
    out = {}
    for b, token in tokens.items():
        info = TokenInfo(token)
        if b in lp:
            info.logprob = float(lp[b][token])
            k = rows[b].job.logprobs
            if k:
                top = lp[b].topk(k)
                info.top = list(zip(top.indices.tolist(), top.values.tolist()))
        out[b] = info
    return out, failed


def prompt_logprobs(job: Job, start: int, logits: torch.Tensor, top: int) -> list[TokenInfo]:
    """The logprobs of prompt tokens start+1 .. start+T (what the T positions of this chunk predict; the
    prompt's last position predicts the first new token, not a prompt token)."""
    lp = logits.float().log_softmax(-1)  # (T, V): position t predicts token start + t + 1
    targets = job.prompt[start + 1:start + 1 + lp.size(0)]
    if not targets:
        return []
    lp = lp[:len(targets)]
    chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
    tops = lp.topk(top, dim=-1) if top else None
    out = []
    for t, token in enumerate(targets):
        alts = list(zip(tops.indices[t].tolist(), tops.values[t].tolist())) if tops is not None else None
        out.append(TokenInfo(token, chosen[t], alts))
    return out
