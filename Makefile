# Two commands do all set-up on a fresh machine:
#   make bench   the main job: python -m fastkd.bench (validation + bytes on a CPU, timings on a GPU)
#   make test    the test suite (CPU, Triton interpreter)
# Both first build .venv: it reuses a torch that python3 can already import (a CUDA build stays),
# and otherwise installs the pinned CPU-friendly release below, never a multi-GB default download.
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0
VENV := .venv
ARGS ?= --out bench-out

.PHONY: bench test

bench: $(VENV)/ready
	$(VENV)/bin/python -m fastkd.bench $(ARGS)

test: $(VENV)/ready
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

$(VENV)/ready: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the installed torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q "$(TORCH_PIN)"; \
	fi
	$(VENV)/bin/pip install -q -e ".[test,bench]"
	@touch $@
