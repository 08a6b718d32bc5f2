# Two commands for a new user: `make demo` and `make test`. Both create .venv if it is missing.
# torch is pinned first: torch==2.13.0 resolves to the CPU build on machines without CUDA, and stops pip from pulling
# several GB of CUDA wheels for any other torch request.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# TensorRT type stubs for the mypy check of exporters/tensorrt.py; --no-deps because they require the tensorrt
	# package, whose libraries come from a registry these machines cannot reach (pin: pyproject.toml [tool.otkit.typecheck]).
	$(BIN)/python -m pip install --quiet --no-deps "tensorrt-stubs==10.13.0.35.1"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/otkit run

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
