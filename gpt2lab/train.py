"""The training loop: pretraining (and, later, SFT) go through `Trainer`.

One optimizer step:
    for each of `grad_accum` micro-batches:     (B sequences of T tokens, per process)
        logits = model(x); loss = cross_entropy(logits, y) / grad_accum
        loss.backward()                          (DDP syncs gradients on the last one only)
    clip the gradient norm; set the learning rate for this step; optimizer.step()

The batch per step is `total_batch_tokens` = B * T * grad_accum * world_size,
so the same run gives the same updates on 1 process or N (up to float rounding).
Checkpoints hold everything the next step depends on (weights, optimizer
moments, RNG states, the data loader's position), so a run that is killed and
resumed ends with the same bits as one that was not.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab import checkpoint as ckpt
from gpt2lab import distributed
from gpt2lab.config import MODEL_FIELDS, TrainConfig, load_config_file  # noqa: F401 (re-exported)
from gpt2lab.errors import UserError
from gpt2lab.metrics import MetricsLogger, console, format_seconds, peak_flops
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.optim import lr_at, make_optimizer

IGNORE_INDEX = -100  # targets with this value take no part in the loss (SFT prompts, padding)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not IGNORE_INDEX."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    final_val_loss: float | None = None
    run_dir: str = ""


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA GPU (it trains with a gradient scaler); "
                        "use --dtype fp32 or bf16 on this device")
    return dtype


def build_model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS if getattr(cfg, k) is not None}
    try:
        return GPTConfig.from_preset(cfg.model, vocab_size=vocab_size, **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None


class NonFiniteLoss(UserError):
    pass


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: distributed.DistInfo):
        cfg.validate()
        self.cfg, self.dist = cfg, dist
        self.device = dist.device
        self.dtype = _resolve_dtype(cfg.dtype, self.device)
        self.out = Path(cfg.out)

        # the data and its tokenizer
        self.load_data()

        # where this run starts from
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file, not a directory; choose another --out")
        self.resume_from: Path | None = None
        existing = (self.out / ckpt.CONFIG_FILE).exists()
        if cfg.resume:
            if not existing:
                raise UserError(f"--resume: {self.out} holds no run to continue; start it without --resume")
            checkpoints = ckpt.list_checkpoints(self.out)
            if not checkpoints:
                raise UserError(f"--resume: {self.out} has no complete checkpoint yet; start the run again "
                                "without --resume (and a new --out, or delete this one)")
            self.resume_from = checkpoints[-1]
            stored = ckpt.read_run_config(self.out)
            self.model_config = GPTConfig.from_dict(stored["model"])
            if stored["tokenizer"]["sha256"] != self.tokenizer.fingerprint:
                raise UserError(f"--resume: the run in {self.out} was trained on data with another "
                                f"tokenizer than {cfg.data}; resume with the run's own --data")
        else:
            if existing:
                raise UserError(f"{self.out} already holds a run; pass --resume to continue it, or "
                                "choose another --out")
            if cfg.init_from:
                init = ckpt.read_run_config(cfg.init_from)
                self.model_config = GPTConfig.from_dict(init["model"])
                if init["tokenizer"]["sha256"] != self.tokenizer.fingerprint:
                    raise UserError(f"--init-from {cfg.init_from} uses tokenizer "
                                    f"{init['tokenizer'].get('name')!r}, the data in {cfg.data} uses "
                                    f"{self.tokenizer.name!r}; prepare the data with the run's tokenizer "
                                    f"(`gpt2lab prepare --tokenizer {cfg.init_from}`)")
            else:
                self.model_config = build_model_config(cfg, self.tokenizer.vocab_size)
        if cfg.resume or cfg.init_from:
            # the model comes from a run: a size flag that disagrees with it cannot be honoured
            source = "the run being resumed" if cfg.resume else f"--init-from {cfg.init_from}"
            for name in MODEL_FIELDS:
                given = getattr(cfg, name)
                if given is not None and name != "dropout" and given != getattr(self.model_config, name):
                    raise UserError(f"--{name.replace('_', '-')} {given} disagrees with {source} "
                                    f"({getattr(self.model_config, name)}); drop the flag")
            if cfg.dropout is not None and cfg.dropout != self.model_config.dropout:
                self.model_config = GPTConfig.from_dict({**self.model_config.to_dict(),
                                                         "dropout": cfg.dropout})
        if self.model_config.vocab_size < self.tokenizer.vocab_size:
            raise UserError(f"the model's vocabulary ({self.model_config.vocab_size}) is smaller than "
                            f"the tokenizer's ({self.tokenizer.vocab_size})")

        # batch geometry
        self.seq_len = cfg.seq_len or self.model_config.block_size
        if self.seq_len > self.model_config.block_size:
            raise UserError(f"--seq-len {self.seq_len} is longer than the model's context "
                            f"({self.model_config.block_size}); lower it or raise --block-size")
        micro_tokens = cfg.batch_size * self.seq_len * dist.world_size
        self.total_batch_tokens = cfg.total_batch_tokens or micro_tokens
        if self.total_batch_tokens % micro_tokens:
            raise UserError(
                f"--total-batch-tokens {self.total_batch_tokens} is not a multiple of batch-size x "
                f"seq-len x processes = {cfg.batch_size} x {self.seq_len} x {dist.world_size} = "
                f"{micro_tokens}; use a multiple of {micro_tokens}")
        self.grad_accum = self.total_batch_tokens // micro_tokens
        self.min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10

        # model and optimizer (every rank builds the same initial weights from the seed)
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.model_config)
        if cfg.init_from and not cfg.resume:
            ckpt.load_weights(self.model, Path(cfg.init_from) / ckpt.WEIGHTS_FILE)
        self.prepare_model()
        self.model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.optimizer = make_optimizer(
            self.model, kind=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
            betas=(cfg.beta1, cfg.beta2), decay_embeddings=cfg.decay_embeddings,
            device_type=self.device.type)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

        self.train_loader, self.val_batches = self.make_loaders()

        self.step = 0
        self.elapsed_before = 0.0
        if self.resume_from is not None:
            self._restore(self.resume_from)

        self.train_model: torch.nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.model)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.train_model,
                                   device_ids=[dist.local_rank] if self.device.type == "cuda" else None)

        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        self.peak = peak_flops(self.device)
        self.logger: MetricsLogger | None = None
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial_checkpoints(self.out)
            if self.resume_from is None:
                self.tokenizer.save(self.out)
                self._write_config()
            self.logger = MetricsLogger(self.out, tensorboard=cfg.tensorboard,
                                        resume_step=self.step if self.resume_from is not None else None)
        distributed.barrier(dist)

    # ------------------------------------------------- what a fine-tuning task overrides

    def load_data(self) -> None:
        """Set `self.tokenizer` and `self.data_identity` from `cfg.data` (a pretraining data dir)."""
        from gpt2lab.data import check_tokenizer, read_meta
        from gpt2lab.tokenizer import load_tokenizer_file

        meta = read_meta(self.cfg.data)
        self.tokenizer = load_tokenizer_file(Path(self.cfg.data) / ckpt.TOKENIZER_FILE)
        check_tokenizer(meta, self.tokenizer)
        self.data_identity = {"path": str(Path(self.cfg.data).resolve()),
                              "tokens": {k: v["tokens"] for k, v in meta["splits"].items()},
                              "tokenizer_sha256": meta["tokenizer"]["sha256"]}

    def make_loaders(self):
        """(train loader, fixed validation batches): random or sequential windows of the shards.

        The train loader has `next_batch() -> (x, y)`, `state_dict()` and
        `load_state_dict()`; the validation batches are the same at every
        evaluation, and split across processes.
        """
        from gpt2lab.data import TokenLoader

        cfg, dist = self.cfg, self.dist
        train = TokenLoader(cfg.data, "train", cfg.batch_size, self.seq_len, mode=cfg.data_order,
                            seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, device=self.device)
        try:
            val = TokenLoader(cfg.data, "val", cfg.batch_size, self.seq_len, mode="sequential", seed=0,
                              rank=dist.rank, world_size=dist.world_size, device=self.device)
        except UserError as e:
            raise UserError(f"validation split: {e}") from None
        return train, [val.next_batch() for _ in range(cfg.eval_batches)]

    def prepare_model(self) -> None:
        """Change the model before training starts (fine-tuning wraps layers, freezes weights)."""

    def extra_config(self) -> dict:
        """More entries for the run's config.json."""
        return {}

    def save_final(self) -> None:
        ckpt.save_weights(self.model, self.out / ckpt.WEIGHTS_FILE)

    # ------------------------------------------------------------------ helpers

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _write_config(self) -> None:
        train = asdict(self.cfg)
        train.update(seq_len=self.seq_len, total_batch_tokens=self.total_batch_tokens,
                     grad_accum=self.grad_accum, min_lr=self.min_lr, world_size=self.dist.world_size,
                     dtype=str(self.dtype).replace("torch.", ""), device=str(self.device))
        ckpt.write_run_config(self.out, self.model_config, tokenizer_identity=self.tokenizer.identity(),
                              train=train, data=self.data_identity, extra=self.extra_config())

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def _save_checkpoint(self) -> None:
        """Every rank's loader and RNG state is gathered; rank 0 writes."""
        local = {"loader": self.train_loader.state_dict(), "rng": self._rng_state()}
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, local)
        else:
            gathered = [local]
        if self.dist.is_main:
            trainer_state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                             "rng": [g["rng"] for g in gathered]}
            state = {"step": self.step, "elapsed": self.elapsed_before + self._session_time(),
                     "loaders": [g["loader"] for g in gathered], "world_size": self.dist.world_size,
                     "tokens_seen": self.step * self.total_batch_tokens}
            ckpt.save_checkpoint(self.out, self.step, self.model, trainer_state, state,
                                 keep=self.cfg.keep_checkpoints)
        distributed.barrier(self.dist)

    def _restore(self, path: Path) -> None:
        trainer_state, state = ckpt.load_checkpoint(path)
        ckpt.load_weights(self.model, path / ckpt.WEIGHTS_FILE)
        if state.get("world_size") != self.dist.world_size:
            raise UserError(f"{path} was written by {state.get('world_size')} processes, this run has "
                            f"{self.dist.world_size}; resume with the same number of processes")
        try:
            self.optimizer.load_state_dict(trainer_state["optimizer"])
            self.scaler.load_state_dict(trainer_state["scaler"])
            self.train_loader.load_state_dict(state["loaders"][self.dist.rank])
            self._set_rng_state(trainer_state["rng"][self.dist.rank])
            self.step = int(state["step"])
            self.elapsed_before = float(state.get("elapsed", 0.0))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{path} is not a usable checkpoint ({e}); delete it to resume from an "
                            "earlier one") from None

    def _session_time(self) -> float:
        return time.time() - self._t_start if hasattr(self, "_t_start") else 0.0

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.val_batches:
            with self._autocast():
                logits = self.model(x)
            total += lm_loss(logits, y)
        self.model.train()
        total /= len(self.val_batches)
        return distributed.all_reduce_mean(total, self.dist).item()

    def sample(self, max_new_tokens: int | None = None) -> str:
        from gpt2lab.generate import generate

        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        with self._autocast():
            ids = generate(self.model, [self.tokenizer.eot_id], max_new_tokens or self.cfg.sample_tokens,
                           temperature=1.0, top_k=50, eot_id=self.tokenizer.eot_id, generator=gen)
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> tuple[float, float, float]:
        cfg = self.cfg
        lr = lr_at(self.step, lr=cfg.lr, min_lr=self.min_lr, warmup_steps=cfg.warmup_steps,
                   max_steps=cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.train_loader.next_batch()
            last = micro == self.grad_accum - 1
            # gradients are averaged across processes only on the last micro-batch
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.train_model.no_sync()
            with sync:
                with self._autocast():
                    logits = self.train_model(x)
                loss = lm_loss(logits, y) / self.grad_accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        distributed.all_reduce_mean(loss_sum, self.dist)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            last = ckpt.list_checkpoints(self.out)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            raise NonFiniteLoss(f"the loss became {loss_value} at step {self.step + 1}; {where}; lower --lr "
                                f"(now {cfg.lr}) or --grad-clip, or change --dtype, then rerun with --resume")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_value, norm.item(), lr

    def run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        result = TrainResult(run_dir=str(self.out))
        if main:
            verb = f"resuming at step {self.step}" if self.resume_from else "training"
            console(f"{verb}: {self.model_config.n_layer} layers, {self.model.num_params():,} parameters "
                    f"on {self.device} ({str(self.dtype).replace('torch.', '')}), "
                    f"{self.total_batch_tokens:,} tokens per step = {cfg.batch_size} x {self.seq_len} x "
                    f"{self.grad_accum} accumulation x {self.dist.world_size} processes")
        self.model.train()
        self._t_start = time.time()
        steps_this_session, t_window, tokens_window, paused = 0, time.time(), 0, 0.0
        while self.step < cfg.max_steps:
            loss, norm, lr = self.train_step()
            steps_this_session += 1
            tokens_window += self.total_batch_tokens
            result.steps.append(self.step)
            result.losses.append(loss)
            first, last = steps_this_session == 1, self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or first or last:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t_window - paused  # evaluations and checkpoints do not count
                tok_s = tokens_window / dt if dt > 0 else 0.0
                t_window, tokens_window, paused = time.time(), 0, 0.0
                record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                          "tokens": self.step * self.total_batch_tokens, "tokens_per_sec": tok_s}
                line = (f"step {self.step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.2f} "
                        f"| {tok_s:,.0f} tok/s")
                if self.peak:
                    mfu = self.flops_per_token * tok_s / (self.peak * self.dist.world_size)
                    record["mfu"] = mfu
                    line += f" | mfu {100 * mfu:.1f}%"
                session = self._session_time()
                eta = session / steps_this_session * (cfg.max_steps - self.step)
                elapsed = format_seconds(self.elapsed_before + session)
                line += f" | {elapsed} elapsed | eta {format_seconds(eta)}"
                if main:
                    console(line)
                    self.logger.log(record)
            t_pause = time.time()
            if self.step % cfg.eval_every == 0 or last:
                val = self.evaluate()
                result.val_steps.append(self.step)
                result.val_losses.append(val)
                if main:
                    console(f"step {self.step}/{cfg.max_steps} | val loss {val:.4f}")
                    self.logger.log({"step": self.step, "val_loss": val,
                                     "tokens": self.step * self.total_batch_tokens})
            if cfg.sample_every and self.step % cfg.sample_every == 0 and not last and main:
                text = self.sample()
                console(f"--- sample at step {self.step} ---\n{text}\n---")
                self.logger.text("sample", text, self.step)
            if self.step % cfg.checkpoint_every == 0 or last:
                self._save_checkpoint()
            paused += time.time() - t_pause

        result.final_val_loss = result.val_losses[-1] if result.val_losses else self.evaluate()
        if main:
            self.save_final()
            self.logger.close()
        return result


def pretrain(cfg: TrainConfig) -> TrainResult:
    info = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, info).run()
    finally:
        distributed.teardown(info)
