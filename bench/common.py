"""What the benchmark scripts share: naming the machine, and a transformers twin of a model."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_features() -> str:
    """The CPU's bf16 matrix features (what makes bf16 fast on a CPU), from /proc/cpuinfo."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return ", ".join(found) or "no AVX-512 / AMX"


def hf_twin(model):
    """transformers' GPT2LMHeadModel (sdpa attention, no dropout) holding `model`'s weights."""
    import transformers

    from gpt2lab.hf import gpt2lab_to_hf

    c = model.config
    cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                  n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, activation_function="gelu_new")
    try:
        hf = transformers.GPT2LMHeadModel(cfg, attn_implementation="sdpa")
    except TypeError:
        hf = transformers.GPT2LMHeadModel(cfg)
    missing, unexpected = hf.load_state_dict(gpt2lab_to_hf(model.state_dict()), strict=False)
    # the causal-mask buffers are rebuilt by transformers; the LM head is tied to wte
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers' GPT-2: missing {missing}, "
                           f"unexpected {unexpected}")
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("transformers' LM head is not tied to its token embedding")
    return hf.eval()
