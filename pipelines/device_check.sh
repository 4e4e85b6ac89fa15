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
# CUDA_TESTS: pytest selection (default: tests/test_cuda.py and AuxK's device-independent skip), e.g.
# "tests/test_cuda.py -k harvest"
timeout 240 python3 -m pytest -q -p no:cacheprovider ${CUDA_TESTS:-tests/test_cuda.py tests/test_auxk.py} -o addopts="" \
    -rA 2>&1 | tail -40 | tee "$OUT/tests.log"

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
    # the harvest against its limit, min(forward-only, durable write bandwidth / bytes per token):
    # mode 1 gives harvest / forward-only, mode 2 the cache's and the raw disk's write bandwidth
    # TOKENIZERS_PARALLELISM=true: measured as a user's harvest runs (unset there, i.e. the Rust
    # tokenizer may use several cores); the false exported above is for the tests' forks. On this
    # 2-core development machine tokenising was a third of the host ceiling's window (README)
    step "harvest benchmark (CUDA) + cache writes"
    TOKENIZERS_PARALLELISM=true timeout 200 python3 pipelines/bench_harvest.py --assets $ASSETS --devices cuda --repeats 2 \
        --dir /tmp 2>&1 | tee "$OUT/bench_harvest.log" | grep -v "it/s\]"
fi
step "harvest host ceiling (free forward vs raw writes of the same bytes, same disk)"
TOKENIZERS_PARALLELISM=true timeout 90 python3 pipelines/bench_harvest.py --synthetic-model --assets ${ASSETS} --repeats 3 --dir /tmp \
    --ceiling-tokens 1048576 2>&1 | tee "$OUT/bench_harvest_ceiling.log" | tail -8

# the step table: FLOPs, bytes, GEMM rate and bandwidth measured in the same process, floor and
# step/floor, per precision (fp32 with TF32 off, bf16 autocast) and kernel choice (sparse, dense);
# the issue's GPU target is TopK/BatchTopK at 768 x 24576 (32x), batch 4096
for prec in none bf16; do
    step "training-step benchmark (CUDA, autocast $prec, sparse kernels)"
    timeout 120 python3 pipelines/bench_train_step.py --device cuda --no-saelens --d-in 768 --expansions 8,32 \
        --steps 10 --warmup 3 --threads 0 --autocast $prec --data-wait-steps 0 \
        --markdown "$OUT/train_step_$prec.md" 2>&1 | tee "$OUT/bench_train_step_$prec.log" | tail -14
    step "training-step benchmark (CUDA, autocast $prec, dense path, TopK/BatchTopK)"
    timeout 60 python3 pipelines/bench_train_step.py --device cuda --no-saelens --d-in 768 --expansions 32 \
        --steps 10 --warmup 3 --threads 0 --autocast $prec --variants topk,batchtopk --data-wait-steps 0 --dense \
        --markdown "$OUT/train_step_${prec}_dense.md" 2>&1 | tee "$OUT/bench_train_step_${prec}_dense.log" | tail -6
done

step "store benchmark (serving to CUDA)"
timeout 90 python3 pipelines/bench_store.py --device cuda --shards 8 --window-shards 2 --repeats 2 --dir /tmp \
    2>&1 | tee "$OUT/bench_store.log" | tail -20
step "done"
