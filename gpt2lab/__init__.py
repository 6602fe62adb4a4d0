"""gpt2lab: GPT-2 built from scratch in PyTorch, as one tool that does the whole job."""

__version__ = "0.1.0"
