"""The one measurement every evaluation comes down to: the summed log-probability of a continuation given
a context, and whether greedy decoding would have produced it. `score_requests` makes it for many
(context, continuations) pairs at once; the benchmarks (benchmarks.py) only build the pairs and turn the
scores into metrics.

Context and continuation are tokenised separately and the ids concatenated; an empty context becomes
<|endoftext|>, as in EleutherAI's lm-evaluation-harness. When the two together exceed the model's
context, the context loses tokens on the left and the continuation stays whole.

How it is fast. A multiple-choice example is packed into one sequence: the context once, then every
choice's tokens, each choice attending to the context and to itself only (a segment mask, model/masks.py),
with its positions counting on from the end of the context. HellaSwag thus costs one sequence of ~165
tokens per example instead of four of ~80. The LM head, about 30% of GPT-2 small's work per token, is
applied only at the positions that predict a scored token. Sequences are sorted by length and batched with
right padding, which causal attention never sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2lab.errors import UserError
from gpt2lab.metrics import progress as progress_bar
from gpt2lab.model.gpt import GPT
from gpt2lab.model.masks import segment_mask

LM_HEAD_CHUNK = 1024  # scored positions per LM-head matmul: bounds the (positions, vocab) logits


# ----------------------------------------------------------------------------- scoring


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Request:
    """Score each continuation (token ids) after the context (token ids, at least one)."""

    context: Sequence[int]
    continuations: Sequence[Sequence[int]]


@dataclass(frozen=True)
class Score:
    logprob: float  # summed log-probability of the continuation's tokens, in nats
    greedy: bool  # the argmax at every continuation position is the continuation's token
    argmax: tuple[int, ...] | None = None  # those argmax ids, when asked for


@dataclass
class _Sequence:
    """One sequence of a batch: a context and the continuations that share it."""

    tokens: list[int]
    positions: list[int] | None  # None: 0, 1, 2, ...
    segments: list[int] | None  # 0 for context tokens, j + 1 for continuation j; None: one continuation
    scored: list[int]  # the row index whose output predicts each target
    targets: list[int]
    owners: list[int]  # which (request, continuation) each target belongs to


def _rows(requests: Sequence[Request], block_size: int) -> tuple[list[_Sequence], list[tuple[int, int]]]:
    """Requests -> rows; owners index the returned list of (request, continuation) pairs."""
    rows: list[_Sequence] = []
    pairs: list[tuple[int, int]] = []
    for r, req in enumerate(requests):
        ctx = list(req.context)
        conts = [list(c) for c in req.continuations]
        if not ctx:
            raise ValueError(f"request {r} has an empty context; start it with the <|endoftext|> id")
        for j, cont in enumerate(conts):
            if not 1 <= len(cont) <= block_size:
                raise UserError(f"example {r}: continuation {j} has {len(cont)} tokens; it must have "
                                f"between 1 and the model's context of {block_size}")
        first = len(pairs)
        pairs.extend((r, j) for j in range(len(conts)))
        packed = len(ctx) + sum(len(c) - 1 for c in conts)
        if len(conts) > 1 and packed <= block_size:
            rows.append(_packed_row(ctx, conts, first))
            continue
        for j, cont in enumerate(conts):
            # as the harness: the last block_size + 1 tokens of context + continuation, minus the last
            keep = block_size + 1 - len(cont)
            c = ctx[-keep:] if len(ctx) > keep else ctx
            n = len(c)
            rows.append(_Sequence(tokens=c + cont[:-1], positions=None, segments=None,
                             scored=list(range(n - 1, n - 1 + len(cont))), targets=cont,
                             owners=[first + j] * len(cont)))
    return rows, pairs


def _packed_row(ctx: list[int], conts: list[list[int]], first: int) -> _Sequence:
    n = len(ctx)
    tokens, positions, segments = list(ctx), list(range(n)), [0] * n
    scored, targets, owners = [], [], []
    for j, cont in enumerate(conts):
        start = len(tokens)
        tokens += cont[:-1]
        positions += range(n, n + len(cont) - 1)
        segments += [j + 1] * (len(cont) - 1)
        # the context's last token predicts every choice's first token, then each its own next
        scored += [n - 1] + list(range(start, start + len(cont) - 1))
        targets += cont
        owners += [first + j] * len(cont)
    return _Sequence(tokens, positions, segments, scored, targets, owners)


def _batch_tensors(batch: list[_Sequence], device: torch.device):
    B, T = len(batch), max(len(r.tokens) for r in batch)
    idx = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(batch):
        idx[b, :len(r.tokens)] = torch.tensor(r.tokens)
    if all(r.segments is None for r in batch):
        # plain causal sequences: right padding comes after every real token, so nothing sees it
        return idx.to(device), torch.arange(T, device=device), None
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
    for b, r in enumerate(batch):
        n = len(r.tokens)
        pos[b, :n] = torch.tensor(r.positions if r.positions is not None else range(n))
        seg[b, :n] = torch.tensor(r.segments if r.segments is not None else [0] * n)
    # a token sees the context (segment 0) and its own continuation, never another continuation or padding
    return idx.to(device), pos.to(device), segment_mask(seg.to(device), shared=0)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def score_requests(model: GPT, requests: Sequence[Request], *, batch_size: int = 8,
                   autocast_dtype: torch.dtype | None = None, return_argmax: bool = False,
                   progress: bool = False, desc: str = "scoring",
                   bar=None) -> list[list[Score]]:
    """For each request, a Score per continuation: summed log-probability and greedy match.

    `batch_size` is the number of sequences per forward pass (a multiple-choice
    example packed with all its choices is one sequence). Scores do not depend
    on it beyond float rounding. `bar`: a progress bar to advance (one step per
    sequence) instead of making one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    rows, pairs = _rows(requests, model.config.block_size)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))  # longest first, as the harness
    logprob = torch.zeros(len(pairs), dtype=torch.float64)
    misses = torch.zeros(len(pairs), dtype=torch.long)
    argmax: list[list[int]] | None = [[] for _ in pairs] if return_argmax else None
    own_bar = bar is None
    if own_bar:
        bar = progress_bar(total=len(rows), desc=desc, unit="seq", disable=not progress, leave=False)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[start:start + batch_size]]
            idx, pos, mask = _batch_tensors(batch, device)
            if mask is not None and autocast_dtype is None:
                # additive form, made once rather than by attention in every layer
                additive = torch.zeros(mask.shape, dtype=model.transformer.wte.weight.dtype, device=device)
                mask = additive.masked_fill_(~mask, float("-inf"))
            with _autocast(device, autocast_dtype):
                h = model.hidden_states(idx, positions=pos, mask=mask)
            T = idx.size(1)
            flat = torch.tensor([b * T + s for b, r in enumerate(batch) for s in r.scored], device=device)
            targets = torch.tensor([t for r in batch for t in r.targets], device=device)
            owners = torch.tensor([o for r in batch for o in r.owners])
            h = h.reshape(-1, h.size(-1)).index_select(0, flat)
            lp, hit, am = _score_positions(model, h, targets, vocab)
            logprob.index_add_(0, owners, lp.double().cpu())
            misses.index_add_(0, owners, (~hit).long().cpu())
            if argmax is not None:
                for o, a in zip(owners.tolist(), am.tolist()):
                    argmax[o].append(a)
            bar.update(len(batch))
    finally:
        model.train(was_training)
        if own_bar:
            bar.close()
    out: list[list[Score]] = [[] for _ in requests]
    for p, (r, _j) in enumerate(pairs):
        ids = tuple(argmax[p]) if argmax is not None else None
        out[r].append(Score(float(logprob[p]), bool(misses[p] == 0), ids))
    return out


def _score_positions(model: GPT, h: torch.Tensor, targets: torch.Tensor, vocab: int):
    """The LM head on the scored positions only, in chunks, the log-probabilities in fp32."""
    lps, hits, ams = [], [], []
    weight_dtype = model.transformer.wte.weight.dtype
    for s in range(0, h.size(0), LM_HEAD_CHUNK):
        hc, tc = h[s:s + LM_HEAD_CHUNK], targets[s:s + LM_HEAD_CHUNK]
        logits = model.head(hc.to(weight_dtype)).float()[:, :vocab]
        # one pass for the argmax, one fused log-softmax for the targets' log-probabilities
        am = logits.max(dim=-1).indices
        lps.append(-F.cross_entropy(logits, tc, reduction="none"))
        ams.append(am)
        hits.append(am == tc)
    return torch.cat(lps), torch.cat(hits), torch.cat(ams)


# ----------------------------------------------------------------------------- text -> ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, tokenised separately, as the harness does.

    Whitespace at the end of the context moves to the start of the continuation;
    an empty context becomes <|endoftext|>.
    """
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    return _context_ids(tokenizer, context), tokenizer.encode_ordinary(continuation)


def _context_ids(tokenizer, context: str) -> list[int]:
    if context:
        return tokenizer.encode_ordinary(context)
    if tokenizer.eot_id is None:
        raise UserError("an example has an empty context and the tokenizer has no <|endoftext|> token "
                        "to stand in for it; give every example some context")
    return [tokenizer.eot_id]


__all__ = ["Request", "Score", "encode_pair", "score_requests"]
