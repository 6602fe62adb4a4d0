"""Sampling from a model: greedy, temperature, top-k, top-p, a KV cache, streaming, batches.

Every command that produces text goes through `stream` (one prompt, ids as
they come), `generate` (the same, collected) or `generate_batch` (several
prompts of different lengths at once).

The context limit. GPT-2 has learned position embeddings for `block_size`
positions and none beyond. When prompt plus new tokens would pass that, the
window slides: the oldest tokens are dropped, the newest `block_size // 2`
are kept, and the cache is filled again from them (one prefill), after which
decoding continues one token at a time. Text can thus go on for
as long as asked, each token seeing at least half a context of history. A
prompt longer than the context keeps only its last `block_size` tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

import torch

from gpt2lab.model import GPT, KVCache


def check_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) of the last position -> next ids (B,). Temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
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


def _generator(model: GPT, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None and seed is not None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
    return generator


@torch.inference_mode()
def stream(model: GPT, prompt_ids: list[int], max_new_tokens: int = 100, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, stop_ids: Iterable[int] = (),
           use_cache: bool = True, start_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time; a stop id ends the stream and is not yielded.

    An empty prompt starts from `start_id` (pass the tokenizer's eot id: GPT-2
    documents begin after <|endoftext|>).
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    if not prompt_ids:
        if start_id is None:
            raise ValueError("the prompt is empty; pass start_id (the <|endoftext|> id) to start from it")
        prompt_ids = [start_id]
    stop = set(stop_ids)
    generator = _generator(model, seed, generator)
    device = next(model.parameters()).device
    block = model.config.block_size
    keep = max(1, block // 2)
    context = list(prompt_ids[-block:])
    was_training = model.training
    model.eval()
    try:
        cache = None
        pending = torch.tensor([context], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            if use_cache:
                if cache is None or cache.pos + pending.size(1) > block:
                    # (re)fill the cache from the newest tokens: the first step, or a slide
                    window = context[-block:] if cache is None else context[-keep:]
                    cache = KVCache(model.config, 1, device=device)
                    pending = torch.tensor([window], dtype=torch.long, device=device)
                logits = model(pending, kv_cache=cache, last_only=True)[:, -1, :]
            else:
                window = torch.tensor([context[-block:]], dtype=torch.long, device=device)
                logits = model(window, last_only=True)[:, -1, :]
            token = int(sample_next(logits, temperature, top_k, top_p, generator).item())
            if token in stop:
                return
            yield token
            context.append(token)
            pending = torch.tensor([[token]], dtype=torch.long, device=device)
    finally:
        model.train(was_training)


def generate(model: GPT, prompt_ids: list[int], max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             stop_ids: Iterable[int] = (), eot_id: int | None = None) -> list[int]:
    """The new ids after `prompt_ids` (temperature 0: greedy). Stops at `eot_id` or a stop id."""
    stops = set(stop_ids) | ({eot_id} if eot_id is not None else set())
    return list(stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, generator,
                       stops, use_cache, start_id=eot_id))


@torch.inference_mode()
def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int = 100,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, generator: torch.Generator | None = None,
                   stop_ids: Iterable[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Several prompts in one batch, left-padded; each row's output is what it would get alone.

    A row stops at its first stop id; the batch stops when every row has. Prompt
    plus new tokens must fit in the context (no sliding window for batches).
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt in a batch needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.block_size:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context of {model.config.block_size} tokens")
    generator = _generator(model, seed, generator)
    device = next(model.parameters()).device
    B = len(prompts)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)
    cache = KVCache(model.config, B, max_len=longest + max_new_tokens, device=device, pad=pad)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [[] for _ in range(B)]
    was_training = model.training
    model.eval()
    try:
        pending = ids
        for _ in range(max_new_tokens):
            logits = model(pending, kv_cache=cache, last_only=True)[:, -1, :]
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            done |= torch.isin(nxt, stop)
            for b, (token, finished) in enumerate(zip(nxt.tolist(), done.tolist())):
                if not finished:
                    out[b].append(token)
            if bool(done.all()):
                break
            pending = nxt[:, None]
    finally:
        model.train(was_training)
    return out


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


def stream_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                stop: Iterable[str] = (), use_cache: bool = True) -> Iterator[str]:
    """Text pieces of a continuation of `prompt`, ending at <|endoftext|> or a stop string.

    Text that could be the start of a stop string is held back until it is
    clear that it is not; the stop string itself is never yielded.
    """
    stops = [s for s in stop if s]
    eot = tokenizer.eot_id
    decoder = StreamDecoder(tokenizer)
    held = ""
    ids = tokenizer.encode(prompt)
    for token in stream(model, ids, max_new_tokens, temperature, top_k, top_p, seed, None,
                        {eot} if eot is not None else (), use_cache, start_id=eot):
        held += decoder.push(token)
        if stops:
            cut = min((held.find(s) for s in stops if s in held), default=-1)
            if cut >= 0:
                if held[:cut]:
                    yield held[:cut]
                return
            # keep back the longest tail that is a prefix of some stop string
            keep = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
            ready, held = held[:len(held) - keep], held[len(held) - keep:]
        else:
            ready, held = held, ""
        if ready:
            yield ready
    held += decoder.flush()
    if held:
        yield held
