#!/usr/bin/env bash
# Set everything up, then find and evaluate the country->capital circuit of the bundled SmolLM2-135M, offline.
# The run folder is runs/discover_country_capital_smollm2-135m_eap-ig_<config hash> (printed at the end):
# a rerun with the same configuration reuses it; a changed configuration gets a folder of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/kcircuits discover country_capital --model smollm2-135m --method eap-ig --steps 5 \
  --split 0.5 --known-only --known-k 10 --percent 1 "$@"
