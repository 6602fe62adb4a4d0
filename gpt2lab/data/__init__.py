"""Data: text turned into token shards, and the batches read back from them.

    prepare.py  text (files, dirs, globs, JSONL, a Hugging Face dataset) -> a data dir of token shards
    shards.py   the data dir's format: meta.json, shard files, reading them back
    loader.py   batches of windows for pretraining (TokenLoader) and a torch Dataset of windows
    order.py    the one global data order: the same batches on any number of processes
    records.py  instruction records (Alpaca or chat), for SFT, the judge and instruction scoring

Raw text is read by gpt2lab.sources, which the tokenizer trainer shares.
"""
