# Two entry points for a fresh machine with Python 3.11 and pip:
#   make demo   runs the main job (the MNIST-5k demo)
#   make test   runs the test suite
# Each creates .venv and installs dsutil with its test and notebook extras if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test,notebooks]"
	touch $@

demo: install
	$(BIN)/dsutil demo

test: install
	$(BIN)/python -m pytest
