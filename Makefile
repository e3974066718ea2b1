# Fresh machine: `make demo` (offline pipeline end to end) or `make test` (the test suite).
# Both create .venv/ with the pinned torch first; nothing else needs to be installed.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test browser demo figures test test-fast bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The tests also need sae-lens (the `interop` extra: export-sae/import-sae are tested against it);
# torch is named again so pip keeps the pinned build while it resolves sae-lens' dependencies.
setup-test: setup $(VENV)/.installed-interop

$(VENV)/.installed-interop: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,interop]' torch==2.14.1 torchvision==0.29.1
	touch $@

# The built-in offline default (params.yaml): the whole stage graph of dvc.yaml.
demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DVC_NO_ANALYTICS=1 dvc repro
	$(VENV)/bin/pipeline info work/synthetic/acts
	$(VENV)/bin/pipeline findings

# The README's figures ("What the offline default shows"): the demo, then its findings written into README.md.
figures: demo
	$(VENV)/bin/pipeline findings --readme README.md

# Headless Chromium for the report's browser test (Debian packages; needs root). Without
# it the browser test is skipped with a message, everything else still runs.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "could not install chromium: the report's browser test will be skipped"

# Every test, the slow ones included.
test: setup-test browser
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: setup-test
	$(PY) -m pytest -q -m "not slow"

bench: setup-test
	$(PY) bench/writer.py
	$(PY) bench/extract.py
	$(PY) bench/loader.py
	$(PY) bench/train.py
	$(PY) bench/peers.py
	$(PY) bench/encode.py
	$(PY) bench/stats.py
	$(PY) bench/masking.py
	$(PY) bench/distributed.py
	$(PY) bench/pretrain_step.py
	$(PY) bench/pretrain.py

clean-demo:
	rm -rf work dvc.lock
