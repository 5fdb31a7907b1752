#!/usr/bin/env bash
# Build ferroformers with `--features cuda` on a machine without a GPU or a CUDA install: CUDA's
# compiler, headers and libraries come from pinned PyPI wheels in a venv.
#
# Usage: scripts/build-cuda.sh [build|check|lint|clippy|env]
#   build (default)  target/release/ferroformers with CUDA (cargo's target dir: $CARGO_TARGET_DIR
#                    or target/), then prints its size and the libraries it needs
#   check            `cargo check -p ferroformers --features cuda` (compiler wheels only)
#   lint             clippy `-D warnings` of the CLI and library with `--features cuda`, candle's
#                    kernels left empty by scripts/nvcc-check-shim.sh (CI: ~2 minutes)
#   clippy           `cargo clippy -p ferroformers --features cuda --all-targets -- -D warnings`
#   env              print the environment as `export` lines (`eval "$(scripts/build-cuda.sh env)"`)
#
# FERROFORMERS_CUDA_VENV: the venv (default .venv-cuda, git-ignored; created once, reused).
# CUDA_COMPUTE_CAP: the GPU generation the kernels are compiled for (default 90: H100/H200;
# there is no nvidia-smi here to ask). candle JIT-compiles the PTX on the GPU at run time.
#
# What the binary needs at run time (candle 0.11 links cudarc with `dynamic-linking`): libcuda.so.1
# (the driver's) and libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10,
# libnvrtc.so.13 (CUDA 13, e.g. torch's pip wheels: scripts/gpu-check.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-build}
venv=${FERROFORMERS_CUDA_VENV:-$PWD/.venv-cuda}
cap=${CUDA_COMPUTE_CAP:-90}

python3 -m venv "$venv" >/dev/null 2>&1 || [ -x "$venv/bin/python" ]
pip_install() {
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$1"
}
pip_install scripts/requirements-cuda.txt
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cuda=$site/nvidia/cu13
[ -x "$cuda/bin/nvcc" ] || { echo "build-cuda: no nvcc at $cuda/bin/nvcc" >&2; exit 1; }

# The folder cudarc's build script searches for libraries to link (CUDA_HOME/lib): unversioned
# names for the linker, a stub libcuda.so (the driver is not installed here; the binary binds to
# the real libcuda.so.1 where it runs).
link=$venv/cuda-link
if [ "$mode" = build ]; then
    pip_install scripts/requirements-cuda-libs.txt
    mkdir -p "$link/lib"
    for lib in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
        [ -e "$cuda/lib/lib$lib" ] || { echo "build-cuda: missing $cuda/lib/lib$lib" >&2; exit 1; }
        ln -sf "$cuda/lib/lib$lib" "$link/lib/lib$lib"
        ln -sf "lib$lib" "$link/lib/lib${lib%%.so*}.so"
    done
    if [ ! -e "$link/lib/libcuda.so" ]; then
        # Every driver entry point cudarc declares, as an empty function: enough for the linker.
        version=$(grep -A1 '^name = "cudarc"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
        cargo fetch --locked >/dev/null
        sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$version" | head -1)/src/driver/sys/mod.rs
        [ -f "$sys" ] || { echo "build-cuda: cudarc $version's sources not found" >&2; exit 1; }
        grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | sort -u |
            sed -E 's/^pub unsafe fn (.*)/void \1(void) {}/' >"$link/libcuda_stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/lib/libcuda.so" "$link/libcuda_stub.c"
    fi
fi

export NVCC=$cuda/bin/nvcc
export PATH=$cuda/bin:$PATH
export CUDA_HOME=$link
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP=$cap
# nvcc jobs in candle-kernels' build (one per core).
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
export LD_LIBRARY_PATH=$link/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

case $mode in
env)
    for v in NVCC PATH CUDA_HOME CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP CUDAFORGE_THREADS LD_LIBRARY_PATH; do
        printf 'export %s=%q\n' "$v" "${!v}"
    done
    ;;
check) cargo check -p ferroformers --features cuda ;;
lint)
    # The Rust side only, with nvcc-check-shim.sh standing in for the compiler (empty
    # kernels): seconds of nvcc instead of 7-25 minutes, so CI runs it every time.
    export FERROFORMERS_REAL_NVCC=$NVCC NVCC=$PWD/scripts/nvcc-check-shim.sh
    cargo clippy -p ferroformers-cli --features cuda --all-targets -- -D warnings
    ;;
clippy) cargo clippy -p ferroformers --features cuda --all-targets -- -D warnings ;;
build)
    cargo build --release -p ferroformers-cli --features cuda
    bin=${CARGO_TARGET_DIR:-target}/release/ferroformers
    size=$(stat -c %s "$bin")
    echo "build-cuda: $bin, $((size / 1048576)) MiB ($size bytes); xz: $(xz -T2 -6 -c "$bin" | wc -c) bytes"
    echo "build-cuda: libraries it needs:"
    readelf -d "$bin" | grep NEEDED
    ;;
*)
    echo "usage: scripts/build-cuda.sh [build|check|lint|clippy|env]" >&2
    exit 2
    ;;
esac
