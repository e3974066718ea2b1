# Fresh machine: `make demo` (offline pipeline end to end) or `make test` (the test suite).
# Both create .venv/ with the pinned torch first; nothing else needs to be installed.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo

.PHONY: setup demo test test-fast bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The built-in offline default: a tiny ViT on the generated synthetic world.
demo: setup
	$(VENV)/bin/pipeline extract --dataset synthetic --limit 2000 --model tiny-vit --pretrained none \
		--layers 1,3 --out $(DEMO_DIR)/cache/synthetic
	$(VENV)/bin/pipeline info $(DEMO_DIR)/cache/synthetic
	$(VENV)/bin/pipeline verify $(DEMO_DIR)/cache/synthetic

# Every test, the slow ones included.
test: setup
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/writer.py
	$(PY) bench/extract.py

clean-demo:
	rm -rf $(DEMO_DIR)
