"""Hugging Face GPT-2 checkpoints in and out of gpt2lab run directories.

    gpt2lab import-hf gpt2 --out runs/gpt2          OpenAI's 124M weights -> a run dir
    gpt2lab export-hf runs/mine --out hf/mine       a run dir -> transformers, vLLM, lm-eval

A Hugging Face GPT-2 directory holds `config.json` (the sizes), the weights
(`model.safetensors`, or the older pickle `pytorch_model.bin`) and the
tokenizer (`vocab.json` + `merges.txt`, and/or the `tokenizers` library's
`tokenizer.json`). Our model (model/gpt.py) uses the same parameter names, so
moving between the two is mostly bookkeeping.

The tensor names and config fields are mapped by gpt2.py (transposes of the Conv1D weights, the
causal-mask buffers dropped); what needs care here:

The LM head. GPT-2 reuses the token embedding `wte` as its output layer, so
`lm_head.weight` is the same matrix; checkpoints usually leave it out (ours
do too). One that holds a different matrix is an untied model, which is not
GPT-2, and is refused. OpenAI's files on the hub were saved from the bare
transformer (`GPT2Model`): their names start at `h.0...` and `wte.weight`; a
`GPT2LMHeadModel` saved by transformers writes `transformer.h.0...`. Both are
read.

Every tensor's shape is checked against the config before it is read, and a
mismatch names the tensor.

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
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from gpt2lab import io
from gpt2lab.checkpoint import WEIGHTS_FILE, open_run, write_run_config
from gpt2lab.errors import UserError
from gpt2lab.export.gpt2 import (
    check_tensors,
    config_from_hf,
    config_to_hf,
    fold_score_bias,
    gpt2lab_to_hf,
    hf_shapes,
    hf_to_gpt2lab,
)
from gpt2lab.export.llama import config_to_llama, family, gpt2lab_to_llama
from gpt2lab.templates import jinja_template
from gpt2lab.tokenizer import load_tokenizer_file
from gpt2lab.tokenizer.bpe import EOT, GPT2_PATTERN
from gpt2lab.tokenizer.hf import hf_tokenizer_files, read_hf_tokenizer
from gpt2lab.weights import load_pickle, save_tensors, unique_state_dict

# the checkpoints OpenAI released, under the names people use and their hub repositories
HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
_HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
_DOWNLOAD = ["config.json", "generation_config.json", SAFETENSORS, SAFETENSORS_INDEX, "model-*.safetensors",
             "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]

# ------------------------------------------------------------------------------- import


def import_hf(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """A Hugging Face GPT-2 (local directory or hub id) -> a gpt2lab run dir at `out`."""
    out = Path(out)
    local = Path(src).expanduser()
    io.check_output_dir(out, "run", overwrite=overwrite, flag="--out", inputs=[local] if local.exists() else [])
    if io.dir_kind(out) == "run" and open_run(out).config.get("task") != "import-hf":
        raise UserError(f"--out {out} holds a run that import-hf did not write (a trained or fine-tuned one); "
                        "--overwrite replaces only an earlier import, choose another --out")
    directory, source = _resolve_source(str(src))
    io.check_not_an_input(out, [directory], "--out")
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
    _check_headers(directory, hf_shapes(config), config)  # before any tensor is read
    state, files = _load_hf_weights(directory)
    where = files[0] if len(files) == 1 else directory / SAFETENSORS_INDEX
    check_tensors(state, hf_shapes(config), str(where), "config.json", config)
    state = hf_to_gpt2lab(state)
    source["weights"] = {f.name: _sha256(f) for f in files}



    tensors = {name: t.to(torch.float32).contiguous() for name, t in state.items()}
    with io.staging(out) as tmp:
        save_tensors(tensors, tmp / WEIGHTS_FILE)
        tokenizer.save(tmp)
        write_run_config(tmp, config, tokenizer_identity=tokenizer.identity(), kind="lm", task="import-hf",
                         extra={"source": source})
        io.publish(tmp, out)
    return out


def _check_headers(directory: Path, expected: dict, config) -> None:
    """The shapes in the safetensors headers against the config, before a tensor is read: a config that
    asks for an absurd size is refused at once."""
    files = [directory / SAFETENSORS] if (directory / SAFETENSORS).is_file() else []
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                shapes.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f} cannot be read as safetensors ({str(e).splitlines()[0]}); the file is "
                            "damaged or incomplete, download the model again") from None
    if shapes:
        check_tensors({k: _Shape(v) for k, v in shapes.items()}, expected, str(files[0]), "config.json", config)


class _Shape:
    """Stands in for a tensor where only the shape is known."""

    def __init__(self, shape):
        self.shape = shape


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

    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f} cannot be read as safetensors ({str(e).splitlines()[0]}); the file is "
                            "damaged or incomplete, download the model again") from None
    return state, files


def _load_pickle(path: Path) -> dict:
    state = load_pickle(path, "was refused: gpt2lab reads pickles as tensors only, and this one holds other objects "
                        "(possibly code) or is damaged; get the model as model.safetensors from a source you trust")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path} holds {type(state).__name__}, not a state dict of named tensors; pass "
                        "the directory that `save_pretrained` wrote")
    return state


# ------------------------------------------------------------------------------- export


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """A gpt2lab run dir -> a directory transformers loads: `GPT2LMHeadModel` for a language model (a LoRA
    run exported with its adapters merged), `GPT2ForSequenceClassification` for a classifier; with
    `AutoTokenizer` files."""
    run_dir, out = Path(run_dir), Path(out)
    io.check_output_dir(out, "hf-export", overwrite=overwrite, flag="--out", inputs=[run_dir])
    info = open_run(run_dir)
    config = info.model_config
    tok = load_tokenizer_file(run_dir / "tokenizer.json", fast=False)
    arch = family(config, also=tokenizer_obstacles(tok), classifier=info.kind == "classifier")
    model, _ = info.load()  # checks the tokenizer and the weights; LoRA adapters merged
    state = unique_state_dict(model)
    dtype_name = str(state["transformer.wte.weight"].dtype).removeprefix("torch.")
    if arch != "gpt2":  # Llama-shaped
        _write_export(out, run_dir, info, tok, config, gpt2lab_to_llama(state, config),
                      config_to_llama(config, tok.eot_id, dtype_name))
        return out
    hf_config = config_to_hf(config, tok.eot_id, dtype_name)
    score = None
    if info.kind == "classifier":
        score = fold_score_bias(state, info.labels)
        hf_config.update(architectures=["GPT2ForSequenceClassification"], num_labels=len(info.labels),
                         id2label={str(i): name for i, name in enumerate(info.labels)},
                         label2id={name: i for i, name in enumerate(info.labels)},
                         pad_token_id=int(info.head.get("pad_id", tok.eot_id)))
    hf = gpt2lab_to_hf({k: v for k, v in state.items() if not k.startswith("score.")})
    # a padded vocabulary: its extra rows are never predicted, so the first vocab_size rows are the model
    hf["transformer.wte.weight"] = hf["transformer.wte.weight"][: config.vocab_size].contiguous()
    shapes = hf_shapes(config)
    dtype = hf["transformer.wte.weight"].dtype
    for name, shape in shapes.items():  # bias=False: a bias of zero computes the same thing
        if name not in hf:
            hf[name] = torch.zeros(shape, dtype=dtype)
    if score is not None:
        hf["transformer.ln_f.bias"] = score[1].to(dtype)
        hf["score.weight"] = score[0]
        shapes["score.weight"] = tuple(score[0].shape)
    assert {k: tuple(v.shape) for k, v in hf.items()} == shapes
    _write_export(out, run_dir, info, tok, config, hf, hf_config)
    return out


def tokenizer_obstacles(tok) -> list[str]:
    """What in a tokenizer GPT-2's tokenizer files (and GGUF's "gpt2" tokenizer) cannot express."""
    out = []
    if tok.pattern != GPT2_PATTERN:
        out.append(f"the tokenizer splits text with its own regex ({tok.pattern!r}), and GPT-2's tokenizer "
                   "files hold only GPT-2's")
    if tok.eot_id is None:
        out.append(f"the tokenizer has no {EOT} token to serve as bos/eos (retrain it with `gpt2lab tokenizer "
                   "train`)")
    return out


def _write_export(out: Path, run_dir: Path, info, tok, config, tensors: dict, hf_config: dict) -> None:
    with io.staging(out) as tmp:
        save_tensors(tensors, tmp / SAFETENSORS)
        io.write_json(tmp / "config.json", hf_config)
        io.write_json(tmp / "generation_config.json", {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id})
        for name, content in hf_tokenizer_files(tok, config.block_size, jinja_template(info.template)).items():
            if isinstance(content, str):
                io.write_text(tmp / name, content)
            else:
                io.write_json(tmp / name, content)
        io.write_json(tmp / io.EXPORT_MARKER, {"format": "gpt2lab-export", "run_dir": str(run_dir.resolve()),
                                               "kind": info.kind, "architecture": hf_config["architectures"][0]})
        io.publish(tmp, out)


def _read_json(path: Path, missing: str) -> dict:
    if not path.exists():
        raise UserError(missing or f"{path} does not exist")
    return io.read_json_object(path, "file", "the file is damaged, download it again")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
