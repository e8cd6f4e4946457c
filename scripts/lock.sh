#!/usr/bin/env bash
# Regenerate requirements/lock.txt: resolve vtoken[dev] afresh (the newest versions pyproject.toml's ranges allow)
# in a throw-away venv with torch pinned to $VTOKEN_TORCH (default 2.13.0, the local CPU wheel), and write the exact
# versions. setup.sh and CI install from the lock, so a fresh machine gets the versions CI tested.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH="${VTOKEN_TORCH:-2.13.0}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$tmp/venv/bin/python" -m pip install -q "torch==$TORCH"
echo "torch==$TORCH" > "$tmp/torch.txt"
"$tmp/venv/bin/python" -m pip install -q -c "$tmp/torch.txt" -e ".[dev]"
py="$("$tmp/venv/bin/python" -c 'import sys; print(".".join(map(str, sys.version_info[:2])))')"
{
  echo "# Exact versions CI tests (constraints for pip install -c). Regenerate with: make lock"
  echo "# Resolved $(date -u +%Y-%m-%d) on Python $py, $(uname -m); torch pinned to the local CPU wheel."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable --exclude pip --exclude setuptools --exclude wheel \
    | sed -E 's/^torch==([^+]+)\+.*/torch==\1/' | LC_ALL=C sort -f
} > requirements/lock.txt
echo "lock: wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages; $(grep -i '^transformers==' requirements/lock.txt))"
