# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install the pinned stack once; the stamp
# .venv/.installed is newer than requirements.lock, pyproject.toml and setup.py afterwards, so a
# second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench clean system-deps

# Services the integration tests start themselves: Redis and headless Chromium from Debian.
# Installed once when missing (needs root, as on CI); without them those tests skip loudly.
SYSTEM_BINS := redis-server chromium
system-deps:
	@missing=""; for b in $(SYSTEM_BINS); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server chromium >/dev/null; \
	else echo "WARNING: missing$$missing (not root): the tests that need them will be skipped" >&2; fi

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements.lock
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchrec, lightgbm, flask, strategy; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

# The main job: simulate, train, serve, run a closed-loop A/B test, analyse it (see README).
demo: $(STAMP)
	$(VENV)/bin/stratarank validate conf/objectives/*.yaml conf/experiments/*.yaml
	$(VENV)/bin/stratarank demo

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
# Two processes (CI has 2 cores; most long tests wait on subprocesses, brokers and servers);
# a file's tests run in one process, in order. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) bench/strategy_bench.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
