# Two commands for a fresh machine: `make demo` (the main job) and `make test` (everything CI runs).
PYTHON ?= python3
VENV ?= .venv
# Used only when the venv has no torch yet: the version the tests ran with, from the default index (a CUDA
# build on Linux). For the CPU-only build or another one, install it into the venv first (pip install torch
# --index-url https://download.pytorch.org/whl/cpu) and it is left alone; or pass TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test demo lint test-comfy
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev,shapes]"
	touch $@

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest
	@if command -v node >/dev/null; then node --test tests/js/; else echo "node not found: js tests skipped"; fi

demo: setup
	$(BIN)/python -m shapes_world.demo

# The ComfyUI integration tests: need a ComfyUI checkout and a Python that can import it.
COMFYUI_PATH ?= /work/comfyui
COMFY_PYTHON ?= /work/comfyenv/bin/python
test-comfy:
	COMFYUI_PATH=$(COMFYUI_PATH) $(COMFY_PYTHON) -m pytest -q tests/integration
