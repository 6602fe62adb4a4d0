"""Pretraining: next-token prediction on a prepared data dir, as a task on the shared loop (loop.py).

    gpt2lab pretrain --data DATA --model gpt2 --out RUN [--config run.toml] [flags]

The model comes from a preset and the model flags (every field of GPTConfig), or from another run
(`--init-from`, a LoRA run's adapters merged). Batches are windows of the data dir's train split in
the one global order (data.loader.TokenLoader); validation is a fixed set of windows of its val split.
`--doc-mask` keeps the documents packed into a row apart: each attends only to itself, with
positions that restart at its <|endoftext|> (model.masks.document_inputs).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2lab import checkpoint as ckpt
from gpt2lab.checkpoint import RunInfo
from gpt2lab.data.loader import TokenLoader
from gpt2lab.data.shards import check_tokenizer, read_meta
from gpt2lab.errors import UserError
from gpt2lab.generate import generate
from gpt2lab.model.config import GPTConfig, derive
from gpt2lab.model.gpt import GPT
from gpt2lab.model.masks import document_inputs
from gpt2lab.tokenizer import load_tokenizer_file
from gpt2lab.train.config import TrainConfig, model_overrides
from gpt2lab.train.loop import train_task
from gpt2lab.train.task import Task, TrainResult, held_out_mean, lm_loss


class LMTask(Task):
    """Pretraining: next-token prediction on the windows of a prepared data dir."""

    name = "pretrain"
    cfg: TrainConfig

    def inputs(self) -> list[str]:
        return [p for p in (self.cfg.data, self.cfg.init_from) if p]

    def load(self) -> None:
        cfg = self.cfg
        meta = read_meta(cfg.data)
        self.tokenizer = load_tokenizer_file(Path(cfg.data) / ckpt.TOKENIZER_FILE)
        check_tokenizer(meta, self.tokenizer)
        self.data_identity = {"path": str(Path(cfg.data).resolve()),
                              "tokens": {k: v["tokens"] for k, v in meta["splits"].items()},
                              "tokenizer_sha256": meta["tokenizer"]["sha256"]}

    def _source(self) -> tuple[GPTConfig, str, str]:
        """(model config, where it comes from, its tokenizer's sha256 or None)."""
        cfg = self.cfg
        if cfg.init_from:
            info = ckpt.open_run(cfg.init_from, "--init-from")
            if info.kind != "lm":
                raise UserError(f"--init-from {cfg.init_from} is a classifier; start from a language model run")
            return info.model_config, f"--init-from {cfg.init_from}", info.tokenizer_sha256
        overrides = model_overrides(cfg)
        return GPTConfig.from_preset(cfg.model, vocab_size=self.tokenizer.vocab_size, **overrides), "", None

    def model_config(self, resumed: RunInfo | None) -> GPTConfig:
        cfg = self.cfg
        if resumed is not None:  # a resumed run keeps its model (its dropout may change)
            base, source = resumed.model_config, f"the run being resumed ({resumed.path})"
            overrides = model_overrides(cfg)
            for name, given in overrides.items():
                if name != "dropout" and given != getattr(base, name):
                    raise UserError(f"--{name.replace('_', '-')} {given} disagrees with {source} "
                                    f"({getattr(base, name)}); drop the flag")
            return GPTConfig.from_dict({**base.to_dict(), "dropout": overrides.get("dropout", base.dropout)})
        base, source, sha = self._source()
        if sha is not None and sha != self.tokenizer.fingerprint:
            raise UserError(f"{source} was trained with another tokenizer than the data in {cfg.data}; prepare "
                            f"the data with the run's tokenizer (`gpt2lab prepare --tokenizer {cfg.init_from}`)")
        if not source:
            return base
        # the model comes from another run: only what a starting run allows may differ
        return derive(base, model_overrides(cfg), source)

    def build_model(self, model_config: GPTConfig, resuming: bool) -> torch.nn.Module:
        model = GPT(model_config)
        if self.cfg.init_from and not resuming:
            start, _ = ckpt.load_run(self.cfg.init_from, kind="lm", flag="--init-from")
            model.load_state_dict(start.state_dict())
        return model

    def train_loader(self):
        cfg, ctx = self.cfg, self.ctx
        dist, vocab = ctx.dist, ctx.model_config.vocab_size
        loader = TokenLoader(cfg.data, "train", cfg.batch_size, ctx.seq_len, mode=cfg.data_order,
                             seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, device=ctx.device,
                             vocab_size=vocab)
        try:
            # the same windows on every process (each evaluates its share): val loss does not depend on W
            val = TokenLoader(cfg.data, "val", cfg.batch_size, ctx.seq_len, mode="sequential", seed=0,
                              device=ctx.device, vocab_size=vocab)
        except UserError as e:
            raise UserError(f"validation split: {e}") from None
        self.val_batches = [val.next_batch() for _ in range(cfg.eval_batches)]
        return loader

    def _logits(self, model, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.doc_mask and self.tokenizer.eot_id is not None:
            positions, mask = document_inputs(x, self.tokenizer.eot_id)
            if mask is not None:
                return model(x, positions=positions, mask=mask)
        return model(x)

    def loss(self, model, batch):
        x, y = batch
        return lm_loss(self._logits(model, x), y), {}

    def evaluate(self, model, step: int) -> dict:
        return {"val_loss": held_out_mean(self.ctx, self.val_batches,
                                          lambda b: lm_loss(self._logits(model, b[0]), b[1]))}

    def sample(self, model, step: int) -> str | None:
        tok, ctx = self.tokenizer, self.ctx
        if not self.cfg.sample_tokens or tok.eot_id is None:
            return None
        gen = torch.Generator(device=ctx.device).manual_seed(self.cfg.seed + step)
        with ctx.autocast():
            ids = generate(model, [tok.eot_id], self.cfg.sample_tokens, temperature=1.0, top_k=50,
                           eot_id=tok.eot_id, generator=gen)
        return tok.decode(ids)


def pretrain(cfg: TrainConfig, given: dict | None = None) -> TrainResult:
    return train_task(cfg, LMTask, given)
