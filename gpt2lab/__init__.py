"""gpt2lab: GPT-2 built from scratch in PyTorch, as one tool that does the whole job."""

__version__ = "0.1.0"


def load(run_dir, device="cpu"):
    """(model, tokenizer) from any run dir: trained here, fine-tuned or imported."""
    from gpt2lab.checkpoint import load_run

    return load_run(run_dir, device=device)
