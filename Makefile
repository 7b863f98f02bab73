# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PY := .venv/bin/python
DEMO_MODEL ?= out/random-model

.PHONY: install demo test lint clean

install:
	bash scripts/install.sh

demo: install
	@if [ ! -f "$(DEMO_MODEL)/config.json" ]; then \
	  echo "[demo] no trained demo model ships yet: writing a small RANDOM model to $(DEMO_MODEL) (its images are noise)"; \
	  $(PY) -m vllm_zipar.cli write-random-model $(DEMO_MODEL); \
	fi
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY) -m vllm_zipar.cli demo --model $(DEMO_MODEL) --out out/demo.png

test: install
	$(PY) -m pytest -q -ra --durations=15

lint: install
	$(PY) -m ruff check vllm_zipar tests

clean:
	rm -rf out .pytest_cache
