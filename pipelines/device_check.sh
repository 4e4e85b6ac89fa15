#!/usr/bin/env bash
# One prepared run on a GPU machine, within BUDGET_S seconds (default 540): the CUDA tests, the
# training-step table per precision (fp32, tf32, bf16) with floors, sparse vs dense, the
# precision comparison autocast=auto decides by, the harvest against its limit, logs into $OUT.
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
step() { echo; echo "=== $1 ($(date +%T), ${SECONDS}s of ${BUDGET_S}s)"; }
# The whole run fits BUDGET_S seconds (default 540: a lent GPU's 15 minutes, less its start and a
# rerun's margin): each section runs under min(its own limit, what is left), and a section with
# under 20 s left is skipped and says so, so the later ones never push the run past the budget.
BUDGET_S=${BUDGET_S:-540}
limit() {  # limit SECONDS -> the timeout to use now, or nothing (skip) when under 20 s are left
    local left=$((BUDGET_S - SECONDS))
    [ "$left" -lt 20 ] && { echo "  (skipped: ${left}s of the budget left)" >&2; return 1; }
    echo $(( $1 < left ? $1 : left ))
}

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, zarr; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'sm_%d%d' % torch.cuda.get_device_capability(0)); print('transformers', transformers.__version__, 'zarr', zarr.__version__, 'tf32 matmul', torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())"
nproc; df -h /tmp | tail -1
python3 -c "import harvest.runner, train.training, train.evaluation" || { echo "the package does not import here"; exit 1; }

step "CUDA tests"
# CUDA_TESTS: pytest selection (default: tests/test_cuda.py and AuxK's device-independent skip), e.g.
# "tests/test_cuda.py -k harvest"
# (with tf32: TF32 products inside the steps only, tf32 runs of every variant, auto's three timings)
T=$(limit 150) && timeout $T python3 -m pytest -q -p no:cacheprovider ${CUDA_TESTS:-tests/test_cuda.py tests/test_auxk.py} \
    -o addopts="" -rA 2>&1 | tail -45 | tee "$OUT/tests.log"

# the step table: FLOPs, bytes, GEMM rate (in the step's precision: fp32 with TF32 off, TF32, bf16)
# and bandwidth measured in the same process, floor and step/floor, at the issue's GPU target
# 768 x 24576 (32x), batch 4096: TopK/BatchTopK sparse kernels against the dense path, and
# Vanilla/JumpReLU at L0 1.5% of the width through the selected-entries path against dense
# (--compare-dense: each variant twice, sparse then dense), one run per precision
for prec in none tf32 bf16; do
    step "training-step table (CUDA, autocast $prec, 768 x 24576, sparse vs dense, L0 1.5% for vanilla/jumprelu)"
    T=$(limit 80) && timeout $T python3 pipelines/bench_train_step.py --device cuda --no-saelens --d-in 768 --expansions 32 \
        --variants topk,batchtopk,vanilla,jumprelu --l0 0.015 --compare-dense --steps 10 --warmup 3 --threads 0 \
        --autocast $prec --data-wait-steps 0 --timeout 60 --markdown "$OUT/train_step_$prec.md" \
        --json "$OUT/train_step_$prec.json" 2>&1 | tee "$OUT/bench_train_step_$prec.log" | tail -12
done

# what autocast=auto would pick per variant on this GPU: fp32, tf32 and bf16, each in a fresh process
step "precision comparison (CUDA: fp32, tf32, bf16; what autocast=auto picks)"
T=$(limit 70) && timeout $T python3 pipelines/bench_train_step.py --compare-precision --device cuda --no-saelens \
    --d-in 768 --expansions 32 --variants topk,batchtopk,vanilla,jumprelu --steps 6 --warmup 2 --threads 0 \
    --timeout 40 --markdown "$OUT/compare_precision.md" --json "$OUT/compare_precision.json" 2>&1 \
    | tee "$OUT/compare_precision.log" | tail -8

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
    T=$(limit 120) && TOKENIZERS_PARALLELISM=true timeout $T python3 pipelines/bench_harvest.py --assets $ASSETS \
        --devices cuda --repeats 1 --cuda-tokens 491520 --dir /tmp 2>&1 | tee "$OUT/bench_harvest.log" | grep -v "it/s\]"
fi
step "harvest host ceiling (free forward vs raw writes of the same bytes, same disk)"
T=$(limit 60) && TOKENIZERS_PARALLELISM=true timeout $T python3 pipelines/bench_harvest.py --synthetic-model --assets ${ASSETS} --repeats 2 --dir /tmp \
    --ceiling-tokens 1048576 2>&1 | tee "$OUT/bench_harvest_ceiling.log" | tail -8

step "store benchmark (serving to CUDA)"
T=$(limit 60) && timeout $T python3 pipelines/bench_store.py --device cuda --shards 8 --window-shards 2 --repeats 1 --dir /tmp \
    2>&1 | tee "$OUT/bench_store.log" | tail -20
step "done"
