"""`gpt2lab import-hf`, `export-hf` and `export-gguf`: models in from Hugging Face, out to transformers,
llama.cpp and Ollama."""

from __future__ import annotations

# the keys of gpt2lab.export.hf.HUB_IDS, written out so that `--help` imports nothing heavy (a test checks)
HUB_NAMES = "gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2"


def cmd_import(args) -> int:
    from gpt2lab.export.hf import import_hf

    out = import_hf(args.src, args.out, overwrite=args.overwrite)
    print(f"imported {args.src} to {out}; try `gpt2lab generate {out} --prompt \"Hello\"`")
    return 0


def cmd_export(args) -> int:
    from gpt2lab.export.hf import export_hf

    out = export_hf(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"exported {args.run_dir} to {out}; load it with "
          f"transformers.AutoModel.from_pretrained({str(out)!r}) (or the class its config.json names)")
    return 0


def cmd_export_gguf(args) -> int:
    from gpt2lab.export.gguf import export_gguf, modelfile_path

    out = export_gguf(args.run_dir, args.out, type=args.type, ollama=args.ollama)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({args.type}, {size:.1f} MiB); run it with `llama-cli -m {out}` (llama.cpp)")
    if args.ollama:
        name = out.stem.lower().replace("_", "-")
        print(f"wrote {modelfile_path(out)}; `ollama create {name} -f {modelfile_path(out)}` then "
              f"`ollama run {name}`")
    return 0


def register(sub) -> None:
    i = sub.add_parser("import-hf", help="Hugging Face GPT-2 (local dir or hub id) -> run dir",
                       description="Turn a Hugging Face GPT-2 checkpoint into a gpt2lab run directory "
                       "that generate, chat, eval and fine-tuning take. SRC is a local directory "
                       "(config.json with model.safetensors or pytorch_model.bin) or, when the "
                       f"machine is online, a hub id ({HUB_NAMES}, or owner/name).")
    i.add_argument("src", metavar="SRC", help="a Hugging Face GPT-2 directory or hub id")
    i.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write")
    i.add_argument("--overwrite", action="store_true", help="replace a run dir in --out (one that import-hf or "
                   "training wrote; never the source)")
    i.set_defaults(func=cmd_import)

    e = sub.add_parser("export-hf", help="run dir -> Hugging Face directory (GPT-2 or Llama)",
                       description="Write a run directory as a Hugging Face directory that transformers "
                       "(GPT2LMHeadModel; LlamaForCausalLM for a Llama-shaped model: rope, rmsnorm, swiglu or relu2; "
                       "Qwen3ForCausalLM when it adds --qk-norm; and AutoTokenizer, with the chat template of an "
                       "SFT run), vLLM, lm-evaluation-harness and llama.cpp's converter load. A padded vocabulary is "
                       "trimmed; a GPT-2 without biases gets zero biases; a LoRA run is exported with its adapters "
                       "merged; a classifier as GPT2ForSequenceClassification.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (trained, fine-tuned or imported)")
    e.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    e.add_argument("--overwrite", action="store_true", help="replace an export made earlier in --out (never "
                   "another kind of directory, nor the run)")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("export-gguf", help="run dir -> one GGUF file for llama.cpp, Ollama, LM Studio",
                       description="Write a run directory as one GGUF file (weights, sizes, tokenizer, and the "
                       "chat template of an SFT run) that llama.cpp, Ollama and LM Studio load: GPT-2's "
                       "architecture, or a Llama-shaped one (rope, rmsnorm, swiglu; Qwen3 with --qk-norm). A LoRA "
                       "run is exported with its adapters merged. What llama.cpp cannot compute is refused, "
                       "naming every such option.")
    g.add_argument("run_dir", metavar="RUN_DIR", help="a language-model run directory")
    g.add_argument("--out", required=True, metavar="FILE.gguf", help="the file to write (an earlier GGUF there "
                   "is replaced)")
    g.add_argument("--type", default="f16", choices=("f32", "f16", "bf16", "q8_0"),
                   help="how the weight matrices are stored: f32 (exact), f16 or bf16 (half the size), q8_0 "
                   "(8.5 bits a weight, a quarter of f32) (default f16)")
    g.add_argument("--ollama", action="store_true", help="also write FILE.Modelfile for `ollama create`, with "
                   "the run's chat format and stop tokens")
    g.set_defaults(func=cmd_export_gguf)
