"""Prefix caching: prompts that begin alike (a system prompt, the earlier turns of a conversation) reuse the
keys and values computed for that beginning instead of running it through the model again.

A prompt's keys and values at position t depend only on its tokens 0..t (attention is causal, positions
count from 0), so two prompts that share their first m tokens share those m positions' keys and values
exactly. The cache keeps them in blocks of BLOCK tokens: block k of a prompt is stored under its tokens
0..(k+1)·BLOCK-1, which a chain of keys expresses (each block's key is the hash of its parent's key and
its own tokens, and the entry keeps its tokens, so a hash collision can never hand out the wrong block).
`match` finds the longest chain of stored blocks at the start of a prompt, always leaving its last token
to compute (the first token's logits come from it); `store` keeps the blocks of a prompt just prefilled.
Blocks are evicted least recently used once their bytes pass the budget.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

BLOCK = 32  # tokens per cached block


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._blocks: OrderedDict[int, tuple[tuple[int, ...], list]] = OrderedDict()  # key -> (tokens, layers)
        self.hits = 0  # prompt tokens served from the cache

    def _keys(self, prompt: list[int], n_blocks: int):
        key = 0
        for k in range(n_blocks):
            tokens = tuple(prompt[k * BLOCK:(k + 1) * BLOCK])
            key = hash((key, tokens))
            yield key, tokens

    def match(self, prompt: list[int]) -> tuple[int, list]:
        """(m, layers): the first m tokens of `prompt` (a multiple of BLOCK, at most len - 1) are cached, and
        `layers` holds their keys and values as `KVCache.write_row` takes them (m = 0: nothing)."""
        found, keys = [], []
        for key, tokens in self._keys(prompt, (len(prompt) - 1) // BLOCK):
            entry = self._blocks.get(key)
            if entry is None or entry[0] != tokens:
                break
            found.append(entry[1])
            keys.append(key)
        if not found:
            return 0, []
        self._touch(keys)
        layers = [None if found[0][i] is None else tuple(torch.cat([b[i][j] for b in found], dim=1)
                                                         for j in range(len(found[0][i])))
                  for i in range(len(found[0]))]
        self.hits += len(found) * BLOCK
        return len(found) * BLOCK, layers

    def store(self, prompt: list[int], layers: list) -> None:
        """Keep the whole blocks of a prompt whose keys and values are `layers` (from `KVCache.read_row`)."""
        if self.max_bytes <= 0:
            return
        keys = []
        for k, (key, tokens) in enumerate(self._keys(prompt, len(prompt) // BLOCK)):
            keys.append(key)
            if key in self._blocks:
                continue
            block = [None if bufs is None else tuple(t[:, k * BLOCK:(k + 1) * BLOCK].clone() for t in bufs)
                     for bufs in layers]
            size = sum(t.numel() * t.element_size() for bufs in block if bufs for t in bufs)
            if size > self.max_bytes:
                return
            self._blocks[key] = (tokens, block)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, old) = self._blocks.popitem(last=False)
                self.bytes -= sum(t.numel() * t.element_size() for bufs in old if bufs for t in bufs)
        self._touch(keys)

    def _touch(self, chain: list[int]) -> None:
        """A chain was used: its blocks become the most recent, the first block most of all, so that eviction
        takes a chain's last blocks before its first (a block without its parent could never match)."""
        for key in reversed(chain):
            if key in self._blocks:
                self._blocks.move_to_end(key)
