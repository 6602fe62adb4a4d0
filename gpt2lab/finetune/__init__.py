"""Fine-tuning a run dir: tasks on the shared training loop (sft.py, classify.py) and LoRA (lora.py).

Each writes an ordinary run dir; `gpt2lab.checkpoint.load_run` loads any of them.
"""

from gpt2lab.finetune.lora import LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora, save_lora

__all__ = ["LoRALinear", "apply_lora", "load_lora", "lora_state_dict", "merge_lora", "save_lora"]
