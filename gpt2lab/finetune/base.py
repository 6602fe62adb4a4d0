"""What every fine-tuning task shares: the run it starts from (--init) and the model it trains."""

from __future__ import annotations

from gpt2lab import checkpoint as ckpt
from gpt2lab.checkpoint import RunInfo
from gpt2lab.errors import UserError
from gpt2lab.model.config import GPTConfig, derive
from gpt2lab.train.config import model_overrides
from gpt2lab.train.task import Task


class FinetuneTask(Task):
    """A task that starts from the run in --init: its model (with the dropout, and for a rotary model the
    context, a starting run lets change) and its tokenizer."""

    def open_start(self, purpose: str, classifier_ok: bool = False, need_eot: bool = True) -> None:
        """Open --init: self.base (its RunInfo) and self.tokenizer. `purpose` completes "... starts from a
        language model" in the message for a classifier."""
        init = self.cfg.init
        self.base = ckpt.open_run(init, "--init")
        if self.base.kind == "classifier" and not classifier_ok:
            raise UserError(f"--init {init} is a classifier; {purpose} starts from a language model (a run dir "
                            "made by `gpt2lab pretrain`, `finetune sft` or `import-hf`)")
        self.tokenizer = ckpt.load_tokenizer(self.base)
        if need_eot and self.tokenizer.eot_id is None:
            raise UserError(f"the tokenizer of --init {init} has no <|endoftext|> token to end answers with")

    def model_config(self, resumed: RunInfo | None) -> GPTConfig:
        dropout = getattr(self.cfg, "dropout", None)
        if resumed is not None:  # a resumed run keeps its model; its dropout may change
            stored = resumed.model_config
            return GPTConfig.from_dict({**stored.to_dict(), "dropout": dropout if dropout is not None
                                        else stored.dropout})
        return derive(self.base.model_config, model_overrides(self.cfg), f"--init {self.cfg.init}")

    def start_model(self):
        """The language model of --init (LoRA adapters merged), whose weights the task starts from."""
        model, _ = ckpt.load_run(self.cfg.init, kind="lm", flag="--init")
        return model
