#!/usr/bin/env bash
# Installs what building and testing Switchyard needs beyond a Rust toolchain, on Debian/Ubuntu (apt), or says
# exactly what is missing. Run by scripts/switchyard (building) and scripts/test.sh (`ensure-deps.sh test`: also what
# the tests need); safe to run repeatedly.
set -euo pipefail

missing=()
command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found: install a Rust toolchain (https://rustup.rs)" >&2; exit 1; }
# C/C++ compilers: the tokenizers crate builds Oniguruma from C.
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
# protoc: etcd-client's build script compiles etcd's protos with it.
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# etcd: the coordinator's store tests run against a real etcd server they start on loopback.
if [ "${1:-}" = test ]; then
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    echo "installing with sudo: ${missing[*]}" >&2
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "error: missing Debian packages: ${missing[*]} (install them, then run this again)" >&2
    exit 1
  fi
fi
