# Two commands for a newcomer (see README.md):
#   make up     set up, pull the default model, start a local mesh of 2 nodes + gateway
#   make test   set up (including test tools) and run every test
# Everything lives in .venv; nothing is installed system-wide except Debian test tools.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NODES ?= 2
PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: setup up test test-tools test-links lint bench proto clean

$(BIN)/edgemesh: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	@echo "installing EdgeMesh (the first time, pip builds llama-cpp-python from source: ~5-8 minutes)"
	$(BIN)/pip install -e ".[dev,ray]"
	touch $(BIN)/edgemesh

setup: $(BIN)/edgemesh
	$(BIN)/edgemesh model pull default

up: setup
	$(BIN)/edgemesh up --nodes $(NODES) --port $(PORT)

# Browser and Prometheus tests use Debian's chromium and prometheus, the emulated links of the
# test network iptables and libnetfilter_queue (and its headers, to build NetfilterQueue
# below); install them when missing.
test-tools:
	@missing=""; \
	for pkg in chromium:/usr/bin/chromium prometheus:/usr/bin/prometheus iptables:/usr/sbin/iptables \
	    libnetfilter-queue-dev:/usr/include/libnetfilter_queue/libnetfilter_queue.h; do \
	  [ -x "$${pkg#*:}" ] || missing="$$missing $${pkg%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "could not install$$missing; tests needing them will say so"; \
	  else echo "not root: not installing$$missing; tests needing them will say so"; fi; \
	fi

# NetfilterQueue (the `links` extra) has no wheels: pip compiles it against the headers
# test-tools installs, so it cannot be in the dev extra that `setup` installs first (and `make
# up` needs neither). Without it the link tests say so and skip.
test-links: setup test-tools
	@$(BIN)/python -c "import netfilterqueue" 2>/dev/null || { \
	  echo "installing NetfilterQueue (compiled against libnetfilter-queue-dev)"; \
	  $(BIN)/pip install -q -e ".[links]" || echo "could not install NetfilterQueue; link tests will say so"; }

# Line coverage of mesh/ and node/, measured in the test processes and in every node and
# gateway they start (see [tool.coverage.*] in pyproject.toml); COVERAGE=0 runs without it.
COVERAGE ?= 1
COV_ARGS := $(if $(filter 1,$(COVERAGE)),--cov --cov-report=term,)

# Two passes: every tier but tests/system on parallel workers (pyproject.toml's addopts), with
# coverage, then tests/system on two workers and unmeasured. Its checks time failovers, stalls
# and link cuts and let the planner split layers by the speeds nodes measure; the tracer would
# skew those, and so would more load. Every computation of the suite runs on one thread
# (tests/conftest.py, TEST_THREADS), so two system files at once leave a core idle half the
# time: their tests took 7% longer than one at a time (2026-12-04), well inside every bound.
# PYTEST_ARGS replaces both passes with one run of what it names (chosen here, by make, so
# that quotes inside PYTEST_ARGS reach pytest as they were written).
ifneq ($(strip $(PYTEST_ARGS)),)
RUN_PYTEST = $(BIN)/python -m pytest $(COV_ARGS) $(PYTEST_ARGS); code=$$?
else
RUN_PYTEST = echo "== tests: every tier but tests/system, on parallel workers"; \
	$(BIN)/python -m pytest $(COV_ARGS) --durations=15 --ignore=tests/system; code=$$?; \
	echo "== tests/system: on two workers"; \
	$(BIN)/python -m pytest -n 2 --durations=10 tests/system; second=$$?; \
	[ $$code -ne 0 ] || code=$$second
endif

test: setup test-tools test-links
	$(BIN)/mypy
	$(BIN)/ruff check mesh node tests scripts
	@$(RUN_PYTEST); \
	if [ $$code -eq 5 ]; then echo "EDGEMESH-CI: pytest collected no tests (exit code 5)"; fi; \
	exit $$code

bench: setup
	$(BIN)/edgemesh bench --nodes 1 --tokens 128 --runs 3

proto: $(BIN)/edgemesh
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache test-artifacts .coverage .coverage.*
