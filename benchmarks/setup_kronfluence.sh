#!/usr/bin/env bash
# A separate virtual environment with Kronfluence 1.0.1 for benchmarks/kronfluence_compare.py.
# Kronfluence is NOT a dependency of kcircuits: it lives only in benchmarks/.venv-kronfluence.
#
#   bash benchmarks/setup_kronfluence.sh            # then:
#   benchmarks/.venv-kronfluence/bin/python benchmarks/kronfluence_compare.py
#
# torch is installed first from the local CPU wheel (TORCH_WHEEL), so that the plain `torch`
# requirements are already met and pip does not pull the multi-GB CUDA build. kronfluence itself is
# installed with --no-deps: it requires torchvision, which it only lists (no module of the package
# imports it) and whose PyPI wheels pin a CUDA torch; its real dependencies are installed by name.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=benchmarks/.venv-kronfluence
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
PYTHON=${PYTHON:-python3}

if [ ! -f "$TORCH_WHEEL" ]; then
  echo "setup_kronfluence: no torch wheel at $TORCH_WHEEL; set TORCH_WHEEL to a torch==2.13.0 CPU wheel" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_WHEEL"
"$VENV/bin/python" -m pip install --quiet --no-deps "kronfluence==1.0.1"
"$VENV/bin/python" -m pip install --quiet "accelerate>=0.31.0" "einops>=0.8.0" "einconv>=0.1.0" "opt-einsum>=3.3.0" \
  "safetensors>=0.4.2" "tqdm>=4.66.4"
"$VENV/bin/python" -m pip install --quiet -e .
"$VENV/bin/python" -c "import kronfluence, kcircuits, torch; print('kronfluence', kronfluence.__version__, '| torch', torch.__version__)"
