"""Training throughput: gpt2lab's GPT vs Hugging Face transformers' GPT2LMHeadModel.

Both models get the same size, the same random batches, the same loss, the same
AdamW (torch's; fused on CUDA) and the same dtype; each is timed over the same
number of optimizer steps after a warm-up. Prints a table and, with --json, writes it.

    python bench/train.py --model mini --batch-size 8 --seq-len 256
    python bench/train.py --model gpt2 --batch-size 4 --seq-len 1024 --steps 5
    python bench/train.py --model gpt2 --device cuda --dtype bf16 --compile --batch-size 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from gpt2lab.device import peak_flops
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.train.plan import flops_per_token

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def hf_model(cfg: GPTConfig):
    import transformers

    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        activation_function="gelu_new")
    try:
        return transformers.GPT2LMHeadModel(hf_cfg, attn_implementation="sdpa")
    except TypeError:
        return transformers.GPT2LMHeadModel(hf_cfg)


def time_training(name, model, batches, args, device, dtype, flops) -> dict:
    model.to(device).train()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    forward = model
    if args.compile:
        forward = torch.compile(model)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def step(x, y):
        with autocast:
            out = forward(x)
            logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(*batches[i % len(batches)])
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.batch_size * args.seq_len
    row = {"impl": name, "step_ms": dt * 1000, "tokens_per_sec": tokens / dt}
    peak = peak_flops(device)
    if peak:
        row["mfu"] = flops * tokens / dt / peak
    model.to("cpu")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mini", help="gpt2lab preset (default mini)")
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's context")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--skip-hf", action="store_true", help="time gpt2lab only")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = GPTConfig.from_preset(args.model, vocab_size=args.vocab_size)
    args.seq_len = args.seq_len or cfg.block_size
    torch.manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1))
        batches.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))

    ours = GPT(cfg)
    flops = flops_per_token(ours, args.seq_len)
    rows = [time_training("gpt2lab", ours, batches, args, device, dtype, flops)]
    del ours
    if not args.skip_hf:
        torch.manual_seed(0)
        rows.append(time_training("transformers", hf_model(cfg), batches, args, device, dtype, flops))

    print(f"# training throughput: {args.model} ({cfg.n_layer} layers, width {cfg.n_embd}, vocab "
          f"{cfg.vocab_size}), batch {args.batch_size} x {args.seq_len}, {str(dtype)[6:]}"
          f"{', compiled' if args.compile else ''}, {args.steps} timed steps")
    print(f"# machine: {machine(device)}")
    header = ("implementation", "ms/step", "tokens/s", "MFU", "vs transformers")
    print("| {:<14} | {:>9} | {:>10} | {:>6} | {:>15} |".format(*header))
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 12}|{'-' * 8}|{'-' * 17}|")
    ref = rows[-1]["tokens_per_sec"] if len(rows) > 1 else None
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        ratio = f"{r['tokens_per_sec'] / ref:.2f}x" if ref else "-"
        print(f"| {r['impl']:<14} | {r['step_ms']:>9.1f} | {r['tokens_per_sec']:>10,.0f} | {mfu:>6} "
              f"| {ratio:>15} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine(device), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
