"""The model: GPT-2 exactly, and the options of newer models, as one forward pass.

    config.py   GPTConfig: every architecture field, GPT-2's value as each default; presets (torch-free)
    gpt.py      GPT-2 top to bottom: attention, MLP, block, transformer, LM head, classifier head
    options.py  what newer models add: RMSNorm, rotary positions (YaRN), latent attention, experts
    cache.py    the KV cache: it stores keys and values and owns its row operations
    lora.py     low-rank adapters on the linear layers

`from gpt2lab.model import GPT, GPTConfig` works; the names load their module on first use, so that
reading the config (the command line's flags and help) never imports torch.
"""

import importlib

_EXPORTS = {
    "GPTConfig": "config", "PRESETS": "config", "model_fields": "config", "derive": "config",
    "GPT": "gpt", "GPTClassifier": "gpt", "Transformer": "gpt", "Block": "gpt", "MLP": "gpt",
    "CausalSelfAttention": "gpt",
    "KVCache": "cache",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt2lab.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gpt2lab.model.{module}"), name)


__all__ = sorted(_EXPORTS)
