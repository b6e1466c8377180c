# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install the pinned stack once; the stamp
# .venv/.installed is newer than requirements.lock and setup.py afterwards, so a
# second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): requirements.lock setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements.lock
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, torchrec, lightgbm, flask, strategy; print('stack ok: torch', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stratarank validate conf/objectives/*.yaml
	$(VENV)/bin/stratarank rank --strategy conf/objectives/feed.yaml --input conf/examples/request.json --format table

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) bench/strategy_bench.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
