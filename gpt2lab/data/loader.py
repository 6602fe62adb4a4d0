"""Batches of a data directory: `TokenLoader` (the windows of pretraining, in the one global order) and
`SlidingWindowDataset` (the same idea as a `torch.utils.data.Dataset`)."""

from __future__ import annotations

import os

import numpy as np
import torch

from gpt2lab.data.order import GlobalOrder
from gpt2lab.data.shards import load_tokens, split_shards
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import Tokenizer


class TokenLoader:
    """Batches (x, y) of shape (batch_size, seq_len) for language modelling; y is x shifted by one.

    The split is cut into windows of seq_len + 1 consecutive ids at offsets 0, T, 2T, ... of each
    shard (x = window[:-1], y = window[1:]), so one pass over the windows makes every id a target
    exactly once.

    mode="random": every epoch visits each window once, in a permutation drawn from (seed, epoch).
      The usual choice for training.
    mode="sequential": the windows in order, wrapping around at the end. The usual choice for
      evaluation.

    The order is global, never a function of the rank: the windows form one sequence, each call of
    `next_batch` (one micro-batch on every process) takes the next batch_size x world_size of them,
    and rank r takes its slice [r * batch_size, (r + 1) * batch_size). One process and N processes
    with the same total batch therefore see the same windows in every optimizer step, and the
    position (`state_dict`) resumes on any number of processes.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        mode: str = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
    ):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be 'random' or 'sequential', got {mode!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be at least 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.data_dir, self.split, self.mode = str(data_dir), split, mode
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.meta, self.shards = split_shards(data_dir, split)
        self.tokens = sum(len(s) for s in self.shards)
        self.vocab_size = vocab_size if vocab_size is not None else self.meta.get("vocab_size")

        window = seq_len + 1
        longest = max((len(s) for s in self.shards), default=0)
        if longest < window:
            detail = f"{self.tokens} tokens" + (f" (at most {longest} in one shard)"
                                                if len(self.shards) > 1 else "")
            hint = (" (it was prepared with --val-fraction 0)"
                    if self.tokens == 0 and self.meta.get("val_fraction") == 0 else "")
            raise UserError(f"the {split} split of {data_dir} has {detail}{hint}, but one window of "
                            f"seq_len + 1 = {window} tokens is needed; use a smaller --seq-len or "
                            "prepare more data")
        # windows at offsets 0, T, 2T, ... with offset + T + 1 <= shard length
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self._cum = np.cumsum(counts)
        self._total = int(self._cum[-1])
        self.order = GlobalOrder(self._total, batch_size, seed=seed, rank=rank, world_size=world_size,
                                 shuffle=mode == "random")

    @property
    def windows(self) -> int:
        """Windows in one pass over the split."""
        return self._total

    @property
    def epoch(self) -> int:
        """How many times the whole split has been walked."""
        return self.order.epoch

    @property
    def steps_per_epoch(self) -> int:
        """Calls of next_batch (micro-batches of all ranks) in one pass over the split."""
        return self.order.steps_per_epoch

    def _locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window index -> (shard, index of the window within that shard)."""
        shard = np.searchsorted(self._cum, index, side="right")
        before = np.where(shard > 0, self._cum[shard - 1], 0)
        return shard, index - before

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        shard, within = self._locate(self.order.next_indices())
        rows = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            s = int(within[b]) * T
            rows[b] = self.shards[shard[b]][s:s + T + 1]
        if self.vocab_size is not None and int(rows.max()) >= self.vocab_size:
            raise UserError(f"the {self.split} shards of {self.data_dir} hold token id {int(rows.max())}, outside "
                            f"the vocabulary of {self.vocab_size}; the data is corrupt, prepare it again")
        batch = torch.from_numpy(rows)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if self.device.type == "cuda":
            # page-locked host memory lets the copy run asynchronously with compute
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The global position: the same on every rank, valid for any number of processes."""
        return {"mode": self.mode, "split": self.split, "seq_len": self.seq_len, **self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise UserError(f"the saved data position is for --data-order {state.get('mode')!r}, this run has "
                            f"{self.mode!r}; resume with the same data settings")
        if state.get("seq_len") != self.seq_len:
            raise UserError(f"the saved data position is for seq_len {state.get('seq_len')}, this "
                            f"loader has {self.seq_len}; resume with the same --seq-len")
        self.order.load_state_dict(state, f"data in {self.data_dir}")


class SlidingWindowDataset(torch.utils.data.Dataset):
    """Input/target windows slid over a stream of ids, for a `torch.utils.data.DataLoader`.

    Item i is the window that starts at i * stride: x = ids[s : s + max_length]
    and y = ids[s + 1 : s + max_length + 1], the same ids shifted by one, so
    at every position the target is the token that comes next. stride =
    max_length gives windows that touch without overlapping; a smaller
    stride overlaps them (more, correlated, samples); a larger one skips text.

    `ids` is a 1-D array of ids, or a data directory (with `split`).
    """

    def __init__(self, ids, max_length: int, stride: int | None = None, *, split: str = "train"):
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        stride = max_length if stride is None else stride
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        if isinstance(ids, (str, os.PathLike)):
            ids = load_tokens(ids, split)
        elif isinstance(ids, torch.Tensor):
            ids = ids.numpy()
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
        if len(ids) < max_length + 1:
            raise UserError(f"{len(ids)} tokens are too few for one window of max_length + 1 = "
                            f"{max_length + 1}; use a smaller max_length or more text")
        self.ids, self.max_length, self.stride = ids, max_length, stride
        self._n = (len(ids) - max_length - 1) // stride + 1

    @classmethod
    def from_text(cls, text: str, tokenizer: Tokenizer, max_length: int, stride: int | None = None):
        """Windows over one text; `<|endoftext|>` in it becomes the eot id, as in the book's example."""
        ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
        return cls(np.array(ids, dtype=np.int64), max_length, stride)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self._n <= i < self._n:
            raise IndexError(f"window {i} out of range for {self._n} windows")
        s = (i % self._n) * self.stride
        window = torch.from_numpy(np.asarray(self.ids[s:s + self.max_length + 1], dtype=np.int64))
        return window[:-1], window[1:]
