"""Models in and out: Hugging Face directories that transformers loads (GPT-2, or Llama-shaped models) and
back into run dirs.

    hf.py     import-hf and export-hf: directories, downloads, weights files, the tokenizer's files
    gpt2.py   GPT-2's tensor names and config.json fields against gpt2lab's
    llama.py  a Llama-shaped run (rope, rmsnorm, swiglu, no bias) as transformers' LlamaForCausalLM
"""
