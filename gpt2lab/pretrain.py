"""Pretraining: next-token prediction on a prepared data dir, as a task on the shared loop (train.py).

    gpt2lab pretrain --data DATA --model gpt2 --out RUN [--config run.toml] [flags]

The model comes from a preset and the model flags (every field of GPTConfig), or from another run
(`--init-from`, a LoRA run's adapters merged). Batches are windows of the data dir's train split in
the one global order (data.TokenLoader); validation is a fixed set of windows of its val split.
`--doc-mask` keeps the documents packed into a row apart: each attends only to itself, with
positions that restart at its <|endoftext|> (data.document_inputs).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2lab import checkpoint as ckpt
from gpt2lab.config import TrainConfig
from gpt2lab.data import document_inputs
from gpt2lab.errors import UserError
from gpt2lab.model import GPT, GPTConfig
from gpt2lab.model_config import derive
from gpt2lab.task import Task, TrainResult, held_out_mean, lm_loss, model_overrides, moe_terms
from gpt2lab.train import Trainer, run_task


class LMTask(Task):
    """Pretraining: next-token prediction on the windows of a prepared data dir."""

    name = "pretrain"
    cfg: TrainConfig

    def inputs(self) -> list[str]:
        return [p for p in (self.cfg.data, self.cfg.init_from) if p]

    def load(self, trainer: Trainer) -> None:
        from gpt2lab.data import check_tokenizer, read_meta
        from gpt2lab.tokenizer import load_tokenizer_file

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

    def model_config(self, stored: GPTConfig | None) -> GPTConfig:
        cfg = self.cfg
        if stored is not None:
            run = self.trainer.out
            base, source, sha, origin = stored, f"the run being resumed ({run})", \
                ckpt.open_run(run).tokenizer_sha256, run
        else:
            (base, source, sha), origin = self._source(), cfg.init_from
        if sha is not None and sha != self.tokenizer.fingerprint:
            raise UserError(f"{source} was trained with another tokenizer than the data in {cfg.data}; prepare "
                            f"the data with the run's tokenizer (`gpt2lab prepare --tokenizer {origin}`)")
        if not source:
            return base
        if stored is not None:  # a resumed run keeps its model (its dropout may change)
            overrides = model_overrides(cfg)
            for name, given in overrides.items():
                if name != "dropout" and given != getattr(base, name):
                    raise UserError(f"--{name.replace('_', '-')} {given} disagrees with {source} "
                                    f"({getattr(base, name)}); drop the flag")
            return GPTConfig.from_dict({**base.to_dict(), "dropout": overrides.get("dropout", base.dropout)})
        # the model comes from another run: only what a starting run allows may differ
        return derive(base, model_overrides(cfg), source)

    def build_model(self, model_config: GPTConfig, resuming: bool) -> torch.nn.Module:
        model = GPT(model_config)
        if self.cfg.init_from and not resuming:
            start, _ = ckpt.load_run(self.cfg.init_from, kind="lm", flag="--init-from")
            model.load_state_dict(start.state_dict())
        return model

    def train_loader(self, trainer: Trainer):
        from gpt2lab.data import TokenLoader

        cfg, dist = self.cfg, trainer.dist
        vocab = trainer.model_config.vocab_size
        loader = TokenLoader(cfg.data, "train", cfg.batch_size, trainer.seq_len, mode=cfg.data_order,
                             seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, device=trainer.device,
                             vocab_size=vocab)
        try:
            # the same windows on every process (each evaluates its share): val loss does not depend on W
            val = TokenLoader(cfg.data, "val", cfg.batch_size, trainer.seq_len, mode="sequential", seed=0,
                              device=trainer.device, vocab_size=vocab)
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
        loss = lm_loss(self._logits(model, x), y)
        extra, metrics = moe_terms(self.trainer.model)
        return loss + extra, metrics

    def evaluate(self, trainer: Trainer, model) -> dict:
        loss = held_out_mean(trainer, self.val_batches, lambda b: lm_loss(self._logits(model, b[0]), b[1]))
        return {"val_loss": loss}

    def sample(self, trainer: Trainer, model) -> str | None:
        from gpt2lab.generate import generate

        tok = self.tokenizer
        if not trainer.cfg.sample_tokens or tok.eot_id is None:
            return None
        gen = torch.Generator(device=trainer.device).manual_seed(trainer.cfg.seed + trainer.step)
        with trainer._autocast():
            ids = generate(model, [tok.eot_id], trainer.cfg.sample_tokens, temperature=1.0, top_k=50,
                           eot_id=tok.eot_id, generator=gen)
        return tok.decode(ids)


def pretrain(cfg: TrainConfig, given: dict | None = None) -> TrainResult:
    return run_task(cfg, LMTask(cfg), given)
