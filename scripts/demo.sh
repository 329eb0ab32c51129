#!/usr/bin/env bash
# Set everything up, then find and evaluate the country->capital circuit of the bundled SmolLM2-135M, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/kcircuits discover country_capital --model smollm2-135m --method eap-ig --steps 5 \
  --split 0.5 --known-only --known-k 10 --percent 1 --out runs/demo_country_capital "$@"
