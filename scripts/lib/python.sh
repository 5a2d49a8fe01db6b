# Shared by the scripts that fetch test tools from PyPI (python-client.sh, helm-tools.sh, nvrtc-tools.sh): where
# their caches live, one installer at a time, and a base Python that is there and new enough. Source it; every
# message goes to stderr, because those scripts print their results on stdout.

# The cache every tool script keeps its downloads and venvs under.
switchyard_cache="${XDG_CACHE_HOME:-$HOME/.cache}/switchyard"

# take_install_lock LOCKFILE: holds an exclusive lock on LOCKFILE (fd 9) until the script exits, so that a second
# caller waits for the first and then finds the tools ready. Where flock is missing, callers race (rare: util-linux
# has it on every Debian).
take_install_lock() {
  mkdir -p "$(dirname "$1")"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$1"
    flock 9
  fi
}

# require_python MINOR PURPOSE: sets $base_python to ${PYTHON:-python3} after checking that it runs and is at least
# 3.MINOR; otherwise says what to install for PURPOSE and returns 1.
require_python() {
  local minor="$1" purpose="$2"
  base_python="${PYTHON:-python3}"
  if ! command -v "$base_python" >/dev/null 2>&1; then
    echo "error: $base_python not found: $purpose needs Python 3.$minor+ with venv and pip" \
      "(Debian: apt-get install python3 python3-venv python3-pip)" >&2
    return 1
  fi
  if ! "$base_python" -c "import sys; sys.exit(0 if sys.version_info >= (3, $minor) else 1)"; then
    echo "error: $base_python is $("$base_python" --version 2>&1); $purpose needs Python 3.$minor or newer" >&2
    return 1
  fi
}

# make_venv DIR: a fresh venv at DIR from $base_python. Debian's python3 leaves venv's pip bootstrap (ensurepip) to
# the python3-venv package: as root with apt, it is installed and the venv made again; otherwise says what to install.
make_venv() {
  local venv="$1"
  rm -rf "$venv"
  if "$base_python" -m venv "$venv" >&2; then
    return 0
  fi
  rm -rf "$venv"
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing python3-venv" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
    if "$base_python" -m venv "$venv" >&2; then
      return 0
    fi
    rm -rf "$venv"
  fi
  echo "error: '$base_python -m venv' failed: install Python's venv module (Debian: apt-get install python3-venv)" >&2
  return 1
}
