"""The training loop that every kind of training (a task, gpt2lab/task.py) runs on.

One optimizer step:
    for each of `grad_accum` micro-batches:     (B rows of T tokens, per process)
        loss, metrics = task.loss(model, batch); (loss / grad_accum).backward()
        (DDP syncs gradients on the last micro-batch only)
    clip the gradient norm; set the learning rate for this step; optimizer.step()

The `Trainer` owns everything that is the same for every objective: accumulation, clipping,
the schedule, mixed precision, compile, DDP, the run directory and its lock, checkpoints,
exact resume and logging. A `Task` (gpt2lab/task.py) owns what differs: its data and
batches, its loss, its evaluation, and what the run dir records.

The batch per step is `total_batch_tokens` = B * T * grad_accum * world_size, so the same run
gives the same updates on 1 process or N (up to float rounding). Checkpoints hold everything the
next step depends on (weights, optimizer moments, RNG states, the data position, the task's
state), so a run that is killed and resumed ends with the same bits as one that was not.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gpt2lab import checkpoint as ckpt
from gpt2lab import distributed, io
from gpt2lab.config import LoopConfig, build, explicit_settings, merge_for_resume
from gpt2lab.errors import UserError
from gpt2lab.metrics import MetricsLogger, console, format_seconds, peak_flops
from gpt2lab.optim import lr_at, make_optimizer
from gpt2lab.task import NonFiniteLoss, Task, TrainResult

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


# ------------------------------------------------------------------------------ the loop


class Trainer:
    def __init__(self, cfg: LoopConfig, task: Task, dist: distributed.DistInfo, given: dict | None = None):
        self.dist, self.task = dist, task
        self.out = Path(cfg.out) if cfg.out else None
        cfg = self._settings(cfg, given)
        cfg.validate()
        self.cfg, task.cfg = cfg, cfg
        self.device = dist.device
        self.dtype = _resolve_dtype(cfg.dtype, self.device)
        self.lock = None
        task.trainer = self
        self._created_out = self.out is not None and not self.out.exists()
        distributed.agree(dist, self._claim_out_dir)  # rank 0 checks and locks; every rank learns the outcome
        try:
            self._setup(cfg, task, dist)
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """A set-up that failed leaves nothing behind: the lock goes, and so does a run dir it created."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self._created_out and self.dist.is_main and not (self.out / ckpt.CONFIG_FILE).exists():
            (self.out / ".lock").unlink(missing_ok=True)
            try:
                self.out.rmdir()
            except OSError:
                pass

    def _setup(self, cfg: LoopConfig, task: Task, dist: distributed.DistInfo) -> None:
        task.load(self)

        stored = ckpt.open_run(self.out).model_config if self.resume_from is not None else None
        self.model_config = task.model_config(stored)
        if task.tokenizer is not None and self.model_config.vocab_size < task.tokenizer.vocab_size:
            raise UserError(f"the model's vocabulary ({self.model_config.vocab_size}) is smaller than the "
                            f"tokenizer's ({task.tokenizer.vocab_size})")

        # batch geometry
        self.seq_len = task.seq_len(self.model_config)
        if self.seq_len > self.model_config.block_size:
            raise UserError(f"--seq-len {self.seq_len} is longer than the model's context "
                            f"({self.model_config.block_size}); lower it or raise --block-size")
        micro_tokens = cfg.batch_size * self.seq_len * dist.world_size
        self.total_batch_tokens = cfg.total_batch_tokens or micro_tokens
        if self.total_batch_tokens % micro_tokens:
            raise UserError(
                f"--total-batch-tokens {self.total_batch_tokens} is not a multiple of batch-size x seq-len x "
                f"processes = {cfg.batch_size} x {self.seq_len} x {dist.world_size} = {micro_tokens}; "
                f"use a multiple of {micro_tokens}")
        self.grad_accum = self.total_batch_tokens // micro_tokens
        self.min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10

        # model and optimizer (every rank builds the same initial weights from the seed)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = task.build_model(self.model_config, resuming=self.resume_from is not None)
        self.model.to(self.device)
        if hasattr(self.model, "transformer"):
            self.model.transformer.activation_checkpointing = cfg.activation_checkpointing
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.fsdp = cfg.strategy == "fsdp"
        if self.fsdp:  # sharded first: the optimizer then holds the shards
            distributed.ensure_process_group(dist)
            self.train_model = distributed.wrap(self.model, "fsdp", dist, self.dtype, cfg.compile)
        self.optimizer = make_optimizer(
            self.model, kind=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
            betas=(cfg.beta1, cfg.beta2), decay_embeddings=cfg.decay_embeddings,
            device_type=self.device.type if not self.fsdp else "sharded", muon_lr=cfg.muon_lr,
            muon_momentum=cfg.muon_momentum)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

        self.train_loader = task.train_loader(self)
        per_epoch = max(1, math.ceil(self.train_loader.steps_per_epoch / self.grad_accum))
        self.steps_per_epoch = per_epoch
        self.max_steps = max(1, math.ceil(cfg.epochs * per_epoch)) if cfg.epochs is not None else cfg.max_steps
        self.eval_every = cfg.eval_every or per_epoch
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every

        self.step = 0
        self.elapsed_before = 0.0
        if self.resume_from is not None:
            self._restore(self.resume_from)

        if not self.fsdp:
            self.train_model = distributed.wrap(self.model, "ddp", dist, self.dtype, cfg.compile)

        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        self.peak = peak_flops(self.device)
        self.logger: MetricsLogger | None = None
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial_checkpoints(self.out)
            if self.resume_from is None:
                if task.tokenizer is not None:
                    task.tokenizer.save(self.out)
            self._write_config()
            self.logger = MetricsLogger(self.out, tensorboard=cfg.tensorboard,
                                        resume_step=self.step if self.resume_from is not None else None)
        distributed.barrier(dist)

    # ------------------------------------------------------------------ set-up

    def _settings(self, cfg: LoopConfig, given: dict | None) -> LoopConfig:
        """On --resume, the run's stored settings with the given ones that may change."""
        if not cfg.resume or self.out is None or not (self.out / ckpt.CONFIG_FILE).is_file():
            return cfg
        stored = ckpt.open_run(self.out, "--out").config
        given = explicit_settings(cfg) if given is None else given
        train = dict(stored.get("train") or {})
        if train.get("total_batch_tokens") is None and isinstance(stored.get("resolved"), dict):
            # an implied batch (one micro-batch per process) stays the run's batch on any number of processes
            train["total_batch_tokens"] = stored["resolved"].get("total_batch_tokens")
        given = dict(given)
        for name in ("data", "init", "init_from", "val_data", "train", "val", "test"):
            # a path given another way (relative, absolute) is the same setting when it names the same file
            if isinstance(given.get(name), str) and isinstance(train.get(name), str) and given[name] != train[name] \
                    and Path(given[name]).resolve() == Path(train[name]).resolve():
                given[name] = train[name]
        if not given.get("data") and isinstance(stored.get("data"), dict) and stored["data"].get("path") \
                and isinstance(train.get("data"), str) and train["data"]:
            train["data"] = stored["data"]["path"]  # the absolute path: resumable from any directory
        values = merge_for_resume(type(cfg), train, given)
        if "max_steps" in given:  # a new length replaces one derived from --epochs
            values["epochs"] = None
        if "data" in values and not values.get("data") and not given.get("data") \
                and isinstance(stored.get("data"), dict) and stored["data"].get("path"):
            values["data"] = stored["data"]["path"]  # (a classifier trained on --train files has no --data)
        return build(type(cfg), values)

    def _claim_out_dir(self) -> None:
        """Decide where this run starts from, and lock --out (rank 0)."""
        cfg, out = self.cfg, self.out
        self.resume_from = None
        has_run = (out / ckpt.CONFIG_FILE).is_file()
        if has_run:
            checkpoints = ckpt.list_checkpoints(out)
            finished = (out / ckpt.WEIGHTS_FILE).is_file()
            if not cfg.resume and (checkpoints or finished):
                raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose another "
                                "--out")
            if cfg.resume and checkpoints:
                self.resume_from = checkpoints[-1]
            elif cfg.resume and finished:
                raise UserError(f"--resume: {out} holds a finished run without checkpoints to continue from; "
                                "start a new run with --init-from it")
            # else: a run stopped before its first checkpoint simply starts again from step 0
        elif cfg.resume:
            raise UserError(f"--resume: {out} holds no run to continue; start it without --resume")
        if not has_run:
            io.check_output_dir(out, "run", flag="--out", inputs=self.task.inputs())
        else:
            io.check_not_an_input(out, self.task.inputs(), "--out")
        if self.dist.is_main:
            self.lock = io.RunLock(out)
            self.lock.acquire()
        if has_run and self.resume_from is None and self.dist.is_main:
            console(f"{out} has no checkpoint yet: starting it again from step 0")

    def _write_config(self) -> None:
        train = asdict(self.cfg)
        train["resume"] = False
        resolved = {"seq_len": self.seq_len, "total_batch_tokens": self.total_batch_tokens,
                    "grad_accum": self.grad_accum, "min_lr": self.min_lr, "max_steps": self.max_steps,
                    "world_size": self.dist.world_size, "dtype": str(self.dtype).replace("torch.", ""),
                    "device": str(self.device)}
        ckpt.write_run_config(self.out, self.model_config, tokenizer_identity=self.task.tokenizer.identity(),
                              kind=self.task.kind, task=self.task.name, train=train,
                              data=self.task.data_identity, extra={"resolved": resolved,
                                                                   **self.task.run_config()})

    def _autocast(self):
        if self.dtype == torch.float32 or self.fsdp:  # FSDP's policy casts the gathered weights itself
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    # ------------------------------------------------------------------ checkpoints

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
        """Every rank's RNG state is gathered; the data position and the task's state are global; rank 0
        writes."""
        rng = self._rng_state()
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        staged = None
        if self.fsdp:  # every process writes its shards of the weights and the optimizer state
            staged = ckpt.sharded_staging(self.out, self.step)
            if self.dist.is_main:
                shutil.rmtree(staged, ignore_errors=True)
                staged.mkdir(parents=True)
            distributed.barrier(self.dist)
            distributed.save_sharded(self.model, self.optimizer, staged / ckpt.SHARDED)
            distributed.barrier(self.dist)
        if self.dist.is_main:
            trainer_state = {"scaler": self.scaler.state_dict(), "rng": gathered}
            if not self.fsdp:
                trainer_state["optimizer"] = self.optimizer.state_dict()
            state = {"step": self.step, "elapsed": self.elapsed_before + self._session_time(),
                     "data": self.train_loader.state_dict(), "task": self.task.state_dict(),
                     "world_size": self.dist.world_size, "strategy": self.cfg.strategy, "max_steps": self.max_steps,
                     "tokens_seen": self.step * self.total_batch_tokens}
            try:
                ckpt.save_checkpoint(self.out, self.step, None if self.fsdp else self.model, trainer_state, state,
                                     keep=self.cfg.keep_checkpoints, staged=staged)
            except OSError as e:
                raise UserError(f"cannot write a checkpoint into {self.out} ({e.strerror}); free space or fix "
                                "the permissions, then rerun with --resume") from None
        distributed.barrier(self.dist)

    def _restore(self, path: Path) -> None:
        trainer_state, state = ckpt.load_checkpoint(path)
        written_with = state.get("strategy", "ddp")
        if written_with != self.cfg.strategy:
            raise UserError(f"{path} was written with --strategy {written_with}, but the run's config.json says "
                            f"{self.cfg.strategy}; the run dir is inconsistent, start a new run with --init-from it")
        if self.fsdp:
            distributed.load_sharded(self.model, self.optimizer, path / ckpt.SHARDED)
        else:
            ckpt.load_weights(self.model, path / ckpt.WEIGHTS_FILE)
        try:
            if state.get("world_size") != self.dist.world_size and "data" not in state:
                raise UserError(f"{path} was written by {state.get('world_size')} processes, this run has "
                                f"{self.dist.world_size}; resume with the same number of processes")
            if not self.fsdp:
                self.optimizer.load_state_dict(trainer_state["optimizer"])
            self.scaler.load_state_dict(trainer_state["scaler"])
            data = state["data"] if "data" in state else state["loaders"][self.dist.rank]
            self.train_loader.load_state_dict(data)
            rngs = trainer_state["rng"]
            self._set_rng_state(rngs[self.dist.rank % len(rngs)])
            self.task.load_state_dict(state.get("task") or {})
            self.step = int(state["step"])
            self.elapsed_before = float(state.get("elapsed", 0.0))
            if self.cfg.time_budget is not None and "max_steps" in state:  # the length fitted to the budget
                self.max_steps = int(state["max_steps"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{path} is not a usable checkpoint ({e}); delete it to resume from an "
                            "earlier one") from None

    BUDGET_PROBE = 5  # steps timed to fit the schedule to --time-budget

    def _fit_to_time_budget(self, steps: int) -> None:
        """With --time-budget: the run's length in steps, from the time the first steps took, so that the
        warmup and decay end when the budget does (every rank agrees on rank 0's estimate)."""
        per_step = self._session_time() / steps
        left = self.cfg.time_budget - self.elapsed_before - self._session_time()
        estimate = torch.tensor([self.step + max(0, int(left / max(per_step, 1e-9)))], dtype=torch.long)
        if self.dist.enabled:
            torch.distributed.broadcast(estimate, src=0)
        self.max_steps = max(self.step, int(estimate))
        if self.dist.is_main:
            console(f"time budget {self.cfg.time_budget:g} s: {self.max_steps} steps at {per_step:.3f} s a step")

    def _session_time(self) -> float:
        return time.time() - self._t_start if hasattr(self, "_t_start") else 0.0

    # ------------------------------------------------------------------ the loop

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        try:
            with self._autocast():
                return self.task.evaluate(self, self.model)
        finally:
            self.model.train()

    def train_step(self) -> tuple[float, float, float, dict]:
        cfg = self.cfg
        lr = lr_at(self.step, lr=cfg.lr, min_lr=self.min_lr, warmup_steps=cfg.warmup_steps,
                   max_steps=self.max_steps, schedule=cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.grad_accum):
            batch = self.train_loader.next_batch()
            last = micro == self.grad_accum - 1
            # gradients are averaged across processes only on the last micro-batch
            with distributed.gradient_sync(self.model, self.train_model, self.cfg.strategy, self.dist, last):
                with self._autocast():
                    loss, metrics = self.task.loss(self.train_model, batch)
                loss = loss / self.grad_accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                v = torch.as_tensor(v, dtype=torch.float32, device=self.device)
                sums[k] = sums.get(k, torch.zeros((), device=self.device)) + v.detach() / self.grad_accum
        distributed.all_reduce_mean(loss_sum, self.dist)
        for v in sums.values():
            distributed.all_reduce_mean(v, self.dist)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = distributed.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            last = ckpt.list_checkpoints(self.out)
            lower = f"a lower --lr (now {cfg.lr}) or --grad-clip"
            fix = (f"the last good checkpoint is {last[-1]}: resume from it with --resume --dtype fp32 if the run "
                   f"used bf16 or fp16, or train again with {lower} into a new --out" if last else
                   f"no checkpoint was written yet: run it again without --resume, with {lower} (it starts from "
                   "step 0)")
            raise NonFiniteLoss(f"the loss became {loss_value} at step {self.step + 1}; {fix}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        for module in self.model.modules():  # layers that adjust themselves between steps (MoE balance)
            if hasattr(module, "after_step"):
                module.after_step()
        self.step += 1
        return loss_value, norm, lr, {k: v.item() for k, v in sums.items()}

    def run(self) -> TrainResult:
        try:
            return self._run()
        except UserError:
            # bad input met during training (a reward that cannot score an answer, a corrupt shard) before the
            # first checkpoint: a run dir this process made holds nothing worth keeping
            if self.dist.is_main and self._created_out and not ckpt.list_checkpoints(self.out):
                if self.logger is not None:
                    self.logger.close()
                    self.logger = None
                self.lock.release() if self.lock is not None else None
                self.lock = None
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        finally:
            if self.logger is not None:
                self.logger.close()
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        result = TrainResult(run_dir=str(self.out), settings=cfg)
        if main:
            verb = f"resuming at step {self.step}" if self.resume_from else "training"
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            total = self.model.num_params()
            what = f"{total:,} parameters" + (f" ({trainable:,} trained)" if trainable != total else "")
            console(f"{verb}: {self.task.name}, {self.model_config.n_layer} layers, {what} on {self.device} "
                    f"({str(self.dtype).replace('torch.', '')}), {self.total_batch_tokens:,} tokens per step = "
                    f"{cfg.batch_size} x {self.seq_len} x {self.grad_accum} accumulation x "
                    f"{self.dist.world_size} processes, {self.max_steps} steps")
        self.model.train()
        self._t_start = time.time()
        steps_this_session, t_window, tokens_window, paused = 0, time.time(), 0, 0.0
        while self.step < self.max_steps:
            loss, norm, lr, extra = self.train_step()
            steps_this_session += 1
            tokens_window += self.total_batch_tokens
            result.steps.append(self.step)
            result.losses.append(loss)
            if cfg.time_budget is not None and steps_this_session == self.BUDGET_PROBE:
                self._fit_to_time_budget(steps_this_session)
            first, last = steps_this_session == 1, self.step == self.max_steps
            if self.step % cfg.log_every == 0 or first or last:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t_window - paused  # evaluations and checkpoints do not count
                tok_s = tokens_window / dt if dt > 0 else 0.0
                t_window, tokens_window, paused = time.time(), 0, 0.0
                record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                          "tokens": self.step * self.total_batch_tokens, "tokens_per_sec": tok_s, **extra}
                line = (f"step {self.step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.2f} "
                        + "".join(f"| {k} {v:.4g} " for k, v in extra.items()) + f"| {tok_s:,.0f} tok/s")
                if self.peak:
                    mfu = self.flops_per_token * tok_s / (self.peak * self.dist.world_size)
                    record["mfu"] = mfu
                    line += f" | mfu {100 * mfu:.1f}%"
                session = self._session_time()
                eta = session / steps_this_session * (self.max_steps - self.step)
                line += f" | {format_seconds(self.elapsed_before + session)} elapsed | eta {format_seconds(eta)}"
                if main:
                    console(line)
                    self.logger.log(record)
            t_pause = time.time()
            if self.step % self.eval_every == 0 or last:
                metrics = self.evaluate()
                if metrics:
                    result.evals.append({"step": self.step, **metrics})
                    if "val_loss" in metrics:
                        result.val_steps.append(self.step)
                        result.val_losses.append(metrics["val_loss"])
                    if main:
                        console(f"step {self.step}/{self.max_steps} | "
                                + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()
                                             if isinstance(v, float)))
                        self.logger.log({"step": self.step, **metrics,
                                         "tokens": self.step * self.total_batch_tokens})
            if cfg.sample_every and self.step % cfg.sample_every == 0 and not last and (main or self.fsdp):
                text = self.task.sample(self, self.model)  # (under FSDP every rank takes part in the forward)
                if text is not None and main:
                    console(f"--- sample at step {self.step} ---\n{text}\n---")
                    self.logger.text("sample", text, self.step)
            if self.step % self.checkpoint_every == 0 or last:
                self._save_checkpoint()
            paused += time.time() - t_pause

        if result.val_losses:
            result.final_val_loss = result.val_losses[-1]
        elif not result.evals:
            result.final_val_loss = self.evaluate().get("val_loss")
        final_model = self.model
        if self.fsdp:  # the whole model, gathered on rank 0: the run dir holds an ordinary model.safetensors
            full = distributed.full_state_dict(self.model)
            if main:
                final_model = self.task.build_model(self.model_config, resuming=True)
                final_model.load_state_dict(full)
        if main:
            try:
                self.task.save_final(self, final_model)
                self.task.finish(self, result)
            except OSError as e:
                raise UserError(f"cannot write the final weights into {self.out} ({e.strerror}); free space or "
                                "fix the permissions, then rerun with --resume") from None
        distributed.barrier(self.dist)
        return result


def run_task(cfg: LoopConfig, task: Task, given: dict | None = None) -> TrainResult:
    """Set up the process group (under torchrun), train, tear down."""
    info = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, task, info, given).run()
    finally:
        distributed.teardown(info)
