"""Hugging Face GPT-2 checkpoints in and out of gpt2lab run directories.

    gpt2lab import-hf gpt2 --out runs/gpt2          OpenAI's 124M weights -> a run dir
    gpt2lab export-hf runs/mine --out hf/mine       a run dir -> transformers, vLLM, lm-eval

A Hugging Face GPT-2 directory holds `config.json` (the sizes), the weights
(`model.safetensors`, or the older pickle `pytorch_model.bin`) and the
tokenizer (`vocab.json` + `merges.txt`, and/or the `tokenizers` library's
`tokenizer.json`). Our model (model.py) uses the same parameter names, so
moving between the two is mostly bookkeeping. Three things need care:

Transposes. OpenAI wrote GPT-2 in TensorFlow and implemented every linear
layer as a 1x1 convolution ("conv1d"): the weight is stored (in, out) and the
layer computes x @ W + b. Hugging Face kept that layout (its `Conv1D`
module). `nn.Linear` stores the weight (out, in) and computes x @ W.T + b.
So the four matrices of each block, attn.c_attn, attn.c_proj, mlp.c_fc and
mlp.c_proj, are transposed on the way in and again on the way out; the
embeddings and LayerNorm parameters are used the same way by both and are
copied as they are.

Buffers that are not weights. Checkpoints saved by older transformers carry
`h.N.attn.bias`, which despite its name is no bias: it is the causal mask, a
lower-triangular (1, 1, 1024, 1024) matrix of ones, kept as a buffer so that
it moves to the GPU with the model. `h.N.attn.masked_bias` is the large
negative number (-1e4) written into the masked attention scores. Neither was
learned; our attention builds the causal mask itself (`is_causal=True`), so
both are dropped.

The LM head. GPT-2 reuses the token embedding `wte` as its output layer, so
`lm_head.weight` is the same matrix; checkpoints usually leave it out (ours
do too). One that holds a different matrix is an untied model, which is not
GPT-2, and is refused. OpenAI's files on the hub were saved from the bare
transformer (`GPT2Model`): their names start at `h.0...` and `wte.weight`; a
`GPT2LMHeadModel` saved by transformers writes `transformer.h.0...`. Both are
read.

Every config.json field that changes what the network computes is checked:
a field this model cannot follow (a different activation or LayerNorm
epsilon, attention scaled by layer index, cross-attention, an untied head,
...) is an error, never silently ignored. Every tensor's shape is checked
against the config, and a mismatch names the tensor.

Safety: weights are read with safetensors, or with `torch.load(...,
weights_only=True)`, which unpickles tensors and plain containers only, so a
checkpoint from a stranger cannot run code on this machine.

The run directory an import writes is an ordinary one (checkpoint.py): the
weights in float32, GPT-2's tokenizer (or the directory's own, when its
vocab.json/merges.txt or tokenizer.json differ from GPT-2's), and a config.json
whose "source" records where the model came from and the sha256 of its
weight files.

Export writes what `transformers.GPT2LMHeadModel.from_pretrained` and
`AutoTokenizer.from_pretrained` read. Two of our options have no field in
GPT-2's config, and both are written in a form that computes exactly the same
logits: a padded vocabulary (`pad_vocab_multiple`) is trimmed to its
`vocab_size` rows (the extra rows are never predicted), and a model without
biases (`bias=False`) gets biases of zero. Tokenizers must use GPT-2's
pre-tokenisation regex and hold `<|endoftext|>`, which becomes the bos, eos
and unk token; any other tokenizer is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from gpt2lab.errors import UserError
from gpt2lab.tokenizer.bpe import EOT, GPT2_PATTERN, BPETokenizer

# torch (and what imports it) is imported inside the functions that need it, so that
# a missing path or a hub id on an offline machine is reported at once

# the checkpoints OpenAI released, under the names people use and their hub repositories
HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# the Conv1D weights, stored (in, out) by Hugging Face and (out, in) by nn.Linear
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the causal-mask buffers of older checkpoints (not learned, not needed)
_MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
_DOWNLOAD = ["config.json", "generation_config.json", SAFETENSORS, SAFETENSORS_INDEX, "model-*.safetensors",
             "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]

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
    import torch

    out = {}
    for name, tensor in state_dict.items():
        if _MASK_BUFFER.search(name):
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
    import dataclasses

    import torch

    from gpt2lab.model import GPT

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
    from gpt2lab.model import GPTConfig

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


# ------------------------------------------------------------------------------- import


def import_hf(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """A Hugging Face GPT-2 (local directory or hub id) -> a gpt2lab run dir at `out`."""
    out = Path(out)
    _check_out(out, overwrite)
    directory, source = _resolve_source(str(src))
    hf_config = _read_json(directory / "config.json", f"{directory} is not a Hugging Face model directory "
                           "(it has no config.json); pass the directory that holds config.json and "
                           "model.safetensors")
    if hf_config.get("format") == "gpt2lab-run":
        raise UserError(f"{directory} is already a gpt2lab run directory; use it as it is (import-hf reads "
                        "Hugging Face model directories)")
    config = config_from_hf(hf_config, str(directory / "config.json"))
    tokenizer = read_hf_tokenizer(directory, name=source.get("id") or directory.name)
    if tokenizer.vocab_size > config.vocab_size:
        where = "GPT-2's" if tokenizer.name == "gpt2" else f"the one in {directory}"
        raise UserError(f"the tokenizer ({where}) has {tokenizer.vocab_size} tokens but the model's "
                        f"vocab_size is {config.vocab_size}; put the model's own vocab.json and merges.txt "
                        f"(or tokenizer.json) into {directory}")
    state, files = _load_hf_weights(directory)
    where = files[0] if len(files) == 1 else directory / SAFETENSORS_INDEX
    _check_tensors(state, hf_shapes(config), str(where), "config.json", config)
    state = hf_to_gpt2lab(state)
    source["weights"] = {f.name: _sha256(f) for f in files}

    import torch
    from safetensors.torch import save_file

    from gpt2lab.checkpoint import WEIGHTS_FILE, write_run_config

    tensors = {name: t.to(torch.float32).contiguous() for name, t in state.items()}
    with _staging(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save(tmp)
        write_run_config(tmp, config, tokenizer_identity=tokenizer.identity(), extra={"source": source})
        _publish(tmp, out, overwrite)
    return out


def _resolve_source(src: str) -> tuple[Path, dict]:
    path = Path(src).expanduser()
    if path.is_dir():
        return path, {"type": "hf", "path": str(path.resolve())}
    if path.exists():
        raise UserError(f"{src} is a file; pass the directory that holds config.json and the weights")
    if src in HUB_IDS or (_HUB_REPO.fullmatch(src) and not src.startswith((".", "/", "~"))):
        return _download(src)
    raise UserError(f"{src} does not exist; pass a local Hugging Face GPT-2 directory (config.json and "
                    f"model.safetensors) or a hub id ({', '.join(HUB_IDS)})")


def _download(src: str) -> tuple[Path, dict]:
    repo = HUB_IDS.get(src, src)
    local = (f"on a machine that is online run `hf download {repo} --local-dir {repo.split('/')[-1]}`, "
             f"copy that directory here and pass its path: `gpt2lab import-hf ./{repo.split('/')[-1]} "
             "--out RUN_DIR`")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise UserError(f"{src!r} is not a local directory, and fetching it from the Hugging Face hub "
                        f"needs huggingface_hub (pip install 'gpt2lab[hf]'); or {local}") from None
    try:
        path = Path(snapshot_download(repo, allow_patterns=_DOWNLOAD))
        if not any(path.glob("*.safetensors")):  # an older repository: the pickle only
            path = Path(snapshot_download(repo, allow_patterns=_DOWNLOAD + [PICKLE]))
    except Exception as e:  # the hub library raises many types; sort out the ones that are not network
        names = {c.__name__ for c in type(e).__mro__}
        if names & {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}:
            raise UserError(f"{src!r} is not a local directory and the Hugging Face hub has no accessible "
                            f"repository {repo!r}; check the name, or pass a local directory") from None
        why = ("offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE
               else f"this machine is offline or the hub is unreachable ({type(e).__name__})")
        raise UserError(f"{src!r} is not a local directory and cannot be downloaded from the Hugging Face "
                        f"hub: {why}; {local}") from None
    return path, {"type": "hf", "id": repo, "revision": path.name}


def _load_hf_weights(directory: Path) -> tuple[dict, list[Path]]:
    """All tensors of the checkpoint in `directory`, and the files they came from."""
    if (directory / SAFETENSORS).is_file():
        files = [directory / SAFETENSORS]
    elif (directory / SAFETENSORS_INDEX).is_file():
        index = _read_json(directory / SAFETENSORS_INDEX, "the shard index is missing")
        try:
            files = [directory / name for name in sorted(set(index["weight_map"].values()))]
        except (KeyError, AttributeError, TypeError):
            raise UserError(f"{directory / SAFETENSORS_INDEX} has no weight_map; the file is damaged, "
                            "download the model again") from None
    elif (directory / PICKLE).is_file():
        return _load_pickle(directory / PICKLE), [directory / PICKLE]
    else:
        raise UserError(f"{directory} holds no {SAFETENSORS} or {PICKLE}; pass the directory that "
                        "`save_pretrained` wrote, with its weights")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f} cannot be read as safetensors ({str(e).splitlines()[0]}); the file is "
                            "damaged or incomplete, download the model again") from None
    return state, files


def _load_pickle(path: Path) -> dict:
    import torch

    try:
        # weights_only: tensors and plain containers, never an arbitrary object or a function call
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or hostile file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} was refused: it is read with weights_only=True and holds something "
                        f"other than tensors, or is damaged ({first}); get the model as model.safetensors "
                        "from a source you trust") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path} holds {type(state).__name__}, not a state dict of named tensors; pass "
                        "the directory that `save_pretrained` wrote")
    return state


# ----------------------------------------------------------------------------- tokenizers


def read_hf_tokenizer(directory: str | os.PathLike, name: str = "imported") -> BPETokenizer:
    """The tokenizer of a Hugging Face GPT-2 directory; GPT-2's when it has none or the same."""
    from gpt2lab.tokenizer import FastTokenizer, get_tokenizer

    directory = Path(directory)
    gpt2 = get_tokenizer("gpt2", fast=False)
    vocab_file, merges_file, tok_file = (directory / "vocab.json", directory / "merges.txt",
                                         directory / "tokenizer.json")
    settings_file = directory / "tokenizer_config.json"
    settings = _read_json(settings_file, "") if settings_file.is_file() else {}
    if settings.get("add_prefix_space"):
        raise UserError(f"{settings_file} sets add_prefix_space, which GPT-2's "
                        "tokenizer does not do; gpt2lab cannot import this tokenizer")
    # added tokens (<|endoftext|> and any others) are special tokens in gpt2lab
    special = {t["content"]: int(i) for i, t in (settings.get("added_tokens_decoder") or {}).items()}
    if tok_file.is_file():
        vocab, merges, more = _parse_tokenizer_json(tok_file)
        special.update(more)
    elif vocab_file.is_file() and merges_file.is_file():
        vocab = _read_json(vocab_file, "")
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    elif vocab_file.is_file() or merges_file.is_file():
        missing = merges_file if vocab_file.is_file() else vocab_file
        raise UserError(f"{directory} has {'vocab.json' if vocab_file.is_file() else 'merges.txt'} but "
                        f"no {missing.name}; copy both tokenizer files, or neither to use GPT-2's")
    else:
        return gpt2
    if EOT in vocab:
        special.setdefault(EOT, vocab[EOT])
    vocab = {t: i for t, i in vocab.items() if t not in special}
    try:
        if any(len(m) != 2 for m in merges):
            raise ValueError("a merge is not two tokens")
        tok = BPETokenizer(vocab, [tuple(m) for m in merges], special, GPT2_PATTERN, name)
    except (UserError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"the tokenizer files in {directory} are not a byte-level BPE like GPT-2's ({e}); "
                        "gpt2lab cannot import them") from None
    if tok.fingerprint == gpt2.fingerprint:
        return gpt2
    try:
        FastTokenizer(tok)
    except ValueError:
        raise UserError(f"the tokenizer in {directory} numbers its tokens out of merge order (gpt2lab needs "
                        "the token of merge r to have id 256 + r, as GPT-2's does); gpt2lab cannot import "
                        "it") from None
    return tok


def _parse_tokenizer_json(path: Path) -> tuple[dict, list, dict]:
    d = _read_json(path, "")
    model, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
            or pre.get("use_regex") is False or d.get("normalizer") is not None):
        raise UserError(f"{path} is not a GPT-2 style byte-level BPE (model {model.get('type')!r}, "
                        f"pre_tokenizer {pre.get('type')!r}); gpt2lab cannot import this tokenizer")
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    special = {t["content"]: t["id"] for t in d.get("added_tokens", [])}
    return dict(model.get("vocab", {})), merges, special


def hf_tokenizer_files(tok: BPETokenizer, model_max_length: int) -> dict[str, object]:
    """File name -> content of the files transformers' `AutoTokenizer` reads for this tokenizer."""
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    vocab = dict(sorted({**tok.vocab, **tok.special_tokens}.items(), key=lambda kv: kv[1]))
    merges = [f"{a} {b}" for a, b in tok.merges]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in specials]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},  # GPT-2's regex, then bytes -> characters
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    others = [t for t, _ in specials if t != EOT]
    special_map = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if others:
        special_map["additional_special_tokens"] = others
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special_map,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    return {
        "vocab.json": vocab,
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }


# ------------------------------------------------------------------------------- export


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """A gpt2lab run dir -> a directory that transformers loads as `GPT2LMHeadModel` and `AutoTokenizer`."""
    run_dir, out = Path(run_dir), Path(out)
    if out.resolve() == run_dir.resolve():
        raise UserError(f"--out {out} is the run directory itself; choose another directory for the export")
    _check_out(out, overwrite)

    from gpt2lab.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, read_run_config
    from gpt2lab.model import GPTConfig
    from gpt2lab.tokenizer import load_tokenizer_file

    cfg = read_run_config(run_dir)
    try:
        config = GPTConfig.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{run_dir / CONFIG_FILE} has an invalid model config ({e})") from None
    tok = load_tokenizer_file(run_dir / TOKENIZER_FILE, fast=False)
    if tok.pattern != GPT2_PATTERN:
        raise UserError(f"the run's tokenizer splits text with its own regex ({tok.pattern!r}); GPT-2's "
                        "tokenizer files can only express GPT-2's, so this model cannot be exported")
    if tok.eot_id is None:
        raise UserError(f"the run's tokenizer has no {EOT} token, which GPT-2's tokenizer files need as "
                        "bos/eos; retrain the tokenizer with `gpt2lab tokenizer train`")
    if tok.vocab_size > config.vocab_size:
        raise UserError(f"the run's tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{config.vocab_size} rows; the run dir is inconsistent, export another run")

    import torch
    from safetensors.torch import save_file

    from gpt2lab.checkpoint import read_tensors
    from gpt2lab.model import GPT

    weights = run_dir / WEIGHTS_FILE
    state = read_tensors(weights, "the run is incomplete (did training finish?)")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    _check_tensors(state, expected, str(weights), "the run's config.json", config)

    hf = gpt2lab_to_hf(state)
    # a padded vocabulary: its extra rows are never predicted, so the first vocab_size rows are the model
    hf["transformer.wte.weight"] = hf["transformer.wte.weight"][: config.vocab_size].contiguous()
    shapes = hf_shapes(config)
    dtype = hf["transformer.wte.weight"].dtype
    for name, shape in shapes.items():  # bias=False: a bias of zero computes the same thing
        if name not in hf:
            hf[name] = torch.zeros(shape, dtype=dtype)
    assert {k: tuple(v.shape) for k, v in hf.items()} == shapes

    with _staging(out) as tmp:
        save_file(hf, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config_to_hf(config, tok.eot_id, str(dtype).removeprefix("torch.")))
        _write_json(tmp / "generation_config.json", {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id})
        for name, content in hf_tokenizer_files(tok, config.block_size).items():
            if isinstance(content, str):
                (tmp / name).write_text(content, encoding="utf-8")
            else:
                _write_json(tmp / name, content)
        _publish(tmp, out, overwrite)
    return out


# ---------------------------------------------------------------------------- shared bits


def _check_tensors(state: dict, expected: dict, file: str, config_name: str, config) -> None:
    """Every tensor the config implies is there, with its shape, and nothing else."""
    sizes = f"n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size}"
    names = {}
    for name in state:
        if not _MASK_BUFFER.search(name):
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


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty; pass --overwrite to replace it, or "
                        "choose another directory")


class _staging:
    """A temporary directory next to `out`, removed unless it has been published."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory into place in one rename (the old one, if replaced, moves aside first)."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.is_dir():
        _check_out(out, overwrite)  # again: it may have been filled since the start
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _read_json(path: Path, missing: str) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(missing or f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the file is damaged, download it again") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} holds a JSON {type(d).__name__}, not an object; the file is damaged")
    return d


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
