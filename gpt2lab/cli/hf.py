"""`gpt2lab import-hf` and `gpt2lab export-hf`: Hugging Face GPT-2 checkpoints in and out."""

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
                       "(GPT2LMHeadModel, or LlamaForCausalLM for a Llama-shaped model: rope, rmsnorm, swiglu, no "
                       "bias; and AutoTokenizer), vLLM and lm-evaluation-harness load. A padded vocabulary is "
                       "trimmed; a GPT-2 without biases gets zero biases; a LoRA run is exported with its adapters "
                       "merged; a classifier as GPT2ForSequenceClassification.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (trained, fine-tuned or imported)")
    e.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    e.add_argument("--overwrite", action="store_true", help="replace an export made earlier in --out (never "
                   "another kind of directory, nor the run)")
    e.set_defaults(func=cmd_export)
