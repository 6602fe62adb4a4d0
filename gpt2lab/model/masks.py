"""Attention masks: which keys each query may see. Every mask in gpt2lab is made here.

A mask is a bool tensor (B or 1, 1, T, keys), True where a query may attend, that the model's one forward
passes to scaled_dot_product_attention; None means plain causal attention, the fast kernel. Masks go with
explicit positions when rows are not plain sequences from slot 0:

    causal_mask      T new tokens after `past` cached ones
    cache_inputs     T new tokens after each row's own cached ones (rows of different lengths)
    segment_mask     packed segments that must not see each other: documents packed into a training row
                     (`document_inputs`), or a multiple-choice context with its choices after it

A padding query always attends at least to itself, so that its (unused) output is never NaN.
"""

from __future__ import annotations

import torch


def causal_mask(T: int, past: int, device) -> torch.Tensor:
    """(1, 1, T, past + T): query i (at slot past + i) sees every slot up to its own."""
    slots = torch.arange(past + T, device=device)
    return (slots[None, :] <= slots[past:, None])[None, None]


def cache_inputs(lengths: list[int], T: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(positions (B, T), mask (B, 1, T, max(lengths) + T)) of T new tokens written right after the
    lengths[b] cached tokens of each row b: row b's token t is at slot and position lengths[b] + t and
    sees the slots up to its own. When every row has the same length p: (None, causal mask or None), the
    positions are p, p + 1, ... and the model takes them by default."""
    p = max(lengths, default=0)
    if len(set(lengths)) <= 1:
        return None, (causal_mask(T, p, device) if p > 0 and T > 1 else None)
    n = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
    positions = n + torch.arange(T, device=device)  # (B, T): also each new token's slot
    slots = torch.arange(p + T, device=device)
    mask = slots[None, None, :] <= positions[:, :, None]  # (B, T, L): a slot past the query's own is not seen
    return positions, mask[:, None]


def segment_mask(segments: torch.Tensor, shared: int | None = None) -> torch.Tensor:
    """segments (B, T) -> (B, 1, T, T): causal attention within each segment, plus to segment `shared` (a
    context every segment may see) when given. Negative segment ids are padding, seen by nobody."""
    T = segments.size(1)
    idx = torch.arange(T, device=segments.device)
    causal = idx[None, :] <= idx[:, None]  # (query, key): the key is not after the query
    q, k = segments[:, :, None], segments[:, None, :]
    same = (k == q) if shared is None else (k == q) | (k == shared)
    mask = causal[None] & same & (k >= 0)
    mask |= torch.eye(T, dtype=torch.bool, device=segments.device)[None]
    return mask[:, None]


def document_inputs(x: torch.Tensor, eot_id: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Positions and an attention mask that keep the documents packed into each row apart.

    x (B, T): rows cut from a split where <|endoftext|> begins every document. A document starts at each
    eot (and at the row's first token); its positions count from 0 there, and its tokens attend only to
    earlier tokens of the same document: a block-diagonal causal mask (B, 1, T, T). When no row holds more
    than one document the answer is (None, None): plain causal attention, the fast kernel, pays nothing.
    """
    B, T = x.shape
    starts = x == eot_id
    starts[:, 0] = True
    if int(starts.sum()) == B:  # every row is (part of) one document
        return None, None
    idx = torch.arange(T, device=x.device)
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values  # where each token's document starts
    return idx - first, segment_mask(starts.cumsum(dim=1))
