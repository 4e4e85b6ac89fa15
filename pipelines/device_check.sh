#!/usr/bin/env bash
# One prepared run on a GPU machine: the CUDA tests, then the CUDA benchmarks, logs into $OUT.
#
#   bash pipelines/device_check.sh [OUTDIR]
#
# Expects the repo as working directory. Packages the machine lacks may come as wheels in .whl/
# (installed into /tmp/site); .devassets/ may hold the SmolLM2 config + tokenizer (smollm2/) and
# kjv.jsonl: the harvest benchmark then runs SmolLM2-135M with random weights of the real
# architecture (same speed as the real weights; the machine has no hub and no 500 MB model).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/device-check}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo; echo "=== $1 ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, zarr; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'zarr', zarr.__version__, 'tf32 matmul', torch.backends.cuda.matmul.allow_tf32)"
nproc; df -h /tmp | tail -1
python3 -c "import harvest.runner, train.training, train.evaluation" || { echo "the package does not import here"; exit 1; }

step "CUDA tests"
# CUDA_TESTS: pytest selection (default: all of tests/test_cuda.py), e.g. "tests/test_cuda.py -k harvest"
timeout 300 python3 -m pytest -q -p no:cacheprovider ${CUDA_TESTS:-tests/test_cuda.py} -o addopts="" -rA 2>&1 | tail -40 | tee "$OUT/tests.log"

ASSETS=/tmp/assets
if [ -f .devassets/smollm2/config.json ]; then
    step "SmolLM2-135M architecture, random weights"
    mkdir -p $ASSETS && cp -r .devassets/smollm2 .devassets/kjv.jsonl $ASSETS/
    python3 - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained("/tmp/assets/smollm2")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained("/tmp/assets/smollm2")
print("saved", cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size)
PY
    step "harvest benchmark (CUDA) + cache writes"
    timeout 240 python3 pipelines/bench_harvest.py --assets $ASSETS --devices cuda --repeats 2 \
        --dir /tmp 2>&1 | tee "$OUT/bench_harvest.log" | grep -v "it/s\]"
fi

step "training-step benchmark (CUDA)"
timeout 200 python3 pipelines/bench_train_step.py --device cuda --no-saelens --d-in 768 --expansions 8,32 --steps 20 \
    --warmup 5 --threads 0 --markdown "$OUT/train_step.md" 2>&1 | tee "$OUT/bench_train_step.log" | tail -25
timeout 100 python3 pipelines/bench_train_step.py --device cuda --no-saelens --d-in 768 --expansions 8,32 --steps 20 \
    --warmup 5 --threads 0 --variants topk,batchtopk --data-wait-steps 0 --dense 2>&1 \
    | tee "$OUT/bench_train_step_dense.log" | tail -8

step "store benchmark (serving to CUDA)"
timeout 150 python3 pipelines/bench_store.py --device cuda --shards 8 --window-shards 2 --repeats 2 --dir /tmp \
    2>&1 | tee "$OUT/bench_store.log" | tail -20
step "done"
