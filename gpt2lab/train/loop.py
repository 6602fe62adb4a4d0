"""The training loop that every kind of training (a task, gpt2lab/train/task.py) runs on.

One optimizer step:
    for each of `grad_accum` micro-batches:     (B rows of T tokens, per process)
        loss, metrics = task.loss(model, batch) (+ the experts' balance loss, for a mixture of experts)
        (loss / grad_accum).backward()          (DDP syncs gradients on the last micro-batch only)
    clip the gradient norm; set the learning rate for this step; optimizer.step()

The `Trainer` owns everything that is the same for every objective: accumulation, clipping, the
schedule, mixed precision, compile, DDP/FSDP, the auxiliary losses, logging; the run dir and its lock
(rundir.py) and exact resume (resume.py) are its helpers. A `Task` owns what differs: its data and
batches, its loss, its evaluation, and what the run dir records.

The batch per step is `total_batch_tokens` = B * T * grad_accum * world_size, so the same run gives the
same updates on 1 process or N (up to float rounding). A run that is killed and resumed ends with the
same bits as one that was not.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import torch

from gpt2lab.checkpoint import open_run
from gpt2lab.device import autocast, peak_flops, resolve_dtype
from gpt2lab.errors import Interrupted, UserError
from gpt2lab.metrics import MetricsLogger, console, format_seconds
from gpt2lab.model.options import collect_moe
from gpt2lab.train import distributed, resume, rundir
from gpt2lab.train.checkpoints import clean_partial_checkpoints, list_checkpoints
from gpt2lab.train.config import LoopConfig
from gpt2lab.train.optim import lr_at, make_optimizer
from gpt2lab.train.plan import count_params, flops_per_token
from gpt2lab.train.task import Context, NonFiniteLoss, Task, TrainResult


class Trainer:
    """Trains `task_class(settings)` into the run dir cfg.out: `Trainer(cfg, LMTask, dist).run()`."""

    BUDGET_PROBE = 6  # steps run (all but the first timed) before the schedule is fitted to --time-budget

    def __init__(self, cfg: LoopConfig, task_class, dist: distributed.DistInfo, given: dict | None = None):
        self.dist = dist
        cfg = rundir.resolve_settings(cfg, given)
        cfg.validate()
        self.cfg, self.task = cfg, task_class(cfg)
        self.out = Path(cfg.out)
        self.device = dist.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.fsdp = cfg.strategy == "fsdp"
        self.claim = rundir.Claim(self.out, created=not self.out.exists())
        # rank 0 checks and locks; every rank learns the outcome
        distributed.agree(dist, lambda: rundir.claim(cfg, self.task.inputs(), dist, self.claim))
        try:
            self._setup()
        except BaseException:
            self.claim.abandon(dist)
            raise

    def _setup(self) -> None:
        cfg, task, dist = self.cfg, self.task, self.dist
        task.load()
        resuming = self.claim.resume_from is not None
        from_run = None
        if resuming:
            from_run = open_run(self.out)
            if task.tokenizer is not None and from_run.tokenizer_sha256 != task.tokenizer.fingerprint:
                given = task.inputs()[0] if task.inputs() else "the data given"
                raise UserError(f"the run being resumed ({self.out}) was trained with another tokenizer than the "
                                f"data in {given}; resume with the run's own data, or prepare the data with its "
                                f"tokenizer (`gpt2lab prepare --tokenizer {self.out}`)")
        self.model_config = task.model_config(from_run)
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
            if resuming:
                raise UserError(
                    f"--batch-size {cfg.batch_size}: a micro-batch of {cfg.batch_size} x {self.seq_len} x "
                    f"{dist.world_size} processes = {micro_tokens} tokens does not divide the run's "
                    f"{self.total_batch_tokens} tokens per step; a resumed run keeps its tokens per step, choose "
                    "a --batch-size (and number of processes) that divides them")
            raise UserError(
                f"--total-batch-tokens {self.total_batch_tokens} is not a multiple of batch-size x seq-len x "
                f"processes = {cfg.batch_size} x {self.seq_len} x {dist.world_size} = {micro_tokens}; "
                f"use a multiple of {micro_tokens}")
        self.grad_accum = self.total_batch_tokens // micro_tokens
        self.min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10

        # model and optimizer (every rank builds the same initial weights from the seed)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = task.build_model(self.model_config, resuming=resuming)
        self.model.to(self.device)
        if cfg.activation_checkpointing:
            distributed.checkpoint_blocks(self.model)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.fsdp:  # sharded first: the optimizer then holds the shards
            distributed.ensure_process_group(dist)
            self.train_model = distributed.wrap(self.model, "fsdp", dist, self.dtype, cfg.compile)
        self.optimizer = make_optimizer(
            self.model, kind=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
            betas=(cfg.beta1, cfg.beta2), decay_embeddings=cfg.decay_embeddings,
            device_type=self.device.type if not self.fsdp else "sharded", muon_lr=cfg.muon_lr,
            muon_momentum=cfg.muon_momentum)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

        task.setup(Context(cfg=cfg, model=self.model, model_config=self.model_config, device=self.device,
                           dtype=self.dtype, dist=dist, seq_len=self.seq_len, grad_accum=self.grad_accum,
                           out=self.out, autocast=self.autocast))
        self.train_loader = task.train_loader()
        per_epoch = max(1, math.ceil(self.train_loader.steps_per_epoch / self.grad_accum))
        self.steps_per_epoch = per_epoch
        epochs = cfg.epochs if cfg.epochs is not None or cfg.max_steps is not None else cfg.DEFAULT_EPOCHS
        self.max_steps = max(1, math.ceil(epochs * per_epoch)) if epochs is not None else cfg.max_steps
        self.eval_every = cfg.eval_every or per_epoch
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every

        self.step = 0
        self.elapsed_before = 0.0
        if resuming:
            rundir.check_same_data(from_run, task.data_identity)
            resume.restore(self, self.claim.resume_from)
            if self.max_steps < self.step:  # refused before config.json is written: nothing changes
                raise UserError(f"--max-steps {self.max_steps} is below the step the run in {self.out} has reached "
                                f"({self.step}); pass a larger --max-steps to train on (the run is unchanged)")

        if not self.fsdp:
            self.train_model = distributed.wrap(self.model, "ddp", dist, self.dtype, cfg.compile)

        self.flops_per_token = flops_per_token(self.model, self.seq_len)
        self.peak = peak_flops(self.device)
        self.logger: MetricsLogger | None = None
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_partial_checkpoints(self.out)
            if not resuming and task.tokenizer is not None:
                task.tokenizer.save(self.out)
            rundir.write_config(self.out, cfg, task, self.model_config, {
                "seq_len": self.seq_len, "total_batch_tokens": self.total_batch_tokens,
                "grad_accum": self.grad_accum, "min_lr": self.min_lr, "max_steps": self.max_steps,
                "world_size": dist.world_size, "dtype": str(self.dtype).replace("torch.", ""),
                "device": str(self.device)})
            self.logger = MetricsLogger(self.out, tensorboard=cfg.tensorboard,
                                        resume_step=self.step if resuming else None)
        distributed.barrier(dist)

    def autocast(self):
        """The run's mixed precision (FSDP's policy casts the gathered weights itself)."""
        return autocast(self.device, None if self.fsdp else self.dtype)

    def elapsed(self) -> float:
        """Seconds of training so far, earlier sessions of a resumed run included."""
        return self.elapsed_before + self._session_time()

    def _session_time(self) -> float:
        return time.time() - self._t_start if hasattr(self, "_t_start") else 0.0

    def _fit_to_time_budget(self, steps: int) -> None:
        """With --time-budget: the run's length in steps, from the time the first steps took, so that the
        warmup and decay end when the budget does (all ranks take rank 0's estimate). The first step, which
        holds torch.compile's compilation and the first allocations, is not timed."""
        per_step = (time.time() - self._t_first_step) / (steps - 1)
        left = self.cfg.time_budget - self.elapsed()
        estimate = torch.tensor([self.step + max(0, int(left / max(per_step, 1e-9)))], dtype=torch.long)
        if self.dist.enabled:
            torch.distributed.broadcast(estimate, src=0)
        self.max_steps = max(self.step, int(estimate))
        if self.dist.is_main:
            console(f"time budget {self.cfg.time_budget:g} s: {self.max_steps} steps at {per_step:.3f} s a step")

    def warmup_steps(self) -> int:
        """--warmup-steps, or a tenth of a run that is shorter than it (said once): a run that ends inside its
        warmup would never reach its learning rate."""
        warmup = self.cfg.warmup_steps
        if warmup < self.max_steps:
            return warmup
        clamped = self.max_steps // 10
        if self.dist.is_main and getattr(self, "_warned_warmup", None) != self.max_steps:
            self._warned_warmup = self.max_steps
            console(f"note: --warmup-steps {warmup} is not shorter than the run ({self.max_steps} steps); warming up "
                    f"for {clamped} steps instead")
        return clamped

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        try:
            with self.autocast():
                return self.task.evaluate(self.model, self.step)
        finally:
            self.model.train()

    def _micro_step(self, batch, sums: dict, moe_loads: dict) -> torch.Tensor:
        """One micro-batch's forward (the task's loss plus the experts' balance loss) and backward."""
        with self.autocast(), collect_moe() as moe:
            loss, metrics = self.task.loss(self.train_model, batch)
            if moe.layers:  # a mixture of experts: every task balances it the same way
                aux = moe.aux_loss()
                if self.model_config.moe_balance == "loss":
                    loss = loss + self.model_config.moe_aux_weight * aux
                metrics = {**metrics, "moe_aux": aux.detach(), "moe_max_load": moe.max_load()}
                for layer, load in zip(moe.layers, moe.loads):
                    moe_loads[layer] = moe_loads.get(layer, 0) + load
        loss = loss / self.grad_accum
        self.scaler.scale(loss).backward()
        for k, v in metrics.items():
            v = torch.as_tensor(v, dtype=torch.float32, device=self.device)
            sums[k] = sums.get(k, torch.zeros((), device=self.device)) + v.detach() / self.grad_accum
        return loss.detach()

    def train_step(self) -> tuple[float, float, float, dict]:
        cfg = self.cfg
        lr = lr_at(self.step, lr=cfg.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps(),
                   max_steps=self.max_steps, schedule=cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        moe_loads: dict = {}
        for micro in range(self.grad_accum):
            batch = self.train_loader.next_batch()
            last = micro == self.grad_accum - 1
            # gradients are averaged across processes only on the last micro-batch
            with distributed.gradient_sync(self.model, self.train_model, cfg.strategy, self.dist, last):
                loss_sum += self._micro_step(batch, sums, moe_loads)
        distributed.all_reduce_mean(loss_sum, self.dist)
        for v in sums.values():
            distributed.all_reduce_mean(v, self.dist)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = distributed.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            last = list_checkpoints(self.out)
            lower = f"a lower --lr (now {cfg.lr}) or --grad-clip"
            fix = (f"the last good checkpoint is {last[-1]}: resume from it with --resume --dtype fp32 if the run "
                   f"used bf16 or fp16, or train again with {lower} into a new --out" if last else
                   f"no checkpoint was written yet: run it again without --resume, with {lower} (it starts from "
                   "step 0)")
            raise NonFiniteLoss(f"the loss became {loss_value} at step {self.step + 1}; {fix}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        for layer, load in moe_loads.items():  # the experts' loss-free balance moves after the step
            if self.dist.enabled:
                torch.distributed.all_reduce(load)  # every process ends with the same bias
            layer.update_bias(load)
        self.step += 1
        return loss_value, norm, lr, {k: v.item() for k, v in sums.items()}

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        try:
            return self._run()
        except (UserError, Interrupted):
            # bad input met during training (a reward that cannot score an answer, a corrupt shard) before the
            # first checkpoint: a run dir this process made holds nothing worth keeping
            if self.dist.is_main and self.claim.created and not list_checkpoints(self.out):
                if self.logger is not None:
                    self.logger.close()
                    self.logger = None
                self.claim.release()
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        finally:
            if self.logger is not None:
                self.logger.close()
            self.claim.release()

    def _log_step(self, loss: float, norm: float, lr: float, extra: dict, tok_s: float, session_steps: int):
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                  "tokens": self.step * self.total_batch_tokens, "tokens_per_sec": tok_s, **extra}
        line = (f"step {self.step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.2f} "
                + "".join(f"| {k} {v:.4g} " for k, v in extra.items()) + f"| {tok_s:,.0f} tok/s")
        if self.peak:
            mfu = self.flops_per_token * tok_s / (self.peak * self.dist.world_size)
            record["mfu"] = mfu
            line += f" | mfu {100 * mfu:.1f}%"
        eta = self._session_time() / session_steps * (self.max_steps - self.step)
        line += f" | {format_seconds(self.elapsed())} elapsed | eta {format_seconds(eta)}"
        if self.dist.is_main:
            console(line)
            self.logger.log(record)

    def _evaluation(self, result: TrainResult) -> None:
        metrics = self.evaluate()
        if not metrics:
            return
        result.evals.append({"step": self.step, **metrics})
        if "val_loss" in metrics:
            result.val_steps.append(self.step)
            result.val_losses.append(metrics["val_loss"])
        if self.dist.is_main:
            console(f"step {self.step}/{self.max_steps} | " + " | ".join(
                f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
            self.logger.log({"step": self.step, **metrics, "tokens": self.step * self.total_batch_tokens})

    def _run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.is_main
        result = TrainResult(run_dir=str(self.out), settings=cfg, task=self.task)
        if main:
            verb = f"resuming at step {self.step}" if self.claim.resume_from else "training"
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            total = count_params(self.model)
            what = f"{total:,} parameters" + (f" ({trainable:,} trained)" if trainable != total else "")
            console(f"{verb}: {self.task.name}, {self.model_config.n_layer} layers, {what} on {self.device} "
                    f"({str(self.dtype).replace('torch.', '')}), {self.total_batch_tokens:,} tokens per step = "
                    f"{cfg.batch_size} x {self.seq_len} x {self.grad_accum} accumulation x "
                    f"{self.dist.world_size} processes, {self.max_steps} steps")
        self.model.train()
        self._t_start = time.time()
        stop = resume.CtrlC(enabled=self.dist.world_size == 1)
        with stop:
            self._steps(result, stop)
        if result.val_losses:
            result.final_val_loss = result.val_losses[-1]
        elif not result.evals:
            result.final_val_loss = self.evaluate().get("val_loss")
        self._save_final(result)
        return result

    def _steps(self, result: TrainResult, stop: resume.CtrlC) -> None:
        cfg, main = self.cfg, self.dist.is_main
        session_steps, t_window, tokens_window, paused = 0, time.time(), 0, 0.0
        while self.step < self.max_steps:
            if stop.asked:  # Ctrl-C: a checkpoint of the last whole step, then the way back
                stop.finish(self, saved=session_steps == 0 or self.step % self.checkpoint_every == 0)
            loss, norm, lr, extra = self.train_step()
            session_steps += 1
            if session_steps == 1:
                self._t_first_step = time.time()
            tokens_window += self.total_batch_tokens
            result.steps.append(self.step)
            result.losses.append(loss)
            if cfg.time_budget is not None and session_steps == self.BUDGET_PROBE:
                self._fit_to_time_budget(session_steps)
            first, last = session_steps == 1, self.step == self.max_steps
            if self.step % cfg.log_every == 0 or first or last:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t_window - paused  # evaluations and checkpoints do not count
                self._log_step(loss, norm, lr, extra, tokens_window / dt if dt > 0 else 0.0, session_steps)
                t_window, tokens_window, paused = time.time(), 0, 0.0
            t_pause = time.time()
            if self.step % self.eval_every == 0 or last:
                self._evaluation(result)
            if cfg.sample_every and self.step % cfg.sample_every == 0 and not last and (main or self.fsdp):
                text = self.task.sample(self.model, self.step)  # (under FSDP every rank takes part)
                if text is not None and main:
                    console(f"--- sample at step {self.step} ---\n{text}\n---")
                    self.logger.text("sample", text, self.step)
            if self.step % self.checkpoint_every == 0 or last:
                resume.save(self)
            paused += time.time() - t_pause

    def _save_final(self, result: TrainResult) -> None:
        final_model = self.model
        if self.fsdp:  # the whole model, gathered on rank 0: the run dir holds an ordinary model.safetensors
            full = distributed.full_state_dict(self.model)
            if self.dist.is_main:
                final_model = self.task.build_model(self.model_config, resuming=True)
                final_model.load_state_dict(full)
        if self.dist.is_main:
            try:
                self.task.save_final(final_model)
                self.task.finish(result)
            except OSError as e:
                raise UserError(f"cannot write the final weights into {self.out} ({e.strerror}); free space or "
                                "fix the permissions, then rerun with --resume") from None
        distributed.barrier(self.dist)


def train_task(cfg: LoopConfig, task_class: type[Task], given: dict | None = None) -> TrainResult:
    """Set up the process group (under torchrun), train `task_class(settings)`, tear down."""
    info, result = distributed.setup(cfg.device), None
    try:
        result = Trainer(cfg, task_class, info, given).run()
        return result
    finally:
        distributed.teardown(info, finished=result is not None)
