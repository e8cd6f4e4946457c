#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install vtoken with its dev/bench extras.
# torch: keeps the torch already in the venv; otherwise installs torch==$VTOKEN_TORCH (default 2.13.0, the local
# CPU wheel on the project's machines). Everything else is installed against a constraints file that pins that torch,
# so pip never swaps it for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VTOKEN_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==${VTOKEN_TORCH:-2.13.0}"
  "$VENV/bin/python" -m pip install -q "torch==${VTOKEN_TORCH:-2.13.0}"
fi
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$VENV/constraints.txt"
# Fashion-MNIST (Debian's dataset-fashion-mnist, MIT licence) for the micro-model training and its tests; best
# effort: the bundled test set needs none of it, and the tests that read the full data skip without it
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${VTOKEN_FASHION_MNIST:-}" ] && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing dataset-fashion-mnist"
  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "setup: could not install dataset-fashion-mnist (tests that need the full data will skip)"
fi
stamp="$VENV/.vtoken-installed"
want="$(cat pyproject.toml "$VENV/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import vtoken" >/dev/null 2>&1; then
  echo "setup: installing vtoken[dev] against $(cat "$VENV/constraints.txt")"
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -e ".[dev]"
  echo "$want" > "$stamp"
fi
