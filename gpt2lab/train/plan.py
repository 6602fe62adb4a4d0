"""`gpt2lab pretrain --dry-run`: what a run will do and whether it fits, before it starts.

The batch of an optimizer step is fixed by `--total-batch-tokens`; the number of processes only
changes how it is cut: tokens per step = batch-size x seq-len x accumulation x processes. The
memory of one process is estimated from the model's shapes (built on the meta device, nothing
allocated):

    weights      4 bytes a parameter (fp32 master weights; bf16 autocast computes in bf16)
    gradients    4 bytes a parameter
    AdamW        8 bytes a parameter (two moments)
    activations  per block ~34 x (batch x seq-len x width) values kept for the backward pass (attention
                 through SDPA/flash keeps no T x T scores), 2 bytes each in bf16 and 4 in fp32; with
                 --activation-checkpointing only each block's input, plus one block's worth
    logits       batch x seq-len x vocabulary, about 10 bytes each (the logits, their fp32 copy for
                 the loss, the gradient)

Under ddp every process holds all of the first three; under fsdp each holds 1/N of them, plus the
gathered bf16 (or fp32) weights of the block being computed and of the root (embeddings, head).
These are estimates (allocator slack, CUDA context and kernels' workspaces come on top: keep
~10% spare).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn

from gpt2lab.data.shards import read_meta
from gpt2lab.metrics import human_duration
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT, CausalSelfAttention
from gpt2lab.model.options import LatentAttention, MoE
from gpt2lab.train.config import TrainConfig, model_overrides

GIB = 1024**3


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameter count, a tied tensor counted once. non_embedding=True leaves out the embedding tables (the
    convention of the scaling-law papers)."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return n


def flops_per_token(model: nn.Module, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B: 6 per parameter
    (the position table, a lookup, left out), plus the attention scores and their weighted sum,
    12 * T * (heads x head size) per layer. A mixture of experts counts the experts a token runs, not all
    of them."""
    T = seq_len or model.config.block_size
    n = count_params(model)
    wpe = getattr(model.transformer, "wpe", None)
    if isinstance(wpe, nn.Embedding):
        n -= wpe.weight.numel()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):  # a token runs k of the E experts
        per_expert = sum(p.numel() for p in moe.experts[0].parameters())
        n -= (moe.n_experts - moe.k) * per_expert
    attn = 0  # per token: scores (query . key) and the weighted sum of values, for every head
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            attn += m.n_head * 2 * m.head_dim
        elif isinstance(m, LatentAttention):
            attn += m.n_head * (2 * m.head_dim + m.rope_dim)
    return 6 * n + 6 * attn * T


def _fmt(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


H100_BF16 = 989e12  # FLOP/s, dense; a plan for a GPU assumes this one at 40% utilisation


def _time_estimate(total_flops: float, world: int, on_gpu: bool, half: bool) -> str:
    """A rough duration: on a GPU at 40% of an H100's bf16 peak per process; on this CPU at half of the speed
    of a matrix product measured here (a fifth of a second)."""
    if on_gpu:
        seconds = total_flops / (world * 0.4 * H100_BF16)
        return f"about {human_duration(seconds)} on {world} H100-class GPU(s) at 40% utilisation (rough)"
    dtype = torch.bfloat16 if half else torch.float32
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        done += 1
    speed = 2 * 512 ** 3 * done / (time.perf_counter() - start)
    seconds = total_flops / (world * 0.5 * speed)
    return (f"about {human_duration(seconds)} on this CPU ({speed / 1e9:.0f} GFLOP/s measured in a "
            f"{'bf16' if half else 'fp32'} matrix product, half of it assumed; rough)")


def plan(cfg: TrainConfig, processes: int | None = None, gpu_memory: float | None = None) -> str:
    """The plan of a pretraining run as text; `gpu_memory` (GiB) adds what to change when it will not fit."""
    world = processes or int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.data:
        vocab = read_meta(cfg.data)["vocab_size"]
    else:
        vocab = 50257
    mc = GPTConfig.from_preset(cfg.model, vocab_size=vocab, **model_overrides(cfg))
    with torch.device("meta"):
        model = GPT(mc)
    n = count_params(model)
    T = cfg.seq_len or mc.block_size
    micro = cfg.batch_size * T * world
    total = cfg.total_batch_tokens or micro
    if total % micro:
        return (f"--total-batch-tokens {total} is not a multiple of batch-size x seq-len x processes = "
                f"{cfg.batch_size} x {T} x {world} = {micro}")
    accum = total // micro
    flops = flops_per_token(model, T) * total
    on_gpu = gpu_memory is not None or cfg.device.startswith("cuda")  # the plan is for a GPU
    half = cfg.dtype in ("bf16", "fp16") or (cfg.dtype == "auto" and on_gpu)
    act_bytes = 2 if half else 4
    btc = cfg.batch_size * T * mc.n_embd
    per_block = 34 * btc * act_bytes
    activations = (mc.n_layer * btc * act_bytes + per_block) if cfg.activation_checkpointing \
        else mc.n_layer * per_block
    logits = cfg.batch_size * T * mc.padded_vocab_size * 10
    block_params = sum(p.numel() for p in model.transformer.h[0].parameters())
    root_params = n - mc.n_layer * block_params
    gathered = 2 if half else 4
    rows = {}
    for strategy in ("ddp", "fsdp"):
        shard = world if strategy == "fsdp" else 1
        weights = 4 * n / shard
        if strategy == "fsdp":
            weights += gathered * (2 * block_params + root_params)  # a block (and the next, prefetched), the root
        rows[strategy] = {"weights": weights, "gradients": 4 * n / shard, "optimizer": 8 * n / shard,
                          "activations": activations, "logits": logits}
    lines = [
        f"model       {cfg.model} ({mc.n_layer} layers, width {mc.n_embd}, {mc.n_head} heads, context "
        f"{mc.block_size}, vocabulary {mc.vocab_size}): {n:,} parameters",
        f"batch       {total:,} tokens per step = {cfg.batch_size} x {T} x {accum} accumulation x {world} "
        f"process{'es' * (world != 1)}",
        f"compute     {flops:.3g} FLOPs per step ({flops_per_token(model, T):,} per token), "
        f"{cfg.max_steps:,} steps: {flops * cfg.max_steps:.3g} FLOPs",
        f"time        {_time_estimate(flops * cfg.max_steps, world, on_gpu, half)}",
        f"memory per process (estimate; {'bf16' if half else 'fp32'} activations"
        f"{', activation checkpointing' if cfg.activation_checkpointing else ''}):",
        f"  {'':<12} {'ddp':>12} {'fsdp':>12}",
    ]
    for key in ("weights", "gradients", "optimizer", "activations", "logits"):
        lines.append(f"  {key:<12} {_fmt(rows['ddp'][key]):>12} {_fmt(rows['fsdp'][key]):>12}")
    totals = {s: sum(r.values()) for s, r in rows.items()}
    lines.append(f"  {'total':<12} {_fmt(totals['ddp']):>12} {_fmt(totals['fsdp']):>12}")
    if gpu_memory is not None:
        budget = gpu_memory * GIB * 0.9
        mine = totals[cfg.strategy]
        if mine <= budget:
            lines.append(f"fits: {_fmt(mine)} of {gpu_memory:g} GiB with --strategy {cfg.strategy} (10% kept spare)")
        else:
            advice = []
            if cfg.strategy == "ddp" and totals["fsdp"] <= budget:
                advice.append("--strategy fsdp (it fits then)")
            elif cfg.strategy == "ddp":
                advice.append("--strategy fsdp (and more processes: the sharded part shrinks with each)")
            if not cfg.activation_checkpointing:
                advice.append("--activation-checkpointing")
            if cfg.batch_size > 1:
                smaller = max(1, cfg.batch_size // 2)
                advice.append(f"--batch-size {smaller} (with --total-batch-tokens {total}: accumulation "
                              f"{accum * cfg.batch_size // smaller}, the same updates)")
            if not half:
                advice.append("--dtype bf16")
            lines.append(f"does not fit: {_fmt(mine)} > {gpu_memory:g} GiB with --strategy {cfg.strategy}; try "
                         + ", ".join(advice))
    return "\n".join(lines)

