# Two commands for a new user: `make demo` and `make test`. Both create .venv if it is missing.
# torch is pinned first: torch==2.13.0 resolves to the CPU build on machines without CUDA, and stops pip from pulling
# several GB of CUDA wheels for any other torch request.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# TensorRT type stubs for the mypy check of exporters/tensorrt/; --no-deps because they require the tensorrt
	# package, whose libraries come from a registry these machines cannot reach (pin: pyproject.toml [tool.otkit.typecheck]).
	$(BIN)/python -m pip install --quiet --no-deps "tensorrt-stubs==10.13.0.35.1"
	touch $(STAMP)

install: $(STAMP)

# The demo signs its reports (docs/signing.md) with a key pair made under runs/ the first time; the last line shows
# how a user of the release checks one.
demo: $(STAMP)
	mkdir -p runs
	test -f runs/demo-signing.key || $(BIN)/otkit keygen --out runs/demo-signing > /dev/null
	$(BIN)/otkit run --sign-key runs/demo-signing.key
	@echo "signed: runs/demo/*/*/*.sigstore.json; check one with: $(BIN)/otkit verify runs/demo/audit/onnx --engine runs/demo/export/model.onnx --twin runs/demo/model.safetensors --public-key runs/demo-signing.pub"

# Import contracts (pyproject [tool.importlinter]: layers, no circles, independent backends) and ruff (pyflakes, isort,
# bugbear) first: a circle, an upward import or a lint error fails like a test.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check --no-cache .
	$(BIN)/python -m pytest -q

# Property-based fuzzing of every loader under the long profile (tests/test_fuzz.py; `make test` runs the same
# properties with a small, derandomized budget). Failing examples are kept in .hypothesis/ and replayed first.
# OTKIT_FUZZ_SCALE=0.5 halves the example counts (about 10 minutes at 1 on a 2-core machine).
fuzz: $(STAMP)
	OTKIT_FUZZ_PROFILE=long $(BIN)/python -m pytest -q -p no:cacheprovider -m fuzz --hypothesis-show-statistics \
		--durations=0 tests/test_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
