"""Fine-tuning a run dir: tasks on the shared training loop (gpt2lab.train), each writing an ordinary run dir.

    config.py        the commands' settings (torch-free, for --help)
    sft.py           instruction fine-tuning: the loss on the answers only (full weights or LoRA)
    classify.py      a text classifier: a linear head on the last token (classify_data.py: its files)
    rl.py            reinforcement learning on checkable tasks (group-relative policy gradient)
    instructions.py  instruction sets: checkable synthetic tasks and Q/A material; scoring a tuned model
"""
