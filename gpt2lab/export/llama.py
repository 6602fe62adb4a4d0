"""A Llama-shaped gpt2lab model out to Hugging Face's `LlamaForCausalLM` or, with QK-norm, `Qwen3ForCausalLM`;
and the one place that says which architecture a run exports as (`family`).

A config with rotary positions, RMSNorm and a gated MLP (any number of key/value heads, with or without
biases, tied or untied head, plain RoPE or YaRN) is Llama's architecture; normalising queries and keys per
head before the rotation is what Qwen3 adds. So transformers, vLLM and llama.cpp's converters load it.
The mapping:

    transformer.wte.weight               model.embed_tokens.weight (padded rows trimmed)
    h.i.ln_1.weight                      model.layers.i.input_layernorm.weight
    h.i.attn.c_attn.weight (q | k | v)   self_attn.q_proj / k_proj / v_proj (split by rows)
    h.i.attn.q_norm / k_norm             self_attn.q_norm / k_norm (Qwen3)
    h.i.attn.c_proj.weight               self_attn.o_proj.weight
    h.i.ln_2.weight                      model.layers.i.post_attention_layernorm.weight
    h.i.mlp.c_fc.weight (gate | value)   mlp.gate_proj / up_proj (split by rows)
    h.i.mlp.c_proj.weight                mlp.down_proj.weight
    transformer.ln_f.weight              model.norm.weight
    lm_head.weight                       lm_head.weight (absent when tied)

ReLU² is a gated MLP too: relu(a)² = relu(a) * a, so `hidden_act: relu` with gate_proj and up_proj both
holding c_fc computes it exactly (at the cost of storing that matrix twice). llama.cpp's Llama and Qwen3
graphs fix SiLU as the gate's function, so GGUF cannot take that trick.

Both sides use the rotate-half convention for rotary positions over a head's two halves, so no permutation
of the query and key rows is needed here (gguf.py permutes them for llama.cpp's Llama graph).
"""

from __future__ import annotations

from gpt2lab.errors import UserError
from gpt2lab.export.gpt2 import gpt2_obstacles, option_flag

# what Llama's architecture fixes (the MLP: swiglu, or relu2 through the gate for transformers)
LLAMA = {"pos_embedding": "rope", "norm": "rmsnorm", "attention": "mha", "n_experts": 0}


def llama_obstacles(config, gguf: bool = False) -> list[str]:
    """Every option of this config that Llama/Qwen3 cannot express (in transformers, or in llama.cpp)."""
    out = []
    for name, want in LLAMA.items():
        have = getattr(config, name)
        if have != want:
            out.append(f"{option_flag(name, have)} (Llama has {want})")
    mlps = ("swiglu",) if gguf else ("swiglu", "relu2")
    if config.mlp not in mlps:
        out.append(f"--mlp {config.mlp} (Llama{' in llama.cpp' if gguf else ''} has {' or '.join(mlps)})")
    if config.qk_norm and config.bias:
        out.append("--qk-norm with --bias (Qwen3's MLP has no biases: add --no-bias)")
    if gguf and config.rope_scaling != "none":
        out.append(f"--rope-scaling {config.rope_scaling} (not written to GGUF; export without it and pass "
                   "llama.cpp its --rope-scaling flags)")
    return out


def family(config, gguf: bool = False, also: list[str] = (), classifier: bool = False) -> str:
    """"gpt2", "llama" or "qwen3": the architecture this model exports as. A model that fits none, or has
    `also` (the tokenizer's obstacles), is a UserError naming every option in the way of the nearest one."""
    gpt2 = gpt2_obstacles(config)
    llama = ["a classifier head (transformers has GPT-2's only)"] if classifier else llama_obstacles(config, gguf)
    arch = "gpt2" if not gpt2 else ("qwen3" if config.qk_norm else "llama") if not llama else None
    if arch and not also:
        return arch
    where = "GGUF (llama.cpp)" if gguf else "transformers"
    problems = list(also)
    if arch is None:
        problems.insert(0, f"it is neither GPT-2 (it has {', '.join(gpt2)}) nor Llama/Qwen3 (it has "
                           f"{', '.join(llama)})")
    raise UserError(f"{where} cannot express this model: {'; '.join(problems)}; train with what they have to "
                    "export it")


def config_to_llama(config, eot_id: int, dtype: str = "float32") -> dict:
    """The config.json of `LlamaForCausalLM` (or `Qwen3ForCausalLM`) for a model of this config."""
    rope_scaling = None
    if config.rope_scaling == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": float(config.rope_factor),
                        "original_max_position_embeddings": config.original_context, "beta_fast": 32.0,
                        "beta_slow": 1.0}
    qwen3 = config.qk_norm
    return {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
        "model_type": "qwen3" if qwen3 else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "hidden_act": "relu" if config.mlp == "relu2" else "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": float(config.rope_theta),
        "rope_scaling": rope_scaling,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": dtype,
    }


def gpt2lab_to_llama(state: dict, config) -> dict:
    """Our tensors (unique_state_dict of a Llama-shaped GPT) -> LlamaForCausalLM's (Qwen3's) names."""
    H, Hkv, D, F = config.n_head, config.kv_heads, config.head_dim, config.hidden_size
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"][: config.vocab_size],
           "model.norm.weight": state["transformer.ln_f.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size]
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ln_2.weight"]
        if config.qk_norm:
            out[theirs + "self_attn.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
            out[theirs + "self_attn.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = state[f"{ours}attn.c_attn.{kind}"].split([H * D, Hkv * D, Hkv * D], dim=0)
            out[f"{theirs}self_attn.q_proj.{kind}"] = q
            out[f"{theirs}self_attn.k_proj.{kind}"] = k
            out[f"{theirs}self_attn.v_proj.{kind}"] = v
            out[f"{theirs}self_attn.o_proj.{kind}"] = state[f"{ours}attn.c_proj.{kind}"]
            fc = state[f"{ours}mlp.c_fc.{kind}"]
            gate, up = fc.split([F, F], dim=0) if config.mlp == "swiglu" else (fc, fc)
            out[f"{theirs}mlp.gate_proj.{kind}"] = gate
            out[f"{theirs}mlp.up_proj.{kind}"] = up.clone()  # two names, two tensors (safetensors refuses
            out[f"{theirs}mlp.down_proj.{kind}"] = state[f"{ours}mlp.c_proj.{kind}"]  # shared storage)
    return {k: v.contiguous() for k, v in out.items()}
