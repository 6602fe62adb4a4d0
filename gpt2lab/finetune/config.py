"""The fine-tuning commands' settings: each extends the loop's (gpt2lab.train.config.LoopConfig) with its
own fields and defaults, and carries only the model fields a starting run lets change (dropout, and for a
rotary model its context). Torch-free, like every config module, so that `--help` is instant.

    SFTConfig        instruction fine-tuning: + --init, records, chat format, LoRA
    ClassifyConfig   classification: + --init, data files and splits, what trains, LoRA
    RLConfig         reinforcement learning: + --init, the checkable task, sampling, the objective
"""

from __future__ import annotations

from gpt2lab.errors import UserError
from gpt2lab.model.config import STARTING_RUN_FIELDS
from gpt2lab.train.config import (
    FRACTION,
    NONNEG,
    POSITIVE,
    SCHEDULES,
    LoopConfig,
    finite_range,
    opt,
    with_model_fields,
)

# model fields that may differ from the starting run when fine-tuning (the rest come from it)
FINETUNE_MODEL_FIELDS = STARTING_RUN_FIELDS


@with_model_fields(FINETUNE_MODEL_FIELDS)
class SFTConfig(LoopConfig):
    """`gpt2lab finetune sft`."""

    init: str = opt("", "the run dir to fine-tune (from `gpt2lab pretrain` or `gpt2lab import-hf`; a LoRA "
                    "run starts from its merged weights)")
    data: str = opt("", "instruction records: Alpaca JSON/JSONL (instruction, input, output) or chat JSONL "
                    "(messages)")
    val_data: str | None = opt(None, "held-out records (default: every k-th record of --data, "
                               "k = 1/--val-fraction)")
    val_fraction: float = opt(0.1, "share of --data held out when --val-data is not given", check=FRACTION)
    template: str = opt("alpaca", "chat format of the run: alpaca or chat (data holding any chat record "
                        "uses chat)", choices=("alpaca", "chat"))
    lora_rank: int = opt(0, "train LoRA adapters of this rank instead of all weights (0: off)", check=NONNEG)
    lora_alpha: float = opt(16.0, "LoRA scale numerator (the update is alpha/rank * B A)",
                            check=finite_range(0, lo_open=True))
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", check=FRACTION)
    lora_targets: str = opt("all", "comma-separated layers to adapt: all (every linear layer of the blocks), "
                            "c_attn, c_proj, c_fc, attn, mlp, h.N, or any layer's name")
    lr: float = opt(1e-4, "peak learning rate", check=finite_range(0, 10, lo_open=True))
    freeze_embeddings: bool | None = opt(None, "keep the token embedding and the LM head (and learned positions) "
                                         "as they are; default: on for a run pretrained here, so that tokens "
                                         "the data never answers with stay reachable (README: Fine-tuning)")
    warmup_steps: int = opt(20, "steps of linear warmup", check=NONNEG)
    eval_every: int | None = opt(100, "evaluate every N steps (and at the end)", check=POSITIVE, resumable=True)
    seq_len: int | None = opt(None, "tokens per example, prompt and response together (default: the model's "
                              "context)", check=POSITIVE)

    def validate(self) -> None:
        if not self.init:
            raise UserError("no model to fine-tune; pass --init RUN_DIR (from `gpt2lab pretrain` or "
                            "`gpt2lab import-hf`)")
        if not self.data:
            raise UserError("no instruction data given; pass --data FILE (.json or .jsonl records)")
        super().validate()


TRAIN_MODES = ("all", "last-blocks", "head", "lora")


@with_model_fields(FINETUNE_MODEL_FIELDS)
class ClassifyConfig(LoopConfig):
    """`gpt2lab finetune classify`."""

    init: str = opt("", "the run dir to start from (a language model; a LoRA run's adapters are merged)")
    data: str | None = opt(None, "one file, split into train/val/test here")
    train: str | None = opt(None, "the training split (instead of --data)")
    val: str | None = opt(None, "the validation split (with --train)")
    test: str | None = opt(None, "the test split (with --train)")
    format: str | None = opt(None, "csv, tsv or jsonl (default: from the file extension)",
                             choices=("csv", "tsv", "jsonl"))
    text_field: str = opt("text", "the column or field holding the text")
    label_field: str = opt("label", "the column or field holding the label")
    columns: list[str] | None = opt(None, "column names of a CSV/TSV without a header line, e.g. label,text")
    labels: list[str] | None = opt(None, "the classes in id order (default: sorted, numerically when all are "
                                   "integers)")
    val_fraction: float = opt(0.1, "with --data: the validation share", check=finite_range(0, 1, hi_open=True))
    test_fraction: float = opt(0.2, "with --data: the test share", check=finite_range(0, 1, hi_open=True))
    balance: bool = opt(False, "downsample every class to the smallest's size")
    max_length: int | None = opt(None, "truncate texts to this many tokens (default: the longest training "
                                 "text, at most the model's context)", check=POSITIVE)
    train_mode: str = opt("last-blocks", "what trains: all, last-blocks (the last N blocks + final LayerNorm + "
                          "head), head, or lora (adapters + head)", choices=TRAIN_MODES)
    last_blocks: int = opt(1, "N for --train-mode last-blocks", check=POSITIVE)
    lora_rank: int = opt(0, "train LoRA adapters of this rank, and the head (0: off; as in finetune sft); it "
                         "sets --train-mode lora", check=NONNEG)
    lora_alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha/r", check=finite_range(0, lo_open=True))
    lora_dropout: float = opt(0.0, "dropout on the adapters' input", check=finite_range(0, 1, hi_open=True))
    lora_targets: str = opt("all", "layers to adapt: all (every linear layer of the blocks), c_attn, c_proj, "
                            "c_fc, attn.c_proj, mlp.c_proj, attn, mlp, h.N")
    random_init: bool = opt(False, "a baseline: keep --init's architecture and tokenizer but start from random "
                            "weights")
    keep_best: bool = opt(True, "keep the weights of the epoch with the best validation accuracy (else the last)")
    # the loop's settings, with classification's defaults
    DEFAULT_EPOCHS = 5.0
    epochs: float | None = opt(None, "passes over the training data (default 5, unless --max-steps is given); it "
                               "sets the number of steps", check=finite_range(0, lo_open=True))
    max_steps: int | None = opt(None, "optimizer steps (default: 5 epochs)", check=POSITIVE, resumable=True)
    batch_size: int = opt(8, "examples per micro-batch, per process (may change on --resume: the examples per step "
                          "stay the run's)", check=POSITIVE, resumable=True)
    lr: float = opt(5e-5, "AdamW learning rate", check=finite_range(0, 10, lo_open=True))
    lr_schedule: str = opt("constant", "constant (after the warmup) or cosine", choices=("cosine", "constant"))
    warmup_steps: int = opt(0, "steps of linear warmup", check=(lambda v: isinstance(v, int) and v >= 0,
                                                                "an integer >= 0"))
    beta2: float = opt(0.999, "AdamW beta2", check=finite_range(0, 1, hi_open=True))
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0: no clipping)", check=finite_range(0, 1e6))
    eval_every: int | None = opt(None, "evaluate every N steps (default: once per epoch)", check=POSITIVE,
                                 resumable=True)
    checkpoint_every: int | None = opt(None, "write a checkpoint every N steps (default: at every evaluation)",
                                       check=POSITIVE, resumable=True)
    sample_tokens: int = opt(0, "unused by classification", resumable=True)
    seed: int = opt(123, "seed of the splits, the head and the batch order",
                    check=(lambda v: isinstance(v, int) and 0 <= v < 2**63, "an integer from 0 to 2**63 - 1"))

    @classmethod
    def migrate_stored(cls, train: dict) -> dict:
        """Runs of an older gpt2lab stored a LoRA rank (8) whatever the train mode; only a LoRA run's counts."""
        if train.get("train_mode") not in (None, "lora"):
            train = {**train, "lora_rank": 0}
        return train

    def validate(self) -> None:
        if not self.init:
            raise UserError("no model to start from; pass --init RUN_DIR")
        if (self.data is None) == (self.train is None):
            raise UserError("give the data as --data FILE (split here) or as --train FILE [--val FILE "
                            "--test FILE], not both and not neither")
        if self.data is not None and (self.val or self.test):
            raise UserError("--val/--test go with --train; with --data the splits are made from "
                            "--val-fraction and --test-fraction")
        if self.epochs is not None and self.max_steps is not None:
            raise UserError(f"--epochs {self.epochs:g} and --max-steps {self.max_steps} both set the length of the "
                            "run; give one of them")
        super().validate()
        if self.strategy == "fsdp":
            raise UserError("--strategy fsdp is for pretrain and finetune sft; a classifier trains with ddp")
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError(f"--val-fraction {self.val_fraction} and --test-fraction {self.test_fraction} "
                            "must leave some examples to train on")
        if self.lora_rank and self.train_mode == "last-blocks":
            self.train_mode = "lora"  # --lora-rank R alone: adapters and the head train
        if self.train_mode == "lora" and not self.lora_rank:
            raise UserError("--train-mode lora needs --lora-rank R, the adapters' rank (8 is a good start)")
        if self.lora_rank and self.train_mode != "lora":
            raise UserError(f"--lora-rank {self.lora_rank} trains LoRA adapters and the head; it cannot go with "
                            f"--train-mode {self.train_mode}")

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]



@with_model_fields(("dropout",))
class RLConfig(LoopConfig):
    """`gpt2lab finetune rl`."""

    init: str = opt("", "the run dir to tune (an instruction-tuned model, usually: it should already answer in "
                    "its chat format, with a pass rate between about 0.2 and 0.7)")
    task: str | None = opt(None, "a built-in checkable task: arithmetic or countdown",
                           choices=("arithmetic", "countdown"))
    difficulty: int = opt(1, "the built-in task's difficulty, 1 to 5", check=POSITIVE)
    prompts: str | None = opt(None, "your own task: a JSONL file of records with \"prompt\" (and any other "
                              "fields), with --reward")
    reward: str | None = opt(None, "your own task's reward: PATH.py:FUNCTION, called as FUNCTION(prompt, "
                             "completion, record) -> float")
    val_prompts: str | None = opt(None, "your own task: held-out prompts (JSONL) to score each evaluation on, never "
                                  "trained on (default: every k-th record of --prompts, k = 1/--val-fraction)")
    val_fraction: float = opt(0.2, "your own task without --val-prompts: the share of --prompts held out",
                              check=FRACTION)
    format_reward: float = opt(0.0, "built-in tasks: the reward of a well-formed but wrong answer (partial credit)",
                               check=finite_range(0, 1, hi_open=True))
    group_size: int = opt(8, "samples per prompt; their rewards are compared with each other", check=POSITIVE)
    batch_size: int = opt(4, "prompts per micro-batch, per process (each sampled --group-size times; may change on "
                          "--resume: the prompts per step stay the run's)", check=POSITIVE, resumable=True)
    max_new_tokens: int = opt(64, "the longest answer sampled", check=POSITIVE)
    temperature: float = opt(1.0, "sampling temperature of the answers", check=finite_range(0, 10, lo_open=True))
    scale_advantages: bool = opt(False, "divide each group's advantages by its standard deviation (GRPO); off: "
                                 "mean-centred only")
    kl: float = opt(0.0, "the weight of a KL penalty to the starting model (0: none; the KL is logged anyway)",
                    check=finite_range(0, 100))
    clip: float = opt(0.2, "ratio clipping when samples serve more than one update",
                      check=finite_range(0, 10, lo_open=True))
    updates_per_batch: int = opt(1, "optimizer steps on each batch of samples (above 1: the clipped ratio matters)",
                                 check=POSITIVE)
    eval_prompts: int = opt(64, "held-out prompts scored greedily (pass@1) at each evaluation", check=POSITIVE)
    lr: float = opt(1e-5, "peak learning rate", check=finite_range(0, 10, lo_open=True))
    lr_schedule: str = opt("constant", "constant (after the warmup) or cosine", choices=SCHEDULES)
    warmup_steps: int = opt(0, "steps of linear warmup", check=NONNEG)
    max_steps: int = opt(200, "optimizer steps", check=POSITIVE, resumable=True)
    eval_every: int | None = opt(20, "evaluate every N steps (and at the end)", check=POSITIVE, resumable=True)
    checkpoint_every: int | None = opt(20, "write a checkpoint every N steps (and at the end)", check=POSITIVE,
                                       resumable=True)
    log_every: int = opt(1, "print and record metrics every N steps", check=POSITIVE, resumable=True)
    sample_tokens: int = opt(0, "unused by RL", resumable=True)
    weight_decay: float = opt(0.0, "AdamW weight decay, applied to matrices only", check=finite_range(0, 100))

    def validate(self) -> None:
        if not self.init:
            raise UserError("no model to tune; pass --init RUN_DIR (an instruction-tuned run, usually)")
        if (self.task is None) == (self.prompts is None):
            raise UserError("give a built-in --task (arithmetic, countdown) or your own --prompts FILE.jsonl with "
                            "--reward PATH.py:FUNCTION, one of the two")
        if (self.prompts is None) != (self.reward is None):
            raise UserError("--prompts and --reward go together: the prompts of your task and its reward function")
        if self.strategy == "fsdp":
            raise UserError("--strategy fsdp is for pretrain and finetune sft; RL trains with ddp")
        super().validate()
