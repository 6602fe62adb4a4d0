"""A compiled decoding step: the model's own forward, one token per row, compiled once for a cache whose
shapes never change (model/cache.py's StaticKVCache), so it is not compiled again as the cache fills.

On CUDA the step is compiled with CUDA graphs (torch.compile's "reduce-overhead"): a decoding step of a
small model is mostly kernel launches, and a graph replays them all at once. On the CPU inductor's C++
code runs the step; there it is not faster here (bench/generate.py measures it: every step attends over
all the cache's slots, and the eager step has little overhead to remove), so `--compile` is off by
default on the CPU and on by default on CUDA.

    step = compiled_step(model)          # one per (model, batch size, length); kept on the model
    logits = step.prefill(ids)           # eager: the prompt into the cache
    logits = step.decode(token)          # compiled: one token per row
"""

from __future__ import annotations

import torch

from gpt2lab.model.cache import StaticKVCache
from gpt2lab.model.gpt import GPT


class CompiledStep:
    def __init__(self, model: GPT, batch_size: int, max_len: int):
        device = model.transformer.wte.weight.device
        self.model, self.max_len = model, max_len
        self.cache = StaticKVCache(model.config, batch_size, max_len, device, model.transformer.wte.weight.dtype)
        mode = "reduce-overhead" if device.type == "cuda" else "default"

        def step(ids: torch.Tensor) -> torch.Tensor:
            return model(ids, kv_cache=self.cache, last_only=True)[:, -1]

        self._step = torch.compile(step, mode=mode, dynamic=False)

    @property
    def length(self) -> int:
        return self.cache.pos

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The whole window (B, T) into an empty cache; the logits of its last position."""
        self.cache.reset()
        logits = self.model(ids, kv_cache=self.cache, last_only=True)[:, -1]
        self.cache.position += ids.size(1)
        return logits

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per row (B, 1) after the cached ones; their logits (B, V)."""
        if self.cache.pos >= self.max_len:
            raise ValueError(f"the compiled step's cache holds {self.max_len} positions, all used")
        logits = self._step(ids).clone()  # (a CUDA graph's output is overwritten by its next replay)
        self.cache.position += 1
        return logits


def compiled_step(model: GPT, batch_size: int = 1, max_len: int | None = None) -> CompiledStep:
    """The model's compiled step for this batch size and cache length, made once and kept on the model."""
    max_len = max_len or model.config.block_size
    steps = model.__dict__.setdefault("_compiled_steps", {})
    key = (batch_size, max_len, model.transformer.wte.weight.dtype, model.transformer.wte.weight.device)
    if key not in steps:
        steps[key] = CompiledStep(model, batch_size, max_len)
    return steps[key]
