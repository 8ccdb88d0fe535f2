# asrd: `make demo` runs the daemon on the shipped samples; `make test` runs the checks and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck bench triton clean

$(STAMP): pyproject.toml setup.py ipc/_atomic.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest --durations=20

lint: $(STAMP)
	$(BIN)/ruff check daemon workers ipc tests bench scripts
	$(BIN)/ruff format --check daemon workers ipc tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy daemon workers ipc

bench: $(STAMP)
	$(BIN)/python -m bench --list

clean:
	rm -rf $(VENV) .venv-triton build *.egg-info ipc/*.so .pytest_cache .mypy_cache .ruff_cache

# A real Triton Inference Server (CPU, from nvidia-pytriton) serving configs/triton, for
# development: builds .venv-triton once, then runs in the foreground until Ctrl-C.
triton: $(STAMP)
	$(BIN)/python scripts/triton_server.py run
