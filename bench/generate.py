"""Decoding speed: gpt2lab's generator (with and without its KV cache) vs transformers' `generate`.

Both models carry the same random weights (ours mapped into GPT2LMHeadModel with
the four Conv1D transposes), decode the same prompts greedily for exactly
`--new-tokens` tokens (no early stop) and must produce the same tokens. Each
measurement is the best of `--repeat` runs; the implementations take turns
within a repeat, so a burst of load from elsewhere hurts them alike. The time
covers the whole call: prefill of the prompt, then one step per new token.
gpt2lab decodes through its model's one forward (no second copy of the math).

`--bf16` adds gpt2lab with the model cast to bfloat16 (`gpt2lab generate --dtype bf16`):
half the bytes of weights to stream per step, and fast bf16 matmuls on CPUs with
AVX512-BF16 or AMX. Its tokens are compared with the fp32 ones (bf16 rounding can
change a near-tie).

    python bench/generate.py                                  # gpt2, batch 1 and 8, 200 tokens, CPU
    python bench/generate.py --threads 1 --bf16               # also bf16
    python bench/generate.py --batch-sizes 1 --new-tokens 50 --skip-hf
    python bench/generate.py --device cuda --json bench/generate.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from gpt2lab.generate import generate, generate_batch
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_features, cpu_name, hf_twin  # noqa: E402


def machine(device: torch.device) -> str:
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {versions}"
    cpu = cpu_name()
    threads = torch.get_num_threads()
    return (f"{cpu} ({cpu_features()}), {os.cpu_count()} cores, {versions}, "
            f"{threads} thread{'s' if threads > 1 else ''}")


def hf_twin_for_generate(model: GPT):
    hf = hf_twin(model)
    hf.generation_config.pad_token_id = 0
    return hf.to(next(model.parameters()).device)


def ours(model: GPT, prompts: torch.Tensor, n: int, use_cache: bool) -> list[list[int]]:
    rows = prompts.tolist()
    if len(rows) == 1:
        return [generate(model, rows[0], max_new_tokens=n, temperature=0.0, use_cache=use_cache)]
    extra = {} if use_cache else {"use_cache": False}  # so that older versions can be timed too
    return generate_batch(model, rows, max_new_tokens=n, temperature=0.0, **extra)


def theirs(hf, prompts: torch.Tensor, n: int) -> list[list[int]]:
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, prompts.size(1):].tolist()


def first_difference(a: list[list[int]], b: list[list[int]]) -> str | None:
    for r, (x, y) in enumerate(zip(a, b)):
        if x != y:
            t = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return f"row {r}, token {t}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2lab preset (default gpt2, random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--no-cache-tokens", type=int, default=None,
                   help="new tokens for the run without a cache (default: --new-tokens); it is "
                   "quadratic, so a smaller number keeps the benchmark short")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-hf", action="store_true", help="time gpt2lab only")
    p.add_argument("--skip-no-cache", action="store_true", help="leave out the run without a cache")
    p.add_argument("--bf16", action="store_true", help="also time gpt2lab with the model in bfloat16")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, n_nc = args.new_tokens, args.no_cache_tokens or args.new_tokens
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.model)).to(device).eval()
    hf = None if args.skip_hf else hf_twin_for_generate(model)
    model_bf16 = None
    if args.bf16:
        model_bf16 = GPT(model.config).to(device).eval()
        model_bf16.load_state_dict(model.state_dict())
        model_bf16 = model_bf16.to(torch.bfloat16)

    rows, notes = [], []
    for bs in args.batch_sizes:
        prompts = torch.randint(0, model.config.vocab_size, (bs, args.prompt_len), device=device,
                                generator=torch.Generator(device=device).manual_seed(bs))
        runs = {"gpt2lab": lambda k, x=prompts: ours(model, x, k, True)}
        if args.bf16:
            runs["gpt2lab, bf16"] = lambda k, x=prompts: ours(model_bf16, x, k, True)
        if not args.skip_no_cache:
            runs["gpt2lab, no cache"] = lambda k, x=prompts: ours(model, x, k, False)
        if hf is not None:
            runs["transformers"] = lambda k, x=prompts: theirs(hf, x, k)
        tokens = {name: n_nc if name == "gpt2lab, no cache" else n for name in runs}
        for f in runs.values():  # warm-up: first-call allocations and lazy initialisation
            f(4)
        best, best_cpu, outputs = {name: math.inf for name in runs}, {name: math.inf for name in runs}, {}
        for _ in range(args.repeat):
            for name, f in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t, c = time.perf_counter(), time.process_time()
                outputs[name] = f(tokens[name])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                best[name], best_cpu[name] = min(best[name], wall), min(best_cpu[name], cpu)
                print(f"batch {bs}, {name}: {wall:.2f} s, {cpu:.2f} s of CPU", file=sys.stderr, flush=True)
        if hf is not None:
            diff = first_difference(outputs["gpt2lab"], outputs["transformers"])
            notes.append(f"batch {bs}: gpt2lab and transformers produce "
                         + ("the same tokens" if diff is None else f"different tokens from {diff}"))
        if "gpt2lab, bf16" in outputs:
            same = sum(a == b for x, y in zip(outputs["gpt2lab, bf16"], outputs["gpt2lab"]) for a, b in zip(x, y))
            total = sum(len(x) for x in outputs["gpt2lab"])
            notes.append(f"batch {bs}: gpt2lab in bf16 gives {same} of {total} tokens equal to fp32's "
                         "(rounding changes near-ties)")
        if "gpt2lab, no cache" in outputs:
            same = all(a == b[:n_nc] for a, b in zip(outputs["gpt2lab, no cache"], outputs["gpt2lab"]))
            notes.append(f"batch {bs}: gpt2lab without a cache "
                         + ("matches" if same else "DIFFERS FROM") + " gpt2lab with one")
        for name, seconds in best.items():
            k = tokens[name]
            rows.append({"impl": name, "batch": bs, "new_tokens": k, "seconds": seconds,
                         "tokens_per_sec": bs * k / seconds, "ms_per_token": 1000 * seconds / k,
                         "cpu_seconds": best_cpu[name], "cpu_ms_per_token": 1000 * best_cpu[name] / k})

    cfg = model.config
    print(f"# greedy decoding: {args.model} ({cfg.n_layer} layers, width {cfg.n_embd}, random weights), "
          f"prompt {args.prompt_len} tokens, {n} new tokens"
          + (f" ({n_nc} without the cache)" if n_nc != n and not args.skip_no_cache else "")
          + f", fp32 on {device.type}, best of {args.repeat}")
    print(f"# machine: {machine(device)}")
    print("| implementation    | batch | new tokens | tokens/s | ms/token | vs transformers | CPU ms/token "
          "| vs transformers (CPU) |")
    print("|-------------------|------:|-----------:|---------:|---------:|----------------:|-------------:"
          "|----------------------:|")
    for r in rows:
        # a ratio compares runs of the same length only (the run without a cache may be shorter)
        ref = next((x for x in rows if x["impl"] == "transformers" and x["batch"] == r["batch"]
                    and x["new_tokens"] == r["new_tokens"]), None)
        r["vs_transformers"] = ref["ms_per_token"] / r["ms_per_token"] if ref else None
        r["vs_transformers_cpu"] = ref["cpu_ms_per_token"] / r["cpu_ms_per_token"] if ref else None
        ratio, cpu_ratio = (f"{r['vs_transformers']:.2f}x", f"{r['vs_transformers_cpu']:.2f}x") if ref \
            else ("-", "-")
        print(f"| {r['impl']:<17} | {r['batch']:>5} | {r['new_tokens']:>10} | {r['tokens_per_sec']:>8.1f} "
              f"| {r['ms_per_token']:>8.2f} | {ratio:>15} | {r['cpu_ms_per_token']:>12.2f} "
              f"| {cpu_ratio:>21} |")
    print("ms/token: wall-clock milliseconds per decoding step (one token for every row of the batch); "
          "CPU ms/token: the process's CPU time per step, steadier than wall-clock time when other "
          "programs share the cores.")
    for note in notes:
        print(f"# {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine(device), "rows": rows, "notes": notes}, f,
                      indent=2)


if __name__ == "__main__":
    main()
