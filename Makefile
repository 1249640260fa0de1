# Two entry points for a fresh machine with Python 3.11 and pip:
#   make demo   runs the main job (the MNIST-5k demo)
#   make test   runs the lint and the test suite (`pytest -m "not slow"` leaves out the longest tests)
#   make browser-test   runs the notebooks in JupyterLab and headless Chromium (CI runs it after make test)
# Each creates .venv and installs dsutil with its test and notebook extras if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test browser-test figures install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test,notebooks]"
	touch $@

demo: install
	$(BIN)/dsutil demo

# the lint, then the suite on a worker per core (--dist loadgroup: the tests of one shared quick run, or of one
# crash-loop module, stay on one worker)
test: install
	$(BIN)/ruff check dsutil tests benchmarks browser_tests
	$(BIN)/python -m pytest -n auto --dist loadgroup

# every notebook in a real JupyterLab driven by headless Chromium (Debian's, installed here when missing);
# screenshots in .artifacts/browser/
browser-test: install
	command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	$(BIN)/python -m pytest browser_tests -s

# the figures the README and docs/ show, from the finished runs of both presets (the notebooks write only under
# their run folder otherwise)
figures: install
	for p in mnist5k tiny-imagenet-10; do for nb in notebooks/*.ipynb; do \
		DSUTIL_PRESET=$$p DSUTIL_FIGURES=$(CURDIR)/figures $(BIN)/jupyter nbconvert --to notebook --execute \
		--ExecutePreprocessor.timeout=-1 --output-dir /tmp --output figures-$$p $$nb || exit 1; done; done
