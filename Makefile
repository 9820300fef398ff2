# Two commands on a fresh clone: `make demo` and `make test`. Each builds .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: demo test lint format docs bench study gpu-check clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "amsgrad_jax needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples,docs,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/mlp_flax.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q

# The docs need Sphinx and what autodoc imports (the library, so jax and optax): not the
# test, example or benchmark stacks (torch, keras).
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "amsgrad_jax needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Every page as a reader sees it from disk, in docs/_build/shots (needs Debian's chromium).
.PHONY: docs-shots
docs-shots: docs
	$(PY) docs/screenshots.py docs/_build/html docs/_build/shots --width 1280 --width 800

bench: $(STAMP)
	$(PY) -m benchmarks
	$(PY) -m benchmarks.nnx

# The memory and precision study (about 10 minutes on 2 cores): its table and plot go to
# docs/_static, where the guide shows them; the creep of the stored maximum is printed.
study: $(STAMP)
	$(PY) -m studies.precision --out docs/_static
	$(PY) -m studies.creep

# The GPU check (at most 8 minutes), on a machine with an NVIDIA GPU and no network: the
# Python there with what it has installed, not .venv, and nothing installed or built.
OUT ?= docs/_static
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m gpucheck --out $(OUT)

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .ruff_cache
