"""Many processes: `torchrun` set-up (NCCL on CUDA, gloo on CPU) and the two ways to train on them.

`torchrun --nproc_per_node N -m gpt2lab pretrain ...` starts N copies of the
command with RANK, LOCAL_RANK and WORLD_SIZE in the environment. Without
them this is a plain single process.

Strategies (`--strategy`):
  ddp   DistributedDataParallel: every process holds the whole model, its gradients and AdamW's
        moments (16 bytes per parameter in fp32), and gradients are averaged after the backward.
  fsdp  FSDP2 (`fully_shard`, each block then the root): weights, gradients and optimizer state are
        split across the processes (16 bytes per parameter / N); a block's weights are gathered just
        before they are used and freed after. On CUDA with bf16 the gathered weights are bf16 (a
        MixedPrecisionPolicy) while the sharded master weights stay fp32. Checkpoints are written by
        every process in parallel with torch.distributed.checkpoint, and load on any number of
        processes. With --strategy fsdp and no torchrun, a process group of one is made, so the
        policy applies to a single GPU as well.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from gpt2lab.device import resolve_device
from gpt2lab.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


STRATEGIES = ("ddp", "fsdp")


def launched_as_main() -> bool:
    """Whether this process is rank 0 of a torchrun launch, or not launched by torchrun (before set-up)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device_name: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=resolve_device(device_name))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def ensure_process_group(info: DistInfo) -> None:
    """FSDP needs a process group, even of one process: make it when torchrun did not."""
    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def teardown(info: DistInfo, finished: bool = False) -> None:
    """Destroy the process group. After a run that finished on every rank, wait for all of them first: a
    rank that leaves while another's gloo threads still talk to it can abort that one at exit."""
    if dist.is_initialized():
        if finished and info.enabled:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def agree(info: DistInfo, fn) -> None:
    """Run `fn` on every rank; if it raises a UserError on any of them, raise it on all of them, so that a
    check only one rank can make (a lock rank 0 takes) never leaves the others waiting at a barrier."""
    message = None
    try:
        fn()
    except UserError as e:
        message = str(e)
        if not info.enabled:
            raise
    if info.enabled:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, message)
        first = next((m for m in gathered if m), None)
        if first is not None:
            raise UserError(first)


# ------------------------------------------------------------------ strategies


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: each transformer block keeps only its input during the forward pass of
    training and computes its activations again in the backward pass (less memory, ~30% more compute).
    Applied before the model is sharded or wrapped, so that under FSDP the recomputation runs with the
    block's weights gathered. Names and weights are unchanged; evaluation and decoding are not affected."""
    for block in model.transformer.h:
        inner = block.forward

        def forward(*args, _block=block, _inner=inner, **kwargs):
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward


def wrap(model: torch.nn.Module, strategy: str, info: DistInfo, dtype: torch.dtype, compile: bool):
    """The module the training loop calls: `model` compiled and/or wrapped for DDP, or sharded in place
    with FSDP2 (then the returned module is `model` itself, or its compiled form)."""
    if strategy == "fsdp":
        policy = MixedPrecisionPolicy() if dtype == torch.float32 else \
            MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return torch.compile(model) if compile else model
    train_model = torch.compile(model) if compile else model
    if info.enabled:
        train_model = DDP(train_model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    return train_model


def gradient_sync(model: torch.nn.Module, train_model: torch.nn.Module, strategy: str, info: DistInfo,
                  last: bool):
    """The context of one micro-batch's backward: gradients are reduced across processes only on the last
    micro-batch of an accumulation."""
    if strategy == "fsdp":
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if last or not info.enabled:
        return contextlib.nullcontext()
    return train_model.no_sync()


def full_state_dict(model: torch.nn.Module) -> dict:
    """Every rank takes part; the whole, unsharded state dict on the CPU (what rank 0 writes)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: torch.nn.Module, optimizer, path) -> None:
    """Every rank writes its shards of the weights and of the optimizer state into `path` (a directory)."""
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(model: torch.nn.Module, optimizer, path) -> None:
    """Read a sharded checkpoint written on any number of processes into this sharding."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def grad_norm_value(norm) -> float:
    """A clipped gradient norm as a number (FSDP returns a DTensor)."""
    return float(norm.full_tensor()) if hasattr(norm, "full_tensor") else float(norm)
