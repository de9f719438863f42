#!/usr/bin/env bash
# A Python virtual environment in .cache/venv with the official `openai` package, for the
# test that drives a node with it (crates/mycel-node/tests/openai_api.rs).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cache/venv"
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import openai" 2>/dev/null; then
  echo "openai package ready in $venv"
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade "openai>=1.50,<3"
echo "openai package ready in $venv"
