"""The data directory and its shards, read back as batches.

`gpt2lab prepare` (prepare.py) writes a *data directory*::

    data/
      meta.json           what is in here: tokenizer identity, dtype, token counts, shard names
      tokenizer.json      the tokenizer that made the ids, so the directory describes itself
      train_000000.bin    the training ids, in order (more shards if there are many tokens)
      val_000000.bin      the held-out ids

and this module reads it: `read_meta`, `check_tokenizer`, `open_shard`, `load_tokens`,
`TokenLoader` (the batches of pretraining) and `SlidingWindowDataset` (the same idea as a
`torch.utils.data.Dataset`).

Shard files
-----------
A shard is a 1024-byte header followed by the ids, nothing else::

    offset  size  little-endian field
         0     8  magic b"GPT2LABT"
         8     4  uint32 format version (1)
        12     4  uint32 itemsize: 2 for uint16 ids, 4 for uint32 ids
        16     8  uint64 number of ids that follow
        24  1000  zero
      1024   n*itemsize  the ids

uint16 is used when every id fits (vocab_size <= 65536, true of GPT-2's
50257), uint32 otherwise. Shards are named train_000000.bin,
train_000001.bin, ... and a new one is started every `shard_tokens` ids.
The fixed header keeps the ids aligned and lets `np.memmap` read a shard of
any size without loading it: a batch only touches the pages it needs.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import Tokenizer, load_tokenizer_file

FORMAT = "gpt2lab-data"
VERSION = 1
META_FILE = io.DATA_META
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")

MAGIC = b"GPT2LABT"
SHARD_VERSION = 1
HEADER_BYTES = 1024
_HEADER = struct.Struct("<8sIIQ")  # magic, version, itemsize, count


# --------------------------------------------------------------------- shards


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest id type that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_header(count: int, itemsize: int) -> bytes:
    """The 1024-byte header of a shard holding `count` ids of `itemsize` bytes."""
    return _HEADER.pack(MAGIC, SHARD_VERSION, itemsize, count).ljust(HEADER_BYTES, b"\0")

def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The ids of one shard as a read-only memory map, after checking its header and size."""
    path = Path(path)
    fix = "prepare the data again with `gpt2lab prepare`"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise UserError(f"shard {path} is missing; {fix}") from None
    if len(head) < HEADER_BYTES:
        raise UserError(f"shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header; "
                        f"the file is truncated, {fix}")
    magic, version, itemsize, count = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise UserError(f"{path} is not a gpt2lab shard (bad magic {magic!r}, expected {MAGIC!r}); {fix}")
    if version != SHARD_VERSION:
        raise UserError(f"shard {path} has format version {version}, this gpt2lab reads version "
                        f"{SHARD_VERSION}; {fix} or upgrade gpt2lab")
    if itemsize not in (2, 4):
        raise UserError(f"shard {path} has a bad header (itemsize {itemsize}, expected 2 or 4); {fix}")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise UserError(f"shard {path} is {size} bytes but its header promises {count} ids "
                        f"({expected} bytes); the file is truncated or corrupt, {fix}")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if count == 0:
        return np.empty(0, dtype=dtype)  # a zero-length file region cannot be memory-mapped
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))

# ------------------------------------------------------------------- reading


def read_meta(data_dir: str | os.PathLike) -> dict:
    """meta.json of a data directory, checked to be one this gpt2lab can read."""
    d = Path(data_dir)
    fix = f"run `gpt2lab prepare --input ... --out {data_dir}` first"
    if not d.exists():
        raise UserError(f"data directory {data_dir} does not exist; {fix}")
    if not d.is_dir():
        raise UserError(f"{data_dir} is a file, not a data directory; {fix}")
    path = d / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} has no {META_FILE}, so it is not a prepared data directory; {fix}")
    meta = io.read_json(path, "data description", "prepare the data again with `gpt2lab prepare --overwrite`")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{path} is not a gpt2lab data description (format {found!r}, expected "
                        f"{FORMAT!r}); point at a directory made by `gpt2lab prepare`")
    if meta.get("version") != VERSION:
        raise UserError(f"{path} has data format version {meta.get('version')!r}, this gpt2lab reads "
                        f"version {VERSION}; prepare the data again with `gpt2lab prepare --overwrite`")
    try:
        if not isinstance(meta["tokenizer"]["sha256"], str) or np.dtype(meta["dtype"]).kind != "u":
            raise ValueError("bad tokenizer or dtype")
        for split in meta["splits"].values():
            if not isinstance(split["tokens"], int) or not all(isinstance(n, str) and "/" not in n
                                                               and n.endswith(".bin") for n in split["shards"]):
                raise ValueError("bad split")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} is damaged ({e}); prepare the data again with "
                        "`gpt2lab prepare --overwrite`") from None
    return meta


def check_tokenizer(meta: dict, tokenizer: Tokenizer, data_dir: str | os.PathLike | None = None) -> None:
    """Refuse data whose ids were made by another tokenizer than `tokenizer`."""
    have = meta["tokenizer"]
    want = tokenizer.identity()
    if have.get("sha256") == want["sha256"]:
        return
    where = f"the data in {data_dir}" if data_dir is not None else "the data"
    spec = "gpt2" if want["name"] == "gpt2" else f"<the directory of tokenizer {want['name']!r}>"
    raise UserError(f"{where} was prepared with tokenizer {have.get('name')!r} (sha256 "
                    f"{str(have.get('sha256'))[:12]}...), but this uses tokenizer {want['name']!r} "
                    f"(sha256 {want['sha256'][:12]}...); their ids differ, so prepare the data again with "
                    f"--tokenizer {spec}")


def data_tokenizer(data_dir: str | os.PathLike, fast: bool = True) -> Tokenizer:
    """The tokenizer stored in a data directory (the one that made its ids)."""
    read_meta(data_dir)
    return load_tokenizer_file(Path(data_dir) / TOKENIZER_FILE, fast=fast)


def _split_shards(data_dir: str | os.PathLike, split: str) -> tuple[dict, list[np.ndarray]]:
    meta = read_meta(data_dir)
    splits = meta.get("splits", {})
    if split not in splits:
        raise UserError(f"{data_dir} has no split {split!r}; it has {sorted(splits)}")
    info = splits[split]
    arrays = [open_shard(Path(data_dir) / name) for name in info["shards"]]
    want = np.dtype(meta["dtype"])
    for name, a in zip(info["shards"], arrays):
        if a.dtype != want:
            raise UserError(f"shard {Path(data_dir) / name} holds {a.dtype} ids but meta.json says "
                            f"{want}; prepare the data again with `gpt2lab prepare --overwrite`")
    if sum(len(a) for a in arrays) != info["tokens"]:
        raise UserError(f"the {split} shards of {data_dir} hold {sum(len(a) for a in arrays)} ids but "
                        f"meta.json says {info['tokens']}; prepare the data again with "
                        "`gpt2lab prepare --overwrite`")
    return meta, arrays


def load_tokens(data_dir: str | os.PathLike, split: str = "train") -> np.ndarray:
    """All ids of a split, in order: a memory map when it has one shard (the usual case)."""
    meta, arrays = _split_shards(data_dir, split)
    if len(arrays) == 1:
        return arrays[0]
    if not arrays:
        return np.empty(0, dtype=np.dtype(meta["dtype"]))
    return np.concatenate(arrays)

# ------------------------------------------------------------------- batches


class GlobalOrder:
    """Which items each process takes, from one global sequence of items: gpt2lab's one data order.

    The items 0..n-1 are visited epoch after epoch, each epoch in a permutation drawn from (seed,
    epoch) (or in order, `shuffle=False`). Every call of `next_indices` is one micro-batch on every
    process: it takes the next batch_size x world_size items of the sequence, and rank r gets its
    slice [r * batch_size, (r + 1) * batch_size). The order is thus a function of the seed and the
    position, never of the rank: one process and N processes with the same total batch see the same
    items in every optimizer step, and the position resumes on any number of processes.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if n < 1:
            raise ValueError("an order needs at least one item")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.position = 0  # items taken by all ranks together, over all epochs
        self._perm_epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        return self.position // self.n

    @property
    def steps_per_epoch(self) -> int:
        """Calls of next_indices in one pass over the items (the last may wrap into the next epoch)."""
        return max(1, -(-self.n // (self.batch_size * self.world_size)))

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        return self._perm

    def next_indices(self) -> np.ndarray:
        first = self.position + self.rank * self.batch_size
        self.position += self.batch_size * self.world_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for b in range(self.batch_size):
            epoch, i = divmod(first + b, self.n)
            order = self._order(epoch)
            out[b] = i if order is None else order[i]
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "items": self.n, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict, what: str = "data") -> None:
        if "position" not in state:
            raise UserError("the checkpoint's data position was written by an older gpt2lab (its random "
                            "order depended on the number of processes); start a new run with --init-from it")
        items = state.get("items", state.get("windows", state.get("examples", self.n)))
        if items != self.n:
            raise UserError(f"the checkpoint was made with {items} training items, the {what} given has {self.n}; "
                            "resume with the run's own data and settings")
        self.position = int(state["position"])


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
        self.meta, self.shards = _split_shards(data_dir, split)
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
    positions = idx - first
    doc = starts.cumsum(dim=1)  # which document of its row a token belongs to
    causal = idx[None, :] <= idx[:, None]
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return positions, mask[:, None]


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


__all__ = [
    "HEADER_BYTES", "MAGIC", "GlobalOrder", "SlidingWindowDataset", "TokenLoader", "check_tokenizer",
    "data_tokenizer", "document_inputs",
    "dtype_for_vocab", "load_tokens", "open_shard", "read_meta", "shard_header",
]
