#!/usr/bin/env bash
# A stand-in for nvcc for `scripts/build-cuda.sh lint`: the Rust code of `--features cuda`
# type-checked and linted without compiling candle's CUDA kernels (7-25 minutes of nvcc on two
# cores, past CI's budget). Questions about the toolkit go to the real (pinned) nvcc in
# $FERROFORMERS_REAL_NVCC; compilations write empty outputs: PTX that `include_str!` embeds,
# objects and an empty archive that `cargo check`/`clippy` never link. `scripts/build-cuda.sh
# check` and `build` run the real compiler.
set -euo pipefail
real=${FERROFORMERS_REAL_NVCC:?set FERROFORMERS_REAL_NVCC to the real nvcc}
for a in "$@"; do
    case $a in
    --version | -V | --list-gpu-code | --list-gpu-arch) exec "$real" "$@" ;;
    esac
done
out="" dir="" ptx=0 lib=0 src=""
while [ $# -gt 0 ]; do
    case $1 in
    -o | --output-file) out=$2; shift 2 ;;
    --output-directory | -odir) dir=$2; shift 2 ;;
    --ptx | -ptx) ptx=1; shift ;;
    --lib | -lib) lib=1; shift ;;
    *.cu) src=$1; shift ;;
    *) shift ;;
    esac
done
if [ "$ptx" = 1 ]; then
    name=$(basename "${src%.cu}").ptx
    : >"${out:-${dir:-.}/$name}"
elif [ "$lib" = 1 ]; then
    rm -f "$out" && ar rcs "$out"
elif [ -n "$out" ]; then
    : >"$out"
fi
