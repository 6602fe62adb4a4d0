"""Tokenizers in and out of Hugging Face's formats: vocab.json + merges.txt, and tokenizer.json.

`read_hf_tokenizer` reads the tokenizer of a Hugging Face GPT-2 directory (GPT-2's own when it
has none, or the same); `hf_tokenizer_files` writes ours so that transformers' `AutoTokenizer`
gives the same ids. Only byte-level BPEs with GPT-2's pre-tokenisation can be expressed; any
other tokenizer is refused with one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2lab import io
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import FastTokenizer, get_tokenizer
from gpt2lab.tokenizer.bpe import EOT, GPT2_PATTERN, BPETokenizer


def _read_json(path: Path, missing: str = "") -> dict:
    if not path.exists():
        raise UserError(missing or f"{path} does not exist")
    return io.read_json_object(path, "tokenizer file", "download the model again")


def read_hf_tokenizer(directory: str | os.PathLike, name: str = "imported") -> BPETokenizer:
    """The tokenizer of a Hugging Face GPT-2 directory; GPT-2's when it has none or the same."""
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


def hf_tokenizer_files(tok: BPETokenizer, model_max_length: int, chat_template: str | None = None) -> dict[str, object]:
    """File name -> content of the files transformers' `AutoTokenizer` reads for this tokenizer (with the chat
    template of an instruction-tuned run, for `apply_chat_template`)."""
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
    if chat_template:
        config["chat_template"] = chat_template
    return {
        "vocab.json": vocab,
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }
