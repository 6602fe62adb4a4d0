"""Sampling from a model: greedy, temperature, top-k, top-p, a KV cache, streaming, batches.

Every command that produces text goes through `stream` (one prompt, ids as
they come), `generate` (the same, collected) or `generate_batch` (several
prompts of different lengths at once).

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

Speed. The prompt is prefilled once through `GPT.forward`; then a decoding
step is one token per row against the cached keys and values. The cache's
buffers, positions and padding mask are made once, so a step allocates
nothing but activations, and logits are computed for the last position only.
On the CPU the step runs in `_DecodeStep` (see there): a flat loop of tensor
ops which, for a batch, multiplies by copies of the weights laid out for a
few rows at a time (2x faster at batch 8); at batch 1 a step is as fast as
memory can stream the weights. bench/generate.py times it against Hugging
Face transformers.
"""

from __future__ import annotations

import codecs
import math
import numbers
import weakref
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from gpt2lab.model import GPT, KVCache


def check_settings(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError, naming the setting and its value, for anything a generator cannot use."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, numbers.Real) or not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) of the last position -> next ids (B,). Temperature 0 is greedy.

    top_k keeps the k most likely tokens, top_p the smallest set of most likely
    tokens whose probability reaches p; with both, a token must pass both.
    """
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


def _device(model: GPT) -> torch.device:
    return model.transformer.wte.weight.device


def _generator(model: GPT, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None and seed is not None:
        generator = torch.Generator(device=_device(model)).manual_seed(seed)
    return generator


# ------------------------------------------------------------------ the CPU decoding step

# Use `_DecodeStep` for the one-token steps on the CPU (False: the model's own forward).
CPU_DECODE_STEP = True
_DECODE_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _DecodeStep:
    """One decoding step of a GPT (one new token per row, against a KVCache), for the CPU.

    The same computation as `GPT.forward(ids, kv_cache, last_only=True)` for a
    single token, arranged for speed: a flat loop of tensor ops on (B, C)
    activations, without the module calls, views and dropouts of the general
    forward. Logits equal the model's to float rounding (~1e-6).

    With one row, a step streams every weight from memory once (~500 MB for
    GPT-2 124M) and no layout does better, so it uses the model's weights as
    they are. With several rows nearly all the time goes to multiplying them by
    each weight matrix, and nn.Linear, which multiplies by W (out, in)
    transposed, does that badly with MKL: with 8 rows it takes about twice as
    long as with the weights stored (in, out). So a batch step multiplies by
    copies made once: prepacked into MKL's GEMM layout for this batch size
    where torch has MKL (`torch.ops.mkl._mkl_linear`, which torch.compile uses
    for frozen CPU weights; ~25% faster again at 8 rows), else transposed to
    (in, out). The copies take about as much memory as the weights; they are
    kept with the model (a weak reference, so they go when it does) for the
    last batch size used, and made again when it or any parameter changes.

    A model with modules this step does not know (LoRA adapters, hooks, a
    subclass), or one run under autocast, decodes through its own forward.
    """

    def __init__(self, model: GPT, batch_size: int):
        self.config = model.config
        t = model.transformer
        params = list(model.parameters())
        # an in-place change bumps a tensor's version; tensors made under inference_mode have
        # none, so their copies are made for every call instead of kept
        key = None if any(p.is_inference() for p in params) else \
            (batch_size, tuple((p.data_ptr(), p._version) for p in params))
        found = _DECODE_WEIGHTS.get(model)
        if key is None or found is None or found[0] != key:
            _DECODE_WEIGHTS.pop(model, None)  # free the stale copies before making new ones

            def lin(linear: torch.nn.Linear, rows: int | None = None):
                return _prepared_linear(linear.weight.detach()[:rows], linear.bias, batch_size)

            layers = [(b.ln_1, lin(b.attn.c_attn), lin(b.attn.c_proj), b.ln_2, lin(b.mlp.c_fc),
                       lin(b.mlp.c_proj)) for b in t.h]
            # the LM head without the rows that only pad the vocabulary
            found = (key, (layers, lin(model.lm_head, self.config.vocab_size)))
            if key is not None:
                _DECODE_WEIGHTS[model] = found
        self.layers, self.head = found[1]
        self.wte, self.wpe, self.ln_f = t.wte.weight, t.wpe.weight, t.ln_f

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids (B,) or (B, 1): the newest token of each row -> logits (B, vocab_size) of the next."""
        B = ids.size(0)
        C, H = self.config.n_embd, self.config.n_head
        pos, mask = cache.prepare(1)
        x = F.embedding(ids.reshape(B), self.wte) + F.embedding(pos.reshape(-1), self.wpe)
        for i, (ln_1, attn, proj, ln_2, fc, fc_proj) in enumerate(self.layers):
            h = F.layer_norm(x, (C,), ln_1.weight, ln_1.bias, ln_1.eps)
            qkv = attn(h).view(B, 3, H, C // H)
            # (B, n_head, 1, head_dim) views of the one new position
            q, k, v = qkv[:, 0, :, None], qkv[:, 1, :, None], qkv[:, 2, :, None]
            k, v = cache.update(i, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, C)
            x = x + proj(y)
            h = F.layer_norm(x, (C,), ln_2.weight, ln_2.bias, ln_2.eps)
            x = x + fc_proj(F.gelu(fc(h), approximate="tanh"))
        cache.advance(1)
        x = F.layer_norm(x, (C,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps)
        return self.head(x)


def _mkl_packing() -> bool:
    try:
        return torch.backends.mkl.is_available() and callable(torch.ops.mkl._mkl_linear)
    except (AttributeError, RuntimeError):
        return False


def _prepared_linear(weight: torch.Tensor, bias: torch.Tensor | None, batch_size: int):
    """x (batch_size, in) -> x @ weight.T + bias; for several rows, through a copy of the weight
    (out, in) in a faster layout."""
    if batch_size == 1:
        return lambda x: F.linear(x, weight, bias)
    weight = weight.contiguous()
    if weight.dtype == torch.float32 and _mkl_packing():
        try:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch_size)
        except RuntimeError:
            pass
        else:
            # (another number of rows than batch_size would multiply by `weight` itself)
            return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, bias, batch_size)
    w_t = weight.t().contiguous()
    if bias is None:
        return lambda x: torch.mm(x, w_t)
    return lambda x: torch.addmm(bias, x, w_t)


def _is_plain_gpt(model: GPT) -> bool:
    """True when `_DecodeStep` computes what the model does: a GPT made of this package's own
    modules, unmodified (no LoRA adapters or other wrapped layers, no hooks, tied LM head)."""
    from gpt2lab import model as gm

    nn = torch.nn
    if type(model) is not gm.GPT or model.lm_head.weight is not model.transformer.wte.weight:
        return False
    if type(model.lm_head) is not nn.Linear or model.lm_head.bias is not None:
        return False
    expected = {gm.Block, gm.CausalSelfAttention, gm.MLP, nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout,
                nn.Embedding, nn.ModuleList, nn.ModuleDict}
    for module in model.modules():
        if module is not model and type(module) not in expected:
            return False
        if module._forward_hooks or module._forward_pre_hooks:
            return False
    return all(b.mlp.gelu.approximate == "tanh" for b in model.transformer.h)


def _autocast_on_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _decoder(model: GPT, batch_size: int):
    """The function of one decoding step: ids (B,) and a cache -> logits (B, vocab_size)."""
    if CPU_DECODE_STEP and _device(model).type == "cpu" and not _autocast_on_cpu() and _is_plain_gpt(model):
        return _DecodeStep(model, batch_size)
    return lambda ids, cache: model(ids.reshape(-1, 1), kv_cache=cache, last_only=True)[:, -1]


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
            raise ValueError("the prompt is empty; pass start_id (the <|endoftext|> id) to start from it")
        prompt = [int(start_id)]
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
    cache = step = None
    if use_cache and max_new_tokens:
        cache = KVCache(model.config, 1, max_len=min(block, len(context) - start + max_new_tokens),
                        device=device)
        step = _decoder(model, 1)
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
                logits = step(token, cache)
            token = sample_next(logits.reshape(1, -1), temperature, top_k, top_p, generator)
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
        raise ValueError("every prompt in a batch needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.block_size:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
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
    pad = torch.tensor(pads, device=device) if any(pads) else None
    # every row's prompt and new tokens, in one preallocated (B, longest + n) tensor
    seq = torch.full((B, longest + n), pad_id, dtype=torch.long, device=device)
    seq[:, :longest] = torch.tensor([[pad_id] * k + p for k, p in zip(pads, prompts)], device=device)
    cache = KVCache(model.config, B, max_len=longest + n, device=device, pad=pad) if n else None
    step = _decoder(model, B) if use_cache and n else None
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    steps = 0
    try:
        for t in range(longest, longest + n):
            if not use_cache:  # recompute everything; a scratch cache only supplies the padding mask
                cache.reset()
                logits = model(seq[:, :t], kv_cache=cache if pad is not None else None, last_only=True)[:, -1]
            elif cache.pos == 0:  # prefill: every prompt at once
                logits = model(seq[:, :t], kv_cache=cache, last_only=True)[:, -1]
            else:
                logits = step(seq[:, t - 1], cache)
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
