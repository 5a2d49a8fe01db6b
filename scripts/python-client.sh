#!/usr/bin/env bash
# Makes (or reuses) a virtual environment with the official `openai` Python client at a pinned version, and prints
# the path of its python on stdout (everything else goes to stderr). The OpenAI-compatibility test
# (tests/tests/openai_client.rs) runs tests/python/openai_client_test.py with it; scripts/test.sh runs this first and
# exports the path as SWITCHYARD_TEST_PYTHON. Safe to run repeatedly and concurrently: when the pinned client imports
# already, it returns at once without touching the network.
#
# Environment: SWITCHYARD_OPENAI_VENV (where the venv lives; default under $XDG_CACHE_HOME or ~/.cache),
# PYTHON (the interpreter that makes the venv; default python3, which needs 3.10 or newer).
set -euo pipefail
# shellcheck source=scripts/lib/python.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/python.sh"

# The client version the test is written against; bump it here (the venv's path carries it, so a bump makes a fresh
# venv instead of upgrading one in place).
openai_version=3.57.0
venv="${SWITCHYARD_OPENAI_VENV:-$switchyard_cache/venv-openai-$openai_version}"
python="$venv/bin/python"

ready() {
  [ -x "$python" ] && "$python" - "$openai_version" >/dev/null 2>&1 <<'EOF'
import sys
import openai
sys.exit(0 if openai.__version__ == sys.argv[1] else 1)
EOF
}

if ready; then
  echo "$python"
  exit 0
fi

take_install_lock "$venv.lock"
if ready; then
  echo "$python"
  exit 0
fi

require_python 10 "the OpenAI client test"
echo "making $venv with openai==$openai_version" >&2
make_venv "$venv"
if ! "$python" -m pip install --quiet --disable-pip-version-check "openai==$openai_version" >&2; then
  rm -rf "$venv"
  echo "error: could not install openai==$openai_version from PyPI into $venv (is PyPI reachable?)" >&2
  exit 1
fi
if ! ready; then
  echo "error: $python cannot import openai $openai_version after installing it" >&2
  exit 1
fi
echo "$python"
