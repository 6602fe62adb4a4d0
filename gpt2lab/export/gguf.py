"""A run dir -> one GGUF file that llama.cpp, Ollama and LM Studio load, written with the `gguf` package
(llama.cpp's own reader and writer).

    gpt2lab export-gguf runs/mine --out mine.gguf --type q8_0 --ollama

A GGUF file is a header of typed key/value metadata followed by named tensors. The metadata says which of
llama.cpp's graphs computes the model (`general.architecture`) and gives that graph its sizes under the
architecture's prefix (`gpt2.block_count`, `qwen3.attention.head_count_kv`, ...), then the tokenizer
itself: every token's text, its type, the merges and the pre-tokeniser's name, so a GGUF needs no other
file. Tensor names are llama.cpp's (`blk.0.attn_qkv.weight`), with shapes in (rows, columns) order.

Three of llama.cpp's graphs compute what gpt2lab trains (export/llama.py's `family` decides):

    gpt2    GPT-2 itself: learned positions, LayerNorm, GELU, one fused q|k|v matrix, tied head
    llama   rotary positions, RMSNorm, SwiGLU, any number of key/value heads, tied or untied head
    qwen3   llama with RMSNorm on each head's queries and keys before the rotation (--qk-norm)

llama.cpp's Llama graph rotates adjacent pairs of a head (x0, x1), (x2, x3), ...; ours, like Hugging Face's,
rotates the two halves (x_i, x_{i+d/2}). The same model with the rows of the query and key projections
reordered (each head's first half interleaved with its second) gives the same attention, so those rows are
permuted here; the Qwen3 graph rotates halves and takes them as they are.

Types: f32 keeps every weight; f16 and bf16 halve the matrices; q8_0 stores each block of 32 weights of a
row as 32 int8 numbers and one f16 scale (8.5 bits a weight). Vectors (norms, biases) stay f32, as in
llama.cpp's converter, and a matrix whose rows are not a multiple of 32 long falls back to f16 in q8_0.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from gpt2lab import io
from gpt2lab.checkpoint import open_run
from gpt2lab.errors import UserError
from gpt2lab.export.hf import tokenizer_obstacles
from gpt2lab.export.llama import family
from gpt2lab.templates import get_format, jinja_template, ollama_template
from gpt2lab.tokenizer import load_tokenizer_file
from gpt2lab.weights import unique_state_dict

TYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32


def export_gguf(run_dir: str | os.PathLike, out: str | os.PathLike, *, type: str = "f16",
                ollama: bool = False) -> Path:
    """Write the run's model and tokenizer to the GGUF file `out` (and an Ollama Modelfile beside it)."""
    if type not in TYPES:
        raise UserError(f"--type {type!r} is not one of {', '.join(TYPES)}")
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"--out {out} should end in .gguf (llama.cpp, Ollama and LM Studio look for it)")
    modelfile = modelfile_path(out)
    io.check_output_file(out, "gguf", flag="--out", inputs=[run_dir])
    if ollama:
        io.check_output_file(modelfile, "modelfile", flag="--out", inputs=[run_dir])
    info = open_run(run_dir)
    config = info.model_config
    tok = load_tokenizer_file(run_dir / "tokenizer.json", fast=False)
    if info.kind != "lm":
        raise UserError(f"{run_dir} is a {info.kind}; GGUF holds language models (export a classifier with "
                        "export-hf)")
    arch = family(config, gguf=True, also=tokenizer_obstacles(tok))
    model, _ = info.load()  # LoRA adapters merged
    state = {k: v.detach().float().numpy() for k, v in unique_state_dict(model).items()}
    tensors = (gpt2_tensors if arch == "gpt2" else llama_tensors)(state, config)

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(run_dir.resolve().name)
    _add_sizes(writer, arch, config)
    template = jinja_template(info.template)
    _add_tokenizer(writer, tok, config.vocab_size, template)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type])
    for name, array in tensors.items():
        data, qtype = _encode(array, type)
        writer.add_tensor(name, data, raw_dtype=qtype)
    with io.atomic_path(out) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if ollama:
        io.write_text(modelfile, ollama_modelfile(out.name, info.template, tok.eot_id is not None,
                                                  config.block_size))
    return out


def modelfile_path(gguf_path: Path) -> Path:
    return gguf_path.with_suffix(".Modelfile")


def ollama_modelfile(gguf_name: str, template: str | None, has_eot: bool, context: int) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` (beside it): the chat format's template and stops."""
    stops = (["<|endoftext|>"] if has_eot else []) + list(get_format(template).stop)
    lines = [MODELFILE_HEADER, f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template(template)}"""',
             f"PARAMETER num_ctx {context}"]
    lines += [f"PARAMETER stop {_go_quote(s)}" for s in stops]
    return "\n".join(lines) + "\n"


MODELFILE_HEADER = "# an Ollama Modelfile written by gpt2lab export-gguf: ollama create NAME -f THIS_FILE"


def _go_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# ------------------------------------------------------------------------------- the metadata


def _add_sizes(writer, arch: str, config) -> None:
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.hidden_size)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
        return
    writer.add_head_count_kv(config.kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer, tok, n_vocab: int, chat_template: str | None) -> None:
    """GPT-2's tokenizer model ("gpt2": byte-level BPE) with its pre-tokeniser ("gpt-2": GPT-2's regex), one
    entry per row of the embedding: ordinary tokens as vocab.json spells them, special tokens as control
    tokens (llama.cpp finds them in text only where asked), ids no token has as unused padding."""
    NORMAL, CONTROL, UNUSED = 1, 3, 5  # llama.cpp's token types
    names = {i: t for t, i in tok.vocab.items()}
    special = {i: t for t, i in tok.special_tokens.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in special:
            tokens.append(special[i]), types.append(CONTROL)
        elif i in names:
            tokens.append(names[i]), types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]"), types.append(UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    if tok.eot_id is not None:
        writer.add_bos_token_id(tok.eot_id)
        writer.add_eos_token_id(tok.eot_id)
    writer.add_add_bos_token(False)  # GPT-2 starts from the text itself
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def _encode(array: np.ndarray, type: str):
    """(data, ggml type) of one tensor in the file's type; vectors stay f32."""
    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or type == "f32":
        return array.astype(np.float32), Q.F32
    if type == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(array.astype(np.float32), Q.Q8_0), Q.Q8_0
    if type == "bf16":
        return gguf.quants.quantize(array.astype(np.float32), Q.BF16), Q.BF16
    return array.astype(np.float16), Q.F16


# ------------------------------------------------------------------------------- the tensors


def gpt2_tensors(state: dict, config) -> dict[str, np.ndarray]:
    """Our GPT-2 tensors under llama.cpp's names; a model without biases gets biases of zero."""
    V = config.vocab_size
    out = {"token_embd.weight": state["transformer.wte.weight"][:V],
           "position_embd.weight": state["transformer.wpe.weight"]}
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(config.n_layer):
        for ours, theirs in names.items():
            weight = state[f"transformer.h.{i}.{ours}.weight"]
            out[f"blk.{i}.{theirs}.weight"] = weight
            out[f"blk.{i}.{theirs}.bias"] = state.get(f"transformer.h.{i}.{ours}.bias",
                                                      np.zeros(weight.shape[0], np.float32))
    out["output_norm.weight"] = state["transformer.ln_f.weight"]
    out["output_norm.bias"] = state.get("transformer.ln_f.bias", np.zeros(config.n_embd, np.float32))
    return out


def interleave_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from halves (x_i, x_{i+d/2}) to adjacent pairs (x_2i, x_2i+1): the
    projection then feeds llama.cpp's pairwise rotation what ours feeds the rotate-half one."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama_tensors(state: dict, config) -> dict[str, np.ndarray]:
    """A Llama-shaped model (or Qwen3-shaped, with QK-norm) under llama.cpp's names."""
    H, Hkv, D, F, V = config.n_head, config.kv_heads, config.head_dim, config.hidden_size, config.vocab_size
    qwen3 = config.qk_norm
    out = {"token_embd.weight": state["transformer.wte.weight"][:V],
           "output_norm.weight": state["transformer.ln_f.weight"]}
    if not config.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"][:V]
    for i in range(config.n_layer):
        ours, blk = f"transformer.h.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = state[ours + "ln_1.weight"]
        out[blk + "ffn_norm.weight"] = state[ours + "ln_2.weight"]
        if qwen3:
            out[blk + "attn_q_norm.weight"] = state[ours + "attn.q_norm.weight"]
            out[blk + "attn_k_norm.weight"] = state[ours + "attn.k_norm.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            qkv = state[f"{ours}attn.c_attn.{kind}"]
            q, k, v = np.split(qkv, [H * D, (H + Hkv) * D], axis=0)
            if not qwen3:
                q, k = interleave_rotary(q, H), interleave_rotary(k, Hkv)
            out[f"{blk}attn_q.{kind}"], out[f"{blk}attn_k.{kind}"], out[f"{blk}attn_v.{kind}"] = q, k, v
            out[f"{blk}attn_output.{kind}"] = state[f"{ours}attn.c_proj.{kind}"]
            gate, up = np.split(state[f"{ours}mlp.c_fc.{kind}"], [F], axis=0)
            out[f"{blk}ffn_gate.{kind}"], out[f"{blk}ffn_up.{kind}"] = gate, up
            out[f"{blk}ffn_down.{kind}"] = state[f"{ours}mlp.c_proj.{kind}"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
