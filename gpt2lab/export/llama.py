"""A Llama-shaped gpt2lab model out to Hugging Face's `LlamaForCausalLM`.

A config with rotary positions, RMSNorm and a SwiGLU MLP (any number of key/value heads, with or
without biases, tied or untied head, plain RoPE or YaRN) is exactly Llama's architecture, so
transformers, vLLM and llama.cpp's converters can load it. The mapping:

    transformer.wte.weight               model.embed_tokens.weight (padded rows trimmed)
    h.i.ln_1.weight                      model.layers.i.input_layernorm.weight
    h.i.attn.c_attn.weight (q | k | v)   self_attn.q_proj / k_proj / v_proj (split by rows)
    h.i.attn.c_proj.weight               self_attn.o_proj.weight
    h.i.ln_2.weight                      model.layers.i.post_attention_layernorm.weight
    h.i.mlp.c_fc.weight (gate | value)   mlp.gate_proj / up_proj (split by rows)
    h.i.mlp.c_proj.weight                mlp.down_proj.weight
    transformer.ln_f.weight              model.norm.weight
    lm_head.weight                       lm_head.weight (absent when tied)

Both use the rotate-half convention for rotary positions over a head's two halves, so no
permutation of the query and key rows is needed.
"""

from __future__ import annotations

from gpt2lab.errors import UserError

LLAMA = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "attention": "mha", "qk_norm": False,
         "n_experts": 0}


def is_llama(config) -> bool:
    return all(getattr(config, k) == v for k, v in LLAMA.items())


def llama_obstacle(config) -> str | None:
    """Why this config is not Llama's (the first option that differs), or None."""
    for name, want in LLAMA.items():
        have = getattr(config, name)
        if have != want:
            return f"--{name.replace('_', '-')} {str(have).lower()} (Llama has {str(want).lower()})"
    return None


def config_to_llama(config, eot_id: int, dtype: str = "float32") -> dict:
    """The config.json of `LlamaForCausalLM` for a model of this config."""
    rope_scaling = None
    if config.rope_scaling == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": float(config.rope_factor),
                        "original_max_position_embeddings": config.original_context, "beta_fast": 32.0,
                        "beta_slow": 1.0}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": float(config.rope_theta),
        "rope_scaling": rope_scaling,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype,
    }


def gpt2lab_to_llama(state: dict, config) -> dict:
    """Our tensors (unique_state_dict of a Llama-shaped GPT) -> LlamaForCausalLM's names."""
    H, Hkv, D, F = config.n_head, config.kv_heads, config.head_dim, config.hidden_size
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"][: config.vocab_size],
           "model.norm.weight": state["transformer.ln_f.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size]
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ln_2.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = state[f"{ours}attn.c_attn.{kind}"].split([H * D, Hkv * D, Hkv * D], dim=0)
            out[f"{theirs}self_attn.q_proj.{kind}"] = q
            out[f"{theirs}self_attn.k_proj.{kind}"] = k
            out[f"{theirs}self_attn.v_proj.{kind}"] = v
            out[f"{theirs}self_attn.o_proj.{kind}"] = state[f"{ours}attn.c_proj.{kind}"]
            gate, up = state[f"{ours}mlp.c_fc.{kind}"].split([F, F], dim=0)
            out[f"{theirs}mlp.gate_proj.{kind}"] = gate
            out[f"{theirs}mlp.up_proj.{kind}"] = up
            out[f"{theirs}mlp.down_proj.{kind}"] = state[f"{ours}mlp.c_proj.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def check_llama(config) -> None:
    obstacle = llama_obstacle(config)
    if obstacle is not None:
        raise UserError(f"this model is neither GPT-2's nor Llama's architecture: {obstacle}; transformers has no "
                        "class that computes it, so it cannot be exported")
