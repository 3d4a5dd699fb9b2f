#!/usr/bin/env bash
# Installs every build and test dependency from Debian packages and the npm registry.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libcli11-dev libboost-dev
  libopenmpi-dev openmpi-bin
  python3 python3-numpy python3-torch
  gnuplot-nox prometheus curl
  clang-14 libclang-rt-14-dev  # scripts/fuzz.sh: libFuzzer with ASan/UBSan
  libdnnl-dev  # bench/kernels/onednn_bench: linear() against oneDNN's matmul
  ocl-icd-opencl-dev  # libdnnl-dev's CMake config requires OpenCL, which it does not depend on
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js may come from another source than Debian (with npm bundled): install Debian's only when
# the commands are missing.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install_deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# npm packages used by the tests (independent tokenizer reference, the official openai client,
# the @huggingface/gguf reader that checks the GGUF files gen-model writes).
if [ -f tests/node/package.json ]; then
  (cd tests/node && { [ -d node_modules ] && npm ls >/dev/null 2>&1; } || npm ci --no-audit --no-fund --loglevel=error)
fi
# llama.cpp as an independent engine (tests/llamacpp: node-llama-cpp and its prebuilt CPU
# binaries for x86-64 Linux): --omit=optional leaves out its GPU builds (about 600 MB),
# --ignore-scripts its postinstall (which would try to download and build llama.cpp where no
# prebuilt binary fits). `npm install`, not `npm ci`: npm's lock records only this platform's
# optional packages, and `npm ci` refuses a lock without the others.
if [ -f tests/llamacpp/package.json ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  (cd tests/llamacpp && { [ -d node_modules/node-llama-cpp ] && [ -d node_modules/@node-llama-cpp/linux-x64 ]; } ||
    npm install --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
echo "install_deps: ok"
