"""Fine-tuning a pretrained run: LoRA adapters (lora.py) and text classification (classify.py).

Both write ordinary run dirs with a few extra entries in config.json ("task",
"labels", "head", "lora"); `load_lora_run` loads any of them.
"""

from gpt2lab.finetune.lora import (
    LoRALinear,
    apply_lora,
    load_lora,
    load_lora_run,
    lora_state_dict,
    merge_lora,
    merge_lora_run,
    save_lora,
)

__all__ = ["LoRALinear", "apply_lora", "load_lora", "load_lora_run", "lora_state_dict", "merge_lora",
           "merge_lora_run", "save_lora"]
