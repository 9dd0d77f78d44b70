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

# The ComfyUI integration tests: need a ComfyUI checkout (COMFYUI_PATH) and a Python that can import it
# (COMFY_PYTHON, e.g. the venv ComfyUI runs in). No defaults: both come from the environment or the command line.
test-comfy:
	@if [ -z "$(COMFYUI_PATH)" ] || [ ! -f "$(COMFYUI_PATH)/main.py" ]; then \
		echo "make test-comfy: set COMFYUI_PATH to a ComfyUI checkout (the folder with main.py); got '$(COMFYUI_PATH)'" >&2; exit 2; fi
	@if [ -z "$(COMFY_PYTHON)" ] || ! "$(COMFY_PYTHON)" -c "import torch" >/dev/null 2>&1; then \
		echo "make test-comfy: set COMFY_PYTHON to a Python that runs ComfyUI (with torch), e.g. its venv's bin/python; got '$(COMFY_PYTHON)'" >&2; exit 2; fi
	COMFYUI_PATH="$(COMFYUI_PATH)" "$(COMFY_PYTHON)" -m pytest -q tests/integration
