"""Training: one loop that every objective runs on, and what it needs.

    config.py       the loop's settings and pretraining's (torch-free, for --help); config files
    task.py         the task seam: what a kind of training supplies, and the Context the loop hands it
    loop.py         the Trainer: accumulation, clipping, schedule, mixed precision, compile, DDP/FSDP, logging
    rundir.py       the run dir: settings on --resume, claiming and locking it, its config.json
    resume.py       exact resume: what a checkpoint holds besides the weights
    checkpoints.py  the checkpoints/step_N directories
    pretrain.py     pretraining, the first task: next-token prediction on a data dir
    optim.py        AdamW (torch's and written out), Muon, the learning-rate schedule
    distributed.py  torchrun set-up, DDP and FSDP2, activation checkpointing
    plan.py         counting parameters and FLOPs; `pretrain --dry-run`
"""
