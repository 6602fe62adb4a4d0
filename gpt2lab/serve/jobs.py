"""What the scheduler (scheduler.py) is handed and hands back: a `Job` (a prompt, its settings and `n`
choices), the events of its choices (`Text`, `Finish`, `PromptLogprobs`, `Failed`), and a `Row`, one choice
being generated with its text decoder and stop cutter."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gpt2lab.errors import UserError
from gpt2lab.text import StopText, StreamDecoder


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
