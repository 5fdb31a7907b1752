#!/usr/bin/env bash
# The GPU check: one prepared run on a lent GPU machine (no Rust, no registries there; torch and
# transformers are) that proves `--device cuda` and measures it against torch on the same GPU.
#
#   scripts/gpu-check.sh prepare    here: fill .gpu-carry/ (git-ignored) with the cuda binary
#                                   (xz) and the MiniLM / SmolLM2 configs and tokenizers
#   scripts/gpu-check.sh run [--device cuda|cpu] [--bin PATH] [--quick]
#                                   there (or here with --device cpu as a dry run): parity
#                                   fixtures through the binary (f32, then f16 and bf16), then
#                                   the MiniLM / SmolLM2 benchmarks against torch; results under
#                                   $OUT (default gpu-check-out/)
#
# On the device (see README "GPU"): run(command="scripts/gpu-check.sh run", carry=[".gpu-carry"]).
# What travels: the tracked tree (~49 MiB, the fixtures included) and .gpu-carry (the binary
# xz-compressed plus ~6 MiB of configs/tokenizers); the tool's limit is 64 MiB in all. The model
# weights are made there at random (seeded) from the configs: the real checkpoints do not fit.
# The CUDA libraries the binary needs (libcublas/libcublasLt/libcudart/libnvrtc .so.13,
# libcurand.so.10) are found in the device Python's pip-installed nvidia wheels (torch's).
set -euo pipefail
cd "$(dirname "$0")/.."

carry=.gpu-carry
mode=${1:-run}
shift || true

prepare() {
    local bin=${CARGO_TARGET_DIR:-target}/release/ferroformers
    local py=${PYTHON:-/work/venv/bench/bin/python}
    rm -rf "$carry" && mkdir -p "$carry/models"
    # MiniLM-L6: everything but the weights. SmolLM2-135M: config and tokenizer read from the
    # GGUF in the cache by transformers (tokenizer.model dropped: tokenizer.json suffices), with
    # the real checkpoint's dtype (bf16).
    HF_HUB_OFFLINE=1 "$py" - "$carry/models" <<'EOF'
import json, shutil, sys
from pathlib import Path
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoTokenizer
out = Path(sys.argv[1])
src = Path(snapshot_download("sentence-transformers/all-MiniLM-L6-v2", local_files_only=True))
dst = out / "minilm"
for f in src.rglob("*"):
    rel = f.relative_to(src)
    if f.is_file() and f.suffix not in (".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot") \
            and rel.parts[0] not in ("onnx", "openvino"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / rel)
import transformers.modeling_gguf_pytorch_utils as gguf_utils
# Reading only the config and tokenizer from a GGUF needs no torch; transformers asks for it
# anyway: let a venv without torch do it.
gguf_utils.is_torch_available = lambda: True
repo, gguf = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf"
dst = out / "smollm2"
AutoTokenizer.from_pretrained(repo, gguf_file=gguf).save_pretrained(dst)
(dst / "tokenizer.model").unlink(missing_ok=True)
# transformers 5 builds a "LlamaTokenizer" from the vocabulary with SentencePiece-style
# splitting, which garbles this byte-level BPE (the device's torch reference then generated
# from other prompt ids and decoded "Ġ" literally, 2026-12-04): the generic class reads
# tokenizer.json as it is, in 4.x and 5.x alike.
tc = dst / "tokenizer_config.json"
tcfg = json.loads(tc.read_text())
tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
tc.write_text(json.dumps(tcfg, indent=1))
cfg = AutoConfig.from_pretrained(repo, gguf_file=gguf).to_dict()
cfg.pop("_name_or_path", None); cfg.pop("_model_name_or_path", None)
cfg.update(torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
(dst / "config.json").write_text(json.dumps(cfg, indent=1))
EOF
    [ -x "$bin" ] || { echo "gpu-check: build $bin first (scripts/build-cuda.sh)" >&2; exit 1; }
    readelf -d "$bin" | grep -q 'libcuda.so' ||
        { echo "gpu-check: $bin was not built with --features cuda" >&2; exit 1; }
    strip -o "$carry/ferroformers" "$bin"
    xz -T2 -6 "$carry/ferroformers"
    local tree carried
    tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
    carried=$(du -sb "$carry" | cut -f1)
    echo "gpu-check: carry $carried bytes + tracked tree $tree bytes = $(((tree + carried) / 1048576)) MiB (limit 64)"
    [ $((tree + carried)) -le $((64 * 1048576)) ] || { echo "gpu-check: over the 64 MiB limit" >&2; exit 1; }
}

run() {
    local device=cuda bin="" quick=()
    while [ $# -gt 0 ]; do
        case $1 in
        --device) device=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --quick) quick=(--quick); shift ;;
        *) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
        esac
    done
    local out=${OUT:-gpu-check-out} work=${GPU_CHECK_WORK:-/tmp/gpu-check}
    local py=${PYTHON:-python3}
    mkdir -p "$out" "$work"
    if [ -z "$bin" ]; then
        bin=$work/ferroformers
        xz -dc "$carry/ferroformers.xz" >"$bin"
        chmod +x "$bin"
    fi
    {
        date -u
        uname -a
        "$py" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
        if [ "$device" != cpu ]; then
            nvidia-smi || true
            # The CUDA libraries from the pip wheels (torch's) of this Python.
            libs=$("$py" - <<'EOF'
import site, sys
from pathlib import Path
roots = [Path(p) / "nvidia" for p in site.getsitepackages() + [site.getusersitepackages()]]
want = ["libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libnvrtc.so.13", "libcurand.so.10"]
dirs = []
for w in want:
    for r in roots:
        hits = sorted(r.glob(f"**/{w}")) if r.is_dir() else []
        if hits:
            d = str(hits[0].parent)
            if d not in dirs:
                dirs.append(d)
            break
    else:
        print(f"gpu-check: {w} not found under {roots}", file=sys.stderr)
print(":".join(dirs))
EOF
)
            export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
            echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        fi
        ldd "$bin"
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"
    if grep -q 'not found' "$out/env.txt"; then
        echo "gpu-check: the binary's libraries are missing (see $out/env.txt)" >&2
        exit 1
    fi
    "$bin" --version
    # One log for everything (the device returns at most 8 files): run.log, beside
    # parity-{f32,f16,bf16}.json and bench.json. Each phase has a time budget (seconds; nothing
    # new starts after it, what was not run is reported as such) so that one run fits the
    # device's 10-minute call: PARITY_S (f32), BENCH_S, REDUCED_S (f16 and bf16 each).
    local status=0 log=$out/run.log
    cat "$out/env.txt" >"$log" && rm "$out/env.txt"
    py_check() { PYTHONUNBUFFERED=1 "$py" scripts/gpu_check.py "$@" --bin "$bin" --device "$device" \
        --out "$out" --work "$work" 2>&1 | tee -a "$log"; }
    # f32 against the committed references (every case), then the benchmarks, then f16 and
    # bf16 (two cases a fixture).
    # PHASES (default "parity bench reduced serve") picks what runs, e.g. PHASES=bench for a
    # rerun of the benchmarks alone; serve checks `ferroformers serve --device` on the same
    # models.
    local phases=" ${PHASES:-parity bench reduced serve} "
    if [[ $phases == *" parity "* ]]; then
        py_check parity --dtype f32 --jobs "${JOBS:-8}" --seconds "${PARITY_S:-0}" || status=1
    fi
    if [[ $phases == *" bench "* ]]; then
        py_check bench --seconds "${BENCH_S:-0}" "${quick[@]}" || status=1
    fi
    if [[ $phases == *" serve "* ]]; then
        py_check serve || status=1
    fi
    if [[ $phases == *" reduced "* ]]; then
        for dt in f16 bf16; do
            py_check parity --dtype $dt --per-fixture 2 --jobs "${JOBS:-8}" \
                --seconds "${REDUCED_S:-0}" || status=1
        done
    fi
    echo "gpu-check: results in $out (status $status)" | tee -a "$log"
    return $status
}

case $mode in
prepare) prepare ;;
run) run "$@" ;;
*) echo "usage: scripts/gpu-check.sh prepare | run [--device cuda|cpu] [--bin PATH] [--quick]" >&2; exit 2 ;;
esac
