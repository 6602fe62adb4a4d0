"""gpt2lab's one data order: which items each process takes, as a function of the seed and the global
position only, so that one process and N processes see the same items in every optimizer step and a run
resumes on any number of processes."""

from __future__ import annotations

import numpy as np

from gpt2lab.errors import UserError


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
