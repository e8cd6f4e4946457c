#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install vtoken[dev] at the exact versions of requirements/lock.txt
# (what CI tests; regenerate with `make lock`). torch: the lock's version (2.13.0, the local CPU wheel on the
# project's machines) unless VTOKEN_TORCH names another; everything else is installed against the lock as
# constraints, so pip never swaps torch for another build nor resolves a newer, untested release.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VTOKEN_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
LOCK="${VTOKEN_LOCK:-requirements/lock.txt}"
[ -f "$LOCK" ] || { echo "setup: $LOCK is missing (run make lock)" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
locked_torch="$(sed -n 's/^torch==//p' "$LOCK")"
torch="${VTOKEN_TORCH:-$locked_torch}"
have="$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)"
if [ "$have" != "$torch" ]; then
  echo "setup: installing torch==$torch"
  "$VENV/bin/python" -m pip install -q "torch==$torch"
fi
# the lock as constraints, with the torch actually installed
grep -v '^torch==' "$LOCK" > "$VENV/constraints.txt"
echo "torch==$torch" >> "$VENV/constraints.txt"
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
  echo "setup: installing vtoken[dev] from $LOCK"
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" -e ".[dev]"
  # PyPI's torchvision does not import beside the local torch wheel, and a broken one breaks transformers' image
  # imports: vtoken never needs it, so remove it where a package dragged it in
  if "$VENV/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall -q -y torchvision
  fi
  echo "$want" > "$stamp"
fi
