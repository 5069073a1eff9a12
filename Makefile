# wsss: `make demo` runs the pipeline on the built-in toy data; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench lint format clean

install: $(STAMP)

# PyPI's default torch wheel (CUDA build) runs on the CPU and is the one torchvision is built against;
# a CPU-only torch wheel breaks `import torchvision`, which the last line checks.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@$(BIN)/python -c "import torchvision" 2>/dev/null || { \
	  echo "make install: 'import torchvision' fails: a CPU-only torch wheel was installed."; \
	  echo "Fix: $(BIN)/pip install --force-reinstall --index-url https://pypi.org/simple torch torchvision"; \
	  exit 1; }
	@$(BIN)/python -c "import pydensecrf.densecrf" 2>/dev/null || { \
	  echo "make install: 'import pydensecrf' fails; install a C++ compiler and run: $(BIN)/pip install pydensecrf2"; \
	  exit 1; }
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest

test-fast: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -m "not slow"

demo: $(STAMP)
	$(BIN)/wsss demo

bench: $(STAMP)
	$(BIN)/python bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check wsss_cli stages tests bench
	$(BIN)/ruff format --check wsss_cli stages tests bench

format: $(STAMP)
	$(BIN)/ruff format wsss_cli stages tests bench
	$(BIN)/ruff check --fix wsss_cli stages tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
