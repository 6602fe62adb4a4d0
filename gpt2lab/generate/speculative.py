"""Speculative decoding: guess several tokens cheaply, check them all in one forward of the model, keep the
ones the model would have produced. It changes nothing but the speed.

At batch 1 a forward of k + 1 tokens costs about what a forward of one does (the weights are read once
either way), so every guess that is right is a step saved. Two drafters guess:

    PromptLookup  the tokens that followed the last earlier occurrence of the context's last n tokens
                  (prompt-lookup decoding: free, and right whenever the answer quotes the prompt or repeats
                  itself)
    DraftModel    a smaller gpt2lab model with the same tokenizer, decoding k tokens ahead with its own
                  KV cache

The check. Greedy: a guessed token is kept while it is the target's argmax at its position, and the
target's own token follows the last kept one, so the output is plain greedy decoding's. Sampling (Leviathan
et al., 2023; Chen et al., 2023): a guess x with draft probability q(x) is kept with probability
min(1, p(x) / q(x)) under the target's distribution p (temperature, top-k and top-p applied as
`next_token_probs` applies them); at the first rejection a token is drawn from max(0, p - q), normalised;
when every guess is kept, one more is drawn from p. Each token then follows p exactly, as plain sampling
does. A lookup guess is a certain one (q(x) = 1).

When the context is full the rest is decoded plainly (gpt2lab.generate.decode.stream's sliding window).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gpt2lab.generate.sampling import device_of, is_greedy, next_token_probs
from gpt2lab.model.cache import KVCache
from gpt2lab.model.gpt import GPT


@dataclass
class SpeculationStats:
    """What speculation did: forwards of the target, tokens it produced, guesses made and kept."""

    steps: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    history: list[int] = field(default_factory=list)  # tokens kept per step (accepted guesses + 1)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Drafter:
    """What both drafters share: `stream` is what gpt2lab.generate.stream calls with a drafter, and `stats`
    counts what the checks kept."""

    k = 4

    def __init__(self):
        self.stats = SpeculationStats()

    def stream(self, model, context, max_new_tokens, temperature, top_k, top_p, generator, stop, plain):
        return speculate(model, context, max_new_tokens, temperature, top_k, top_p, generator, stop, self, plain)


class PromptLookup(Drafter):
    """Guesses the k tokens that followed the most recent earlier occurrence of the context's last n tokens,
    for n from max_n down to min_n (the longest match wins)."""

    def __init__(self, k: int = 8, max_n: int = 3, min_n: int = 1):
        super().__init__()
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.k, self.max_n, self.min_n = k, max_n, min_n

    def start(self, context: list[int]) -> None:
        pass

    def propose(self, context: list[int], k: int, settings: tuple, generator) -> tuple[list[int], None]:
        n_ctx = len(context)
        for n in range(min(self.max_n, n_ctx - 1), self.min_n - 1, -1):
            tail = context[n_ctx - n:]
            for start in range(n_ctx - n - 1, -1, -1):  # the most recent earlier occurrence first
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + k]
                    if follow:
                        return follow, None
        return [], None

    def keep(self, context_len: int) -> None:
        pass


class DraftModel(Drafter):
    """A smaller model (the same tokenizer) decodes k tokens ahead with its own KV cache; its distribution q
    (the same temperature, top-k and top-p) is what the check needs."""

    def __init__(self, model: GPT, k: int = 4):
        super().__init__()
        self.model, self.k = model.eval(), k
        self.cache: KVCache | None = None
        self.fed = 0  # context tokens in the draft's cache

    def start(self, context: list[int]) -> None:
        self.cache = KVCache(self.model.config, 1, device=device_of(self.model))
        self.fed = 0

    def propose(self, context: list[int], k: int, settings: tuple, generator) -> tuple[list[int], torch.Tensor | None]:
        temperature, top_k, top_p = settings
        block = self.model.config.block_size
        k = min(k, block - len(context))
        if k <= 0 or self.fed > len(context):
            return [], None
        device = device_of(self.model)
        ids = torch.tensor([context[self.fed:]], device=device)
        tokens, qs = [], []
        for i in range(k):
            logits = self.model(ids, kv_cache=self.cache, last_only=True)[0, -1]
            if is_greedy(temperature):
                token = int(logits.argmax())
            else:
                q = next_token_probs(logits, temperature, top_k, top_p)
                token = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            tokens.append(token)
            if i + 1 < k:
                ids = torch.tensor([[token]], device=device)
        self.fed = len(context) + k - 1  # the guesses but the last are in the cache
        return tokens, (torch.stack(qs) if qs else None)

    def keep(self, context_len: int) -> None:
        """The context is now `context_len` tokens: the draft's cache keeps what of it it holds."""
        self.fed = min(self.fed, context_len)
        self.cache.rewind([self.fed])


@torch.inference_mode()
def speculate(model: GPT, context: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
              top_p: float | None, generator: torch.Generator | None, stop: frozenset[int], drafter: Drafter,
              plain) -> Iterator[int]:
    """New token ids after `context`, as `decode.stream` would give them, a check of the drafter's guesses
    per forward of the model. Stops at a stop id (not yielded) or after max_new_tokens; when the context
    fills, the rest goes to `plain` (decode.plain_stream: one token a forward, the sliding window)."""
    stats = drafter.stats
    device, block = device_of(model), model.config.block_size
    settings = (temperature, top_k, top_p)
    context = list(context[-block:])
    cache = KVCache(model.config, 1, device=device)
    if len(context) > 1:
        model.hidden_states(torch.tensor([context[:-1]], device=device), cache)
    drafter.start(context)
    produced = 0
    while produced < max_new_tokens:
        room = block - len(context)  # slots after the pending (last) token
        if room <= 0:  # the context is full: the rest as plain decoding slides it
            yield from plain(model, context, max_new_tokens - produced, temperature, top_k, top_p, generator, stop)
            return
        # a step adds at most k + 1 tokens: the context may reach `block`, never pass it (the plain window
        # slides exactly where it would have)
        k = min(drafter.k, max_new_tokens - produced - 1, room - 1)
        draft, q = drafter.propose(context, k, settings, generator) if k > 0 else ([], None)
        draft = draft[:k]
        ids = torch.tensor([[context[-1]] + draft], device=device)
        logits = model(ids, kv_cache=cache)[0]  # (1 + len(draft), V): what follows each
        new = _check(logits, draft, q, settings, generator)
        cache.rewind([len(context) - 1 + len(new)])  # the pending token and the kept guesses
        stats.steps += 1
        stats.drafted += len(draft)
        stats.accepted += len(new) - 1
        stats.history.append(len(new))
        for token in new:
            if token in stop:
                return
            yield token
            context.append(token)
            produced += 1
            stats.tokens += 1
            if produced == max_new_tokens:
                return
        drafter.keep(len(context) - 1)


def _check(logits: torch.Tensor, draft: list[int], q: torch.Tensor | None, settings: tuple,
           generator: torch.Generator | None) -> list[int]:
    """The tokens to keep: the accepted guesses, then the target's own next token."""
    temperature, top_k, top_p = settings
    if is_greedy(temperature):
        target = logits.argmax(dim=-1).tolist()
        kept = 0
        while kept < len(draft) and draft[kept] == target[kept]:
            kept += 1
        return draft[:kept] + [target[kept]]
    p = next_token_probs(logits, temperature, top_k, top_p)  # (1 + len(draft), V)
    for i, x in enumerate(draft):
        qx = float(q[i, x]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator, device=p.device))
        if u < min(1.0, float(p[i, x]) / qx):
            continue
        residual = (p[i] - q[i]).clamp(min=0) if q is not None else p[i].clone()
        if q is None:
            residual[x] = 0.0  # a certain guess: the rest of p
        if float(residual.sum()) <= 0:
            residual = p[i]
        token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return draft[:i] + [token]
    return draft + [int(torch.multinomial(p[len(draft)], 1, generator=generator))]
