"""Evaluation: measuring a model.

    scoring.py     the one measurement: log-probabilities of continuations after contexts, batched and packed
    benchmarks.py  loss / perplexity / bits per byte, HellaSwag, LAMBADA, multiple choice; evaluate_run
    data.py        where the test sets come from and how each file is read
    judge.py       instruction answers scored 0-100 by a larger model behind an OpenAI-compatible API
    checkable.py   tasks a program can check (arithmetic, countdown): pass@1 and pass@k; RL's rewards
    prompts.py     your own checkable task: a prompts file and a reward function
    ablate.py      variants of a model trained on the same data and budget, compared by held-out bits per byte
"""
