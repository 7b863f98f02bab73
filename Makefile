# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PY := .venv/bin/python
# The shipped, trained digits model, served by `vllm serve` (DEMO_MODEL=out/random-model: a random VQ-16
# model in the authors' formats, written on first use; DEMO_ARGS= without --serve: offline through vllm.LLM).
DEMO_MODEL ?= models/digits
DEMO_ARGS ?= --serve --num-classes 10
# `make train-demo`: one torch thread reproduces the shipped models/digits bit for bit (docs/demo_model.md).
TRAIN_DEMO_ARGS ?= --threads 1

# What `make lint` checks (ruff's rules and its formatting); `make typecheck` checks pyproject's [tool.mypy] files.
LINT_PATHS := vllm_zipar tests benchmarks
# `make test-fast`: everything but the tests that start an engine, a server, several workers or a Ray cluster.
FAST_TESTS := not engine and not serving and not parallel and not ray

.PHONY: install demo test test-fast lint typecheck clean train-demo quality serve

install:
	bash scripts/install.sh

demo: install
	@if [ ! -f "$(DEMO_MODEL)/config.json" ]; then \
	  echo "[demo] writing a small RANDOM VQ-16 model to $(DEMO_MODEL): its images are noise"; \
	  $(PY) -m vllm_zipar.cli write-random-model $(DEMO_MODEL); \
	fi
	$(PY) -m vllm_zipar.cli demo --model $(DEMO_MODEL) --out out/demo.png $(DEMO_ARGS)

# vLLM's OpenAI server with POST /v1/images/generations on the digits model (see docs/serving.md).
SERVE_MODEL ?= models/digits
serve: install
	.venv/bin/vllm serve $(SERVE_MODEL) --decoding zipar --zipar-window 8 $(SERVE_ARGS)

# Lint and types first (seconds): a lint error fails `make test` (and so CI's .ci/run) before any test runs.
test: install lint typecheck
	$(PY) -m pytest -q -ra --durations=15

test-fast: install lint typecheck
	$(PY) -m pytest -q -ra --durations=15 -m "$(FAST_TESTS)"

lint: install
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

typecheck: install
	$(PY) -m mypy

# Train the shipped demo model (models/digits/) from scikit-learn's digits: 55 min measured from a fresh clone.
train-demo: install
	@$(PY) -c "import sklearn, matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[demo]"
	$(PY) -m vllm_zipar.training.train_demo --out models/digits $(TRAIN_DEMO_ARGS)

# Sample quality of the demo model through vLLM (classifier accuracy, Frechet distance): benchmarks/results/.
quality: install
	@$(PY) -c "import sklearn, matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[demo]"
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY) benchmarks/quality.py $(QUALITY_ARGS)

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
