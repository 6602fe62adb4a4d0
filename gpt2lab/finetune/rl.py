"""Reinforcement learning on checkable tasks: group-relative policy gradients, a task on the shared loop.

One optimizer step, for each prompt of the batch:

    sample     --group-size answers from the current model (one prefill, the rows decoded together)
    reward     each answer, by the task's checker (only the answer counts, not the thinking before it)
    advantage  A = reward - the group's mean reward (divided by the group's standard deviation with
               --scale-advantages); a group whose rewards are all equal teaches nothing and is skipped
    loss       over every sampled token of the informative groups, normalised by their number of tokens
               (longer answers weigh more, as in DAPO):  -min(ratio A, clip(ratio, 1 - c, 1 + c) A)
               with ratio = p_now(token) / p_sampled(token), 1 on the first update of a batch of samples;
               plus --kl x KL(model || starting model), off by default (k3 estimator, per token)

The loop (gpt2lab.train) does the rest: accumulation, clipping, the schedule, checkpoints (a resumed run
samples exactly the same answers: the sampling seed is a function of the run's seed and step), DDP,
logging. Logged each step: reward, pass_rate, response_length, informative (the share of groups with
different rewards), kl (to the starting model) and entropy; each evaluation: val_pass_at_1, greedy on
held-out prompts never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab.data.order import GlobalOrder
from gpt2lab.evals.checkable import CheckableTask, answer_text, get_task, score_task
from gpt2lab.evals.prompts import FileTask
from gpt2lab.finetune.base import FinetuneTask
from gpt2lab.finetune.config import RLConfig
from gpt2lab.generate import fit_to_context, generate_group
from gpt2lab.io import file_sha256
from gpt2lab.metrics import console
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.templates import encode_messages, get_format
from gpt2lab.train.config import defaults
from gpt2lab.train.loop import train_task


@dataclass
class PromptBatch:
    """One micro-batch of RL: this process's prompts, the seed to sample their answers with, which
    micro-batch of the optimizer step it is, and whether to sample (`fresh`) or to reuse the answers
    sampled for that micro-batch earlier (--updates-per-batch > 1: then `records` is None)."""

    records: list[dict] | None
    seed: int
    slot: int = 0
    fresh: bool = True


class PromptLoader:
    """Micro-batches of prompt records in the one global order: a built-in task's endless train stream, or a
    file's records shuffled per epoch. Rank r takes its slice of each micro-step's batch_size x W prompts.

    With --updates-per-batch U, the answers sampled in one optimizer step serve U steps: the micro-batches
    of the next U - 1 steps take no prompts and reuse them. The sampling seed is a function of the run's
    seed, the step, the micro-batch and the rank, so a resumed run draws exactly the same answers."""

    def __init__(self, task: CheckableTask, batch_size: int, seed: int, rank: int, world_size: int,
                 grad_accum: int = 1, updates_per_batch: int = 1):
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.grad_accum, self.updates_per_batch = grad_accum, updates_per_batch
        self.micro = 0  # micro-batches taken, over the whole run
        if isinstance(task, FileTask):
            self.order = GlobalOrder(len(task.records), batch_size, seed=seed, rank=rank, world_size=world_size)
        else:
            self.order, self.position, self.made = None, 0, []
            self.stream = task.prompts(seed, "train")

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch * self.updates_per_batch if self.order is not None else 10**9

    def _record(self, i: int) -> dict:
        while len(self.made) <= i:
            self.made.append(next(self.stream))
        return self.made[i]

    def _records(self) -> list[dict]:
        if self.order is not None:
            return [self.task.records[int(i)][1] for i in self.order.next_indices()]
        first = self.position + self.rank * self.batch_size
        self.position += self.batch_size * self.world_size
        return [self._record(i) for i in range(first, first + self.batch_size)]

    def next_batch(self) -> PromptBatch:
        step, slot = divmod(self.micro, self.grad_accum)
        fresh = step % self.updates_per_batch == 0
        seed = (self.seed * 1_000_003 + step * 1009 + self.rank * 101 + slot + 1) % 2**63
        self.micro += 1
        return PromptBatch(self._records() if fresh else None, seed, slot, fresh)

    def state_dict(self) -> dict:
        state = self.order.state_dict() if self.order is not None else {"position": self.position}
        return {**state, "micro": self.micro, "grad_accum": self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        if self.order is not None:
            self.order.load_state_dict(state, "prompts file")
        else:
            self.position = int(state["position"])
        # checkpoints fall between steps: a resumed run with another accumulation goes on at the same step
        self.micro = int(state.get("micro", 0)) // int(state.get("grad_accum", 1)) * self.grad_accum


class RLTask(FinetuneTask):
    name = "rl"
    command = "finetune rl"
    cfg: RLConfig

    def inputs(self) -> list[str]:
        return [p for p in (self.cfg.init, self.cfg.prompts, self.cfg.reward.rpartition(":")[0]
                            if self.cfg.reward else None) if p]

    def load(self) -> None:
        cfg = self.cfg
        self.open_start("RL")
        self.format = get_format(self.base.template)
        if cfg.task:
            self.rl_task = get_task(cfg.task, cfg.difficulty, cfg.format_reward)
            default = cfg.eval_prompts == defaults(RLConfig)["eval_prompts"]  # (all the task has, if fewer)
            self.eval_records = self.rl_task.heldout(cfg.eval_prompts, seed=0,
                                                     flag=None if default else "--eval-prompts")
            identity = {"task": cfg.task, "difficulty": cfg.difficulty}
        else:
            self.rl_task = FileTask(cfg.prompts, cfg.reward)
            first = self.rl_task.records[0][1]
            self.rl_task.reward(first, "")  # a function that cannot score a record fails now, not mid-run
            self.rl_task.hold_out(cfg.val_prompts, cfg.val_fraction)
            self.eval_records = self.rl_task.val_records[:cfg.eval_prompts]
            console(f"RL on your prompts: {self.rl_task.split}")
            identity = {"prompts": str(Path(cfg.prompts).resolve()), "reward": cfg.reward,
                        "records": len(self.rl_task.records), "sha256": file_sha256(cfg.prompts)}
            if cfg.val_prompts:
                identity["val_sha256"] = file_sha256(cfg.val_prompts)
        self.data_identity = identity
        self.rollouts: dict[int, dict] = {}  # each micro-batch slot's samples, kept for --updates-per-batch > 1

    def build_model(self, model_config: GPTConfig, resuming: bool) -> torch.nn.Module:
        start = self.start_model()
        self.reference = GPT(model_config).eval()  # the starting model, for the KL (never trained)
        self.reference.load_state_dict(start.state_dict())
        self.reference.requires_grad_(False)
        model = GPT(model_config)
        if not resuming:
            model.load_state_dict(start.state_dict())
        return model

    def seq_len(self, model_config: GPTConfig) -> int:
        return min(model_config.block_size, self.cfg.max_new_tokens)

    def train_loader(self):
        ctx = self.ctx
        self.reference.to(ctx.device)
        return PromptLoader(self.rl_task, self.cfg.batch_size, self.cfg.seed, ctx.dist.rank, ctx.dist.world_size,
                            ctx.grad_accum, self.cfg.updates_per_batch)

    # -------------------------------------------------------------- sampling and the loss

    def prompt_ids(self, record: dict) -> list[int]:
        return encode_messages(self.tokenizer, [{"role": "user", "content": record["prompt"]}], self.format,
                               add_generation_prompt=True)[0]

    @torch.no_grad()
    def _sample(self, records: list[dict], seed: int) -> dict:
        """Each prompt's group of answers, their rewards and advantages."""
        cfg, ctx = self.cfg, self.ctx
        model, block = ctx.model, ctx.model_config.block_size
        gen = torch.Generator(device=ctx.device).manual_seed(seed)
        prompts, samples, rewards = [], [], []
        for record in records:
            ids, room = fit_to_context(self.prompt_ids(record), cfg.max_new_tokens, block)
            group = generate_group(model, ids, cfg.group_size, room, cfg.temperature, generator=gen,
                                   stop_ids={self.tokenizer.eot_id})
            prompts.append(ids)
            samples.append(group)
            rewards.append([self.rl_task.reward(record, answer_text(self.tokenizer, self.format, s)) for s in group])
        return {"prompts": prompts, "samples": samples, "rewards": rewards, "old_logp": None}

    def loss(self, model, batch: PromptBatch):
        cfg = self.cfg
        if batch.fresh or batch.slot not in self.rollouts:
            self.rollouts = {} if batch.slot == 0 else self.rollouts
            self.rollouts[batch.slot] = self._sample(batch.records, batch.seed)
        ro = self.rollouts[batch.slot]
        device = self.ctx.device
        rewards = torch.tensor(ro["rewards"], dtype=torch.float32)  # (P, G)
        adv = rewards - rewards.mean(dim=1, keepdim=True)
        if cfg.scale_advantages:
            adv = adv / (rewards.std(dim=1, keepdim=True) + 1e-6)
        informative = (rewards.max(dim=1).values > rewards.min(dim=1).values)  # (P,)
        seqs = [p + s for p, group in zip(ro["prompts"], ro["samples"]) for s in group]
        starts = [len(p) for p, group in zip(ro["prompts"], ro["samples"]) for _ in group]
        T = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), T), self.tokenizer.eot_id, dtype=torch.long)
        y = torch.zeros((len(seqs), T), dtype=torch.long)
        answer = torch.zeros((len(seqs), T), dtype=torch.bool)  # the sampled tokens: the policy's actions
        for i, (s, start) in enumerate(zip(seqs, starts)):
            x[i, :len(s) - 1] = torch.tensor(s[:-1])
            y[i, :len(s) - 1] = torch.tensor(s[1:])
            answer[i, start - 1:len(s) - 1] = True
        x, y, answer = x.to(device), y.to(device), answer.to(device)
        logits = model(x).float()
        logp_all = F.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, y[..., None])[..., 0]  # (N, T)
        if ro["old_logp"] is None:  # the samples' probabilities under the model that drew them
            ro["old_logp"] = logp.detach().cpu().tolist()
        old = torch.tensor(ro["old_logp"], device=device)
        with torch.no_grad():
            ref = F.log_softmax(self.reference(x).float(), dim=-1).gather(-1, y[..., None])[..., 0]
        weight = answer & informative.repeat_interleave(cfg.group_size).to(device)[:, None]
        a = adv.reshape(-1).to(device)[:, None]
        ratio = torch.exp(logp - old)
        surrogate = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
        log_ratio = ref - logp
        kl = torch.exp(log_ratio) - log_ratio - 1  # k3: an unbiased, positive estimate of KL(model || start)
        n = weight.sum()
        if int(n) == 0:
            loss = logits.sum() * 0.0  # no informative group: no gradient (and every process still takes part)
        else:
            loss = -(surrogate * weight).sum() / n
            if cfg.kl:
                loss = loss + cfg.kl * (kl * weight).sum() / n
        answer_tokens = answer.sum().clamp(min=1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        correct = (rewards >= self.rl_task.correct_at).float()
        metrics = {"reward": rewards.mean(), "pass_rate": correct.mean(),
                   "response_length": answer.sum(dim=1).float().mean().cpu(),
                   "informative": informative.float().mean(),
                   "kl": ((kl * answer).sum() / answer_tokens).detach(),
                   "entropy": ((entropy * answer).sum() / answer_tokens).detach()}
        return loss, metrics

    # -------------------------------------------------------------- evaluation and the run dir

    def evaluate(self, model, step: int) -> dict:
        result = score_task(model, self.tokenizer, self.format, self.rl_task, self.eval_records,
                            max_new_tokens=self.cfg.max_new_tokens)
        return {"val_pass_at_1": result["pass_at_1"], "val_reward": result["mean_reward"]}

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts if self.cfg.updates_per_batch > 1 else {}}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = {int(k): v for k, v in (state.get("rollouts") or {}).items()}

    def run_config(self) -> dict:
        extra = {"base": {"run_dir": str(Path(self.cfg.init).resolve())}, "rl": self.data_identity}
        if self.base.template:
            extra["template"] = self.base.template
        return extra


def finetune_rl(cfg: RLConfig, given: dict | None = None):
    return train_task(cfg, RLTask, given)

