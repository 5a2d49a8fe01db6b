#!/usr/bin/env bash
# Regenerates every Llama 4 golden fixture under tests/golden/ from fixed seeds.
# Usage: bash tests/golden/generate.sh   (PYTHON=python3.11 to choose the interpreter for the venv)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"

if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
"$venv/bin/python" "$here/generate.py"
du -sh --exclude=.venv "$here"
