"""GPT-2 in Hugging Face's terms: the mapping between transformers' `GPT2LMHeadModel` (its tensors and its
config.json) and gpt2lab's model, used by import-hf and export-hf (hf.py).

Transposes. OpenAI wrote GPT-2 in TensorFlow and implemented every linear layer as a 1x1 convolution
("conv1d"): the weight is stored (in, out) and the layer computes x @ W + b. Hugging Face kept that layout
(its `Conv1D` module). `nn.Linear` stores the weight (out, in) and computes x @ W.T + b. So the four
matrices of each block, attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj, are transposed on the way in
and again on the way out; the embeddings and LayerNorm parameters are used the same way by both.

Buffers that are not weights. Checkpoints saved by older transformers carry `h.N.attn.bias`, which
despite its name is no bias: it is the causal mask, kept as a buffer so that it moves to the GPU with the
model. `h.N.attn.masked_bias` is the large negative number written into the masked attention scores.
Neither was learned; our attention builds the causal mask itself, so both are dropped.

Every config.json field that changes what the network computes is checked: a field this model cannot
follow (a different activation or LayerNorm epsilon, attention scaled by layer index, cross-attention,
an untied head, ...) is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import re

import torch

from gpt2lab.errors import UserError
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT

# the Conv1D weights, stored (in, out) by Hugging Face and (out, in) by nn.Linear
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the causal-mask buffers of older checkpoints (not learned, not needed)
MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


# config.json fields that change what the network computes, with Hugging Face's default
# (a field that is absent has its default) and the values our model computes
_FIXED = {
    "activation_function": ("gelu_new", ("gelu_new", "gelu_pytorch_tanh"),
                            "uses GELU with the tanh approximation"),
    "layer_norm_epsilon": (1e-5, (1e-5,), "uses LayerNorm epsilon 1e-5"),
    "scale_attn_weights": (True, (True,), "scales attention scores by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, (False,), "does not scale attention by layer index"),
    "reorder_and_upcast_attn": (False, (False,), "does not reorder or upcast attention"),
    "add_cross_attention": (False, (False,), "has no cross-attention"),
    "tie_word_embeddings": (True, (True,), "ties the LM head to the token embedding"),
}
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


# ------------------------------------------------------------------- the state-dict mapping


def hf_to_gpt2lab(state_dict: dict) -> dict:
    """Hugging Face GPT-2 tensors -> ours: Conv1D weights transposed, mask buffers and tied head dropped.

    Accepts names with or without the `transformer.` prefix. A `lm_head.weight`
    that differs from `wte.weight` (an untied head) is a `UserError`.
    """
    out = {}
    for name, tensor in state_dict.items():
        if MASK_BUFFER.search(name):
            continue
        key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        out[key] = tensor.t().contiguous() if key.endswith(CONV1D) and tensor.dim() == 2 else tensor
    head = out.pop("lm_head.weight", None)
    if head is not None:
        wte = out.get("transformer.wte.weight")
        if wte is None or head.shape != wte.shape or not torch.equal(head, wte):
            raise UserError("lm_head.weight differs from the token embedding wte.weight: an untied output "
                            "head is not GPT-2's, and gpt2lab's model cannot hold it")
    return out


def gpt2lab_to_hf(state_dict: dict) -> dict:
    """Ours -> Hugging Face's `GPT2LMHeadModel` names: Conv1D weights transposed, the tied head left out."""
    return {name: (t.t().contiguous() if name.endswith(CONV1D) else t)
            for name, t in state_dict.items() if name != "lm_head.weight"}


def hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """The tensors a Hugging Face GPT-2 of this size holds (with biases, unpadded vocabulary)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = GPT(dataclasses.replace(config, bias=True, pad_vocab_multiple=1))
    return {name: tuple(reversed(t.shape)) if name.endswith(CONV1D) else tuple(t.shape)
            for name, t in model.state_dict().items() if name != "lm_head.weight"}


# ------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, where: str = "config.json"):
    """A `GPTConfig` from a Hugging Face GPT-2 config.json; unsupported settings are a UserError."""
    cannot = "gpt2lab cannot import this checkpoint (transformers can load it)"
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where}: model_type is {hf['model_type']!r}, not 'gpt2'; gpt2lab imports "
                        "GPT-2 checkpoints only")
    for field, (default, allowed, what) in _FIXED.items():
        value = hf.get(field, default)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise UserError(f"{where}: {field}={json.dumps(value)} is not supported: gpt2lab's GPT-2 "
                            f"{what} ({field}={json.dumps(allowed[0])}); {cannot}")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"{where}: n_inner={hf['n_inner']} is not supported: gpt2lab's GPT-2 has an MLP "
                        f"of 4 * n_embd = {4 * n_embd} units; {cannot}")
    dropouts = {name: hf.get(name, 0.1) for name in _DROPOUTS}
    if len(set(dropouts.values())) != 1:
        raise UserError(f"{where}: the dropouts differ ({dropouts}); gpt2lab's GPT-2 has one dropout "
                        "rate: set the three to one value in config.json (dropout does not change the "
                        "weights) and import again")

    try:
        return GPTConfig(
            vocab_size=hf.get("vocab_size", 50257),
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            dropout=float(dropouts["resid_pdrop"]),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid GPT-2 config ({e}); the file is damaged") from None


def config_to_hf(config, eot_id: int, dtype: str = "float32") -> dict:
    """The config.json of `GPT2LMHeadModel` for a model of this config."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # the older name, which llama.cpp's converter reads
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype,
    }


def option_flag(name: str, value) -> str:
    """The pretrain flag that sets a model option: --qk-norm, --no-tie-embeddings, --mlp relu2."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def gpt2_obstacles(config) -> list[str]:
    """Every option of this config that GPT-2's config.json cannot express (empty: it is GPT-2)."""
    gpt2 = GPTConfig()
    out = [option_flag(name, getattr(config, name))
           for name in ("pos_embedding", "norm", "qk_norm", "mlp", "tie_embeddings", "n_experts", "attention")
           if getattr(config, name) != getattr(gpt2, name)]
    if config.kv_heads != config.n_head:
        out.append(f"--n-kv-head {config.n_kv_head}")
    if config.hidden_size != 4 * config.n_embd:
        out.append(f"--mlp-hidden {config.mlp_hidden}")
    return out


def fold_score_bias(state: dict, labels: list[str]):
    """(score weight, ln_f bias) for transformers' classifier head, which has no bias.

    Ours computes W ln_f(x) + b with ln_f(x) = g * n(x) + beta. W (beta + d) = W beta + b holds when
    W d = b; with fewer classes than the width, W has full row rank and d = W^+ b solves it exactly, so
    moving d into the final LayerNorm's bias gives the same logits without a head bias.
    """
    W, b = state["score.weight"].double(), state["score.bias"].double()
    beta = state.get("transformer.ln_f.bias")
    beta = beta.double() if beta is not None else torch.zeros(W.size(1), dtype=torch.float64)
    d = torch.linalg.lstsq(W, b[:, None]).solution[:, 0]
    if (W @ d - b).abs().max() > 1e-6 * (1 + b.abs().max()):
        raise UserError(f"the classifier's head (for {len(labels)} classes) cannot be expressed without a bias in "
                        "transformers' GPT2ForSequenceClassification; it cannot be exported")
    return state["score.weight"].contiguous(), (beta + d).float()




def check_tensors(state: dict, expected: dict, file: str, config_name: str, config) -> None:
    """Every tensor the config implies is there, with its shape, and nothing else."""
    sizes = f"n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size}"
    names = {}
    for name in state:
        if not MASK_BUFFER.search(name):
            key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
            names[key] = name
    names.pop("lm_head.weight", None)  # tied: checked against wte when mapped
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(names[k] for k in set(names) - set(expected))
    if missing or unexpected:
        def some(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        parts = ([f"lacks {some(missing)}"] if missing else []) + (
            [f"has {some(unexpected)}, which GPT-2 has no place for"] if unexpected else [])
        raise UserError(f"{file} does not fit a GPT-2 of {config_name} ({sizes}): it {' and '.join(parts)}; "
                        "the weights and the config come from different models")
    for key, shape in expected.items():
        found = tuple(state[names[key]].shape)
        if found != tuple(shape):
            raise UserError(f"{file}: tensor {names[key]} has shape {found}, but {config_name} ({sizes}) "
                            f"implies {tuple(shape)}; the weights and the config come from different models")
