"""Local decoding speed: gpt2lab (fp32, bf16, int8, compiled) against the engines people run on their own
machines, in the same run: transformers' `generate`, CTranslate2 (float32 and int8) and llama.cpp
(through llama-cpp-python, f16 and q8_0 GGUF files written by `gpt2lab export-gguf`).

Every implementation decodes the same random-weight GPT-2 (the same tensors: exported to a transformers
directory, converted by CTranslate2's own converter, written as GGUF), the same prompts, greedily, for
exactly --new-tokens tokens. Each figure is the best of --repeat runs; the implementations take turns
within a repeat, so a burst of load from elsewhere hurts them alike. The time covers the whole call:
prefill of the prompt, then one step per token. The tokens of each are compared with gpt2lab fp32's (the
share of equal tokens; lower precision changes near-ties of a random model's flat distribution).

A peer that is not installed is skipped with a line saying so (`pip install 'gpt2lab[bench]'` installs
them: ctranslate2, llama-cpp-python). llama.cpp's Python API decodes one sequence at a time, so it has
batch-1 rows only.

    python bench/generate.py                                   # gpt2, batch 1 and 8, threads 1 and 2
    python bench/generate.py --batch-sizes 1 --threads 2 --new-tokens 100 --only 'gpt2lab int8' 'ctranslate2 int8'
    python bench/generate.py --json bench/generate.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2lab.checkpoint import write_run_config
from gpt2lab.export.hf import export_hf
from gpt2lab.generate import generate, generate_batch
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.model.quantize import quantize
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.weights import save_weights

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_features, cpu_name  # noqa: E402


def write_run(model: GPT, out: Path) -> Path:
    tok = get_tokenizer("gpt2", fast=False)
    out.mkdir(parents=True)
    write_run_config(out, model.config, tokenizer_identity=tok.identity())
    save_weights(model, out / "model.safetensors")
    tok.save(out)
    return out


# ------------------------------------------------------------------------------ the implementations


def gpt2lab_impl(model: GPT, compile: bool = False):
    def decode(prompts: list[list[int]], n: int) -> list[list[int]]:
        if len(prompts) == 1:
            return [generate(model, prompts[0], n, temperature=0.0, compile=compile)]
        return generate_batch(model, prompts, n, temperature=0.0)
    return decode


def torchao_impl(model: GPT):
    """The other maintained int8 path: torchao's int8 weight-only quantization of a copy of the model (what
    `--quantize int8` uses on CUDA), measured here to show why the CPU path is PyTorch's own kernels."""
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    ao = copy.deepcopy(model).eval()
    quantize_(ao, Int8WeightOnlyConfig())
    return gpt2lab_impl(ao)


def transformers_impl(hf_dir: Path):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()

    def decode(prompts, n):
        x = torch.tensor(prompts)
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, x.size(1):].tolist()
    return decode


def ctranslate2_impl(hf_dir: Path, work: Path, compute_type: str, threads: int):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    out = work / f"ct2-{compute_type}"
    if not out.exists():
        TransformersConverter(str(hf_dir)).convert(str(out), quantization=compute_type)
    gen = ctranslate2.Generator(str(out), device="cpu", compute_type=compute_type, intra_threads=threads)
    tok = get_tokenizer("gpt2", fast=False)
    ids = {**tok.vocab, **tok.special_tokens}  # the token's text as the HF vocabulary writes it -> id
    vocab = {i: t for t, i in ids.items()}

    def decode(prompts, n):
        batch = [[vocab[i] for i in p] for p in prompts]
        results = gen.generate_batch(batch, max_length=n, min_length=n, sampling_topk=1, beam_size=1,
                                     include_prompt_in_result=False, end_token=[])
        return [[ids[t] for t in r.sequences[0]][:n] for r in results]
    return decode


def llama_cpp_impl(run_dir: Path, work: Path, kind: str, threads: int):
    from llama_cpp import Llama

    from gpt2lab.export.gguf import export_gguf

    path = work / f"model-{kind}.gguf"
    if not path.exists():
        export_gguf(run_dir, path, type=kind)
    llm = Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False,
                logits_all=False)

    def decode(prompts, n):
        out = []
        for p in prompts:
            llm.reset()
            tokens = []
            for t in llm.generate(p, top_k=1, temp=0.0, reset=True):
                tokens.append(int(t))
                if len(tokens) == n:
                    break
            out.append(tokens)
        return out
    return decode


def implementations(model, bf16, int8, run_dir: Path, hf_dir: Path, work: Path, threads: int) -> dict:
    """name -> a function that makes the decoder (a peer that is not installed raises ImportError)."""
    return {"gpt2lab fp32": lambda: gpt2lab_impl(model), "gpt2lab bf16": lambda: gpt2lab_impl(bf16),
            "gpt2lab int8": lambda: gpt2lab_impl(int8), "torchao int8 weight-only": lambda: torchao_impl(model),
            "transformers fp32": lambda: transformers_impl(hf_dir),
            "ctranslate2 float32": lambda: ctranslate2_impl(hf_dir, work, "float32", threads),
            "ctranslate2 int8": lambda: ctranslate2_impl(hf_dir, work, "int8", threads),
            "llama.cpp f16": lambda: llama_cpp_impl(run_dir, work, "f16", threads),
            "llama.cpp q8_0": lambda: llama_cpp_impl(run_dir, work, "q8_0", threads)}


# ------------------------------------------------------------------------------------ the run


def machine(threads: list[int]) -> str:
    import transformers

    versions = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("ctranslate2", "llama_cpp", "torchao"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return f"{cpu_name()} ({cpu_features()}), {os.cpu_count()} cores, {', '.join(versions)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2lab preset (default gpt2, random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    p.add_argument("--only", nargs="+", default=None, help="these implementations only (names as in the table)")
    p.add_argument("--compile", action="store_true", help="also gpt2lab with its compiled decoding step")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.model)).eval()
    work = Path(tempfile.mkdtemp(prefix="gpt2lab-bench-"))
    run_dir = write_run(model, work / "run")
    hf_dir = export_hf(run_dir, work / "hf")
    bf16 = GPT(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    int8 = GPT(model.config).eval()
    int8.load_state_dict(model.state_dict())
    quantize(int8)
    notes, rows = [], []

    for threads in args.threads:
        torch.set_num_threads(threads)
        impls = implementations(model, bf16, int8, run_dir, hf_dir, work, threads)
        if args.compile:
            impls["gpt2lab fp32 compiled"] = lambda: gpt2lab_impl(model, compile=True)
        ready = {}
        for name, make in impls.items():
            if args.only and name not in args.only:
                continue
            try:
                ready[name] = make()
            except ImportError as e:
                note = f"{name}: skipped, not installed ({e.name}; pip install 'gpt2lab[bench]')"
                if note not in notes:
                    notes.append(note)
        for bs in args.batch_sizes:
            g = torch.Generator().manual_seed(bs)
            prompts = torch.randint(0, model.config.vocab_size, (bs, args.prompt_len), generator=g).tolist()
            runs = {k: f for k, f in ready.items() if bs == 1 or not k.startswith("llama.cpp")}
            for f in runs.values():
                f(prompts, 4)  # warm-up: first-call allocations, lazy initialisation, compilation
            best, outputs = {k: math.inf for k in runs}, {}
            for _ in range(args.repeat):
                for name, f in runs.items():
                    t = time.perf_counter()
                    outputs[name] = f(prompts, args.new_tokens)
                    best[name] = min(best[name], time.perf_counter() - t)
                    print(f"threads {threads}, batch {bs}, {name}: {best[name]:.2f} s", file=sys.stderr, flush=True)
            reference = outputs.get("gpt2lab fp32")
            for name, seconds in best.items():
                same = None
                if reference is not None:
                    pairs = [(a, b) for x, y in zip(outputs[name], reference) for a, b in zip(x, y)]
                    same = sum(a == b for a, b in pairs) / max(1, len(pairs))
                rows.append({"impl": name, "threads": threads, "batch": bs, "tokens_per_sec":
                             bs * args.new_tokens / seconds, "seconds": seconds, "same_tokens": same})

    cfg = model.config
    print(f"# greedy decoding, {args.model} ({cfg.n_layer} layers, width {cfg.n_embd}, random weights), prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeat}")
    print(f"# machine: {machine(args.threads)}")
    print("| implementation | threads | batch | tokens/s | vs ctranslate2 int8 | tokens equal to gpt2lab fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = next((x for x in rows if x["impl"] == "ctranslate2 int8" and x["threads"] == r["threads"]
                    and x["batch"] == r["batch"]), None)
        r["vs_ct2_int8"] = r["tokens_per_sec"] / ref["tokens_per_sec"] if ref else None
        ratio = f"{r['vs_ct2_int8']:.2f}x" if ref else "-"
        same = f"{100 * r['same_tokens']:.0f}%" if r["same_tokens"] is not None else "-"
        print(f"| {r['impl']} | {r['threads']} | {r['batch']} | {r['tokens_per_sec']:.1f} | {ratio} | {same} |")
    for note in notes:
        print(f"# {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine(args.threads), "rows": rows, "notes": notes}, f,
                      indent=2)


if __name__ == "__main__":
    main()
