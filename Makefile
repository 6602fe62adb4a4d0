# The two set-up commands of README.md:
#   make demo   install gpt2lab, then tokenizer -> data -> pretrain -> samples on the bundled Shakespeare
#   make test   install gpt2lab with its test extras, then run the test suite
# and a third demonstration:
#   make rl-demo  a model from nothing to reinforcement learning on a checkable task (countdown), on the CPU
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
CORPUS := gpt2lab/assets/shakespeare.txt.gz
DEMO_STEPS ?= 1600
RL ?= demo-rl
RL_TASK := --task countdown --difficulty 2

.PHONY: install demo rl-demo test lint bench clean

# the demo installs what it runs (gpt2lab, and matplotlib and tensorboard for its curves); the tests add their
# extras (pytest, ruff, transformers, the server, a browser driver)
$(BIN)/.venv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	touch $@

$(BIN)/.installed-demo: pyproject.toml $(BIN)/.venv
	$(BIN)/python -m pip install -q -e ".[plot,tensorboard]"
	touch $@

# llama.cpp (built by llama-cpp-python, for the GGUF tests) without the AMX kernels, whose int8 matmul crashes
# on some x86 machines (llama.cpp issue 20824): a portable AVX2 build
LLAMA_CMAKE ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON,)
LLAMA_CPP := $(VENV)/llama.cpp

$(BIN)/.installed: pyproject.toml $(BIN)/.venv
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(BIN)/.installed-demo

# llama.cpp's own conversion script (from the same llama-cpp-python source), which a test runs on export-hf's output
$(LLAMA_CPP)/convert_hf_to_gguf.py: $(BIN)/.installed
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)/sdist
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(LLAMA_CPP)/sdist \
		"llama-cpp-python==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')" \
		&& tar xzf $(LLAMA_CPP)/sdist/*.tar.gz -C $(LLAMA_CPP) --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' \
		|| echo "llama.cpp's converter could not be fetched; its test will skip"
	rm -rf $(LLAMA_CPP)/sdist

install: $(BIN)/.installed $(LLAMA_CPP)/convert_hf_to_gguf.py

demo: $(BIN)/.installed-demo
	rm -rf $(DEMO)/run
	$(BIN)/gpt2lab tokenizer train --input $(CORPUS) --vocab-size 4096 --out $(DEMO)/tokenizer --overwrite
	$(BIN)/gpt2lab prepare --input $(CORPUS) --doc-separator '\n\n\n' --val-fraction 0.1 \
		--tokenizer $(DEMO)/tokenizer --out $(DEMO)/data --overwrite
	$(BIN)/gpt2lab pretrain --data $(DEMO)/data --out $(DEMO)/run --config configs/demo.toml \
		--max-steps $(DEMO_STEPS)
	$(BIN)/gpt2lab eval $(DEMO)/run --task loss --data $(DEMO)/data
	$(BIN)/gpt2lab plot $(DEMO)/run
	@echo
	@echo "Next:"
	@echo "  $(BIN)/gpt2lab generate $(DEMO)/run --prompt 'ROMEO:' --max-new-tokens 100    # sample more"
	@echo "  $(BIN)/gpt2lab eval $(DEMO)/run --task loss,hellaswag --limit 500               # score it"
	@echo "  $(BIN)/gpt2lab pretrain --data $(DEMO)/data --out $(DEMO)/classic --config configs/gpt2-classic.toml  # as GPT-2"
	@echo "  look at $(DEMO)/run/curves.png, or run: tensorboard --logdir $(DEMO)/run/tensorboard"

rl-demo: $(BIN)/.installed-demo
	rm -rf $(RL)
	# task data: countdown problems with worked steps in a <think> section; 200 held-out prompts never trained on
	$(BIN)/gpt2lab finetune instructions $(RL_TASK) --think --synthetic 20000 --heldout 200 --out $(RL)/data
	$(BIN)/gpt2lab tokenizer train --input $(RL)/data/train.txt --vocab-size 400 --out $(RL)/tokenizer --quiet
	$(BIN)/gpt2lab prepare --input $(RL)/data/train.txt --doc-separator '\n\n\n' --tokenizer $(RL)/tokenizer \
		--val-fraction 0.02 --out $(RL)/text --quiet
	# a small model learns the task's text, then its answers (SFT), then to get them right (RL)
	$(BIN)/gpt2lab pretrain --data $(RL)/text --out $(RL)/base --config configs/rl-demo.toml
	$(BIN)/gpt2lab finetune sft --init $(RL)/base --data $(RL)/data/train.jsonl --val-data $(RL)/data/heldout.jsonl \
		--out $(RL)/sft --max-steps 50 --batch-size 32 --lr 1e-3 --warmup-steps 5 --eval-every 50 --log-every 25 \
		--no-freeze-embeddings --device cpu --no-tensorboard
	$(BIN)/gpt2lab eval $(RL)/sft $(RL_TASK) --max-new-tokens 40 --samples 8 --k 8 --quiet --output $(RL)/sft_eval.json
	$(BIN)/gpt2lab finetune rl --init $(RL)/sft $(RL_TASK) --out $(RL)/rl --max-steps 800 --batch-size 16 \
		--group-size 8 --max-new-tokens 40 --lr 1e-4 --eval-every 100 --eval-prompts 200 --log-every 20 --device cpu
	$(BIN)/gpt2lab eval $(RL)/rl $(RL_TASK) --max-new-tokens 40 --samples 8 --k 8 --quiet --output $(RL)/rl_eval.json
	$(BIN)/gpt2lab plot $(RL)/rl
	$(BIN)/python -c 'import json, sys; s, r = (json.load(open(f))[0] for f in sys.argv[1:3]); \
		json.dump({"task": s["task"], "difficulty": s["difficulty"], "heldout_prompts": s["n"], \
		"sft_pass_at_1": s["pass_at_1"], "rl_pass_at_1": r["pass_at_1"], "sft_pass_at_8": s["pass_at_8"], \
		"rl_pass_at_8": r["pass_at_8"]}, open(sys.argv[3], "w"), indent=2); print(open(sys.argv[3]).read())' \
		$(RL)/sft_eval.json $(RL)/rl_eval.json $(RL)/results.json

test: install
	GPT2LAB_LLAMA_CPP_CONVERT=$(LLAMA_CPP)/convert_hf_to_gguf.py $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(DEMO) $(RL) .pytest_cache .ruff_cache
