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

# The client version the test is written against; bump it here (the venv's path carries it, so a bump makes a fresh
# venv instead of upgrading one in place).
openai_version=3.57.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard"
venv="${SWITCHYARD_OPENAI_VENV:-$cache/venv-openai-$openai_version}"
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

mkdir -p "$(dirname "$venv")"
# One installer at a time: a second caller waits, then finds the venv ready.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$venv.lock"
  flock 9
  if ready; then
    echo "$python"
    exit 0
  fi
fi

base="${PYTHON:-python3}"
if ! command -v "$base" >/dev/null 2>&1; then
  echo "error: $base not found: the OpenAI client test needs Python 3.10+ with venv and pip" \
    "(Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$base" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "error: $base is $("$base" --version 2>&1); the openai client $openai_version needs Python 3.10 or newer" >&2
  exit 1
fi

echo "making $venv with openai==$openai_version" >&2
rm -rf "$venv"
if ! "$base" -m venv "$venv" >&2; then
  rm -rf "$venv"
  # Debian's python3 leaves venv's pip bootstrap (ensurepip) to a separate package.
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing python3-venv" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    "$base" -m venv "$venv" >&2
  else
    echo "error: '$base -m venv' failed: install Python's venv module (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
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
