#!/usr/bin/env bash
# Run tests against other dependency versions than the lock, in a separate venv:
#   scripts/test_against.sh latest [pytest args]      the newest releases pyproject.toml's ranges allow (fresh venv)
#   scripts/test_against.sh 5.16.0 [pytest args]      transformers==5.16.0 and what pip resolves beside it
# Default pytest args: tests/models (every family and method through vtoken.apply). torch stays the lock's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOCK=requirements/lock.txt
what="${1:?usage: scripts/test_against.sh latest|TRANSFORMERS_VERSION [pytest args]}"
shift
[ $# -gt 0 ] || set -- tests/models
torch="${VTOKEN_TORCH:-$(sed -n 's/^torch==//p' "$LOCK")}"
venv=".venv-$what"
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install -q "torch==$torch"
echo "torch==$torch" > "$venv/constraints.txt"
if [ "$what" = latest ]; then
  "$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -c "$venv/constraints.txt" -e ".[dev]"
else
  # that release (also one below pyproject's range, to find the lowest that passes), whatever versions of its own
  # dependencies (hub, tokenizers) pip resolves for it, and vtoken's other requirements
  reqs="$("$venv/bin/python" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(r for r in p["dependencies"] + p["optional-dependencies"]["dev"] if not r.startswith("transformers")))')"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" "transformers==$what" $reqs
  "$venv/bin/python" -m pip install -q --no-deps -e .
fi
if "$venv/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
  "$venv/bin/python" -m pip uninstall -q -y torchvision
fi
"$venv/bin/python" -c "import torch, transformers; print('testing against torch', torch.__version__, \
  'transformers', transformers.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
