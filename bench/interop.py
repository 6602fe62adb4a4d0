"""A run taken elsewhere, measured: `export-gguf` at every type, loaded by llama.cpp itself (llama-cpp-python),
and `export-hf` loaded by transformers, against the run's own logits on held-out text.

Per file: its size; whether llama.cpp's tokenizer gives the run's ids on the text; the largest logit
difference and the share of positions whose most likely next token agrees (teacher-forced over --tokens
positions); and the share of greedy continuations (from --prompts places in the text, --new-tokens each)
that are identical token for token.

    python bench/interop.py demo/run --text gpt2lab/assets/shakespeare.txt.gz
    python bench/interop.py runs/sft --types f32 q8_0 --new-tokens 64
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpt2lab.checkpoint import open_run
from gpt2lab.export.gguf import TYPES, export_gguf
from gpt2lab.export.hf import export_hf
from gpt2lab.generate import generate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402


def held_out(path: str, chars: int) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return text[-chars:]  # the end of the file: make demo holds its last tenth out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--text", default="gpt2lab/assets/shakespeare.txt.gz", help="held-out text to compare on")
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    p.add_argument("--tokens", type=int, default=None, help="positions compared (default: the context)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import llama_cpp

    torch.set_num_threads(args.threads)
    info = open_run(args.run_dir)
    model, tok = info.load()
    block = info.model_config.block_size
    text = held_out(args.text, 40_000)
    ids = tok.encode(text)
    n = min(args.tokens or block, block, len(ids))
    window = ids[:n]
    with torch.no_grad():
        ours = model(torch.tensor([window]))[0].numpy()
    starts = [k * (len(ids) - 64) // args.prompts for k in range(args.prompts)]
    prompts = [ids[s:s + 16] for s in starts]
    greedy = [generate(model, q, args.new_tokens, temperature=0.0) for q in prompts]

    work = Path(tempfile.mkdtemp(prefix="gpt2lab-interop-"))
    rows = []
    for typ in args.types:
        path = export_gguf(args.run_dir, work / f"model-{typ}.gguf", type=typ)
        llm = llama_cpp.Llama(str(path), n_ctx=block, logits_all=True, verbose=False, n_threads=args.threads,
                              type_k=0, type_v=0)
        same_ids = llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        llm.reset()
        llm.eval(window)
        theirs = np.array(llm.scores[:n])
        agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        equal, t0, made = 0, time.perf_counter(), 0
        for q, want in zip(prompts, greedy):
            got = [t for _, t in zip(range(args.new_tokens), llm.generate(q, temp=0.0, top_k=1, reset=True))]
            equal += got == want
            made += len(got)
        rows.append((f"llama.cpp, GGUF {typ}", f"{path.stat().st_size / 2**20:.1f} MiB", "yes" if same_ids else "NO",
                     f"{np.abs(theirs - ours).max():.2e}", f"{100 * agree:.1f}%", f"{equal}/{len(prompts)}",
                     f"{made / (time.perf_counter() - t0):.0f}"))
        del llm
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_dir = export_hf(args.run_dir, work / "hf")
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        hf_tok = AutoTokenizer.from_pretrained(hf_dir)
        with torch.no_grad():
            theirs = hf(torch.tensor([window])).logits[0].numpy()
            equal = 0
            for q, want in zip(prompts, greedy):
                out = hf.generate(torch.tensor([q]), max_new_tokens=args.new_tokens, do_sample=False,
                                  min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
                equal += out[0, len(q):].tolist() == want
        size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) / 2**20
        rows.append((f"transformers, {type(hf).__name__}", f"{size:.1f} MiB",
                     "yes" if hf_tok(text)["input_ids"] == ids else "NO", f"{np.abs(theirs - ours).max():.2e}",
                     f"{100 * float((theirs.argmax(-1) == ours.argmax(-1)).mean()):.1f}%", f"{equal}/{len(prompts)}",
                     "-"))
    except ImportError:
        rows.append(("transformers", "not installed", "", "", "", "", ""))

    cfg = info.model_config
    print(f"# {args.run_dir}: {cfg.n_layer} layers, width {cfg.n_embd}, context {block}; {n} held-out positions "
          f"of {args.text}; {len(prompts)} greedy continuations of {args.new_tokens} tokens")
    print(f"# machine: {cpu_name()}, llama-cpp-python {llama_cpp.__version__}, {args.threads} threads")
    print("| loaded by | size | same token ids | max logit difference | next-token agreement | "
          "greedy continuations equal | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
