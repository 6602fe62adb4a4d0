"""The KV cache: keys and values of the tokens seen so far, so that decoding computes only the new ones.

Generating token t+1 needs the keys and values of tokens 0..t; without a cache they are recomputed at
every step (quadratic work). Each layer's buffers hold `max_len` slots per row and are made on that
layer's first write, shaped after what it writes (an attention with fewer key/value heads stores fewer;
latent attention stores its latent), so decoding writes into them and never reallocates.

Rows are independent sequences: row b holds `lengths[b]` tokens in slots 0..lengths[b]-1, and the next
forward writes its tokens right after them, at positions that count on from there. Rows of different
lengths decode together (a batch of prompts of different lengths, the server's rows), each seeing
exactly what it would see alone: the cache gives the forward each row's positions and the mask that
hides the slots past its end (`inputs`). When every row has the same length, the writes are plain
slices and no mask is needed beyond causal.

The cache owns its row operations, so that its users never touch its buffers:
    rewind(lengths)        keep only the first lengths[b] tokens of each row (ragged prefill, rejected drafts)
    select_rows(index)     keep these rows, in this order (rows that finished leave the batch)
    add_rows(n)            n more empty rows at the end (requests join the batch)
    repeat_rows(n)         a one-row cache copied into n rows (one prompt, n samples)
    grow(max_len)          more slots per row
    copy_row(src, dst, n)  the first n tokens of row src into row dst (a shared prefix)
    read_row / write_row   a row's tokens out of one cache and into another
    rows(start, stop)      some rows as a cache of their own: a forward through it writes into this one
"""

from __future__ import annotations

import torch

from gpt2lab.model.config import GPTConfig
from gpt2lab.model.masks import cache_inputs


class KVCache:
    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None):
        self.config = config
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(f"a cache of {self.max_len} positions exceeds the model's context of "
                             f"{config.block_size}")
        self.device = torch.device(device) if device is not None else None
        self.layers: list[tuple[torch.Tensor, ...] | None] = [None] * config.n_layer
        self._lengths = [0] * batch_size  # tokens held by each row
        self._parent: KVCache | None = None  # a view of some rows of another cache (`rows`)
        self._start = 0

    @property
    def lengths(self) -> list[int]:
        if self._parent is None:
            return self._lengths
        return self._parent.lengths[self._start:self._start + self._n]

    @lengths.setter
    def lengths(self, value: list[int]) -> None:
        if self._parent is None:
            self._lengths = list(value)
        else:
            self._parent.lengths[self._start:self._start + self._n] = value

    # ------------------------------------------------------------------ what a forward uses

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def pos(self) -> int:
        """The slots in use: the longest row's length."""
        return max(self.lengths, default=0)

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def inputs(self, T: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(positions, mask) of T new tokens per row, written after each row's tokens; (None, None) when
        plain positions and causal attention are right (every row the same length)."""
        if self.pos + T > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.pos} are used and {T} more do "
                             "not fit")
        return cache_inputs(self.lengths, T, device)

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this step's tensors (B, heads, T, dim) after each row's tokens; return each one's slots
        in use after the write, (B, heads, pos + T, dim)."""
        T = new[0].size(2)
        L = self.pos + T
        if L > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {self.pos} are used and {T} "
                             "more do not fit")
        bufs = self.layers[layer] if self.layers[layer] is not None else self._allocate(layer, new)
        if self.uniform:
            p = self.pos
            for buf, t in zip(bufs, new):
                buf.narrow(2, p, T).copy_(t)
        else:
            device = new[0].device
            rows = torch.arange(len(self.lengths), device=device)[:, None]  # (B, 1)
            slots = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
            for buf, t in zip(bufs, new):
                buf[rows, :, slots] = t.transpose(1, 2)  # (B, T, heads, dim) at each row's slots
        return tuple(buf.narrow(2, 0, L) for buf in bufs)

    def _allocate(self, layer: int, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The layer's buffers, shaped after its first write (a view makes its parent's whole ones)."""
        if self._parent is not None:
            whole = self._parent._allocate(layer, like)
            bufs = tuple(t.narrow(0, self._start, self._n) for t in whole)
        else:
            bufs = tuple(torch.zeros(len(self._lengths), t.size(1), self.max_len, t.size(3), dtype=t.dtype,
                                     device=t.device) for t in like)
        self.layers[layer] = bufs
        return bufs

    def advance(self, T: int) -> None:
        """The forward wrote T tokens into every row."""
        self.lengths = [n + T for n in self.lengths]

    # ------------------------------------------------------------------ row operations

    def reset(self) -> None:
        """Forget the cached tokens (the buffers stay allocated)."""
        self.lengths = [0] * len(self.lengths)

    def rewind(self, lengths: list[int]) -> None:
        """Keep only the first lengths[b] tokens of row b (the slots after them are written over)."""
        if len(lengths) != len(self.lengths) or any(not 0 <= n <= m for n, m in zip(lengths, self.lengths)):
            raise ValueError(f"cannot rewind rows of lengths {self.lengths} to {lengths}")
        self.lengths = [int(n) for n in lengths]

    def _map(self, fn) -> None:
        self.layers = [None if bufs is None else tuple(fn(t) for t in bufs) for bufs in self.layers]

    def select_rows(self, index: list[int]) -> None:
        """Keep the rows `index`, in that order (the others leave the batch)."""
        if index == list(range(len(index))):
            self._map(lambda t: t.narrow(0, 0, len(index)))  # the first rows: a view, nothing copied
        else:
            ix = torch.tensor(index, dtype=torch.long)
            self._map(lambda t: t.index_select(0, ix.to(t.device)))
        self.lengths = [self.lengths[i] for i in index]

    def add_rows(self, n: int) -> None:
        """n empty rows at the end of the batch."""
        self._map(lambda t: torch.cat([t, t.new_zeros(n, *t.shape[1:])], dim=0))
        self.lengths = self.lengths + [0] * n

    def repeat_rows(self, n: int) -> KVCache:
        """A cache of n rows, each a copy of this one-row cache (a prompt prefilled once, sampled n times)."""
        if len(self.lengths) != 1:
            raise ValueError("repeat_rows copies a cache of one row")
        other = KVCache(self.config, n, self.max_len, self.device)
        other.layers = [None if bufs is None else tuple(t.repeat(n, 1, 1, 1) for t in bufs) for bufs in self.layers]
        other.lengths = list(self.lengths) * n
        return other

    def grow(self, max_len: int) -> None:
        """Room for max_len tokens per row (the cached ones are copied; never past the model's context)."""
        if max_len > self.config.block_size:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context of "
                             f"{self.config.block_size}")
        if max_len <= self.max_len:
            return
        extra = max_len - self.max_len
        self._map(lambda t: torch.cat([t, t.new_zeros(t.size(0), t.size(1), extra, t.size(3))], dim=2))
        self.max_len = max_len

    def reserve(self, rows: int, slots: int, max_rows: int) -> None:
        """At least `rows` rows of `slots` slots. Both grow by doubling, never past `max_rows` or the model's
        context: a grown cache is copied whole, so growing a little at a time would copy it over and over."""
        if rows > self.batch_size:
            self.add_rows(_doubled(self.batch_size, rows, max_rows) - self.batch_size)
        if slots > self.max_len:
            self.grow(_doubled(self.max_len, slots, self.config.block_size))

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """The first n tokens of row src become row dst's tokens."""
        for bufs in self.layers:
            for t in bufs or ():
                t[dst, :, :n] = t[src, :, :n]
        lengths = list(self.lengths)
        lengths[dst] = n
        self.lengths = lengths

    def read_row(self, b: int, n: int) -> list[tuple[torch.Tensor, ...] | None]:
        """The first n tokens of row b, each layer's tensors (heads, n, dim): for `write_row`."""
        return [None if bufs is None else tuple(t[b, :, :n] for t in bufs) for bufs in self.layers]

    def write_row(self, b: int, tokens: list[tuple[torch.Tensor, ...] | None]) -> None:
        """Row b holds `tokens` (from `read_row`, of this or another cache) and nothing after them."""
        n = 0
        for layer, new in enumerate(tokens):
            if new is None:
                continue
            n = new[0].size(1)
            bufs = self.layers[layer] if self.layers[layer] is not None else \
                self._allocate(layer, tuple(t[None] for t in new))
            for buf, t in zip(bufs, new):
                buf[b, :, :n] = t
        lengths = list(self.lengths)
        lengths[b] = n
        self.lengths = lengths

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache that shares this one's buffers and lengths: a forward through it
        writes into this cache. Valid until rows are selected, added or grown."""
        view = KVCache.__new__(KVCache)
        view.config, view.max_len, view.device = self.config, self.max_len, self.device
        view._parent, view._start, view._n = self, start, stop - start
        view.layers = [None if bufs is None else tuple(t.narrow(0, start, stop - start) for t in bufs)
                       for bufs in self.layers]
        return view


def _doubled(have: int, need: int, limit: int) -> int:
    """Room for `need`: `have` doubled until it is enough, never past `limit` (copies stay linear in the total)."""
    have = max(have, 1)
    while have < need:
        have *= 2
    return min(have, limit)


class StaticKVCache(KVCache):
    """A KV cache whose shapes never change, for a compiled decoding step (generate/compiled.py): one or more
    rows of the same length, buffers of `max_len` slots made at once, the length a tensor (`position`), every
    attention over all the slots with a mask hiding those not written yet. A step then has the same shapes
    at every length (torch.compile compiles it once; CUDA graphs can replay it). The caller moves
    `position` on after a forward (`advance` leaves it, so that the compiled step has no side effect)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype: torch.dtype):
        super().__init__(config, batch_size, max_len, device)
        if config.attention == "mla":  # the latent and the decoupled rotary key
            shapes = [(1, config.latent_size), (1, config.rope_dim)]
        else:
            shapes = [(config.kv_heads, config.head_dim)] * 2
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.layers = [tuple(torch.zeros(batch_size, h, max_len, d, dtype=dtype, device=device) for h, d in shapes)
                       for _ in range(config.n_layer)]

    @property
    def pos(self) -> int:
        return int(self.position)

    def inputs(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        positions = (self.position + torch.arange(T, device=device))[None]  # (1, T)
        mask = self.slots[None, None, None, :] <= positions[..., None]  # (1, 1, T, max_len)
        return positions, mask

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        index = self.position + torch.arange(new[0].size(2), device=self.position.device)
        for buf, t in zip(self.layers[layer], new):
            buf.index_copy_(2, index, t)
        return self.layers[layer]

    def advance(self, T: int) -> None:
        pass

    def reset(self) -> None:
        self.position.zero_()
