# The two commands README gives first:
#   make run    set up, create a small VHD chain and show it
#   make test   set up and run the whole test suite
# Set PYTEST_ARGS to pass options to pytest, e.g. PYTEST_ARGS="-m 'not slow' -x".

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test setup deps venv lint bench torture clean man

setup: deps venv

deps:
	@scripts/install-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard src/blktap/*/*.[ch] src/blktap/*/*/*.[ch])
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,torture]'
	@touch $@

run: setup
	@scripts/demo.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# make man: the man pages of blktap, tapdisk, tapback, vhd-util and tap-ctl in build/man
# (read one with: man -l build/man/man8/tap-ctl.8; install with MANPATH or cp).
man: venv
	$(PY) -m blktap.cli.manpage --out build/man

lint: venv
	$(VENV)/bin/ruff check src tests bench torture

# make bench: the NBD server benchmark (~30 min), bench/REPORT.md and bench/results/.
# make bench ARGS=--quick: the quick one (a few minutes). ARGS=--record-quiet on a quiet
# machine records bench/quiet.json. Other options: bench/run.py --help, docs/benchmarks.md.
bench: setup
	@($(PY) -c 'import matplotlib' 2>/dev/null && test -x $(VENV)/bin/py-spy) || $(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py $(ARGS)

# make torture: kill -9 trials, maintenance kills, fuzzing, soak (hours; docs/reliability.md).
# make torture ARGS=--smoke: the few-minute run; ARGS="crash --trials 50": one part.
torture: setup
	$(PY) torture/run.py $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache demo .torture
