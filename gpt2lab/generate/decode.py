"""Decoding: a prompt's continuation, streamed or collected, one prompt or a batch, with a KV cache.

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
once; in a batch of prompts of different lengths each row writes after its own
tokens (the cache gives the forward each row's positions and mask), so every row
computes what it would alone. A model cast to
bfloat16 decodes in bf16 (fast on CPUs with AVX512-BF16 or AMX, and on GPUs).
bench/generate.py times it against Hugging Face transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from gpt2lab.errors import UserError
from gpt2lab.generate.compiled import compiled_step
from gpt2lab.generate.sampling import check_settings, device_of, make_generator, sample_next
from gpt2lab.model.cache import KVCache
from gpt2lab.model.gpt import GPT
from gpt2lab.text import StopText, StreamDecoder


def fit_to_context(ids: list[int], max_new_tokens: int, block: int) -> tuple[list[int], int]:
    """(prompt ids, new tokens) that fit together in a context of `block` tokens: the answer gets all it asks
    for when the prompt leaves room, and at least half the context (or what it asks for, if less) when not;
    the prompt keeps its end (and at least one token). Every scorer that generates into a fixed context
    (checkable tasks, RL, the judge, instruction scoring) fits its lengths here."""
    room = min(max_new_tokens, max(block - len(ids), block // 2), block - 1)
    return list(ids[-(block - room):]), room


def stream(model: GPT, prompt_ids: list[int], max_new_tokens: int = 100, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, stop_ids: Iterable[int] = (),
           use_cache: bool = True, start_id: int | None = None, drafter=None,
           compile: bool = False) -> Iterator[int]:
    """Yield new token ids one at a time; a stop id ends the stream and is not yielded.

    An empty prompt starts from `start_id` (pass the tokenizer's eot id: GPT-2
    documents begin after <|endoftext|>). The settings are checked here, before
    the first token is asked for. `drafter` (speculative.py: PromptLookup or
    DraftModel) checks guessed tokens several at a time: the same tokens, faster.
    `compile` decodes through the model's compiled step (compiled.py).
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
    args = (model, prompt, max_new_tokens, temperature, top_k, top_p, make_generator(model, seed, generator),
            frozenset(int(i) for i in stop_ids))
    if drafter is not None and use_cache:
        return drafter.stream(*args, plain=plain_stream)
    return plain_stream(*args, use_cache, compile)


@torch.inference_mode()
def plain_stream(model: GPT, context: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, generator: torch.Generator | None, stop: frozenset[int],
                 use_cache: bool = True, compile: bool = False) -> Iterator[int]:
    """One token per forward, with a sliding window past the context. `compile`: the decoding steps go through
    the model's compiled step (compiled.py), a cache of the whole context whose shapes never change."""
    device = device_of(model)
    block = model.config.block_size
    keep = max(1, block // 2)
    start = max(0, len(context) - block)  # the model sees context[start:]
    cache = step = None
    if use_cache and max_new_tokens and compile:
        step = compiled_step(model, 1, block)
    elif use_cache and max_new_tokens:
        cache = KVCache(model.config, 1, max_len=min(block, len(context) - start + max_new_tokens),
                        device=device)
    was_training = model.training
    model.eval()
    try:
        refill, token = True, None
        for _ in range(max_new_tokens):
            if len(context) - start > block:  # slide: keep the newest half context
                start, refill = len(context) - keep, True
            window = torch.tensor([context[start:]], dtype=torch.long, device=device) if refill or \
                (cache is None and step is None) else None
            if step is not None:
                logits = step.prefill(window) if refill else step.decode(token.view(1, 1))
                refill = False
            elif cache is None:
                logits = model(window, last_only=True)[:, -1]
            elif refill:
                cache.reset()
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
             stop_ids: Iterable[int] = (), eot_id: int | None = None, drafter=None,
             compile: bool = False) -> list[int]:
    """The new ids after `prompt_ids` (temperature 0: greedy). Stops at `eot_id` or a stop id.

    An empty prompt starts from `eot_id`.
    """
    stops = set(stop_ids) | ({eot_id} if eot_id is not None else set())
    return list(stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, generator,
                       stops, use_cache, start_id=eot_id, drafter=drafter, compile=compile))


def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int = 100,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, generator: torch.Generator | None = None,
                   stop_ids: Iterable[int] = (), pad_id: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Several prompts in one batch, each row its own length in the cache; each row's output is what it
    would get alone.

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
                           make_generator(model, seed, generator), sorted(set(stop_ids)), pad_id, use_cache)


@torch.inference_mode()
def _generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                    stop_ids: list[int], pad_id: int, use_cache: bool) -> list[list[int]]:
    device = device_of(model)
    B, longest, n = len(prompts), max(len(p) for p in prompts), max_new_tokens
    lengths = [len(p) for p in prompts]
    # every row's prompt and new tokens, in one preallocated (B, longest + n) tensor, right-padded: row b's
    # next token goes at column lengths[b]
    seq = torch.full((B, longest + n), pad_id, dtype=torch.long, device=device)
    seq[:, :longest] = torch.tensor([p + [pad_id] * (longest - len(p)) for p in prompts], device=device)
    cache = KVCache(model.config, B, max_len=longest + n, device=device) if use_cache and n else None
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    rows = torch.arange(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    out = torch.empty(B, n, dtype=torch.long, device=device)
    steps = 0
    try:
        for t in range(n):
            last = torch.tensor([m - 1 for m in lengths], device=device)  # each row's last token
            if cache is None:  # recompute everything: a row's padding comes after its tokens, unseen
                h = model.hidden_states(seq[:, :max(lengths)])
            elif t == 0:  # prefill: every prompt at once; each row then keeps only its own tokens
                h = model.hidden_states(seq[:, :longest], cache)
                cache.rewind(lengths)
            else:  # one new token per row, after that row's own tokens
                h = model.hidden_states(seq[rows, last][:, None], cache)
                last = torch.zeros(B, dtype=torch.long, device=device)
            token = sample_next(model.head(h[rows, last]), temperature, top_k, top_p, generator)
            seq[rows, torch.tensor(lengths, device=device)] = token
            out[:, t] = token
            lengths = [m + 1 for m in lengths]
            steps += 1
            if stop is not None:
                done |= torch.isin(token, stop)
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    result = out[:, :steps].tolist()
    if stop is not None:
        ends = set(stop_ids)
        result = [row[:next((i for i, tok in enumerate(row) if tok in ends), len(row))] for row in result]
    return result


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
    device = device_of(model)
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


def stream_answer(model: GPT, tokenizer, prompt: str | list[int], max_new_tokens: int = 100,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop: Iterable[str] = (), use_cache: bool = True,
                  generator: torch.Generator | None = None, drafter=None, compile: bool = False) -> Iterator[str]:
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
                        {eot} if eot is not None else (), use_cache, start_id=eot, drafter=drafter,
                        compile=compile):
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

