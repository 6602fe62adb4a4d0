"""Sampling from a model: greedy, temperature, top-k, top-p, a KV cache, streaming, batches.

Every command that produces text goes through `stream` (one prompt, ids as they
come), `generate` (the same, collected), `generate_batch` (several prompts of
different lengths at once) and `stream_answer` (text until <|endoftext|> or a
stop string: chat, the judge, instruction scoring).

The context limit. GPT-2 has learned position embeddings for `block_size`
positions and none beyond. When prompt plus new tokens would pass that, the
window slides: the oldest tokens are dropped, the newest `block_size // 2`
are kept, and the cache is filled again from them (one prefill, into the same
buffers), after which decoding continues one token at a time. Text can thus go
on for as long as asked, each token seeing at least half a context of history.
A prompt longer than the context keeps only its last `block_size` tokens.
`use_cache=False` recomputes the same window at every step rather than sliding
it by one token, so the cache changes the speed and never the output.
`generate_batch` does not slide: a batch must fit in the context.

Speed. Prefill and every decoding step are calls of the model's own forward:
the prompt once, then one token per row against the cached keys and values,
with the LM head on the last position only. The cache's buffers are allocated
once, and a left-padded batch's positions and masks are slices of tensors made
once, so a step allocates little beyond its activations. A model cast to
bfloat16 decodes in bf16 (fast on CPUs with AVX512-BF16 or AMX, and on GPUs).
bench/generate.py times it against Hugging Face transformers.
"""

from __future__ import annotations

import codecs
import math
import numbers
from collections.abc import Iterable, Iterator

import torch

from gpt2lab.errors import UserError
from gpt2lab.model import GPT, KVCache


def check_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """A UserError, naming the setting and its value, for anything a generator cannot use."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not 0 <= temperature < math.inf:
        raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or top_k < 1):
        raise UserError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):
        raise UserError(f"top_p must be in (0, 1], got {top_p!r}")


def _check_finite(logits: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise UserError("the model's logits are not finite (NaN or infinity): its weights are damaged; "
                        "use another checkpoint or train again")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) of the last position -> next ids (B,). Temperature 0 is greedy.

    top_k keeps the k most likely tokens, top_p the smallest set of most likely
    tokens whose probability reaches p; with both, a token must pass both.
    """
    _check_finite(logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # subtract the maximum first: a tiny temperature then sends the others to -inf, never to NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones before it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _device(model: GPT) -> torch.device:
    return model.transformer.wte.weight.device


def _generator(model: GPT, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None and seed is not None:
        generator = torch.Generator(device=_device(model)).manual_seed(seed)
    return generator


class LeftPadding:
    """Positions and attention masks of a batch of left-padded rows, made once per batch.

    Row b begins with `pad[b]` padding slots that no query may attend to, and its positions count
    from its first real token, so every row sees exactly what it would see alone. A decoding step's
    positions and mask are slices of tensors built here.
    """

    def __init__(self, pad: torch.Tensor, max_len: int):
        self.pad = pad
        slots = torch.arange(max_len, device=pad.device)
        self.slots = slots
        self.valid = slots[None, :] >= pad[:, None]  # (B, max_len): slot j of row b is a real token
        self.positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, max_len)
        self.all_real_from = int(pad.max())
        self._decode_mask = self.valid[:, None, None, :]  # (B, 1, 1, max_len)

    def inputs(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (B, T), mask (B, 1, T, start + T)) of T new tokens at slots start..start+T-1."""
        L = start + T
        positions = self.positions[:, start:L]
        if T == 1 and start >= self.all_real_from:
            return positions, self._decode_mask[..., :L]
        q = self.slots[start:L]
        causal = self.slots[None, :L] <= q[:, None]  # (T, L)
        mask = causal[None] & self.valid[:, None, :L]  # (B, T, L)
        # a padding slot attends to itself, so its (unused) output never becomes NaN
        mask = mask | (self.slots[None, :L] == q[:, None])[None]
        return positions, mask[:, None]


# ------------------------------------------------------------------------- generation


def stream(model: GPT, prompt_ids: list[int], max_new_tokens: int = 100, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, stop_ids: Iterable[int] = (),
           use_cache: bool = True, start_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; a stop id ends the stream and is not yielded.

    An empty prompt starts from `start_id` (pass the tokenizer's eot id: GPT-2
    documents begin after <|endoftext|>). The settings are checked here, before
    the first token is asked for.
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        if start_id is None:
            raise UserError("the prompt is empty; pass start_id (the <|endoftext|> id) to start from it")
        prompt = [int(start_id)]
    vocab = model.config.vocab_size
    if any(not 0 <= i < vocab for i in prompt):
        raise UserError(f"the prompt holds a token id outside the model's vocabulary of {vocab}")
    return _stream(model, prompt, max_new_tokens, temperature, top_k, top_p,
                   _generator(model, seed, generator), frozenset(int(i) for i in stop_ids), use_cache)


@torch.inference_mode()
def _stream(model: GPT, context: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, generator: torch.Generator | None, stop: frozenset[int],
            use_cache: bool) -> Iterator[int]:
    device = _device(model)
    block = model.config.block_size
    keep = max(1, block // 2)
    start = max(0, len(context) - block)  # the model sees context[start:]
    cache = None
    if use_cache and max_new_tokens:
        cache = KVCache(model.config, 1, max_len=min(block, len(context) - start + max_new_tokens),
                        device=device)
    was_training = model.training
    model.eval()
    try:
        refill, token = True, None
        for _ in range(max_new_tokens):
            if len(context) - start > block:  # slide: keep the newest half context
                start, refill = len(context) - keep, True
            if cache is None:
                window = torch.tensor([context[start:]], dtype=torch.long, device=device)
                logits = model(window, last_only=True)[:, -1]
            elif refill:
                cache.reset()
                window = torch.tensor([context[start:]], dtype=torch.long, device=device)
                logits = model(window, kv_cache=cache, last_only=True)[:, -1]
                refill = False
            else:
                logits = model(token.view(1, 1), kv_cache=cache, last_only=True)[:, -1]
            token = sample_next(logits, temperature, top_k, top_p, generator)
            new = int(token)
            if new in stop:
                return
            yield new
            context.append(new)
    finally:
        model.train(was_training)


def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             stop_ids: Iterable[int] = (), eot_id: int | None = None) -> list[int]:
    """The new ids after `prompt_ids` (temperature 0: greedy). Stops at `eot_id` or a stop id.

    An empty prompt starts from `eot_id`.
    """
    stops = set(stop_ids) | ({eot_id} if eot_id is not None else set())
    return list(stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, generator,
                       stops, use_cache, start_id=eot_id))


def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int = 100,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, generator: torch.Generator | None = None,
                   stop_ids: Iterable[int] = (), pad_id: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Several prompts in one batch, left-padded; each row's output is what it would get alone.

    (Greedy output is exactly that; sampled rows draw from the same
    distributions as alone, with one random stream for the batch.) A row stops
    at its first stop id (not included); the batch stops when every row has.
    Prompt plus new tokens must fit in the context (no sliding window for
    batches).
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    prompts = [[int(i) for i in p] for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise UserError("every prompt in a batch needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.block_size:
        raise UserError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                        f"exceeds the context of {model.config.block_size} tokens")
    return _generate_batch(model, prompts, max_new_tokens, temperature, top_k, top_p,
                           _generator(model, seed, generator), sorted(set(stop_ids)), pad_id, use_cache)


@torch.inference_mode()
def _generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                    stop_ids: list[int], pad_id: int, use_cache: bool) -> list[list[int]]:
    device = _device(model)
    B, longest, n = len(prompts), max(len(p) for p in prompts), max_new_tokens
    pads = [longest - len(p) for p in prompts]
    padding = LeftPadding(torch.tensor(pads, device=device), longest + n) if any(pads) else None
    # every row's prompt and new tokens, in one preallocated (B, longest + n) tensor
    seq = torch.full((B, longest + n), pad_id, dtype=torch.long, device=device)
    seq[:, :longest] = torch.tensor([[pad_id] * k + p for k, p in zip(pads, prompts)], device=device)
    cache = KVCache(model.config, B, max_len=longest + n, device=device) if use_cache and n else None
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    steps = 0
    try:
        for t in range(longest, longest + n):
            if cache is None:  # recompute everything
                first, ids = 0, seq[:, :t]
            elif cache.pos == 0:  # prefill: every prompt at once
                first, ids = 0, seq[:, :t]
            else:  # one new token per row
                first, ids = t - 1, seq[:, t - 1:t]
            positions, mask = padding.inputs(first, ids.size(1)) if padding is not None else (None, None)
            logits = model(ids, kv_cache=cache, last_only=True, positions=positions, mask=mask)[:, -1]
            seq[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
            steps += 1
            if stop is not None:
                done |= torch.isin(seq[:, t], stop)
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    out = seq[:, longest:longest + steps].tolist()
    if stop is not None:
        ends = set(stop_ids)
        out = [row[:next((i for i, tok in enumerate(row) if tok in ends), len(row))] for row in out]
    return out


@torch.inference_mode()
def generate_group(model: GPT, prompt_ids: list[int], n: int, max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, stop_ids: Iterable[int] = ()) -> list[list[int]]:
    """`n` samples after one prompt, as reinforcement learning draws them: the prompt is prefilled once, its
    keys and values copied to n rows, and the rows decode together. A row ends at its first stop id, which
    it keeps (the stop is part of the sampled answer); the others go on to the token limit."""
    check_settings(max_new_tokens, temperature, top_k, top_p)
    if not prompt_ids or n < 1:
        raise UserError("generate_group needs a prompt of at least one token and n >= 1")
    if len(prompt_ids) + max_new_tokens > model.config.block_size:
        raise UserError(f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                        f"the context of {model.config.block_size} tokens")
    device = _device(model)
    was_training = model.training
    model.eval()
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device) if stop_ids else None
    try:
        one = KVCache(model.config, 1, max_len=len(prompt_ids) + max_new_tokens, device=device)
        logits = model(torch.tensor([prompt_ids], device=device), kv_cache=one, last_only=True)[:, -1]
        cache = one.repeat_rows(n)
        logits = logits.expand(n, -1)
        out = torch.empty(n, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        steps = 0
        for t in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            out[:, t] = token
            steps += 1
            if stops is not None:
                done |= torch.isin(token, stops)
                if bool(done.all()):
                    break
            if t + 1 < max_new_tokens:
                logits = model(token.view(n, 1), kv_cache=cache, last_only=True)[:, -1]
    finally:
        model.train(was_training)
    rows = out[:, :steps].tolist()
    if stops is None:
        return rows
    ends = set(stop_ids)
    return [row[:next((i + 1 for i, tok in enumerate(row) if tok in ends), len(row))] for row in rows]


# ------------------------------------------------------------------------------ text


class StreamDecoder:
    """Turns ids into text as they arrive, UTF-8 safe.

    A character can span several byte-level tokens (most emoji and CJK do);
    its bytes are held back until it is whole, so a stream never shows a
    replacement character for half a character.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopText:
    """Cuts a text that arrives in pieces at the first of some stop strings.

    `push(piece)` returns the text that is ready: text that could be the start of a stop string is
    held back until it is clear that it is not, and the stop string itself is never returned. Once
    a stop string has been seen `stopped` is True and everything after it is dropped. `flush(tail)`
    returns what was held back (plus `tail`) when the text ends without a stop. Used by
    `stream_answer` and by the server's batch scheduler (gpt2lab.batching), so both cut alike.
    """

    def __init__(self, stop: Iterable[str] = ()):
        self.stops = [s for s in stop if s]
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        held = self.held + piece
        cut = min((held.find(s) for s in self.stops if s in held), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return held[:cut]
        # keep back the longest tail that is a prefix of some stop string
        keep = max((k for s in self.stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        self.held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def flush(self, tail: str = "") -> str:
        if self.stopped:
            return ""
        out, self.held = self.held + tail, ""
        return out


def stream_answer(model: GPT, tokenizer, prompt: str | list[int], max_new_tokens: int = 100,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop: Iterable[str] = (), use_cache: bool = True,
                  generator: torch.Generator | None = None) -> Iterator[str]:
    """Text pieces after `prompt` (text or ids) until <|endoftext|>, a stop string or the token limit.

    The one "answer until a stop" of gpt2lab: generate, chat, the judge and instruction
    scoring use it. Text that could be the start of a stop string is held back until it
    is clear that it is not; the stop string itself is never yielded (`StopText`).
    """
    cutter = StopText(stop)
    eot = tokenizer.eot_id
    decoder = StreamDecoder(tokenizer)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    for token in stream(model, ids, max_new_tokens, temperature, top_k, top_p, seed, generator,
                        {eot} if eot is not None else (), use_cache, start_id=eot):
        ready = cutter.push(decoder.push(token))
        if ready:
            yield ready
        if cutter.stopped:
            return
    rest = cutter.flush(decoder.flush())
    if rest:
        yield rest


def answer(model: GPT, tokenizer, prompt: str | list[int], max_new_tokens: int = 100,
           temperature: float = 0.0, stop: Iterable[str] = (), **kw) -> str:
    """The whole text of `stream_answer` (greedy by default)."""
    return "".join(stream_answer(model, tokenizer, prompt, max_new_tokens, temperature, stop=stop, **kw))

