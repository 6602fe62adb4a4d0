# The two set-up commands of README.md:
#   make demo   install gpt2lab, then tokenizer -> data -> pretrain -> samples on the bundled Shakespeare
#   make test   install gpt2lab with its test extras, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
CORPUS := gpt2lab/assets/shakespeare.txt.gz
DEMO_STEPS ?= 400

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	rm -rf $(DEMO)/run
	$(BIN)/gpt2lab tokenizer train --input $(CORPUS) --vocab-size 4096 --out $(DEMO)/tokenizer --overwrite
	$(BIN)/gpt2lab prepare --input $(CORPUS) --doc-separator '\n\n\n' --val-fraction 0.1 \
		--tokenizer $(DEMO)/tokenizer --out $(DEMO)/data --overwrite
	$(BIN)/gpt2lab pretrain --data $(DEMO)/data --out $(DEMO)/run --config configs/demo.toml \
		--max-steps $(DEMO_STEPS)
	$(BIN)/gpt2lab plot $(DEMO)/run
	@echo
	@echo "Next:"
	@echo "  $(BIN)/gpt2lab generate $(DEMO)/run --prompt 'ROMEO:' --max-new-tokens 100    # sample more"
	@echo "  $(BIN)/gpt2lab eval $(DEMO)/run --task loss,hellaswag --limit 500               # score it"
	@echo "  $(BIN)/gpt2lab pretrain --data $(DEMO)/data --out $(DEMO)/run2 --config configs/demo.toml --max-steps 2000"
	@echo "  look at $(DEMO)/run/curves.png, or run: tensorboard --logdir $(DEMO)/run/tensorboard"

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
