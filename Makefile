# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PY := .venv/bin/python
DEMO_MODEL ?= out/random-model

.PHONY: install demo test lint clean train-demo quality serve

install:
	bash scripts/install.sh

demo: install
	@if [ ! -f "$(DEMO_MODEL)/config.json" ]; then \
	  echo "[demo] writing a small RANDOM VQ-16 model to $(DEMO_MODEL): its images are noise (the trained digits model: make demo DEMO_MODEL=models/digits)"; \
	  $(PY) -m vllm_zipar.cli write-random-model $(DEMO_MODEL); \
	fi
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY) -m vllm_zipar.cli demo --model $(DEMO_MODEL) --out out/demo.png

# vLLM's OpenAI server with POST /v1/images/generations on the digits model (see docs/serving.md).
SERVE_MODEL ?= models/digits
serve: install
	.venv/bin/vllm serve $(SERVE_MODEL) --decoding zipar --zipar-window 8 $(SERVE_ARGS)

test: install
	$(PY) -m pytest -q -ra --durations=15

lint: install
	$(PY) -m ruff check vllm_zipar tests

# Train the shipped demo model (models/digits/) from scikit-learn's digits: 42 min measured on one thread.
train-demo: install
	@$(PY) -c "import sklearn, matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[demo]"
	$(PY) -m vllm_zipar.training.train_demo --out models/digits $(TRAIN_DEMO_ARGS)

# Sample quality of the demo model through vLLM (classifier accuracy, Frechet distance): benchmarks/results/.
quality: install
	@$(PY) -c "import sklearn, matplotlib" 2>/dev/null || $(PY) -m pip install -q -e ".[demo]"
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY) benchmarks/quality.py $(QUALITY_ARGS)

clean:
	rm -rf out .pytest_cache
