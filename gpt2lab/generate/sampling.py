"""Choosing the next token: greedy, temperature, top-k and top-p, and the checks of those settings."""

from __future__ import annotations

import math
import numbers

import torch

from gpt2lab.errors import UserError
from gpt2lab.model.gpt import GPT


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
    # one pass: a NaN or an infinity anywhere makes the sum NaN or infinite (in float64, finite logits
    # cannot overflow it)
    if not bool(torch.isfinite(logits.sum(dtype=torch.float64))):
        raise UserError("the model's logits are not finite (NaN or infinity): its weights are damaged; "
                        "use another checkpoint or train again")


def is_greedy(temperature: float) -> bool:
    """Temperature 0, or one that is 0 in float32, samples greedily."""
    return temperature == 0 or torch.tensor(temperature, dtype=torch.float32).item() == 0


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> the distribution (..., V) that sampling draws the next token from (temperature > 0).

    top_k keeps the k most likely tokens, top_p the smallest set of most likely tokens whose probability
    reaches p; with both, a token must pass both. Settings too small for float32 cannot make NaN: top_p
    always keeps the most likely token."""
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
        drop[..., 0] = False  # the most likely token stays, however small top_p is
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) of the last position -> next ids (B,). Temperature 0 is greedy (`next_token_probs`
    says what is sampled from otherwise)."""
    _check_finite(logits)
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def device_of(model: GPT) -> torch.device:
    return model.transformer.wte.weight.device


def make_generator(model: GPT, seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None and seed is not None:
        generator = torch.Generator(device=device_of(model)).manual_seed(seed)
    return generator


# ------------------------------------------------------------------------- generation
